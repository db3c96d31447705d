/*
 * Dirty bitmaps served over NBD as `qemu:dirty-bitmap:NAME` (QEMU 7.2's
 * nbd/server.c: the bitmap part of nbd_export_create, bitmap_to_extents,
 * and nbd_export_delete releasing them).
 *
 * Extents: a dirty run has flag NBD_STATE_DIRTY (1), a clean run 0. As
 * QEMU builds them, the range is walked dirty area by dirty area, each
 * area taken at most DIRTY_AREA_MAX_BYTES (INT32_MAX) at a time; a run is
 * added as the clean gap before it, then the dirty area; neighbours with
 * equal flags merge while the sum fits the reply's largest extent; the
 * walk stops as soon as an extent does not fit (REQ_ONE allows one), and
 * a trailing clean run is added only when nothing was refused. Cost grows
 * with the number of dirty runs in the range (the bitmap finds the next
 * dirty and clean byte without scanning), never with its length.
 *
 * Resolving names (`exportDirtyBitmaps`), in the order given (qemu-nbd
 * passes its -B list, which it built by prepending, so the last -B comes
 * first and gets context id 2): each name is looked up on the exported
 * node, then down its filter or backing chain (bdrv_filter_or_cow_bs), and
 * must be usable: not busy, not inconsistent (read-only is fine); an
 * enabled bitmap on a writable node cannot back a read-only export (its
 * contents could change under the client). Every failure is QEMU's
 * message; nothing changes unless every name passes. Then every bitmap is
 * marked busy — the user may not remove, clear, enable, disable or merge
 * into it while exported, though it keeps recording writes — until the
 * export closes (`onClose`, which NbdExport calls; a caller whose export
 * was never created calls it itself).
 */
import { BlockError } from '../block/errors.js';
import { BitmapCheck, bitmapCheck, findDirtyBitmap, type DirtyBitmap } from '../block/dirty-bitmap.js';
import type { BlockNode } from '../block/node.js';
import type { ExtentLimits, MetaContextSource } from './meta-context.js';
import { CONTEXT_DIRTY_BITMAP_PREFIX, STATE_DIRTY } from './protocol.js';
import type { Extent } from './wire-transmission.js';

/** Largest dirty area taken at once (QEMU passes INT32_MAX to bdrv_dirty_bitmap_next_dirty_area). */
export const DIRTY_AREA_MAX_BYTES = 2 ** 31 - 1;

/**
 * Extents being built under a reply's limits (QEMU's NBDExtentArray):
 * `add` merges with the last extent when the flags match and the sum
 * fits, and returns false once an extent is refused for lack of room.
 */
class ExtentList {
  readonly extents: Extent[] = [];

  constructor(private readonly limits: ExtentLimits) {}

  add(lengthBytes: number, flags: number): boolean {
    let rest = lengthBytes;
    while (rest > 0) {
      const last = this.extents[this.extents.length - 1];
      if (last && last.flags === flags && last.length + rest <= this.limits.maxExtentBytes) {
        last.length += rest;
        return true;
      }
      if (this.extents.length >= this.limits.maxExtents) return false;
      const length = Math.min(rest, this.limits.maxExtentBytes);
      this.extents.push({ length, flags });
      rest -= length;
    }
    return true;
  }
}

/**
 * The extents of [offset, offset + bytes) of `bitmap` (bitmap_to_extents):
 * DIRTY for dirty runs, 0 for clean ones, from `offset` on, contiguous,
 * at most `limits.maxExtents` of them.
 */
export function bitmapExtents(bitmap: DirtyBitmap, offsetBytes: number, bytes: number, limits: ExtentLimits): Extent[] {
  const list = new ExtentList(limits);
  const end = offsetBytes + bytes;
  let start = offsetBytes;
  for (;;) {
    const area = bitmap.nextDirtyArea(start, end - start);
    if (!area) break;
    const dirtyBytes = Math.min(area.bytes, DIRTY_AREA_MAX_BYTES);
    if (!list.add(area.offset - start, 0) || !list.add(dirtyBytes, STATE_DIRTY)) return list.extents;
    start = area.offset + dirtyBytes;
  }
  list.add(end - start, 0);
  return list.extents;
}

/** `qemu:dirty-bitmap:NAME` for one bitmap; `name` is the one the export was asked for. */
export function bitmapContext(name: string, bitmap: DirtyBitmap): MetaContextSource {
  return {
    name: CONTEXT_DIRTY_BITMAP_PREFIX + name,
    extents: async (offsetBytes, bytes, limits) => bitmapExtents(bitmap, offsetBytes, bytes, limits),
  };
}

/** The next node QEMU searches for a bitmap: a filter's child, else the backing file (bdrv_filter_or_cow_bs). */
function filterOrCow(node: BlockNode): BlockNode | null {
  return (node.driver.isFilter ? node.filteredChild?.node : node.cowChild?.node) ?? null;
}

/** Bitmap `name` on `node` or below it, with the node holding it. */
function findBelow(node: BlockNode, name: string): { bitmap: DirtyBitmap; holder: BlockNode } | null {
  for (let n: BlockNode | null = node; n; n = filterOrCow(n)) {
    const bitmap = findDirtyBitmap(n, name);
    if (bitmap) return { bitmap, holder: n };
  }
  return null;
}

/** The bitmap `name` may back an export (QEMU's checks, in its order), or the refusal. */
function resolveOne(node: BlockNode, name: string, readOnlyExport: boolean): DirtyBitmap {
  const found = findBelow(node, name);
  if (!found) throw new BlockError('ENOENT', `Bitmap '${name}' is not found`);
  const refusal = bitmapCheck(found.bitmap, BitmapCheck.ALLOW_RO);
  if (refusal) throw new BlockError('EINVAL', refusal.message, { cause: refusal });
  if (readOnlyExport && !found.holder.readOnly && !found.bitmap.disabled) {
    throw new BlockError('EINVAL', `Enabled bitmap '${name}' incompatible with readonly export`);
  }
  return found.bitmap;
}

/** What an export of dirty bitmaps adds to NbdExportOptions (spread it in). */
export interface ExportedBitmaps {
  bitmapContexts: MetaContextSource[];
  /** Releases the bitmaps (no longer busy); later calls do nothing. */
  onClose: () => void;
}

/**
 * Resolves `names` for an export of `node` (read-only or not) and marks
 * the bitmaps busy; throws BlockError with QEMU's message when one is
 * missing or unusable (then nothing is marked).
 */
export function exportDirtyBitmaps(node: BlockNode, names: readonly string[], opts: { readOnly: boolean }): ExportedBitmaps {
  const bitmaps = names.map((name) => resolveOne(node, name, opts.readOnly));
  for (const bm of bitmaps) bm.busy = true;
  let released = false;
  return {
    bitmapContexts: names.map((name, i) => bitmapContext(name, bitmaps[i]!)),
    onClose: () => {
      if (released) return;
      released = true;
      for (const bm of bitmaps) bm.busy = false;
    },
  };
}
