/*
 * Reopening nodes read-only / read-write in place (block/reopen.ts, the
 * file and qcow2 drivers' `reopen`): the node stays the same object with
 * the same driver state, writes go through while it is writable and are
 * refused (EPERM, by the gate and by the permission rules) once it is
 * read-only again, the host descriptor follows (a write on the read-only
 * one fails in the kernel), requests in flight finish before the swap,
 * qcow2 keeps its caches, clears the lazy-refcounts dirty bit and stores
 * its bitmaps when it goes read-only and marks them in use when it goes
 * read-write; refusals (a writer present, a read-only child of someone
 * else, force-share, a corrupt image) leave everything as it was. Images
 * are checked by our checker and, when installed, by qemu-img check.
 */
import fs from 'node:fs';
import path from 'node:path';
import { describe, expect, it } from 'vitest';
import { BlockBackend } from '../../block/backend.js';
import { createImage } from '../../block/create.js';
import type { BlockDriver } from '../../block/driver.js';
import { bitmapAdd } from '../../block/dirty-bitmap-ops.js';
import { findDirtyBitmap } from '../../block/dirty-bitmap.js';
import { Perm } from '../../block/flags.js';
import type { BlockGraph } from '../../block/graph.js';
import { preadv, pwritev } from '../../block/io.js';
import { attachChild, detachChild, TransientParent, type BdrvChild, type BlockNode } from '../../block/node.js';
import { reopenSetReadOnly } from '../../block/reopen.js';
import { Incompat } from '../../drivers/qcow2/format.js';
import { stateOf } from '../../drivers/qcow2/state.js';
import { fileDriver } from '../../drivers/file/file.js';
import { builtinDrivers } from '../../drivers/index.js';
import { testGraph } from '../helpers/graphs.js';
import { pattern } from '../helpers/mem-driver.js';
import { hasTool } from '../helpers/peers.js';
import { checkOf, CLEAN } from '../helpers/qcow2-verdict.js';
import { run } from '../helpers/run.js';
import { scratchDir } from '../helpers/tmp.js';

const KiB = 1024;
const MiB = 1024 * KiB;
const dir = scratchDir('qbt-reopen-');
let serial = 0;
const withQemuImg = hasTool('qemu-img');

function scratch(name: string): string {
  return path.join(dir, `${++serial}-${name}`);
}

async function qcow2(name: string, options: Array<[string, string]> = []): Promise<string> {
  const filename = scratch(name);
  await createImage(testGraph(), { format: 'qcow2', filename, sizeBytes: 4 * MiB, options, quiet: true });
  return filename;
}

/** A short-lived user of `node` with `perm`, sharing everything. */
function user(node: BlockNode, perm: number = Perm.CONSISTENT_READ): BdrvChild {
  return attachChild(new TransientParent('test user'), 'user', 0, node, perm, Perm.ALL);
}

async function read(edge: BdrvChild, offsetBytes: number, bytes: number): Promise<Uint8Array> {
  const buf = new Uint8Array(bytes);
  await preadv(edge, offsetBytes, buf);
  return buf;
}


/** qemu-img check (-U: the image may still be open here), when installed: exit status 0. */
async function expectQemuImgClean(filename: string): Promise<void> {
  if (!withQemuImg) return;
  const r = await run('qemu-img', ['check', '-U', '-q', '-f', 'qcow2', filename]);
  expect(r.code, r.stdout + r.stderr).toBe(0);
}

/** The bitmaps qemu-img info reports for the file (name → flags), when installed. */
async function bitmapFlags(filename: string): Promise<Record<string, unknown> | null> {
  if (!withQemuImg) return null;
  const r = await run('qemu-img', ['info', '-U', '-f', 'qcow2', '--output=json', filename]);
  const info = JSON.parse(r.stdout) as { 'format-specific': { data: { bitmaps?: Array<{ name: string; flags: string[] }> } } };
  return Object.fromEntries((info['format-specific'].data.bitmaps ?? []).map((b) => [b.name, b.flags]));
}

async function openQcow2(graph: BlockGraph, filename: string, readOnly: boolean): Promise<BlockNode> {
  return graph.openImage(filename, { format: 'qcow2', readOnly });
}

