/*
 * The dirty bitmap operations a user asks for (QEMU's
 * block/monitor/bitmap-qmp-cmds.c: block-dirty-bitmap-add, -remove,
 * -clear, -enable, -disable, -merge; and qemu-img convert --bitmaps'
 * copying), with QEMU 7.2's checks, order and messages.
 *
 *   add     the name must not be empty; a given granularity is a power of
 *           two of at least 512 (else the node's default, see
 *           dirty-bitmap.ts); a persistent bitmap must be storable in the
 *           image (the format's canStore; a format without persistent
 *           bitmaps: "Can't store persistent bitmaps to NODE: Operation
 *           not supported"); then the name must be free;
 *   remove  not busy, not read-only; a persistent one leaves the image at
 *           once (the format's remove), then memory;
 *   clear   not busy, not read-only, not inconsistent;
 *   enable, disable   not busy, not inconsistent (read-only is fine);
 *   merge   into a scratch bitmap of the target's granularity, each source
 *           (on this node or another) in turn — sources must be usable
 *           (not busy, not inconsistent) and of the target's size, any
 *           granularity — then the scratch into the target, which must be
 *           modifiable: the target is unchanged when anything fails.
 * A bitmap that is not found: "Dirty bitmap 'NAME' not found".
 *
 * `copyPersistentBitmaps` is what `qemu-img convert --bitmaps` does once
 * the target exists (convert_check_bitmaps, convert_copy_bitmaps).
 */
import { BlockError } from './errors.js';
import { isPowerOfTwo } from './flags.js';
import type { BlockNode } from './node.js';
import {
  BitmapCheck,
  MIN_GRANULARITY_BYTES,
  createDirtyBitmap,
  defaultBitmapGranularity,
  findDirtyBitmap,
  releaseDirtyBitmap,
  requireBitmap,
  type DirtyBitmap,
} from './dirty-bitmap.js';

export interface BitmapAddRequest {
  name: string;
  /** Bytes; absent: the node's default. */
  granularityBytes?: number;
  persistent?: boolean;
  disabled?: boolean;
}

/** block_dirty_bitmap_lookup: the bitmap, or "Dirty bitmap 'NAME' not found". */
export function lookupDirtyBitmap(node: BlockNode, name: string): DirtyBitmap {
  const bm = findDirtyBitmap(node, name);
  if (!bm) throw new BlockError('ENOENT', `Dirty bitmap '${name}' not found`);
  return bm;
}

/** Whether the node's format stores bitmaps in the image (bdrv_supports_persistent_dirty_bitmap). */
export function supportsPersistentBitmaps(node: BlockNode): boolean {
  return node.driver.persistentBitmaps?.supported(node) ?? false;
}

/** qmp_block_dirty_bitmap_add. */
export async function bitmapAdd(node: BlockNode, request: BitmapAddRequest): Promise<DirtyBitmap> {
  const { name } = request;
  if (name === '') throw new BlockError('EINVAL', 'Bitmap name cannot be empty');
  let granularity = request.granularityBytes;
  if (granularity === undefined) granularity = defaultBitmapGranularity(node);
  else if (granularity < MIN_GRANULARITY_BYTES || !isPowerOfTwo(granularity) || granularity > 2 ** 31) {
    throw new BlockError('EINVAL', 'Granularity must be power of 2 and at least 512');
  }
  if (request.persistent) await canStoreNewBitmap(node, name, granularity);
  const bm = createDirtyBitmap(node, granularity, name);
  bm.disabled = request.disabled ?? false;
  bm.persistent = request.persistent ?? false;
  return bm;
}

/** bdrv_co_can_store_new_dirty_bitmap: the format's verdict, or a refusal for formats without persistent bitmaps. */
async function canStoreNewBitmap(node: BlockNode, name: string, granularityBytes: number): Promise<void> {
  const hooks = node.driver.persistentBitmaps;
  if (!hooks) throw new BlockError('ENOTSUP', `Can't store persistent bitmaps to ${node.nodeName}: Operation not supported`);
  await hooks.canStore(node, name, granularityBytes);
}

/** qmp_block_dirty_bitmap_remove. */
export async function bitmapRemove(node: BlockNode, name: string): Promise<void> {
  const bm = lookupDirtyBitmap(node, name);
  requireBitmap(bm, BitmapCheck.BUSY | BitmapCheck.RO);
  if (bm.persistent) await node.driver.persistentBitmaps?.remove(node, name);
  releaseDirtyBitmap(node, bm);
}

