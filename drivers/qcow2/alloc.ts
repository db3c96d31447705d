/*
 * Where guest writes go (QEMU's qcow2_alloc_host_offset with handle_copied,
 * handle_alloc and qcow2_alloc_cluster_link_l2).
 *
 * A write is cut into steps, each either
 *   - in place: a run of clusters with COPIED (refcount 1) that sit
 *     contiguously in the file; the data goes straight there, no metadata
 *     changes; or
 *   - an allocation: a run of clusters that need new host clusters
 *     (unallocated, zero, compressed, or shared with a snapshot), or that
 *     are preallocated zero clusters reused in place (keepOld). Host
 *     clusters are allocated contiguously for the whole run, the data is
 *     written with the copy-on-write parts of the first and last cluster,
 *     then the L2 entries are switched and the old clusters' refcounts
 *     dropped (`linkAllocation`).
 *
 * Crash safety: refcounts of new clusters rise in the refcount cache before
 * the L2 entries change, and the L2 cache depends on the refcount cache, so
 * on disk a refcount is never below its references. When copy-on-write
 * data was written, the L2 cache must also flush the file first, so an L2
 * entry never reaches the disk before the data it maps. Old clusters are
 * freed after the L2 update; the refcount cache then depends on the L2
 * cache. With lazy refcounts the dirty bit is set (synced) before the first
 * L2 update instead, and the refcount ordering is skipped.
 *
 * Concurrency (QEMU's l2meta dependencies): an allocation in flight is in
 * `s.allocations` until linked. A write that touches its first cluster
 * waits for it and starts over; one that reaches it later is shortened to
 * stop before it. In-place writes are in `s.inplace` while their data is in
 * flight, so zero and discard requests wait before freeing those clusters.
 * `inplaceFast` finds in-place steps without the lock from cached metadata.
 */
import { ClusterType, Entry, checkL2Entry, clusterType, entryOffset, l2EntrySuspect, l2ForWrite, needsNewCluster, peekL2 } from './l2.js';
import { markDirty, needAccurateRefcounts, signalCorruption } from './header-io.js';
import { allocClusters, freeClusters } from './refcount.js';
import { DiscardType, type Allocation, type InFlight, type CowSource, type DiscardTypeValue, type InplaceWrite, type Qcow2State } from './state.js';
import type { CacheEntry } from './cache.js';
import { hex } from './cursor.js';

export type WriteStep =
  | { kind: 'inplace'; hostOffset: number; bytes: number; record: InplaceWrite }
  | { kind: 'alloc'; hostOffset: number; bytes: number; alloc: Allocation }
  | { kind: 'wait'; on: InFlight };

/** Resolves when `on` (an allocation or in-place write) completes, at once if it has. */
export function waitFor(on: InFlight): Promise<void> {
  if (on.done) return Promise.resolve();
  return new Promise((resolve) => (on.waiters ??= []).push(resolve));
}

function wake(on: InFlight): void {
  const waiters = on.waiters;
  on.done = true;
  on.waiters = null;
  if (waiters) for (const w of waiters) w();
}

const overlaps = (aStart: number, aEnd: number, bStart: number, bEnd: number) => aStart < bEnd && bStart < aEnd;

/** The in-flight allocation or in-place write touching guest clusters [first, end), if any. */
export function inflightWrite(s: Qcow2State, first: number, end: number): InFlight | undefined {
  for (const a of s.allocations) {
    const aFirst = a.guestOffset / s.clusterBytes;
    if (overlaps(first, end, aFirst, aFirst + a.clusters)) return a;
  }
  for (const w of s.inplace) if (overlaps(first, end, w.firstCluster, w.endCluster)) return w;
  return undefined;
}

/**
 * Applies allocation dependencies to [offset, offset + bytes): returns the
 * allocation to wait for, or the bytes the step may cover.
 */
function dependencies(s: Qcow2State, offsetBytes: number, bytes: number): Allocation | number {
  const c = s.clusterBytes;
  const first = Math.floor(offsetBytes / c);
  for (const a of s.allocations) {
    const aFirst = a.guestOffset / c;
    if (!overlaps(first, Math.ceil((offsetBytes + bytes) / c), aFirst, aFirst + a.clusters)) continue;
    if (aFirst <= first) return a;
    bytes = a.guestOffset - offsetBytes;
  }
  return bytes;
}

/** Registers an in-place write of guest clusters covering [offset, offset + bytes). */
function registerInplace(s: Qcow2State, offsetBytes: number, bytes: number): InplaceWrite {
  const c = s.clusterBytes;
  const record: InplaceWrite = { firstCluster: Math.floor(offsetBytes / c), endCluster: Math.ceil((offsetBytes + bytes) / c), waiters: null };
  s.inplace.add(record);
  return record;
}

