/*
 * Loading persistent bitmaps when a qcow2 image opens (QEMU 7.2's
 * qcow2_load_dirty_bitmaps, load_bitmap, load_bitmap_data), and the check
 * a resize makes first (qcow2_truncate_bitmaps_check).
 *
 * Every bitmap of the directory becomes a persistent DirtyBitmap on the
 * node, in directory order (so the node's list, newest first, holds them
 * reversed, as QEMU's does):
 *   - one marked in use on disk was not saved cleanly: it loads empty and
 *     inconsistent (disabled, only removal allowed);
 *   - any other loads its bits: each table entry is a cluster of bits, or
 *     all zeros / all ones without a cluster; it records when its `auto`
 *     flag is set. On a writable open it is then marked in use on disk
 *     (the directory rewritten in place), so that a crash before the next
 *     clean close leaves it inconsistent; read-only, the bitmaps are
 *     read-only too.
 * Failures refuse the open with QEMU's messages ("Could not read
 * bitmap_table table from image for bitmap 'B': …", "Could not read bitmap
 * 'B' from image: …", the directory's own); bitmaps made so far are
 * dropped. Cost: reading the table and the clusters that hold set bits.
 */
import { BlockError, strerror } from '../../block/errors.js';
import { preadv } from '../../block/io.js';
import { BitmapCheck, bitmapCheck, createDirtyBitmap, findDirtyBitmap, releaseDirtyBitmap, type DirtyBitmap } from '../../block/dirty-bitmap.js';
import { BmeFlag, imageLengthBytes, readBitmapTable, readDirectory, rewriteDirectoryInPlace, tableEntriesFor, tableEntryAt, type DirBitmap } from './bitmap-dir.js';
import type { Qcow2State } from './state.js';

/** qcow2_load_dirty_bitmaps: returns whether the header was rewritten (in-use flags set). */
export async function loadQcow2Bitmaps(s: Qcow2State): Promise<boolean> {
  s.bitmapDirectory = [];
  if (s.image.extensions.bitmaps === null) return false;
  const list = await readDirectory(s);
  s.bitmapDirectory = list.map((bm) => ({ ...bm }));
  const created: DirtyBitmap[] = [];
  try {
    const needsUpdate = await createBitmaps(s, list, created);
    if (!s.writable) for (const bm of created) bm.readOnly = true;
    if (!needsUpdate || !s.writable) return false;
    try {
      await rewriteDirectoryInPlace(s, list);
    } catch (e) {
      if (!(e instanceof BlockError)) throw e;
      throw new BlockError(e.code, `Can't update bitmap directory: ${strerror(e.code)}`, { cause: e });
    }
    return true;
  } catch (e) {
    for (const bm of created) releaseDirtyBitmap(s.node, bm);
    throw e;
  }
}

/** Creates the node's bitmaps for `list`, setting in-use flags in it; returns whether any flag changed. */
async function createBitmaps(s: Qcow2State, list: DirBitmap[], created: DirtyBitmap[]): Promise<boolean> {
  let needsUpdate = false;
  for (const entry of list) {
    const inUse = (entry.flags & BmeFlag.IN_USE) !== 0;
    // An in-use entry whose name is already loaded is an outdated copy (QEMU skips it).
    if (inUse && findDirtyBitmap(s.node, entry.name)) continue;
    const bm = await loadBitmap(s, entry, created);
    bm.persistent = true;
    if (inUse) {
      bm.inconsistent = true;
      bm.disabled = true;
    } else {
      entry.flags |= BmeFlag.IN_USE;
      needsUpdate = true;
    }
    if (!(entry.flags & BmeFlag.AUTO)) bm.disabled = true;
  }
  return needsUpdate;
}

/** load_bitmap: the bitmap, its bits read unless it is in use. */
async function loadBitmap(s: Qcow2State, entry: DirBitmap, created: DirtyBitmap[]): Promise<DirtyBitmap> {
  const bm = createDirtyBitmap(s.node, 2 ** entry.granularityBits, entry.name, imageLengthBytes(s));
  created.push(bm);
  if (entry.flags & BmeFlag.IN_USE) return bm;
  let table: Uint8Array;
  try {
    table = await readBitmapTable(s, entry);
  } catch (e) {
    if (!(e instanceof BlockError)) throw e;
    throw new BlockError(e.code, `Could not read bitmap_table table from image for bitmap '${entry.name}': ${strerror(e.code)}`, { cause: e });
  }
  try {
    await loadBitmapData(s, entry, table, bm);
  } catch (e) {
    if (!(e instanceof BlockError)) throw e;
    throw new BlockError(e.code, `Could not read bitmap '${entry.name}' from image: ${strerror(e.code)}`, { cause: e });
  }
  return bm;
}

/** load_bitmap_data: the table must have exactly the entries the bitmap's size needs. */
async function loadBitmapData(s: Qcow2State, entry: DirBitmap, table: Uint8Array, bm: DirtyBitmap): Promise<void> {
  if (tableEntriesFor(s, entry.granularityBits) !== entry.tableEntries) throw new BlockError('EINVAL');
  const coverage = bm.serializationCoverage(s.clusterBytes);
  const cluster = new Uint8Array(s.clusterBytes);
  for (let i = 0; i < entry.tableEntries; i++) {
    const offset = i * coverage;
    const bytes = Math.min(bm.sizeBytes - offset, coverage);
    const { offset: dataOffset, allOnes } = tableEntryAt(table, i);
    if (dataOffset === 0) {
      if (allOnes) bm.setDirty(offset, bytes);
      continue;
    }
    await preadv(s.file, dataOffset, cluster);
    bm.deserialize(offset, bytes, cluster);
  }
}

/**
 * qcow2_truncate_bitmaps_check: a resize needs every stored bitmap loaded
 * and modifiable (an inconsistent one refuses it), ENOTSUP otherwise.
 */
export async function truncateBitmapsCheck(s: Qcow2State): Promise<void> {
  if (s.image.extensions.bitmaps === null) return;
  for (const entry of await readDirectory(s)) {
    const bm = findDirtyBitmap(s.node, entry.name);
    if (!bm) throw new BlockError('ENOTSUP', 'Cannot resize qcow2 with persistent bitmaps that were not loaded into memory');
    const refusal = bitmapCheck(bm, BitmapCheck.DEFAULT);
    if (refusal) throw new BlockError('ENOTSUP', refusal.message);
  }
}
