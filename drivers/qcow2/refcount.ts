/*
 * Refcounts and the cluster allocator (QEMU's qcow2-refcount.c, allocation
 * side; checking and repair live elsewhere).
 *
 * Lookups: cluster index -> refcount table index -> refcount block (through
 * the refcount cache) -> entry. A missing block (table entry 0, or an index
 * past the table) means refcount 0. Entries are 2^refcount_order bits wide,
 * 0 to 6; `refcountCodec` picks the accessors once per image.
 *
 * Allocation (alloc_clusters_noref + update_refcount): scan for n free
 * clusters from `freeClusterIndex` (which moves forward; freeing a cluster
 * moves it back), so freed clusters are reused before the file grows. Then
 * raise their refcounts. If a cluster of the run has no refcount block yet,
 * one is created first (`createRefblock`) and the scan starts again, since
 * the new block may sit where the run was (QEMU's -EAGAIN):
 *   - the block goes to the first free cluster; when that cluster is one
 *     the block itself covers, the block describes itself (refcount 1 in
 *     its own entry), else its refcount is raised in the block covering it;
 *   - it is written and flushed, then hooked into the refcount table
 *     (entry written and flushed);
 *   - when the table is too small, `refcountArea` builds a new, larger
 *     table plus any blocks needed to cover it, all describing themselves,
 *     past the end of the used area; they are written and flushed before
 *     the header's refcount table pointer is switched in one synced 12-byte
 *     write; only then is the old table freed. A crash at any point leaves
 *     either the old or the new structure, at worst with leaked clusters.
 *
 * Freeing (update_refcount with a decrease) first orders the refcount cache
 * after the L2 cache: a block with a lowered count never reaches the disk
 * before the L2 tables that stopped referencing the cluster. A cluster whose
 * count drops to 0 is dropped from the metadata caches (it may have held a
 * table) and, if `pass-discard-*` allows for the reason it was freed,
 * discarded in the file (collected while `cacheDiscards` is set, as QEMU
 * does for zero/discard requests spanning many clusters).
 */
import { BlockError, strerror } from '../../block/errors.js';
import { pdiscard } from '../../block/io.js';
import { debugEvent } from '../../block/debug-event.js';
import { hex } from './cursor.js';
import { Limits } from './format.js';
import { signalCorruption } from './header-io.js';
import { createRefblock } from './refcount-grow.js';
import { DiscardType, type DiscardTypeValue, type Qcow2State } from './state.js';

/** Largest host offset a cluster may start at: offsets must stay exact JS numbers. */
const HOST_OFFSET_MAX = Math.min(Limits.HOST_OFFSET_LIMIT, Number.MAX_SAFE_INTEGER + 1);

/** Reads and writes entries of one refcount width. */
export interface RefcountCodec {
  get(view: DataView, index: number): number;
  set(view: DataView, index: number, value: number): void;
  /** The largest refcount the width holds (2^53 - 1 for 64 bits). */
  readonly max: number;
}

export function refcountCodec(order: number): RefcountCodec {
  const bits = 2 ** order;
  const max = Math.min(2 ** bits - 1, Number.MAX_SAFE_INTEGER);
  switch (order) {
    case 4:
      return { max, get: (v, i) => v.getUint16(i * 2), set: (v, i, x) => v.setUint16(i * 2, x) };
    case 5:
      return { max, get: (v, i) => v.getUint32(i * 4), set: (v, i, x) => v.setUint32(i * 4, x) };
    case 6:
      return {
        max,
        get: (v, i) => {
          const hi = v.getUint32(i * 8);
          return hi >= 0x200000 ? Infinity : hi * 2 ** 32 + v.getUint32(i * 8 + 4);
        },
        set: (v, i, x) => {
          v.setUint32(i * 8, Math.floor(x / 2 ** 32));
          v.setUint32(i * 8 + 4, x % 2 ** 32);
        },
      };
    default: {
      const perByte = 8 / bits;
      const mask = 2 ** bits - 1;
      return {
        max,
        get: (v, i) => (v.getUint8(Math.floor(i / perByte)) >> ((i % perByte) * bits)) & mask,
        set: (v, i, x) => {
          const at = Math.floor(i / perByte);
          const shift = (i % perByte) * bits;
          v.setUint8(at, (v.getUint8(at) & ~(mask << shift)) | (x << shift));
        },
      };
    }
  }
}

