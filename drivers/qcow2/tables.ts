/*
 * Entries of the qcow2 tables: L1 and L2 tables (cluster mapping), the
 * refcount table and refcount blocks (host cluster management).
 *
 * Entries are 64-bit big-endian and handled as BigInt; `readTableEntry` and
 * `writeTableEntry` move them in and out of a table buffer. Decoders are
 * total and never throw on disk bytes: an offset above 2^53 decodes as
 * Infinity, and the validators say why an entry cannot be used. Two kinds of
 * validator, because QEMU treats the two differently:
 *   - `invalid…Entry`: what QEMU's I/O path refuses, marking the image
 *     corrupt (unaligned offsets, a zero cluster in a v2 image), plus offsets
 *     this implementation cannot represent; texts are QEMU's
 *     qcow2_signal_corruption messages;
 *   - `…ReservedReason`: what only `qemu-img check` reports (reserved bits,
 *     COPIED on a compressed cluster); texts are its messages without the
 *     leading "ERROR".
 *
 * Refcount blocks hold 2^refcount_order-bit entries: sub-byte widths pack
 * from the least significant bit of each byte (bit 0 = entry 0), widths of
 * 16 bits and more are big-endian. Refcounts are numbers; a 64-bit refcount
 * above 2^53 - 1 reads as a reason.
 *
 * Left out: extended L2 entries (128-bit, with a subcluster bitmap) and
 * external data files (where offset 0 with COPIED is a valid mapping).
 */
import { hex, u64ToNumber } from './cursor.js';
import { COMPRESSED_SECTOR_BYTES, EntryMask, Limits, Qcow2Version, TABLE_ENTRY_BYTES, type CompressedExtent, type Qcow2Geometry } from './format.js';

const MAX_SAFE = BigInt(Number.MAX_SAFE_INTEGER);
const HOST_OFFSET_LIMIT = BigInt(Limits.HOST_OFFSET_LIMIT);

/** Entry `index` of an L1, L2 or refcount table. */
export function readTableEntry(table: Uint8Array, index: number): bigint {
  return new DataView(table.buffer, table.byteOffset, table.byteLength).getBigUint64(index * TABLE_ENTRY_BYTES);
}

export function writeTableEntry(table: Uint8Array, index: number, raw: bigint): void {
  new DataView(table.buffer, table.byteOffset, table.byteLength).setBigUint64(index * TABLE_ENTRY_BYTES, raw);
}

/** Why a host offset cannot be used: at or beyond 2^56 (corrupt) or 2^53 (unsupported); null if fine. */
function offsetRangeReason(what: string, offset: bigint, where: string): string | null {
  if (offset >= HOST_OFFSET_LIMIT) return `${what} ${hex(offset)} at or beyond 2^56 (${where})`;
  if (offset > MAX_SAFE) return `${what} ${hex(offset)} beyond the 2^53 bytes supported (${where})`;
  return null;
}

/*
 * L1 entry:
 *   bits 0–8    reserved (0)
 *   bits 9–55   L2 table offset (cluster aligned; 0: unallocated)
 *   bits 56–62  reserved (0)
 *   bit  63     COPIED: the L2 table's refcount is exactly 1
 */
export interface L1Entry {
  /** 0: no L2 table. Infinity when above 2^53 (see invalidL1Entry). */
  l2Offset: number;
  copied: boolean;
}

export function decodeL1Entry(raw: bigint): L1Entry {
  return { l2Offset: u64ToNumber(raw & EntryMask.L1_OFFSET), copied: (raw & EntryMask.COPIED) !== 0n };
}

export function encodeL1Entry(entry: L1Entry): bigint {
  return BigInt(entry.l2Offset) | (entry.copied ? EntryMask.COPIED : 0n);
}

/** QEMU's I/O-path check of an active L1 entry (qcow2_get_host_offset). */
export function invalidL1Entry(raw: bigint, l1Index: number, geometry: Qcow2Geometry): string | null {
  const offset = raw & EntryMask.L1_OFFSET;
  const where = `L1 index: ${hex(l1Index)}`;
  if (offset % BigInt(geometry.clusterBytes) !== 0n) return `L2 table offset ${hex(offset)} unaligned (${where})`;
  return offsetRangeReason('L2 table offset', offset, where);
}

export function l1EntryReservedReason(raw: bigint): string | null {
  return raw & EntryMask.L1_RESERVED ? `found L1 entry with reserved bits set: ${raw.toString(16)}` : null;
}

