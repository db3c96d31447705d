import fs from 'node:fs';
import path from 'node:path';
import { describe, expect, it } from 'vitest';
import { BlockBackend } from '../../block/backend.js';
import { BlockError } from '../../block/errors.js';
import { Perm } from '../../block/flags.js';
import { attachChild, TransientParent } from '../../block/node.js';
import { scratchDir } from '../helpers/tmp.js';
import { testGraph } from '../helpers/graphs.js';

const dir = scratchDir();

function rawFile(name: string, bytes: number, fill = 0): string {
  const p = path.join(dir, name);
  fs.writeFileSync(p, Buffer.alloc(bytes, fill));
  return p;
}

async function rejection(p: Promise<unknown>): Promise<BlockError> {
  try {
    await p;
  } catch (e) {
    expect(e).toBeInstanceOf(BlockError);
    return e as BlockError;
  }
  throw new Error('expected a rejection');
}

describe('BlockGraph open', () => {
  it('opens raw over file from nested options and names nodes', async () => {
    const g = testGraph();
    const file = rawFile('a.raw', 4096);
    const node = await g.openNode({ driver: 'raw', 'node-name': 'top', file: { driver: 'file', filename: file } });
    expect(node.nodeName).toBe('top');
    expect(node.driver.name).toBe('raw');
    expect(node.file?.node.driver.name).toBe('file');
    expect(node.file?.node.autoNamed).toBe(true);
    expect(node.filename).toBe(file);
    expect(node.totalBytes).toBe(4096);
    expect([...g.nodes.keys()].sort()).toEqual([node.file!.node.nodeName, 'top'].sort());
  });

  it('references an existing node by name as a child', async () => {
    const g = testGraph();
    const proto = await g.openNode({ driver: 'file', 'node-name': 'proto', filename: rawFile('b.raw', 8192) });
    proto.userOwned = true;
    const top = await g.openNode({ driver: 'raw', file: 'proto' });
    expect(top.file?.node).toBe(proto);
  });

  it('rejects unknown drivers, keys, bad values and duplicate names with QEMU messages', async () => {
    const g = testGraph();
    const file = rawFile('c.raw', 512);
    expect((await rejection(g.openNode({ driver: 'nosuch' }))).message).toBe("Unknown driver 'nosuch'");
    expect((await rejection(g.openNode({ driver: 'raw', foo: '1', file: { driver: 'file', filename: file } }))).message).toBe(
      "Block format 'raw' does not support the option 'foo'",
    );
    expect((await rejection(g.openNode({ driver: 'file', filename: file, bar: 'x' }))).message).toBe(
      "Block protocol 'file' doesn't support the option 'bar'",
    );
    expect((await rejection(g.openNode({ driver: 'file', filename: file, 'read-only': 'maybe' }))).message).toBe(
      "Parameter 'read-only' expects 'on' or 'off'",
    );
    await g.openNode({ driver: 'file', filename: file, 'node-name': 'dup' });
    expect((await rejection(g.openNode({ driver: 'file', filename: file, 'node-name': 'dup' }))).message).toBe(
      "Duplicate nodes with node-name='dup'",
    );
    expect((await rejection(g.openNode({ driver: 'file', filename: file, 'node-name': '1bad' }))).message).toBe(
      "Invalid node-name: '1bad'",
    );
  });

  it('leaves no node behind when an open fails half-way', async () => {
    const g = testGraph();
    const file = rawFile('d.raw', 1024);
    await rejection(g.openNode({ driver: 'raw', offset: 4096, file: { driver: 'file', filename: file } }));
    expect(g.nodes.size).toBe(0);
  });

  it('refuses detect-zeroes=unmap without discard=unmap', async () => {
    const g = testGraph();
    const e = await rejection(g.openNode({ driver: 'file', filename: rawFile('e.raw', 512), 'detect-zeroes': 'unmap' }));
    expect(e.message).toMatch(/detect-zeroes to unmap is not allowed/);
  });

  it('children inherit read-only and discard', async () => {
    const g = testGraph();
    const node = await g.openNode({
      driver: 'raw',
      'read-only': true,
      discard: 'unmap',
      file: { driver: 'file', filename: rawFile('f.raw', 512) },
    });
    expect(node.file!.node.readOnly).toBe(true);
    expect(node.file!.node.openFlags.unmap).toBe(true);
  });
});

describe('probing', () => {
  it('guesses raw and guards the first sector of a probed raw image', async () => {
    const g = testGraph();
    const file = rawFile('p.raw', 65536);
    const node = await g.openImage(file);
    expect(node.driver.name).toBe('raw');
    expect(node.probed).toBe(true);
    const blk = new BlockBackend(g, node, { writable: true });
    await blk.pwrite(0, Buffer.alloc(512, 1));
    const qcowMagic = Buffer.alloc(512);
    qcowMagic.write('QFI\xfb', 0, 'latin1');
    // With only raw registered nothing else probes, so the write is allowed.
    await blk.pwrite(0, qcowMagic);
    await blk.close();
  });
});

