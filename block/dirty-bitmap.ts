/*
 * Dirty bitmaps (QEMU's BdrvDirtyBitmap, block/dirty-bitmap.c): which
 * parts of a node changed, at a granularity of 512 B to 2 GiB (a power of
 * two), for incremental backup.
 *
 * A DirtyBitmap covers the node's length in bytes (`sizeBytes`); bit k
 * stands for bytes [k*g, (k+1)*g). Ranges are given in bytes; a range
 * marks every granule it touches. The bits live in a SparseBits
 * (dirty-bitmap-bits.ts), so memory and time grow with what is dirty, not
 * with the size of the node.
 *
 * States, as QEMU's: `disabled` (not recording guest writes; merge and
 * clear still work), `busy` (in use by an operation such as an NBD export:
 * the user may not modify or remove it), `readOnly` (loaded from an image
 * opened read-only: cannot change), `inconsistent` (a persistent bitmap
 * found in use on disk, i.e. not saved cleanly: only removal is allowed;
 * it is also disabled), `persistent` (stored in the image on close).
 * `bitmapCheck` refuses operations with QEMU's messages.
 *
 * Bitmaps hang off their node (`node.dirtyBitmaps`, newest first, as
 * QEMU's list is). The request gate (io.ts) calls `markDirty` after every
 * write, write-zeroes and discard that reached the node, failed or not, and
 * `resizeDirtyBitmaps` after a truncate: a grown area starts clean, a cut
 * one is forgotten. The QMP-level operations (add, remove, merge…) are in
 * dirty-bitmap-ops.ts.
 *
 * The dirty count is QEMU's: dirty granules times the granularity (it may
 * pass the node's length by less than a granule at the end).
 */
import { BlockError, invariant } from './errors.js';
import { isPowerOfTwo } from './flags.js';
import type { BlockNode } from './node.js';
import { SparseBits } from './dirty-bitmap-bits.js';

/** Granularity limits (bytes): BDRV_SECTOR_SIZE and the largest a u32 power of two allows. */
export const MIN_GRANULARITY_BYTES = 512;
export const MAX_GRANULARITY_BYTES = 2 ** 31;
/** bdrv_get_default_bitmap_granularity: the cluster size clamped to this range, else the upper end. */
const DEFAULT_GRANULARITY_MIN_BYTES = 4096;
const DEFAULT_GRANULARITY_MAX_BYTES = 65536;

/** A run of bytes that is all dirty or all clean. */
export interface BitmapExtent {
  offset: number;
  bytes: number;
  dirty: boolean;
}

export class DirtyBitmap {
  readonly granularityBits: number;
  private readonly bits: SparseBits;
  private size: number;
  disabled = false;
  busy = false;
  readOnly = false;
  inconsistent = false;
  persistent = false;

  constructor(
    /** null for an anonymous bitmap (merge scratch space, successors). */
    readonly name: string | null,
    readonly granularityBytes: number,
    sizeBytes: number,
  ) {
    invariant(isPowerOfTwo(granularityBytes) && granularityBytes >= MIN_GRANULARITY_BYTES && granularityBytes <= MAX_GRANULARITY_BYTES);
    invariant(Number.isSafeInteger(sizeBytes) && sizeBytes >= 0);
    this.granularityBits = Math.log2(granularityBytes);
    this.size = sizeBytes;
    this.bits = new SparseBits(this.granulesFor(sizeBytes));
  }

  get sizeBytes(): number {
    return this.size;
  }

  /** Recording guest writes (QEMU's `recording`; a successor does not exist here). */
  get recording(): boolean {
    return !this.disabled;
  }

  /** Dirty granules times the granularity (QEMU's count). */
  get dirtyBytes(): number {
    return this.bits.count * this.granularityBytes;
  }

  /** Memory held, in chunks of 2^15 granules (for tests of the cost claims). */
  get chunkCount(): number {
    return this.bits.chunkCount;
  }

