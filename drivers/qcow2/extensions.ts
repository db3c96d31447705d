/*
 * qcow2 header extensions: the records between the header and the backing
 * file name in cluster 0.
 *
 * Reading follows QEMU 7.2's qcow2_read_extensions: records start at
 * header_length and run to backing_file_offset (or the end of the cluster
 * when there is no backing file); the end marker, or reaching that limit,
 * ends the list; a record whose length crosses the limit is "Header
 * extension too large". A later record of a type replaces an earlier one.
 * The feature name table is read entry by entry up to the first entry with
 * an empty name, as QEMU uses it. A bitmaps extension without autoclear
 * bit 0 is kept out of `bitmaps` and flagged `staleBitmaps` (QEMU warns that
 * another program modified the file and drops the extension at its next
 * header write). The encryption header pointer and the external data file
 * name are recognised, with QEMU's checks, so the driver can refuse those
 * features by name; unknown types are kept, bytes and all, in file order.
 *
 * Writing follows qcow2_update_header: backing format, external data file
 * name (only with the incompatible data-file bit), encryption header pointer
 * (only with a non-zero offset), QEMU's own feature name table (v3 with
 * clusters above 4 KiB; the image's table is never written back), bitmaps,
 * unknown records, end marker. Padding is zeros.
 *
 * Record byte map (big-endian):
 *     0  u32  type                  ExtType; 0 ends the list
 *     4  u32  length                data bytes, padding excluded
 *     8  data, then zeros to a multiple of 8
 * String records (backing format, data file) hold the string without NUL.
 */
import { ByteReader, ByteWriter, decodeCString, encodeUtf8, u64ToNumber } from './cursor.js';
import { Autoclear, CryptMethod, ExtType, Incompat, Limits, QEMU_FEATURE_TABLE, Qcow2Version, type FeatureName } from './format.js';
import type { Qcow2Header } from './header.js';

export interface RawExtension {
  type: number;
  data: Uint8Array;
}

/*
 * Bitmaps extension data (24 bytes):
 *     0  u32  nb_bitmaps                1..65535
 *     4  u32  reserved                  zero
 *     8  u64  bitmap_directory_size     bytes
 *    16  u64  bitmap_directory_offset   cluster aligned
 */
export const BITMAPS_EXT_BYTES = 24;
export interface BitmapsExtension {
  bitmapCount: number;
  directoryBytes: number;
  directoryOffset: number;
}

/*
 * Full disk encryption header pointer (16 bytes):
 *     0  u64  offset    cluster aligned
 *     8  u64  length    bytes
 */
export const CRYPTO_EXT_BYTES = 16;
export interface CryptoHeaderExtension {
  offset: number;
  bytes: number;
}

/*
 * Feature name table entry (48 bytes):
 *     0  u8   type      FeatureType
 *     1  u8   bit       0..63
 *     2  46 bytes name, NUL-padded (not terminated at full length)
 */
export const FEATURE_ENTRY_BYTES = 48;
const FEATURE_NAME_BYTES = 46;

export interface Qcow2Extensions {
  backingFormat: string | null;
  /** External data file name (recognised only: images with a data file are refused). */
  dataFile: string | null;
  /** Encryption header pointer (recognised only: encrypted images are refused). */
  cryptoHeader: CryptoHeaderExtension | null;
  /** The image's own feature name table, for naming features in messages; null when absent. */
  featureTable: FeatureName[] | null;
  /** The bitmaps extension, present and consistent (autoclear bit 0 set); rewritten unchanged. */
  bitmaps: BitmapsExtension | null;
  /** A bitmaps extension was present without autoclear bit 0: inconsistent, dropped on rewrite. */
  staleBitmaps: boolean;
  /** Unknown records in file order. */
  unknown: RawExtension[];
}

export function emptyExtensions(): Qcow2Extensions {
  return { backingFormat: null, dataFile: null, cryptoHeader: null, featureTable: null, bitmaps: null, staleBitmaps: false, unknown: [] };
}

const RECORD_HEADER_BYTES = 8;

function padded(bytes: number): number {
  return Math.ceil(bytes / 8) * 8;
}

/** The extensions of cluster 0, or QEMU's reason for refusing them. The header must be valid. */
export function decodeExtensions(cluster: Uint8Array, header: Qcow2Header): Qcow2Extensions | string {
  const walked = walkExtensions(cluster, header);
  return walked.reason ?? walked.extensions;
}

