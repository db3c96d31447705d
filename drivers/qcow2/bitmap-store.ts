/*
 * Storing persistent bitmaps in a qcow2 image, removing them, and saying
 * whether a new one could be stored (QEMU 7.2's qcow2-bitmap.c:
 * qcow2_store_persistent_dirty_bitmaps, store_bitmap[_data],
 * qcow2_co_remove_persistent_dirty_bitmap,
 * qcow2_co_can_store_new_dirty_bitmap). All of it runs with the image lock
 * held.
 *
 * Store (on close): the directory is read back from disk; every
 * persistent, consistent, writable bitmap of the node replaces its entry
 * (which must be marked in use: it was loaded by this open) or is
 * appended. Each is written afresh: one cluster of bits per
 * cluster_size * 8 granules that holds a dirty one (clean stretches get
 * no cluster), then its table; then a new directory, the header switched
 * to it, and only then the old tables, data and directory freed, so a
 * crash at any point leaves either the old or the new bitmaps on disk,
 * and refcounts that at worst leak. Entries are written with their `auto`
 * flag (recording) and without `in_use`. Inconsistent bitmaps keep their
 * in-use entry. The stored bitmaps are then released from the node (on
 * close; a read-only reopen keeps them, read-only).
 * Messages and limits are QEMU's; a failure loses the bitmaps (the caller
 * reports "Lost persistent bitmaps during inactivation of node …").
 *
 * A v2 image cannot hold bitmaps (no autoclear field): bitmaps loaded
 * before a downgrade (qemu-img amend -o compat=0.10, which frees their
 * clusters) are not stored.
 */
import { BlockError } from '../../block/errors.js';
import { findDirtyBitmap, releaseDirtyBitmap, type DirtyBitmap, type PersistentBitmapHooks } from '../../block/dirty-bitmap.js';
import type { BlockNode } from '../../block/node.js';
import { BME } from './check-bitmaps.js';
import {
  BmeFlag,
  bitmapConstraintReason,
  dirEntryBytes,
  errnoMessage,
  freeBitmapClusters,
  readDirectory,
  replaceDirectory,
  tableEntriesFor,
  type DirBitmap,
  type TablePlace,
} from './bitmap-dir.js';
import { Limits, Qcow2Version, TABLE_ENTRY_BYTES } from './format.js';
import { writeFile } from './header-io.js';
import { overlapCheck } from './overlap.js';
import { allocClusters, freeClusters } from './refcount.js';
import { DiscardType, stateOf, type Qcow2State } from './state.js';

/** A directory entry on its way to disk, with the bitmap that fills it. */
interface StoreEntry extends DirBitmap {
  bitmap: DirtyBitmap | null;
}

/**
 * qcow2_store_persistent_dirty_bitmaps (lock held): with `release` (close)
 * the stored bitmaps leave the node; without (a read-only reopen) they stay.
 */
export async function storeQcow2Bitmaps(s: Qcow2State, release = true): Promise<void> {
  if (s.image.header.version < Qcow2Version.V3) return;
  const list: StoreEntry[] = (await readDirectory(s)).map((e) => ({ ...e, bitmap: null }));
  const dropTables = collectEntries(s, list);
  if (dropTables !== null) {
    if (!s.writable) throw new BlockError('EACCES', 'No write access');
    await writeBitmaps(s, list);
    for (const table of dropTables) await freeBitmapClusters(s, table);
  }
  if (release) for (const entry of list) if (entry.bitmap) releaseDirtyBitmap(s.node, entry.bitmap);
}

/**
 * Matches the node's bitmaps with the directory entries, adding entries
 * for new ones; returns the old tables to drop once the new directory is
 * in place, or null when no bitmap needs writing.
 */
