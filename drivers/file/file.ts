/*
 * The `file` protocol driver: host files and block devices (QEMU's
 * file-posix).
 *
 * I/O is positioned (direct-io.ts); short reads past the end of the file are
 * zero-filled, because the gate may read the whole last aligned block. Flush
 * is fdatasync. FUA is emulated by the gate.
 *
 * cache.direct=on opens with O_DIRECT, as QEMU does. Open then probes the
 * request alignment (direct-io.ts) and sets `limits.requestAlignment`, so
 * the gate turns unaligned requests into aligned ones (read-modify-write);
 * memory is aligned by the I/O helpers with the native addon's aligned
 * buffers. Without the addon (or on a host without O_DIRECT) the open is
 * refused with ENOTSUP rather than run in a mode that would fail at the
 * first request. A file system that refuses O_DIRECT (open says EINVAL, yet
 * a buffered open works) gets QEMU's "filesystem does not support O_DIRECT".
 *
 * Holes: block status asks SEEK_DATA/SEEK_HOLE (native helper) and reports
 * data as DATA and holes as ZERO, both at the same offset in this node.
 * Write-zeroes with MAY_UNMAP punches a hole (and extends the file if the
 * range runs past its end); without it, FALLOC_FL_ZERO_RANGE keeps the
 * range allocated; where the host cannot do either, ENOTSUP lets the gate
 * write zero buffers. Discard punches holes. Without the native helper the
 * whole file is data and these operations fall back, correctly if slower.
 *
 * Anything but a regular file or a block device is refused with QEMU's
 * "'file' driver requires '<name>' to be a regular file" (QEMU 7.2 wants the
 * host_device driver for block devices; this tree has none, so `file` takes
 * them). Create and resize live in create.ts and resize.ts.
 *
 * Image locking (lock.ts): with `locking` on (auto: where the host has OFD
 * locks) the node locks QEMU's bytes for its cumulative parent permissions
 * whenever the block layer refreshes them (checkPerm/setPerm/abortPerm),
 * so our tools and QEMU's refuse to open an image the other is writing.
 *
 * The rest of file-posix's options (options.ts) are accepted and checked as
 * QEMU 7.2 does; none changes how this driver does I/O, since every request
 * goes through Node's thread pool (QEMU's aio=threads) or runs inline:
 * aio=native needs cache.direct=on, aio=io_uring is taken as Debian's
 * build takes it, aio-max-batch only batches native/io_uring submissions,
 * drop-cache and x-check-cache-dropped act only on incoming migration
 * (bdrv_activate), which nothing here does, and pr-manager must name a
 * pr-manager-helper object, used only for SCSI reservations.
 */
import fs from 'node:fs';
import { BlockError, toBlockError } from '../../block/errors.js';
import { Req, Status, type Prealloc } from '../../block/flags.js';
import type { BlockDriver, HostRangeSink, OpenContext } from '../../block/driver.js';
import type { BlockNode } from '../../block/node.js';
import type { BlockGraph } from '../../block/graph.js';
import { createFile, FILE_CREATE_OPTS, stripFilePrefix } from './create.js';
import { DirectIo, preadHost, probeRequestAlignment, pwriteHost, WriteLane, type HostFile } from './direct-io.js';
import { openSerialWriter } from './serial-writer.js';
import { loadHostIo, type HostIo } from './host-io.js';
import { FileLocks, lockingEnabled } from './lock.js';
import { fileOptionsQapiProblem, fileOptionsSchema, type FileOptions } from './options.js';
import { resizeFile } from './resize.js';

interface FileState extends HostFile {
  /** The host path opened (a reopen opens it again). */
  path: string;
  host: HostIo;
  isBlockDevice: boolean;
  /**
   * The last data region SEEK_DATA/SEEK_HOLE found (QEMU's block-status
   * cache, bdrv_bsc_*): later block status inside it skips the lseeks,
   * which cost time proportional to the file on some file systems (tmpfs).
   * Only zeroing, discarding and truncating can turn data into holes; they
   * clear it. A block status racing with one may cache the region before
   * the hole exists; that can only report DATA for a hole, always a safe
   * answer (reads then read the zeroes).
   */
  dataCache: { start: number; end: number } | null;
  /** The image locks of this descriptor (lock.ts). */
  locks: FileLocks;
  /** The options as given (checked); kept for what QEMU keeps them for (see the note at the top). */
  options: FileOptions;
}

const state = (node: BlockNode) => node.opaque as FileState;

/** statfs f_type of file systems whose pages live in memory: tmpfs, ramfs. */
const MEMORY_FS_TYPES: ReadonlySet<number> = new Set([0x01021994, 0x858458f6]);

