/*
 * The qcow2 on-disk format: constants and geometry (docs/interop/qcow2.rst,
 * QEMU 7.2's block/qcow2.h). Pure data and arithmetic; no I/O, no policy.
 *
 * All multi-byte fields are big-endian. Feature bitmaps and table entries
 * are 64-bit and kept as BigInt masks; byte offsets and sizes are numbers,
 * valid up to 2^53 (decoders turn larger values into Infinity, which every
 * validator refuses: see cursor.ts).
 *
 * `Qcow2Geometry` is what cluster_bits and refcount_order imply: cluster
 * size, entries per L2 table and refcount block, the maximum refcount, the
 * split of a compressed cluster descriptor, and the index arithmetic of the
 * spec's "Cluster mapping" and "Host cluster management" sections. Indexes
 * are computed with division by powers of two, exact for every number up to
 * 2^53 (bitwise operators would truncate to 32 bits).
 *
 * Left out: extended L2 entries (128-bit L2 entries, subclusters). The
 * incompatible bit is known here so it can be named and refused.
 */

import { u64ToNumber } from './cursor.js';

export const QCOW2_MAGIC = 0x514649fb; // "QFI\xfb"

export const Qcow2Version = { V2: 2, V3: 3 } as const;

/** Header sizes in bytes. */
export const HeaderBytes = {
  /** Version 2 header: magic … snapshots_offset. */
  V2: 0x48,
  /** Smallest valid version 3 header_length: … header_length. */
  V3_MIN: 0x68,
  /** The version 3 header QEMU 7.2 writes: … compression_type + 7 bytes padding. */
  V3: 0x70,
} as const;

/** Header extension types. */
export const ExtType = {
  END: 0x00000000,
  BACKING_FORMAT: 0xe2792aca,
  FEATURE_TABLE: 0x6803f857,
  BITMAPS: 0x23852875,
  CRYPTO_HEADER: 0x0537be77,
  DATA_FILE: 0x44415441,
} as const;

/** Incompatible feature bits (header bytes 72–79). */
export const Incompat = {
  DIRTY: 0x1n,
  CORRUPT: 0x2n,
  DATA_FILE: 0x4n,
  COMPRESSION: 0x8n,
  EXTL2: 0x10n,
} as const;
/** Incompatible bits QEMU 7.2 knows; any other bit refuses the image. */
export const INCOMPAT_KNOWN_MASK = 0x1fn;

/** Compatible feature bits (header bytes 80–87). */
export const Compat = { LAZY_REFCOUNTS: 0x1n } as const;

/** Autoclear feature bits (header bytes 88–95). */
export const Autoclear = { BITMAPS: 0x1n, DATA_FILE_RAW: 0x2n } as const;
/**
 * Autoclear bits QEMU 7.2 knows and keeps; it clears every other bit when it
 * opens an image read-write, and so must we (`autoclear & AUTOCLEAR_KNOWN_MASK`).
 * Beware Autoclear.BITMAPS: it says the bitmaps extension is consistent, and
 * persistent bitmaps flagged "auto" must record every guest write. A writer
 * that does not update bitmaps must clear this bit too before its first
 * guest write; QEMU then reports the bitmaps inconsistent and drops them,
 * which is the bit's purpose. Rewriting the extension unchanged is only safe
 * together with that.
 */
export const AUTOCLEAR_KNOWN_MASK = 0x3n;

/** `type` of a feature name table entry. */
export const FeatureType = { INCOMPATIBLE: 0, COMPATIBLE: 1, AUTOCLEAR: 2 } as const;

export interface FeatureName {
  type: number;
  bit: number;
  name: string;
}

/** The feature name table QEMU 7.2 writes, in its order. */
export const QEMU_FEATURE_TABLE: readonly FeatureName[] = [
  { type: FeatureType.INCOMPATIBLE, bit: 0, name: 'dirty bit' },
  { type: FeatureType.INCOMPATIBLE, bit: 1, name: 'corrupt bit' },
  { type: FeatureType.INCOMPATIBLE, bit: 2, name: 'external data file' },
  { type: FeatureType.INCOMPATIBLE, bit: 3, name: 'compression type' },
  { type: FeatureType.INCOMPATIBLE, bit: 4, name: 'extended L2 entries' },
  { type: FeatureType.COMPATIBLE, bit: 0, name: 'lazy refcounts' },
  { type: FeatureType.AUTOCLEAR, bit: 0, name: 'bitmaps' },
  { type: FeatureType.AUTOCLEAR, bit: 1, name: 'raw external data' },
];

