/*
 * Expanding zero clusters before a downgrade to compat=0.10, whose L2
 * entries have no zero flag (QEMU's qcow2_expand_zero_clusters).
 *
 * Every L2 table of the active L1 table and of each snapshot's L1 table is
 * visited (unallocated L1 entries are skipped, so the cost grows with the
 * tables that exist, not with the virtual size):
 *   - a plain zero cluster (no host cluster) becomes unallocated when the
 *     image has no backing file: it reads as zeroes either way; with a
 *     backing file it gets a new host cluster, counted once per reference
 *     to its L2 table, written with zeroes;
 *   - a preallocated zero cluster keeps its host cluster, which is written
 *     with zeroes, unless that cluster is also referenced from elsewhere (a
 *     snapshot's own L2 table): then it is left alone, the entry gets what
 *     a plain zero cluster gets, and the cluster loses the references that
 *     came through this table once the table stops pointing there (QEMU
 *     7.2 writes the zeroes into the shared cluster, destroying the
 *     snapshot's data, and leaves COPIED set on it);
 *   - both then become normal entries, with COPIED when the L2 table is
 *     referenced once.
 * Active tables change in the L2 cache, which flushes the file before it
 * writes them (the zeroes reach the disk before the entries that expose
 * them). The cache is then emptied, since snapshot L1 tables may point at
 * the same tables, and snapshot tables are read and written directly,
 * after a flush for the same reason.
 *
 * Progress counts L1 entries visited, over all the L1 tables.
 */
import { BlockError } from '../../block/errors.js';
import { preadv, pwriteZeroes } from '../../block/io.js';
import { hex } from './cursor.js';
import { L1_ENTRY_BYTES } from './format.js';
import { flushFile, signalCorruption, writeFile } from './header-io.js';
import { ClusterType, Entry, clusterType, entryOffset, l1Offset } from './l2.js';
import { OverlapCheck, overlapCheck } from './overlap.js';
import { allocClusters, freeClusters, getRefcount, updateRefcount } from './refcount.js';
import type { ProgressReport } from './refcount-order.js';
import { DiscardType, type Qcow2State } from './state.js';

/** Where the L2 tables of one L1 table are read and written. */
interface TableAccess {
  /** Runs `edit` on the table at `offset`; `edit` returns whether it changed it. */
  withTable(offset: number, edit: (view: DataView) => Promise<boolean>): Promise<void>;
}

/** qcow2_expand_zero_clusters (lock held). */
export async function expandZeroClusters(s: Qcow2State, progress: ProgressReport): Promise<void> {
  const snapshotL1s = s.snapshots.l1Tables;
  const total = s.image.header.l1Entries + snapshotL1s.reduce((sum, l1) => sum + l1.entries, 0);
  let visited = 0;
  const step = () => progress(++visited, total);
  const activeOffsets = Array.from({ length: s.image.header.l1Entries }, (_, i) => l1Offset(s, i));
  await expandL1(s, activeOffsets, cachedTables(s), step);
  await s.l2Cache.empty();
  for (const l1 of snapshotL1s) {
    const bytes = await readFile(s, l1.offset, l1.entries * L1_ENTRY_BYTES);
    const view = new DataView(bytes.buffer);
    const offsets = Array.from({ length: l1.entries }, (_, i) => entryOffset(view.getUint32(i * 8), view.getUint32(i * 8 + 4)));
    await expandL1(s, offsets, fileTables(s), step);
  }
}

async function readFile(s: Qcow2State, offsetBytes: number, bytes: number): Promise<Uint8Array> {
  const buf = new Uint8Array(bytes);
  await preadv(s.file, offsetBytes, buf);
  return buf;
}

/** Active L2 tables, through the L2 cache. */
function cachedTables(s: Qcow2State): TableAccess {
  return {
    async withTable(offset, edit) {
      const table = await s.l2Cache.get(offset);
      try {
        if (await edit(table.view)) s.l2Cache.markDirty(table);
      } finally {
        s.l2Cache.release(table);
      }
    },
  };
}

/** Snapshot L2 tables, read and written directly. */
function fileTables(s: Qcow2State): TableAccess {
  return {
    async withTable(offset, edit) {
      const data = await readFile(s, offset, s.clusterBytes);
      if (!(await edit(new DataView(data.buffer)))) return;
      await overlapCheck(s, OverlapCheck.INACTIVE_L2 | OverlapCheck.ACTIVE_L2, offset, data.length);
      await flushFile(s);
      await writeFile(s, offset, data);
    },
  };
}