/**
 * Whether the file lives in memory (tmpfs, ramfs): there a small read or
 * write never waits for a device, and doing it on the calling thread (as
 * under syncIo) costs ~2 µs instead of the thread pool's hand-off and
 * completion (~15 µs of event-loop time per request, measured with NBD at
 * 4 KiB). Large transfers still go to the pool (see SYNC_READ_MAX_BYTES, SYNC_WRITE_MAX_BYTES).
 */
function isMemoryBacked(filename: string): boolean {
  try {
    return MEMORY_FS_TYPES.has(fs.statfsSync(filename).type);
  } catch {
    return false;
  }
}

/** O_DIRECT where the host has it (Linux), else undefined. */
const O_DIRECT = (fs.constants as { O_DIRECT?: number }).O_DIRECT;

/** Why cache.direct=on cannot work in this process, or null. */
function directUnavailable(host: HostIo): string | null {
  if (O_DIRECT === undefined) return 'cache.direct=on is not supported on this host (no O_DIRECT)';
  if (!host.native) return 'cache.direct=on needs the native hostio addon for aligned memory, and it is not loaded';
  return null;
}

/** Opens the file as qemu_open does, with its O_DIRECT diagnosis. */
async function openHostFile(filename: string, readOnly: boolean, direct: boolean): Promise<fs.promises.FileHandle> {
  const flags = readOnly ? fs.constants.O_RDONLY : fs.constants.O_RDWR;
  try {
    return await fs.promises.open(filename, direct ? flags | O_DIRECT! : flags);
  } catch (e) {
    const code = (e as { code?: unknown }).code;
    if (direct && code === 'EINVAL' && (await opensBuffered(filename, flags))) {
      throw new BlockError('EINVAL', `Could not open '${filename}': filesystem does not support O_DIRECT`);
    }
    throw toBlockError(e, `Could not open '${filename}'`);
  }
}

async function opensBuffered(filename: string, flags: number): Promise<boolean> {
  try {
    await (await fs.promises.open(filename, flags)).close();
    return true;
  } catch {
    return false;
  }
}

/** Probes the O_DIRECT alignment and sets the node's request alignment. */
async function setUpDirectIo(node: BlockNode, fh: fs.promises.FileHandle, host: HostIo): Promise<DirectIo> {
  const alignBytes = await probeRequestAlignment(fh, host);
  if (alignBytes === null) {
    throw new BlockError('EINVAL', 'Could not find working O_DIRECT alignment\nTry cache.direct=off');
  }
  node.limits.requestAlignment = alignBytes;
  return new DirectIo(host, alignBytes);
}

/** raw_open_common's option checks before the file opens: locking and pr-manager (QEMU's order). */
function checkOptions(options: FileOptions, host: HostIo, graph: BlockGraph): boolean {
  const locking = lockingEnabled(options.locking, host, (message) => {
    graph.onWarning(message);
    graph.onWarning('Due to the implementation, locks can be lost unexpectedly.\n', { verbatim: true });
  });
  const id = options['pr-manager'];
  if (id !== undefined) {
    const object = graph.objects.get(id);
    if (!object) throw new BlockError('EINVAL', `No persistent reservation manager with id '${id}'`);
    if (object.qomType !== 'pr-manager-helper') {
      throw new BlockError('EINVAL', `Object with id '${id}' is not a persistent reservation manager`);
    }
  }
  return locking;
}

async function open(node: BlockNode, optionsIn: Record<string, unknown>, ctx: OpenContext): Promise<void> {
  const options = optionsIn as FileOptions;
  const filename = stripFilePrefix(options.filename);
  const host = loadHostIo();
  const locking = checkOptions(options, host, ctx.graph);
  const direct = node.openFlags.direct;
  const unavailable = direct ? directUnavailable(host) : null;
  if (unavailable) throw new BlockError('ENOTSUP', `Could not open '${filename}': ${unavailable}`);
  const fh = await openHostFile(filename, node.readOnly, direct);
  try {
    if (options.aio === 'native' && !direct) {
      throw new BlockError('EINVAL', 'aio=native was specified, but it requires cache.direct=on, which was not specified.');
    }
    const st = await fh.stat();
    if (!st.isFile() && !st.isBlockDevice()) {
      throw new BlockError('EINVAL', `'file' driver requires '${filename}' to be a regular file`);
    }
    const directIo = direct ? await setUpDirectIo(node, fh, host) : null;
    node.opaque = {
      path: filename,
      fh,
      direct: directIo,
      ...bufferedWriters(directIo === null && st.isFile(), node.readOnly, fh.fd),
      host,
      isBlockDevice: st.isBlockDevice(),
      syncIo: node.openFlags.syncIo || (directIo === null && isMemoryBacked(filename)),
      dataCache: null,
      locks: new FileLocks(host, locking, filename),
      options,
    } satisfies FileState;
  } catch (e) {
    await fh.close();
    throw toBlockError(e);
  }
  node.filename = filename;
  node.supportedZeroFlags = Req.MAY_UNMAP | Req.NO_FALLBACK;
}

