/*
 * The safe part of a rebase (qemu-img rebase without -u): before an image
 * is switched from its old backing file to a new one (or to none), every
 * range the image does not allocate itself, and where the old and the new
 * backing file read differently, gets the old content written into the
 * image. The image's content is the same before, during and after.
 *
 * The walk follows QEMU 7.2's img_rebase:
 *   - ranges the image allocates are skipped;
 *   - when the new backing file is an image of the old chain (`prefix`),
 *     only ranges that the images between the two allocate can differ
 *     (past the old backing file's end, everything is compared, as
 *     qemu-img does since the fix for its hang there);
 *   - the stretch is cut at the ends of the old and the new backing file:
 *     past the old one's end the old side reads as zeroes, past the new
 *     one's end (or without a new one) the new side does;
 *   - the two sides are read in windows of at most WINDOW_BYTES (QEMU's
 *     IO_BUF_SIZE), compared in 512-byte sectors, and each run of
 *     differing sectors is written: the old data, or write-zeroes where
 *     the old side lies past the old backing file's end.
 * Unlike QEMU, block status of both backing chains decides what is read:
 * a range that reads as zeroes on both sides is neither read nor
 * compared, and status queries span whole extents rather than windows, so
 * the cost grows with the data of the backing files, not with the virtual
 * size. Where only one side is known to be zero, that side is a zero
 * buffer and the other is read. What gets written is what QEMU
 * writes (old zeroes inside the old backing file are written as data, as
 * qemu-img does), so the image's allocation matches.
 *
 * Memory: two window buffers. Requests: one at a time, through `overlay`
 * (which must be writable) and through short-lived read edges on the
 * backing images.
 *
 * Failures come out as RebaseError, saying where (qemu-img's messages
 * differ by it): the image's allocation ('metadata'), a backing side's
 * status or data ('old-backing', 'new-backing'), or the write ('write').
 */
import type { BlockBackend } from './backend.js';
import { BlockError } from './errors.js';
import { Perm, Status } from './flags.js';
import { preadv } from './io.js';
import { attachChild, detachChild, TransientParent, type BdrvChild, type BlockNode } from './node.js';
import { blockStatusAbove, isAllocated } from './status.js';

/** Where a rebase failed: qemu-img words each differently (qemu-img-ts/img/rebase.ts). */
export type RebasePhase = 'metadata' | 'old-backing' | 'new-backing' | 'write';

export class RebaseError extends BlockError {
  constructor(
    readonly phase: RebasePhase,
    cause: BlockError,
  ) {
    super(cause.code, cause.message, { cause });
  }
}

/** Runs `step`; a BlockError it throws becomes a RebaseError of `phase`. */
async function failingAs<T>(phase: RebasePhase, step: () => Promise<T>): Promise<T> {
  try {
    return await step();
  } catch (e) {
    if (e instanceof BlockError && !(e instanceof RebaseError)) throw new RebaseError(phase, e);
    throw e;
  }
}

/** The window (QEMU's IO_BUF_SIZE, 2 MiB). */
export const WINDOW_BYTES = 2 << 20;
/** Compare granularity (BDRV_SECTOR_SIZE). */
const SECTOR_BYTES = 512;

export interface RebaseBackings {
  /** The image's current backing image (null: none). */
  old: BlockNode | null;
  /** The new backing image (null: none, the image is flattened). */
  newBacking: BlockNode | null;
  /** Set when the new backing image is one of the old chain: that image. */
  prefix: BlockNode | null;
}

/** One side of the comparison: a read edge on a backing image and its length (0: no image). */
interface Side {
  phase: RebasePhase;
  edge: BdrvChild | null;
  lengthBytes: number;
  buf: Uint8Array;
}

function openSide(node: BlockNode | null, what: string, phase: RebasePhase): Side {
  const edge = node ? attachChild(new TransientParent(`rebase ${what}`), what, 0, node, Perm.CONSISTENT_READ, Perm.ALL) : null;
  return { phase, edge, lengthBytes: node?.totalBytes ?? 0, buf: new Uint8Array(WINDOW_BYTES) };
}

/** Copies into `overlay` what the old and new backing files show differently (see the note at the top). */
export async function copyBackingDifferences(
  overlay: BlockBackend,
  backings: RebaseBackings,
  onProgress?: (doneBytes: number, totalBytes: number) => void,
): Promise<void> {
  const top = overlay.node;
  const sizeBytes = top.totalBytes;
  const oldSide = openSide(backings.old, 'old backing', 'old-backing');
  const newSide = openSide(backings.newBacking, 'new backing', 'new-backing');
  const report = (doneBytes: number) => onProgress?.(doneBytes, sizeBytes);
  try {
    for (let offset = 0; offset < sizeBytes; ) {
      const bytes = await stepAt(overlay, backings, oldSide, newSide, offset, sizeBytes - offset, report);
      if (!(bytes > 0)) throw new BlockError('EIO', `Block status made no progress at offset ${offset}`);
      offset += bytes;
      report(offset);
    }
  } finally {
    for (const side of [oldSide, newSide]) if (side.edge) detachChild(side.edge);
  }
}

