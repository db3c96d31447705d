/*
 * The bitmap operations (add, remove, clear, enable, disable, merge, copy)
 * with QEMU's checks and messages, and qcow2 persistence in process:
 * loading, in-use flags while open for writing, an unclean close leaving
 * the bitmaps inconsistent, read-only opens, v2 images, and what
 * `qemu-img info` lists.
 */
import fs from 'node:fs';
import path from 'node:path';
import { describe, expect, it } from 'vitest';
import { BlockBackend } from '../../block/backend.js';
import { createImage } from '../../block/create.js';
import { createDirtyBitmap, defaultBitmapGranularity, findDirtyBitmap } from '../../block/dirty-bitmap.js';
import {
  bitmapAdd,
  bitmapClear,
  bitmapMerge,
  bitmapRemove,
  bitmapSetEnabled,
  bitmapsCopyRefusal,
  copyPersistentBitmaps,
} from '../../block/dirty-bitmap-ops.js';
import type { BlockGraph } from '../../block/graph.js';
import type { BlockNode } from '../../block/node.js';
import { testGraph } from '../helpers/graphs.js';
import { scratchDir } from '../helpers/tmp.js';

const KiB = 1024;
const MiB = 1024 * KiB;
const dir = scratchDir('qbt-bitmap-ops-');
let count = 0;

async function newQcow2(graph: BlockGraph, options: Array<[string, string]> = [], sizeBytes = 4 * MiB): Promise<string> {
  const filename = path.join(dir, `img-${count++}.qcow2`);
  await createImage(graph, { format: 'qcow2', filename, sizeBytes, options });
  return filename;
}

async function open(graph: BlockGraph, filename: string, readOnly = false): Promise<BlockNode> {
  return graph.openImage(filename, { format: 'qcow2', readOnly, options: { discard: 'unmap' } });
}

const extents = (node: BlockNode, name: string) => [...findDirtyBitmap(node, name)!.dirtyExtents()].map((e) => `${e.offset}+${e.bytes}`);
const message = async (p: Promise<unknown> | (() => unknown)) => {
  try {
    await (typeof p === 'function' ? p() : p);
  } catch (e) {
    return (e as Error).message;
  }
  return 'no error';
};

