/*
 * `qemu-img create -f qcow2` (QEMU's qcow2_co_create_opts and
 * qcow2_co_create).
 *
 * Options are QEMU 7.2's, in the order its Formatting line prints them
 * (`QCOW2_CREATE_OPTS`). They are all checked, in qcow2_co_create's order
 * and with its messages, before anything is written: QEMU creates the file
 * first and deletes it on failure; checking first leaves the same result
 * (no file) without touching an existing one. Refused here with our own
 * messages, after QEMU's checks: encryption, external data files,
 * extended L2 entries, zstd compression.
 *
 * The image is made the way QEMU makes it, so the bytes are the same: the
 * file (with the protocol's own options, e.g. nocow, none of qcow2's), a
 * header cluster for a 0-byte image (with the backing file name and
 * format), the refcount table in cluster 1, one refcount block in cluster 2
 * counting clusters 0–2; then the image is opened with this driver and
 * resized to its size with the requested preallocation, which puts the L1
 * table in cluster 3 (the file ends after its entries) and preallocates as
 * QEMU does (prealloc.ts).
 */
import { BlockError } from '../../block/errors.js';
import { PREALLOC_MODES, isPowerOfTwo, type Prealloc } from '../../block/flags.js';
import { BlockBackend } from '../../block/backend.js';
import type { CreateContext, CreateOptDesc, CreateRequest } from '../../block/driver.js';
import { parseWith, zBool, zInt, zSize } from '../../block/options.js';
import { Compat, HeaderBytes, Limits, QCOW2_MAGIC, Qcow2Geometry } from './format.js';
import { encodeHeaderCluster } from './header.js';
import { emptyExtensions } from './extensions.js';
import { refcountCodec } from './refcount.js';
import { encodeReftableEntry, writeTableEntry } from './tables.js';
import { withErrno, withPrefix } from './failure-words.js';

const DEFAULT_CLUSTER_BYTES = 65536;
/** Clusters of a new image before its L1 table: header, refcount table, refcount block. */
const INITIAL_CLUSTERS = 3;

const crypto = (name: string, help: string, type: CreateOptDesc['type'] = 'string'): CreateOptDesc => ({ name: `encrypt.${name}`, type, help });

export const QCOW2_CREATE_OPTS: readonly CreateOptDesc[] = [
  { name: 'encryption', type: 'bool', help: "Encrypt the image with format 'aes'. (Deprecated in favor of encrypt.format=aes)" },
  crypto('format', "Encrypt the image, format choices: 'aes', 'luks'"),
  crypto('key-secret', 'ID of secret providing qcow AES key or LUKS passphrase'),
  crypto('cipher-alg', 'Name of encryption cipher algorithm'),
  crypto('cipher-mode', 'Name of encryption cipher mode'),
  crypto('ivgen-alg', 'Name of IV generator algorithm'),
  crypto('ivgen-hash-alg', 'Name of IV generator hash algorithm'),
  crypto('hash-alg', 'Name of encryption hash algorithm'),
  crypto('iter-time', 'Time to spend in PBKDF in milliseconds', 'number'),
  { name: 'cluster_size', type: 'size', help: 'qcow2 cluster size', defaultValue: String(DEFAULT_CLUSTER_BYTES) },
  { name: 'extended_l2', type: 'bool', help: 'Extended L2 tables', defaultValue: 'off' },
  { name: 'preallocation', type: 'string', help: 'Preallocation mode (allowed values: off, metadata, falloc, full)' },
  { name: 'compression_type', type: 'string', help: 'Compression method used for image cluster compression', defaultValue: 'zlib' },
  { name: 'size', type: 'size', help: 'Virtual disk size' },
  { name: 'compat', type: 'string', help: 'Compatibility level (v2 [0.10] or v3 [1.1])' },
  { name: 'backing_file', type: 'string', help: 'File name of a base image' },
  { name: 'backing_fmt', type: 'string', help: 'Image format of the base image' },
  { name: 'data_file', type: 'string', help: 'File name of an external data file' },
  { name: 'data_file_raw', type: 'bool', help: 'The external data file must stay valid as a raw image' },
  { name: 'lazy_refcounts', type: 'bool', help: 'Postpone refcount updates', defaultValue: 'off' },
  { name: 'refcount_bits', type: 'number', help: 'Width of a reference count entry in bits', defaultValue: '16' },
];