function collectEntries(s: Qcow2State, list: StoreEntry[]): TablePlace[] | null {
  const dropTables: TablePlace[] = [];
  let needWrite = false;
  let dirBytes = s.image.extensions.bitmaps?.directoryBytes ?? 0;
  let count = list.length;
  const byName = new Map(list.map((e) => [e.name, e]));
  for (const bm of s.node.dirtyBitmaps) {
    if (!bm.persistent || bm.inconsistent) continue;
    const name = bm.name!;
    let entry = byName.get(name);
    if (bm.readOnly) {
      if (entry) entry.bitmap = bm;
      continue;
    }
    needWrite = true;
    const reason = bitmapConstraintReason(s, name, bm.granularityBytes);
    if (reason) throw new BlockError('EINVAL', `Bitmap '${name}' doesn't satisfy the constraints: ${reason}`);
    if (!entry) {
      if (++count > Limits.MAX_BITMAPS) throw new BlockError('EINVAL', 'Too many persistent bitmaps');
      dirBytes += dirEntryBytes(name);
      if (dirBytes > Limits.MAX_BITMAP_DIRECTORY_BYTES) throw new BlockError('EINVAL', 'Bitmap directory is too large');
      entry = { name, tableOffset: 0, tableEntries: 0, flags: 0, granularityBits: bm.granularityBits, bitmap: null };
      list.push(entry);
      byName.set(name, entry);
    } else {
      if (!(entry.flags & BmeFlag.IN_USE)) throw new BlockError('EEXIST', `Bitmap '${name}' already exists in the image`);
      dropTables.push({ tableOffset: entry.tableOffset, tableEntries: entry.tableEntries });
      entry.tableOffset = 0;
      entry.tableEntries = 0;
    }
    entry.flags = bm.disabled ? 0 : BmeFlag.AUTO;
    entry.granularityBits = bm.granularityBits;
    entry.bitmap = bm;
  }
  return needWrite ? dropTables : null;
}

/** Writes every writable bitmap of `list`, then the directory; on failure frees what was written. */
async function writeBitmaps(s: Qcow2State, list: StoreEntry[]): Promise<void> {
  try {
    for (const entry of list) if (entry.bitmap && !entry.bitmap.readOnly) await storeBitmap(s, entry, entry.bitmap);
    try {
      await replaceDirectory(s, list.map(({ bitmap: _bitmap, ...entry }) => entry));
    } catch (e) {
      throw errnoMessage('Failed to update bitmap extension', e);
    }
  } catch (e) {
    for (const entry of list) {
      if (entry.bitmap && !entry.bitmap.readOnly && entry.tableOffset !== 0) await freeBitmapClusters(s, entry);
    }
    throw e;
  }
}

/** store_bitmap: the bits, then the table; `entry` gets the table's place. */
async function storeBitmap(s: Qcow2State, entry: StoreEntry, bm: DirtyBitmap): Promise<void> {
  const name = bm.name!;
  const tableEntries = tableEntriesFor(s, bm.granularityBits, bm.sizeBytes);
  if (tableEntries > BME.MAX_TABLE_SIZE || tableEntries * s.clusterBytes > BME.MAX_PHYS_SIZE) {
    throw new BlockError('EINVAL', `Bitmap '${name}' is too big`);
  }
  // An empty image needs no table: QEMU's allocation of zero entries fails, and so does the store.
  if (tableEntries === 0) throw new BlockError('ENOMEM', 'No memory');
  const table = new Uint8Array(tableEntries * TABLE_ENTRY_BYTES);
  const dataClusters: number[] = [];
  let tableOffset = 0;
  try {
    await storeBitmapData(s, bm, table, dataClusters);
    tableOffset = await allocOrFail(s, Math.ceil(table.length / s.clusterBytes), name);
    await checkedWrite(s, tableOffset, table, name);
  } catch (e) {
    for (const offset of dataClusters) await freeClusters(s, offset, s.clusterBytes, DiscardType.ALWAYS);
    if (tableOffset !== 0) await freeClusters(s, tableOffset, table.length, DiscardType.OTHER);
    throw e;
  }
  entry.tableOffset = tableOffset;
  entry.tableEntries = tableEntries;
}

