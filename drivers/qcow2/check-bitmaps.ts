/*
 * Persistent dirty bitmaps as `qemu-img check` sees them (QEMU 7.2's
 * qcow2-bitmap.c: bitmap_list_load, check_dir_entry, bitmap_table_load,
 * check_table_entry, qcow2_check_bitmaps_refcounts, and the part of
 * qcow2_load_dirty_bitmaps that can refuse an image at open).
 *
 * Only a consistent bitmaps extension counts (autoclear bit 0 set: see
 * extensions.ts). The directory is a list of 8-byte aligned entries:
 *
 *     0  u64  bitmap_table_offset   cluster aligned, not 0
 *     8  u32  bitmap_table_size     entries, 1..BME_MAX_TABLE_SIZE
 *    12  u32  flags                 bit 0 in_use, bit 1 auto, others reserved
 *    16  u8   type                  1: dirty tracking
 *    17  u8   granularity_bits      9..31
 *    18  u16  name_size             ≤ 1023
 *    20  u32  extra_data_size       QEMU supports 0 only
 *    24  extra data, name, zero padding to a multiple of 8
 *
 * Bitmap table entries: bits 9–55 the offset of a data cluster; with
 * offset 0, bit 0 says all ones; bits 1–8 and 56–63 reserved.
 *
 * The check counts the directory, each bitmap table and each data cluster.
 * A directory that does not load, or a table with a bad entry, is a
 * corruption; a directory failure also ends the check (EINVAL), as in QEMU.
 * At open, QEMU loads every bitmap that is not in use, so a broken
 * directory or table refuses the image with QEMU's message.
 */
import { BlockError, strerror } from '../../block/errors.js';
import { CheckAbort, readAt } from './check-io.js';
import { incRefcounts, type Counting } from './check-imrt.js';
import type { CheckState } from './check-state.js';
import { ByteReader } from './cursor.js';
import { Limits, TABLE_ENTRY_BYTES } from './format.js';
import { readTableEntry } from './tables.js';

/** Bitmap directory entry constraints (qcow2-bitmap.c). */
export const BME = {
  MAX_TABLE_SIZE: 0x8000000,
  MAX_PHYS_SIZE: 0x20000000,
  MAX_GRANULARITY_BITS: 31,
  MIN_GRANULARITY_BITS: 9,
  MAX_NAME_SIZE: 1023,
  RESERVED_FLAGS: 0xfffffffc,
  FLAG_IN_USE: 0x1,
  TYPE_DIRTY_TRACKING: 1,
  TABLE_ENTRY_RESERVED_MASK: 0xff000000000001fen,
  TABLE_ENTRY_OFFSET_MASK: 0x00fffffffffffe00n,
  TABLE_ENTRY_ALL_ONES: 0x1n,
} as const;
const DIR_ENTRY_HEADER_BYTES = 24;

export interface DirBitmap {
  tableOffset: number;
  tableEntries: number;
  flags: number;
  granularityBits: number;
  name: string;
}

/** What reading the directory needs of the image (a CheckState, or an open image's parts). */
export type BitmapDirectorySource = Pick<CheckState, 'image' | 'file' | 'geometry' | 'header'>;

/** bitmap_list_load: the directory, or QEMU's message. */
export async function loadBitmapDirectory(s: BitmapDirectorySource): Promise<DirBitmap[] | string> {
  const ext = s.image.extensions.bitmaps!;
  if (ext.directoryBytes === 0) return 'Requested bitmap directory size is zero';
  if (ext.directoryBytes > Limits.MAX_BITMAP_DIRECTORY_BYTES) return 'Requested bitmap directory size is too big';
  const dir = new Uint8Array(ext.directoryBytes);
  try {
    await readAt(s.file, ext.directoryOffset, dir);
  } catch (e) {
    if (e instanceof BlockError) return `Failed to read bitmap directory: ${e.message}`;
    throw e;
  }
  const list: DirBitmap[] = [];
  let at = 0;
  while (at < dir.length) {
    if (at + DIR_ENTRY_HEADER_BYTES > dir.length) return 'Broken bitmap directory';
    if (list.length + 1 > ext.bitmapCount) return 'More bitmaps found than specified in header extension';
    const r = new ByteReader(dir, at);
    const entry = { tableOffset: r.u64(), tableEntries: r.u32(), flags: r.u32(), type: r.u8(), granularityBits: r.u8(), nameBytes: r.u16(), extraBytes: r.u32() };
    const next = at + Math.ceil((DIR_ENTRY_HEADER_BYTES + entry.nameBytes + entry.extraBytes) / 8) * 8;
    if (next > dir.length) return 'Broken bitmap directory';
    const nameAt = at + DIR_ENTRY_HEADER_BYTES + entry.extraBytes;
    const name = Buffer.from(dir.subarray(nameAt, nameAt + entry.nameBytes)).toString('utf8');
    if (entry.extraBytes !== 0) return 'Bitmap extra data is not supported';
    if (!dirEntryValid(s, entry)) return `Bitmap '${name.split('\0')[0]}' doesn't satisfy the constraints`;
    list.push({ tableOffset: Number(entry.tableOffset), tableEntries: entry.tableEntries, flags: entry.flags, granularityBits: entry.granularityBits, name });
    at = next;
  }
  if (list.length !== ext.bitmapCount) return 'Less bitmaps found than specified in header extension';
  return list;
}