const codecs = Array.from({ length: Limits.MAX_REFCOUNT_ORDER + 1 }, (_, order) => refcountCodec(order));
export const codecOf = (s: Qcow2State): RefcountCodec => codecs[s.geometry.refcountOrder]!;

/** The refcount block offset for table index `t` (0: none), checked; corruption if unaligned. */
async function blockOffset(s: Qcow2State, t: number): Promise<number> {
  const offset = t < s.reftable.length ? s.reftable[t]! : 0;
  if (offset === 0) return 0;
  if (!Number.isFinite(offset)) throw new BlockError('EFBIG', `Refblock offset beyond the 2^53 bytes supported (reftable index: ${hex(t)})`);
  if (offset % s.clusterBytes !== 0) {
    throw await signalCorruption(s, true, `Refblock offset ${hex(offset)} unaligned (reftable index: ${hex(t)})`);
  }
  return offset;
}

/** The refcount of cluster `index`, when it can be told without I/O. */
export function refcountIfCached(s: Qcow2State, index: number): number | undefined {
  const t = Math.floor(index / s.geometry.refcountBlockEntries);
  const offset = t < s.reftable.length ? s.reftable[t]! : 0;
  if (offset === 0) return 0;
  const entry = s.refcountCache.peek(offset);
  return entry ? codecOf(s).get(entry.view, index % s.geometry.refcountBlockEntries) : undefined;
}

/** The refcount of cluster `index` (qcow2_get_refcount). */
export async function getRefcount(s: Qcow2State, index: number): Promise<number> {
  const known = refcountIfCached(s, index);
  if (known !== undefined) return known;
  const offset = await blockOffset(s, Math.floor(index / s.geometry.refcountBlockEntries));
  const entry = await s.refcountCache.get(offset);
  try {
    return codecOf(s).get(entry.view, index % s.geometry.refcountBlockEntries);
  } finally {
    s.refcountCache.release(entry);
  }
}

/**
 * Finds `count` contiguous free clusters from `freeClusterIndex` on and
 * moves the index past them (alloc_clusters_noref). Refcounts are not
 * raised. Returns the first cluster's index.
 */
export async function scanFree(s: Qcow2State, count: number): Promise<number> {
  const limit = Math.floor(HOST_OFFSET_MAX / s.clusterBytes);
  let run = 0;
  while (run < count) {
    const index = s.freeClusterIndex++;
    if (index >= limit) throw new BlockError('EFBIG', 'qcow2: no free host cluster below the supported host offset limit');
    const refcount = refcountIfCached(s, index) ?? (await getRefcount(s, index));
    run = refcount === 0 ? run + 1 : 0;
  }
  return s.freeClusterIndex - count;
}

/** Index of the first refcount table entry covering [first, first + count) that has no block, or -1. */
function firstMissingBlock(s: Qcow2State, first: number, count: number): number {
  const e = s.geometry.refcountBlockEntries;
  for (let t = Math.floor(first / e); t <= Math.floor((first + count - 1) / e); t++) {
    if (t >= s.reftable.length || s.reftable[t] === 0) return t;
  }
  return -1;
}

/**
 * Adds `addend` to (or, with `decrease`, subtracts it from) the refcount of
 * clusters [first, first + count). Returns false when it created a refcount
 * block instead and changed nothing: the caller must search again (-EAGAIN).
 */
export async function updateRefcount(
  s: Qcow2State,
  first: number,
  count: number,
  addend: number,
  decrease: boolean,
  type: DiscardTypeValue,
): Promise<boolean> {
  if (count <= 0) return true;
  if (decrease) await s.refcountCache.setDependency(s.l2Cache);
  const missing = firstMissingBlock(s, first, count);
  if (missing >= 0 && !decrease) {
    await createRefblock(s, Math.max(first, missing * s.geometry.refcountBlockEntries));
    return false;
  }
  let done = 0;
  try {
    while (done < count) done += await updateInBlock(s, first + done, count - done, addend, decrease, type);
  } catch (e) {
    if (done > 0) await updateRefcount(s, first, done, addend, !decrease, DiscardType.NEVER).catch(() => undefined);
    throw e;
  } finally {
    if (!s.cacheDiscards) await processDiscards(s);
  }
  return true;
}