/*
 * L2 entry:
 *   bits 0–61   cluster descriptor
 *   bit  62     COMPRESSED
 *   bit  63     COPIED: refcount exactly 1 (never on compressed clusters)
 * Standard cluster descriptor:
 *   bit  0      ZERO: reads as zeros (v3 only)
 *   bits 1–8    reserved (0)
 *   bits 9–55   host cluster offset (cluster aligned; 0 without ZERO: unallocated)
 *   bits 56–61  reserved (0)
 * Compressed cluster descriptor, x = 62 - (cluster_bits - 8):
 *   bits 0..x-1 host byte offset (not aligned; must be below 2^56)
 *   bits x..61  additional 512-byte sectors beyond the one holding the offset
 */
export type L2Type = 'unallocated' | 'zero-plain' | 'zero-alloc' | 'normal' | 'compressed';

export interface StandardL2Entry {
  type: Exclude<L2Type, 'compressed'>;
  /** Host cluster offset; 0 for 'unallocated' and 'zero-plain'. Infinity above 2^53. */
  hostOffset: number;
  copied: boolean;
}

export interface CompressedL2Entry extends CompressedExtent {
  type: 'compressed';
}

export type L2Entry = StandardL2Entry | CompressedL2Entry;

/** Classifies an entry as QEMU's qcow2_get_cluster_type (no data file, no subclusters). */
export function decodeL2Entry(raw: bigint, geometry: Qcow2Geometry): L2Entry {
  if (raw & EntryMask.COMPRESSED) return { type: 'compressed', ...geometry.compressedExtent(raw) };
  const offset = raw & EntryMask.L2_OFFSET;
  const copied = (raw & EntryMask.COPIED) !== 0n;
  const type = raw & EntryMask.ZERO ? (offset ? 'zero-alloc' : 'zero-plain') : offset ? 'normal' : 'unallocated';
  return { type, hostOffset: u64ToNumber(offset), copied };
}

export function encodeL2Entry(entry: L2Entry, geometry: Qcow2Geometry): bigint {
  if (entry.type === 'compressed') {
    const sectors = BigInt(entry.sectors - 1) << BigInt(geometry.compressedOffsetBits);
    return EntryMask.COMPRESSED | sectors | BigInt(entry.hostOffset);
  }
  const zero = entry.type === 'zero-plain' || entry.type === 'zero-alloc' ? EntryMask.ZERO : 0n;
  return BigInt(entry.hostOffset) | zero | (entry.copied ? EntryMask.COPIED : 0n);
}

/**
 * The entry for `compressedBytes` (1..cluster size) of compressed data at
 * `hostOffset`, as qcow2_alloc_compressed_cluster_offset builds it, or the
 * reason the offset does not fit the descriptor (it shrinks to 2^49 bytes
 * with 2 MiB clusters).
 */
export function compressedL2Entry(hostOffset: number, compressedBytes: number, geometry: Qcow2Geometry): CompressedL2Entry | string {
  if (!(compressedBytes > 0 && compressedBytes <= geometry.clusterBytes)) {
    throw new RangeError(`compressedL2Entry: ${compressedBytes} bytes of compressed data for a ${geometry.clusterBytes}-byte cluster`);
  }
  const limitBits = Math.min(geometry.compressedOffsetBits, 56);
  if (hostOffset >= 2 ** limitBits) return `Compressed cluster offset ${hex(hostOffset)} beyond the 2^${limitBits} bytes its descriptor holds`;
  const first = Math.floor(hostOffset / COMPRESSED_SECTOR_BYTES);
  const last = Math.floor((hostOffset + compressedBytes - 1) / COMPRESSED_SECTOR_BYTES);
  const sectors = last - first + 1;
  return { type: 'compressed', hostOffset, sectors, compressedBytes: sectors * COMPRESSED_SECTOR_BYTES - (hostOffset % COMPRESSED_SECTOR_BYTES) };
}

/** Where an L2 entry is, for messages: its table's offset and its index in it. */
export interface L2Place {
  l2Offset: number;
  l2Index: number;
}

/** QEMU's I/O-path checks of an L2 entry (qcow2_get_host_offset), then our range limits. */
export function invalidL2Entry(raw: bigint, place: L2Place, geometry: Qcow2Geometry, version: number): string | null {
  const where = `L2 offset: ${hex(place.l2Offset)}, L2 index: ${hex(place.l2Index)}`;
  if (raw & EntryMask.COMPRESSED) {
    const offset = raw & ((1n << BigInt(geometry.compressedOffsetBits)) - 1n);
    return offsetRangeReason('Compressed cluster offset', offset, where);
  }
  if (version < Qcow2Version.V3 && raw & EntryMask.ZERO) return `Zero cluster entry found in pre-v3 image (${where})`;
  const offset = raw & EntryMask.L2_OFFSET;
  if (offset % BigInt(geometry.clusterBytes) !== 0n) return `Cluster allocation offset ${hex(offset)} unaligned (${where})`;
  return offsetRangeReason('Cluster allocation offset', offset, where);
}

