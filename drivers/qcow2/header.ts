/*
 * The qcow2 header and the first cluster around it.
 *
 * Cluster 0 holds, in order: the header (72 bytes in v2; header_length
 * bytes in v3, of which QEMU 7.2 knows 112), the header extensions up to an
 * end marker, then the backing file name, not NUL-terminated. QEMU keeps all
 * of it inside the cluster and rewrites the whole cluster whenever anything
 * in it changes (qcow2_update_header); `encodeHeaderCluster` produces the
 * same bytes:
 *   - v3 headers are written 112 bytes long, whatever length was read, with
 *     fields QEMU does not know (bytes 112..header_length) copied after them
 *     and counted in header_length; v2 headers are 72 bytes and have none;
 *   - extensions in QEMU's order (see extensions.ts), each padded to 8 bytes,
 *     then the end marker;
 *   - the backing name right after the end marker; backing_file_offset and
 *     backing_file_size are derived from where it lands (0, 0 without one);
 *   - zeros to the end of the cluster.
 *
 * `decodeHeader` is total: it reads the fixed fields of any bytes, reading
 * zeros past their end as QEMU does past the end of a short file, so every
 * verdict comes from the validators (validate.ts) in QEMU's order. 64-bit
 * offsets and sizes above 2^53 decode as Infinity and always fail
 * validation. `decodeHeaderCluster` runs the whole open sequence over the
 * first cluster: header checks, extensions, backing name, then our layout
 * checks. The snapshot table, the L1 table and the refcount structures are
 * outside cluster 0 and are read by the driver.
 *
 * QEMU behaviours a driver must reproduce itself (they are policy, not
 * format): the virtual size is used rounded down to 512 bytes and written
 * back that way; unknown autoclear bits are cleared at a read-write open
 * (AUTOCLEAR_KNOWN_MASK; see format.ts for bitmaps); the dirty bit asks for a
 * refcount repair; unknown extensions come back in reverse order after each
 * QEMU rewrite (QEMU's list is built by inserting at its head) — we keep
 * file order, so our rewrite of a QEMU rewrite differs from QEMU's only there.
 */
import { ByteReader, ByteWriter, decodeCString, encodeUtf8, u64ToNumber } from './cursor.js';
import { decodeExtensions, encodeExtensions, readFeatureTable, type Qcow2Extensions } from './extensions.js';
import { HeaderBytes, Limits, Qcow2Version } from './format.js';
import { invalidHeaderFields, invalidLayout, type HeaderCheckOptions } from './validate.js';

/*
 * Header byte map (big-endian):
 *     0  u32  magic                    "QFI\xfb"
 *     4  u32  version                  2 or 3
 *     8  u64  backing_file_offset      0: no backing file
 *    16  u32  backing_file_size        bytes of the name
 *    20  u32  cluster_bits
 *    24  u64  size                     virtual disk bytes
 *    32  u32  crypt_method             0 none, 1 AES, 2 LUKS
 *    36  u32  l1_size                  entries of the active L1 table
 *    40  u64  l1_table_offset
 *    48  u64  refcount_table_offset
 *    56  u32  refcount_table_clusters
 *    60  u32  nb_snapshots
 *    64  u64  snapshots_offset
 *    ---- v2 ends here (72); v3 continues ----
 *    72  u64  incompatible_features
 *    80  u64  compatible_features
 *    88  u64  autoclear_features
 *    96  u32  refcount_order           v2: always 4
 *   100  u32  header_length            v2: always 72; v3: ≥ 104
 *   104  u8   compression_type         only when header_length > 104
 *   105  7 bytes padding (zero)
 *   112  fields newer than QEMU 7.2, up to header_length
 */
export interface Qcow2Header {
  magic: number;
  version: number;
  backingFileOffset: number;
  /** backing_file_size: bytes of the backing file name. */
  backingFileBytes: number;
  clusterBits: number;
  /** size: the virtual disk, in bytes. */
  virtualBytes: number;
  cryptMethod: number;
  /** l1_size: entries of the active L1 table. */
  l1Entries: number;
  l1TableOffset: number;
  refcountTableOffset: number;
  refcountTableClusters: number;
  /** nb_snapshots. */
  snapshotCount: number;
  snapshotsOffset: number;
  incompatibleFeatures: bigint;
  compatibleFeatures: bigint;
  autoclearFeatures: bigint;
  refcountOrder: number;
  /** header_length (72 for v2). */
  headerBytes: number;
  compressionType: number;
}