/** store_bitmap_data: one cluster per stretch of bits holding a dirty one, its offset in `table`. */
async function storeBitmapData(s: Qcow2State, bm: DirtyBitmap, table: Uint8Array, dataClusters: number[]): Promise<void> {
  const view = new DataView(table.buffer);
  const coverage = bm.serializationCoverage(s.clusterBytes);
  const buf = new Uint8Array(s.clusterBytes);
  for (let dirty = bm.nextDirty(0); dirty >= 0; ) {
    const index = Math.floor(dirty / coverage);
    const start = index * coverage;
    const end = Math.min(bm.sizeBytes, start + coverage);
    const offset = await allocOrFail(s, 1, bm.name!);
    dataClusters.push(offset);
    view.setBigUint64(index * TABLE_ENTRY_BYTES, BigInt(offset));
    bm.serialize(start, end - start, buf);
    await checkedWrite(s, offset, buf, bm.name!);
    dirty = end < bm.sizeBytes ? bm.nextDirty(end) : -1;
  }
}

async function allocOrFail(s: Qcow2State, clusters: number, name: string): Promise<number> {
  try {
    return await allocClusters(s, clusters);
  } catch (e) {
    throw errnoMessage(`Failed to allocate clusters for bitmap '${name}'`, e);
  }
}

/** The overlap check, then the write, each with QEMU's message on failure. */
async function checkedWrite(s: Qcow2State, offset: number, data: Uint8Array, name: string): Promise<void> {
  try {
    await overlapCheck(s, 0, offset, data.length);
  } catch (e) {
    throw errnoMessage('Qcow2 overlap check failed', e);
  }
  try {
    await writeFile(s, offset, data);
  } catch (e) {
    throw errnoMessage(`Failed to write bitmap '${name}' to file`, e);
  }
}

/** qcow2_co_remove_persistent_dirty_bitmap: the entry and its clusters go; absence is no error. */
async function removeQcow2Bitmap(s: Qcow2State, name: string): Promise<void> {
  if (s.image.extensions.bitmaps === null) return;
  await s.lock.run(async () => {
    let list: DirBitmap[];
    try {
      list = await readDirectory(s);
    } catch (e) {
      if (!(e instanceof BlockError)) throw e;
      throw new BlockError('EIO', e.message, { cause: e });
    }
    const index = list.findIndex((e) => e.name === name);
    if (index < 0) return;
    const [removed] = list.splice(index, 1);
    try {
      await replaceDirectory(s, list);
    } catch (e) {
      throw errnoMessage('Failed to update bitmap extension', e);
    }
    await freeBitmapClusters(s, removed!);
  });
}

/** qcow2_co_can_store_new_dirty_bitmap: throws QEMU's refusal. */
function canStoreNewBitmap(node: BlockNode, name: string, granularityBytes: number): void {
  const s = stateOf(node);
  if (findDirtyBitmap(node, name)) throw new BlockError('EEXIST', `Bitmap already exists: ${name}`);
  const refuse = (reason: string) => new BlockError('EINVAL', `Can't make bitmap '${name}' persistent in '${node.nodeName}': ${reason}`);
  if (s.image.header.version < Qcow2Version.V3) throw refuse('Cannot store dirty bitmaps in qcow2 v2 files');
  const reason = bitmapConstraintReason(s, name, granularityBytes);
  if (reason) throw refuse(reason);
  const stored = node.dirtyBitmaps.filter((bm) => bm.persistent);
  if (stored.length + 1 > Limits.MAX_BITMAPS) throw refuse('Maximum number of persistent bitmaps is already reached');
  const dirBytes = stored.reduce((sum, bm) => sum + dirEntryBytes(bm.name!), dirEntryBytes(name));
  if (dirBytes > Limits.MAX_BITMAP_DIRECTORY_BYTES) throw refuse('Not enough space in the bitmap directory');
}

/** The qcow2 driver's persistent bitmap hooks (block/dirty-bitmap-ops.ts calls them). */
export const qcow2BitmapHooks: PersistentBitmapHooks = {
  supported: (node) => stateOf(node).image.header.version >= Qcow2Version.V3,
  canStore: async (node, name, granularityBytes) => canStoreNewBitmap(node, name, granularityBytes),
  remove: (node, name) => removeQcow2Bitmap(stateOf(node), name),
};