/** QEMU 7.2's BlockdevDriver names: what backing_fmt may be. */
export const BLOCKDEV_DRIVERS = new Set(
  ('blkdebug blklogwrites blkreplay blkverify bochs cloop compress copy-before-write copy-on-read dmg file snapshot-access ' +
    'ftp ftps gluster host_cdrom host_device http https io_uring iscsi luks nbd nfs null-aio null-co nvme nvme-io_uring ' +
    'parallels preallocate qcow qcow2 qed quorum raw rbd replication ssh throttle vdi vhdx virtio-blk-vfio-pci ' +
    'virtio-blk-vhost-user virtio-blk-vhost-vdpa vmdk vpc vvfat').split(' '),
);

export interface Qcow2CreateSpec {
  sizeBytes: number;
  version: 2 | 3;
  clusterBytes: number;
  refcountBits: number;
  lazyRefcounts: boolean;
  prealloc: Prealloc;
  backingFile: string | null;
  backingFormat: string | null;
}

const enumError = (key: string, value: string) => new BlockError('EINVAL', `Parameter '${key}' does not accept value '${value}'`);
const fail = (message: string) => new BlockError('EINVAL', message);
const V3_HINT = '(use version=v3 or greater)';

function parseVersion(compat: string | undefined): 2 | 3 {
  if (compat === undefined || compat === '1.1' || compat === 'v3') return 3;
  if (compat === '0.10' || compat === 'v2') return 2;
  throw enumError('version', compat);
}

/** The create options, checked in QEMU's order (see the note at the top). */
export function parseCreateSpec(opts: Map<string, string>): Qcow2CreateSpec {
  const bool = (key: string) => parseWith(zBool(key), opts.get(key) ?? 'off');
  const extendedL2 = bool('extended_l2');
  const sizeBytes = Math.ceil(parseWith(zSize('size'), opts.get('size') ?? '0') / 512) * 512;
  const version = parseVersion(opts.get('compat'));
  const backingFile = opts.get('backing_file') ?? null;
  const backingFormat = opts.get('backing_fmt') ?? null;
  if (backingFormat !== null && !BLOCKDEV_DRIVERS.has(backingFormat)) throw enumError('backing-fmt', backingFormat);
  const encryptFormat = opts.get('encrypt.format') ?? (bool('encryption') ? 'aes' : undefined);
  if (encryptFormat !== undefined && encryptFormat !== 'aes' && encryptFormat !== 'luks') throw enumError('encrypt.format', encryptFormat);
  const clusterBytes = parseWith(zSize('cluster_size'), opts.get('cluster_size') ?? String(DEFAULT_CLUSTER_BYTES));
  const prealloc = opts.get('preallocation') ?? 'off';
  if (!(PREALLOC_MODES as readonly string[]).includes(prealloc)) throw enumError('preallocation', prealloc);
  const lazyRefcounts = bool('lazy_refcounts');
  const refcountBits = parseWith(zInt('refcount_bits'), opts.get('refcount_bits') ?? '16');
  const compression = opts.get('compression_type') ?? 'zlib';
  if (compression !== 'zlib' && compression !== 'zstd') throw enumError('compression-type', compression);
  const spec: Qcow2CreateSpec = { sizeBytes, version, clusterBytes, refcountBits, lazyRefcounts, prealloc: prealloc as Prealloc, backingFile, backingFormat };
  checkCombinations(spec, { extendedL2, dataFile: opts.get('data_file'), dataFileRaw: bool('data_file_raw'), compression, encryptFormat });
  return spec;
}

interface Unsupported {
  extendedL2: boolean;
  dataFile: string | undefined;
  dataFileRaw: boolean;
  compression: string;
  encryptFormat: string | undefined;
}