/** Offset of compression_type; present only when header_length is larger. */
const COMPRESSION_TYPE_OFFSET = 104;
/** v2 images have 16-bit refcounts. */
const V2_REFCOUNT_ORDER = 4;

/** The fixed header fields of `bytes` (the start of the image; zeros past its end). */
export function decodeHeader(bytes: Uint8Array): Qcow2Header {
  const r = new ByteReader(bytes);
  const header: Qcow2Header = {
    magic: r.u32(),
    version: r.u32(),
    backingFileOffset: u64ToNumber(r.u64()),
    backingFileBytes: r.u32(),
    clusterBits: r.u32(),
    virtualBytes: u64ToNumber(r.u64()),
    cryptMethod: r.u32(),
    l1Entries: r.u32(),
    l1TableOffset: u64ToNumber(r.u64()),
    refcountTableOffset: u64ToNumber(r.u64()),
    refcountTableClusters: r.u32(),
    snapshotCount: r.u32(),
    snapshotsOffset: u64ToNumber(r.u64()),
    incompatibleFeatures: 0n,
    compatibleFeatures: 0n,
    autoclearFeatures: 0n,
    refcountOrder: V2_REFCOUNT_ORDER,
    headerBytes: HeaderBytes.V2,
    compressionType: 0,
  };
  if (header.version === Qcow2Version.V2) return header;
  header.incompatibleFeatures = r.u64();
  header.compatibleFeatures = r.u64();
  header.autoclearFeatures = r.u64();
  header.refcountOrder = r.u32();
  header.headerBytes = r.u32();
  if (header.headerBytes > COMPRESSION_TYPE_OFFSET) header.compressionType = r.u8();
  return header;
}

/** The fixed header: 72 bytes for v2, 112 for v3 (header_length written as `headerBytes`). */
export function encodeHeader(header: Qcow2Header): Uint8Array {
  const v2 = header.version === Qcow2Version.V2;
  const out = new Uint8Array(v2 ? HeaderBytes.V2 : HeaderBytes.V3);
  const w = new ByteWriter(out)
    .u32(header.magic)
    .u32(header.version)
    .u64(header.backingFileOffset)
    .u32(header.backingFileBytes)
    .u32(header.clusterBits)
    .u64(header.virtualBytes)
    .u32(header.cryptMethod)
    .u32(header.l1Entries)
    .u64(header.l1TableOffset)
    .u64(header.refcountTableOffset)
    .u32(header.refcountTableClusters)
    .u32(header.snapshotCount)
    .u64(header.snapshotsOffset);
  if (v2) return out;
  w.u64(header.incompatibleFeatures)
    .u64(header.compatibleFeatures)
    .u64(header.autoclearFeatures)
    .u32(header.refcountOrder)
    .u32(header.headerBytes)
    .u8(header.compressionType);
  return out;
}

/** Everything cluster 0 holds. */
export interface Qcow2HeaderCluster {
  header: Qcow2Header;
  /** v3 bytes 112..header_length: fields QEMU 7.2 does not know; kept on rewrite. Empty for v2. */
  unknownFields: Uint8Array;
  extensions: Qcow2Extensions;
  /** The backing file name as stored; null without a backing file. */
  backingName: string | null;
}

/**
 * How many bytes from offset 0 `decodeHeaderCluster` needs, judged from the
 * first `HeaderBytes.V3` bytes of the file (fewer if the file is shorter):
 * the first cluster, or just those bytes when cluster_bits is out of range
 * (they are enough to refuse the image). Read min(this, file length).
 */
export function headerClusterBytes(prefix: Uint8Array): number {
  const { clusterBits } = decodeHeader(prefix);
  const valid = clusterBits >= Limits.MIN_CLUSTER_BITS && clusterBits <= Limits.MAX_CLUSTER_BITS;
  return valid ? 2 ** clusterBits : HeaderBytes.V3;
}

