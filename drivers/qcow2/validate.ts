/*
 * Validators for qcow2 headers: each returns the reason an image cannot be
 * opened, or null. Reasons are QEMU 7.2's error texts where QEMU has one
 * (qcow2_do_open, qcow2_validate_table, validate_compression_type,
 * report_unsupported_feature, qcow2_update_options), and the checks run in
 * qcow2_do_open's order, so the first reason is the one qemu-img prints after
 * "Could not open 'x': ". `reasonToError` maps a reason to the errno QEMU
 * returns with it.
 *
 * Where we are stricter than QEMU it is said here:
 *   - incompatible features we do not implement yet (external data file,
 *     compression type, i.e. zstd, extended L2 entries) are refused exactly
 *     like unknown ones, "Unsupported qcow2 feature(s): <names>" (ENOTSUP),
 *     named from the image's feature table, else from QEMU's;
 *   - AES and LUKS encryption are refused (ENOTSUP) where QEMU checks the
 *     encryption method;
 *   - table offsets must keep the whole table below 2^56 (QEMU: INT64_MAX);
 *     64-bit values above 2^53 arrive here as Infinity and fail the same
 *     check (or "Image is too big" for the virtual size);
 *   - `invalidLayout` (our own, run after QEMU's checks) refuses tables that
 *     extend past the end of the file or overlap the header cluster or each
 *     other. QEMU opens such images and reads zeros past the end of the file.
 * Options mirror QEMU's BDRV_O_CHECK for `qemu-img check`: a missing refcount
 * table is tolerated and the snapshot table is not checked (its offset may
 * then be anything, Infinity included).
 */
import { BlockError, type ErrnoCode } from '../../block/errors.js';
import {
  CompressionType,
  CryptMethod,
  FeatureType,
  Incompat,
  L1_ENTRY_BYTES,
  Limits,
  QCOW2_MAGIC,
  QEMU_FEATURE_TABLE,
  Qcow2Geometry,
  Qcow2Version,
  SNAPSHOT_HEADER_BYTES,
  HeaderBytes,
  type FeatureName,
} from './format.js';
import type { Qcow2Header } from './header.js';

/** Incompatible features this implementation handles; any other bit refuses the image. */
export const SUPPORTED_INCOMPAT_MASK = Incompat.DIRTY | Incompat.CORRUPT;

export interface HeaderCheckOptions {
  /** Open for `qemu-img check` (QEMU's BDRV_O_CHECK). */
  check?: boolean;
  /**
   * The image's feature name table, used only to name unsupported features.
   * A function, because QEMU reads it only once the earlier checks passed.
   */
  featureTable?: () => readonly FeatureName[] | null;
}

type HeaderCheck = (h: Qcow2Header, options: HeaderCheckOptions) => string | null;

/** The header checks in qcow2_do_open's order. */
const HEADER_CHECKS: readonly HeaderCheck[] = [
  (h) => (h.magic !== QCOW2_MAGIC ? 'Image is not in qcow2 format' : null),
  (h) => (h.version !== Qcow2Version.V2 && h.version !== Qcow2Version.V3 ? `Unsupported qcow2 version ${h.version}` : null),
  (h) => (h.clusterBits < Limits.MIN_CLUSTER_BITS || h.clusterBits > Limits.MAX_CLUSTER_BITS ? `Unsupported cluster size: 2^${h.clusterBits}` : null),
  invalidHeaderLength,
  (h) => (h.backingFileOffset > 2 ** h.clusterBits ? 'Invalid backing file offset' : null),
  invalidCompressionType,
  (h, options) => (h.incompatibleFeatures & ~SUPPORTED_INCOMPAT_MASK ? invalidFeatures(h.incompatibleFeatures, options.featureTable?.() ?? null) : null),
  (h) => (h.refcountOrder > Limits.MAX_REFCOUNT_ORDER ? 'Reference count entry width too large; may not exceed 64 bits' : null),
  invalidRefcountTable,
  (h, options) => (options.check ? null : invalidSnapshotTable(h)),
  (h) => invalidTable(h, h.l1TableOffset, h.l1Entries, L1_ENTRY_BYTES, Limits.MAX_L1_BYTES, 'Active L1 table'),
  invalidVirtualSize,
  invalidEncryption,
];

