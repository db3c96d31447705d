/*
 * qcow2's measure (QEMU 7.2's qcow2_measure, qcow2_calc_prealloc_size and
 * qcow2_get_persistent_dirty_bitmap_size): the host bytes of a new qcow2
 * image, without making it.
 *
 * The create options are read in qcow2_measure's order, each failure with
 * its message: extended_l2, cluster_size (a power of two, 512 B – 2 MiB; at
 * least 16 KiB with extended L2), compat (only "0.10" and "1.1" here, unlike
 * create, which also takes v2/v3), refcount_bits, preallocation,
 * backing_file, encrypt.format; then the virtual size (`size`, rounded up
 * to whole clusters) must not need an L1 table over 32 MiB.
 *
 *   fully allocated = the whole virtual size as data clusters, plus the
 *                     metadata a fully allocated image has: header, L2
 *                     tables, L1 table, refcount table and blocks (the
 *                     fixed point of refcountMetadataSize);
 *   required        = fully allocated - virtual size + the clusters that
 *                     hold data in the source: with a source, block status
 *                     through its whole chain; a ZERO run needs nothing, a
 *                     DATA run counts its clusters (each counted once, the
 *                     walk resumes at the next cluster boundary); with a
 *                     backing file (whose content the copy may share or
 *                     not) or full/falloc preallocation, every cluster;
 *   bitmaps         = for a v3 target and a v3 qcow2 source: the clusters
 *                     of each persistent bitmap of the source, its table
 *                     and its directory entry (absent otherwise).
 * Cost: one block-status answer per run of the source, so a sparse
 * multi-TiB source measures in time proportional to its extents.
 *
 * Left out: LUKS encryption (encrypt.format=luks). QEMU computes the LUKS
 * header size from the secret's cipher; this driver has no encryption and
 * refuses, after QEMU's check that a key secret was named.
 */
import { BlockError, strerror } from '../../block/errors.js';
import { PREALLOC_MODES, Status, isPowerOfTwo, type Prealloc } from '../../block/flags.js';
import { optBool, optUint, roundUpBig, type MeasureInfo, type MeasureRequest } from '../../block/measure.js';
import type { BlockNode } from '../../block/node.js';
import { blockStatusAbove } from '../../block/status.js';
import { loadBitmapDirectory } from './check-bitmaps.js';
import { checkFileOf } from './check-io.js';
import { L1_ENTRY_BYTES, L2_ENTRY_BYTES, Limits, Qcow2Version, TABLE_ENTRY_BYTES } from './format.js';
import { refcountMetadataSize } from './refcount-grow.js';
import { stateOf } from './state.js';

/** DEFAULT_CLUSTER_SIZE and the default refcount_bits. */
const DEFAULT_CLUSTER_BYTES = 65536n;
const DEFAULT_REFCOUNT_BITS = 16n;
const MAX_REFCOUNT_BITS = 64n;
/** L2 entries with subcluster bitmaps are twice as wide. */
const EXTENDED_L2_ENTRY_BYTES = 2 * L2_ENTRY_BYTES;
/** Extended L2 needs 32 subclusters of at least 512 bytes. */
const MIN_EXTENDED_L2_CLUSTER_BYTES = 512n * 32n;
/** Fixed part of a bitmap directory entry; entries are padded to 8 bytes. */
const BITMAP_DIR_ENTRY_HEADER_BYTES = 24n;
const BITMAP_DIR_ENTRY_ALIGN_BYTES = 8n;

/** The create options qcow2_measure looks at, checked. */
interface MeasureSpec {
  extendedL2: boolean;
  clusterBytes: bigint;
  version: number;
  refcountBits: bigint;
  prealloc: Prealloc;
  hasBacking: boolean;
  sizeBytes: bigint;
}

const fail = (message: string) => new BlockError('EINVAL', message);