/** qmp_block_dirty_bitmap_clear. */
export function bitmapClear(node: BlockNode, name: string): void {
  const bm = lookupDirtyBitmap(node, name);
  requireBitmap(bm, BitmapCheck.DEFAULT);
  bm.clear();
}

/** qmp_block_dirty_bitmap_enable / _disable. */
export function bitmapSetEnabled(node: BlockNode, name: string, enabled: boolean): void {
  const bm = lookupDirtyBitmap(node, name);
  requireBitmap(bm, BitmapCheck.ALLOW_RO);
  bm.disabled = !enabled;
}

/** A merge source: a bitmap by name on a node. */
export interface MergeSource {
  node: BlockNode;
  name: string;
}

/**
 * bdrv_merge_dirty_bitmap's checks for merging `src` into `dest`: dest
 * modifiable, src usable, same size.
 */
function checkMerge(dest: DirtyBitmap, src: DirtyBitmap): void {
  requireBitmap(dest, BitmapCheck.DEFAULT);
  requireBitmap(src, BitmapCheck.ALLOW_RO);
  if (src.sizeBytes !== dest.sizeBytes) {
    throw new BlockError(
      'EINVAL',
      `Bitmaps are of different sizes (destination size is ${dest.sizeBytes}, source size is ${src.sizeBytes}) and can't be merged`,
    );
  }
}

/** block_dirty_bitmap_merge: ORs the sources into `target` (unchanged on any error). */
export function bitmapMerge(node: BlockNode, target: string, sources: readonly MergeSource[]): void {
  const dest = lookupDirtyBitmap(node, target);
  const scratch = dest.copyBits(null);
  scratch.clear();
  for (const source of sources) {
    const src = lookupDirtyBitmap(source.node, source.name);
    checkMerge(scratch, src);
    scratch.mergeFrom(src);
  }
  checkMerge(dest, scratch);
  dest.mergeFrom(scratch);
}

/** The persistent bitmaps of a node, in the order QEMU walks them (newest first). */
export function persistentBitmaps(node: BlockNode): DirtyBitmap[] {
  return node.dirtyBitmaps.filter((bm) => bm.persistent);
}

/**
 * convert_check_bitmaps: why the persistent bitmaps of `src` cannot be
 * copied (QEMU's message lines), or null.
 */
export function bitmapsCopyRefusal(src: BlockNode, skipBroken: boolean): string | null {
  if (!supportsPersistentBitmaps(src)) return 'Source lacks bitmap support';
  const broken = persistentBitmaps(src).find((bm) => bm.inconsistent);
  if (broken && !skipBroken) {
    return `Cannot copy inconsistent bitmap '${broken.name}'\nTry --skip-broken-bitmaps, or use 'qemu-img bitmap --remove' to delete it`;
  }
  return null;
}

/**
 * convert_copy_bitmaps: every persistent bitmap of `src` becomes a
 * persistent bitmap of `dst` with the same name, granularity, recording
 * state and bits (dst must have src's size). Inconsistent ones are skipped
 * with `warn("Skipping inconsistent bitmap 'NAME'")` when `skipBroken`.
 * Fails with QEMU's "Failed to create bitmap NAME: …" or "Failed to
 * populate bitmap NAME: …" (the half-made bitmap is removed again). The
 * bitmaps reach dst's image when dst is closed.
 */
export async function copyPersistentBitmaps(src: BlockNode, dst: BlockNode, opts: { skipBroken?: boolean; warn?: (message: string) => void } = {}): Promise<void> {
  for (const bm of persistentBitmaps(src)) {
    const name = bm.name!;
    if (opts.skipBroken && bm.inconsistent) {
      opts.warn?.(`Skipping inconsistent bitmap '${name}'`);
      continue;
    }
    try {
      await bitmapAdd(dst, { name, granularityBytes: bm.granularityBytes, persistent: true, disabled: bm.disabled });
    } catch (e) {
      throw prefixed(e, `Failed to create bitmap ${name}`);
    }
    try {
      bitmapMerge(dst, name, [{ node: src, name }]);
    } catch (e) {
      await bitmapRemove(dst, name).catch(() => undefined);
      throw prefixed(e, `Failed to populate bitmap ${name}`);
    }
  }
}

function prefixed(e: unknown, context: string): unknown {
  return e instanceof BlockError ? new BlockError(e.code, `${context}: ${e.message}`, { cause: e }) : e;
}
