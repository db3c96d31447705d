/*
 * The allocation map of an image as qemu-img map reports it (img_map,
 * get_block_status and entry_mergeable in QEMU 7.2's qemu-img.c).
 *
 * The range [startOffset, min(startOffset + maxLength, length)) is walked
 * from the start. Each step asks about at most PROBE_MAX_BYTES; the answer
 * comes from the first layer of the backing chain (filters skipped) whose
 * block status says ZERO or DATA; `depth` is that layer's index (0 = the
 * image itself) and `present` its ALLOCATED bit. When no layer says either,
 * the entry is the last layer's answer (depth = chain length - 1) with
 * zero = data = false. `offset` and `filename` are set when the layer gives
 * a valid host offset, and name the node that holds the data.
 *
 * Entries merge while zero, data, depth, present, the presence of offset
 * and filename and the filename itself are equal and the host offsets are
 * contiguous. The generator yields each merged entry once complete, and
 * always yields at least one: an empty range yields the zero-length entry
 * `{start, length: 0, present: false, …}` that qemu-img's JSON prints.
 *
 * Human mode ignores the difference between hole, ZERO and ZERO|DATA: after
 * an entry is yielded, the next one is rewritten as zero (not data) unless
 * it is pure data, so runs of non-data merge. As in QEMU the very first
 * entry is never rewritten.
 *
 * Cost grows with the number of extents, not with the virtual size: one
 * block-status call covers as much as the driver reports at once (up to
 * PROBE_MAX_BYTES), so a sparse 4 TiB image takes 4096 cheap calls.
 */
import { BlockError } from './errors.js';
import { Status } from './flags.js';
import type { BlockNode } from './node.js';
import { blockStatus } from './status.js';

/** Largest range asked about in one block-status call (qemu-img's 1 GiB). */
export const PROBE_MAX_BYTES = 2 ** 30;

export interface MapEntry {
  start: number;
  length: number;
  /** Index in the backing chain of the layer that decides the content (0 = the image). */
  depth: number;
  /** That layer allocates the range (BDRV_BLOCK_ALLOCATED). */
  present: boolean;
  zero: boolean;
  data: boolean;
  /** Host offset of the data in `filename`, when known. */
  offset?: number;
  /** The file holding the data, when `offset` is known. */
  filename?: string;
}

export interface MapOptions {
  startOffset?: number;
  /** Bytes to cover from startOffset (default: to the end). */
  maxLength?: number;
  /** `human` coalesces everything that is not pure data. */
  mode: 'json' | 'human';
}

/** img_map's loop: yields the merged entries of the range, in order. */
export async function* mapImage(node: BlockNode, opts: MapOptions): AsyncGenerator<MapEntry> {
  const start = opts.startOffset ?? 0;
  const end = opts.maxLength === undefined ? node.totalBytes : Math.min(start + opts.maxLength, node.totalBytes);
  let curr: MapEntry = { start, length: 0, depth: 0, present: false, zero: false, data: false };
  while (curr.start + curr.length < end) {
    const offset = curr.start + curr.length;
    const next = await entryAt(node, offset, Math.min(PROBE_MAX_BYTES, end - offset));
    if (mergeable(curr, next)) {
      curr.length += next.length;
      continue;
    }
    if (curr.length > 0) {
      yield curr;
      if (opts.mode === 'human' && !(next.data && !next.zero)) {
        next.data = false;
        next.zero = true;
      }
    }
    curr = next;
  }
  yield curr;
}

/** get_block_status: the first layer that says ZERO or DATA about [offset, offset + bytes). */
async function entryAt(top: BlockNode, offset: number, bytes: number): Promise<MapEntry> {
  let layer = top.skipFilters();
  for (let depth = 0; ; depth++) {
    const r = await blockStatus(layer, offset, bytes, true);
    if (r.pnum <= 0) {
      throw new BlockError('EIO', `Block status of ${layer.describe()} at ${offset} returned no progress`);
    }
    const below = layer.cowChild?.node;
    if (r.status & (Status.ZERO | Status.DATA) || !below) {
      const decided = r.status & (Status.ZERO | Status.DATA) ? r.status : 0;
      const hasOffset = (decided & Status.OFFSET_VALID) !== 0 && r.map !== undefined;
      return {
        start: offset,
        length: r.pnum,
        depth,
        present: (decided & Status.ALLOCATED) !== 0,
        zero: (decided & Status.ZERO) !== 0,
        data: (decided & Status.DATA) !== 0,
        ...(hasOffset ? { offset: r.map, filename: r.file?.filename } : {}),
      };
    }
    bytes = r.pnum;
    layer = below.skipFilters();
  }
}

/** entry_mergeable. */
function mergeable(curr: MapEntry, next: MapEntry): boolean {
  if (curr.length === 0) return false;
  if (curr.zero !== next.zero || curr.data !== next.data) return false;
  if (curr.depth !== next.depth || curr.present !== next.present) return false;
  if (curr.filename !== next.filename) return false;
  if ((curr.offset === undefined) !== (next.offset === undefined)) return false;
  return curr.offset === undefined || curr.offset + curr.length === next.offset;
}