  private granulesFor(bytes: number): number {
    return Math.ceil(bytes / this.granularityBytes);
  }

  private granuleOf(offsetBytes: number): number {
    return Math.floor(offsetBytes / this.granularityBytes);
  }

  /** Marks every granule [offset, offset + bytes) touches (clamped to the size). */
  setDirty(offsetBytes: number, bytes: number): void {
    if (bytes <= 0) return;
    this.bits.setRange(this.granuleOf(offsetBytes), this.granulesFor(offsetBytes + bytes));
  }

  /**
   * Clears every granule [offset, offset + bytes) touches. Like QEMU's
   * hbitmap_reset, callers pass granule-aligned ranges (or one ending at
   * the size); a partial granule is cleared whole.
   */
  resetDirty(offsetBytes: number, bytes: number): void {
    if (bytes <= 0) return;
    this.bits.resetRange(this.granuleOf(offsetBytes), this.granulesFor(offsetBytes + bytes));
  }

  clear(): void {
    this.bits.resetAll();
  }

  isDirty(offsetBytes: number): boolean {
    return offsetBytes < this.size && this.bits.get(this.granuleOf(offsetBytes));
  }

  /**
   * The first dirty byte in [offset, offset + bytes) (default: to the end),
   * or -1 (hbitmap_next_dirty: `offset` itself when its granule is dirty).
   */
  nextDirty(offsetBytes: number, bytes = this.size - offsetBytes): number {
    const end = Math.min(this.size, offsetBytes + bytes);
    if (offsetBytes >= end) return -1;
    const bit = this.bits.nextSet(this.granuleOf(offsetBytes), this.granulesFor(end));
    return bit < 0 ? -1 : Math.max(offsetBytes, bit * this.granularityBytes);
  }

  /** The first clean byte in [offset, offset + bytes) (default: to the end), or -1. */
  nextClean(offsetBytes: number, bytes = this.size - offsetBytes): number {
    const end = Math.min(this.size, offsetBytes + bytes);
    if (offsetBytes >= end) return -1;
    const bit = this.bits.nextClear(this.granuleOf(offsetBytes), this.granulesFor(end));
    if (bit < 0) return -1;
    const at = Math.max(offsetBytes, bit * this.granularityBytes);
    return at < end ? at : -1;
  }

  /** The first dirty run inside [offset, offset + bytes), clipped to it, or null. */
  nextDirtyArea(offsetBytes: number, bytes: number): { offset: number; bytes: number } | null {
    const end = Math.min(this.size, offsetBytes + bytes);
    const start = this.nextDirty(offsetBytes, end - offsetBytes);
    if (start < 0) return null;
    const clean = this.nextClean(start, end - start);
    return { offset: start, bytes: (clean < 0 ? end : clean) - start };
  }

  /** The dirty and clean runs covering [offset, offset + bytes) ∩ [0, size), in order. */
  *extents(offsetBytes = 0, bytes = this.size - offsetBytes): Generator<BitmapExtent> {
    const end = Math.min(this.size, offsetBytes + bytes);
    for (let at = offsetBytes; at < end; ) {
      const dirty = this.isDirty(at);
      const next = dirty ? this.nextClean(at, end - at) : this.nextDirty(at, end - at);
      const stop = next < 0 ? end : next;
      yield { offset: at, bytes: stop - at, dirty };
      at = stop;
    }
  }

  /** The dirty runs inside [offset, offset + bytes), in order. */
  *dirtyExtents(offsetBytes = 0, bytes = this.size - offsetBytes): Generator<{ offset: number; bytes: number }> {
    const end = Math.min(this.size, offsetBytes + bytes);
    for (let at = offsetBytes; at < end; ) {
      const area = this.nextDirtyArea(at, end - at);
      if (!area) return;
      yield area;
      at = area.offset + area.bytes;
    }
  }