export const CryptMethod = { NONE: 0, AES: 1, LUKS: 2 } as const;

/** compression_type (header byte 104). QEMU calls deflate "zlib". */
export const CompressionType = { DEFLATE: 0, ZSTD: 1 } as const;

/** QEMU 7.2's implementation limits (block/qcow2.h), and the spec's. */
export const Limits = {
  MIN_CLUSTER_BITS: 9,
  MAX_CLUSTER_BITS: 21,
  MAX_REFCOUNT_ORDER: 6,
  /** QCOW_MAX_L1_SIZE: 32 MiB of L1 entries. */
  MAX_L1_BYTES: 0x2000000,
  /** QCOW_MAX_REFTABLE_SIZE: 8 MiB of refcount table. */
  MAX_REFTABLE_BYTES: 0x800000,
  /** QCOW_MAX_SNAPSHOTS. */
  MAX_SNAPSHOTS: 0x10000,
  /** Backing file name, in bytes (spec; QEMU also keeps it inside cluster 0). */
  MAX_BACKING_NAME_BYTES: 0x3ff,
  /** Backing format name: QEMU refuses an extension of 16 bytes or more. */
  MAX_BACKING_FORMAT_BYTES: 0xf,
  /** QCOW2_MAX_BITMAPS. */
  MAX_BITMAPS: 0xffff,
  /** QCOW2_MAX_BITMAP_DIRECTORY_SIZE: 1 KiB per bitmap. */
  MAX_BITMAP_DIRECTORY_BYTES: 0x400 * 0xffff,
  /** Host offsets must stay below 2^56 (L1/L2 offsets are bits 9–55). */
  HOST_OFFSET_LIMIT: 2 ** 56,
  /** l1_vm_state_index must fit in a C int (QEMU: "Image is too big"). */
  MAX_L1_INDEX: 0x7fffffff,
  /** QEMU omits its feature name table for clusters of this size or smaller. */
  NO_FEATURE_TABLE_MAX_CLUSTER_BYTES: 0x1000,
} as const;

/** Entry sizes in bytes (all tables hold 64-bit entries). */
export const TABLE_ENTRY_BYTES = 8;
export const L1_ENTRY_BYTES = TABLE_ENTRY_BYTES;
export const L2_ENTRY_BYTES = TABLE_ENTRY_BYTES;
export const REFTABLE_ENTRY_BYTES = TABLE_ENTRY_BYTES;
/** QCowSnapshotHeader: the fixed part of a snapshot table entry. */
export const SNAPSHOT_HEADER_BYTES = 40;
/** Compressed cluster sizes count 512-byte sectors. */
export const COMPRESSED_SECTOR_BYTES = 512;

/** Bit masks of L1, L2 and refcount table entries (block/qcow2.h). */
export const EntryMask = {
  /** Bit 63 of L1 and standard L2 entries: refcount is exactly 1. */
  COPIED: 0x8000000000000000n,
  /** Bit 62 of L2 entries: compressed cluster descriptor. */
  COMPRESSED: 0x4000000000000000n,
  /** Bit 0 of a standard L2 entry: reads as zeros (v3). */
  ZERO: 0x1n,
  /** Bits 9–55: L2 table offset (L1 entry), host cluster offset (L2 entry). */
  L1_OFFSET: 0x00fffffffffffe00n,
  L1_RESERVED: 0x7f000000000001ffn,
  L2_OFFSET: 0x00fffffffffffe00n,
  L2_STD_RESERVED: 0x3f000000000001fen,
  /** Bits 9–63: refcount block offset. */
  REFT_OFFSET: 0xfffffffffffffe00n,
  REFT_RESERVED: 0x1ffn,
} as const;

/** Where a compressed cluster's data lives: `sectors` 512-byte sectors from the one holding `hostOffset`. */
export interface CompressedExtent {
  /** Host byte offset of the compressed data (not aligned). */
  hostOffset: number;
  /** Sectors covered, counting the one `hostOffset` is in (additional sectors + 1). */
  sectors: number;
  /** Bytes from `hostOffset` to the end of the last sector: at most this much compressed data. */
  compressedBytes: number;
}