describe('bitmap operations', () => {
  it('add: name, granularity and storability are checked in QEMU\'s order', async () => {
    const graph = testGraph();
    const node = await open(graph, await newQcow2(graph));
    expect(await message(bitmapAdd(node, { name: '' }))).toBe('Bitmap name cannot be empty');
    expect(await message(bitmapAdd(node, { name: 'b', granularityBytes: 1000 }))).toBe('Granularity must be power of 2 and at least 512');
    expect(await message(bitmapAdd(node, { name: 'b', granularityBytes: 256 }))).toBe('Granularity must be power of 2 and at least 512');
    const bm = await bitmapAdd(node, { name: 'b', persistent: true });
    expect(bm.granularityBytes).toBe(64 * KiB);
    expect(await message(bitmapAdd(node, { name: 'b', persistent: true }))).toBe('Bitmap already exists: b');
    expect(await message(bitmapAdd(node, { name: 'b' }))).toBe('Bitmap already exists: b');
    expect(await message(bitmapAdd(node, { name: 'x'.repeat(1024), persistent: true }))).toBe(
      `Can't make bitmap '${'x'.repeat(1024)}' persistent in '${node.nodeName}': Name length exceeds maximum (1023 characters)`,
    );
    const huge = await open(graph, await newQcow2(graph, [], 2 ** 50));
    expect(await message(bitmapAdd(huge, { name: 'h', granularityBytes: 512, persistent: true }))).toMatch(/Too much space will be occupied by the bitmap/);
  });

  it('add: formats without persistent bitmaps, v2 images', async () => {
    const graph = testGraph();
    const raw = path.join(dir, `raw-${count++}.img`);
    await createImage(graph, { format: 'raw', filename: raw, sizeBytes: 1 * MiB, options: [] });
    const rawNode = await graph.openImage(raw, { format: 'raw' });
    expect(await message(bitmapAdd(rawNode, { name: 'b', persistent: true }))).toBe(
      `Can't store persistent bitmaps to ${rawNode.nodeName}: Operation not supported`,
    );
    expect((await bitmapAdd(rawNode, { name: 'b' })).granularityBytes).toBe(64 * KiB);
    const v2 = await open(graph, await newQcow2(graph, [['compat', '0.10']]));
    expect(await message(bitmapAdd(v2, { name: 'b', persistent: true }))).toBe(
      `Can't make bitmap 'b' persistent in '${v2.nodeName}': Cannot store dirty bitmaps in qcow2 v2 files`,
    );
  });

  it('default granularity: the cluster size clamped to [4 KiB, 64 KiB]', async () => {
    const graph = testGraph();
    for (const [cluster, want] of [[512, 4096], [16384, 16384], [2 * MiB, 65536]] as const) {
      const node = await open(graph, await newQcow2(graph, [['cluster_size', String(cluster)]]));
      expect(defaultBitmapGranularity(node)).toBe(want);
    }
  });

  it('remove, clear, enable, disable refuse busy, read-only and inconsistent bitmaps as QEMU does', async () => {
    const graph = testGraph();
    const node = await open(graph, await newQcow2(graph));
    expect(await message(bitmapRemove(node, 'nope'))).toBe("Dirty bitmap 'nope' not found");
    const bm = createDirtyBitmap(node, 4096, 'b');
    bm.setDirty(0, 1);
    bm.busy = true;
    expect(await message(bitmapRemove(node, 'b'))).toBe("Bitmap 'b' is currently in use by another operation and cannot be used");
    expect(await message(() => bitmapClear(node, 'b'))).toMatch(/currently in use/);
    expect(await message(() => bitmapSetEnabled(node, 'b', false))).toMatch(/currently in use/);
    bm.busy = false;
    bm.readOnly = true;
    expect(await message(() => bitmapClear(node, 'b'))).toBe("Bitmap 'b' is readonly and cannot be modified");
    bitmapSetEnabled(node, 'b', false);
    expect(bm.disabled).toBe(true);
    bm.readOnly = false;
    bm.inconsistent = true;
    expect(await message(() => bitmapSetEnabled(node, 'b', true))).toMatch(/^Bitmap 'b' is inconsistent and cannot be used\nTry block-dirty-bitmap-remove/);
    await bitmapRemove(node, 'b');
    expect(findDirtyBitmap(node, 'b')).toBeNull();
  });

  it('merge: ORs sources of any granularity; the target is unchanged when anything fails', async () => {
    const graph = testGraph();
    const node = await open(graph, await newQcow2(graph));
    const other = await open(graph, await newQcow2(graph, [], 8 * MiB));
    createDirtyBitmap(node, 64 * KiB, 't').setDirty(0, 1);
    createDirtyBitmap(node, 512, 'fine').setDirty(1 * MiB + 512, 512);
    createDirtyBitmap(node, 2 * MiB, 'coarse').setDirty(3 * MiB, 1);
    const broken = createDirtyBitmap(node, 4096, 'broken');
    broken.inconsistent = true;
    createDirtyBitmap(other, 64 * KiB, 'big');
    const before = extents(node, 't');
    expect(await message(() => bitmapMerge(node, 't', [{ node, name: 'fine' }, { node, name: 'broken' }]))).toMatch(/'broken' is inconsistent/);
    expect(await message(() => bitmapMerge(node, 't', [{ node, name: 'fine' }, { node: other, name: 'big' }]))).toBe(
      "Bitmaps are of different sizes (destination size is 4194304, source size is 8388608) and can't be merged",
    );
    expect(await message(() => bitmapMerge(node, 't', [{ node, name: 'nope' }]))).toBe("Dirty bitmap 'nope' not found");
    expect(extents(node, 't')).toEqual(before);
    bitmapMerge(node, 't', [{ node, name: 'fine' }, { node, name: 'coarse' }]);
    expect(extents(node, 't')).toEqual(['0+65536', '1048576+65536', '2097152+2097152']);
    findDirtyBitmap(node, 't')!.readOnly = true;
    expect(await message(() => bitmapMerge(node, 't', [{ node, name: 'fine' }]))).toBe("Bitmap 't' is readonly and cannot be modified");
  });

  it('copyPersistentBitmaps copies names, granularities, recording state and bits (convert --bitmaps)', async () => {
    const graph = testGraph();
    const src = await open(graph, await newQcow2(graph));
    const dstFile = await newQcow2(graph);
    const dst = await open(graph, dstFile);
    (await bitmapAdd(src, { name: 'a', persistent: true })).setDirty(1 * MiB, 1);
    (await bitmapAdd(src, { name: 'b', persistent: true, granularityBytes: 512, disabled: true })).setDirty(0, 4096);
    await bitmapAdd(src, { name: 'temp' });
    const broken = await bitmapAdd(src, { name: 'c', persistent: true });
    broken.inconsistent = true;
    expect(bitmapsCopyRefusal(src, false)).toBe("Cannot copy inconsistent bitmap 'c'\nTry --skip-broken-bitmaps, or use 'qemu-img bitmap --remove' to delete it");
    expect(bitmapsCopyRefusal(src, true)).toBeNull();
    const warnings: string[] = [];
    await copyPersistentBitmaps(src, dst, { skipBroken: true, warn: (m) => warnings.push(m) });
    expect(warnings).toEqual(["Skipping inconsistent bitmap 'c'"]);
    expect(dst.dirtyBitmaps.map((bm) => [bm.name, bm.granularityBytes, bm.disabled, bm.persistent])).toEqual([
      ['a', 65536, false, true],
      ['b', 512, true, true],
    ]);
    expect(extents(dst, 'b')).toEqual(['0+4096']);
    await graph.unref(dst);
    const again = await open(graph, dstFile, true);
    expect(extents(again, 'a')).toEqual(['1048576+65536']);
    expect(findDirtyBitmap(again, 'b')!.disabled).toBe(true);
    const other = await open(graph, await newQcow2(graph));
    expect(await message(copyPersistentBitmaps(src, other))).toMatch(/^Failed to populate bitmap c: Bitmap 'c' is inconsistent/);
    expect(findDirtyBitmap(other, 'c')).toBeNull();
    const small = await open(graph, await newQcow2(graph, [], 1 * MiB));
    expect(await message(copyPersistentBitmaps(src, small, { skipBroken: true }))).toMatch(/^Failed to populate bitmap b: Bitmaps are of different sizes/);
  });
});

