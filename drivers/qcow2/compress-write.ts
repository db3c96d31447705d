/*
 * Compressed writes (QEMU's qcow2_co_pwritev_compressed_part and _task,
 * qcow2_alloc_compressed_cluster_offset, qcow2_alloc_bytes and the zlib
 * side of qcow2-threads.c): what `qemu-img convert -c` and qemu-io's
 * `write -c` use.
 *
 * Requests cover whole clusters from a cluster boundary; only the last
 * cluster of the image may be partial (it is compressed padded with
 * zeroes). Anything else is EINVAL. A request of several clusters runs up
 * to COMPRESS_WORKERS_MAX clusters at a time; the first failure stops new
 * ones and is the request's result. A zero-length request ends a
 * compressed stream: the file is padded to whole sectors (compressed data
 * leaves it at any length).
 *
 * Each cluster is deflated as QEMU does (raw deflate, 4 KiB window,
 * default level, memLevel 9). Output of a full cluster or more does not
 * fit: the cluster is written uncompressed through the normal write path,
 * as QEMU does. Otherwise the compressed bytes are packed right after the
 * previous compressed cluster (`s.freeByteOffset`): a new host cluster is
 * taken when the current one is full (a chunk may spill into the next host
 * cluster when that one is free and contiguous), and every host cluster a
 * chunk touches gets one more reference, so a host cluster's refcount is
 * the number of compressed clusters in it. A host cluster at the refcount
 * maximum is not packed further. Unlike QEMU 7.2, the packing position is
 * dropped when its host cluster is freed (refcount.ts): QEMU keeps packing
 * into it even after a normal write reused the cluster, overwriting that
 * cluster's data (reproducible with qemu-io: write -c two clusters, discard
 * one, overwrite the other, write a normal cluster, write -c again).
 *
 * Only a cluster without a host offset (unallocated or a plain zero
 * cluster) may be written compressed; anything else fails with EIO, as in
 * QEMU 7.2 (compression never overwrites).
 *
 * Crash safety and concurrency, stricter than QEMU (which sets the L2
 * entry before the data is written): under the lock the L2 table is made
 * writable, the entry checked, the bytes allocated (refcounts raised) and
 * the guest cluster registered as an allocation in flight, so other writes,
 * zeroes and discards of it wait; the data is written without the lock;
 * then, under the lock, the L2 entry is set with the L2 cache ordered after
 * the refcount cache and after a flush of the file (data and refcounts
 * reach the disk before the entry). A failed write gives the bytes back.
 *
 * Compression runs on the calling thread when the machine has few cores
 * (measured on 2 cores, 64 KiB clusters: deflateRawSync ~0.25–0.65 ms per
 * cluster, the thread-pool call 20–40% slower and no faster with 2–8 in
 * flight), else in libuv's thread pool, where the in-flight clusters of a
 * request and of concurrent requests compress in parallel.
 */
import os from 'node:os';
import { promisify } from 'node:util';
import type zlib from 'node:zlib';
import { BlockError } from '../../block/errors.js';
import { refreshLength, truncate } from '../../block/io.js';
import type { BlockNode } from '../../block/node.js';
import { finishAllocation, inflightWrite, waitFor } from './alloc.js';
import { COMPRESSED_SECTOR_BYTES, Limits } from './format.js';
import { checkUsable, markDirty, needAccurateRefcounts, signalCorruption, writeFile } from './header-io.js';
import { beforeGuestWrite, coPwritev } from './io.js';
import { Entry, l2ForWrite } from './l2.js';
import { overlapCheck } from './overlap.js';
import { codecOf, freeClusters, getRefcount, scanFree, updateRefcount } from './refcount.js';
import { DiscardType, stateOf, type Allocation, type InFlight, type Qcow2State } from './state.js';

/** Clusters of one request compressed and written at once (QEMU's QCOW2_MAX_WORKERS). */
const COMPRESS_WORKERS_MAX = 8;
/** QEMU's deflateInit2 parameters: Z_DEFAULT_COMPRESSION, window bits -12 (raw, 4 KiB), memLevel 9. */
const DEFLATE_OPTIONS: zlib.ZlibOptions = { level: -1 /* Z_DEFAULT_COMPRESSION */, windowBits: 12, memLevel: 9 };
/** Below this many cores compression stays on the calling thread (see the note at the top). */
const THREADED_COMPRESS_MIN_CORES = 4;
const COMPRESS_IN_THREADS = os.availableParallelism() >= THREADED_COMPRESS_MIN_CORES;

