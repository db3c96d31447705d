/*
 * Image locking in the file driver (drivers/file/lock.ts): QEMU's OFD byte
 * locks taken for each file node's cumulative permissions.
 *
 * OFD locks belong to the open file description, so two nodes on one file
 * in this one process conflict exactly as two QEMU processes do; the tests
 * open the same image twice (in two graphs, as two tools would) and look at
 * the lock bytes from a third descriptor with the addon's lockConflict.
 * Byte map (QEMU's): 100 + i held for permission i (consistent read,
 * write, write unchanged, resize), 200 + i for permission i not shared.
 *
 * Without the addon or OFD locks (QEMU_BLOCK_TS_NO_NATIVE=1, or a host
 * without them) the locking tests skip; the option and fallback tests run
 * everywhere.
 */
import fs from 'node:fs';
import path from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { BlockBackend } from '../../block/backend.js';
import { createImage } from '../../block/create.js';
import { Perm } from '../../block/flags.js';
import type { BlockGraph } from '../../block/graph.js';
import type { BlockNode } from '../../block/node.js';
import { reopenSetReadOnly } from '../../block/reopen.js';
import { fallbackHostIo, loadHostIo } from '../../drivers/file/host-io.js';
import { FileLocks, LOCK_PERM_BASE_BYTE, LOCK_SHARED_BASE_BYTE, lockingEnabled } from '../../drivers/file/lock.js';
import { testGraph } from '../helpers/graphs.js';
import { scratchDir } from '../helpers/tmp.js';

const MiB = 1024 * 1024;
const host = loadHostIo();
const noOfd = host.lockKind !== 'ofd';
const dir = scratchDir('file-lock-');
/** Bit index of each permission in the lock byte map. */
const BIT = { read: 0, write: 1, writeUnchanged: 2, resize: 3 } as const;

/** Descriptors a test opened to look at locks; closed after it. */
const probes: number[] = [];
afterEach(() => {
  for (const fd of probes.splice(0)) fs.closeSync(fd);
});

let imageCount = 0;
async function qcow2Image(): Promise<string> {
  const filename = path.join(dir, `img${++imageCount}.qcow2`);
  await createImage(testGraph(), { format: 'qcow2', filename, sizeBytes: 4 * MiB, options: [], quiet: true });
  return filename;
}

function rawImage(): string {
  const filename = path.join(dir, `img${++imageCount}.raw`);
  fs.writeFileSync(filename, Buffer.alloc(MiB));
  return filename;
}

/** Which lock bytes other descriptions hold on `filename`, as "100,101,…". */
function heldBytes(filename: string): string {
  const fd = fs.openSync(filename, 'r');
  probes.push(fd);
  const held: number[] = [];
  for (const base of [LOCK_PERM_BASE_BYTE, LOCK_SHARED_BASE_BYTE]) {
    for (const bit of Object.values(BIT)) if (host.lockConflict(fd, base + bit, 1)) held.push(base + bit);
  }
  return held.join(',');
}

/** Opens `filename` as a tool would: a node and a backend asking for write when not read-only. */
async function openUser(graph: BlockGraph, filename: string, opts: { format: string; readOnly?: boolean; forceShare?: boolean; options?: Record<string, unknown> }) {
  const node = await graph.openImage(filename, {
    format: opts.format,
    readOnly: opts.readOnly ?? false,
    forceShare: opts.forceShare,
    protocolOptions: opts.options as never,
  });
  const blk = new BlockBackend(graph, node, { writable: !node.readOnly });
  return { node, blk };
}

const hint = (filename: string) => `\nIs another process using the image [${filename}]?`;

