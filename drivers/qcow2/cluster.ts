/*
 * Guest -> host mapping for reads and block status (QEMU's
 * qcow2_get_host_offset): the run of guest bytes from an offset that share
 * one cluster type and, for allocated clusters, sit contiguously in the
 * file, so a sequential read of contiguous clusters is one file read.
 *
 * A run never crosses an L2 table (one L1 entry's reach). Compressed
 * clusters come one at a time. An entry QEMU would call corrupt ends the
 * run before it; the run that starts at it reports the corruption.
 *
 * `mapRunCached` answers synchronously when the L2 table is cached (or the
 * L1 entry empty), so reads of cached metadata take no lock and no await;
 * `mapRun` (lock held) loads the table.
 */
import { BlockError } from '../../block/errors.js';
import { ClusterType, Entry, checkL2Entry, clusterType, entryOffset, l1Offset, l2EntrySuspect, l2ForRead, peekL2, type ClusterTypeValue } from './l2.js';
import type { CacheEntry } from './cache.js';
import type { Qcow2State } from './state.js';

export interface Run {
  type: ClusterTypeValue;
  /** Guest bytes from the request offset with this mapping (> 0). */
  bytes: number;
  /** Host offset of the run's first byte for NORMAL and ZERO_ALLOC; 0 otherwise. */
  hostOffset: number;
  /** The L2 entry, for COMPRESSED runs. */
  hi: number;
  lo: number;
}

/** Bytes from `offset` to the end of the L2 table's reach, at most `bytes`. */
function withinTable(s: Qcow2State, offsetBytes: number, bytes: number): number {
  const reach = s.geometry.l2CoverageBytes;
  return Math.min(bytes, (Math.floor(offsetBytes / reach) + 1) * reach - offsetBytes);
}

/**
 * The run at `offset` in `table` (null: no L2 table), or undefined when its
 * first entry needs the slow check.
 */
export function runInTable(s: Qcow2State, table: CacheEntry | null, offsetBytes: number, bytes: number): Run | undefined {
  const c = s.clusterBytes;
  const maxBytes = withinTable(s, offsetBytes, bytes);
  if (table === null) return { type: ClusterType.UNALLOCATED, bytes: maxBytes, hostOffset: 0, hi: 0, lo: 0 };
  const view = table.view;
  const first = s.geometry.l2Index(offsetBytes);
  const hi = view.getUint32(first * 8);
  const lo = view.getUint32(first * 8 + 4);
  if (l2EntrySuspect(s, hi, lo)) return undefined;
  const type = clusterType(hi, lo);
  const inCluster = offsetBytes % c;
  const wanted = Math.ceil((inCluster + maxBytes) / c);
  const host = type === ClusterType.NORMAL || type === ClusterType.ZERO_ALLOC ? entryOffset(hi, lo) : 0;
  const n = sameRunEntries(s, view, first, wanted, type, host);
  return { type, bytes: Math.min(maxBytes, n * c - inCluster), hostOffset: host === 0 ? 0 : host + inCluster, hi, lo };
}

/**
 * How many of the `wanted` entries from `first` continue the run the first
 * one starts (same type, contiguous host clusters when `host` is not 0).
 * A function of its own so that V8's on-stack replacement of this hot loop
 * cannot leave runInTable's code after it without type feedback: compiled
 * that way, every call deoptimised there (~1 ms each, hundreds per GiB).
 */
function sameRunEntries(s: Qcow2State, view: DataView, first: number, wanted: number, type: ClusterTypeValue, host: number): number {
  const c = s.clusterBytes;
  let n = host === 0 ? identicalEntries(view, first, wanted) : 1;
  for (; n < wanted; n++) {
    const h = view.getUint32((first + n) * 8);
    const l = view.getUint32((first + n) * 8 + 4);
    if (l2EntrySuspect(s, h, l) || clusterType(h, l) !== type) break;
    if (host !== 0 && entryOffset(h, l) !== host + n * c) break;
  }
  return n;
}

/**
 * How many of the `wanted` entries from `first` equal the first one bit
 * for bit: the long runs of unallocated or plain zero entries of a sparse
 * image (8192 per table with 64 KiB clusters), counted without the per-entry
 * checks (the first entry passed them, so its copies do too).
 */
function identicalEntries(view: DataView, first: number, wanted: number): number {
  const hi = view.getUint32(first * 8);
  const lo = view.getUint32(first * 8 + 4);
  let n = 1;
  while (n < wanted && view.getUint32((first + n) * 8 + 4) === lo && view.getUint32((first + n) * 8) === hi) n++;
  return n;
}

/** The compressed run at `offset`, whose entry passed the slow check. */
function compressedRun(s: Qcow2State, table: CacheEntry, offsetBytes: number, bytes: number): Run | undefined {
  const index = s.geometry.l2Index(offsetBytes);
  const hi = table.view.getUint32(index * 8);
  if (!(hi & Entry.COMPRESSED)) return undefined;
  const lo = table.view.getUint32(index * 8 + 4);
  const inCluster = offsetBytes % s.clusterBytes;
  return { type: ClusterType.COMPRESSED, bytes: Math.min(bytes, s.clusterBytes - inCluster), hostOffset: 0, hi, lo };
}

/** The run at `offset` without I/O, when the metadata is cached; undefined otherwise. */
export function mapRunCached(s: Qcow2State, offsetBytes: number, bytes: number): Run | undefined {
  const table = peekL2(s, s.geometry.l1Index(offsetBytes));
  if (table === undefined) return undefined;
  return runInTable(s, table, offsetBytes, bytes);
}

/** The run at `offset` (lock held): loads the table, checks the entry (reporting corruption). */
export async function mapRun(s: Qcow2State, offsetBytes: number, bytes: number): Promise<Run> {
  const l1Index = s.geometry.l1Index(offsetBytes);
  if (l1Offset(s, l1Index) === 0) return runInTable(s, null, offsetBytes, bytes)!;
  const table = await l2ForRead(s, l1Index);
  if (table === null) return runInTable(s, null, offsetBytes, bytes)!;
  try {
    const run = runInTable(s, table, offsetBytes, bytes);
    if (run) return run;
    await checkL2Entry(s, table, s.geometry.l2Index(offsetBytes));
    const compressed = compressedRun(s, table, offsetBytes, bytes);
    if (compressed) return compressed;
    throw new BlockError('EIO', `qcow2: unusable L2 entry at guest offset ${offsetBytes}`);
  } finally {
    s.l2Cache.release(table);
  }
}