/** node:zlib is loaded on first use: the tools start faster when nothing is compressed. */
let deflateRawAsync: ((input: Uint8Array, options: zlib.ZlibOptions) => Promise<Buffer>) | undefined;

/**
 * Deflates one cluster; null when the output would not be smaller than
 * the cluster (QEMU compresses into cluster_size - 1 bytes).
 */
export async function deflateCluster(input: Uint8Array, inThreads = COMPRESS_IN_THREADS): Promise<Uint8Array | null> {
  const zlib = process.getBuiltinModule('node:zlib');
  deflateRawAsync ??= promisify(zlib.deflateRaw);
  const out = inThreads ? await deflateRawAsync(input, DEFLATE_OPTIONS) : zlib.deflateRawSync(input, DEFLATE_OPTIONS);
  return out.length < input.length ? out : null;
}

export async function coPwritevCompressed(node: BlockNode, offsetBytes: number, buf: Uint8Array): Promise<void> {
  const s = stateOf(node);
  if (buf.length === 0) {
    checkUsable(s);
    await truncate(s.file, await refreshLength(s.file.node), false, 'off');
    return;
  }
  const c = s.clusterBytes;
  if (offsetBytes % c !== 0 || (buf.length % c !== 0 && offsetBytes + buf.length !== node.totalBytes)) {
    throw new BlockError('EINVAL', 'Compressed writes must cover whole clusters');
  }
  await beforeGuestWrite(s);
  const clusters = Math.ceil(buf.length / c);
  await forEachBounded(clusters, COMPRESS_WORKERS_MAX, (i) =>
    writeCompressedCluster(s, offsetBytes + i * c, buf.subarray(i * c, Math.min((i + 1) * c, buf.length))),
  );
}

/** Runs `task(0 … count-1)`, at most `limit` at a time; stops starting tasks after a failure and throws the first. */
async function forEachBounded(count: number, limit: number, task: (i: number) => Promise<void>): Promise<void> {
  let next = 0;
  let failed = false;
  let failure: unknown;
  const worker = async () => {
    while (next < count && !failed) {
      const i = next++;
      try {
        await task(i);
      } catch (e) {
        if (!failed) failure = e;
        failed = true;
      }
    }
  };
  await Promise.all(Array.from({ length: Math.min(limit, count) }, worker));
  if (failed) throw failure;
}

/** A compressed cluster whose bytes are allocated and whose guest cluster is reserved. */
interface Reservation {
  alloc: Allocation;
  hostOffset: number;
  bytes: number;
}

/** Compresses and writes one guest cluster (`data`: the cluster, or the image's partial last one). */
async function writeCompressedCluster(s: Qcow2State, guestOffset: number, data: Uint8Array): Promise<void> {
  let input = data;
  if (data.length < s.clusterBytes) {
    input = new Uint8Array(s.clusterBytes);
    input.set(data);
  }
  const compressed = await deflateCluster(input);
  if (!compressed) {
    await coPwritev(s.node, guestOffset, data);
    return;
  }
  const r = await reserveWaiting(s, guestOffset, compressed.length);
  try {
    await writeFile(s, r.hostOffset, compressed);
    await s.lock.run(() => linkCompressed(s, r));
  } catch (e) {
    await s.lock.run(() => freeClusters(s, r.hostOffset, r.bytes, DiscardType.NEVER)).catch(() => undefined);
    throw e;
  } finally {
    finishAllocation(s, r.alloc);
  }
}

/** Reserves the cluster and `bytes` host bytes, after any write in flight on the cluster. */
async function reserveWaiting(s: Qcow2State, guestOffset: number, bytes: number): Promise<Reservation> {
  for (;;) {
    const result = await s.lock.run(() => reserve(s, guestOffset, bytes));
    if ('alloc' in result) return result;
    await waitFor(result);
  }
}

/**
 * qcow2_alloc_compressed_cluster_offset up to the L2 update (lock held):
 * a write in flight on the cluster to wait for, or the reservation.
 */
async function reserve(s: Qcow2State, guestOffset: number, bytes: number): Promise<Reservation | InFlight> {
  const cluster = guestOffset / s.clusterBytes;
  const busy = inflightWrite(s, cluster, cluster + 1);
  if (busy) return busy;
  const table = await l2ForWrite(s, s.geometry.l1Index(guestOffset));
  try {
    const at = s.geometry.l2Index(guestOffset) * 8;
    if (table.view.getUint32(at) & Entry.HI_OFFSET || table.view.getUint32(at + 4) & Entry.LO_OFFSET) {
      throw new BlockError('EIO', 'Compressed writes cannot overwrite allocated clusters');
    }
  } finally {
    s.l2Cache.release(table);
  }
  const hostOffset = await allocBytes(s, bytes);
  const alloc: Allocation = {
    guestOffset,
    clusters: 1,
    hostOffset,
    keepOld: false,
    cowStartBytes: 0,
    cowEndOffset: s.clusterBytes,
    cowEndBytes: 0,
    cowStart: { kind: 'zero' },
    cowEnd: { kind: 'zero' },
    waiters: null,
  };
  s.allocations.add(alloc);
  try {
    await overlapCheck(s, 0, hostOffset, bytes);
  } catch (e) {
    finishAllocation(s, alloc);
    await freeClusters(s, hostOffset, bytes, DiscardType.NEVER);
    throw e;
  }
  return { alloc, hostOffset, bytes };
}