describe('permissions and lifetime', () => {
  it('a read-only node refuses writers, and writes through it fail with EPERM', async () => {
    const g = testGraph();
    const node = await g.openImage(rawFile('ro.raw', 4096), { format: 'raw', readOnly: true });
    expect(() => new BlockBackend(g, node, { writable: true })).toThrow(/read-only/);
    const blk = new BlockBackend(g, node);
    expect((await rejection(blk.pwrite(0, Buffer.alloc(512)))).code).toBe('EPERM');
    await blk.close();
  });

  it('an edge that does not share writes blocks a second writer', async () => {
    const g = testGraph();
    const node = await g.openImage(rawFile('perm.raw', 4096), { format: 'raw' });
    const writer = new BlockBackend(g, node, { writable: true });
    // An exclusive user cannot join while someone writes…
    expect(() => attachChild(new TransientParent('exclusive user'), 'x', 0, node, Perm.CONSISTENT_READ, Perm.CONSISTENT_READ)).toThrow(
      /permissions 'write' are both required by an unnamed block device \(uses node '[^']+' as 'root' child\) and unshared by exclusive user \(uses node '[^']+' as 'x' child\)\./,
    );
    await writer.close();
    // …and once it holds the node, writers are refused while readers are fine.
    const node2 = await g.openImage(rawFile('perm2.raw', 4096), { format: 'raw' });
    attachChild(new TransientParent('exclusive user'), 'x', 0, node2, Perm.CONSISTENT_READ, Perm.CONSISTENT_READ);
    expect(() => new BlockBackend(g, node2, { writable: true })).toThrow(
      /^Permission conflict on node '[^']+': permissions 'write' are both required by an unnamed block device \(uses node '[^']+' as 'root' child\) and unshared by exclusive user/,
    );
    const reader = new BlockBackend(g, node2);
    await reader.pread(0, Buffer.alloc(512));
  });

  it('closing the last backend closes the node and its children', async () => {
    const g = testGraph();
    const node = await g.openImage(rawFile('life.raw', 4096), { format: 'raw' });
    const file = node.file!.node;
    const blk = new BlockBackend(g, node, { writable: true });
    await blk.pwrite(0, Buffer.alloc(4096, 7));
    await blk.close();
    expect(node.closed).toBe(true);
    expect(file.closed).toBe(true);
    expect(g.nodes.size).toBe(0);
  });

  it('closeNode refuses a node that is still used', async () => {
    const g = testGraph();
    const node = await g.openImage(rawFile('busy.raw', 4096), { format: 'raw' });
    const e = await rejection(g.closeNode(node.file!.node));
    expect(e.code).toBe('EBUSY');
    expect(e.message).toMatch(/is busy: node is used as file of node/);
  });
});

describe('option trees, protocols and filenames', () => {
  it('fills child drivers from filenames and probes a tree without driver', async () => {
    const g = testGraph();
    const file = rawFile('tree.raw', 4096);
    const explicit = await g.openOptions({ driver: 'raw', file: { filename: file } });
    expect(explicit.file!.node.driver.name).toBe('file');
    const probed = await g.openOptions({ file: { filename: file } });
    expect(probed.driver.name).toBe('raw');
    expect(probed.probed).toBe(true);
    await expect(g.openOptions({ 'read-only': 'on' })).rejects.toThrow('Must specify either driver or file');
  });

  it('knows protocols by prefix and refuses unknown ones', async () => {
    const g = testGraph();
    expect(g.protocolFor('null-co://').name).toBe('null-co');
    expect(g.protocolFor('./a:b').name).toBe('file');
    expect(() => g.protocolFor('a:b')).toThrow("Unknown protocol 'a'");
    const node = await g.openImage(`file:${rawFile('prefixed.raw', 512)}`, { format: 'raw' });
    expect(node.filename).toBe(path.join(dir, 'prefixed.raw'));
  });

  it('describes nodes with strong options as QEMU json: filenames', async () => {
    const g = testGraph();
    const file = rawFile('json.raw', 8192);
    const windowed = await g.openNode({ driver: 'raw', offset: '4096', file: { driver: 'file', filename: file } });
    // QEMU's QDict order puts "offset" before "driver" here (qemu-img info prints the same).
    expect(windowed.filename).toBe(`json:{"offset": "4096", "driver": "raw", "file": {"driver": "file", "filename": "${file}"}}`);
    const plain = await g.openNode({ driver: 'raw', file: { driver: 'file', filename: file } });
    expect(plain.filename).toBe(file);
    const nul = await g.openNode({ driver: 'null-co', size: '1M', 'read-zeroes': 'on' });
    expect(nul.filename).toBe('json:{"read-zeroes": "on", "driver": "null-co", "size": "1M"}');
    expect(nul.totalBytes).toBe(1 << 20);
  });

  it('refuses force-share on a writable node', async () => {
    const g = testGraph();
    await expect(g.openNode({ driver: 'file', filename: rawFile('fs.raw', 512), 'force-share': 'on' })).rejects.toThrow(
      'force-share=on can only be used with read-only images',
    );
  });
});