/**
 * How a buffered regular file's large writes queue: on a writer thread of
 * their own, else in a WriteLane. A read-only descriptor gets no thread.
 */
function bufferedWriters(buffered: boolean, readOnly: boolean, fd: number): Pick<HostFile, 'serialWriter' | 'writeLane'> {
  if (!buffered) return { serialWriter: undefined, writeLane: undefined };
  const serialWriter = readOnly ? null : openSerialWriter(fd);
  return serialWriter ? { serialWriter, writeLane: undefined } : { serialWriter: undefined, writeLane: new WriteLane() };
}

async function getLength(node: BlockNode): Promise<number> {
  const s = state(node);
  if (s.isBlockDevice) return s.host.sizeBytes(s.fh.fd);
  return (await s.fh.stat()).size;
}

async function coPreadv(node: BlockNode, offsetBytes: number, buf: Uint8Array): Promise<void> {
  await preadHost(state(node), offsetBytes, buf);
}

/** The range as this file's descriptor (buffered opens only: O_DIRECT keeps its own alignment rules). */
async function coPreadToHost(node: BlockNode, offsetBytes: number, bytes: number, sink: HostRangeSink): Promise<boolean> {
  const s = state(node);
  if (s.direct) return false;
  await sink(s.fh.fd, offsetBytes, bytes);
  return true;
}

async function coPwritev(node: BlockNode, offsetBytes: number, buf: Uint8Array): Promise<void> {
  await pwriteHost(state(node), offsetBytes, buf);
}

async function coPwriteZeroes(node: BlockNode, offsetBytes: number, bytes: number, flags: number): Promise<void> {
  const s = state(node);
  s.dataCache = null;
  if (flags & Req.MAY_UNMAP && !s.isBlockDevice) {
    const length = (await s.fh.stat()).size;
    await s.host.punchHole(s.fh.fd, offsetBytes, bytes);
    if (offsetBytes + bytes > length) await s.fh.truncate(offsetBytes + bytes);
    return;
  }
  await s.host.zeroRange(s.fh.fd, offsetBytes, bytes);
}

async function coPdiscard(node: BlockNode, offsetBytes: number, bytes: number): Promise<void> {
  const s = state(node);
  s.dataCache = null;
  const length = (await s.fh.stat()).size;
  if (offsetBytes >= length) return;
  await s.host.punchHole(s.fh.fd, offsetBytes, Math.min(bytes, length - offsetBytes));
}

async function coFlushToDisk(node: BlockNode): Promise<void> {
  const s = state(node);
  if (s.syncIo) fs.fdatasyncSync(s.fh.fd);
  else await s.fh.datasync();
}

/** SEEK_DATA/SEEK_HOLE answer (QEMU's find_allocation). */
async function coBlockStatus(node: BlockNode, wantZero: boolean, offsetBytes: number, bytes: number) {
  const base = { map: offsetBytes, file: node };
  if (!wantZero) return { status: Status.DATA | Status.OFFSET_VALID, pnum: bytes, ...base };
  const s = state(node);
  const { fh, host } = s;
  const cached = s.dataCache;
  if (cached && offsetBytes >= cached.start && offsetBytes < cached.end) {
    return { status: Status.DATA | Status.OFFSET_VALID, pnum: Math.min(bytes, cached.end - offsetBytes), ...base };
  }
  let dataAt: number | null;
  try {
    dataAt = host.seekData(fh.fd, offsetBytes);
  } catch {
    return { status: Status.DATA | Status.OFFSET_VALID, pnum: bytes, ...base };
  }
  if (dataAt === null) return { status: Status.ZERO | Status.OFFSET_VALID, pnum: bytes, ...base };
  if (dataAt > offsetBytes) {
    return { status: Status.ZERO | Status.OFFSET_VALID, pnum: Math.min(bytes, dataAt - offsetBytes), ...base };
  }
  const holeAt = host.seekHole(fh.fd, offsetBytes) ?? offsetBytes + bytes;
  if (holeAt > offsetBytes) s.dataCache = { start: offsetBytes, end: holeAt };
  return { status: Status.DATA | Status.OFFSET_VALID, pnum: Math.min(bytes, Math.max(holeAt - offsetBytes, 1)), ...base };
}

