/*
 * Walking an L1 table to change the references it holds (QEMU 7.2's
 * qcow2_update_snapshot_refcount): the one primitive behind snapshot
 * create, apply and delete.
 *
 * For every L2 table the L1 table reaches, and every cluster those tables
 * map, the refcount goes up by one (addend 1, a new L1 table now reaches
 * them too), down by one (-1, an L1 table stops reaching them), or stays
 * (0); then the COPIED flag of each L2 entry and L1 entry is rebuilt from
 * the refcount: set exactly when it is 1. Compressed clusters count every
 * host cluster their bytes touch and never get COPIED. Refcounts are
 * counted per L1 table: a data cluster behind an L2 table that two L1
 * tables share counts two references, as `qemu-img check` counts them.
 *
 * Order and crash safety, as QEMU: L2 entries change in the L2 cache; when
 * refcounts rose, the L2 cache first depends on the refcount cache (a
 * cleared COPIED never reaches the disk before the raised refcount); when
 * they fell, refcount.ts orders the refcount cache after the L2 cache. The
 * walk ends with a flush of both caches and the file (bdrv_flush). The L1
 * table itself is written only when the walk succeeded, its flags changed
 * and its references were not being dropped (addend -1: the table is about
 * to be freed or replaced), in one synced write. The active L1 table is
 * changed in place in memory (`s.l1`); any other is read from the file.
 * Freed clusters are discarded once, at the end (cacheDiscards).
 *
 * An entry QEMU calls corrupt (an unaligned L2 table or cluster offset)
 * marks the image corrupt; offsets beyond 2^53 fail with EFBIG.
 */
import { BlockError } from '../../block/errors.js';
import { preadv } from '../../block/io.js';
import { hex } from './cursor.js';
import { L1_ENTRY_BYTES } from './format.js';
import { flushFile, needAccurateRefcounts, pwriteSync, signalCorruption } from './header-io.js';
import { ClusterType, Entry, clusterType, entryOffset } from './l2.js';
import { OverlapCheck, overlapCheck } from './overlap.js';
import { getRefcount, processDiscards, updateRefcount } from './refcount.js';
import { DiscardType, type Qcow2State } from './state.js';
import type { CacheEntry } from './cache.js';

/** +1: add the table's references; -1: drop them; 0: only rebuild COPIED. */
export type Addend = -1 | 0 | 1;

/** An L1 table on disk: the active one or a snapshot's. */
export interface L1Location {
  offset: number;
  entries: number;
}

/** The active L1 table's location. */
export function activeL1(s: Qcow2State): L1Location {
  return { offset: s.image.header.l1TableOffset, entries: s.image.header.l1Entries };
}

/** bdrv_flush of the node with the lock held: both caches written, then the file flushed. */
export async function flushLocked(s: Qcow2State): Promise<void> {
  await s.l2Cache.writeDirty();
  if (needAccurateRefcounts(s)) await s.refcountCache.writeDirty();
  await flushFile(s);
}

/** Adds `addend` to the refcounts of host clusters [first, first + count). */
async function addRefcount(s: Qcow2State, first: number, count: number, addend: Addend): Promise<void> {
  if (addend === 0) return;
  while (!(await updateRefcount(s, first, count, 1, addend < 0, DiscardType.SNAPSHOT))) {
    // A refcount block was created first (only on a corrupt image); try again.
  }
}

/** The refcount an L2 entry's cluster has after the update; 2 for compressed (never COPIED), 0 for none. */
async function updateEntry(s: Qcow2State, table: CacheEntry, index: number, addend: Addend): Promise<number> {
  const hi = table.view.getUint32(index * 8);
  const lo = table.view.getUint32(index * 8 + 4);
  switch (clusterType(hi, lo)) {
    case ClusterType.COMPRESSED: {
      const extent = s.geometry.compressedExtent((BigInt(hi & 0x3fffffff) << 32n) | BigInt(lo >>> 0));
      if (!Number.isSafeInteger(extent.hostOffset)) throw new BlockError('EFBIG', `Compressed cluster offset beyond the 2^53 bytes supported (L2 offset: ${hex(table.offset)}, L2 index: ${hex(index)})`);
      const first = Math.floor(extent.hostOffset / s.clusterBytes);
      const end = Math.ceil((extent.hostOffset + extent.compressedBytes) / s.clusterBytes);
      await addRefcount(s, first, end - first, addend);
      return 2;
    }
    case ClusterType.NORMAL:
    case ClusterType.ZERO_ALLOC: {
      const offset = entryOffset(hi, lo);
      const where = `L2 offset: ${hex(table.offset)}, L2 index: ${hex(index)}`;
      if (offset % s.clusterBytes !== 0) throw await signalCorruption(s, true, `Cluster allocation offset ${hex(offset)} unaligned (${where})`);
      if (hi & Entry.HI_PAST_53) throw new BlockError('EFBIG', `Cluster allocation offset beyond the 2^53 bytes supported (${where})`);
      await addRefcount(s, offset / s.clusterBytes, 1, addend);
      return getRefcount(s, offset / s.clusterBytes);
    }
    default:
      return 0;
  }
}