describe.skipIf(noOfd)('file locks between two users of one image', () => {
  it('locks the bytes QEMU locks for a writable and a read-only qcow2', async () => {
    const filename = await qcow2Image();
    const writer = await openUser(testGraph(), filename, { format: 'qcow2' });
    expect(heldBytes(filename)).toBe('100,101,103,201,203');
    await writer.blk.close();
    expect(heldBytes(filename)).toBe('');
    await openUser(testGraph(), filename, { format: 'qcow2', readOnly: true });
    expect(heldBytes(filename)).toBe('100,201,203');
  });

  it('refuses a second writer and a reader that does not share write, in QEMU words', async () => {
    const filename = await qcow2Image();
    await openUser(testGraph(), filename, { format: 'qcow2' });
    await expect(openUser(testGraph(), filename, { format: 'qcow2' })).rejects.toMatchObject({
      code: 'EAGAIN',
      message: `Failed to get "write" lock${hint(filename)}`,
    });
    await expect(openUser(testGraph(), filename, { format: 'qcow2', readOnly: true })).rejects.toMatchObject({
      message: `Failed to get shared "write" lock${hint(filename)}`,
    });
  });

  it('lets a force-share reader and a locking=off user in', async () => {
    const filename = await qcow2Image();
    await openUser(testGraph(), filename, { format: 'qcow2' });
    const shared = await openUser(testGraph(), filename, { format: 'qcow2', readOnly: true, forceShare: true });
    expect(shared.node.totalBytes).toBe(4 * MiB);
    const unlocked = await openUser(testGraph(), filename, { format: 'qcow2', readOnly: true, options: { locking: 'off' } });
    expect(unlocked.node.totalBytes).toBe(4 * MiB);
  });

  it('holds the write bytes only while a user writes: a raw reader shares write', async () => {
    const filename = rawImage();
    const reader = await openUser(testGraph(), filename, { format: 'raw', readOnly: true });
    expect(heldBytes(filename)).toBe('100');
    const writer = await openUser(testGraph(), filename, { format: 'raw' });
    expect(heldBytes(filename)).toBe('100,101');
    await writer.blk.close();
    await reader.blk.close();
    expect(heldBytes(filename)).toBe('');
  });

  it('undoes a refused tightening: the bytes stay as committed', async () => {
    const filename = rawImage();
    const { blk } = await openUser(testGraph(), filename, { format: 'raw' });
    const other = fs.openSync(filename, 'r');
    probes.push(other);
    host.lockBytes(other, LOCK_SHARED_BASE_BYTE + BIT.resize, 1);
    expect(() => blk.setPerm(Perm.CONSISTENT_READ | Perm.WRITE | Perm.RESIZE, Perm.ALL & ~Perm.WRITE)).toThrow(
      `Failed to get "resize" lock${hint(filename)}`,
    );
    host.unlockBytes(other, LOCK_SHARED_BASE_BYTE + BIT.resize, 1);
    expect(heldBytes(filename)).toBe('100,101');
    expect([blk.root.perm, blk.root.shared]).toEqual([Perm.CONSISTENT_READ | Perm.WRITE, Perm.ALL]);
    blk.setPerm(Perm.CONSISTENT_READ | Perm.WRITE | Perm.RESIZE, Perm.ALL & ~Perm.WRITE);
    expect(heldBytes(filename)).toBe('100,101,103,201');
  });

  it('moves the locks to the new descriptor of a read-write reopen', async () => {
    const filename = await qcow2Image();
    const graph = testGraph();
    const node: BlockNode = await graph.openImage(filename, { format: 'qcow2', readOnly: true });
    const blk = new BlockBackend(graph, node);
    expect(heldBytes(filename)).toBe('100,201,203');
    await reopenSetReadOnly(node, false);
    blk.setPerm(Perm.CONSISTENT_READ | Perm.WRITE, Perm.ALL);
    expect(heldBytes(filename)).toBe('100,101,103,201,203');
    await reopenSetReadOnly(node, true).catch(() => undefined);
    await expect(openUser(testGraph(), filename, { format: 'qcow2' })).rejects.toThrow('Failed to get "write" lock');
  });

  it('refuses to create over an image in use, and leaves it intact', async () => {
    const filename = await qcow2Image();
    await openUser(testGraph(), filename, { format: 'qcow2' });
    const before = fs.readFileSync(filename);
    await expect(createImage(testGraph(), { format: 'qcow2', filename, sizeBytes: MiB, options: [], quiet: true })).rejects.toThrow(
      `Failed to get "write" lock${hint(filename)}`,
    );
    expect(fs.readFileSync(filename).equals(before)).toBe(true);
    expect(heldBytes(filename)).toBe('100,101,103,201,203');
  });
});

