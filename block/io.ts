/*
 * The request gate (QEMU's block/io.c): every read, write, write-zeroes,
 * discard, flush and truncate of every node passes through here, so drivers
 * stay small and trust their inputs.
 *
 * Requests are issued through an edge (BdrvChild), whose permissions say
 * whether the caller may write or grow the node. In order, the gate:
 *   1. checks the node is open and the range is sane (EIO, as QEMU), the
 *      node writable (EPERM) and the edge allowed to write (EPERM);
 *   2. counts the request in flight (for drain) and tracks its range (a
 *      read with Req.COPY_ON_READ also copies what the node does not
 *      allocate into it: block/copy-on-read-io.ts);
 *   3. aligns it: an unaligned read reads the covering aligned range into a
 *      bounce buffer; an unaligned write or write-zeroes becomes
 *      read-modify-write of the partial head and tail blocks (only those
 *      are read), serialised against overlapping requests;
 *   4. splits it by `maxTransfer` (write-zeroes and discard by their own
 *      alignment and limits, with QEMU's head/bulk/tail fragmentation);
 *   5. supplies the fallbacks: write-zeroes -> zero-buffer writes when the
 *      driver lacks it or says ENOTSUP (NO_FALLBACK instead yields ENOTSUP,
 *      at once when the node cannot zero natively or the request is
 *      unaligned); MAY_UNMAP is dropped unless the node was opened with
 *      discard=unmap; FUA -> write, then one flush at the end when the
 *      driver lacks FUA; compressed writes (WRITE_COMPRESSED) go to the
 *      driver's coPwritevCompressed, or fail with ENOTSUP; discard is a
 *      hint (ignored when not enabled, unsupported or ENOTSUP);
 *      detect-zeroes turns all-zero writes (compressed ones too) into
 *      write-zeroes;
 *   6. bumps the write generation when the request is done (as QEMU 7.2's
 *      bdrv_co_write_req_finish: after an emulated FUA flush, which runs
 *      inside the request; a flush with nothing new to flush is free) and,
 *      after a successful write past the end, grows the cached length to a
 *      whole sector;
 *   7. marks the node's recording dirty bitmaps (dirty-bitmap.ts) with the
 *      aligned range of every write, write-zeroes and discard that reached
 *      the driver, failed or not, as QEMU's bdrv_co_write_req_finish does,
 *      and resizes them after a truncate.
 *
 * Reads past the end of a node (only possible inside its last aligned block,
 * or from a parent reading a short backing file) return zeroes. The
 * user-facing range check (EIO beyond the end) lives in BlockBackend.
 */
import { BlockError } from './errors.js';
import { Perm, Req, alignDown, alignUp, isAligned, type Prealloc } from './flags.js';
import type { BdrvChild, BlockNode } from './node.js';
import type { HostRangeSink } from './driver.js';
import { beginTracked, endTracked, markSerialising, waitSerialising, type TrackedRequest } from './tracked.js';
import { markDirty, resizeDirtyBitmaps } from './dirty-bitmap.js';
import { copyOnReadClusterBytes, copyOnReadv, type CopyOnReadIo } from './copy-on-read-io.js';
import { debugEvent } from './debug-event.js';

/** Node lengths are whole multiples of this (QEMU's BDRV_SECTOR_SIZE). */
export const SECTOR_BYTES = 512;
/** Offsets and lengths are JS numbers: the largest length we accept (8 PiB - 1 GiB). */
export const MAX_LENGTH_BYTES = 2 ** 53 - 2 ** 30;
/** Largest single driver call; bigger requests are split (also bounds bounce buffers). */
export const MAX_REQUEST_BYTES = 2 ** 30;
/** Size of the shared zero buffer used by the write-zeroes fallback. */
export const ZERO_BUFFER_BYTES = 1 << 20;
/** Largest alignment a node may ask for (QEMU's BDRV_MAX_ALIGNMENT is larger; 1 MiB bounds bounce buffers). */
export const MAX_ALIGNMENT_BYTES = 1 << 20;

const ZERO_BUFFER: Uint8Array = new Uint8Array(ZERO_BUFFER_BYTES);

