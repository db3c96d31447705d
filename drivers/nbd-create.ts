/*
 * `qemu-img create` on an NBD URI (QEMU's bdrv_co_create_opts_simple, the
 * create of protocols that cannot make storage): the export must exist.
 * It is opened read-write, "truncated" to the requested size — which NBD
 * allows only when it does not grow the export ("Cannot grow NBD nodes") —
 * and its first sector is zeroed, so a raw image there does not probe as
 * whatever it held before. Only preallocation=off is accepted.
 */
import type { CreateContext, CreateOptDesc, CreateRequest } from '../block/driver.js';
import { BlockBackend } from '../block/backend.js';
import { BlockError, isBlockError, strerror } from '../block/errors.js';
import { PREALLOC_MODES, Req } from '../block/flags.js';
import { SECTOR_BYTES } from '../block/io.js';

/** bdrv_create_opts_simple. */
export const NBD_CREATE_OPTS: readonly CreateOptDesc[] = [
  { name: 'size', type: 'size', help: 'Virtual disk size' },
  { name: 'preallocation', type: 'string', help: 'Preallocation mode (allowed values: off)' },
];

async function openExisting(ctx: CreateContext, filename: string): Promise<BlockBackend> {
  try {
    const node = await ctx.graph.openNode({ driver: 'nbd', filename });
    return new BlockBackend(ctx.graph, node, { writable: true, resizable: true });
  } catch (e) {
    if (!(e instanceof BlockError)) throw e;
    const why = "Protocol driver 'nbd' does not support image creation, and opening the image failed";
    throw new BlockError(e.code, `${why}: ${e.message}`, { cause: e });
  }
}

/** create_file_fallback_truncate: shrinking is a no-op, growing fails with the driver's reason. */
async function fitSize(blk: BlockBackend, sizeBytes: number): Promise<void> {
  try {
    await blk.truncate(sizeBytes, false);
  } catch (e) {
    if (!isBlockError(e, 'ENOTSUP') || blk.getLength() < sizeBytes) throw e;
  }
}

/** create_file_fallback_zero_first_sector. */
async function zeroFirstSector(blk: BlockBackend): Promise<void> {
  const bytes = Math.min(blk.getLength(), SECTOR_BYTES);
  if (bytes === 0) return;
  try {
    await blk.pwriteZeroes(0, bytes, Req.MAY_UNMAP);
  } catch (e) {
    if (!(e instanceof BlockError)) throw e;
    throw new BlockError(e.code, `Failed to clear the new image's first sector: ${strerror(e.code)}`, { cause: e });
  }
}

export async function nbdCoCreate(ctx: CreateContext, request: CreateRequest): Promise<void> {
  const sizeBytes = Number(request.opts.get('size') ?? '0');
  const prealloc = request.opts.get('preallocation') ?? 'off';
  if (!(PREALLOC_MODES as readonly string[]).includes(prealloc)) throw new BlockError('EINVAL', `invalid parameter value: ${prealloc}`);
  if (prealloc !== 'off') throw new BlockError('ENOTSUP', `Unsupported preallocation mode '${prealloc}'`);
  const blk = await openExisting(ctx, request.filename);
  try {
    await fitSize(blk, sizeBytes);
    await zeroFirstSector(blk);
  } finally {
    await blk.close();
  }
}
