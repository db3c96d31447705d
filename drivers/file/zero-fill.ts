/*
 * Writing explicit zeroes into a host file (preallocation=full, the first
 * block of a new image). Chunked so memory stays bounded whatever the size;
 * on an O_DIRECT file the chunks go through its aligned bounce buffers.
 */
import { pwriteHost, type HostFile } from './direct-io.js';

/** Chunk size of explicit zero writes (QEMU's full preallocation uses 64 KiB). */
export const ZERO_FILL_CHUNK_BYTES = 1 << 20;

/** Writes `bytes` zero bytes at `offsetBytes`. */
export async function writeZeroes(file: HostFile, offsetBytes: number, bytes: number): Promise<void> {
  const zeroes = new Uint8Array(Math.min(bytes, ZERO_FILL_CHUNK_BYTES));
  for (let done = 0; done < bytes; done += zeroes.length) {
    await pwriteHost(file, offsetBytes + done, zeroes.subarray(0, Math.min(zeroes.length, bytes - done)));
  }
}
