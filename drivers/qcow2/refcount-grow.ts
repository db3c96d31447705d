/*
 * Growing the refcount structures (QEMU's alloc_refcount_block, allocating
 * half, and qcow2_refcount_area): new refcount blocks and a new, larger
 * refcount table. See refcount.ts for how allocation gets here and why the
 * write order keeps the image consistent after a crash at any point.
 *
 * The layout decisions are QEMU's, so images grow the way qemu-img's do:
 * a new block goes to the first free cluster; a new table (with 50 % spare
 * entries unless asked for an exact size) and the blocks covering it go to
 * the first cluster past everything the current blocks could cover, blocks
 * first, table after them.
 */
import { BlockError } from '../../block/errors.js';
import { Limits, REFTABLE_ENTRY_BYTES } from './format.js';
import { pwriteSync, signalCorruption, writeReftableLocation } from './header-io.js';
import { OverlapCheck, overlapCheck } from './overlap.js';
import { codecOf, freeClusters, scanFree, updateRefcount } from './refcount.js';
import { DiscardType, type Qcow2State } from './state.js';
import type { CacheEntry } from './cache.js';

/** QEMU's QCOW_MAX_REFTABLE_SIZE in entries. */
const MAX_REFTABLE_ENTRIES = Limits.MAX_REFTABLE_BYTES / REFTABLE_ENTRY_BYTES;

/**
 * Creates the refcount block covering cluster `index`. Refcounts of other
 * clusters are not touched, so the caller simply searches again.
 */
export async function createRefblock(s: Qcow2State, index: number): Promise<void> {
  const e = s.geometry.refcountBlockEntries;
  const t = Math.floor(index / e);
  await s.l2Cache.flush();
  const newBlock = await scanFree(s, 1);
  if (newBlock === 0) throw await signalCorruption(s, true, 'Preventing invalid allocation of refcount block at offset 0');
  const newOffset = newBlock * s.clusterBytes;
  let entry: CacheEntry;
  if (Math.floor(newBlock / e) === t) {
    entry = await s.refcountCache.getEmpty(newOffset);
    codecOf(s).set(entry.view, newBlock % e, 1);
  } else {
    // Counted by another block; that one may be missing too (then retry).
    if (!(await updateRefcount(s, newBlock, 1, 1, false, DiscardType.NEVER))) return;
    await s.refcountCache.flush();
    entry = await s.refcountCache.getEmpty(newOffset);
  }
  s.refblocks.add(newOffset);
  s.refcountCache.markDirty(entry);
  s.refcountCache.release(entry);
  await s.refcountCache.flush();
  if (t < s.reftable.length) {
    await hookRefblock(s, t, newOffset);
    return;
  }
  const blocksUsed = Math.ceil(Math.max(index + 1, newBlock + 1) / e);
  await refcountArea(s, blocksUsed * e * s.clusterBytes, 0, false, t, newOffset);
}

/** Writes refcount table entry `t` (synced), then records it in memory. */
async function hookRefblock(s: Qcow2State, t: number, offset: number): Promise<void> {
  const buf = new Uint8Array(REFTABLE_ENTRY_BYTES);
  new DataView(buf.buffer).setBigUint64(0, BigInt(offset));
  const at = s.image.header.refcountTableOffset + t * REFTABLE_ENTRY_BYTES;
  await overlapCheck(s, OverlapCheck.REFCOUNT_TABLE, at, REFTABLE_ENTRY_BYTES);
  await pwriteSync(s, at, buf);
  s.reftable[t] = offset;
  s.maxReftableIndex = Math.max(s.maxReftableIndex, t);
}

/**
 * Bytes of refcount blocks and table needed to count `clusters` clusters
 * and themselves (qcow2_refcount_metadata_size: the fixed point); with
 * `generous`, room for a table 1.5 times as large.
 */
export function refcountMetadataSize(clusters: number, clusterBytes: number, order: number, generous: boolean): { bytes: number; blocks: number } {
  const blocksPerTableCluster = clusterBytes / REFTABLE_ENTRY_BYTES;
  const refcountsPerBlock = (clusterBytes * 8) / 2 ** order;
  let table = 0;
  let blocks = 0;
  let n = 0;
  let last: number;
  do {
    last = n;
    blocks = Math.ceil((clusters + table + blocks) / refcountsPerBlock);
    table = Math.ceil(blocks / blocksPerTableCluster);
    n = clusters + blocks + table;
    if (n === last && generous) {
      clusters += Math.ceil(table / 2);
      n = 0;
      generous = false;
    }
  } while (n !== last);
  return { bytes: (blocks + table) * clusterBytes, blocks };
}