/** qcow2_co_create's checks, then our refusals. */
function checkCombinations(spec: Qcow2CreateSpec, u: Unsupported): void {
  const v2 = spec.version === 2;
  if (u.extendedL2 && v2) throw fail(`Extended L2 entries are only supported with compatibility level 1.1 and above ${V3_HINT}`);
  const bits = Math.log2(spec.clusterBytes);
  if (!isPowerOfTwo(spec.clusterBytes) || bits < Limits.MIN_CLUSTER_BITS || bits > Limits.MAX_CLUSTER_BITS) {
    throw fail(`Cluster size must be a power of two between ${2 ** Limits.MIN_CLUSTER_BITS} and ${2 ** (Limits.MAX_CLUSTER_BITS - 10)}k`);
  }
  if (u.extendedL2 && spec.clusterBytes < 16384) throw fail('Extended L2 entries are only supported with cluster sizes of at least 16384 bytes');
  if (spec.backingFile !== null && spec.prealloc !== 'off' && !u.extendedL2) {
    throw fail('Backing file and preallocation can only be used at the same time if extended_l2 is on');
  }
  if (spec.backingFormat !== null && spec.backingFile === null) throw fail('Backing format cannot be used without backing file');
  if (v2 && spec.lazyRefcounts) throw fail(`Lazy refcounts only supported with compatibility level 1.1 and above ${V3_HINT}`);
  if (spec.refcountBits > 64 || !isPowerOfTwo(spec.refcountBits)) throw fail('Refcount width must be a power of two and may not exceed 64 bits');
  if (v2 && spec.refcountBits !== 16) throw fail(`Different refcount widths than 16 bits require compatibility level 1.1 or above ${V3_HINT}`);
  if (u.dataFileRaw && u.dataFile === undefined) throw fail('data-file-raw requires data-file');
  if (u.dataFileRaw && spec.backingFile !== null) throw fail('Backing file and data-file-raw cannot be used at the same time');
  if (u.dataFile !== undefined && v2) throw fail(`External data files are only supported with compatibility level 1.1 and above ${V3_HINT}`);
  if (u.compression !== 'zlib' && v2) throw fail(`Non-zlib compression type is only supported with compatibility level 1.1 and above ${V3_HINT}`);
  const refuse = (what: string) => new BlockError('ENOTSUP', `${what} not supported by this qcow2 driver`);
  if (u.dataFile !== undefined) throw refuse('External data files are');
  if (u.extendedL2) throw refuse('Extended L2 entries are');
  if (u.compression !== 'zlib') throw refuse(`Compression type '${u.compression}' is`);
  if (u.encryptFormat !== undefined) throw refuse('Encryption is');
}

/** Header cluster, refcount table and one refcount block for an empty image (what QEMU has before resizing it). */
export function initialImage(spec: Qcow2CreateSpec): Uint8Array {
  const geometry = new Qcow2Geometry(Math.log2(spec.clusterBytes), Math.log2(spec.refcountBits));
  const c = geometry.clusterBytes;
  const v3 = spec.version === 3;
  const cluster0 = encodeHeaderCluster({
    header: {
      magic: QCOW2_MAGIC, version: spec.version, backingFileOffset: 0, backingFileBytes: 0, clusterBits: geometry.clusterBits,
      virtualBytes: 0, cryptMethod: 0, l1Entries: 0, l1TableOffset: 0, refcountTableOffset: c, refcountTableClusters: 1,
      snapshotCount: 0, snapshotsOffset: 0, incompatibleFeatures: 0n, compatibleFeatures: spec.lazyRefcounts ? Compat.LAZY_REFCOUNTS : 0n,
      autoclearFeatures: 0n, refcountOrder: geometry.refcountOrder, headerBytes: v3 ? HeaderBytes.V3 : HeaderBytes.V2, compressionType: 0,
    },
    unknownFields: new Uint8Array(0),
    extensions: { ...emptyExtensions(), backingFormat: spec.backingFile !== null ? spec.backingFormat : null },
    backingName: spec.backingFile,
  });
  if (typeof cluster0 === 'string') throw new BlockError('EINVAL', cluster0);
  const image = new Uint8Array(INITIAL_CLUSTERS * c);
  image.set(cluster0);
  writeTableEntry(image.subarray(c, 2 * c), 0, encodeReftableEntry(2 * c));
  const block = new DataView(image.buffer, 2 * c, c);
  const codec = refcountCodec(geometry.refcountOrder);
  for (let i = 0; i < INITIAL_CLUSTERS; i++) codec.set(block, i, 1);
  return image;
}

/** qcow2_co_create_opts (see the note at the top). */
export async function coCreate(ctx: CreateContext, request: CreateRequest): Promise<void> {
  const spec = parseCreateSpec(request.opts);
  const own = new Set(QCOW2_CREATE_OPTS.map((o) => o.name));
  await ctx.graph.createFile(request.filename, new Map([...request.opts].filter(([k]) => !own.has(k))));
  const protocol = ctx.graph.protocolFor(request.filename).name;
  const fileNode = await ctx.graph.openImage(request.filename, { format: protocol });
  const raw = new BlockBackend(ctx.graph, fileNode, { writable: true, allowWriteBeyondEof: true });
  try {
    // Two writes with QEMU's words for each: the header cluster, then the refcount table and block.
    const image = initialImage(spec);
    await withErrno('Could not write qcow2 header', () => raw.pwrite(0, image.subarray(0, spec.clusterBytes)));
    await withErrno('Could not write refcount table', () => raw.pwrite(spec.clusterBytes, image.subarray(spec.clusterBytes)));
  } finally {
    await raw.close();
  }
  const node = await ctx.graph.openImage(request.filename, { format: 'qcow2', options: { backing: null } });
  const blk = new BlockBackend(ctx.graph, node, { writable: true, resizable: true });
  try {
    await withPrefix('Could not resize image', () => blk.truncate(spec.sizeBytes, false, spec.prealloc));
  } finally {
    await blk.close();
  }
}
