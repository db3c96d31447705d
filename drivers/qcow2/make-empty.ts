/*
 * Emptying a qcow2 image (QEMU's qcow2_make_empty): every guest cluster
 * becomes unallocated, so the image reads through to its backing file.
 * qemu-img commit does this to the top image once its data is in the base.
 *
 * Two ways, as in QEMU 7.2:
 *
 * Reset (make_completely_empty), for v3 images without internal snapshots
 * or persistent bitmaps whose new layout fits one refcount block. The file
 * is rebuilt as header, refcount table, refcount block, empty L1 table and
 * nothing else:
 *   1. both metadata caches are written back and emptied; the dirty bit is
 *      set (synced): from here the refcounts on disk are not to be trusted,
 *      and a crash leaves an image the next read-write open (or `qemu-img
 *      check -r all`) repairs;
 *   2. the old L1 table is zeroed, then clusters 1 .. 2 + L1 clusters;
 *   3. the header's L1 and refcount table locations switch in one synced
 *      20-byte write (L1 at cluster 3, the table at cluster 1, one cluster);
 *   4. the table's first entry points at cluster 2 (synced), and clusters
 *      0 .. 2 + L1 clusters are allocated through the ordinary allocator,
 *      which must hand out cluster 0 first;
 *   5. the caches are flushed and the dirty bit cleared (qcow2_mark_clean,
 *      which rewrites cluster 0), then the file is cut after the L1 table.
 * Whatever point a crash stops at, the guest sees either the old mapping
 * or an empty one (the L1 table is zeroed before anything else goes), and
 * after qemu-img commit both read the same data. A failure between 2 and 4
 * makes the node unusable (QEMU ejects it); the dirty bit stays set.
 *
 * Discard (the fallback, any image): every allocated cluster of the active
 * L1 table is discarded in full (entries become unallocated, not zero),
 * reason "snapshot", so pass-discard-snapshot decides whether the file gets
 * a discard. Unlike QEMU, L1 entries without an L2 table are skipped rather
 * than given a fresh empty table: the result reads the same, the cost grows
 * with the allocated tables rather than with the virtual size, and no
 * metadata is written for nothing.
 */
import { BlockError } from '../../block/errors.js';
import { pwriteZeroes, truncate } from '../../block/io.js';
import type { BlockNode } from '../../block/node.js';
import { ByteWriter } from './cursor.js';
import { CryptMethod, Incompat, L1_ENTRY_BYTES, Qcow2Version } from './format.js';
import { checkUsable, markClean, markDirty, pwriteSync } from './header-io.js';
import { l1Offset } from './l2.js';
import { allocClusters } from './refcount.js';
import { DiscardType, stateOf, type Qcow2State } from './state.js';
import { discardClusters } from './zero.js';

/** Byte offset of l1_table_offset in the header; refcount_table_offset and _clusters follow it. */
const L1_OFFSET_FIELD = 40;
/** l1_table_offset (u64), refcount_table_offset (u64), refcount_table_clusters (u32). */
const LOCATION_FIELDS_BYTES = 20;
/** Clusters before the L1 table in the reset layout: header, refcount table, refcount block. */
const RESET_CLUSTERS_BEFORE_L1 = 3;

export async function makeEmpty(node: BlockNode): Promise<void> {
  const s = stateOf(node);
  checkUsable(s);
  if (!s.writable) throw new BlockError('EPERM', 'qcow2: the image is read-only');
  if (canReset(s)) await s.lock.run(() => resetImage(s));
  else await discardAll(s, node.totalBytes);
}

function l1Clusters(s: Qcow2State): number {
  return Math.ceil((s.image.header.l1Entries * L1_ENTRY_BYTES) / s.clusterBytes);
}

/** The conditions of QEMU's qcow2_make_empty for make_completely_empty. */
function canReset(s: Qcow2State): boolean {
  const h = s.image.header;
  return (
    h.version >= Qcow2Version.V3 &&
    h.snapshotCount === 0 &&
    s.image.extensions.bitmaps === null &&
    RESET_CLUSTERS_BEFORE_L1 + l1Clusters(s) <= s.geometry.refcountBlockEntries &&
    h.cryptMethod !== CryptMethod.LUKS &&
    !(h.incompatibleFeatures & Incompat.DATA_FILE)
  );
}

/** make_completely_empty (see the note at the top); lock held. */
async function resetImage(s: Qcow2State): Promise<void> {
  if (s.allocations.size > 0 || s.inplace.size > 0) throw new BlockError('EBUSY', 'qcow2: writes in flight while emptying the image');
  const c = s.clusterBytes;
  const l1Bytes = l1Clusters(s) * c;
  await s.l2Cache.empty();
  await s.refcountCache.empty();
  await markDirty(s);
  try {
    if (l1Bytes > 0) await pwriteZeroes(s.file, s.image.header.l1TableOffset, l1Bytes);
    s.l1.fill(0);
    await pwriteZeroes(s.file, c, (RESET_CLUSTERS_BEFORE_L1 - 1) * c + l1Bytes);
    await switchLocations(s, RESET_CLUSTERS_BEFORE_L1 * c, c);
    const firstRefblock = new Uint8Array(8);
    new ByteWriter(firstRefblock).u64(2 * c);
    await pwriteSync(s, c, firstRefblock);
    s.reftable[0] = 2 * c;
    s.refblocks.add(2 * c);
    s.maxReftableIndex = 0;
    s.freeClusterIndex = 0;
    const at = await allocClusters(s, RESET_CLUSTERS_BEFORE_L1 + l1Clusters(s));
    if (at !== 0) throw new BlockError('EIO', 'First cluster in emptied image is in use');
  } catch (e) {
    s.usable = false;
    throw e;
  }
  await markClean(s);
  await truncate(s.file, RESET_CLUSTERS_BEFORE_L1 * c + l1Bytes, false, 'off');
}

/** Points the header at the new L1 table and a one-cluster refcount table (one synced write), and the state with it. */
async function switchLocations(s: Qcow2State, l1TableOffset: number, reftableOffset: number): Promise<void> {
  const fields = new Uint8Array(LOCATION_FIELDS_BYTES);
  new ByteWriter(fields).u64(l1TableOffset).u64(reftableOffset).u32(1);
  await pwriteSync(s, L1_OFFSET_FIELD, fields);
  Object.assign(s.image.header, { l1TableOffset, refcountTableOffset: reftableOffset, refcountTableClusters: 1 });
  s.reftable = new Float64Array(s.clusterBytes / 8);
  s.refblocks.clear();
  s.l2Tables.clear();
  s.metadataPreallocation = null;
  s.compressedCache = null;
  s.freeByteOffset = 0;
}

/** The fallback: full discard of every L2 table's range, table by table (see the note at the top). */
async function discardAll(s: Qcow2State, totalBytes: number): Promise<void> {
  const coverage = s.geometry.l2CoverageBytes;
  for (let i = 0; i < s.image.header.l1Entries && i * coverage < totalBytes; i++) {
    if (l1Offset(s, i) === 0) continue;
    const start = i * coverage;
    await discardClusters(s, start, Math.min(coverage, totalBytes - start), DiscardType.SNAPSHOT, true);
  }
}