describe('reopenSetReadOnly: file', () => {
  it('makes a read-only file node writable and read-only again, the descriptor with it', async () => {
    const filename = scratch('plain.raw');
    fs.writeFileSync(filename, Buffer.alloc(MiB));
    const graph = testGraph();
    const node = await graph.openNode({ driver: 'file', 'node-name': 'f', filename, 'read-only': true });
    const reader = user(node);
    const data = pattern(64 * KiB, 7);
    await expect(pwritev(reader, 0, data)).rejects.toMatchObject({ code: 'EPERM' });

    await reopenSetReadOnly(node, false);
    expect(node.readOnly).toBe(false);
    expect(graph.nodes.get('f')).toBe(node);
    const writer = user(node, Perm.CONSISTENT_READ | Perm.WRITE);
    await pwritev(writer, 128 * KiB, data);
    expect(fs.readFileSync(filename).subarray(128 * KiB, 192 * KiB).equals(data)).toBe(true);

    // A writer holds it: refused, nothing changes.
    await expect(reopenSetReadOnly(node, true)).rejects.toMatchObject({ code: 'EPERM', message: "Read-only block node 'f' cannot support read-write users" });
    expect(node.readOnly).toBe(false);
    await pwritev(writer, 0, data);

    detachChild(writer);
    await reopenSetReadOnly(node, true);
    expect(node.readOnly).toBe(true);
    await expect(pwritev(reader, 0, data)).rejects.toMatchObject({ code: 'EPERM' });
    expect(() => user(node, Perm.CONSISTENT_READ | Perm.WRITE)).toThrow(/Block node ('f' )?is read-only/);
    const fd = (node.opaque as { fh: fs.promises.FileHandle }).fh.fd;
    expect(() => fs.writeSync(fd, Buffer.alloc(1), 0, 1, 0)).toThrow(/EBADF/);
    expect(Buffer.from(await read(reader, 128 * KiB, 64 * KiB)).equals(data)).toBe(true);
  });

  it('lets the requests in flight finish before the driver swaps the descriptor', async () => {
    const filename = scratch('busy.raw');
    const content = Buffer.from(pattern(MiB, 3));
    fs.writeFileSync(filename, content);
    let finished = 0;
    const atReopen: Array<[inFlight: number, finished: number]> = [];
    // The file driver, its reads held a moment, its reopen noting what is in flight.
    const slowFile: BlockDriver = {
      ...fileDriver,
      coPreadv: async (node, offsetBytes, buf, flags) => {
        await new Promise((resolve) => setTimeout(resolve, 2));
        await fileDriver.coPreadv(node, offsetBytes, buf, flags);
        finished++;
      },
      reopen: async (node, readOnly) => {
        atReopen.push([node.inFlight, finished]);
        await fileDriver.reopen!(node, readOnly);
      },
    };
    const graph = testGraph(builtinDrivers.map((d) => (d.name === 'file' ? slowFile : d)));
    const node = await graph.openNode({ driver: 'file', filename });
    const reader = user(node);
    const chunkBytes = 32 * KiB;
    const reads = Array.from({ length: MiB / chunkBytes }, (_, i) => read(reader, i * chunkBytes, chunkBytes));
    await reopenSetReadOnly(node, true);
    expect(atReopen).toEqual([[0, MiB / chunkBytes]]);
    expect(Buffer.concat(await Promise.all(reads)).equals(content)).toBe(true);
  });
});

