/*
 * Changing the refcount width of an open image (QEMU's
 * qcow2_change_refcount_order, for qemu-img amend -o refcount_bits=N).
 *
 * A new refcount table and new refcount blocks of the new width are built
 * next to the old ones, which stay in charge until the header switches:
 *
 *   1. Allocation walks. Every new block that will hold a non-zero refcount
 *      gets a cluster (allocated through the old structures, so the old
 *      refcounts grow as we go), and the new table grows to cover it, in
 *      whole clusters of entries. After a walk that allocated anything, the
 *      new table's clusters are (re)allocated at its current size and the
 *      walk runs again, since those allocations changed refcounts too. A
 *      walk that allocates nothing ends the loop: the new structures now
 *      count themselves. A refcount that does not fit the new width stops
 *      everything ("Cannot decrease refcount entry width …").
 *   2. The new blocks are written with the old refcounts converted, then
 *      the new table; the refcount cache and the file are flushed.
 *   3. The header switches (refcount_order, refcount table offset and
 *      size, all in its first sector) in one write, flushed.
 *   4. The old blocks and the old table are freed through the new
 *      structures.
 * A crash before step 3 leaves the old structures valid, the new ones
 * leaked; after it, the new ones valid, the old ones leaked. On an error
 * before the switch the new clusters are freed again.
 *
 * Cost: the walks visit new blocks, and read only the old blocks that
 * exist; an old table entry without a block is a run of zero refcounts and
 * costs one test. Memory: the new table (at most 8 MiB, QEMU's limit) and
 * one block.
 *
 * The layout is QEMU's: same allocation order, same table sizes, so the
 * result is the file qemu-img amend writes. Failures of a step say which,
 * in QEMU's words ("Failed to write refblock: No space left on device").
 */
import { BlockError } from '../../block/errors.js';
import { hex } from './cursor.js';
import { Limits, Qcow2Geometry, REFTABLE_ENTRY_BYTES } from './format.js';
import { flushFile, signalCorruption, updateHeader, writeFile } from './header-io.js';
import { overlapCheck } from './overlap.js';
import { allocClusters, codecOf, freeClusters, refcountCodec } from './refcount.js';
import { encodeReftable, lastUsedIndex } from './refcount-grow.js';
import { withErrno } from './failure-words.js';
import { DiscardType, type Qcow2State } from './state.js';

/** QCOW_MAX_REFTABLE_SIZE in entries. */
const MAX_REFTABLE_ENTRIES = Limits.MAX_REFTABLE_BYTES / REFTABLE_ENTRY_BYTES;

/** Reports progress: `done` of `total` units. */
export type ProgressReport = (done: number, total: number) => void;

/** The structures being built. */
interface NewRefcounts {
  geometry: Qcow2Geometry;
  /** Block offsets by new table index (0: none). */
  table: Float64Array;
  /** Where the new table is allocated (0: not yet), and for how many entries. */
  tableOffset: number;
  tableEntries: number;
}

/** qcow2_change_refcount_order (lock held; v3 only). See the note at the top. */
export async function changeRefcountOrder(s: Qcow2State, order: number, progress: ProgressReport): Promise<void> {
  const plan: NewRefcounts = { geometry: new Qcow2Geometry(s.geometry.clusterBits, order), table: new Float64Array(0), tableOffset: 0, tableEntries: 0 };
  let old: OldRefcounts;
  try {
    let walk = 0;
    for (;;) {
      const totalWalks = Math.max(walk + 2, 3);
      const allocated = await allocationWalk(s, plan, (done, total) => progress(walk * total + done, totalWalks * total));
      walk++;
      if (!allocated) break;
      if (plan.tableOffset) await freeClusters(s, plan.tableOffset, plan.tableEntries * REFTABLE_ENTRY_BYTES, DiscardType.NEVER);
      plan.tableOffset = 0;
      const tableClusters = s.geometry.clustersFor(plan.table.length * REFTABLE_ENTRY_BYTES);
      plan.tableOffset = await withErrno('Failed to allocate the new reftable', () => allocClusters(s, tableClusters));
      plan.tableEntries = plan.table.length;
    }
    await writeNewStructures(s, plan, (done, total) => progress(walk * total + done, (walk + 1) * total));
    old = await switchHeader(s, plan);
  } catch (e) {
    await freeNew(s, plan);
    throw e;
  }
  for (const offset of old.table) if (offset) await freeClusters(s, offset, s.clusterBytes, DiscardType.OTHER);
  await freeClusters(s, old.offset, old.clusters * s.clusterBytes, DiscardType.OTHER);
}