describe('file driver options', () => {
  const open = (options: Record<string, unknown>) => testGraph().openNode({ driver: 'file', filename: rawImage(), ...options });

  it('takes locking, aio, aio-max-batch, drop-cache, x-check-cache-dropped as QEMU 7.2 does', async () => {
    for (const options of [
      { locking: 'off' }, { locking: 'auto' }, { locking: true }, { aio: 'threads' }, { aio: 'io_uring' },
      { 'aio-max-batch': '-1' }, { 'aio-max-batch': ' 0x10' }, { 'drop-cache': 'off' }, { 'x-check-cache-dropped': 'on' },
    ]) {
      await expect(open(options)).resolves.toMatchObject({ totalBytes: MiB });
    }
  });

  it("refuses bad values with QEMU's texts", async () => {
    const cases: Array<[Record<string, unknown>, string]> = [
      [{ locking: 'yes' }, 'invalid parameter value: yes'],
      [{ aio: 'foo' }, 'invalid parameter value: foo'],
      [{ aio: 'native' }, 'aio=native was specified, but it requires cache.direct=on, which was not specified.'],
      [{ 'aio-max-batch': 'abc' }, "Parameter 'aio-max-batch' expects a number"],
      [{ 'aio-max-batch': '99999999999999999999' }, "Value '99999999999999999999' is too large for parameter 'aio-max-batch'"],
      [{ 'drop-cache': 'maybe' }, "Parameter 'drop-cache' expects 'on' or 'off'"],
      [{ 'pr-manager': 'x' }, "No persistent reservation manager with id 'x'"],
    ];
    for (const [options, message] of cases) await expect(open(options)).rejects.toThrow(message);
  });

  it('names a pr-manager that is another kind of object', async () => {
    const graph = testGraph();
    graph.objects = new Map([['s0', { qomType: 'secret', id: 's0', props: {} }], ['pr0', { qomType: 'pr-manager-helper', id: 'pr0', props: {} }]]);
    await expect(graph.openNode({ driver: 'file', filename: rawImage(), 'pr-manager': 's0' })).rejects.toThrow(
      "Object with id 's0' is not a persistent reservation manager",
    );
    await expect(graph.openNode({ driver: 'file', filename: rawImage(), 'pr-manager': 'pr0' })).resolves.toBeDefined();
  });
});

describe('locking without lock support', () => {
  it('auto locks nothing, on is refused, off is off', () => {
    const warn = (): void => {};
    expect(lockingEnabled('auto', fallbackHostIo, warn)).toBe(false);
    expect(lockingEnabled('off', fallbackHostIo, warn)).toBe(false);
    expect(() => lockingEnabled('on', fallbackHostIo, warn)).toThrow('locking=on needs the native hostio addon');
  });

  it('the pure-Node host has no lock calls', () => {
    expect(fallbackHostIo.lockKind).toBe(null);
    for (const call of [fallbackHostIo.lockBytes, fallbackHostIo.unlockBytes, fallbackHostIo.lockConflict]) {
      expect(() => call(0, LOCK_PERM_BASE_BYTE, 1)).toThrow(expect.objectContaining({ code: 'ENOTSUP' }));
      expect(() => call(-1, LOCK_PERM_BASE_BYTE, 1)).toThrow(TypeError);
    }
  });

  it('a disabled lock table never touches the descriptor', () => {
    const locks = new FileLocks(fallbackHostIo, false, 'x');
    expect(() => {
      locks.prepare(-1, Perm.ALL, 0);
      locks.commit(-1, Perm.ALL, 0);
      locks.abort(-1);
      locks.copyTo(-1);
    }).not.toThrow();
  });
});
