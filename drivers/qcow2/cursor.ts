/*
 * Big-endian cursors over bytes, for the qcow2 codecs.
 *
 * `ByteReader` reads untrusted bytes from disk. It never throws: a read that
 * runs past the end of the buffer returns zeros for the missing bytes, which
 * is exactly what QEMU sees when it reads a qcow2 header past the end of a
 * short file (the protocol layer zero-fills), and sets `overran` so a caller
 * that cares can turn it into a reason. Validators, not the reader, decide
 * what a zero means.
 *
 * `ByteWriter` writes into a buffer we own; running past its end is a
 * programmer error (the encoders size their buffers first), so it throws the
 * RangeError DataView throws.
 *
 * 64-bit fields are read as BigInt. `u64ToNumber` converts one for use as a
 * byte offset or size: values above Number.MAX_SAFE_INTEGER become Infinity,
 * never a rounded neighbour, so a hostile 2^60 can only fail a range check
 * (Infinity is larger than every limit and is aligned to nothing).
 */

/** Converts an unsigned 64-bit value to a number; Infinity when above 2^53 - 1. */
export function u64ToNumber(value: bigint): number {
  return value > BigInt(Number.MAX_SAFE_INTEGER) ? Infinity : Number(value);
}

/** `0x…` in lowercase, as QEMU prints with `%#" PRIx64`: 0 prints as `0`. */
export function hex(value: number | bigint): string {
  return value === 0 || value === 0n ? '0' : `0x${value.toString(16)}`;
}

const textDecoder = new TextDecoder('utf-8');
const textEncoder = new TextEncoder();

/** A C string in a fixed field: the bytes up to the first NUL, as UTF-8. */
export function decodeCString(bytes: Uint8Array): string {
  const nul = bytes.indexOf(0);
  return textDecoder.decode(nul < 0 ? bytes : bytes.subarray(0, nul));
}

export function encodeUtf8(text: string): Uint8Array {
  return textEncoder.encode(text);
}

export class ByteReader {
  private readonly view: DataView;
  /** Where the next read starts, in bytes from the start of `bytes`. */
  offset: number;
  /** True once any read went past the end of the buffer (it read zeros). */
  overran = false;

  constructor(
    private readonly bytes: Uint8Array,
    offset = 0,
  ) {
    this.view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
    this.offset = offset;
  }

  u8(): number {
    return this.fits(1) ? this.view.getUint8(this.advance(1)) : Number(this.zeros(1));
  }

  u16(): number {
    return this.fits(2) ? this.view.getUint16(this.advance(2)) : Number(this.zeros(2));
  }

  u32(): number {
    return this.fits(4) ? this.view.getUint32(this.advance(4)) : Number(this.zeros(4));
  }

  u64(): bigint {
    return this.fits(8) ? this.view.getBigUint64(this.advance(8)) : this.zeros(8);
  }

  /** A copy of the next `count` bytes (zero-filled past the end). */
  bytesCopy(count: number): Uint8Array {
    const out = new Uint8Array(count);
    const start = Math.min(this.offset, this.bytes.length);
    const available = Math.max(0, Math.min(count, this.bytes.length - start));
    out.set(this.bytes.subarray(start, start + available));
    if (available < count) this.overran = true;
    this.offset += count;
    return out;
  }

  skip(count: number): void {
    if (!this.fits(count)) this.overran = true;
    this.offset += count;
  }

  private fits(count: number): boolean {
    return this.offset + count <= this.bytes.length;
  }

  private advance(count: number): number {
    const at = this.offset;
    this.offset += count;
    return at;
  }

  /** A read that does not fit: big-endian value of the bytes that exist, zeros after. */
  private zeros(count: number): bigint {
    let value = 0n;
    for (let i = 0; i < count; i++) {
      const at = this.offset + i;
      value = (value << 8n) | BigInt(at < this.bytes.length ? this.bytes[at]! : 0);
    }
    this.overran = true;
    this.offset += count;
    return value;
  }
}

export class ByteWriter {
  private readonly view: DataView;
  offset: number;

  constructor(
    private readonly target: Uint8Array,
    offset = 0,
  ) {
    this.view = new DataView(target.buffer, target.byteOffset, target.byteLength);
    this.offset = offset;
  }

  u8(value: number): this {
    this.view.setUint8(this.offset, value);
    this.offset += 1;
    return this;
  }

  u16(value: number): this {
    this.view.setUint16(this.offset, value);
    this.offset += 2;
    return this;
  }

  u32(value: number): this {
    this.view.setUint32(this.offset, value);
    this.offset += 4;
    return this;
  }

  /** Numbers must be safe non-negative integers (BigInt throws otherwise). */
  u64(value: number | bigint): this {
    this.view.setBigUint64(this.offset, BigInt(value));
    this.offset += 8;
    return this;
  }

  bytes(data: Uint8Array): this {
    if (this.offset + data.length > this.target.length) throw new RangeError('ByteWriter: write past the end');
    this.target.set(data, this.offset);
    this.offset += data.length;
    return this;
  }

  /** Advances over bytes left as they are (zero in a fresh buffer). */
  skip(count: number): this {
    if (this.offset + count > this.target.length) throw new RangeError('ByteWriter: skip past the end');
    this.offset += count;
    return this;
  }
}
