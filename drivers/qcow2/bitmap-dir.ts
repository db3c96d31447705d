/*
 * The persistent bitmap directory of a qcow2 image and the clusters its
 * bitmaps own (QEMU 7.2's qcow2-bitmap.c: bitmap_list_load/_store,
 * update_ext_header_and_dir[_in_place], bitmap_table_load,
 * free_bitmap_clusters, check_constraints_on_bitmap).
 *
 * Directory entry (8-byte aligned, big-endian; parsing and its checks are
 * check-bitmaps.ts's loadBitmapDirectory, shared with qemu-img check):
 *
 *     0  u64  bitmap_table_offset   cluster aligned
 *     8  u32  bitmap_table_size     entries
 *    12  u32  flags                 BmeFlag
 *    16  u8   type                  1: dirty tracking
 *    17  u8   granularity_bits      9..31
 *    18  u16  name_size             bytes, ≤ 1023
 *    20  u32  extra_data_size       0 (QEMU writes none)
 *    24  name, zero padding to a multiple of 8
 *
 * Bitmap table entry: bits 9–55 the offset of a cluster of bitmap data;
 * offset 0 means the cluster's worth of bits is all zeros (bit 0 clear) or
 * all ones (bit 0 set). Data: one bit per granule, least significant bit
 * first, a cluster covering cluster_size * 8 granules.
 *
 * The directory as on disk is kept in the state (`s.bitmapDirectory`), so
 * `qemu-img info` can list it without I/O; it changes only here. Two ways
 * to write it, as QEMU: in place (same size, while the "bitmaps
 * consistent" autoclear bit is cleared around the rewrite), used to set
 * the in-use flags at open; or to new clusters, the header switched over
 * and the old directory freed afterwards, used by store and remove.
 */
import { BlockError, strerror } from '../../block/errors.js';
import { checkFileOf } from './check-io.js';
import { BME, loadBitmapDirectory, tableEntryValid, type DirBitmap } from './check-bitmaps.js';
import { ByteWriter, encodeUtf8 } from './cursor.js';
import { Autoclear, Limits, TABLE_ENTRY_BYTES } from './format.js';
import { flushFile, updateHeader, writeFile } from './header-io.js';
import { OverlapCheck, overlapCheck } from './overlap.js';
import { allocClusters, freeClusters } from './refcount.js';
import { DiscardType, type Qcow2State } from './state.js';
import { entryOffset } from './l2.js';

/** Directory entry flags (BME_FLAG_*). */
export const BmeFlag = { IN_USE: 0x1, AUTO: 0x2 } as const;
/** Bytes of a directory entry before its name. */
const DIR_ENTRY_HEADER_BYTES = 24;
const BITMAP_TYPE_DIRTY_TRACKING = 1;

export type { DirBitmap };

/** Bytes one entry takes in the directory (calc_dir_entry_size). */
export function dirEntryBytes(name: string): number {
  return Math.ceil((DIR_ENTRY_HEADER_BYTES + encodeUtf8(name).length) / 8) * 8;
}

/** The directory bytes for `list` (bitmap_list_store's encoding). */
export function encodeDirectory(list: readonly DirBitmap[]): Uint8Array {
  const out = new Uint8Array(list.reduce((sum, bm) => sum + dirEntryBytes(bm.name), 0));
  const w = new ByteWriter(out);
  for (const bm of list) {
    const name = encodeUtf8(bm.name);
    const start = w.offset;
    w.u64(bm.tableOffset).u32(bm.tableEntries).u32(bm.flags).u8(BITMAP_TYPE_DIRTY_TRACKING).u8(bm.granularityBits);
    w.u16(name.length).u32(0).bytes(name);
    w.offset = start + dirEntryBytes(bm.name);
  }
  return out;
}

/** The virtual size as bdrv_getlength reports it (whole sectors). */
export function imageLengthBytes(s: Qcow2State): number {
  return Math.floor(s.image.header.virtualBytes / 512) * 512;
}

/** Table entries (clusters of data) a bitmap of `granularityBits` over the image needs. */
export function tableEntriesFor(s: Qcow2State, granularityBits: number, lengthBytes = imageLengthBytes(s)): number {
  const dataBytes = Math.ceil(Math.ceil(lengthBytes / 2 ** granularityBits) / 8);
  return Math.ceil(dataBytes / s.clusterBytes);
}