/** expand_zero_clusters_in_l1 over the L2 table offsets of one L1 table. */
async function expandL1(s: Qcow2State, tableOffsets: readonly number[], access: TableAccess, step: () => void): Promise<void> {
  for (let i = 0; i < tableOffsets.length; i++) {
    const tableOffset = tableOffsets[i]!;
    if (tableOffset !== 0) {
      if (tableOffset % s.clusterBytes !== 0) {
        await signalCorruption(s, true, `L2 table offset ${hex(tableOffset)} unaligned (L1 index: ${hex(i)})`);
        throw new BlockError('EIO');
      }
      const tableRefcount = await getRefcount(s, tableOffset / s.clusterBytes);
      const released: number[] = [];
      await access.withTable(tableOffset, (view) => expandTable(s, tableOffset, view, tableRefcount, released));
      for (const host of released) await updateRefcount(s, host / s.clusterBytes, 1, tableRefcount, true, DiscardType.OTHER);
    }
    step();
  }
}

/** What becomes of one zero entry: unallocated, zeroes in place, or zeroes in a new cluster. */
type Expansion = 'unallocate' | 'in-place' | 'new-cluster';

/**
 * How to expand a zero entry of a table referenced `tableRefcount` times.
 * A preallocated cluster referenced from elsewhere too (a snapshot's own
 * L2 table: its refcount exceeds the table's) must not be written: it is
 * replaced like a plain zero cluster, and gives up the table's references.
 * (QEMU 7.2 writes zeroes into it, into the snapshot's data.)
 */
async function expansionOf(s: Qcow2State, type: number, host: number, tableRefcount: number): Promise<Expansion> {
  const shared = type === ClusterType.ZERO_ALLOC && host % s.clusterBytes === 0 && (await getRefcount(s, host / s.clusterBytes)) > tableRefcount;
  if (type === ClusterType.ZERO_ALLOC && !shared) return 'in-place';
  return s.backing ? 'new-cluster' : 'unallocate';
}

/**
 * Expands the zero entries of one L2 table in `view`; returns whether any
 * changed. Clusters the table must stop referencing are added to
 * `released` (dropped by the caller once the table no longer points there).
 */
async function expandTable(s: Qcow2State, tableOffset: number, view: DataView, tableRefcount: number, released: number[]): Promise<boolean> {
  let changed = false;
  for (let j = 0; j < s.geometry.l2Entries; j++) {
    const hi = view.getUint32(j * 8);
    const lo = view.getUint32(j * 8 + 4);
    const type = clusterType(hi, lo);
    if (type !== ClusterType.ZERO_PLAIN && type !== ClusterType.ZERO_ALLOC) continue;
    changed = true;
    const old = entryOffset(hi, lo);
    const expansion = await expansionOf(s, type, old, tableRefcount);
    if (type === ClusterType.ZERO_ALLOC && expansion !== 'in-place') released.push(old);
    if (expansion === 'unallocate') {
      view.setUint32(j * 8, 0);
      view.setUint32(j * 8 + 4, 0);
      continue;
    }
    const host = expansion === 'new-cluster' ? await newZeroCluster(s, tableRefcount) : old;
    try {
      await zeroCluster(s, tableOffset, j, host);
    } catch (e) {
      if (expansion === 'new-cluster') await freeClusters(s, host, s.clusterBytes, DiscardType.ALWAYS);
      throw e;
    }
    view.setUint32(j * 8, Math.floor(host / 2 ** 32) | (tableRefcount === 1 ? Entry.COPIED : 0));
    view.setUint32(j * 8 + 4, host % 2 ** 32);
  }
  return changed;
}

/** Writes zeroes over host cluster `host` (entry `index` of the table at `tableOffset` will map it). */
async function zeroCluster(s: Qcow2State, tableOffset: number, index: number, host: number): Promise<void> {
  if (host % s.clusterBytes !== 0) {
    const where = `L2 offset: ${hex(tableOffset)}, L2 index: ${hex(index)}`;
    await signalCorruption(s, true, `Cluster allocation offset ${hex(host)} unaligned (${where})`);
    throw new BlockError('EIO');
  }
  await overlapCheck(s, 0, host, s.clusterBytes);
  await pwriteZeroes(s.file, host, s.clusterBytes, 0);
  // The zeroes must be on disk before a cached table that exposes them (even one written mid-edit).
  s.l2Cache.dependsOnFlush = true;
}

/** A new host cluster for a plain zero cluster, counted once per reference to its L2 table. */
async function newZeroCluster(s: Qcow2State, tableRefcount: number): Promise<number> {
  const host = await allocClusters(s, 1);
  if (tableRefcount > 1) {
    try {
      while (!(await updateRefcount(s, host / s.clusterBytes, 1, tableRefcount - 1, false, DiscardType.OTHER))) {
        // A refcount block was created first; try again.
      }
    } catch (e) {
      await freeClusters(s, host, s.clusterBytes, DiscardType.OTHER);
      throw e;
    }
  }
  return host;
}