/**
 * The feature name table as QEMU finds it while refusing unknown
 * incompatible features: whatever was read before any error, else null.
 */
export function readFeatureTable(cluster: Uint8Array, header: Qcow2Header): FeatureName[] | null {
  return walkExtensions(cluster, header).extensions.featureTable;
}

interface Walked {
  extensions: Qcow2Extensions;
  reason: string | null;
}

function walkExtensions(cluster: Uint8Array, header: Qcow2Header): Walked {
  const extensions = emptyExtensions();
  // Bounded by the largest cluster even for an unvalidated header, so no record can ask for more memory.
  const clusterBytes = 2 ** Math.min(header.clusterBits, Limits.MAX_CLUSTER_BITS);
  const end = Math.min(header.backingFileOffset !== 0 ? header.backingFileOffset : clusterBytes, clusterBytes);
  let offset = header.headerBytes;
  while (offset < end) {
    const r = new ByteReader(cluster, offset);
    const type = r.u32();
    const length = r.u32();
    offset += RECORD_HEADER_BYTES;
    if (offset > end || length > end - offset) return { extensions, reason: 'Header extension too large' };
    if (type === ExtType.END) break;
    const reason = takeRecord(extensions, type, r.bytesCopy(length), header);
    if (reason !== null) return { extensions, reason };
    offset += padded(length);
  }
  return { extensions, reason: null };
}

function takeRecord(ext: Qcow2Extensions, type: number, data: Uint8Array, header: Qcow2Header): string | null {
  switch (type) {
    case ExtType.BACKING_FORMAT:
      if (data.length > Limits.MAX_BACKING_FORMAT_BYTES) {
        return `ERROR: ext_backing_format: len=${data.length} too large (>=${Limits.MAX_BACKING_FORMAT_BYTES + 1})`;
      }
      ext.backingFormat = decodeCString(data);
      return null;
    case ExtType.FEATURE_TABLE:
      ext.featureTable = decodeFeatureTable(data);
      return null;
    case ExtType.CRYPTO_HEADER:
      return takeCryptoHeader(ext, data, header);
    case ExtType.BITMAPS:
      return takeBitmaps(ext, data, header);
    case ExtType.DATA_FILE:
      ext.dataFile = decodeCString(data);
      return null;
    default:
      ext.unknown.push({ type, data });
      return null;
  }
}

/** Entries up to the first with an empty name; a short last entry reads as zero-padded. */
function decodeFeatureTable(data: Uint8Array): FeatureName[] {
  const table: FeatureName[] = [];
  const r = new ByteReader(data);
  for (let at = 0; at < data.length; at += FEATURE_ENTRY_BYTES) {
    r.offset = at;
    const type = r.u8();
    const bit = r.u8();
    const name = decodeCString(r.bytesCopy(FEATURE_NAME_BYTES));
    if (name === '') break;
    table.push({ type, bit, name });
  }
  return table;
}

function takeCryptoHeader(ext: Qcow2Extensions, data: Uint8Array, header: Qcow2Header): string | null {
  if (header.cryptMethod !== CryptMethod.LUKS) return 'CRYPTO header extension only expected with LUKS encryption method';
  if (data.length !== CRYPTO_EXT_BYTES) {
    return `CRYPTO header extension size ${data.length}, but expected size ${CRYPTO_EXT_BYTES}`;
  }
  const r = new ByteReader(data);
  const rawOffset = r.u64();
  const clusterBytes = 2 ** header.clusterBits;
  if (rawOffset % BigInt(clusterBytes) !== 0n) {
    return `Encryption header offset '${rawOffset}' is not a multiple of cluster size '${clusterBytes}'`;
  }
  ext.cryptoHeader = { offset: u64ToNumber(rawOffset), bytes: u64ToNumber(r.u64()) };
  return null;
}