/**
 * check_constraints_on_bitmap: why a bitmap `name` of `granularityBytes`
 * cannot be stored in this image, or null.
 */
export function bitmapConstraintReason(s: Qcow2State, name: string, granularityBytes: number): string | null {
  const bits = Math.log2(granularityBytes);
  if (bits > BME.MAX_GRANULARITY_BITS) return `Granularity exceeds maximum (${2 ** BME.MAX_GRANULARITY_BITS} bytes)`;
  if (bits < BME.MIN_GRANULARITY_BITS) return `Granularity is under minimum (${2 ** BME.MIN_GRANULARITY_BITS} bytes)`;
  const dataBytes = Math.ceil(Math.ceil(imageLengthBytes(s) / granularityBytes) / 8);
  if (dataBytes > BME.MAX_PHYS_SIZE || dataBytes > BME.MAX_TABLE_SIZE * s.clusterBytes) {
    return 'Too much space will be occupied by the bitmap. Use larger granularity';
  }
  if (encodeUtf8(name).length > BME.MAX_NAME_SIZE) return `Name length exceeds maximum (${BME.MAX_NAME_SIZE} characters)`;
  return null;
}

/** bitmap_list_load from the image file: the directory, or EINVAL with QEMU's message. */
export async function readDirectory(s: Qcow2State): Promise<DirBitmap[]> {
  if (s.image.extensions.bitmaps === null) return [];
  const list = await loadBitmapDirectory({ image: s.image, file: checkFileOf(s.file), geometry: s.geometry, header: s.image.header });
  if (typeof list === 'string') throw new BlockError('EINVAL', list);
  return list;
}

/** Where a bitmap's table is. */
export type TablePlace = Pick<DirBitmap, 'tableOffset' | 'tableEntries'>;

/** bitmap_table_load: the table's entries (checked); throws the errno QEMU fails with. */
export async function readBitmapTable(s: Qcow2State, bm: TablePlace): Promise<Uint8Array> {
  const table = new Uint8Array(bm.tableEntries * TABLE_ENTRY_BYTES);
  await checkFileOf(s.file).read(bm.tableOffset, table);
  const view = new DataView(table.buffer);
  for (let i = 0; i < bm.tableEntries; i++) {
    if (!tableEntryValid(view.getBigUint64(i * TABLE_ENTRY_BYTES), s.clusterBytes)) throw new BlockError('EINVAL');
  }
  return table;
}

/** The data cluster of table entry `i` (0: none; then `allOnes` tells its bits). */
export function tableEntryAt(table: Uint8Array, i: number): { offset: number; allOnes: boolean } {
  const view = new DataView(table.buffer, table.byteOffset, table.byteLength);
  const hi = view.getUint32(i * TABLE_ENTRY_BYTES);
  const lo = view.getUint32(i * TABLE_ENTRY_BYTES + 4);
  return { offset: entryOffset(hi, lo), allOnes: (lo & 1) === 1 };
}

/**
 * free_bitmap_clusters: frees a stored bitmap's data clusters and table
 * (lock held). A table that does not load frees nothing (a leak, as QEMU).
 */
export async function freeBitmapClusters(s: Qcow2State, bm: TablePlace): Promise<void> {
  if (bm.tableOffset === 0) return;
  let table: Uint8Array;
  try {
    table = await readBitmapTable(s, bm);
  } catch (e) {
    if (e instanceof BlockError) return;
    throw e;
  }
  for (let i = 0; i < bm.tableEntries; i++) {
    const { offset } = tableEntryAt(table, i);
    if (offset !== 0) await freeClusters(s, offset, s.clusterBytes, DiscardType.ALWAYS);
  }
  await freeClusters(s, bm.tableOffset, bm.tableEntries * TABLE_ENTRY_BYTES, DiscardType.OTHER);
}

/** Rewrites the header and flushes the file (update_header_sync). */
async function updateHeaderSync(s: Qcow2State): Promise<void> {
  await updateHeader(s);
  await flushFile(s);
}

/**
 * update_ext_header_and_dir_in_place: writes `list` (same size, same
 * number of entries) over the directory, with the autoclear bit cleared
 * while the directory is being written.
 */