export function checkRange(offsetBytes: number, bytes: number): void {
  if (!Number.isSafeInteger(offsetBytes) || !Number.isSafeInteger(bytes)) {
    throw new BlockError('EINVAL', `Invalid request: offset ${offsetBytes}, length ${bytes}`);
  }
  if (offsetBytes < 0 || bytes < 0 || bytes > MAX_LENGTH_BYTES || offsetBytes > MAX_LENGTH_BYTES - bytes) {
    throw new BlockError('EIO');
  }
}

function checkOpen(node: BlockNode): void {
  if (node.closed) throw new BlockError('ENOMEDIUM');
}

function checkWrite(child: BdrvChild, offsetBytes: number, bytes: number): void {
  const node = child.node;
  checkOpen(node);
  checkRange(offsetBytes, bytes);
  if (node.readOnly || !(child.perm & (Perm.WRITE | Perm.WRITE_UNCHANGED))) {
    throw new BlockError('EPERM');
  }
  if (offsetBytes + bytes > node.totalBytes && !(child.perm & Perm.RESIZE)) {
    throw new BlockError('EIO', `Write beyond the end of ${node.describe()} without resize permission`);
  }
}

/** Largest chunk the driver takes in one call, aligned to `align`. */
function maxChunk(limitBytes: number, align: number): number {
  const limit = limitBytes > 0 ? Math.min(limitBytes, MAX_REQUEST_BYTES) : MAX_REQUEST_BYTES;
  return Math.max(alignDown(limit, align), align);
}

/** Runs `op` over [offset, offset + buf.length) in chunks of at most `chunkBytes`. */
async function forEachChunk(
  offsetBytes: number,
  buf: Uint8Array,
  chunkBytes: number,
  op: (offsetBytes: number, chunk: Uint8Array, last: boolean) => Promise<void>,
): Promise<void> {
  for (let done = 0; done < buf.length; ) {
    const n = Math.min(chunkBytes, buf.length - done);
    await op(offsetBytes + done, buf.subarray(done, done + n), done + n === buf.length);
    done += n;
  }
}

/** Runs `body` with the request counted in flight and tracked. */
async function inRequest<T>(
  node: BlockNode,
  offsetBytes: number,
  bytes: number,
  body: (req: TrackedRequest) => Promise<T>,
): Promise<T> {
  node.incInFlight();
  const req = beginTracked(node, offsetBytes, bytes);
  try {
    return await body(req);
  } finally {
    endTracked(node, req);
    node.decInFlight();
  }
}

// ---------------------------------------------------------------- read

/**
 * Reads `buf.length` bytes at `offsetBytes` from the edge's node. With
 * Req.COPY_ON_READ the request serialises at the node's cluster size and
 * what the node does not allocate is also written into it
 * (block/copy-on-read-io.ts); with Req.PREFETCH too, `buf` is not filled.
 */
export async function preadv(child: BdrvChild, offsetBytes: number, buf: Uint8Array, flags = 0): Promise<void> {
  const node = child.node;
  checkOpen(node);
  checkRange(offsetBytes, buf.length);
  if (buf.length === 0) return;
  await inRequest(node, offsetBytes, buf.length, async (req) => {
    let read = alignedPreadv;
    if (flags & Req.COPY_ON_READ) {
      // The copy's read and write must not interleave with a write of the same cluster.
      markSerialising(node, req, copyOnReadClusterBytes(node));
      read = alignedCopyOnRead;
    }
    await waitSerialising(node, req);
    const align = node.limits.requestAlignment;
    if (isAligned(offsetBytes, align) && isAligned(buf.length, align)) {
      await read(node, offsetBytes, buf, flags);
      return;
    }
    const start = alignDown(offsetBytes, align);
    const bounce = new Uint8Array(alignUp(offsetBytes + buf.length, align) - start);
    await read(node, start, bounce, flags);
    buf.set(bounce.subarray(offsetBytes - start, offsetBytes - start + buf.length));
  });
}

/**
 * Hands `bytes` bytes at `offsetBytes` of the edge's node to `sink` as a
 * range of a host file (BlockDriver.coPreadToHost), counted in flight and
 * tracked like a read, so drains wait for the sink. Resolves false, having
 * done nothing, where the node cannot: no such driver path, an unaligned
 * range, or one reaching past the node's end (whose tail reads as zeros).
 */
