/*
 * The two-level cluster map: the active L1 table (in memory, raw bytes) and
 * L2 tables (through the L2 cache). Entries are decoded with two 32-bit
 * loads; a valid standard offset is (hi & 0xffffff) * 2^32 + (lo & ~0x1ff).
 * Anything unusual (unaligned offsets, offsets past 2^53, a zero flag in a
 * v2 image) takes the slow path through tables.ts, whose QEMU texts become
 * the corruption report.
 *
 * Writes to a guest range need its L2 table with COPIED set in the L1 entry
 * (refcount 1). `l2ForWrite` allocates a missing table, or copies a shared
 * one (after an internal snapshot), as QEMU's get_cluster_table and
 * l2_allocate: new cluster (refcount raised and flushed), table filled in
 * the cache and the L2 cache flushed, then the L1 entry written (synced),
 * then the old shared table's refcount dropped. A crash leaves either the
 * old mapping or the new one, at worst with a leaked cluster.
 *
 * Growing the L1 table (qcow2_grow_l1_table) writes the whole new table to
 * new clusters (synced), switches the header's L1 fields in one synced
 * write, then frees the old table.
 */
import { BlockError } from '../../block/errors.js';
import { debugEvent } from '../../block/debug-event.js';
import { Limits, L1_ENTRY_BYTES, Qcow2Version } from './format.js';
import { flushFile, signalCorruption, writeFile, writeL1Location } from './header-io.js';
import { OverlapCheck, overlapCheck } from './overlap.js';
import { allocClusters, freeClusters } from './refcount.js';
import { DiscardType, type Qcow2State } from './state.js';
import { invalidL1Entry, invalidL2Entry, readTableEntry } from './tables.js';
import type { CacheEntry } from './cache.js';

/** Entry bits, split in 32-bit words (hi: bits 32–63, lo: bits 0–31). */
export const Entry = {
  COPIED: 0x80000000,
  COMPRESSED: 0x40000000,
  HI_OFFSET: 0x00ffffff,
  /** Offset bits at or above 2^53. */
  HI_PAST_53: 0x00e00000,
  LO_OFFSET: 0xfffffe00,
  ZERO: 0x1,
} as const;

/** QEMU's QCow2ClusterType. */
export const ClusterType = { UNALLOCATED: 0, ZERO_PLAIN: 1, ZERO_ALLOC: 2, NORMAL: 3, COMPRESSED: 4 } as const;
export type ClusterTypeValue = (typeof ClusterType)[keyof typeof ClusterType];

/** The host offset in a standard entry (bits 9–55). */
export function entryOffset(hi: number, lo: number): number {
  return (hi & Entry.HI_OFFSET) * 2 ** 32 + ((lo & Entry.LO_OFFSET) >>> 0);
}

export function clusterType(hi: number, lo: number): ClusterTypeValue {
  if (hi & Entry.COMPRESSED) return ClusterType.COMPRESSED;
  const allocated = (hi & Entry.HI_OFFSET) !== 0 || (lo & Entry.LO_OFFSET) !== 0;
  if (lo & Entry.ZERO) return allocated ? ClusterType.ZERO_ALLOC : ClusterType.ZERO_PLAIN;
  return allocated ? ClusterType.NORMAL : ClusterType.UNALLOCATED;
}

/** Whether a write to this cluster must allocate (cluster_needs_new_alloc): not NORMAL/ZERO_ALLOC with COPIED. */
export function needsNewCluster(hi: number, lo: number): boolean {
  const type = clusterType(hi, lo);
  return !((type === ClusterType.NORMAL || type === ClusterType.ZERO_ALLOC) && (hi & Entry.COPIED) !== 0);
}

/** The L1 entry's L2 table offset bits (may be unaligned on a corrupt image). */
export function l1Offset(s: Qcow2State, l1Index: number): number {
  if (l1Index >= s.image.header.l1Entries) return 0;
  return entryOffset(s.l1View.getUint32(l1Index * 8), s.l1View.getUint32(l1Index * 8 + 4));
}

function l1Copied(s: Qcow2State, l1Index: number): boolean {
  return (s.l1View.getUint32(l1Index * 8) & Entry.COPIED) !== 0;
}

/** A checked L2 table offset for L1 index `i` (0: none); corruption if unaligned. */
async function checkedL1Offset(s: Qcow2State, l1Index: number): Promise<number> {
  const offset = l1Offset(s, l1Index);
  if (offset % s.clusterBytes === 0 && offset < 2 ** 53) return offset;
  throw await entryError(s, invalidL1Entry(readTableEntry(s.l1, l1Index), l1Index, s.geometry) ?? `L2 table offset ${offset} invalid`);
}

/** The error for a bad entry: a corruption for what QEMU calls corrupt, else the reason's own code. */
export async function entryError(s: Qcow2State, reason: string): Promise<BlockError> {
  if (/unaligned|pre-v3/.test(reason)) return signalCorruption(s, true, reason);
  return new BlockError('EFBIG', reason);
}

/**
 * Checks L2 entry `index` of `table` the way QEMU's I/O path does; returns
 * nothing when it is usable. Fast for the normal case.
 */
export async function checkL2Entry(s: Qcow2State, table: CacheEntry, index: number): Promise<void> {
  const hi = table.view.getUint32(index * 8);
  const lo = table.view.getUint32(index * 8 + 4);
  if (!l2EntrySuspect(s, hi, lo)) return;
  const reason = invalidL2Entry(readTableEntry(table.data, index), { l2Offset: table.offset, l2Index: index }, s.geometry, s.image.header.version);
  if (reason) throw await entryError(s, reason);
}