/** qcow2_opt_get_cluster_size_del. */
function clusterBytesOf(opts: ReadonlyMap<string, string>, extendedL2: boolean): bigint {
  const bytes = optUint(opts, 'cluster_size', DEFAULT_CLUSTER_BYTES);
  const min = 1n << BigInt(Limits.MIN_CLUSTER_BITS);
  const max = 1n << BigInt(Limits.MAX_CLUSTER_BITS);
  if (bytes < min || bytes > max || !isPowerOfTwo(Number(bytes))) {
    throw fail(`Cluster size must be a power of two between ${min} and ${max >> 10n}k`);
  }
  if (extendedL2 && bytes < MIN_EXTENDED_L2_CLUSTER_BYTES) {
    throw fail(`Extended L2 entries are only supported with cluster sizes of at least ${MIN_EXTENDED_L2_CLUSTER_BYTES} bytes`);
  }
  return bytes;
}

/** qcow2_opt_get_version_del. */
function versionOf(compat: string | undefined): number {
  if (compat === undefined || compat === '1.1') return Qcow2Version.V3;
  if (compat === '0.10') return Qcow2Version.V2;
  throw fail(`Invalid compatibility level: '${compat}'`);
}

/** qcow2_opt_get_refcount_bits_del. */
function refcountBitsOf(opts: ReadonlyMap<string, string>, version: number): bigint {
  const bits = optUint(opts, 'refcount_bits', DEFAULT_REFCOUNT_BITS);
  if (bits > MAX_REFCOUNT_BITS || !isPowerOfTwo(Number(bits))) {
    throw fail('Refcount width must be a power of two and may not exceed 64 bits');
  }
  if (version < Qcow2Version.V3 && bits !== DEFAULT_REFCOUNT_BITS) {
    throw fail('Different refcount widths than 16 bits require compatibility level 1.1 or above (use compat=1.1 or greater)');
  }
  return bits;
}

/** qapi_enum_parse of PreallocMode. */
function preallocOf(text: string | undefined): Prealloc {
  if (text === undefined) return 'off';
  if (!(PREALLOC_MODES as readonly string[]).includes(text)) throw fail(`invalid parameter value: ${text}`);
  return text as Prealloc;
}

/** The options in qcow2_measure's order (see the note at the top). */
function parseSpec(opts: ReadonlyMap<string, string>): MeasureSpec {
  const extendedL2 = optBool(opts, 'extended_l2', false);
  const clusterBytes = clusterBytesOf(opts, extendedL2);
  const version = versionOf(opts.get('compat'));
  const refcountBits = refcountBitsOf(opts, version);
  const prealloc = preallocOf(opts.get('preallocation'));
  const hasBacking = opts.has('backing_file');
  if (opts.get('encrypt.format') === 'luks') {
    if (!opts.has('encrypt.key-secret')) throw fail("Parameter 'encrypt.key-secret' is required for cipher");
    throw new BlockError('ENOTSUP', 'Encryption is not supported by this qcow2 driver');
  }
  return { extendedL2, clusterBytes, version, refcountBits, prealloc, hasBacking, sizeBytes: optUint(opts, 'size', 0n) };
}

function l2EntryBytes(extendedL2: boolean): bigint {
  return BigInt(extendedL2 ? EXTENDED_L2_ENTRY_BYTES : L2_ENTRY_BYTES);
}

/** The L1 table of `virtualBytes` (whole clusters) must fit QEMU's 32 MiB limit. */
function checkL1Limit(virtualBytes: bigint, spec: MeasureSpec): void {
  const entriesPerTable = spec.clusterBytes / l2EntryBytes(spec.extendedL2);
  const l2Tables = roundUpBig(virtualBytes / spec.clusterBytes, entriesPerTable) / entriesPerTable;
  if (l2Tables * BigInt(L1_ENTRY_BYTES) > BigInt(Limits.MAX_L1_BYTES)) {
    throw fail('The image size is too large (try using a larger cluster size)');
  }
}

/**
 * qcow2_calc_prealloc_size: bytes of an image of `totalBytes` with every
 * cluster allocated — header, L2 tables, L1 table, refcount structures, data.
 */
export function fullyAllocatedBytes(totalBytes: bigint, clusterBytes: bigint, refcountOrder: number, extendedL2: boolean): bigint {
  const c = clusterBytes;
  const l2e = l2EntryBytes(extendedL2);
  const dataBytes = roundUpBig(totalBytes, c);
  const l2Entries = roundUpBig(dataBytes / c, c / l2e);
  const l1Entries = roundUpBig((l2Entries * l2e) / c, c / BigInt(L1_ENTRY_BYTES));
  let metaBytes = c + l2Entries * l2e + l1Entries * BigInt(L1_ENTRY_BYTES);
  const clusters = Number((metaBytes + dataBytes) / c);
  metaBytes += BigInt(refcountMetadataSize(clusters, Number(c), refcountOrder, false).bytes);
  return metaBytes + dataBytes;
}