interface RawDirEntry {
  tableOffset: bigint;
  tableEntries: number;
  flags: number;
  type: number;
  granularityBits: number;
  nameBytes: number;
}

/** check_dir_entry. */
function dirEntryValid(s: BitmapDirectorySource, e: RawDirEntry): boolean {
  const cs = BigInt(s.geometry.clusterBytes);
  if (e.tableEntries === 0 || e.tableOffset === 0n || e.tableOffset % cs !== 0n || e.tableEntries > BME.MAX_TABLE_SIZE) return false;
  if (e.granularityBits > BME.MAX_GRANULARITY_BITS || e.granularityBits < BME.MIN_GRANULARITY_BITS) return false;
  if (e.flags & BME.RESERVED_FLAGS || e.nameBytes > BME.MAX_NAME_SIZE || e.type !== BME.TYPE_DIRTY_TRACKING) return false;
  const physBytes = BigInt(e.tableEntries) * cs;
  if (physBytes > BigInt(BME.MAX_PHYS_SIZE)) return false;
  const virtualBytes = BigInt(Math.floor(s.header.virtualBytes / 512) * 512);
  return !(!(e.flags & BME.FLAG_IN_USE) && virtualBytes > (physBytes * 8n) << BigInt(e.granularityBits));
}

/** check_table_entry. */
export function tableEntryValid(entry: bigint, clusterBytes: number): boolean {
  if (entry & BME.TABLE_ENTRY_RESERVED_MASK) return false;
  const offset = entry & BME.TABLE_ENTRY_OFFSET_MASK;
  return offset === 0n || (!(entry & BME.TABLE_ENTRY_ALL_ONES) && offset % BigInt(clusterBytes) === 0n);
}

/** bitmap_table_load: the table, or the errno QEMU fails with. */
async function loadBitmapTable(s: CheckState, bm: DirBitmap): Promise<Uint8Array | 'EINVAL' | 'EIO'> {
  const table = new Uint8Array(bm.tableEntries * TABLE_ENTRY_BYTES);
  try {
    await readAt(s.file, bm.tableOffset, table);
  } catch (e) {
    if (e instanceof BlockError) return 'EIO';
    throw e;
  }
  for (let i = 0; i < bm.tableEntries; i++) {
    if (!tableEntryValid(readTableEntry(table, i), s.geometry.clusterBytes)) return 'EINVAL';
  }
  return table;
}

/** Why QEMU's open would refuse the bitmaps (qcow2_load_dirty_bitmaps), or null. */
export async function bitmapsOpenReason(s: CheckState): Promise<string | null> {
  if (s.image.extensions.bitmaps === null) return null;
  const list = await loadBitmapDirectory(s);
  if (typeof list === 'string') return list;
  for (const bm of list) {
    if (bm.flags & BME.FLAG_IN_USE) continue;
    const table = await loadBitmapTable(s, bm);
    if (typeof table === 'string') return `Could not read bitmap_table table from image for bitmap '${bm.name}': ${strerror(table)}`;
  }
  return null;
}

/** qcow2_check_bitmaps_refcounts. */
export async function checkBitmapsRefcounts(c: Counting): Promise<void> {
  const { s, res } = c;
  const ext = s.image.extensions.bitmaps;
  if (ext === null) return;
  incRefcounts(c, BigInt(ext.directoryOffset), ext.directoryBytes);
  const list = await loadBitmapDirectory(s);
  if (typeof list === 'string') {
    res.corruptions++;
    throw new CheckAbort('EINVAL');
  }
  for (const bm of list) {
    incRefcounts(c, BigInt(bm.tableOffset), bm.tableEntries * TABLE_ENTRY_BYTES);
    const table = await loadBitmapTable(s, bm);
    if (typeof table === 'string') {
      res.corruptions++;
      throw new CheckAbort(table);
    }
    for (let i = 0; i < bm.tableEntries; i++) {
      const entry = readTableEntry(table, i);
      if (!tableEntryValid(entry, s.geometry.clusterBytes)) {
        res.corruptions++;
        continue;
      }
      const offset = entry & BME.TABLE_ENTRY_OFFSET_MASK;
      if (offset !== 0n) incRefcounts(c, offset, s.geometry.clusterBytes);
    }
  }
}
