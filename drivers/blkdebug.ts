/*
 * `blkdebug`: a pass-through filter that imposes I/O limits on the node
 * above its `image` child, as QEMU's blkdebug does for tests and debugging:
 * `align` (request alignment), `max-transfer`, `opt-write-zero` /
 * `max-write-zero` and `opt-discard` / `max-discard`.
 *
 * Like QEMU's, it checks that the gate honoured those limits and fails a
 * request that breaks them (EIO, with a message naming the broken limit),
 * which makes it an oracle for the gate's alignment and splitting. Also
 * like QEMU's, write-zeroes and discard pieces smaller than their preferred
 * alignment are not passed down (ENOTSUP, resp. ignored), so tests exercise
 * the gate's fallback; such a piece must not cross an alignment boundary.
 * Error-injection rules are not offered; the option is refused as unknown.
 */
import { z } from 'zod';
import { BlockError } from '../block/errors.js';
import { Req, isAligned, isPowerOfTwo } from '../block/flags.js';
import { pdiscard, preadv, pwriteZeroes, pwritev } from '../block/io.js';
import { ChildRole, type BdrvChild, type BlockNode } from '../block/node.js';
import { zBlockdevRef, zSize } from '../block/options.js';
import type { BlockDriver } from '../block/driver.js';

const optionsSchema = z.object({
  image: zBlockdevRef.optional(),
  align: zSize('align').optional(),
  'max-transfer': zSize('max-transfer').optional(),
  'opt-write-zero': zSize('opt-write-zero').optional(),
  'max-write-zero': zSize('max-write-zero').optional(),
  'opt-discard': zSize('opt-discard').optional(),
  'max-discard': zSize('max-discard').optional(),
});
type Options = z.output<typeof optionsSchema>;

const image = (node: BlockNode) => node.opaque as BdrvChild;

/** A reason the limits cannot be met, or null (QEMU's blkdebug_open checks). */
function invalidLimits(o: Options): string | null {
  const align = o.align ?? 1;
  if (!isPowerOfTwo(align)) return `Cannot meet constraints with align ${align}`;
  const multiples: Array<[string, number | undefined]> = [
    ['max-transfer', o['max-transfer']],
    ['opt-write-zero', o['opt-write-zero']],
    ['max-write-zero', o['max-write-zero']],
    ['opt-discard', o['opt-discard']],
    ['max-discard', o['max-discard']],
  ];
  for (const [key, value] of multiples) {
    if (value !== undefined && (value === 0 || !isAligned(value, align))) {
      return `Cannot meet constraints with ${key} ${value}`;
    }
  }
  return null;
}

function checkRequest(
  node: BlockNode,
  what: string,
  offsetBytes: number,
  bytes: number,
  maxBytes: number,
  align = node.limits.requestAlignment,
): void {
  if (!isAligned(offsetBytes, align) || !isAligned(bytes, align)) {
    throw new BlockError('EIO', `blkdebug: ${what} ${offsetBytes}+${bytes} breaks alignment ${align}`);
  }
  if (maxBytes > 0 && bytes > maxBytes) {
    throw new BlockError('EIO', `blkdebug: ${what} of ${bytes} bytes exceeds the limit ${maxBytes}`);
  }
}

/**
 * True for a piece smaller than `align` (which blkdebug does not pass down);
 * such a piece must stay inside one aligned block, else the gate erred.
 */
function smallPiece(node: BlockNode, what: string, offsetBytes: number, bytes: number, align: number): boolean {
  if (bytes >= align) return false;
  const end = offsetBytes + bytes;
  const inOneBlock = Math.floor(offsetBytes / align) === Math.floor((end - 1) / align);
  if (!inOneBlock) {
    throw new BlockError('EIO', `blkdebug: ${what} piece ${offsetBytes}+${bytes} crosses alignment ${align}`);
  }
  checkRequest(node, what, offsetBytes, bytes, 0);
  return true;
}

export const blkdebugDriver: BlockDriver = {
  name: 'blkdebug',
  isFilter: true,
  optionsSchema,
  strongOptions: ['align', 'max-transfer', 'opt-write-zero', 'max-write-zero', 'opt-discard', 'max-discard'],
  // Opened like a protocol in QEMU, so it reports no allocated size.
  getAllocatedFileSize: async () => undefined,
  async open(node, options, ctx) {
    const o = options as Options;
    const reason = invalidLimits(o);
    if (reason) throw new BlockError('EINVAL', reason);
    const child = (await ctx.openChild('image', ChildRole.FILTERED | ChildRole.PRIMARY))!;
    node.opaque = child;
    node.limits.requestAlignment = o.align ?? 1;
    node.limits.maxTransfer = o['max-transfer'] ?? 0;
    node.limits.pwriteZeroesAlignment = o['opt-write-zero'] ?? 0;
    node.limits.maxPwriteZeroes = o['max-write-zero'] ?? 0;
    node.limits.pdiscardAlignment = o['opt-discard'] ?? 0;
    node.limits.maxPdiscard = o['max-discard'] ?? 0;
    node.supportedWriteFlags = Req.FUA & child.node.supportedWriteFlags;
    node.supportedZeroFlags = (Req.FUA | Req.MAY_UNMAP | Req.NO_FALLBACK) & child.node.supportedZeroFlags;
  },
  getLength: async (node) => image(node).node.totalBytes,
  async coPreadv(node, offsetBytes, buf, flags) {
    checkRequest(node, 'read', offsetBytes, buf.length, node.limits.maxTransfer);
    await preadv(image(node), offsetBytes, buf, flags);
  },
  async coPwritev(node, offsetBytes, buf, flags) {
    checkRequest(node, 'write', offsetBytes, buf.length, node.limits.maxTransfer);
    await pwritev(image(node), offsetBytes, buf, flags);
  },
  async coPwriteZeroes(node, offsetBytes, bytes, flags) {
    const align = Math.max(node.limits.requestAlignment, node.limits.pwriteZeroesAlignment);
    if (smallPiece(node, 'write-zeroes', offsetBytes, bytes, align)) {
      throw new BlockError('ENOTSUP', 'blkdebug: write-zeroes piece smaller than opt-write-zero');
    }
    checkRequest(node, 'write-zeroes', offsetBytes, bytes, node.limits.maxPwriteZeroes, align);
    await pwriteZeroes(image(node), offsetBytes, bytes, flags);
  },
  async coPdiscard(node, offsetBytes, bytes) {
    const align = Math.max(node.limits.requestAlignment, node.limits.pdiscardAlignment);
    if (smallPiece(node, 'discard', offsetBytes, bytes, align)) return;
    checkRequest(node, 'discard', offsetBytes, bytes, node.limits.maxPdiscard, align);
    await pdiscard(image(node), offsetBytes, bytes);
  },
};
