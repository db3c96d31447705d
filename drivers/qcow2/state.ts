/*
 * The state of one open qcow2 node, shared by the driver's modules.
 *
 * What is kept in memory, as QEMU keeps it:
 *   - the header cluster (`image`), its fields kept current (L1 and refcount
 *     table location and size, virtual size, feature bits), so a header
 *     rewrite (header-io.ts) writes what is true now;
 *   - the active L1 table as raw big-endian bytes (`l1`): entries are read
 *     with two 32-bit loads, never as BigInt;
 *   - the refcount table as numbers (`reftable`, refcount block offsets);
 *   - the L2 and refcount block caches (cache.ts);
 *   - the sets of host clusters that hold L2 tables and refcount blocks, for
 *     the overlap checks (overlap.ts) without walking the tables;
 *   - in-flight writes: allocations not yet linked into their L2 table, and
 *     in-place writes, so that a request touching the same guest clusters
 *     waits for them (QEMU's l2meta dependencies).
 *
 * Invariants while the lock is not held: every L1 entry points at an L2
 * table in `l2Tables`; every reftable entry at a block in `refblocks`;
 * refcounts in the cache or on disk are at least the number of references
 * on disk (refcounts go up before a reference is written, down after it is
 * gone), unless the dirty bit is set (lazy refcounts).
 */
import type { BdrvChild, BlockNode } from '../../block/node.js';
import type { BlockGraph } from '../../block/graph.js';
import type { MetadataCache } from './cache.js';
import type { Qcow2Geometry } from './format.js';
import type { Qcow2HeaderCluster } from './header.js';
import type { ImageLock } from './lock.js';
import type { SnapshotExtents } from './snapshots.js';
import type { DirBitmap } from './check-bitmaps.js';

/** Why a cluster is freed (qcow2_discard_type): decides whether the file gets a discard. */
export const DiscardType = { NEVER: 0, ALWAYS: 1, REQUEST: 2, SNAPSHOT: 3, OTHER: 4 } as const;
export type DiscardTypeValue = (typeof DiscardType)[keyof typeof DiscardType];

/** Runtime options (blockdev keys), resolved at open. */
export interface Qcow2Options {
  lazyRefcounts: boolean;
  /** Indexed by DiscardType. */
  passDiscard: readonly boolean[];
  /** Overlap checks to run (OverlapCheck bits). */
  overlapMask: number;
  l2CacheEntries: number;
  refcountCacheEntries: number;
}

/** Where the copy-on-write data of a partial cluster comes from. */
export type CowSource =
  | { kind: 'zero' }
  | { kind: 'backing' }
  | { kind: 'host'; hostOffset: number }
  | { kind: 'compressed'; hi: number; lo: number };

/**
 * A write in flight that other requests may wait for. `done` is set when it
 * completes, so a waiter that finds it only after it completed (the finder
 * released the lock, then awaited) does not wait forever.
 */
export interface InFlight {
  waiters: Array<() => void> | null;
  done?: boolean;
}

/**
 * An allocation in flight (QEMU's QCowL2Meta): host clusters reserved for
 * guest clusters whose L2 entries are updated once the data is written.
 */
export interface Allocation extends InFlight {
  /** Guest offset of the first cluster. */
  guestOffset: number;
  clusters: number;
  /** Host offset of the first cluster. */
  hostOffset: number;
  /** The host clusters were already this range's (preallocated zero clusters): do not free the old ones. */
  keepOld: boolean;
  /** Bytes before the write in the first cluster, to copy. */
  cowStartBytes: number;
  /** Where, from `guestOffset`, the tail to copy begins, and its length. */
  cowEndOffset: number;
  cowEndBytes: number;
  cowStart: CowSource;
  cowEnd: CowSource;
}

/** An in-place write in flight, by guest clusters [first, end). */
export interface InplaceWrite extends InFlight {
  firstCluster: number;
  endCluster: number;
}

export interface Qcow2State {
  readonly node: BlockNode;
  readonly graph: BlockGraph;
  readonly file: BdrvChild;
  /** The node's backing edge as the graph has it now (stream, commit and drive-mirror change it after open). */
  readonly backing: BdrvChild | null;
  readonly geometry: Qcow2Geometry;
  readonly clusterBytes: number;
  /** The header cluster, kept current. */
  readonly image: Qcow2HeaderCluster;
  l1: Uint8Array;
  l1View: DataView;
  /** Refcount block offsets by refcount table index (0: none). */
  reftable: Float64Array;
  /** Highest reftable index in use (-1: none). */
  maxReftableIndex: number;
  readonly l2Cache: MetadataCache;
  readonly refcountCache: MetadataCache;
  readonly lock: ImageLock;
  readonly opts: Qcow2Options;
  /** Writes allowed (the node is read-write); switched by reopen.ts. */
  writable: boolean;
  /** False once a fatal corruption was signalled (QEMU sets bs->drv = NULL). */
  usable: boolean;
  corruptionSignalled: boolean;
  /** The first free cluster may be at or after this index. */
  freeClusterIndex: number;
  /**
   * Where the next compressed cluster may be packed (QEMU's free_byte_offset):
   * inside a host cluster that compressed data partly fills; 0: none.
   */
  freeByteOffset: number;
  readonly allocations: Set<Allocation>;
  readonly inplace: Set<InplaceWrite>;
  /** Freed clusters waiting to be discarded in the file. */
  discards: Array<{ offset: number; bytes: number }>;
  /** Collect discards instead of issuing them (during zero/discard of many clusters). */
  cacheDiscards: boolean;
  /** Host offsets of the active L2 tables and of the refcount blocks. */
  readonly l2Tables: Set<number>;
  readonly refblocks: Set<number>;
  snapshots: SnapshotExtents;
  /** L2 tables of internal snapshots, for the "all" overlap checks (read at open when asked for). */
  inactiveL2Tables: Set<number> | null;
  /** qcow2_detect_metadata_preallocation's verdict, once asked. */
  metadataPreallocation: boolean | null;
  /** The last decompressed cluster, by its descriptor. */
  compressedCache: { hi: number; lo: number; data: Uint8Array } | null;
  /** Spare buffers for assembling allocating writes (see io.ts), so they are not garbage per write. */
  readonly assembly: Uint8Array[];
  /** The persistent bitmap directory as on disk (bitmap-dir.ts; absent or empty: none). */
  bitmapDirectory?: DirBitmap[];
  /** Prints a warning the way QEMU's tools do (verbatim: as is, no prefix). */
  warn(message: string, verbatim?: boolean): void;
}

export function stateOf(node: BlockNode): Qcow2State {
  return node.opaque as Qcow2State;
}