export async function preadvToHost(child: BdrvChild, offsetBytes: number, bytes: number, sink: HostRangeSink): Promise<boolean> {
  const node = child.node;
  checkOpen(node);
  checkRange(offsetBytes, bytes);
  const align = node.limits.requestAlignment;
  if (!node.driver.has.preadToHost || bytes === 0 || !isAligned(offsetBytes, align) || !isAligned(bytes, align)) return false;
  if (offsetBytes + bytes > node.totalBytes) return false;
  return inRequest(node, offsetBytes, bytes, async (req) => {
    await waitSerialising(node, req);
    return node.driver.coPreadToHost(node, offsetBytes, bytes, sink);
  });
}

/** The gate's primitives for copy-on-read (block/copy-on-read-io.ts): driver calls, no permission check, no dirty marks. */
const COPY_ON_READ_IO: CopyOnReadIo = {
  read: (node, offsetBytes, buf) => alignedPreadv(node, offsetBytes, buf, 0),
  async write(node, offsetBytes, buf, flags) {
    node.writeGen++;
    await driverPwritev(node, offsetBytes, buf, flags);
  },
  async writeZeroes(node, offsetBytes, bytes, flags) {
    node.writeGen++;
    await doPwriteZeroes(node, offsetBytes, bytes, flags);
  },
  maxTransferBytes: (node) => maxChunk(node.limits.maxTransfer, node.limits.requestAlignment),
  isZero: (buf) => isZeroBuffer(buf),
};

/** An aligned read carrying Req.COPY_ON_READ (see block/copy-on-read-io.ts). */
function alignedCopyOnRead(node: BlockNode, offsetBytes: number, buf: Uint8Array, flags: number): Promise<void> {
  return copyOnReadv(node, offsetBytes, buf, flags, COPY_ON_READ_IO);
}

/** An aligned read: the driver sees at most the node's length, rounded up; zeroes beyond. */
async function alignedPreadv(node: BlockNode, offsetBytes: number, buf: Uint8Array, flags: number): Promise<void> {
  const align = node.limits.requestAlignment;
  const readable = Math.min(buf.length, alignUp(Math.max(0, node.totalBytes - offsetBytes), align));
  const chunk = maxChunk(node.limits.maxTransfer, align);
  await forEachChunk(offsetBytes, buf.subarray(0, readable), chunk, (o, b) =>
    node.driver.coPreadv(node, o, b, flags),
  );
  if (readable < buf.length) buf.fill(0, readable);
}

// ---------------------------------------------------------------- write

/** Writes `buf` at `offsetBytes` through the edge. */
export async function pwritev(child: BdrvChild, offsetBytes: number, buf: Uint8Array, flags = 0): Promise<void> {
  checkWrite(child, offsetBytes, buf.length);
  if (buf.length === 0 && !(flags & Req.WRITE_COMPRESSED && isAligned(offsetBytes, child.node.limits.requestAlignment))) return;
  const node = child.node;
  await inRequest(node, offsetBytes, buf.length, async (req) => {
    const align = node.limits.requestAlignment;
    if (isAligned(offsetBytes, align) && isAligned(buf.length, align)) {
      await waitSerialising(node, req);
      await alignedWrite(node, offsetBytes, buf.length, buf, flags);
      return;
    }
    markSerialising(node, req, align);
    await waitSerialising(node, req);
    const start = alignDown(offsetBytes, align);
    const bounce = new Uint8Array(alignUp(offsetBytes + buf.length, align) - start);
    await readPartialBlocks(node, offsetBytes, buf.length, start, bounce);
    bounce.set(buf, offsetBytes - start);
    await alignedWrite(node, start, bounce.length, bounce, flags);
  });
}

/**
 * Fills the blocks of `bounce` (covering [start, start + bounce.length)) that
 * the unaligned range [offset, offset + bytes) only partly overwrites: the
 * head block when the offset is unaligned, the tail block when the end is
 * (once, when both are the same block).
 */
async function readPartialBlocks(node: BlockNode, offsetBytes: number, bytes: number, start: number, bounce: Uint8Array) {
  const align = node.limits.requestAlignment;
  const headPartial = !isAligned(offsetBytes, align);
  const tailPartial = !isAligned(offsetBytes + bytes, align);
  if (headPartial) await alignedPreadv(node, start, bounce.subarray(0, align), 0);
  if (tailPartial && !(headPartial && bounce.length === align)) {
    await alignedPreadv(node, start + bounce.length - align, bounce.subarray(bounce.length - align), 0);
  }
}