/** The table qcow2_refcount_area builds: its size, and the entries copied from the current one. */
function newReftable(s: Qcow2State, totalBlocks: number, exactSize: boolean): Float64Array {
  const perCluster = s.clusterBytes / REFTABLE_ENTRY_BYTES;
  const wanted = exactSize ? totalBlocks : totalBlocks + Math.ceil(totalBlocks / 2);
  const size = Math.ceil(wanted / perCluster) * perCluster;
  if (size > MAX_REFTABLE_ENTRIES) throw new BlockError('EFBIG', 'qcow2: refcount table too large');
  const table = new Float64Array(size);
  const keep = size > s.maxReftableIndex ? s.maxReftableIndex + 1 : size;
  table.set(s.reftable.subarray(0, Math.min(keep, s.reftable.length)));
  return table;
}

/**
 * Creates, from `startOffset` (the end of all used space) on, a new refcount
 * table and the blocks needed so that they count themselves and
 * `additionalClusters` clusters after them, then switches to the new table
 * (qcow2_refcount_area). `newRefblockOffset`, when not 0, is entered at
 * `newRefblockIndex`. Returns the offset after the new structures.
 */
export async function refcountArea(
  s: Qcow2State,
  startOffset: number,
  additionalClusters: number,
  exactSize: boolean,
  newRefblockIndex: number,
  newRefblockOffset: number,
): Promise<number> {
  const c = s.clusterBytes;
  const e = s.geometry.refcountBlockEntries;
  const { blocks: totalBlocks } = refcountMetadataSize(startOffset / c + additionalClusters, c, s.geometry.refcountOrder, !exactSize);
  if (totalBlocks > MAX_REFTABLE_ENTRIES) throw new BlockError('EFBIG', 'qcow2: refcount table too large');
  const table = newReftable(s, totalBlocks, exactSize);
  if (newRefblockOffset) table[newRefblockIndex] = newRefblockOffset;
  const areaIndex = Math.floor(startOffset / c / e);
  let missing = 0;
  for (let i = areaIndex; i < totalBlocks; i++) if (!table[i]) missing++;
  const tableOffset = startOffset + missing * c;
  const tableClusters = (table.length * REFTABLE_ENTRY_BYTES) / c;
  const endOffset = tableOffset + tableClusters * c;
  await fillAreaBlocks(s, table, areaIndex, totalBlocks, startOffset, endOffset);
  await s.refcountCache.flush();
  await pwriteSync(s, tableOffset, encodeReftable(table));
  const oldOffset = s.image.header.refcountTableOffset;
  const oldBytes = s.reftable.length * REFTABLE_ENTRY_BYTES;
  await writeReftableLocation(s, tableOffset, tableClusters);
  s.reftable = table;
  s.maxReftableIndex = lastUsedIndex(table);
  for (let i = 0; i < table.length; i++) if (table[i]) s.refblocks.add(table[i]!);
  if (oldOffset) await freeClusters(s, oldOffset, oldBytes, DiscardType.OTHER);
  return endOffset;
}

/** Creates or loads blocks areaIndex..totalBlocks-1 and gives the area [start, end) refcount 1. */
async function fillAreaBlocks(s: Qcow2State, table: Float64Array, areaIndex: number, totalBlocks: number, start: number, end: number) {
  const c = s.clusterBytes;
  const e = s.geometry.refcountBlockEntries;
  const codec = codecOf(s);
  let blockOffset = start;
  for (let i = areaIndex; i < totalBlocks; i++) {
    let entry: CacheEntry;
    if (table[i]) {
      entry = await s.refcountCache.get(table[i]!);
    } else {
      entry = await s.refcountCache.getEmpty(blockOffset);
      s.refcountCache.markDirty(entry);
      table[i] = blockOffset;
      blockOffset += c;
    }
    const firstCovered = i * e * c;
    if (firstCovered < end) {
      const from = firstCovered < start ? (start - firstCovered) / c : 0;
      const to = Math.min((end - firstCovered) / c, e);
      for (let j = from; j < to; j++) codec.set(entry.view, j, 1);
      s.refcountCache.markDirty(entry);
    }
    s.refcountCache.release(entry);
  }
}

export function encodeReftable(table: Float64Array): Uint8Array {
  const out = new Uint8Array(table.length * REFTABLE_ENTRY_BYTES);
  const view = new DataView(out.buffer);
  for (let i = 0; i < table.length; i++) {
    const v = table[i]!;
    if (v === 0) continue;
    view.setUint32(i * 8, Math.floor(v / 2 ** 32));
    view.setUint32(i * 8 + 4, v % 2 ** 32);
  }
  return out;
}

export function lastUsedIndex(table: Float64Array): number {
  for (let i = table.length - 1; i >= 0; i--) if (table[i]) return i;
  return -1;
}
