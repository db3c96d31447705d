/*
 * The qcow2 driver's request entry points: read, write, write-zeroes,
 * discard, block status, flush (the gate has already checked, aligned to
 * the request alignment of 1, and split the request).
 *
 * Reads walk the guest range run by run (cluster.ts): one file read per run
 * of contiguous clusters, backing reads for unallocated runs (zeroes past
 * the backing's end or without one), zeroes for zero clusters, inflation for
 * compressed ones. Cached metadata is used without the lock. A range that is
 * one run of data clusters can also be handed out as a range of the data
 * file (coPreadToHost).
 *
 * Writes walk it step by step (alloc.ts): in-place steps write the data
 * where it is; allocation steps write data and copy-on-write parts in one
 * file write when the range is small enough to assemble (else up to three),
 * then link the L2 entries under the lock. The first guest write clears the
 * "bitmaps consistent" autoclear bit (bitmaps are not maintained here).
 *
 * Write-zeroes works on whole clusters (pwriteZeroesAlignment = cluster
 * size). A partial cluster is done as QEMU does only when the rest of the
 * cluster already reads as zero and the cluster is unallocated or zero;
 * otherwise ENOTSUP, and the gate falls back to writing zero buffers. v2
 * images have no zero flag: without a backing file zeroing deallocates (the
 * range then reads as zero), with one it is ENOTSUP. Discard ignores
 * partial clusters (except the partial last cluster of the image).
 */
import { BlockError } from '../../block/errors.js';
import { Req, Status } from '../../block/flags.js';
import { preadv, preadvToHost } from '../../block/io.js';
import { debugEvent } from '../../block/debug-event.js';
import { blockStatusAbove } from '../../block/status.js';
import type { BlockStatusResult, HostRangeSink } from '../../block/driver.js';
import type { BlockNode } from '../../block/node.js';
import { abortAllocation, finishAllocation, finishInplace, inplaceFast, linkAllocation, planWrite, waitFor, type WriteStep } from './alloc.js';
import { mapRun, mapRunCached, type Run } from './cluster.js';
import { readBacking, readCompressed, readCow } from './cow.js';
import { Qcow2Version } from './format.js';
import { checkUsable, needAccurateRefcounts, writeFile } from './header-io.js';
import { ClusterType } from './l2.js';
import { overlapCheck, overlapClear } from './overlap.js';
import { detectMetadataPreallocation } from './prealloc.js';
import { DiscardType, stateOf, type Allocation, type Qcow2State } from './state.js';
import { discardClusters, zeroClusters } from './zero.js';

/** Largest allocation written as one assembled buffer (data plus copy-on-write parts). */
const ASSEMBLE_MAX_BYTES = 4 << 20;
/** Spare assembly buffers kept per image (each at most ASSEMBLE_MAX_BYTES). */
const ASSEMBLY_SPARES_MAX = 4;

/** A buffer of `bytes` for assembling one allocating write; give it back with `releaseAssembly`. */
function acquireAssembly(s: Qcow2State, bytes: number): Uint8Array {
  const i = s.assembly.findIndex((b) => b.length >= bytes);
  if (i < 0) return new Uint8Array(bytes);
  return s.assembly.splice(i, 1)[0]!.subarray(0, bytes);
}

function releaseAssembly(s: Qcow2State, buf: Uint8Array): void {
  if (s.assembly.length < ASSEMBLY_SPARES_MAX) s.assembly.push(new Uint8Array(buf.buffer, buf.byteOffset, buf.buffer.byteLength));
}

/** The run at `offset`: from cached metadata, else loaded under the lock (`locked`: already held). */
async function runAt(s: Qcow2State, offsetBytes: number, bytes: number, locked = false): Promise<Run> {
  const cached = mapRunCached(s, offsetBytes, bytes);
  if (cached) return cached;
  return locked ? mapRun(s, offsetBytes, bytes) : s.lock.run(() => mapRun(s, offsetBytes, bytes));
}

export async function coPreadv(node: BlockNode, offsetBytes: number, buf: Uint8Array): Promise<void> {
  const s = stateOf(node);
  checkUsable(s);
  await readGuest(s, offsetBytes, buf);
}

