/*
 * Reading what a cluster held before a write: backing file data, a
 * compressed cluster, or a shared cluster's host data. Reads of unallocated
 * and compressed clusters use the same functions.
 *
 * Backing reads stop at the backing node's end; the rest reads as zeroes
 * (a backing file shorter than its overlay).
 *
 * Compressed clusters (QEMU's qcow2_co_preadv_compressed and
 * qcow2_zlib_decompress): the descriptor's sectors are read and inflated as
 * raw deflate; the output must fill exactly one cluster, as QEMU demands
 * (input may end early or carry trailing bytes of the next compressed
 * cluster). Anything else — bad data, a stream that would produce more than
 * a cluster, an offset past 2^53 — is EIO, never a crash, and output is
 * capped at one cluster so a hostile stream cannot allocate more. The last
 * cluster inflated is kept, so small sequential reads inflate it once.
 */
import { BlockError } from '../../block/errors.js';
import { preadv } from '../../block/io.js';
import { debugEvent } from '../../block/debug-event.js';
import type { CowSource, Qcow2State } from './state.js';

/** Reads guest bytes [offset, offset + buf.length) of the backing chain (zeroes without one). */
export async function readBacking(s: Qcow2State, offsetBytes: number, buf: Uint8Array): Promise<void> {
  const backing = s.backing;
  const available = backing ? Math.max(0, Math.min(buf.length, backing.node.totalBytes - offsetBytes)) : 0;
  if (available > 0) await preadv(backing!, offsetBytes, buf.subarray(0, available));
  if (available < buf.length) buf.fill(0, available);
}

/** The whole decompressed cluster of the compressed entry (hi, lo). */
export async function decompressCluster(s: Qcow2State, hi: number, lo: number): Promise<Uint8Array> {
  const cached = s.compressedCache;
  if (cached && cached.hi === hi && cached.lo === lo) return cached.data;
  const descriptor = (BigInt(hi & 0x3fffffff) << 32n) | BigInt(lo >>> 0);
  const extent = s.geometry.compressedExtent(descriptor);
  if (!Number.isSafeInteger(extent.hostOffset) || extent.hostOffset + extent.compressedBytes > Number.MAX_SAFE_INTEGER) {
    throw new BlockError('EIO', 'Compressed cluster offset beyond the supported range');
  }
  const input = new Uint8Array(extent.compressedBytes);
  await preadv(s.file, extent.hostOffset, input);
  const data = inflateCluster(input, s.clusterBytes);
  s.compressedCache = { hi, lo, data };
  return data;
}

/** Raw inflate into exactly `clusterBytes` bytes, or EIO. */
export function inflateCluster(input: Uint8Array, clusterBytes: number): Uint8Array {
  let out: Buffer;
  try {
    const zlib = process.getBuiltinModule('node:zlib'); // loaded on first use, like compress-write.ts
    out = zlib.inflateRawSync(input, { maxOutputLength: clusterBytes, finishFlush: zlib.constants.Z_SYNC_FLUSH });
  } catch {
    throw new BlockError('EIO', 'Could not decompress a compressed cluster');
  }
  if (out.length !== clusterBytes) throw new BlockError('EIO', 'Could not decompress a compressed cluster');
  return new Uint8Array(out.buffer, out.byteOffset, out.length);
}

/** Reads `buf.length` bytes at `inCluster` of the compressed cluster (hi, lo). */
export async function readCompressed(s: Qcow2State, hi: number, lo: number, inCluster: number, buf: Uint8Array): Promise<void> {
  const data = await decompressCluster(s, hi, lo);
  buf.set(data.subarray(inCluster, inCluster + buf.length));
}

/**
 * The old content of guest bytes [guestOffset, guestOffset + bytes) of one
 * cluster, from `source`; null when it reads as zeroes.
 */
export async function readCow(s: Qcow2State, source: CowSource, guestOffset: number, bytes: number): Promise<Uint8Array | null> {
  if (bytes === 0 || source.kind === 'zero') return null;
  const buf = new Uint8Array(bytes);
  const inCluster = guestOffset % s.clusterBytes;
  switch (source.kind) {
    case 'backing':
      if (!s.backing || guestOffset >= s.backing.node.totalBytes) return null;
      debugEvent(s.file, 'cow_read');
      await readBacking(s, guestOffset, buf);
      return buf;
    case 'host':
      debugEvent(s.file, 'cow_read');
      await preadv(s.file, source.hostOffset + inCluster, buf);
      return buf;
    case 'compressed':
      debugEvent(s.file, 'cow_read');
      await readCompressed(s, source.hi, source.lo, inCluster, buf);
      return buf;
  }
}