export function finishInplace(s: Qcow2State, record: InplaceWrite): void {
  s.inplace.delete(record);
  wake(record);
}

/** Clusters from `index` with COPIED set, of `type`, contiguous in the file from `host`. */
function countKeep(s: Qcow2State, view: DataView, index: number, max: number, type: number, host: number): number {
  let n = 1;
  for (; n < max; n++) {
    const hi = view.getUint32((index + n) * 8);
    const lo = view.getUint32((index + n) * 8 + 4);
    if (l2EntrySuspect(s, hi, lo) || !(hi & Entry.COPIED) || clusterType(hi, lo) !== type) break;
    if (entryOffset(hi, lo) !== host + n * s.clusterBytes) break;
  }
  return n;
}

/**
 * Clusters from `index` that need new host clusters (count_single_write_clusters
 * with new_alloc); compressed ones included, standard entries QEMU would call
 * corrupt end the run (they are reported when a run starts at them).
 */
function countNew(s: Qcow2State, view: DataView, index: number, max: number): number {
  let n = 1;
  for (; n < max; n++) {
    const hi = view.getUint32((index + n) * 8);
    const lo = view.getUint32((index + n) * 8 + 4);
    if (!needsNewCluster(hi, lo) || (!(hi & Entry.COMPRESSED) && l2EntrySuspect(s, hi, lo))) break;
  }
  return n;
}

/**
 * An in-place step for [offset, offset + bytes) found synchronously from
 * cached metadata, registered; null when the slow path must decide.
 */
export function inplaceFast(s: Qcow2State, offsetBytes: number, bytes: number): WriteStep | null {
  const l1Index = s.geometry.l1Index(offsetBytes);
  if (l1Index >= s.image.header.l1Entries || !(s.l1View.getUint32(l1Index * 8) & Entry.COPIED)) return null;
  const table = peekL2(s, l1Index);
  if (!table) return null;
  const step = inplaceStep(s, table, offsetBytes, bytes);
  if (!step) return null;
  const c = s.clusterBytes;
  const first = Math.floor(offsetBytes / c);
  for (const a of s.allocations) {
    const aFirst = a.guestOffset / c;
    if (overlaps(first, Math.ceil((offsetBytes + step.bytes) / c), aFirst, aFirst + a.clusters)) return null;
  }
  return { kind: 'inplace', ...step, record: registerInplace(s, offsetBytes, step.bytes) };
}

/** The in-place part at the start of [offset, offset + bytes) in `table`, or null. */
function inplaceStep(s: Qcow2State, table: CacheEntry, offsetBytes: number, bytes: number): { hostOffset: number; bytes: number } | null {
  const c = s.clusterBytes;
  const index = s.geometry.l2Index(offsetBytes);
  const hi = table.view.getUint32(index * 8);
  const lo = table.view.getUint32(index * 8 + 4);
  if (l2EntrySuspect(s, hi, lo) || !(hi & Entry.COPIED) || clusterType(hi, lo) !== ClusterType.NORMAL) return null;
  const inCluster = offsetBytes % c;
  const max = Math.min(Math.ceil((inCluster + bytes) / c), s.geometry.l2Entries - index);
  const host = entryOffset(hi, lo);
  const n = countKeep(s, table.view, index, max, ClusterType.NORMAL, host);
  return { hostOffset: host + inCluster, bytes: Math.min(bytes, n * c - inCluster) };
}

/** Plans the next step of a write at `offset` (lock held). */
export async function planWrite(s: Qcow2State, offsetBytes: number, bytes: number): Promise<WriteStep> {
  const allowed = dependencies(s, offsetBytes, bytes);
  if (typeof allowed !== 'number') return { kind: 'wait', on: allowed };
  bytes = allowed;
  const table = await l2ForWrite(s, s.geometry.l1Index(offsetBytes));
  try {
    const index = s.geometry.l2Index(offsetBytes);
    await checkL2Entry(s, table, index);
    const inplace = inplaceStep(s, table, offsetBytes, bytes);
    if (inplace) return { kind: 'inplace', ...inplace, record: registerInplace(s, offsetBytes, inplace.bytes) };
    return await planAllocation(s, table, offsetBytes, bytes);
  } finally {
    s.l2Cache.release(table);
  }
}

