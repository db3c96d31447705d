/*
 * Bit constants shared by every layer: request flags, block-status flags,
 * permissions. Values are QEMU's (include/block/block-common.h), so traces
 * and tests can be read side by side with QEMU's.
 */

/** Request flags (BdrvRequestFlags). */
export const Req = {
  NONE: 0,
  COPY_ON_READ: 0x1,
  /** Internal: this write is a write-zeroes (set by the gate, e.g. detect-zeroes). */
  ZERO_WRITE: 0x2,
  /** Write-zeroes may deallocate (punch holes); honoured only on nodes opened with discard=unmap. */
  MAY_UNMAP: 0x4,
  /** Force unit access: the data is on stable storage when the request completes. */
  FUA: 0x10,
  WRITE_COMPRESSED: 0x20,
  /** The write does not change guest-visible data (e.g. copy-on-read). */
  WRITE_UNCHANGED: 0x40,
  /** Serialise against every overlapping request. */
  SERIALISING: 0x80,
  /** Write-zeroes must not fall back to writing a zero buffer: fail with ENOTSUP instead. */
  NO_FALLBACK: 0x100,
  PREFETCH: 0x200,
} as const;

/** Block status flags (BDRV_BLOCK_*). */
export const Status = {
  /** Data is read from `file` at `map` (when OFFSET_VALID). */
  DATA: 0x01,
  /** Reads return zeroes. */
  ZERO: 0x02,
  /** `map` and `file` are meaningful. */
  OFFSET_VALID: 0x04,
  /** Driver-internal: "ask `file` at `map`"; never leaves the gate. */
  RAW: 0x08,
  /** This layer decides the content (it does not defer to a backing file). */
  ALLOCATED: 0x10,
  /** The range ends at the end of the node. */
  EOF: 0x20,
  /** Driver hint: the gate may ask `file` whether DATA is really ZERO. */
  RECURSE: 0x40,
} as const;

/** Permissions on an edge (BLK_PERM_*). */
export const Perm = {
  CONSISTENT_READ: 0x1,
  WRITE: 0x2,
  WRITE_UNCHANGED: 0x4,
  RESIZE: 0x8,
  ALL: 0xf,
} as const;

export const PERM_NAMES: ReadonlyArray<readonly [number, string]> = [
  [Perm.CONSISTENT_READ, 'consistent read'],
  [Perm.WRITE, 'write'],
  [Perm.WRITE_UNCHANGED, 'write unchanged'],
  [Perm.RESIZE, 'resize'],
];

export function permNames(perm: number): string {
  return PERM_NAMES.filter(([bit]) => perm & bit)
    .map(([, name]) => name)
    .join(', ');
}

/** Preallocation modes of create and truncate (PreallocMode). */
export type Prealloc = 'off' | 'metadata' | 'falloc' | 'full';
export const PREALLOC_MODES: readonly Prealloc[] = ['off', 'metadata', 'falloc', 'full'];

/** Alignment helpers; all arguments in bytes, `align` a positive integer. */
export function alignDown(value: number, align: number): number {
  return value - (value % align);
}

export function alignUp(value: number, align: number): number {
  const rest = value % align;
  return rest === 0 ? value : value + (align - rest);
}

export function isAligned(value: number, align: number): boolean {
  return value % align === 0;
}

export function isPowerOfTwo(n: number): boolean {
  return Number.isSafeInteger(n) && n > 0 && 2 ** Math.round(Math.log2(n)) === n;
}