describe('qcow2 persistence in process', () => {
  it('bitmaps load with their bits, are in use on disk while open for writing, and are stored on close', async () => {
    const graph = testGraph();
    const file = await newQcow2(graph);
    let node = await open(graph, file);
    await bitmapAdd(node, { name: 'on', persistent: true });
    await bitmapAdd(node, { name: 'off', persistent: true, disabled: true });
    await graph.unref(node);
    node = await open(graph, file);
    const blk = new BlockBackend(graph, node, { writable: true });
    // New bitmaps are stored newest first, as QEMU walks its list.
    expect(node.driver.getSpecificInfo(node)!.data.bitmaps).toEqual([
      { name: 'off', granularity: 65536, flags: ['in-use'] },
      { name: 'on', granularity: 65536, flags: ['in-use', 'auto'] },
    ]);
    await blk.pwrite(100 * KiB, new Uint8Array(10).fill(1));
    await blk.pwriteZeroes(2 * MiB, 128 * KiB);
    await blk.pdiscard(3 * MiB, 64 * KiB);
    // A copy of the file now is what a crash would leave: bitmaps in use on disk.
    const crashed = path.join(dir, `crashed-${count++}.qcow2`);
    fs.copyFileSync(file, crashed);
    await blk.close();
    await graph.unref(node);
    node = await open(graph, file, true);
    expect(extents(node, 'on')).toEqual(['65536+65536', '2097152+131072', '3145728+65536']);
    expect(extents(node, 'off')).toEqual([]);
    expect(findDirtyBitmap(node, 'on')!.readOnly).toBe(true);
    expect(node.driver.getSpecificInfo(node)!.data.bitmaps).toEqual([
      { name: 'off', granularity: 65536, flags: [] },
      { name: 'on', granularity: 65536, flags: ['auto'] },
    ]);
    const after = await open(graph, crashed);
    const bm = findDirtyBitmap(after, 'on')!;
    expect([bm.inconsistent, bm.disabled, bm.dirtyBytes]).toEqual([true, true, 0]);
    expect(await message(() => bitmapClear(after, 'on'))).toMatch(/inconsistent/);
    await bitmapRemove(after, 'on');
    await bitmapRemove(after, 'off');
    expect(after.driver.getSpecificInfo(after)!.data.bitmaps).toBeUndefined();
  });

  it('a resize keeps the bitmaps (grown area clean); an inconsistent bitmap refuses it', async () => {
    const graph = testGraph();
    const file = await newQcow2(graph);
    let node = await open(graph, file);
    let blk = new BlockBackend(graph, node, { writable: true, resizable: true });
    (await bitmapAdd(node, { name: 'b', persistent: true })).setDirty(4 * MiB - 1, 1);
    await blk.truncate(8 * MiB);
    await blk.pwrite(7 * MiB, new Uint8Array(1));
    await blk.close();
    await graph.unref(node);
    node = await open(graph, file);
    expect(extents(node, 'b')).toEqual(['4128768+65536', '7340032+65536']);
    findDirtyBitmap(node, 'b')!.inconsistent = true;
    blk = new BlockBackend(graph, node, { writable: true, resizable: true });
    expect(await message(blk.truncate(1 * MiB))).toBe(
      "Bitmap 'b' is inconsistent and cannot be used\nTry block-dirty-bitmap-remove to delete this bitmap from disk",
    );
    findDirtyBitmap(node, 'b')!.inconsistent = false;
    await blk.close();
  });
});