/** Updates every entry of the L2 table at `l2Offset` and rebuilds their COPIED flags. */
async function updateL2Table(s: Qcow2State, l2Offset: number, addend: Addend): Promise<void> {
  const table = await s.l2Cache.get(l2Offset);
  try {
    for (let i = 0; i < s.geometry.l2Entries; i++) {
      const type = clusterType(table.view.getUint32(i * 8), table.view.getUint32(i * 8 + 4));
      const unused = type === ClusterType.UNALLOCATED || type === ClusterType.ZERO_PLAIN;
      const refcount = unused ? 0 : await updateEntry(s, table, i, addend);
      const hi = table.view.getUint32(i * 8);
      const next = refcount === 1 ? (hi | Entry.COPIED) >>> 0 : (hi & ~Entry.COPIED) >>> 0;
      if (next === hi) continue;
      if (addend > 0) await s.l2Cache.setDependency(s.refcountCache);
      table.view.setUint32(i * 8, next);
      s.l2Cache.markDirty(table);
    }
  } finally {
    s.l2Cache.release(table);
  }
}

/** The L1 table's entries: the active table itself (changed in place), or a copy read from the file. */
async function loadL1(s: Qcow2State, l1: L1Location): Promise<{ table: Uint8Array; active: boolean }> {
  if (l1.offset === s.image.header.l1TableOffset) return { table: s.l1, active: true };
  const table = new Uint8Array(l1.entries * L1_ENTRY_BYTES);
  await preadv(s.file, l1.offset, table);
  return { table, active: false };
}

/** Updates what L1 entry `i` reaches; returns whether the entry changed. */
async function updateL1Entry(s: Qcow2State, view: DataView, i: number, addend: Addend): Promise<boolean> {
  const hi = view.getUint32(i * 8);
  const lo = view.getUint32(i * 8 + 4);
  const l2Offset = entryOffset(hi, lo);
  if (l2Offset === 0) return false;
  if (l2Offset % s.clusterBytes !== 0) throw await signalCorruption(s, true, `L2 table offset ${hex(l2Offset)} unaligned (L1 index: ${hex(i)})`);
  if (hi & Entry.HI_PAST_53) throw new BlockError('EFBIG', `L2 table offset beyond the 2^53 bytes supported (L1 index: ${hex(i)})`);
  await updateL2Table(s, l2Offset, addend);
  await addRefcount(s, l2Offset / s.clusterBytes, 1, addend);
  const copied = (await getRefcount(s, l2Offset / s.clusterBytes)) === 1;
  const nextHi = ((hi & Entry.HI_OFFSET) | (copied ? Entry.COPIED : 0)) >>> 0;
  const nextLo = (lo & Entry.LO_OFFSET) >>> 0;
  if (nextHi === hi && nextLo === lo) return false;
  view.setUint32(i * 8, nextHi);
  view.setUint32(i * 8 + 4, nextLo);
  return true;
}

/** qcow2_update_snapshot_refcount (see the note at the top). Lock held. */
export async function updateSnapshotRefcount(s: Qcow2State, l1: L1Location, addend: Addend): Promise<void> {
  const { table, active } = await loadL1(s, l1);
  const view = new DataView(table.buffer, table.byteOffset, table.byteLength);
  let modified = false;
  s.cacheDiscards = true;
  try {
    for (let i = 0; i < l1.entries; i++) modified = (await updateL1Entry(s, view, i, addend)) || modified;
    await flushLocked(s);
  } finally {
    s.cacheDiscards = false;
    await processDiscards(s);
  }
  if (addend < 0 || !modified) return;
  const bytes = table.subarray(0, l1.entries * L1_ENTRY_BYTES);
  await overlapCheck(s, active ? OverlapCheck.ACTIVE_L1 : OverlapCheck.INACTIVE_L1, l1.offset, bytes.length);
  await pwriteSync(s, l1.offset, bytes);
}
