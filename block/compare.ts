/*
 * Comparing the content of two images (the loop of QEMU 7.2's img_compare,
 * with check_empty_sectors, compare_buffers and find_nonzero).
 *
 * Both images are walked together by block status through their whole
 * chains; each step covers the shorter of the two answers:
 *   - both ZERO: equal, nothing is read;
 *   - both allocated (or both not): allocated ranges are read (at most
 *     COMPARE_BUF_BYTES at a time) and compared; an unallocated range in
 *     both reads the same (zeroes or nothing);
 *   - one allocated, the other not: the allocated side must read as zeroes.
 * A difference is reported at the first differing 512-byte sector, counted
 * from the start of the step (as QEMU counts). With `strict`, images of
 * different lengths differ at once, and so does any step whose status bits
 * differ ("block status mismatch"), so unallocated and zero-allocated
 * ranges are told apart. Without it, the tail of the longer image must
 * read as zeroes (only its allocated, non-ZERO ranges are read);
 * `onSizeMismatch` is called before that tail is looked at.
 *
 * Cost grows with the data: unallocated and ZERO ranges are never read, so
 * two sparse multi-TiB images compare in as many steps as they have
 * extents. Memory: two buffers of COMPARE_BUF_BYTES.
 *
 * Failures are CompareErrors naming the image as the caller called it:
 * block status ("Sector allocation test failed for NAME") or a read
 * ("Error while reading offset N of NAME: <strerror>"); qemu-img exits 3
 * and 4 for them.
 */
import type { BlockBackend } from './backend.js';
import { BlockError, strerror } from './errors.js';
import { Status } from './flags.js';
import type { ChainStatusResult } from './status.js';
import { isZeroRange } from './zero-scan.js';

/** qemu-img's IO_BUF_SIZE: the most read from each image per step. */
export const COMPARE_BUF_BYTES = 2 << 20;
const SECTOR_BYTES = 512;

export interface CompareSide {
  readonly blk: BlockBackend;
  /** How messages name the image (the file name the user gave). */
  readonly name: string;
}

export interface CompareOptions {
  /** Sizes and block status must match too (qemu-img compare -s). */
  strict?: boolean;
  /** Bytes compared so far grow by `bytes` (out of the longer image's length). */
  onProgress?(bytes: number): void;
  /** The lengths differ and the common part is equal; the longer tail is checked next. */
  onSizeMismatch?(): void;
}

export type CompareResult =
  | { readonly kind: 'identical' }
  | { readonly kind: 'content-mismatch'; readonly offsetBytes: number }
  /** Strict mode only. */
  | { readonly kind: 'size-mismatch' }
  | { readonly kind: 'status-mismatch'; readonly offsetBytes: number };

export class CompareError extends BlockError {
  constructor(
    readonly stage: 'status' | 'read',
    code: BlockError['code'],
    message: string,
    cause: unknown,
  ) {
    super(code, message, { cause });
  }
}

const IDENTICAL: CompareResult = { kind: 'identical' };

/** Compares the content of two images (see the note at the top). */
export async function compareImages(a: CompareSide, b: CompareSide, opts: CompareOptions = {}): Promise<CompareResult> {
  const [bytesA, bytesB] = [a.blk.getLength(), b.blk.getLength()];
  if (opts.strict && bytesA !== bytesB) return { kind: 'size-mismatch' };
  const bufs: [Uint8Array, Uint8Array] = [new Uint8Array(COMPARE_BUF_BYTES), new Uint8Array(COMPARE_BUF_BYTES)];
  const common = Math.min(bytesA, bytesB);
  for (let offset = 0; offset < common; ) {
    const step = await compareStep(a, b, offset, bufs, opts.strict ?? false);
    if ('kind' in step) return step;
    offset += step.bytes;
    opts.onProgress?.(step.bytes);
  }
  if (bytesA === bytesB) return IDENTICAL;
  opts.onSizeMismatch?.();
  return checkTail(bytesA > bytesB ? a : b, common, bufs[0], opts);
}