/** Reserves host clusters for the run at `offset` and registers the allocation. */
async function planAllocation(s: Qcow2State, table: CacheEntry, offsetBytes: number, bytes: number): Promise<WriteStep> {
  const c = s.clusterBytes;
  const view = table.view;
  const index = s.geometry.l2Index(offsetBytes);
  const inCluster = offsetBytes % c;
  const max = Math.min(Math.ceil((inCluster + bytes) / c), s.geometry.l2Entries - index);
  const hi = view.getUint32(index * 8);
  const lo = view.getUint32(index * 8 + 4);
  const keepOld = clusterType(hi, lo) === ClusterType.ZERO_ALLOC && (hi & Entry.COPIED) !== 0;
  const clusters = keepOld ? countKeep(s, view, index, max, ClusterType.ZERO_ALLOC, entryOffset(hi, lo)) : countNew(s, view, index, max);
  const end = Math.min(inCluster + bytes, clusters * c);
  const alloc: Allocation = {
    guestOffset: offsetBytes - inCluster,
    clusters,
    hostOffset: keepOld ? entryOffset(hi, lo) : 0,
    keepOld,
    cowStartBytes: inCluster,
    cowEndOffset: end,
    cowEndBytes: clusters * c - end,
    cowStart: cowSource(s, hi, lo),
    cowEnd: cowSource(s, view.getUint32((index + clusters - 1) * 8), view.getUint32((index + clusters - 1) * 8 + 4)),
    waiters: null,
  };
  s.allocations.add(alloc);
  try {
    if (!keepOld) alloc.hostOffset = await allocClusters(s, clusters);
  } catch (e) {
    finishAllocation(s, alloc);
    throw e;
  }
  return { kind: 'alloc', hostOffset: alloc.hostOffset + inCluster, bytes: end - inCluster, alloc };
}

/** Where the old content of a cluster with this entry comes from. */
function cowSource(s: Qcow2State, hi: number, lo: number): CowSource {
  switch (clusterType(hi, lo)) {
    case ClusterType.UNALLOCATED:
      return s.backing ? { kind: 'backing' } : { kind: 'zero' };
    case ClusterType.NORMAL:
      return { kind: 'host', hostOffset: entryOffset(hi, lo) };
    case ClusterType.COMPRESSED:
      return { kind: 'compressed', hi, lo };
    default:
      return { kind: 'zero' };
  }
}

/** Switches the L2 entries of a written allocation, then frees the old clusters (lock held). */
export async function linkAllocation(s: Qcow2State, alloc: Allocation, cowWritten: boolean): Promise<void> {
  if (s.opts.lazyRefcounts) await markDirty(s);
  if (needAccurateRefcounts(s)) await s.l2Cache.setDependency(s.refcountCache);
  if (cowWritten) s.l2Cache.dependsOnFlush = true;
  const table = await l2ForWrite(s, s.geometry.l1Index(alloc.guestOffset));
  const old: Array<[number, number]> = [];
  try {
    const index = s.geometry.l2Index(alloc.guestOffset);
    for (let i = 0; i < alloc.clusters; i++) {
      const at = (index + i) * 8;
      const hi = table.view.getUint32(at);
      const lo = table.view.getUint32(at + 4);
      if (!alloc.keepOld && (hi !== 0 || lo !== 0)) old.push([hi, lo]);
      const host = alloc.hostOffset + i * s.clusterBytes;
      table.view.setUint32(at, Math.floor(host / 2 ** 32) | Entry.COPIED);
      table.view.setUint32(at + 4, host % 2 ** 32);
    }
    s.l2Cache.markDirty(table);
  } finally {
    s.l2Cache.release(table);
  }
  for (const [hi, lo] of old) await freeEntry(s, hi, lo, DiscardType.NEVER);
}

/** Gives back the clusters of an allocation whose data could not be written (lock held). */
export async function abortAllocation(s: Qcow2State, alloc: Allocation): Promise<void> {
  if (!alloc.keepOld && alloc.hostOffset !== 0) {
    await freeClusters(s, alloc.hostOffset, alloc.clusters * s.clusterBytes, DiscardType.NEVER);
  }
}

export function finishAllocation(s: Qcow2State, alloc: Allocation): void {
  s.allocations.delete(alloc);
  wake(alloc);
}

/** Drops the reference an L2 entry holds (qcow2_free_any_cluster). */
export async function freeEntry(s: Qcow2State, hi: number, lo: number, type: DiscardTypeValue): Promise<void> {
  switch (clusterType(hi, lo)) {
    case ClusterType.COMPRESSED: {
      const extent = s.geometry.compressedExtent((BigInt(hi & 0x3fffffff) << 32n) | BigInt(lo >>> 0));
      s.compressedCache = null;
      if (Number.isSafeInteger(extent.hostOffset)) await freeClusters(s, extent.hostOffset, extent.compressedBytes, type);
      return;
    }
    case ClusterType.NORMAL:
    case ClusterType.ZERO_ALLOC: {
      const offset = entryOffset(hi, lo);
      if (offset % s.clusterBytes !== 0) {
        await signalCorruption(s, false, `Cannot free unaligned cluster ${hex(offset)}`);
        return;
      }
      await freeClusters(s, offset, s.clusterBytes, type);
      return;
    }
    default:
      return;
  }
}