function isZeroBuffer(buf: Uint8Array): boolean {
  for (let done = 0; done < buf.length; done += ZERO_BUFFER_BYTES) {
    const n = Math.min(ZERO_BUFFER_BYTES, buf.length - done);
    if (!Buffer.from(buf.buffer, buf.byteOffset + done, n).equals(ZERO_BUFFER.subarray(0, n))) return false;
  }
  return true;
}

/**
 * An aligned write (bdrv_aligned_pwritev). `buf` is null for write-zeroes
 * (flags then include ZERO_WRITE). Applies detect-zeroes, then either the
 * write-zeroes path or split driver writes, then the emulated FUA flush.
 * As in QEMU 7.2 (bdrv_driver_pwritev, bdrv_co_do_pwrite_zeroes), that
 * flush runs inside the request, before the write generation is bumped
 * (bdrv_co_write_req_finish, also on failure): it sees only the writes
 * before this one, so a node's flush_to_disk event fires on it only when
 * those are unflushed. The cached length grows only when the write and
 * its flush succeeded.
 */
async function alignedWrite(
  node: BlockNode,
  offsetBytes: number,
  bytes: number,
  buf: Uint8Array | null,
  flags: number,
): Promise<void> {
  const mode = node.openFlags.detectZeroes;
  if (buf && !(flags & Req.ZERO_WRITE) && mode !== 'off' && node.driver.has.pwriteZeroes && isZeroBuffer(buf)) {
    flags |= Req.ZERO_WRITE;
    if (mode === 'unmap' && node.openFlags.unmap) flags |= Req.MAY_UNMAP;
  }
  let needFlush = false;
  let written = false;
  try {
    needFlush = flags & Req.ZERO_WRITE || !buf
      ? await doPwriteZeroes(node, offsetBytes, bytes, flags)
      : await driverPwritev(node, offsetBytes, buf, flags);
    if (needFlush) await flush(node, true);
    written = true;
  } finally {
    node.writeGen++;
    const end = offsetBytes + bytes;
    if (written && end > node.totalBytes) node.totalBytes = alignUp(end, SECTOR_BYTES);
    if (node.dirtyBitmaps.length > 0) markDirty(node, offsetBytes, bytes);
  }
  if (needFlush) countLeafFuaFlushed(node);
}

/**
 * After a leaf's emulated FUA flush (which reached its disk, see flush) and
 * the generation bump: when this write is the only one since the flushed
 * generation, it is flushed too, so the next flush is free.
 */
function countLeafFuaFlushed(node: BlockNode): void {
  if (node.children.length === 0 && node.flushedGen === node.writeGen - 1) node.flushedGen = node.writeGen;
}

/** Splits a write by maxTransfer; returns whether FUA must be emulated by a flush. */
async function driverPwritev(node: BlockNode, offsetBytes: number, buf: Uint8Array, flags: number): Promise<boolean> {
  if (flags & Req.WRITE_COMPRESSED) return driverPwritevCompressed(node, offsetBytes, buf);
  const driverFlags = flags & node.supportedWriteFlags & ~Req.ZERO_WRITE;
  const chunk = maxChunk(node.limits.maxTransfer, node.limits.requestAlignment);
  await forEachChunk(offsetBytes, buf, chunk, (o, b) => node.driver.coPwritev(node, o, b, driverFlags));
  return (flags & Req.FUA) !== 0 && !(node.supportedWriteFlags & Req.FUA);
}

/**
 * A compressed write (bdrv_driver_pwritev_compressed): ENOTSUP unless the
 * driver compresses; not split by maxTransfer (the driver keeps its own
 * alignment rules), only by MAX_REQUEST_BYTES, a multiple of any cluster;
 * a zero-length one reaches the driver too. As in QEMU, FUA is not
 * honoured (no flush is emulated).
 */
async function driverPwritevCompressed(node: BlockNode, offsetBytes: number, buf: Uint8Array): Promise<boolean> {
  if (buf.length === 0) await node.driver.coPwritevCompressed(node, offsetBytes, buf);
  await forEachChunk(offsetBytes, buf, MAX_REQUEST_BYTES, (o, b) => node.driver.coPwritevCompressed(node, o, b));
  return false;
}

// ---------------------------------------------------------------- write zeroes