export function l2EntryReservedReason(raw: bigint): string | null {
  if (raw & EntryMask.COMPRESSED) {
    const offset = raw & ~(EntryMask.COMPRESSED | EntryMask.COPIED);
    return raw & EntryMask.COPIED ? `coffset=0x${offset.toString(16)}: copied flag must never be set for compressed clusters` : null;
  }
  return raw & EntryMask.L2_STD_RESERVED ? `found l2 entry with reserved bits set: ${raw.toString(16)}` : null;
}

/*
 * Refcount table entry:
 *   bits 0–8    reserved (0)
 *   bits 9–63   refcount block offset (cluster aligned; 0: not allocated,
 *               every refcount it would hold is 0)
 */

/** The refcount block offset (0: none; Infinity above 2^53). */
export function decodeReftableEntry(raw: bigint): number {
  return u64ToNumber(raw & EntryMask.REFT_OFFSET);
}

export function encodeReftableEntry(refblockOffset: number): bigint {
  return BigInt(refblockOffset);
}

/** QEMU's I/O-path check of a refcount table entry (qcow2_get_refcount), then our range limits. */
export function invalidReftableEntry(raw: bigint, reftableIndex: number, geometry: Qcow2Geometry): string | null {
  const offset = raw & EntryMask.REFT_OFFSET;
  const where = `reftable index: ${hex(reftableIndex)}`;
  if (offset % BigInt(geometry.clusterBytes) !== 0n) return `Refblock offset ${hex(offset)} unaligned (${where})`;
  return offsetRangeReason('Refblock offset', offset, where);
}

export function reftableEntryReservedReason(raw: bigint, reftableIndex: number): string | null {
  return raw & EntryMask.REFT_RESERVED ? `refcount table entry ${reftableIndex} has reserved bits set` : null;
}

function refcountView(block: Uint8Array, index: number, order: number): DataView {
  const entries = (block.length * 8) / 2 ** order;
  if (!(index >= 0 && index < entries)) throw new RangeError(`refcount index ${index} outside a block of ${entries} entries`);
  return new DataView(block.buffer, block.byteOffset, block.byteLength);
}

/** Refcount `index` of a refcount block of 2^order-bit entries, or a reason above 2^53 - 1. */
export function getRefcount(block: Uint8Array, index: number, order: number): number | string {
  const view = refcountView(block, index, order);
  switch (order) {
    case 4:
      return view.getUint16(index * 2);
    case 5:
      return view.getUint32(index * 4);
    case 6: {
      const value = view.getBigUint64(index * 8);
      return value > MAX_SAFE ? `Refcount ${value} exceeds 2^53 - 1 (refcount block index: ${hex(index)})` : Number(value);
    }
    default: {
      const bits = 2 ** order;
      const perByte = 8 / bits;
      const byte = view.getUint8(Math.floor(index / perByte));
      return (byte >> ((index % perByte) * bits)) & (2 ** bits - 1);
    }
  }
}

/** Sets refcount `index`; a reason (ERANGE) when `value` exceeds the width's maximum. */
export function setRefcount(block: Uint8Array, index: number, order: number, value: number): string | null {
  const view = refcountView(block, index, order);
  const bits = 2 ** order;
  const max = Math.min(2 ** bits - 1, Number.MAX_SAFE_INTEGER);
  if (!Number.isSafeInteger(value) || value < 0) throw new RangeError(`setRefcount: ${value} is not a refcount`);
  if (value > max) return `Refcount ${value} exceeds the ${bits}-bit refcount maximum of ${max}`;
  switch (order) {
    case 4:
      view.setUint16(index * 2, value);
      return null;
    case 5:
      view.setUint32(index * 4, value);
      return null;
    case 6:
      view.setBigUint64(index * 8, BigInt(value));
      return null;
    default: {
      const perByte = 8 / bits;
      const at = Math.floor(index / perByte);
      const shift = (index % perByte) * bits;
      const mask = (2 ** bits - 1) << shift;
      view.setUint8(at, (view.getUint8(at) & ~mask) | (value << shift));
      return null;
    }
  }
}