/**
 * qcow2_alloc_bytes (lock held): `bytes` bytes (at most a cluster) packed
 * after the last compressed cluster, their host clusters' refcounts raised.
 * Returns the host offset.
 */
export async function allocBytes(s: Qcow2State, bytes: number): Promise<number> {
  const c = s.clusterBytes;
  let offset = s.freeByteOffset;
  if (offset !== 0 && (await getRefcount(s, Math.floor(offset / c))) >= codecOf(s).max) offset = 0;
  let freeInCluster = c - (offset % c);
  for (;;) {
    let newCluster = -1;
    if (offset === 0 || freeInCluster < bytes) {
      newCluster = await scanFree(s, 1);
      const newOffset = await checkedCompressedOffset(s, newCluster * c);
      if (offset === 0 || Math.ceil(offset / c) * c !== newOffset) {
        offset = newOffset;
        freeInCluster = c;
      } else {
        freeInCluster += c;
      }
    }
    const first = Math.floor(offset / c);
    if (await updateRefcount(s, first, Math.ceil((offset + bytes) / c) - first, 1, false, DiscardType.NEVER)) break;
    // A refcount block was created first (QEMU's -EAGAIN): start again in a new cluster.
    if (newCluster >= 0 && s.freeClusterIndex > newCluster) s.freeClusterIndex = newCluster;
    offset = 0;
  }
  s.freeByteOffset = (offset + bytes) % c === 0 ? 0 : offset + bytes;
  return offset;
}

/** A new host cluster's offset, if a compressed descriptor can hold it (QEMU: alloc_clusters_noref's limit). */
async function checkedCompressedOffset(s: Qcow2State, hostOffset: number): Promise<number> {
  if (hostOffset === 0) {
    throw await signalCorruption(s, true, 'Preventing invalid allocation of compressed cluster at offset 0');
  }
  const limit = Math.min(2 ** s.geometry.compressedOffsetBits, Limits.HOST_OFFSET_LIMIT);
  if (hostOffset + s.clusterBytes > limit) {
    throw new BlockError('EFBIG', 'qcow2: no free host cluster below the compressed cluster offset limit');
  }
  return hostOffset;
}

/** Sets the cluster's L2 entry to the compressed descriptor, after the data and refcounts (lock held). */
async function linkCompressed(s: Qcow2State, r: Reservation): Promise<void> {
  if (s.opts.lazyRefcounts) await markDirty(s);
  if (needAccurateRefcounts(s)) await s.l2Cache.setDependency(s.refcountCache);
  s.l2Cache.dependsOnFlush = true;
  const guestOffset = r.alloc.guestOffset;
  const table = await l2ForWrite(s, s.geometry.l1Index(guestOffset));
  try {
    const [hi, lo] = compressedEntry(s, r.hostOffset, r.bytes);
    const at = s.geometry.l2Index(guestOffset) * 8;
    s.l2Cache.markDirty(table);
    table.view.setUint32(at, hi);
    table.view.setUint32(at + 4, lo);
  } finally {
    s.l2Cache.release(table);
  }
  s.compressedCache = null;
}

/**
 * The L2 entry of `bytes` compressed bytes at `hostOffset`, as two 32-bit
 * words: bit 62, the additional sectors the data reaches into at bits
 * x..61 (x = 62 - (cluster_bits - 8)), the byte offset below.
 */
export function compressedEntry(s: Qcow2State, hostOffset: number, bytes: number): [hi: number, lo: number] {
  const extraSectors =
    Math.floor((hostOffset + bytes - 1) / COMPRESSED_SECTOR_BYTES) - Math.floor(hostOffset / COMPRESSED_SECTOR_BYTES);
  const word = 2 ** 32;
  const hi = Entry.COMPRESSED + extraSectors * 2 ** (s.geometry.compressedOffsetBits - 32) + Math.floor(hostOffset / word);
  return [hi, hostOffset % word];
}