/**
 * Makes [offset, offset + bytes) read as zeroes (MAY_UNMAP: it may also be
 * deallocated). With NO_FALLBACK the request fails with ENOTSUP, before any
 * I/O, when the node cannot zero natively or the request is not aligned to
 * the node's request alignment (a read-modify-write is no fast zeroing), as
 * QEMU's bdrv_co_pwritev_part does. MAY_UNMAP is dropped unless the node
 * was opened with discard=unmap (bdrv_co_pwrite_zeroes); `keepMayUnmap`
 * keeps it, as a BlockBackend's write-zeroes does (blk_co_pwrite_zeroes:
 * the mirror job's target).
 */
export async function pwriteZeroes(child: BdrvChild, offsetBytes: number, bytes: number, flags = 0, keepMayUnmap = false): Promise<void> {
  checkWrite(child, offsetBytes, bytes);
  if (bytes === 0) return;
  const node = child.node;
  const align = node.limits.requestAlignment;
  const aligned = isAligned(offsetBytes, align) && isAligned(bytes, align);
  if (flags & Req.NO_FALLBACK && (!aligned || !(node.supportedZeroFlags & Req.NO_FALLBACK))) {
    throw new BlockError('ENOTSUP', 'Fast write zeroes not supported');
  }
  if (!node.openFlags.unmap && !keepMayUnmap) flags &= ~Req.MAY_UNMAP;
  flags |= Req.ZERO_WRITE;
  await inRequest(node, offsetBytes, bytes, async (req) => {
    if (aligned) {
      await waitSerialising(node, req);
      await alignedWrite(node, offsetBytes, bytes, null, flags);
      return;
    }
    markSerialising(node, req, align);
    await waitSerialising(node, req);
    await unalignedZeroes(node, offsetBytes, bytes, flags);
  });
}

/**
 * Write-zeroes with an unaligned head or tail (bdrv_co_do_zero_pwritev), in
 * QEMU's order: the partial head block is read, zeroed in memory and written
 * back, the aligned middle goes down as write-zeroes, then the partial tail.
 */
async function unalignedZeroes(node: BlockNode, offsetBytes: number, bytes: number, flags: number): Promise<void> {
  const align = node.limits.requestAlignment;
  const end = offsetBytes + bytes;
  const middleStart = alignUp(offsetBytes, align);
  const middleEnd = alignDown(end, align);
  if (!isAligned(offsetBytes, align)) await zeroPartialBlock(node, offsetBytes, end, alignDown(offsetBytes, align), flags);
  if (middleEnd > middleStart) await alignedWrite(node, middleStart, middleEnd - middleStart, null, flags);
  if (!isAligned(end, align) && middleEnd >= middleStart) await zeroPartialBlock(node, offsetBytes, end, middleEnd, flags);
}

/** Zeroes the part of [offset, end) inside the block at `block` by read-modify-write. */
async function zeroPartialBlock(node: BlockNode, offsetBytes: number, end: number, block: number, flags: number) {
  const align = node.limits.requestAlignment;
  const buf = new Uint8Array(align);
  await alignedPreadv(node, block, buf, 0);
  buf.fill(0, Math.max(offsetBytes, block) - block, Math.min(end, block + align) - block);
  await alignedWrite(node, block, align, buf, flags & ~(Req.ZERO_WRITE | Req.MAY_UNMAP));
}

/**
 * Aligned write-zeroes (bdrv_co_do_pwrite_zeroes): split by the node's zero
 * alignment and limit: a small piece up to the first zero-alignment
 * boundary, the aligned bulk, the tail. Each piece tries the driver's
 * write-zeroes first, then zero-buffer writes (bounded by maxTransfer and
 * the zero buffer) unless NO_FALLBACK. The head is recomputed after every
 * piece, so a fallback shortened by maxTransfer never leaves a later
 * write-zeroes straddling a zero-alignment boundary. Returns whether FUA
 * must still be emulated by a flush.
 */
