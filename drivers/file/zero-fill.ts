/*
 * Writing explicit zeroes into a host file (preallocation=full, the first
 * block of a new image). Chunked so memory stays bounded whatever the size.
 */
import type fs from 'node:fs';

/** Chunk size of explicit zero writes (QEMU's full preallocation uses 64 KiB). */
export const ZERO_FILL_CHUNK_BYTES = 1 << 20;

/** Writes `bytes` zero bytes at `offsetBytes`. */
export async function writeZeroBuffer(fh: fs.promises.FileHandle, offsetBytes: number, bytes: number): Promise<void> {
  const zeroes = new Uint8Array(Math.min(bytes, ZERO_FILL_CHUNK_BYTES));
  for (let done = 0; done < bytes; ) {
    const n = Math.min(zeroes.length, bytes - done);
    const { bytesWritten } = await fh.write(zeroes, 0, n, offsetBytes + done);
    done += bytesWritten;
  }
}