  /** New size (hbitmap_truncate): a grown area is clean, bits past a smaller size are dropped. */
  resize(sizeBytes: number): void {
    invariant(Number.isSafeInteger(sizeBytes) && sizeBytes >= 0);
    this.bits.resize(this.granulesFor(sizeBytes));
    this.size = sizeBytes;
  }

  /**
   * ORs `src` into this bitmap, without checks (QEMU's hbitmap_merge): same
   * granularity, chunk by chunk; otherwise every granule of this bitmap
   * that a dirty range of `src` touches.
   */
  mergeFrom(src: DirtyBitmap): void {
    if (src.granularityBits === this.granularityBits) {
      this.bits.orWith(src.bits);
      return;
    }
    for (const area of src.dirtyExtents()) this.setDirty(area.offset, area.bytes);
  }

  /** A copy of the bits under another name (states not copied). */
  copyBits(name: string | null): DirtyBitmap {
    const copy = new DirtyBitmap(name, this.granularityBytes, this.size);
    copy.bits.orWith(this.bits);
    return copy;
  }

  // ------------------------------------------------------------ serialisation

  /**
   * Bytes of the image covered by one `chunkBytes` of serialised bits
   * (bdrv_dirty_bitmap_serialization_coverage): chunkBytes * 8 granules.
   */
  serializationCoverage(chunkBytes: number): number {
    return chunkBytes * 8 * this.granularityBytes;
  }

  /** Bytes needed to serialise the whole bitmap (one bit per granule, whole bytes). */
  serializationBytes(): number {
    return Math.ceil(this.granulesFor(this.size) / 8);
  }

  /**
   * Writes the bits of [offset, offset + bytes) into `out` as qcow2 stores
   * them: bit k of the stream (byte k / 8, bit k % 8, least significant
   * first) is granule offset/g + k. `offset` must start a byte of the
   * stream (a multiple of 8 granules); bits past the size are zero.
   */
  serialize(offsetBytes: number, bytes: number, out: Uint8Array): void {
    const first = this.serialStart(offsetBytes);
    this.bits.readBytes(first, this.granulesFor(Math.min(this.size, offsetBytes + bytes)) - first, out);
  }

  /** Sets the granules of [offset, offset + bytes) whose bit is set in `data` (same layout as serialize). */
  deserialize(offsetBytes: number, bytes: number, data: Uint8Array): void {
    const first = this.serialStart(offsetBytes);
    this.bits.orBytes(first, this.granulesFor(Math.min(this.size, offsetBytes + bytes)) - first, data);
  }

  private serialStart(offsetBytes: number): number {
    const first = this.granuleOf(offsetBytes);
    invariant(first * this.granularityBytes === offsetBytes && first % 8 === 0, 'serialisation starts on a byte of the bit stream');
    return first;
  }
}

// ---------------------------------------------------------------- checks

/** What an operation needs of a bitmap (BDRV_BITMAP_*). */
export const BitmapCheck = {
  BUSY: 0x1,
  RO: 0x2,
  INCONSISTENT: 0x4,
  /** Modifying operations: not busy, not read-only, not inconsistent. */
  DEFAULT: 0x7,
  /** Reading or enabling: not busy, not inconsistent. */
  ALLOW_RO: 0x5,
} as const;

/** The hint QEMU prints under the "inconsistent" refusal. */
export const INCONSISTENT_HINT = 'Try block-dirty-bitmap-remove to delete this bitmap from disk';

/** bdrv_dirty_bitmap_check: null, or the refusal with QEMU's message (and hint, on its own line). */
export function bitmapCheck(bm: DirtyBitmap, flags: number): BlockError | null {
  if (flags & BitmapCheck.BUSY && bm.busy) {
    return new BlockError('EBUSY', `Bitmap '${bm.name}' is currently in use by another operation and cannot be used`);
  }
  if (flags & BitmapCheck.RO && bm.readOnly) {
    return new BlockError('EPERM', `Bitmap '${bm.name}' is readonly and cannot be modified`);
  }
  if (flags & BitmapCheck.INCONSISTENT && bm.inconsistent) {
    return new BlockError('EINVAL', `Bitmap '${bm.name}' is inconsistent and cannot be used\n${INCONSISTENT_HINT}`);
  }
  return null;
}