/** Handles the stretch at `offset` that has one allocation status in the image (and above `prefix`); returns its length. */
async function stepAt(
  overlay: BlockBackend,
  b: RebaseBackings,
  oldSide: Side,
  newSide: Side,
  offset: number,
  maxBytes: number,
  report: (doneBytes: number) => void,
): Promise<number> {
  const own = await failingAs('metadata', () => isAllocated(overlay.node, offset, maxBytes));
  let bytes = own.pnum;
  if (own.allocated) return bytes;
  const { old, prefix } = b;
  if (prefix && old) {
    // Past the old backing file's end (pnum 0) its zeroes are compared like data.
    const above = await failingAs('metadata', () => blockStatusAbove(old, prefix, offset, bytes, false));
    if (above.pnum > 0) bytes = above.pnum;
    if (above.pnum > 0 && above.depth === 0) return bytes;
  }
  const oldPastEnd = offset >= oldSide.lengthBytes;
  if (!oldPastEnd) bytes = Math.min(bytes, oldSide.lengthBytes - offset);
  const newPastEnd = !newSide.edge || offset >= newSide.lengthBytes;
  if (!newPastEnd) bytes = Math.min(bytes, newSide.lengthBytes - offset);
  for (let at = offset; at < offset + bytes; ) {
    at += await compareRange(overlay, oldSide, newSide, at, offset + bytes - at, oldPastEnd, newPastEnd);
    report(at);
  }
  return bytes;
}

/** Whether `side` reads as zeroes at `offset` (per block status), and for how long. */
async function sideIsZero(side: Side, pastEnd: boolean, offset: number, bytes: number): Promise<{ zero: boolean; pnum: number }> {
  if (pastEnd || !side.edge) return { zero: true, pnum: bytes };
  const node = side.edge.node;
  const st = await failingAs(side.phase, () => blockStatusAbove(node, null, offset, bytes, true));
  return { zero: (st.status & Status.ZERO) !== 0, pnum: st.pnum > 0 ? st.pnum : bytes };
}

/** Compares and writes a stretch of one status on both sides; returns its length. */
async function compareRange(
  overlay: BlockBackend,
  oldSide: Side,
  newSide: Side,
  offset: number,
  maxBytes: number,
  oldPastEnd: boolean,
  newPastEnd: boolean,
): Promise<number> {
  const oldStatus = await sideIsZero(oldSide, oldPastEnd, offset, maxBytes);
  const newStatus = await sideIsZero(newSide, newPastEnd, offset, Math.min(maxBytes, oldStatus.pnum));
  if (oldStatus.zero && newStatus.zero) return Math.min(oldStatus.pnum, newStatus.pnum);
  const bytes = Math.min(oldStatus.pnum, newStatus.pnum, WINDOW_BYTES);
  const oldData = await fill(oldSide, oldStatus.zero, offset, bytes);
  const newData = await fill(newSide, newStatus.zero, offset, bytes);
  for (let done = 0; done < bytes; ) {
    const { differ, runBytes } = sameRun(oldData, newData, done, bytes);
    if (differ) {
      const at = offset + done;
      const run = oldData.subarray(done, done + runBytes);
      await failingAs('write', () => (oldPastEnd ? overlay.pwriteZeroes(at, runBytes) : overlay.pwrite(at, run)));
    }
    done += runBytes;
  }
  return bytes;
}

/** The side's bytes at [offset, offset + bytes): read, or zeroes. */
async function fill(side: Side, zero: boolean, offset: number, bytes: number): Promise<Uint8Array> {
  const buf = side.buf.subarray(0, bytes);
  const edge = side.edge;
  if (zero || !edge) buf.fill(0);
  else await failingAs(side.phase, () => preadv(edge, offset, buf));
  return buf;
}

/**
 * compare_buffers: whether the sector at `from` differs, and the length of
 * the run of sectors (from `from`) that differ, or are equal, alike.
 */
function sameRun(a: Uint8Array, b: Uint8Array, from: number, end: number): { differ: boolean; runBytes: number } {
  const differs = (at: number) => {
    const stop = Math.min(at + SECTOR_BYTES, end);
    return Buffer.compare(a.subarray(at, stop), b.subarray(at, stop)) !== 0;
  };
  const differ = differs(from);
  let at = Math.min(from + SECTOR_BYTES, end);
  while (at < end && differs(at) === differ) at = Math.min(at + SECTOR_BYTES, end);
  return { differ, runBytes: at - from };
}