/** One step over the common part: the bytes it covered, or a verdict. */
async function compareStep(
  a: CompareSide,
  b: CompareSide,
  offset: number,
  bufs: [Uint8Array, Uint8Array],
  strict: boolean,
): Promise<{ bytes: number } | CompareResult> {
  const sa = await statusOf(a, offset);
  const sb = await statusOf(b, offset);
  let bytes = Math.min(sa.pnum, sb.pnum);
  if (strict && sa.status !== sb.status) return { kind: 'status-mismatch', offsetBytes: offset };
  if (sa.status & sb.status & Status.ZERO) return { bytes };
  const allocatedA = (sa.status & Status.ALLOCATED) !== 0;
  const allocatedB = (sb.status & Status.ALLOCATED) !== 0;
  if (allocatedA === allocatedB && !allocatedA) return { bytes };
  bytes = Math.min(bytes, COMPARE_BUF_BYTES);
  if (allocatedA === allocatedB) {
    const [x, y] = [bufs[0].subarray(0, bytes), bufs[1].subarray(0, bytes)];
    await readAt(a, offset, x);
    await readAt(b, offset, y);
    const at = firstDifferingSector(x, y);
    return at < 0 ? { bytes } : { kind: 'content-mismatch', offsetBytes: offset + at };
  }
  const at = await firstNonZeroSector(allocatedA ? a : b, offset, bufs[0].subarray(0, bytes));
  return at < 0 ? { bytes } : { kind: 'content-mismatch', offsetBytes: offset + at };
}

/** The part of the longer image beyond the shorter one must read as zeroes. */
async function checkTail(side: CompareSide, start: number, buf: Uint8Array, opts: CompareOptions): Promise<CompareResult> {
  const end = side.blk.getLength();
  for (let offset = start; offset < end; ) {
    const s = await statusOf(side, offset);
    let bytes = s.pnum;
    if (s.status & Status.ALLOCATED && !(s.status & Status.ZERO)) {
      bytes = Math.min(bytes, COMPARE_BUF_BYTES);
      const at = await firstNonZeroSector(side, offset, buf.subarray(0, bytes));
      if (at >= 0) return { kind: 'content-mismatch', offsetBytes: offset + at };
    }
    offset += bytes;
    opts.onProgress?.(bytes);
  }
  return IDENTICAL;
}

/** Block status from `offset` to the end of the image, through its chain. */
async function statusOf(side: CompareSide, offset: number): Promise<ChainStatusResult> {
  let s: ChainStatusResult;
  try {
    s = await side.blk.blockStatusAbove(offset, side.blk.getLength() - offset);
  } catch (e) {
    if (e instanceof BlockError) throw new CompareError('status', e.code, `Sector allocation test failed for ${side.name}`, e);
    throw e;
  }
  if (s.pnum <= 0) throw new CompareError('status', 'EIO', `Sector allocation test failed for ${side.name}`, null);
  return s;
}

async function readAt(side: CompareSide, offset: number, buf: Uint8Array): Promise<void> {
  try {
    await side.blk.pread(offset, buf);
  } catch (e) {
    if (!(e instanceof BlockError)) throw e;
    throw new CompareError('read', e.code, `Error while reading offset ${offset} of ${side.name}: ${strerror(e.code)}`, e);
  }
}

/** check_empty_sectors: reads `buf.length` bytes; the first sector that is not all zeroes, or -1. */
async function firstNonZeroSector(side: CompareSide, offset: number, buf: Uint8Array): Promise<number> {
  await readAt(side, offset, buf);
  if (isZeroRange(buf)) return -1;
  for (let at = 0; at < buf.length; at += SECTOR_BYTES) {
    if (!isZeroRange(buf, at, Math.min(buf.length, at + SECTOR_BYTES))) return at;
  }
  return -1;
}

/** compare_buffers: the first 512-byte sector where `x` and `y` differ, or -1. */
function firstDifferingSector(x: Uint8Array, y: Uint8Array): number {
  const bx = Buffer.from(x.buffer, x.byteOffset, x.byteLength);
  const by = Buffer.from(y.buffer, y.byteOffset, y.byteLength);
  if (bx.equals(by)) return -1;
  for (let at = 0; at < bx.length; at += SECTOR_BYTES) {
    const end = Math.min(bx.length, at + SECTOR_BYTES);
    if (bx.compare(by, at, end, at, end) !== 0) return at;
  }
  return -1;
}