export async function rewriteDirectoryInPlace(s: Qcow2State, list: readonly DirBitmap[]): Promise<void> {
  const ext = s.image.extensions.bitmaps;
  const dir = encodeDirectory(list);
  const header = s.image.header;
  if (!(header.autoclearFeatures & Autoclear.BITMAPS) || !ext || list.length !== ext.bitmapCount || dir.length !== ext.directoryBytes) {
    throw new BlockError('EINVAL');
  }
  header.autoclearFeatures &= ~Autoclear.BITMAPS;
  await updateHeaderSync(s);
  await overlapCheck(s, OverlapCheck.BITMAP_DIRECTORY, ext.directoryOffset, dir.length);
  await writeFile(s, ext.directoryOffset, dir);
  s.bitmapDirectory = list.map((bm) => ({ ...bm }));
  await updateHeaderSync(s);
  header.autoclearFeatures |= Autoclear.BITMAPS;
  await updateHeaderSync(s);
}

/**
 * update_ext_header_and_dir (lock held): writes `list` to new clusters
 * (none for an empty list), flushes the caches, switches the header to it
 * (setting or clearing the autoclear bit), then frees the old directory.
 * On failure the header and the state are as before.
 */
export async function replaceDirectory(s: Qcow2State, list: readonly DirBitmap[]): Promise<void> {
  const header = s.image.header;
  const old = { ext: s.image.extensions.bitmaps, autoclear: header.autoclearFeatures };
  if (list.length > Limits.MAX_BITMAPS) throw new BlockError('EINVAL');
  let written: { offset: number; bytes: number } | null = null;
  try {
    if (list.length > 0) {
      written = await writeNewDirectory(s, list);
      await s.l2Cache.flush();
      await s.refcountCache.flush();
      header.autoclearFeatures |= Autoclear.BITMAPS;
    } else {
      header.autoclearFeatures &= ~Autoclear.BITMAPS;
    }
    s.image.extensions.bitmaps = written ? { bitmapCount: list.length, directoryBytes: written.bytes, directoryOffset: written.offset } : null;
    await updateHeaderSync(s);
  } catch (e) {
    if (written) await freeClusters(s, written.offset, written.bytes, DiscardType.OTHER);
    s.image.extensions.bitmaps = old.ext;
    header.autoclearFeatures = old.autoclear;
    throw e;
  }
  s.bitmapDirectory = list.map((bm) => ({ ...bm }));
  if (old.ext && old.ext.directoryBytes > 0) await freeClusters(s, old.ext.directoryOffset, old.ext.directoryBytes, DiscardType.OTHER);
}

/** bitmap_list_store to new clusters: where the directory went. */
async function writeNewDirectory(s: Qcow2State, list: readonly DirBitmap[]): Promise<{ offset: number; bytes: number }> {
  const dir = encodeDirectory(list);
  if (dir.length > Limits.MAX_BITMAP_DIRECTORY_BYTES) throw new BlockError('EINVAL');
  const offset = await allocClusters(s, Math.ceil(dir.length / s.clusterBytes));
  try {
    await overlapCheck(s, 0, offset, dir.length);
    await writeFile(s, offset, dir);
  } catch (e) {
    await freeClusters(s, offset, dir.length, DiscardType.OTHER);
    throw e;
  }
  return { offset, bytes: dir.length };
}

/** "<context>: <strerror>", QEMU's error_setg_errno, for a BlockError. */
export function errnoMessage(context: string, e: unknown): BlockError {
  if (!(e instanceof BlockError)) throw e;
  return new BlockError(e.code, `${context}: ${strerror(e.code)}`, { cause: e });
}

/** One bitmap as `qemu-img info` lists it (QAPI Qcow2BitmapInfo, schema order). */
export interface Qcow2BitmapInfo {
  name: string;
  granularity: number;
  flags: Array<'in-use' | 'auto'>;
}

/** qcow2_get_bitmap_info_list: the directory as on disk; undefined when there is none. */
export function bitmapInfoList(s: Qcow2State): Qcow2BitmapInfo[] | undefined {
  const list = s.bitmapDirectory;
  if (!list || list.length === 0) return undefined;
  return list.map((bm) => ({
    name: bm.name,
    granularity: 2 ** bm.granularityBits,
    flags: [...(bm.flags & BmeFlag.IN_USE ? (['in-use'] as const) : []), ...(bm.flags & BmeFlag.AUTO ? (['auto'] as const) : [])],
  }));
}
