/*
 * Copy-on-read in the request gate (QEMU's bdrv_co_do_copy_on_readv in
 * block/io.c): a read that reaches a node with Req.COPY_ON_READ also writes
 * into that node whatever of the range the node does not allocate itself,
 * so later reads find it there. The data seen by the reader is unchanged:
 * the copy is exactly what a plain read returns (the backing chain's data).
 *
 * How (called by io.ts for an aligned read; io.ts has already made the
 * request serialising at the node's cluster size, so a guest write cannot
 * slip between the copy's read and its write):
 *   - the whole range allocated in the node: a plain read (or nothing, for
 *     a PREFETCH read, whose buffer the caller does not want);
 *   - otherwise the range is widened to whole clusters (so allocating a
 *     cluster needs no further backing read) and walked by block status of
 *     the node alone: allocated stretches are read straight into the
 *     caller's buffer; unallocated ones are read through the driver into a
 *     bounce buffer of at most COR_BOUNCE_MAX_BYTES (bounded, also by the
 *     node's max transfer), written back as a write-zeroes when all zero and
 *     the driver can zero, else as a data write, both WRITE_UNCHANGED, and
 *     the caller's part copied out. Block status errors count as
 *     "unallocated" (the read will report the real error), as in QEMU.
 *
 * The copy goes straight to the driver, not through the gate's write path:
 * no permission check (the read's edge need not write; the copy-on-read
 * filter holds WRITE_UNCHANGED on the node for it), no dirty-bitmap marks
 * (nothing the guest sees changed), no detect-zeroes. A read-only node
 * never copies. Any failure of the copy fails the read.
 */
import { Req, alignDown, alignUp } from './flags.js';
import type { BlockNode } from './node.js';
import { isAllocated } from './status.js';

/** Largest piece copied at once (QEMU's MAX_BOUNCE_BUFFER: 32768 sectors). */
export const COR_BOUNCE_MAX_BYTES = 32768 * 512;

/** The gate's primitives the copy uses (io.ts passes them: no import cycle of values). */
export interface CopyOnReadIo {
  /** An aligned driver read (zeroes past the end). */
  read(node: BlockNode, offsetBytes: number, buf: Uint8Array): Promise<void>;
  /** A driver write of unchanged data. */
  write(node: BlockNode, offsetBytes: number, buf: Uint8Array, flags: number): Promise<void>;
  /** Driver write-zeroes of unchanged data. */
  writeZeroes(node: BlockNode, offsetBytes: number, bytes: number, flags: number): Promise<void>;
  /** Largest single driver transfer of the node. */
  maxTransferBytes(node: BlockNode): number;
  isZero(buf: Uint8Array): boolean;
}

/** Copy granularity of a node (bdrv_get_cluster_size): its cluster size, else its request alignment. */
export function copyOnReadClusterBytes(node: BlockNode): number {
  const cluster = node.driver.getInfo(node)?.clusterBytes ?? 0;
  return cluster > 0 ? cluster : node.limits.requestAlignment;
}

/** An aligned read of `node` carrying Req.COPY_ON_READ (see the note at the top). */
export async function copyOnReadv(node: BlockNode, offsetBytes: number, buf: Uint8Array, flags: number, io: CopyOnReadIo): Promise<void> {
  const prefetch = (flags & Req.PREFETCH) !== 0;
  if (!node.readOnly) {
    const own = await isAllocated(node, offsetBytes, buf.length);
    if (!own.allocated || own.pnum !== buf.length) return copyClusters(node, offsetBytes, buf, prefetch, io);
  }
  if (!prefetch) await io.read(node, offsetBytes, buf);
}

/** Allocation of [offset, offset + bytes) in the node itself; errors read as unallocated. */
async function allocation(node: BlockNode, offsetBytes: number, bytes: number): Promise<{ allocated: boolean; pnum: number }> {
  try {
    return await isAllocated(node, offsetBytes, bytes);
  } catch {
    return { allocated: false, pnum: bytes };
  }
}

async function copyClusters(node: BlockNode, offsetBytes: number, buf: Uint8Array, prefetch: boolean, io: CopyOnReadIo): Promise<void> {
  const cluster = copyOnReadClusterBytes(node);
  const maxTransfer = io.maxTransferBytes(node);
  const end = offsetBytes + buf.length;
  let pos = alignDown(offsetBytes, cluster);
  const stop = alignUp(end, cluster);
  let bounce: Uint8Array | null = null;
  while (pos < stop) {
    const st = await allocation(node, pos, Math.min(stop - pos, maxTransfer));
    // The node ends inside the last cluster: nothing more to read or copy.
    if (st.pnum === 0) break;
    let pnum = st.pnum;
    if (!st.allocated) {
      pnum = Math.min(pnum, COR_BOUNCE_MAX_BYTES, maxTransfer);
      bounce ??= new Uint8Array(Math.min(Math.max(pnum, stop - pos - pnum), COR_BOUNCE_MAX_BYTES, maxTransfer));
      const piece = bounce.subarray(0, pnum);
      await copyPiece(node, pos, piece, io);
      if (!prefetch) copyOut(buf, offsetBytes, piece, pos);
    } else if (!prefetch) {
      const from = Math.max(pos, offsetBytes);
      const to = Math.min(pos + pnum, end);
      if (to > from) await io.read(node, from, buf.subarray(from - offsetBytes, to - offsetBytes));
    }
    pos += pnum;
  }
  // Past the node's end a read returns zeroes.
  if (!prefetch && pos < end) buf.fill(0, Math.max(pos, offsetBytes) - offsetBytes);
}

/** Reads one unallocated piece and writes it back into the node. */
async function copyPiece(node: BlockNode, offsetBytes: number, piece: Uint8Array, io: CopyOnReadIo): Promise<void> {
  await io.read(node, offsetBytes, piece);
  if (node.driver.has.pwriteZeroes && io.isZero(piece)) {
    await io.writeZeroes(node, offsetBytes, piece.length, Req.WRITE_UNCHANGED);
  } else {
    await io.write(node, offsetBytes, piece, Req.WRITE_UNCHANGED);
  }
}

/** Copies the part of `piece` (at `pieceOffset`) that overlaps the caller's buffer (at `bufOffset`). */
function copyOut(buf: Uint8Array, bufOffset: number, piece: Uint8Array, pieceOffset: number): void {
  const from = Math.max(bufOffset, pieceOffset);
  const to = Math.min(bufOffset + buf.length, pieceOffset + piece.length);
  if (to > from) buf.set(piece.subarray(from - pieceOffset, to - pieceOffset), from - bufOffset);
}
