/*
 * Small helpers shared by the NBD wire codecs: the decode result type,
 * 64-bit integers as JS numbers, and string checks.
 *
 * Decoders never throw on bytes from the network: they return
 * `{ ok: false, reason }` with one sentence naming the field, and the
 * caller decides (option error reply, EINVAL reply, or disconnect).
 *
 * 64-bit wire integers become numbers. Offsets and lengths up to 2^53 - 1
 * are exact; a larger value (always past the end of any export we can
 * serve) decodes to an approximation of itself and is also kept exactly as
 * a bigint where it has to be echoed back (see U64).
 */

export type Decoded<T> = { ok: true; value: T } | { ok: false; reason: string };

export function ok<T>(value: T): Decoded<T> {
  return { ok: true, value };
}

export function fail<T = never>(reason: string): Decoded<T> {
  return { ok: false, reason };
}

const TWO_32 = 2 ** 32;
/** Largest high word of a 64-bit value that still gives a safe integer. */
const SAFE_HIGH_WORD_MAX = 2 ** 21 - 1;

/** A 64-bit unsigned value: `value` is exact when `exact` (i.e. < 2^53), else `big` is. */
export interface U64 {
  value: number;
  exact: boolean;
  big: bigint;
}

/** Reads a big-endian u64 as a number (approximate above 2^53 - 1). */
export function readU64(buf: Uint8Array, at: number): number {
  const view = Buffer.from(buf.buffer, buf.byteOffset, buf.byteLength);
  return view.readUInt32BE(at) * TWO_32 + view.readUInt32BE(at + 4);
}

/** Reads a big-endian u64 keeping an exact copy when it does not fit a safe integer. */
export function readU64Exact(buf: Buffer, at: number): U64 {
  const high = buf.readUInt32BE(at);
  const low = buf.readUInt32BE(at + 4);
  const value = high * TWO_32 + low;
  if (high <= SAFE_HIGH_WORD_MAX) return { value, exact: true, big: 0n };
  return { value, exact: false, big: buf.readBigUInt64BE(at) };
}

/** Writes a non-negative safe integer (or a bigint) as a big-endian u64. */
export function writeU64(buf: Buffer, at: number, value: number | bigint): void {
  if (typeof value === 'bigint') {
    buf.writeBigUInt64BE(value, at);
    return;
  }
  buf.writeUInt32BE(Math.floor(value / TWO_32) >>> 0, at);
  buf.writeUInt32BE(value >>> 0, at + 4);
}

/** True when the string's UTF-8 form has no NUL byte. */
export function hasNul(bytes: Uint8Array): boolean {
  return bytes.indexOf(0) >= 0;
}

/** UTF-8 bytes of a string (Buffer, so it can be written without a copy). */
export function utf8(text: string): Buffer {
  return Buffer.from(text, 'utf8');
}

/** A view of `buf` as a Buffer without copying. */
export function asBuffer(buf: Uint8Array): Buffer {
  return Buffer.isBuffer(buf) ? buf : Buffer.from(buf.buffer, buf.byteOffset, buf.byteLength);
}