/** QEMU's header checks, first failure first. */
export function invalidHeaderFields(header: Qcow2Header, options: HeaderCheckOptions = {}): string | null {
  for (const check of HEADER_CHECKS) {
    const reason = check(header, options);
    if (reason !== null) return reason;
  }
  return null;
}

/** QEMU's header checks, then our layout checks against a file of `fileBytes`. */
export function invalidHeader(header: Qcow2Header, fileBytes: number, options: HeaderCheckOptions = {}): string | null {
  return invalidHeaderFields(header, options) ?? invalidLayout(header, fileBytes, options);
}

function invalidHeaderLength(h: Qcow2Header): string | null {
  if (h.version === Qcow2Version.V3 && h.headerBytes < HeaderBytes.V3_MIN) return 'qcow2 header too short';
  if (h.headerBytes > 2 ** h.clusterBits) return 'qcow2 header exceeds cluster size';
  return null;
}

function invalidCompressionType(h: Qcow2Header): string | null {
  const flagged = (h.incompatibleFeatures & Incompat.COMPRESSION) !== 0n;
  switch (h.compressionType) {
    case CompressionType.DEFLATE:
      return flagged ? 'qcow2: Compression type incompatible feature bit must not be set' : null;
    case CompressionType.ZSTD:
      return flagged ? null : 'qcow2: Compression type incompatible feature bit must be set';
    default:
      return `qcow2: unknown compression type: ${h.compressionType}`;
  }
}

/** "Unsupported qcow2 feature(s): …" for incompatible bits we do not handle, else null. */
export function invalidFeatures(incompatible: bigint, imageTable: readonly FeatureName[] | null): string | null {
  let rest = incompatible & ~SUPPORTED_INCOMPAT_MASK;
  if (rest === 0n) return null;
  const names: string[] = [];
  for (const feature of [...(imageTable ?? []), ...QEMU_FEATURE_TABLE]) {
    const bit = feature.bit < 64 ? 1n << BigInt(feature.bit) : 0n;
    if (feature.type !== FeatureType.INCOMPATIBLE || !(rest & bit)) continue;
    names.push(feature.name);
    rest &= ~bit;
  }
  if (rest !== 0n) names.push(`Unknown incompatible feature: ${rest.toString(16)}`);
  return `Unsupported qcow2 feature(s): ${names.join(', ')}`;
}

function invalidRefcountTable(h: Qcow2Header, options: HeaderCheckOptions): string | null {
  if (h.refcountTableClusters === 0 && !options.check) return 'Image does not contain a reference count table';
  const clusterBytes = 2 ** h.clusterBits;
  return invalidTable(h, h.refcountTableOffset, h.refcountTableClusters, clusterBytes, Limits.MAX_REFTABLE_BYTES, 'Reference count table');
}

function invalidSnapshotTable(h: Qcow2Header): string | null {
  const maxBytes = SNAPSHOT_HEADER_BYTES * Limits.MAX_SNAPSHOTS;
  return invalidTable(h, h.snapshotsOffset, h.snapshotCount, SNAPSHOT_HEADER_BYTES, maxBytes, 'Snapshot table');
}

/** qcow2_validate_table, with the table kept below 2^56 instead of INT64_MAX. */
export function invalidTable(h: Qcow2Header, offset: number, entries: number, entryBytes: number, maxBytes: number, name: string): string | null {
  if (entries > Math.floor(maxBytes / entryBytes)) return `${name} too large`;
  const aligned = offset % 2 ** h.clusterBits === 0;
  if (!aligned || offset > Limits.HOST_OFFSET_LIMIT - entries * entryBytes) return `${name} offset invalid`;
  return null;
}