async function doPwriteZeroes(node: BlockNode, offsetBytes: number, bytes: number, flags: number): Promise<boolean> {
  const alignment = Math.max(node.limits.pwriteZeroesAlignment, node.limits.requestAlignment);
  const maxZeroes = maxChunk(node.limits.maxPwriteZeroes, alignment);
  const maxFallback = Math.min(maxChunk(node.limits.maxTransfer, node.limits.requestAlignment), ZERO_BUFFER_BYTES);
  const tail = (offsetBytes + bytes) % alignment;
  const fua = (flags & Req.FUA) !== 0;
  let needFlush = false;
  while (bytes > 0) {
    const head = offsetBytes % alignment;
    let num = bytes;
    if (head) {
      num = Math.min(bytes, maxFallback, alignment - head);
    } else if (tail && num > alignment) {
      num -= tail;
    }
    num = Math.min(num, maxZeroes);
    if (await tryDriverZeroes(node, offsetBytes, num, flags)) {
      needFlush ||= fua && !(node.supportedZeroFlags & Req.FUA);
    } else {
      num = Math.min(num, maxFallback);
      const writeFlags = flags & node.supportedWriteFlags & ~Req.ZERO_WRITE;
      needFlush ||= fua && !(writeFlags & Req.FUA);
      await node.driver.coPwritev(node, offsetBytes, ZERO_BUFFER.subarray(0, num), writeFlags);
    }
    offsetBytes += num;
    bytes -= num;
  }
  return needFlush;
}

/** The driver's own write-zeroes; false when it says ENOTSUP and a fallback is allowed. */
async function tryDriverZeroes(node: BlockNode, offsetBytes: number, bytes: number, flags: number): Promise<boolean> {
  if (!node.driver.has.pwriteZeroes) {
    if (flags & Req.NO_FALLBACK) throw new BlockError('ENOTSUP', 'Fast write zeroes not supported');
    return false;
  }
  try {
    await node.driver.coPwriteZeroes(node, offsetBytes, bytes, flags & node.supportedZeroFlags);
    return true;
  } catch (e) {
    if (e instanceof BlockError && e.code === 'ENOTSUP' && !(flags & Req.NO_FALLBACK)) return false;
    throw e;
  }
}

// ---------------------------------------------------------------- discard

/**
 * Discards [offset, offset + bytes): a hint. Nothing happens unless the node
 * was opened with discard=unmap and its driver discards; ENOTSUP is ignored.
 * Unaligned edges are sent as smaller requests (devices may coalesce them),
 * except pieces smaller than the node's request alignment: QEMU passes those
 * down too, but our drivers are promised aligned requests, and dropping part
 * of a hint is always allowed.
 */
export async function pdiscard(child: BdrvChild, offsetBytes: number, bytes: number): Promise<void> {
  checkWrite(child, offsetBytes, bytes);
  const node = child.node;
  if (bytes === 0 || !node.openFlags.unmap || !node.driver.has.pdiscard) return;
  await inRequest(node, offsetBytes, bytes, async (req) => {
    await waitSerialising(node, req);
    try {
      await discardChunks(node, offsetBytes, bytes);
    } finally {
      node.writeGen++;
      if (node.dirtyBitmaps.length > 0) markDirty(node, offsetBytes, bytes);
    }
  });
}

/** QEMU's discard fragmentation: small requests up to the alignment, then aligned ones. */
async function discardChunks(node: BlockNode, offsetBytes: number, bytes: number): Promise<void> {
  const requestAlign = node.limits.requestAlignment;
  const align = Math.max(node.limits.pdiscardAlignment, requestAlign);
  const maxDiscard = maxChunk(node.limits.maxPdiscard, align);
  let head = offsetBytes % align;
  let tail = (offsetBytes + bytes) % align;
  while (bytes > 0) {
    let num = bytes;
    if (head) {
      num = Math.min(bytes, align - head);
      if (!isAligned(num, requestAlign)) num %= requestAlign;
      head = (head + num) % align;
    } else if (tail) {
      if (num > align) {
        num -= tail;
      } else if (!isAligned(tail, requestAlign) && tail > requestAlign) {
        tail %= requestAlign;
        num -= tail;
      }
    }
    num = Math.min(num, maxDiscard);
    if (isAligned(offsetBytes, requestAlign) && isAligned(num, requestAlign)) {
      try {
        await node.driver.coPdiscard(node, offsetBytes, num);
      } catch (e) {
        if (!(e instanceof BlockError && e.code === 'ENOTSUP')) throw e;
      }
    }
    offsetBytes += num;
    bytes -= num;
  }
}

// ---------------------------------------------------------------- flush

