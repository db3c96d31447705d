/*
 * Shrinking a qcow2 image (the shrink half of QEMU's qcow2_co_truncate:
 * qcow2_cluster_discard of the cropped range, qcow2_shrink_l1_table,
 * qcow2_shrink_reftable, then cutting the file after its last used
 * cluster). truncate.ts runs the steps in this order; each has its own
 * error text, as in QEMU.
 *
 *   1. The L2 table that holds the new end keeps its table; its entries
 *      past the new end (from the next cluster boundary) are discarded
 *      fully (zero.ts), freeing their clusters.
 *   2. L1 entries past the new end: the entries are zeroed on disk first
 *      (synced), then each dropped L2 table gives up one reference to every
 *      cluster it maps and to itself. For a table shared with a snapshot
 *      that is exactly what QEMU's copy-discard-free sequence leaves; for
 *      its own table it frees everything. Unallocated L1 entries cost
 *      nothing (QEMU allocates a table for each only to free it again, so
 *      its cost grows with the virtual size; ours with the data). The L1
 *      table keeps its size, as QEMU's does.
 *   3. Refcount blocks that count nothing but themselves are unhooked: the
 *      whole refcount table is rewritten (synced) without them, then each
 *      one's own refcount drops to 0 in the block counting it (which must
 *      say 1, else the image is corrupt) and the cluster is discarded.
 *   4. The file is cut after the last cluster with a refcount, found from
 *      the end by refcount block (blocks that do not exist are skipped
 *      whole). Failing to cut it is only a warning.
 * A crash between steps leaves the old size with less data past the new
 * end, and at worst leaked clusters: every reference disappears on disk
 * before the refcount it held.
 */
import { BlockError } from '../../block/errors.js';
import { truncate } from '../../block/io.js';
import { freeEntry } from './alloc.js';
import { hex } from './cursor.js';
import { L1_ENTRY_BYTES } from './format.js';
import { flushFile, pwriteSync, signalCorruption, writeFile } from './header-io.js';
import { l1Offset } from './l2.js';
import { OverlapCheck, overlapCheck } from './overlap.js';
import { codecOf, freeClusters, processDiscards } from './refcount.js';
import { encodeReftable, lastUsedIndex } from './refcount-grow.js';
import { DiscardType, type Qcow2State } from './state.js';
import { discardClusters } from './zero.js';
import { errnoError } from './failure-words.js';

/** Step 1: discards the clusters of the kept L2 table past the new end (takes the lock itself). */
export async function discardCropped(s: Qcow2State, newBytes: number, oldBytes: number): Promise<void> {
  const start = Math.ceil(newBytes / s.clusterBytes) * s.clusterBytes;
  const end = Math.min(oldBytes, s.geometry.l1EntriesFor(newBytes) * s.geometry.l2CoverageBytes);
  if (start >= end) return;
  try {
    await discardClusters(s, start, end - start, DiscardType.ALWAYS, true);
  } catch (e) {
    throw errnoError(e, 'Failed to discard cropped clusters');
  }
}

/** Step 2 (lock held): drops the L2 tables of L1 entries from `keepEntries` on. */
export async function dropL2Tables(s: Qcow2State, keepEntries: number): Promise<void> {
  const entries = s.image.header.l1Entries;
  if (keepEntries >= entries) return;
  const tables: number[] = [];
  for (let i = keepEntries; i < entries; i++) tables.push(l1Offset(s, i));
  try {
    const at = s.image.header.l1TableOffset + keepEntries * L1_ENTRY_BYTES;
    const bytes = (entries - keepEntries) * L1_ENTRY_BYTES;
    await overlapCheck(s, OverlapCheck.ACTIVE_L1, at, bytes);
    await writeFile(s, at, new Uint8Array(bytes));
    await flushFile(s);
  } catch (e) {
    s.l1.fill(0, keepEntries * L1_ENTRY_BYTES);
    throw errnoError(e, 'Failed to reduce the number of L2 tables');
  }
  s.l1.fill(0, keepEntries * L1_ENTRY_BYTES);
  s.cacheDiscards = true;
  try {
    for (const table of tables) if (table !== 0) await dropL2Table(s, table);
  } finally {
    s.cacheDiscards = false;
    await processDiscards(s);
  }
}

/** Drops one reference to every cluster an (unhooked) L2 table maps, then to the table. */
async function dropL2Table(s: Qcow2State, tableOffset: number): Promise<void> {
  if (tableOffset % s.clusterBytes !== 0) {
    await signalCorruption(s, false, `Cannot free unaligned cluster ${hex(tableOffset)}`);
    return;
  }
  const table = await s.l2Cache.get(tableOffset);
  const mapped: Array<[number, number]> = [];
  try {
    for (let i = 0; i < s.geometry.l2Entries; i++) {
      const hi = table.view.getUint32(i * 8);
      const lo = table.view.getUint32(i * 8 + 4);
      if (hi !== 0 || lo !== 0) mapped.push([hi, lo]);
    }
  } finally {
    s.l2Cache.release(table);
  }
  for (const [hi, lo] of mapped) await freeEntry(s, hi, lo, DiscardType.ALWAYS);
  s.l2Tables.delete(tableOffset);
  await freeClusters(s, tableOffset, s.clusterBytes, DiscardType.ALWAYS);
}