/** True when an entry needs the slow (BigInt) check. */
export function l2EntrySuspect(s: Qcow2State, hi: number, lo: number): boolean {
  if (hi & Entry.COMPRESSED) return true;
  if (lo & Entry.ZERO && s.image.header.version < Qcow2Version.V3) return true;
  return (lo & (s.clusterBytes - 1) & Entry.LO_OFFSET) !== 0 || (hi & Entry.HI_PAST_53) !== 0;
}

/** The cached L2 table for L1 index `i`: null when unallocated, undefined when not cached or suspect. */
export function peekL2(s: Qcow2State, l1Index: number): CacheEntry | null | undefined {
  const offset = l1Offset(s, l1Index);
  if (offset === 0) return null;
  if (offset % s.clusterBytes !== 0) return undefined;
  return s.l2Cache.peek(offset);
}

/** The L2 table for L1 index `i`, pinned (release it), or null when unallocated. Lock held. */
export async function l2ForRead(s: Qcow2State, l1Index: number): Promise<CacheEntry | null> {
  const offset = await checkedL1Offset(s, l1Index);
  return offset === 0 ? null : s.l2Cache.get(offset);
}

/** The L2 table for L1 index `i`, writable (COPIED), allocating or copying it; pinned. Lock held. */
export async function l2ForWrite(s: Qcow2State, l1Index: number): Promise<CacheEntry> {
  const offset = await checkedL1Offset(s, l1Index);
  if (offset !== 0 && l1Copied(s, l1Index)) return s.l2Cache.get(offset);
  const table = await allocateL2(s, l1Index, offset);
  if (offset !== 0) {
    s.l2Tables.delete(offset);
    await freeClusters(s, offset, s.clusterBytes, DiscardType.OTHER);
  }
  return table;
}

/** l2_allocate: a new table for L1 index `i`, empty or a copy of the one at `oldOffset`. */
async function allocateL2(s: Qcow2State, l1Index: number, oldOffset: number): Promise<CacheEntry> {
  const newOffset = await allocClusters(s, 1);
  await s.refcountCache.flush();
  const table = await s.l2Cache.getEmpty(newOffset);
  const oldCopied = oldOffset !== 0 && l1Copied(s, l1Index);
  try {
    if (oldOffset !== 0) {
      debugEvent(s.file, 'l2_alloc_cow_read');
      const old = await s.l2Cache.get(oldOffset);
      table.data.set(old.data);
      s.l2Cache.release(old);
    }
    s.l2Tables.add(newOffset);
    s.l2Cache.markDirty(table);
    debugEvent(s.file, 'l2_alloc_write');
    await s.l2Cache.flush();
    setL1Entry(s, l1Index, newOffset, true);
    await writeL1Entry(s, l1Index);
  } catch (e) {
    setL1Entry(s, l1Index, oldOffset, oldCopied);
    s.l2Tables.delete(newOffset);
    s.l2Cache.release(table);
    s.l2Cache.discard(newOffset);
    await freeClusters(s, newOffset, s.clusterBytes, DiscardType.ALWAYS);
    throw e;
  }
  return table;
}

function setL1Entry(s: Qcow2State, l1Index: number, offset: number, copied: boolean): void {
  s.l1View.setUint32(l1Index * 8, Math.floor(offset / 2 ** 32) | (copied ? Entry.COPIED : 0));
  s.l1View.setUint32(l1Index * 8 + 4, offset % 2 ** 32);
}

/** Entries per 512-byte sector of the L1 table (QEMU writes L1 a sector at a time). */
const L1_ENTRIES_PER_SECTOR = 512 / L1_ENTRY_BYTES;

/** qcow2_write_l1_entry: the sector of the L1 table holding entry `i`, synced. */
export async function writeL1Entry(s: Qcow2State, l1Index: number): Promise<void> {
  const startIndex = l1Index - (l1Index % L1_ENTRIES_PER_SECTOR);
  const buf = new Uint8Array(512);
  const count = Math.min(L1_ENTRIES_PER_SECTOR, s.image.header.l1Entries - startIndex);
  buf.set(s.l1.subarray(startIndex * 8, (startIndex + count) * 8));
  const at = s.image.header.l1TableOffset + startIndex * 8;
  await overlapCheck(s, OverlapCheck.ACTIVE_L1, at, buf.length);
  debugEvent(s.file, 'l1_update');
  await writeFile(s, at, buf);
  await flushFile(s);
}

/** Grows the L1 table to at least `minEntries` entries (qcow2_grow_l1_table). */
export async function growL1(s: Qcow2State, minEntries: number, exact: boolean): Promise<void> {
  const oldEntries = s.image.header.l1Entries;
  if (minEntries <= oldEntries) return;
  let entries = minEntries;
  if (!exact) {
    entries = Math.max(oldEntries, 1);
    while (minEntries > entries) entries = Math.floor((entries * 3 + 1) / 2);
  }
  if (entries > Limits.MAX_L1_BYTES / L1_ENTRY_BYTES) throw new BlockError('EFBIG', 'File too large');
  const table = new Uint8Array(entries * L1_ENTRY_BYTES);
  table.set(s.l1);
  const newOffset = await allocClusters(s, Math.ceil(table.length / s.clusterBytes));
  await s.refcountCache.flush();
  await overlapCheck(s, 0, newOffset, table.length);
  await writeFile(s, newOffset, table);
  await flushFile(s);
  const oldOffset = s.image.header.l1TableOffset;
  await writeL1Location(s, newOffset, entries);
  s.l1 = table;
  s.l1View = new DataView(table.buffer);
  if (oldEntries > 0) await freeClusters(s, oldOffset, oldEntries * L1_ENTRY_BYTES, DiscardType.OTHER);
}