/** Reads guest bytes into `buf` (`locked`: the caller holds the lock). */
export async function readGuest(s: Qcow2State, offsetBytes: number, buf: Uint8Array, locked = false): Promise<void> {
  for (let done = 0; done < buf.length; ) {
    const run = await runAt(s, offsetBytes + done, buf.length - done, locked);
    const part = buf.subarray(done, done + run.bytes);
    switch (run.type) {
      case ClusterType.UNALLOCATED:
        if (s.backing) debugEvent(s.file, 'read_backing_aio');
        await readBacking(s, offsetBytes + done, part);
        break;
      case ClusterType.ZERO_PLAIN:
      case ClusterType.ZERO_ALLOC:
        part.fill(0);
        break;
      case ClusterType.NORMAL:
        debugEvent(s.file, 'read_aio');
        await preadv(s.file, run.hostOffset, part);
        break;
      case ClusterType.COMPRESSED:
        debugEvent(s.file, 'read_compressed');
        await readCompressed(s, run.hi, run.lo, (offsetBytes + done) % s.clusterBytes, part);
        break;
    }
    done += run.bytes;
  }
}

/**
 * A guest range that is one run of contiguous data clusters, handed to
 * `sink` as a range of the data file (BlockDriver.coPreadToHost, for the
 * NBD server's zero-copy READ replies). Anything else (unallocated, zero
 * or compressed clusters, a run broken in the file) declines: the caller
 * reads it as usual.
 */
export async function coPreadToHost(node: BlockNode, offsetBytes: number, bytes: number, sink: HostRangeSink): Promise<boolean> {
  const s = stateOf(node);
  checkUsable(s);
  const run = await runAt(s, offsetBytes, bytes);
  if (run.type !== ClusterType.NORMAL || run.bytes < bytes) return false;
  const handled = await preadvToHost(s.file, run.hostOffset, bytes, sink);
  if (handled) debugEvent(s.file, 'read_aio');
  return handled;
}

/**
 * What every guest write checks first. Persistent bitmaps need nothing
 * here: they were loaded and marked in use at open (bitmap-load.ts), the
 * gate marks them, and close stores them.
 */
export async function beforeGuestWrite(s: Qcow2State): Promise<void> {
  checkUsable(s);
}

export async function coPwritev(node: BlockNode, offsetBytes: number, buf: Uint8Array): Promise<void> {
  const s = stateOf(node);
  await beforeGuestWrite(s);
  for (let done = 0; done < buf.length; ) {
    const offset = offsetBytes + done;
    const rest = buf.length - done;
    const step: WriteStep = inplaceFast(s, offset, rest) ?? (await s.lock.run(() => planWrite(s, offset, rest)));
    if (step.kind === 'wait') {
      await waitFor(step.on);
      continue;
    }
    const data = buf.subarray(done, done + step.bytes);
    if (step.kind === 'inplace') {
      try {
        if (!overlapClear(s, 0, step.hostOffset, step.bytes)) await overlapCheck(s, 0, step.hostOffset, step.bytes);
        debugEvent(s.file, 'write_aio');
        await writeFile(s, step.hostOffset, data);
      } finally {
        finishInplace(s, step.record);
      }
    } else {
      await writeAllocation(s, step.alloc, data);
    }
    done += step.bytes;
  }
}

/**
 * Writes an allocation's data and copy-on-write parts, then links it (or
 * gives it back on failure). Data and copied parts go down in one
 * assembled write when they fit ASSEMBLE_MAX_BYTES, else in up to three.
 * Zero parts are written as zeroes too (QEMU's fallback when the file
 * cannot zero ranges), so the file holds whole clusters as QEMU's does.
 */
async function writeAllocation(s: Qcow2State, alloc: Allocation, data: Uint8Array): Promise<void> {
  try {
    const head = await readCow(s, alloc.cowStart, alloc.guestOffset, alloc.cowStartBytes);
    const tail = await readCow(s, alloc.cowEnd, alloc.guestOffset + alloc.cowEndOffset, alloc.cowEndBytes);
    const total = alloc.clusters * s.clusterBytes;
    await overlapCheck(s, 0, alloc.hostOffset, total);
    const cow = alloc.cowStartBytes + alloc.cowEndBytes > 0;
    if (!cow) {
      debugEvent(s.file, 'write_aio');
      await writeFile(s, alloc.hostOffset, data);
    } else if (total <= ASSEMBLE_MAX_BYTES) {
      const whole = acquireAssembly(s, total);
      try {
        if (head) whole.set(head);
        else whole.fill(0, 0, alloc.cowStartBytes);
        whole.set(data, alloc.cowStartBytes);
        if (tail) whole.set(tail, alloc.cowEndOffset);
        else whole.fill(0, alloc.cowEndOffset, total);
        debugEvent(s.file, head || tail ? 'cow_write' : 'write_aio');
        await writeFile(s, alloc.hostOffset, whole);
      } finally {
        releaseAssembly(s, whole);
      }
    } else {
      if (alloc.cowStartBytes) debugEvent(s.file, 'cow_write');
      if (alloc.cowStartBytes) await writeFile(s, alloc.hostOffset, head ?? new Uint8Array(alloc.cowStartBytes));
      debugEvent(s.file, 'write_aio');
      await writeFile(s, alloc.hostOffset + alloc.cowStartBytes, data);
      if (alloc.cowEndBytes) debugEvent(s.file, 'cow_write');
      if (alloc.cowEndBytes) await writeFile(s, alloc.hostOffset + alloc.cowEndOffset, tail ?? new Uint8Array(alloc.cowEndBytes));
    }
    await s.lock.run(() => linkAllocation(s, alloc, cow));
  } catch (e) {
    await s.lock.run(() => abortAllocation(s, alloc)).catch(() => undefined);
    throw e;
  } finally {
    finishAllocation(s, alloc);
  }
}

