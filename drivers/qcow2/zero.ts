/*
 * Zeroing and discarding whole clusters in the L2 tables (QEMU's
 * zero_in_l2_slice and discard_in_l2_slice), one L2 table per lock hold.
 *
 * Zero (v3 zero flag, no data written):
 *   - zero clusters stay as they are, preallocated ones too unless MAY_UNMAP;
 *   - with MAY_UNMAP an allocated cluster becomes a plain zero cluster and
 *     its host cluster is freed (discard passed to the file when
 *     pass-discard-request allows);
 *   - without it an allocated cluster keeps its offset (zero flag added,
 *     COPIED kept): preallocated zero;
 *   - compressed clusters always become plain zero clusters.
 * Discard: allocated clusters become zero clusters (v3) or unallocated
 * (v2, or `full`, which lets the backing file show through); unallocated
 * clusters become zero clusters when a backing file would show through.
 *
 * Order, as in alloc.ts: the L2 entries change first, refcounts drop after
 * (the refcount cache then depends on the L2 cache). Clusters with writes in
 * flight are waited for first, outside the lock: a cluster is never freed
 * under a write that is still going to it. The check and the change happen
 * in one synchronous step after the last await.
 */
import { inflightWrite, freeEntry, waitFor } from './alloc.js';
import { ClusterType, Entry, clusterType, l2ForWrite } from './l2.js';
import { processDiscards } from './refcount.js';
import { DiscardType, type DiscardTypeValue, type InFlight, type Qcow2State } from './state.js';
import { Qcow2Version } from './format.js';

/**
 * What a rule does to one L2 entry: LEAVE it, or CHANGE it to the entry it
 * put in `next` (hi, lo), with FREE also freeing the old entry's cluster.
 * Rules allocate nothing: they run once per cluster, 8192 times for each
 * 512 MiB a mirror zeroes on a qcow2 target with 64 KiB clusters.
 */
const Rewritten = { LEAVE: 0, CHANGE: 1, CHANGE_AND_FREE: 2 } as const;
type RewrittenValue = (typeof Rewritten)[keyof typeof Rewritten];
type Rewrite = (hi: number, lo: number, next: Uint32Array) => RewrittenValue;

/** The new entry of a rule's CHANGE (used synchronously, one entry at a time). */
const nextEntry = new Uint32Array(2);

function rewriteTo(hi: number, lo: number, newHi: number, newLo: number, free: boolean, next: Uint32Array): RewrittenValue {
  if (newHi === hi && newLo === lo) return Rewritten.LEAVE;
  next[0] = newHi;
  next[1] = newLo;
  return free ? Rewritten.CHANGE_AND_FREE : Rewritten.CHANGE;
}

/** The zero_in_l2_slice rule for one entry. */
function zeroRule(unmap: boolean): Rewrite {
  return (hi, lo, next) => {
    const type = clusterType(hi, lo);
    const allocated = type === ClusterType.NORMAL || type === ClusterType.ZERO_ALLOC || type === ClusterType.COMPRESSED;
    const free = type === ClusterType.COMPRESSED || (unmap && allocated);
    return free ? rewriteTo(hi, lo, 0, Entry.ZERO, true, next) : rewriteTo(hi, lo, hi, (lo | Entry.ZERO) >>> 0, false, next);
  };
}

/** The discard_in_l2_slice rule for one entry. */
function discardRule(s: Qcow2State, full: boolean): Rewrite {
  const zeroFlag = s.image.header.version >= Qcow2Version.V3 ? Entry.ZERO : 0;
  return (hi, lo, next) => {
    const type = clusterType(hi, lo);
    const allocated = type === ClusterType.NORMAL || type === ClusterType.ZERO_ALLOC || type === ClusterType.COMPRESSED;
    if (full) return rewriteTo(hi, lo, 0, 0, allocated, next);
    if (s.backing || allocated) return rewriteTo(hi, lo, 0, zeroFlag, allocated, next);
    return Rewritten.LEAVE;
  };
}