/** Regular files resize (resize.ts); devices keep their size (raw_co_truncate). */
async function coTruncate(node: BlockNode, offsetBytes: number, exact: boolean, prealloc: Prealloc): Promise<void> {
  const s = state(node);
  s.dataCache = null;
  if (!s.isBlockDevice) {
    await resizeFile(s, s.host, offsetBytes, prealloc);
    return;
  }
  if (prealloc !== 'off') {
    throw new BlockError('ENOTSUP', `Preallocation mode '${prealloc}' unsupported for this non-regular file`);
  }
  const length = s.host.sizeBytes(s.fh.fd);
  if (offsetBytes !== length && exact) throw new BlockError('ENOTSUP', 'Cannot resize device files');
  if (offsetBytes > length) throw new BlockError('EINVAL', 'Cannot grow device files');
}

async function getAllocatedFileSize(node: BlockNode): Promise<number | undefined> {
  const st = await state(node).fh.stat();
  return st.blocks * 512;
}

/**
 * raw_reopen_prepare/commit for the access mode: a new descriptor on the
 * same file (QEMU's "Could not reopen file: …"; a file replaced on disk
 * since the open is refused rather than written to), swapped in while the
 * node is drained, the old one closed. The image locks the old one holds
 * are taken on the new one first (OFD locks go with their descriptor, and
 * shared locks of one file never conflict); O_DIRECT and its alignment stay.
 */
async function reopen(node: BlockNode, readOnly: boolean): Promise<void> {
  const s = state(node);
  const access = readOnly ? fs.constants.O_RDONLY : fs.constants.O_RDWR;
  let fh: fs.promises.FileHandle;
  try {
    fh = await fs.promises.open(s.path, s.direct ? access | O_DIRECT! : access);
  } catch (e) {
    throw toBlockError(e, 'Could not reopen file');
  }
  try {
    const [now, opened] = await Promise.all([fh.stat(), s.fh.stat()]);
    if (now.dev !== opened.dev || now.ino !== opened.ino) {
      throw new BlockError('EIO', `Could not reopen file: '${s.path}' is no longer the file that was opened`);
    }
    s.locks.copyTo(fh.fd);
  } catch (e) {
    await fh.close();
    throw toBlockError(e);
  }
  await s.serialWriter?.close(); // the node is drained: nothing is queued
  const old = s.fh;
  s.fh = fh;
  Object.assign(s, bufferedWriters(s.direct === null && !s.isBlockDevice, readOnly, fh.fd));
  await old.close();
}

/** Closing the descriptor drops its image locks with it. */
async function close(node: BlockNode): Promise<void> {
  const s = state(node);
  await s.serialWriter?.close();
  await s.fh.close();
}

/** The node's locks and descriptor, while it is open (a closed FileHandle's fd is -1). */
function openLocks(node: BlockNode): { locks: FileLocks; fd: number } | null {
  const s = node.opaque as FileState | undefined;
  return s && s.fh.fd >= 0 ? { locks: s.locks, fd: s.fh.fd } : null;
}

/** raw_check_perm: lock and test the bytes the new permissions need. */
function checkPerm(node: BlockNode, perm: number, shared: number): void {
  const open = openLocks(node);
  open?.locks.prepare(open.fd, perm, shared);
}

/** raw_set_perm. */
function setPerm(node: BlockNode, perm: number, shared: number): void {
  const open = openLocks(node);
  open?.locks.commit(open.fd, perm, shared);
}

/** raw_abort_perm_update. */
function abortPerm(node: BlockNode): void {
  const open = openLocks(node);
  open?.locks.abort(open.fd);
}

export const fileDriver: BlockDriver = {
  name: 'file',
  protocolName: 'file',
  optionsSchema: fileOptionsSchema,
  createOpts: FILE_CREATE_OPTS,
  strongOptions: ['filename'],
  getInfo: () => ({}),
  open,
  close,
  reopen,
  checkPerm,
  setPerm,
  abortPerm,
  qapiProblem: fileOptionsQapiProblem,
  getLength,
  coPreadv,
  coPreadToHost,
  coPwritev,
  coPwriteZeroes,
  coPdiscard,
  coFlushToDisk,
  coBlockStatus,
  coTruncate,
  coCreate: createFile,
  getAllocatedFileSize,
  // A new regular file reads as zeroes (file-posix's bdrv_has_zero_init_1); a device need not.
  hasZeroInit: (node) => !(node.opaque as FileState).isBlockDevice,
};