/** The sizes and index arithmetic that cluster_bits and refcount_order imply. */
export class Qcow2Geometry {
  readonly clusterBytes: number;
  /** log2 of L2 entries per table. */
  readonly l2Bits: number;
  readonly l2Entries: number;
  /** Guest bytes one L2 table maps (one L1 entry's reach). */
  readonly l2CoverageBytes: number;
  readonly refcountBits: number;
  readonly refcountBlockEntries: number;
  /** Largest refcount the width holds: 2^bits - 1, but at most 2^53 - 1 for 64-bit refcounts. */
  readonly refcountMax: number;
  /** The spec's x = 62 - (cluster_bits - 8): bits 0..x-1 of a compressed descriptor are the host offset. */
  readonly compressedOffsetBits: number;
  /** Bits x..61 of a compressed descriptor: additional sectors. */
  readonly compressedSectorBits: number;

  /** Programmer error unless 9 ≤ clusterBits ≤ 21 and 0 ≤ refcountOrder ≤ 6 (validate headers first). */
  constructor(
    readonly clusterBits: number,
    readonly refcountOrder: number,
  ) {
    if (!(clusterBits >= Limits.MIN_CLUSTER_BITS && clusterBits <= Limits.MAX_CLUSTER_BITS)) {
      throw new RangeError(`Qcow2Geometry: cluster_bits ${clusterBits} out of range`);
    }
    if (!(refcountOrder >= 0 && refcountOrder <= Limits.MAX_REFCOUNT_ORDER)) {
      throw new RangeError(`Qcow2Geometry: refcount_order ${refcountOrder} out of range`);
    }
    this.clusterBytes = 2 ** clusterBits;
    this.l2Bits = clusterBits - 3;
    this.l2Entries = this.clusterBytes / L2_ENTRY_BYTES;
    this.l2CoverageBytes = this.l2Entries * this.clusterBytes;
    this.refcountBits = 2 ** refcountOrder;
    this.refcountBlockEntries = (this.clusterBytes * 8) / this.refcountBits;
    this.refcountMax = Math.min(2 ** this.refcountBits - 1, Number.MAX_SAFE_INTEGER);
    this.compressedSectorBits = clusterBits - 8;
    this.compressedOffsetBits = 62 - this.compressedSectorBits;
  }

  /** Index of the cluster holding byte `offset` (guest or host). */
  clusterIndex(offset: number): number {
    return Math.floor(offset / this.clusterBytes);
  }

  offsetInCluster(offset: number): number {
    return offset % this.clusterBytes;
  }

  isClusterAligned(offset: number): boolean {
    return offset % this.clusterBytes === 0;
  }

  /** Clusters needed to hold `bytes` (QEMU size_to_clusters). */
  clustersFor(bytes: number): number {
    return Math.ceil(bytes / this.clusterBytes);
  }

  /** L1 index of a guest offset. */
  l1Index(guestOffset: number): number {
    return Math.floor(guestOffset / this.l2CoverageBytes);
  }

  /** L2 index of a guest offset. */
  l2Index(guestOffset: number): number {
    return this.clusterIndex(guestOffset) % this.l2Entries;
  }

  /** L1 entries needed for a virtual disk of `virtualBytes` (QEMU size_to_l1). */
  l1EntriesFor(virtualBytes: number): number {
    return Math.ceil(virtualBytes / this.l2CoverageBytes);
  }

  /** Refcount table index for host cluster `hostCluster`. */
  reftableIndex(hostCluster: number): number {
    return Math.floor(hostCluster / this.refcountBlockEntries);
  }

  /** Index inside its refcount block for host cluster `hostCluster`. */
  refblockIndex(hostCluster: number): number {
    return hostCluster % this.refcountBlockEntries;
  }

  /**
   * The host range of a compressed cluster descriptor (L2 bits 0–61), as
   * QEMU's qcow2_parse_compressed_l2_entry. `hostOffset` is Infinity above
   * 2^53 (possible for cluster_bits < 17; tables.ts refuses it).
   */
  compressedExtent(descriptor: bigint): CompressedExtent {
    const offsetMask = (1n << BigInt(this.compressedOffsetBits)) - 1n;
    const sectorMask = (1n << BigInt(this.compressedSectorBits)) - 1n;
    const hostOffset = u64ToNumber(descriptor & offsetMask);
    const sectors = Number((descriptor >> BigInt(this.compressedOffsetBits)) & sectorMask) + 1;
    const inSector = Number(descriptor & BigInt(COMPRESSED_SECTOR_BYTES - 1));
    return { hostOffset, sectors, compressedBytes: sectors * COMPRESSED_SECTOR_BYTES - inSector };
  }
}