/** updateRefcount for the part of the range inside one refcount block; returns the clusters done. */
async function updateInBlock(s: Qcow2State, first: number, count: number, addend: number, decrease: boolean, type: DiscardTypeValue) {
  const e = s.geometry.refcountBlockEntries;
  const t = Math.floor(first / e);
  const n = Math.min(count, (t + 1) * e - first);
  const offset = await blockOffset(s, t);
  if (offset === 0) throw new BlockError('EINVAL', `Refcount of cluster ${first} would drop below 0`);
  debugEvent(s.file, 'refblock_load');
  const entry = await s.refcountCache.get(offset);
  try {
    const codec = codecOf(s);
    for (let i = 0; i < n; i++) {
      const value = codec.get(entry.view, (first + i) % e);
      const next = decrease ? value - addend : value + addend;
      if (next < 0 || next > codec.max) throw new BlockError('EINVAL', `Refcount of cluster ${first + i} out of range`);
    }
    s.refcountCache.markDirty(entry);
    for (let i = 0; i < n; i++) {
      const index = (first + i) % e;
      const next = codec.get(entry.view, index) + (decrease ? -addend : addend);
      codec.set(entry.view, index, next);
      if (next === 0) clusterFreed(s, first + i, type);
    }
  } finally {
    s.refcountCache.release(entry);
  }
  return n;
}

/** Bookkeeping when a cluster's refcount reaches 0. */
function clusterFreed(s: Qcow2State, index: number, type: DiscardTypeValue): void {
  const offset = index * s.clusterBytes;
  if (index < s.freeClusterIndex) s.freeClusterIndex = index;
  if (Math.floor(s.freeByteOffset / s.clusterBytes) === index) s.freeByteOffset = 0;
  s.refcountCache.discard(offset);
  s.l2Cache.discard(offset);
  if (!s.opts.passDiscard[type]) return;
  const last = s.discards[s.discards.length - 1];
  if (last && last.offset + last.bytes === offset) last.bytes += s.clusterBytes;
  else if (last && offset + s.clusterBytes === last.offset) {
    last.offset = offset;
    last.bytes += s.clusterBytes;
  } else s.discards.push({ offset, bytes: s.clusterBytes });
}

/** Issues the collected discards to the file; failures are ignored (a discard is a hint). */
export async function processDiscards(s: Qcow2State): Promise<void> {
  while (s.discards.length > 0) {
    const d = s.discards.shift()!;
    await pdiscard(s.file, d.offset, d.bytes).catch(() => undefined);
  }
}

/** Allocates `count` contiguous clusters with refcount 1 (qcow2_alloc_clusters); returns the host offset. */
export async function allocClusters(s: Qcow2State, count: number): Promise<number> {
  debugEvent(s.file, 'cluster_alloc');
  for (;;) {
    const first = await scanFree(s, count);
    if (await updateRefcount(s, first, count, 1, false, DiscardType.NEVER)) return first * s.clusterBytes;
    if (s.freeClusterIndex > first) s.freeClusterIndex = first;
  }
}

/** Allocates up to `count` clusters at `offset`, as many as are free there (qcow2_alloc_clusters_at). */
export async function allocClustersAt(s: Qcow2State, offsetBytes: number, count: number): Promise<number> {
  const first = offsetBytes / s.clusterBytes;
  for (;;) {
    let free = 0;
    while (free < count && (await getRefcount(s, first + free)) === 0) free++;
    if (await updateRefcount(s, first, free, 1, false, DiscardType.NEVER)) return free;
  }
}

/** Drops one reference from each cluster of [offset, offset + bytes); failures are reported, not thrown (a leak). */
export async function freeClusters(s: Qcow2State, offsetBytes: number, bytes: number, type: DiscardTypeValue): Promise<void> {
  const first = Math.floor(offsetBytes / s.clusterBytes);
  const end = Math.ceil((offsetBytes + bytes) / s.clusterBytes);
  debugEvent(s.file, 'cluster_free');
  try {
    await updateRefcount(s, first, end - first, 1, true, type);
  } catch (e) {
    const code = e instanceof BlockError ? e.code : 'EIO';
    s.warn(`qcow2_free_clusters failed: ${strerror(code)}\n`, true);
  }
}