/**
 * Decodes and validates cluster 0 in QEMU's open order (header fields,
 * extensions, backing file name) and then our layout checks. `cluster` is the
 * first cluster of the file, or the whole file if it is shorter (a programmer
 * error otherwise: see headerClusterBytes); `fileBytes` the file length.
 * Returns the first reason the image cannot be opened.
 */
export function decodeHeaderCluster(cluster: Uint8Array, fileBytes: number, options: { check?: boolean } = {}): Qcow2HeaderCluster | string {
  const needed = Math.min(headerClusterBytes(cluster), fileBytes);
  if (cluster.length < needed) throw new RangeError(`decodeHeaderCluster: ${cluster.length} bytes given, the first ${needed} needed`);
  const header = decodeHeader(cluster);
  const checkOptions: HeaderCheckOptions = { ...options, featureTable: () => readFeatureTable(cluster, header) };
  const fieldReason = invalidHeaderFields(header, checkOptions);
  if (fieldReason !== null) return fieldReason;
  const extensions = decodeExtensions(cluster, header);
  if (typeof extensions === 'string') return extensions;
  const backingName = decodeBackingName(cluster, header);
  if (backingName === undefined) return 'Backing file name too long';
  const layoutReason = invalidLayout(header, fileBytes, options);
  if (layoutReason !== null) return layoutReason;
  return { header, unknownFields: decodeUnknownFields(cluster, header), extensions, backingName };
}

/** The stored backing name (null: none), or undefined when it does not fit QEMU's limits. */
function decodeBackingName(cluster: Uint8Array, header: Qcow2Header): string | null | undefined {
  if (header.backingFileOffset === 0) return null;
  const clusterBytes = 2 ** header.clusterBits;
  const limit = Math.min(Limits.MAX_BACKING_NAME_BYTES, clusterBytes - header.backingFileOffset);
  if (header.backingFileBytes > limit) return undefined;
  const reader = new ByteReader(cluster, header.backingFileOffset);
  return decodeCString(reader.bytesCopy(header.backingFileBytes));
}

function decodeUnknownFields(cluster: Uint8Array, header: Qcow2Header): Uint8Array {
  if (header.version === Qcow2Version.V2 || header.headerBytes <= HeaderBytes.V3) return new Uint8Array(0);
  return new ByteReader(cluster, HeaderBytes.V3).bytesCopy(header.headerBytes - HeaderBytes.V3);
}

/**
 * Cluster 0 as QEMU's qcow2_update_header writes it for this state (see the
 * design note): a buffer of 2^cluster_bits bytes, or the reason it cannot be
 * written. The header must be valid; header_length, backing_file_offset and
 * backing_file_size are derived, not taken from `image.header`.
 */
export function encodeHeaderCluster(image: Qcow2HeaderCluster): Uint8Array | string {
  const { header, extensions, backingName } = image;
  const clusterBytes = 2 ** header.clusterBits;
  const v2 = header.version === Qcow2Version.V2;
  const unknownFields = v2 ? new Uint8Array(0) : image.unknownFields;
  const fixedBytes = v2 ? HeaderBytes.V2 : HeaderBytes.V3;
  const name = backingName === null ? null : encodeUtf8(backingName);
  if (name !== null && name.length > Limits.MAX_BACKING_NAME_BYTES) return 'Backing file name too long';
  const area = encodeExtensions(extensions, header);
  if (typeof area === 'string') return area;
  const nameOffset = fixedBytes + unknownFields.length + area.length;
  if (nameOffset + (name?.length ?? 0) > clusterBytes) return 'qcow2 header does not fit in a cluster';
  const written: Qcow2Header = {
    ...header,
    headerBytes: fixedBytes + unknownFields.length,
    backingFileOffset: name === null ? 0 : nameOffset,
    backingFileBytes: name?.length ?? 0,
  };
  const out = new Uint8Array(clusterBytes);
  const w = new ByteWriter(out).bytes(encodeHeader(written)).bytes(unknownFields).bytes(area);
  if (name !== null) w.bytes(name);
  return out;
}