/**
 * Applies `rule` to the clusters of [offset, offset + bytes) in one L2 table;
 * returns the clusters done, or a write to wait for. With `onlyIfZero`,
 * returns 'busy' when the (single) cluster is allocated.
 */
async function rewriteInTable(
  s: Qcow2State,
  offsetBytes: number,
  clusters: number,
  rule: Rewrite,
  type: DiscardTypeValue,
  onlyIfZero: boolean,
): Promise<number | 'busy' | InFlight> {
  const index = s.geometry.l2Index(offsetBytes);
  const n = Math.min(clusters, s.geometry.l2Entries - index);
  const table = await l2ForWrite(s, s.geometry.l1Index(offsetBytes));
  const freed: Array<[number, number]> = [];
  try {
    const first = offsetBytes / s.clusterBytes;
    const busy = inflightWrite(s, first, first + n);
    if (busy) return busy;
    if (onlyIfZero) {
      const t = clusterType(table.view.getUint32(index * 8), table.view.getUint32(index * 8 + 4));
      if (t !== ClusterType.UNALLOCATED && t !== ClusterType.ZERO_PLAIN && t !== ClusterType.ZERO_ALLOC) return 'busy';
    }
    const view = table.view;
    // Unallocated entries (all-zero) are the common case and all get the same answer: asked once.
    const unallocatedDone = rule(0, 0, nextEntry);
    const unallocatedHi = nextEntry[0]!;
    const unallocatedLo = nextEntry[1]!;
    for (let i = 0; i < n; i++) {
      const at = (index + i) * 8;
      const hi = view.getUint32(at);
      const lo = view.getUint32(at + 4);
      if (hi === 0 && lo === 0) {
        if (unallocatedDone === Rewritten.LEAVE) continue;
        view.setUint32(at, unallocatedHi);
        view.setUint32(at + 4, unallocatedLo);
        s.l2Cache.markDirty(table);
        continue;
      }
      const done = rule(hi, lo, nextEntry);
      if (done === Rewritten.LEAVE) continue;
      s.l2Cache.markDirty(table);
      view.setUint32(at, nextEntry[0]!);
      view.setUint32(at + 4, nextEntry[1]!);
      if (done === Rewritten.CHANGE_AND_FREE) freed.push([hi, lo]);
    }
  } finally {
    s.l2Cache.release(table);
  }
  for (const [hi, lo] of freed) await freeEntry(s, hi, lo, type);
  return n;
}

/** Runs `rule` over the whole clusters of [offset, offset + bytes), table by table; false if `onlyIfZero` failed. */
async function rewriteClusters(s: Qcow2State, offsetBytes: number, bytes: number, rule: Rewrite, type: DiscardTypeValue, onlyIfZero = false) {
  let clusters = Math.ceil(bytes / s.clusterBytes);
  while (clusters > 0) {
    const result = await s.lock.run(async () => {
      s.cacheDiscards = true;
      try {
        return await rewriteInTable(s, offsetBytes, clusters, rule, type, onlyIfZero);
      } finally {
        s.cacheDiscards = false;
        await processDiscards(s);
      }
    });
    if (result === 'busy') return false;
    if (typeof result === 'object') {
      await waitFor(result);
      continue;
    }
    clusters -= result;
    offsetBytes += result * s.clusterBytes;
  }
  return true;
}

/** qcow2_subcluster_zeroize for v3 images; false when `onlyIfZero` found data. */
export function zeroClusters(s: Qcow2State, offsetBytes: number, bytes: number, unmap: boolean, onlyIfZero = false): Promise<boolean> {
  return rewriteClusters(s, offsetBytes, bytes, zeroRule(unmap), DiscardType.REQUEST, onlyIfZero);
}

/** qcow2_cluster_discard. */
export async function discardClusters(s: Qcow2State, offsetBytes: number, bytes: number, type: DiscardTypeValue, full: boolean): Promise<void> {
  await rewriteClusters(s, offsetBytes, bytes, discardRule(s, full), type);
}