/** QEMU's is_zero: [offset, offset + bytes) reads as zero through the whole chain. */
async function readsAsZero(node: BlockNode, offsetBytes: number, bytes: number): Promise<boolean> {
  bytes = Math.min(bytes, node.totalBytes - offsetBytes);
  while (bytes > 0) {
    const r = await blockStatusAbove(node, null, offsetBytes, bytes, true);
    if (!(r.status & Status.ZERO) || r.pnum <= 0) return false;
    offsetBytes += r.pnum;
    bytes -= r.pnum;
  }
  return true;
}

export async function coPwriteZeroes(node: BlockNode, offsetBytes: number, bytes: number, flags: number): Promise<void> {
  const s = stateOf(node);
  await beforeGuestWrite(s);
  const c = s.clusterBytes;
  const head = offsetBytes % c;
  const end = offsetBytes + bytes;
  const tail = end === node.totalBytes ? 0 : (c - (end % c)) % c;
  const partial = head !== 0 || tail !== 0;
  if (partial && !((await readsAsZero(node, offsetBytes - head, head)) && (await readsAsZero(node, end, tail)))) {
    throw new BlockError('ENOTSUP', 'qcow2: partial cluster is not zero');
  }
  const start = offsetBytes - head;
  const length = bytes + head + tail;
  if (s.image.header.version < Qcow2Version.V3) {
    if (s.backing) throw new BlockError('ENOTSUP', 'qcow2: v2 images have no zero clusters');
    await discardClusters(s, start, length, DiscardType.REQUEST, false);
    return;
  }
  const done = await zeroClusters(s, start, length, (flags & Req.MAY_UNMAP) !== 0, partial);
  if (!done) throw new BlockError('ENOTSUP', 'qcow2: partial cluster is allocated');
}

export async function coPdiscard(node: BlockNode, offsetBytes: number, bytes: number): Promise<void> {
  const s = stateOf(node);
  await beforeGuestWrite(s);
  if (s.image.header.version < Qcow2Version.V3 && s.backing) throw new BlockError('ENOTSUP', 'qcow2: discard would expose backing data');
  const c = s.clusterBytes;
  if ((offsetBytes % c !== 0 || bytes % c !== 0) && !(offsetBytes % c === 0 && offsetBytes + bytes === node.totalBytes)) {
    throw new BlockError('ENOTSUP', 'qcow2: partial cluster discard ignored');
  }
  await discardClusters(s, offsetBytes, bytes, DiscardType.REQUEST, false);
}

export async function coBlockStatus(node: BlockNode, _wantZero: boolean, offsetBytes: number, bytes: number): Promise<BlockStatusResult> {
  const s = stateOf(node);
  checkUsable(s);
  if (s.metadataPreallocation === null) await s.lock.run(() => detectMetadataPreallocation(s));
  const run = await runAt(s, offsetBytes, bytes);
  const result: BlockStatusResult = { status: 0, pnum: run.bytes };
  if (run.type === ClusterType.NORMAL || run.type === ClusterType.ZERO_ALLOC) {
    result.status |= Status.OFFSET_VALID;
    result.map = run.hostOffset;
    result.file = s.file.node;
  }
  if (run.type === ClusterType.ZERO_PLAIN || run.type === ClusterType.ZERO_ALLOC) result.status |= Status.ZERO;
  else if (run.type !== ClusterType.UNALLOCATED) result.status |= Status.DATA;
  if (s.metadataPreallocation && result.status & Status.DATA && result.status & Status.OFFSET_VALID) result.status |= Status.RECURSE;
  return result;
}

/** Writes back the metadata caches (qcow2_write_caches); the gate flushes the file after. */
export async function coFlushToOs(node: BlockNode): Promise<void> {
  const s = stateOf(node);
  if (!s.writable || !s.usable) return;
  await s.lock.run(async () => {
    await s.l2Cache.writeDirty();
    if (needAccurateRefcounts(s)) await s.refcountCache.writeDirty();
  });
}