/** Throws bitmapCheck's refusal, if any. */
export function requireBitmap(bm: DirtyBitmap, flags: number): void {
  const refusal = bitmapCheck(bm, flags);
  if (refusal) throw refusal;
}

// ---------------------------------------------------------------- on a node

/** bdrv_find_dirty_bitmap. */
export function findDirtyBitmap(node: BlockNode, name: string): DirtyBitmap | null {
  return node.dirtyBitmaps.find((bm) => bm.name === name) ?? null;
}

/**
 * bdrv_create_dirty_bitmap: a new enabled, empty bitmap covering the node,
 * first in the node's list. A name already taken is refused ("Bitmap
 * already exists: NAME").
 */
export function createDirtyBitmap(node: BlockNode, granularityBytes: number, name: string | null, sizeBytes = node.totalBytes): DirtyBitmap {
  if (name !== null && findDirtyBitmap(node, name)) throw new BlockError('EEXIST', `Bitmap already exists: ${name}`);
  const bm = new DirtyBitmap(name, granularityBytes, sizeBytes);
  node.dirtyBitmaps.unshift(bm);
  return bm;
}

/** bdrv_release_dirty_bitmap: forgets the bitmap (nothing changes on disk). */
export function releaseDirtyBitmap(node: BlockNode, bm: DirtyBitmap): void {
  const i = node.dirtyBitmaps.indexOf(bm);
  if (i >= 0) node.dirtyBitmaps.splice(i, 1);
}

/**
 * bdrv_get_default_bitmap_granularity: the node's cluster size clamped to
 * [4 KiB, 64 KiB], or 64 KiB when the driver cannot tell.
 */
export function defaultBitmapGranularity(node: BlockNode): number {
  const cluster = node.driver.getInfo(node)?.clusterBytes ?? 0;
  if (cluster <= 0) return DEFAULT_GRANULARITY_MAX_BYTES;
  return Math.min(DEFAULT_GRANULARITY_MAX_BYTES, Math.max(DEFAULT_GRANULARITY_MIN_BYTES, cluster));
}

/**
 * bdrv_set_dirty: marks [offset, offset + bytes) in every recording bitmap
 * of the node (the gate's hook; bitmaps shorter than the node grow first).
 */
export function markDirty(node: BlockNode, offsetBytes: number, bytes: number): void {
  for (const bm of node.dirtyBitmaps) {
    if (bm.sizeBytes !== node.totalBytes) bm.resize(node.totalBytes);
    if (!bm.disabled) bm.setDirty(offsetBytes, bytes);
  }
}

/** bdrv_dirty_bitmap_truncate: every bitmap of the node follows its length. */
export function resizeDirtyBitmaps(node: BlockNode): void {
  for (const bm of node.dirtyBitmaps) if (bm.sizeBytes !== node.totalBytes) bm.resize(node.totalBytes);
}

/**
 * What a format that stores bitmaps in its image offers (qcow2's
 * bdrv_co_can_store_new_dirty_bitmap, bdrv_co_remove_persistent_dirty_bitmap,
 * bdrv_supports_persistent_dirty_bitmap). Storing happens in the driver's
 * close; loading in its open.
 */
export interface PersistentBitmapHooks {
  /** Whether the image can hold persistent bitmaps at all. */
  supported(node: BlockNode): boolean;
  /** Throws QEMU's refusal when a new persistent bitmap `name` could not be stored. */
  canStore(node: BlockNode, name: string, granularityBytes: number): Promise<void>;
  /** Removes the stored bitmap `name` from the image, if stored (absence is no error). */
  remove(node: BlockNode, name: string): Promise<void>;
}
