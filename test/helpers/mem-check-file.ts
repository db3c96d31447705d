/*
 * A CheckFile (drivers/qcow2/check-io.ts) in memory, for unit tests of the
 * qcow2 check: it grows on writes past its end, reports its length in
 * whole 512-byte sectors as bdrv_getlength does, counts writes, and can be
 * made read-only or short of space (writes ending past `writableBytes`
 * fail with ENOSPC). Discards are ignored, as a file system may.
 */
import { BlockError } from '../../block/errors.js';
import type { CheckFile } from '../../drivers/qcow2/check-io.js';

export class MemCheckFile implements CheckFile {
  writable = true;
  writes = 0;
  writableBytes = Infinity;
  constructor(public bytes: Uint8Array) {}
  get lengthBytes(): number {
    return Math.ceil(this.bytes.length / 512) * 512;
  }
  async read(offset: number, buf: Uint8Array): Promise<void> {
    buf.fill(0);
    buf.set(this.bytes.subarray(offset, offset + buf.length));
  }
  async write(offset: number, data: Uint8Array): Promise<void> {
    if (!this.writable) throw new BlockError('EPERM');
    if (offset + data.length > this.writableBytes) throw new BlockError('ENOSPC');
    this.writes++;
    await this.grow(offset + data.length);
    this.bytes.set(data, offset);
  }
  async grow(bytes: number): Promise<void> {
    if (bytes <= this.bytes.length) return;
    const grown = new Uint8Array(bytes);
    grown.set(this.bytes);
    this.bytes = grown;
  }
  async discard(): Promise<void> {}
  async flush(): Promise<void> {}
}