/** Bytes of whole clusters holding data in `source` (block status through its whole chain). */
async function dataClusterBytes(source: BlockNode, clusterBytes: bigint): Promise<bigint> {
  const c = Number(clusterBytes);
  const end = source.totalBytes;
  let required = 0n;
  for (let offset = 0, pnum = 0; offset < end; offset += pnum) {
    let status: number;
    try {
      ({ status, pnum } = await blockStatusAbove(source, null, offset, end - offset, true));
    } catch (e) {
      if (e instanceof BlockError) throw new BlockError(e.code, `Unable to get block status: ${strerror(e.code)}`, { cause: e });
      throw e;
    }
    if (pnum <= 0) throw new BlockError('EIO', `Unable to get block status: ${strerror('EIO')}`);
    if (status & Status.ZERO) continue;
    if ((status & (Status.DATA | Status.ALLOCATED)) === (Status.DATA | Status.ALLOCATED)) {
      pnum = Math.ceil((offset + pnum) / c) * c - offset;
      required += BigInt((offset % c) + pnum);
    }
  }
  return required;
}

/** bdrv_supports_persistent_dirty_bitmap: a qcow2 v3 image. */
function keepsPersistentBitmaps(node: BlockNode): boolean {
  return node.driver.name === 'qcow2' && stateOf(node).image.header.version >= Qcow2Version.V3;
}

/** qcow2_get_persistent_dirty_bitmap_size: room for the source's bitmaps in a target with `clusterBytes`. */
async function bitmapsBytes(source: BlockNode, clusterBytes: bigint): Promise<bigint> {
  const s = stateOf(source);
  if (s.image.extensions.bitmaps === null) return 0n;
  const list = await loadBitmapDirectory({ image: s.image, file: checkFileOf(s.file), geometry: s.geometry, header: s.image.header });
  if (typeof list === 'string') throw fail(list);
  const lengthBytes = BigInt(source.totalBytes);
  let bytes = 0n;
  let directoryBytes = 0n;
  for (const bm of list) {
    const bits = roundUpBig(lengthBytes, 1n << BigInt(bm.granularityBits)) >> BigInt(bm.granularityBits);
    const clusters = roundUpBig(roundUpBig(bits, 8n) / 8n, clusterBytes) / clusterBytes;
    bytes += clusters * clusterBytes + roundUpBig(clusters * BigInt(TABLE_ENTRY_BYTES), clusterBytes);
    directoryBytes += roundUpBig(BITMAP_DIR_ENTRY_HEADER_BYTES + BigInt(Buffer.byteLength(bm.name)), BITMAP_DIR_ENTRY_ALIGN_BYTES);
  }
  return bytes + roundUpBig(directoryBytes, clusterBytes);
}

/** qcow2_measure (see the note at the top). */
export async function measureQcow2(request: MeasureRequest): Promise<MeasureInfo> {
  const spec = parseSpec(request.opts);
  const c = spec.clusterBytes;
  // uint64 arithmetic, as QEMU's: a size near 2^64 wraps.
  let virtualBytes = BigInt.asUintN(64, roundUpBig(spec.sizeBytes, c));
  checkL1Limit(virtualBytes, spec);
  let dataBytes = 0n;
  const source = request.source;
  if (source) {
    virtualBytes = roundUpBig(BigInt(source.totalBytes), c);
    dataBytes = spec.hasBacking ? virtualBytes : await dataClusterBytes(source, c);
  }
  if (spec.prealloc === 'full' || spec.prealloc === 'falloc') dataBytes = virtualBytes;
  const refcountOrder = Math.log2(Number(spec.refcountBits));
  const fullyAllocated = fullyAllocatedBytes(virtualBytes, c, refcountOrder, spec.extendedL2);
  const info: MeasureInfo = { required: fullyAllocated - virtualBytes + dataBytes, fullyAllocated };
  if (spec.version >= Qcow2Version.V3 && source && keepsPersistentBitmaps(source)) info.bitmaps = await bitmapsBytes(source, c);
  return info;
}