/** Whether the refcount block at reftable index `t` counts nothing but (maybe) itself. */
async function refblockUnused(s: Qcow2State, t: number, blockOffset: number): Promise<boolean> {
  const entry = await s.refcountCache.get(blockOffset);
  try {
    const copy = entry.data.slice();
    const self = blockOffset / s.clusterBytes;
    if (s.geometry.reftableIndex(self) === t) codecOf(s).set(new DataView(copy.buffer), s.geometry.refblockIndex(self), 0);
    return copy.every((byte) => byte === 0);
  } finally {
    s.refcountCache.release(entry);
  }
}

/** Step 3 (lock held): qcow2_shrink_reftable. */
export async function shrinkReftable(s: Qcow2State): Promise<void> {
  try {
    const kept = s.reftable.slice();
    for (let t = 0; t < kept.length; t++) {
      if (kept[t] && (await refblockUnused(s, t, kept[t]!))) kept[t] = 0;
    }
    await pwriteSync(s, s.image.header.refcountTableOffset, encodeReftable(kept));
    s.cacheDiscards = true;
    try {
      for (let t = 0; t < kept.length; t++) if (s.reftable[t] && !kept[t]) await unhookRefblock(s, t);
    } finally {
      s.cacheDiscards = false;
      await processDiscards(s);
    }
  } catch (e) {
    throw errnoError(e, 'Failed to discard unused refblocks');
  }
}

/** qcow2_discard_refcount_block for the block at reftable index `t`, then forgets it. */
async function unhookRefblock(s: Qcow2State, t: number): Promise<void> {
  const blockOffset = s.reftable[t]!;
  const self = blockOffset / s.clusterBytes;
  const covering = s.reftable[s.geometry.reftableIndex(self)] ?? 0;
  try {
    if (!covering) throw await signalCorruption(s, true, `Refblock at ${hex(blockOffset)} is not covered by the refcount structures`);
    const entry = await s.refcountCache.get(covering);
    try {
      const index = s.geometry.refblockIndex(self);
      const refcount = codecOf(s).get(entry.view, index);
      if (refcount !== 1) {
        const where = `refblock offset ${hex(covering)}, reftable index ${s.geometry.reftableIndex(self)}, block offset ${hex(blockOffset)}`;
        await signalCorruption(s, true, `Invalid refcount: ${where}, refcount ${hex(refcount)}`);
        throw new BlockError('EINVAL');
      }
      codecOf(s).set(entry.view, index, 0);
      s.refcountCache.markDirty(entry);
    } finally {
      s.refcountCache.release(entry);
    }
    s.freeClusterIndex = Math.min(s.freeClusterIndex, self);
    s.refcountCache.discard(blockOffset);
    s.discards.push({ offset: blockOffset, bytes: s.clusterBytes });
  } finally {
    s.reftable[t] = 0;
    s.refblocks.delete(blockOffset);
    s.maxReftableIndex = lastUsedIndex(s.reftable);
  }
}

/** qcow2_get_last_cluster: the last cluster of the first `fileBytes` with a refcount (blocks at a time). */
export async function lastUsedCluster(s: Qcow2State, fileBytes: number): Promise<number> {
  const e = s.geometry.refcountBlockEntries;
  const last = Math.ceil(fileBytes / s.clusterBytes) - 1;
  for (let t = s.geometry.reftableIndex(last); t >= 0; t--) {
    const blockOffset = t < s.reftable.length ? s.reftable[t]! : 0;
    if (!blockOffset) continue;
    const entry = await s.refcountCache.get(blockOffset);
    try {
      const codec = codecOf(s);
      for (let i = Math.min(e - 1, last - t * e); i >= 0; i--) if (codec.get(entry.view, i) !== 0) return t * e + i;
    } finally {
      s.refcountCache.release(entry);
    }
  }
  throw await signalCorruption(s, true, 'There are no references in the refcount table.');
}

/** Step 4 (lock held): cuts the file after its last used cluster; a failure is a warning. */
export async function cutFileTail(s: Qcow2State): Promise<void> {
  const fileBytes = s.file.node.totalBytes;
  let last: number;
  try {
    last = await lastUsedCluster(s, fileBytes);
  } catch (e) {
    throw errnoError(e, 'Failed to find the last cluster');
  }
  const endBytes = (last + 1) * s.clusterBytes;
  if (endBytes >= fileBytes) return;
  await truncate(s.file, endBytes, false, 'off').catch((e: unknown) => {
    s.warn(`Failed to truncate the tail of the image: ${e instanceof Error ? e.message : String(e)}`);
  });
}