function takeBitmaps(ext: Qcow2Extensions, data: Uint8Array, header: Qcow2Header): string | null {
  if (data.length !== BITMAPS_EXT_BYTES) return 'bitmaps_ext: Invalid extension length';
  if (!(header.autoclearFeatures & Autoclear.BITMAPS)) {
    ext.staleBitmaps = true;
    return null;
  }
  const r = new ByteReader(data);
  const bitmapCount = r.u32();
  const reserved = r.u32();
  const directoryBytes = r.u64();
  const directoryOffset = r.u64();
  if (reserved !== 0) return 'bitmaps_ext: Reserved field is not zero';
  if (bitmapCount > Limits.MAX_BITMAPS) {
    return `bitmaps_ext: Image has ${bitmapCount} bitmaps, exceeding the QEMU supported maximum of ${Limits.MAX_BITMAPS}`;
  }
  if (bitmapCount === 0) return 'found bitmaps extension with zero bitmaps';
  if (directoryOffset % BigInt(2 ** header.clusterBits) !== 0n) return 'bitmaps_ext: invalid bitmap directory offset';
  if (directoryBytes > BigInt(Limits.MAX_BITMAP_DIRECTORY_BYTES)) {
    return `bitmaps_ext: bitmap directory size (${directoryBytes}) exceeds the maximum supported size (${Limits.MAX_BITMAP_DIRECTORY_BYTES})`;
  }
  ext.bitmaps = { bitmapCount, directoryBytes: Number(directoryBytes), directoryOffset: u64ToNumber(directoryOffset) };
  return null;
}

/** One record: type, length, data, zero padding. */
export function encodeRecord(type: number, data: Uint8Array): Uint8Array {
  const out = new Uint8Array(RECORD_HEADER_BYTES + padded(data.length));
  new ByteWriter(out).u32(type).u32(data.length).bytes(data);
  return out;
}

export function encodeFeatureTable(table: readonly FeatureName[]): Uint8Array {
  const out = new Uint8Array(table.length * FEATURE_ENTRY_BYTES);
  const w = new ByteWriter(out);
  for (const { type, bit, name } of table) {
    const nameBytes = encodeUtf8(name).subarray(0, FEATURE_NAME_BYTES);
    w.u8(type).u8(bit).bytes(nameBytes).skip(FEATURE_NAME_BYTES - nameBytes.length);
  }
  return out;
}

export function encodeBitmapsExtension(bitmaps: BitmapsExtension): Uint8Array {
  const out = new Uint8Array(BITMAPS_EXT_BYTES);
  new ByteWriter(out).u32(bitmaps.bitmapCount).u32(0).u64(bitmaps.directoryBytes).u64(bitmaps.directoryOffset);
  return out;
}

export function encodeCryptoHeaderExtension(crypto: CryptoHeaderExtension): Uint8Array {
  const out = new Uint8Array(CRYPTO_EXT_BYTES);
  new ByteWriter(out).u64(crypto.offset).u64(crypto.bytes);
  return out;
}

/** Whether QEMU 7.2 writes its feature name table for this header. */
export function writesFeatureTable(header: Qcow2Header): boolean {
  return header.version >= Qcow2Version.V3 && 2 ** header.clusterBits > Limits.NO_FEATURE_TABLE_MAX_CLUSTER_BYTES;
}

/**
 * The extension area as qcow2_update_header writes it, end marker included,
 * or a reason when a string cannot be stored.
 */
export function encodeExtensions(ext: Qcow2Extensions, header: Qcow2Header): Uint8Array | string {
  const records: Uint8Array[] = [];
  if (ext.backingFormat !== null) {
    const format = encodeUtf8(ext.backingFormat);
    if (format.length > Limits.MAX_BACKING_FORMAT_BYTES) return 'Backing file format name too long';
    records.push(encodeRecord(ExtType.BACKING_FORMAT, format));
  }
  if (ext.dataFile !== null && header.incompatibleFeatures & Incompat.DATA_FILE) {
    records.push(encodeRecord(ExtType.DATA_FILE, encodeUtf8(ext.dataFile)));
  }
  if (ext.cryptoHeader !== null && ext.cryptoHeader.offset !== 0) {
    records.push(encodeRecord(ExtType.CRYPTO_HEADER, encodeCryptoHeaderExtension(ext.cryptoHeader)));
  }
  if (writesFeatureTable(header)) records.push(encodeRecord(ExtType.FEATURE_TABLE, encodeFeatureTable(QEMU_FEATURE_TABLE)));
  if (ext.bitmaps !== null) records.push(encodeRecord(ExtType.BITMAPS, encodeBitmapsExtension(ext.bitmaps)));
  for (const { type, data } of ext.unknown) records.push(encodeRecord(type, data));
  records.push(encodeRecord(ExtType.END, new Uint8Array(0)));
  return concat(records);
}

function concat(parts: readonly Uint8Array[]): Uint8Array {
  const out = new Uint8Array(parts.reduce((sum, p) => sum + p.length, 0));
  const w = new ByteWriter(out);
  for (const part of parts) w.bytes(part);
  return out;
}