/** New blocks cover the clusters the old table can count (QEMU walks the whole old table). */
function newBlockCount(s: Qcow2State, plan: NewRefcounts): number {
  return Math.ceil((s.reftable.length * s.geometry.refcountBlockEntries) / plan.geometry.refcountBlockEntries);
}

/**
 * One allocation walk: gives every non-empty new block a cluster and the
 * table room for it. Returns whether anything was allocated.
 */
async function allocationWalk(s: Qcow2State, plan: NewRefcounts, progress: ProgressReport): Promise<boolean> {
  let allocated = false;
  const blocks = newBlockCount(s, plan);
  for (let j = 0; j < blocks; j++) {
    progress(j, blocks);
    if (!(await newBlockInUse(s, plan, j))) continue;
    if (j >= plan.table.length) growTable(s, plan, j);
    if (plan.table[j]) continue;
    plan.table[j] = await withErrno('Failed to allocate refblock', () => allocClusters(s, 1));
    allocated = true;
  }
  progress(blocks, blocks);
  return allocated;
}

/** Grows the new table (whole clusters of entries) to hold index `j`. */
function growTable(s: Qcow2State, plan: NewRefcounts, j: number): void {
  const perCluster = s.clusterBytes / REFTABLE_ENTRY_BYTES;
  const entries = Math.ceil((j + 1) / perCluster) * perCluster;
  if (entries > MAX_REFTABLE_ENTRIES) {
    throw new BlockError('ENOTSUP', 'This operation would make the refcount table grow beyond the maximum size supported by QEMU, aborting');
  }
  const table = new Float64Array(entries);
  table.set(plan.table);
  plan.table = table;
}

/**
 * Calls `each(cluster, refcount)` for the clusters new block `j` covers
 * that the old structures count (old blocks that do not exist are skipped).
 * `each` returning true stops the walk; so does this function's result.
 */
async function forEachOldRefcount(s: Qcow2State, plan: NewRefcounts, j: number, each: (cluster: number, refcount: number) => boolean) {
  const oldE = s.geometry.refcountBlockEntries;
  const first = j * plan.geometry.refcountBlockEntries;
  const end = Math.min(first + plan.geometry.refcountBlockEntries, s.reftable.length * oldE);
  const codec = codecOf(s);
  for (let t = Math.floor(first / oldE); t * oldE < end; t++) {
    const blockOffset = s.reftable[t]!;
    if (!blockOffset) continue;
    if (blockOffset % s.clusterBytes !== 0) {
      await signalCorruption(s, true, `Refblock offset ${hex(blockOffset)} unaligned (reftable index: ${hex(t)})`);
      throw new BlockError('EIO', 'Image is corrupt (unaligned refblock offset)');
    }
    const entry = await withErrno('Failed to retrieve refblock', () => s.refcountCache.get(blockOffset));
    try {
      for (let c = Math.max(first, t * oldE); c < Math.min(end, (t + 1) * oldE); c++) {
        if (each(c, codec.get(entry.view, c - t * oldE))) return true;
      }
    } finally {
      s.refcountCache.release(entry);
    }
  }
  return false;
}