describe('reopenSetReadOnly: qcow2', () => {
  it('keeps the state and caches, writes while writable, is clean on disk once read-only again', async () => {
    const filename = await qcow2('lazy.qcow2', [['lazy_refcounts', 'on']]);
    const graph = testGraph();
    const node = await openQcow2(graph, filename, true);
    const s = stateOf(node);
    const keep = user(node);
    await reopenSetReadOnly(node, false);
    expect(node.readOnly).toBe(false);
    expect(node.file!.node.readOnly).toBe(false);
    expect(stateOf(node)).toBe(s);

    const data = pattern(128 * KiB, 11);
    const blk = new BlockBackend(graph, node, { writable: true });
    await blk.pwrite(64 * KiB, data);
    expect(s.image.header.incompatibleFeatures & Incompat.DIRTY).toBe(Incompat.DIRTY);
    const l2Cache = s.l2Cache;
    const cachedTables = l2Cache.size;
    expect(cachedTables).toBeGreaterThan(0);
    await blk.close();

    await reopenSetReadOnly(node, true);
    expect(node.readOnly).toBe(true);
    expect(node.file!.node.readOnly).toBe(true);
    expect(stateOf(node)).toBe(s);
    expect(s.l2Cache).toBe(l2Cache);
    expect(l2Cache.size).toBe(cachedTables);
    expect(s.image.header.incompatibleFeatures & Incompat.DIRTY).toBe(0n);
    // On disk while still open: clean, dirty bit cleared.
    await expectQemuImgClean(filename);
    expect(fs.readFileSync(filename).readBigUInt64BE(72) & Incompat.DIRTY).toBe(0n);

    expect(() => new BlockBackend(graph, node, { writable: true })).toThrow(/read-only/);
    await expect(pwritev(keep, 0, data)).rejects.toMatchObject({ code: 'EPERM' });
    expect(Buffer.from(await read(keep, 64 * KiB, 128 * KiB)).equals(data)).toBe(true);

    // And writable once more, over the same caches.
    await reopenSetReadOnly(node, false);
    const blk2 = new BlockBackend(graph, node, { writable: true });
    await blk2.pwrite(2 * MiB, data);
    await blk2.close();
    await graph.closeAll();
    expect(await checkOf(filename)).toEqual(CLEAN);
    await expectQemuImgClean(filename);
  });

  it('stores its bitmaps going read-only (keeping them, read-only) and marks them in use going read-write', async () => {
    const filename = await qcow2('bitmaps.qcow2');
    const setup = testGraph();
    await bitmapAdd(await openQcow2(setup, filename, false), { name: 'b', persistent: true });
    await setup.closeAll();

    const graph = testGraph();
    const node = await openQcow2(graph, filename, true);
    user(node);
    const bm = findDirtyBitmap(node, 'b')!;
    expect(bm.readOnly).toBe(true);
    await reopenSetReadOnly(node, false);
    expect(findDirtyBitmap(node, 'b')).toBe(bm);
    expect(bm.readOnly).toBe(false);
    if (withQemuImg) expect(await bitmapFlags(filename)).toEqual({ b: ['in-use', 'auto'] });
    const blk = new BlockBackend(graph, node, { writable: true });
    await blk.pwrite(MiB, pattern(64 * KiB, 5));
    await blk.close();
    expect(bm.dirtyBytes).toBe(64 * KiB);

    await reopenSetReadOnly(node, true);
    expect(findDirtyBitmap(node, 'b')).toBe(bm);
    expect(bm.readOnly).toBe(true);
    if (withQemuImg) expect(await bitmapFlags(filename)).toEqual({ b: ['auto'] });
    await expectQemuImgClean(filename);
    // What was stored: another open reads the same bits.
    const other = testGraph();
    const copy = await openQcow2(other, filename, true);
    expect(findDirtyBitmap(copy, 'b')!.dirtyBytes).toBe(64 * KiB);
    await other.closeAll();

    await reopenSetReadOnly(node, false);
    if (withQemuImg) expect(await bitmapFlags(filename)).toEqual({ b: ['in-use', 'auto'] });
    await graph.closeAll();
    expect(await checkOf(filename)).toEqual(CLEAN);
    await expectQemuImgClean(filename);
    if (withQemuImg) expect(await bitmapFlags(filename)).toEqual({ b: ['auto'] });
  });

  it('reopens the file a probed image opened under it', async () => {
    const filename = await qcow2('probed.qcow2');
    const graph = testGraph();
    const node = await graph.openImage(filename, { readOnly: true });
    expect(node.driver.name).toBe('qcow2');
    await reopenSetReadOnly(node, false);
    expect(node.file!.node.readOnly).toBe(false);
    expect(node.file!.perm & Perm.WRITE).toBe(Perm.WRITE);
  });
});

describe('reopenSetReadOnly: refusals leave the node as it was', () => {
  it("refuses read-write over someone else's read-only file node, and a force-share node", async () => {
    const filename = await qcow2('refuse.qcow2');
    const graph = testGraph();
    const file = await graph.openNode({ driver: 'file', 'node-name': 'f', filename, 'read-only': true });
    file.userOwned = true;
    const q = await graph.openNode({ driver: 'qcow2', 'node-name': 'q', file: 'f', 'read-only': true });
    await expect(reopenSetReadOnly(q, false)).rejects.toMatchObject({ code: 'EPERM', message: 'Block node is read-only' });
    expect(q.readOnly).toBe(true);
    expect(stateOf(q).writable).toBe(false);
    expect(q.file!.perm & Perm.WRITE).toBe(0);

    const shared = await graph.openImage(filename, { format: 'qcow2', readOnly: true, forceShare: true });
    await expect(reopenSetReadOnly(shared, false)).rejects.toMatchObject({ code: 'EINVAL', message: 'force-share=on can only be used with read-only images' });
    expect(shared.readOnly).toBe(true);
  });

  it('refuses to make a corrupt image writable and switches its file back', async () => {
    const filename = await qcow2('corrupt.qcow2');
    const header = fs.openSync(filename, 'r+');
    const bits = Buffer.alloc(8);
    bits.writeBigUInt64BE(Incompat.CORRUPT);
    fs.writeSync(header, bits, 0, 8, 72);
    fs.closeSync(header);
    const graph = testGraph();
    const node = await openQcow2(graph, filename, true);
    await expect(reopenSetReadOnly(node, false)).rejects.toMatchObject({ code: 'EACCES', message: 'qcow2: Image is corrupt; cannot be opened read/write' });
    expect(node.readOnly).toBe(true);
    expect(node.file!.node.readOnly).toBe(true);
    expect(node.file!.perm & Perm.WRITE).toBe(0);
    const fd = (node.file!.node.opaque as { fh: fs.promises.FileHandle }).fh.fd;
    expect(() => fs.writeSync(fd, Buffer.alloc(1), 0, 1, 0)).toThrow(/EBADF/);
  });
});