/**
 * Flushes the node and, below it, every child it writes to (bdrv_co_flush).
 * Flushes of a node run one at a time in generation order; the disk flush is
 * skipped when nothing was written since the last one, or with cache.no-flush.
 *
 * `emulatedFua`: the flush of a write whose request is still open (see
 * alignedWrite), which QEMU 7.2 does not count as written. Its events and
 * generations follow QEMU; only a leaf node (no children to flush, e.g. a
 * file written with FUA directly) still gets its disk flush when nothing
 * older was unflushed, so that the write is durable (QEMU 7.2 skips it; no
 * blkdebug event can tell, as a leaf has no primary child), and the write
 * then counts as flushed (countLeafFuaFlushed).
 */
export async function flush(node: BlockNode, emulatedFua = false): Promise<void> {
  checkOpen(node);
  if (node.readOnly) return;
  node.incInFlight();
  try {
    const generation = node.writeGen;
    while (node.activeFlush) await node.activeFlush.catch(() => undefined);
    const run = flushOnce(node, generation, emulatedFua && node.children.length === 0);
    node.activeFlush = run;
    try {
      await run;
    } finally {
      node.activeFlush = null;
    }
  } finally {
    node.decInFlight();
  }
}

async function flushOnce(node: BlockNode, generation: number, pendingLeafWrite: boolean): Promise<void> {
  debugEvent(node.primaryChild, 'flush_to_os');
  await node.driver.coFlushToOs(node);
  const unflushed = node.flushedGen !== generation;
  if (!node.openFlags.noFlush && (unflushed || pendingLeafWrite)) {
    if (unflushed) debugEvent(node.primaryChild, 'flush_to_disk');
    await node.driver.coFlushToDisk(node);
  }
  let firstError: unknown = null;
  for (const edge of [...node.children]) {
    if (!(edge.perm & (Perm.WRITE | Perm.WRITE_UNCHANGED))) continue;
    try {
      await flush(edge.node);
    } catch (e) {
      firstError ??= e;
    }
  }
  if (firstError) throw firstError;
  node.flushedGen = generation;
}

// ---------------------------------------------------------------- truncate

/**
 * Resizes the node to `offsetBytes` (bdrv_co_truncate). Filters without
 * their own truncate pass it to their child. The cached length is refreshed
 * from the driver afterwards. Growing a node whose backing file is longer
 * than its old length adds Req.ZERO_WRITE, as QEMU does: the driver makes
 * the new area read as zeroes instead of the backing file's data.
 */
export async function truncate(
  child: BdrvChild,
  offsetBytes: number,
  exact: boolean,
  prealloc: Prealloc,
  flags = 0,
): Promise<void> {
  const node = child.node;
  checkOpen(node);
  if (offsetBytes < 0) throw new BlockError('EINVAL', 'Image size cannot be negative');
  if (!Number.isSafeInteger(offsetBytes) || offsetBytes > MAX_LENGTH_BYTES) {
    throw new BlockError('EFBIG', `Required too big image size, it must be not greater than ${MAX_LENGTH_BYTES}`);
  }
  if (node.readOnly) throw new BlockError('EACCES', 'Image is read-only');
  if (!(child.perm & Perm.RESIZE)) throw new BlockError('EPERM', `No permission to resize ${node.describe()}`);
  const oldBytes = node.totalBytes;
  // Growing past a backing file's end would show its data: the new area must read as zeroes.
  const backing = node.backing;
  if (offsetBytes > oldBytes && backing && backing.node.totalBytes > oldBytes) flags |= Req.ZERO_WRITE;
  const low = Math.min(oldBytes, offsetBytes);
  await inRequest(node, low, Math.max(oldBytes, offsetBytes) - low, async (req) => {
    markSerialising(node, req, 1);
    await waitSerialising(node, req);
    try {
      const filtered = node.driver.has.truncate ? null : node.filteredChild;
      if (filtered) {
        await truncate(filtered, offsetBytes, exact, prealloc, flags);
      } else {
        await node.driver.coTruncate(node, offsetBytes, exact, prealloc, flags);
      }
    } finally {
      node.writeGen++;
      await refreshLength(node);
      resizeDirtyBitmaps(node);
    }
  });
}

/**
 * Re-reads the node's length from its driver (bdrv_refresh_total_sectors).
 * As in QEMU, lengths are counted in whole sectors: a 1000-byte file is a
 * 1024-byte node whose last 24 bytes read as zeroes.
 */
export async function refreshLength(node: BlockNode): Promise<number> {
  checkOpen(node);
  node.totalBytes = alignUp(await node.driver.getLength(node), SECTOR_BYTES);
  return node.totalBytes;
}