/** Whether new block `j` holds a non-zero refcount; refuses refcounts the new width cannot hold. */
async function newBlockInUse(s: Qcow2State, plan: NewRefcounts, j: number): Promise<boolean> {
  let inUse = false;
  let tooBig: { cluster: number; refcount: number } | null = null;
  await forEachOldRefcount(s, plan, j, (cluster, refcount) => {
    if (refcount > plan.geometry.refcountMax) tooBig = { cluster, refcount };
    inUse ||= refcount !== 0;
    return tooBig !== null;
  });
  if (tooBig !== null) {
    const { cluster, refcount } = tooBig as { cluster: number; refcount: number };
    throw new BlockError(
      'EINVAL',
      `Cannot decrease refcount entry width to ${plan.geometry.refcountBits} bits: ` +
        `Cluster at offset ${hex(cluster * s.clusterBytes)} has a refcount of ${refcount}`,
    );
  }
  return inUse;
}

/** Writes every new block (old refcounts converted), then the new table; flushes. */
async function writeNewStructures(s: Qcow2State, plan: NewRefcounts, progress: ProgressReport): Promise<void> {
  const codec = refcountCodec(plan.geometry.refcountOrder);
  const newE = plan.geometry.refcountBlockEntries;
  const blocks = newBlockCount(s, plan);
  for (let j = 0; j < blocks; j++) {
    progress(j, blocks);
    const blockOffset = j < plan.table.length ? plan.table[j]! : 0;
    if (!blockOffset) continue;
    const block = new Uint8Array(s.clusterBytes);
    const view = new DataView(block.buffer);
    await forEachOldRefcount(s, plan, j, (cluster, refcount) => {
      if (refcount !== 0) codec.set(view, cluster - j * newE, refcount);
      return false;
    });
    await withErrno('Overlap check failed', () => overlapCheck(s, 0, blockOffset, s.clusterBytes));
    await withErrno('Failed to write refblock', () => writeFile(s, blockOffset, block));
  }
  progress(blocks, blocks);
  const table = encodeReftable(plan.table);
  await withErrno('Overlap check failed', () => overlapCheck(s, 0, plan.tableOffset, table.length));
  await withErrno('Failed to write the new reftable', () => writeFile(s, plan.tableOffset, table));
  await withErrno('Failed to flush the refblock cache', () => s.refcountCache.flush());
}

/** The structures the header pointed at before the switch. */
interface OldRefcounts {
  table: Float64Array;
  offset: number;
  clusters: number;
}

/**
 * Points the header at the new structures (its fields all lie in the first
 * sector: one write, flushed), then the state; returns the old structures.
 */
async function switchHeader(s: Qcow2State, plan: NewRefcounts): Promise<OldRefcounts> {
  const h = s.image.header;
  const old = { table: s.reftable, offset: h.refcountTableOffset, clusters: h.refcountTableClusters };
  const saved = { refcountOrder: h.refcountOrder, refcountTableOffset: h.refcountTableOffset, refcountTableClusters: h.refcountTableClusters };
  Object.assign(h, {
    refcountOrder: plan.geometry.refcountOrder,
    refcountTableOffset: plan.tableOffset,
    refcountTableClusters: (plan.table.length * REFTABLE_ENTRY_BYTES) / s.clusterBytes,
  });
  try {
    await withErrno('Failed to update the qcow2 header', async () => {
      await updateHeader(s);
      await flushFile(s);
    });
  } catch (e) {
    Object.assign(h, saved);
    throw e;
  }
  await s.refcountCache.empty();
  // The geometry is fixed for the life of a node except here: the refcount width changes.
  (s as { geometry: Qcow2Geometry }).geometry = plan.geometry;
  s.reftable = plan.table;
  s.maxReftableIndex = lastUsedIndex(plan.table);
  s.refblocks.clear();
  for (const offset of plan.table) if (offset) s.refblocks.add(offset);
  s.freeClusterIndex = 0;
  plan.table = new Float64Array(0);
  plan.tableOffset = 0;
  return old;
}

/** Frees the new structures after a failure before the switch (through the old ones). */
async function freeNew(s: Qcow2State, plan: NewRefcounts): Promise<void> {
  for (const offset of plan.table) if (offset) await freeClusters(s, offset, s.clusterBytes, DiscardType.OTHER);
  if (plan.tableOffset) await freeClusters(s, plan.tableOffset, plan.tableEntries * REFTABLE_ENTRY_BYTES, DiscardType.OTHER);
}