function invalidVirtualSize(h: Qcow2Header): string | null {
  const l1Needed = new Qcow2Geometry(h.clusterBits, h.refcountOrder).l1EntriesFor(h.virtualBytes);
  if (l1Needed > Limits.MAX_L1_INDEX) return 'Image is too big';
  if (h.l1Entries < l1Needed) return 'L1 table is too small';
  return null;
}

const REFUSED_CRYPT_METHODS: Readonly<Record<number, string>> = { [CryptMethod.AES]: 'AES', [CryptMethod.LUKS]: 'LUKS' };

function invalidEncryption(h: Qcow2Header): string | null {
  if (h.cryptMethod === CryptMethod.NONE) return null;
  const refused = REFUSED_CRYPT_METHODS[h.cryptMethod];
  if (refused === undefined) return `Unsupported encryption method ${h.cryptMethod}`;
  return `Unsupported encryption method ${h.cryptMethod} (${refused}): encrypted qcow2 images are not supported`;
}

interface Region {
  name: string;
  start: number;
  bytes: number;
}

function tableRegions(h: Qcow2Header, options: HeaderCheckOptions): Region[] {
  const clusterBytes = 2 ** h.clusterBits;
  const regions: Region[] = [
    { name: 'Reference count table', start: h.refcountTableOffset, bytes: h.refcountTableClusters * clusterBytes },
    { name: 'Snapshot table', start: h.snapshotsOffset, bytes: options.check ? 0 : h.snapshotCount * SNAPSHOT_HEADER_BYTES },
    { name: 'Active L1 table', start: h.l1TableOffset, bytes: h.l1Entries * L1_ENTRY_BYTES },
  ];
  return regions.filter((r) => r.bytes > 0);
}

/**
 * Our layout checks (QEMU has none at open): every table inside the file and
 * clear of cluster 0 and of the other tables. The snapshot table counts its
 * fixed 40-byte entry headers only, a lower bound of its size. Run after
 * `invalidHeaderFields`: offsets and sizes must be in range.
 */
export function invalidLayout(header: Qcow2Header, fileBytes: number, options: HeaderCheckOptions = {}): string | null {
  const clusterBytes = 2 ** header.clusterBits;
  const regions = tableRegions(header, options);
  for (const [i, r] of regions.entries()) {
    if (r.start + r.bytes > fileBytes) return `${r.name} extends past the end of the image file`;
    if (r.start < clusterBytes) return `${r.name} overlaps the qcow2 header`;
    const other = regions.slice(0, i).find((o) => r.start < o.start + o.bytes && o.start < r.start + r.bytes);
    if (other) return `${r.name} overlaps the ${other.name.toLowerCase()}`;
  }
  return null;
}

/** QEMU's refusal to open a corrupt image read-write (EACCES); `qemu-img check -r` may. */
export function invalidForWriting(header: Qcow2Header, options: HeaderCheckOptions = {}): string | null {
  if (!(header.incompatibleFeatures & Incompat.CORRUPT) || options.check) return null;
  return 'qcow2: Image is corrupt; cannot be opened read/write';
}

/** Reason patterns and the errno QEMU returns with them; anything else is EINVAL. */
const REASON_CODES: ReadonlyArray<readonly [RegExp, ErrnoCode]> = [
  [/^(Active L1|Reference count|Snapshot) table too large$|^Image is too big$/, 'EFBIG'],
  [/^Unsupported qcow2 (version|feature)|^qcow2: unknown compression type|not supported$/, 'ENOTSUP'],
  [/beyond the 2\^\d+ bytes/, 'EFBIG'],
  [/^qcow2: Image is corrupt/, 'EACCES'],
  [/does not fit in a cluster$/, 'ENOSPC'],
  [/refcount maximum/, 'ERANGE'],
  [/unaligned \(|pre-v3 image|reserved bits set|must never be set|at or beyond 2\^56|exceeds 2\^53/, 'EIO'],
];

/** The BlockError QEMU would return with this reason (one line, the reason as message). */
export function reasonToError(reason: string): BlockError {
  const match = REASON_CODES.find(([pattern]) => pattern.test(reason));
  return new BlockError(match?.[1] ?? 'EINVAL', reason);
}
