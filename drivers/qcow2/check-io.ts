/*
 * What `qemu-img check` for qcow2 works on and produces: the image file as
 * a reader/writer (CheckFile), the result counters (QEMU's BdrvCheckResult)
 * and the way a check is abandoned (CheckAbort).
 *
 * The check reads metadata straight from the image file, never through the
 * qcow2 driver, so that it can look at images the driver refuses to open.
 * Reads follow QEMU's block layer: bytes past the end of the file read as
 * zeros, and a read reaching beyond BDRV_MAX_LENGTH (2^63 - 2^30) fails with
 * EIO (bdrv_check_request), which is how an absurd table offset in an
 * image surfaces in QEMU's check. Offsets are numbers; values above 2^53
 * are far beyond any file and only ever read as zeros or fail.
 *
 * A check ends early (QEMU's `return ret` with ret < 0) by throwing
 * CheckAbort with the errno qemu-img prints after "Check failed: ". The
 * counters gathered so far stay in the result object the caller passed.
 */
import { BlockError, strerror, type ErrnoCode } from '../../block/errors.js';
import { Perm } from '../../block/flags.js';
import { MAX_LENGTH_BYTES, flush, pdiscard, preadv, pwritev, truncate } from '../../block/io.js';
import type { BdrvChild } from '../../block/node.js';

/** QEMU's BDRV_MAX_LENGTH: no request may reach beyond it (EIO). */
export const MAX_REQUEST_END_BYTES = 2 ** 63 - 2 ** 30;

/** The image file as the check sees it. */
export interface CheckFile {
  /** Length in bytes, in whole 512-byte sectors as QEMU's bdrv_getlength reports it. */
  readonly lengthBytes: number;
  readonly writable: boolean;
  /** Reads `buf.length` bytes at `offsetBytes` (< the file length); the caller zero-fills past the end. */
  read(offsetBytes: number, buf: Uint8Array): Promise<void>;
  write(offsetBytes: number, data: Uint8Array): Promise<void>;
  /** Grows the file to at least `bytes` (bdrv_truncate with exact=false); never shrinks it. */
  grow(bytes: number): Promise<void>;
  /** Discards a range (a hint: the bytes may read as zeros afterwards, or keep their content). */
  discard(offsetBytes: number, bytes: number): Promise<void>;
  flush(): Promise<void>;
}

/**
 * A CheckFile over an edge to the protocol node (needs WRITE and RESIZE to
 * repair; discards reach the file only if the node was opened with
 * discard=unmap, which QEMU gives the file child of a format by default).
 */
export function checkFileOf(child: BdrvChild): CheckFile {
  return {
    get lengthBytes() {
      return child.node.totalBytes;
    },
    get writable() {
      return !child.node.readOnly && (child.perm & Perm.WRITE) !== 0;
    },
    read: (offsetBytes, buf) => preadv(child, offsetBytes, buf),
    write: (offsetBytes, data) => pwritev(child, offsetBytes, data),
    grow: async (bytes) => {
      if (bytes <= child.node.totalBytes) return;
      // Past what a node can hold the host's ftruncate would fail: QEMU's file-posix message.
      if (bytes > MAX_LENGTH_BYTES) throw new BlockError('EFBIG', `Could not resize file: ${strerror('EFBIG')}`);
      await truncate(child, bytes, false, 'off');
    },
    discard: (offsetBytes, bytes) => pdiscard(child, offsetBytes, bytes),
    flush: () => flush(child.node),
  };
}

/**
 * Reads like QEMU's bdrv_pread on the file child: zeros past the end of the
 * file, EIO for a range reaching beyond BDRV_MAX_LENGTH.
 */
export async function readAt(file: CheckFile, offsetBytes: number, buf: Uint8Array): Promise<void> {
  if (!(offsetBytes >= 0) || offsetBytes + buf.length > MAX_REQUEST_END_BYTES) throw new BlockError('EIO');
  const inFile = Math.max(0, Math.min(buf.length, file.lengthBytes - offsetBytes));
  if (inFile > 0) await file.read(offsetBytes, buf.subarray(0, inFile));
  buf.fill(0, inFile);
}

/** QEMU's BlockFragInfo. */
export interface FragInfo {
  totalClusters: number;
  allocatedClusters: number;
  fragmentedClusters: number;
  compressedClusters: number;
}

/** QEMU's BdrvCheckResult. */
export interface CheckResult {
  corruptions: number;
  leaks: number;
  checkErrors: number;
  corruptionsFixed: number;
  leaksFixed: number;
  imageEndOffset: number;
  bfi: FragInfo;
}

export function emptyCheckResult(): CheckResult {
  return {
    corruptions: 0,
    leaks: 0,
    checkErrors: 0,
    corruptionsFixed: 0,
    leaksFixed: 0,
    imageEndOffset: 0,
    bfi: { totalClusters: 0, allocatedClusters: 0, fragmentedClusters: 0, compressedClusters: 0 },
  };
}

/** qcow2_add_check_result: adds the counters of `src` to `out`; the allocation info too when asked. */
export function addCheckResult(out: CheckResult, src: CheckResult, withAllocationInfo: boolean): void {
  out.corruptions += src.corruptions;
  out.leaks += src.leaks;
  out.checkErrors += src.checkErrors;
  out.corruptionsFixed += src.corruptionsFixed;
  out.leaksFixed += src.leaksFixed;
  if (withAllocationInfo) {
    out.imageEndOffset = src.imageEndOffset;
    out.bfi = { ...src.bfi };
  }
}

/** Which repairs a check may make (QEMU's BdrvCheckMode). */
export interface CheckFix {
  /** BDRV_FIX_LEAKS: lower refcounts that are too high. */
  leaks: boolean;
  /** BDRV_FIX_ERRORS: fix everything else, rebuilding the refcount structure if needed. */
  errors: boolean;
}

export const NO_FIX: CheckFix = { leaks: false, errors: false };

/**
 * Receives each line the check prints on stderr, without its newline:
 * printed as is (QEMU's fprintf) and a newline; for kind 'error', as QEMU's
 * error_report prints it, after the tool's "prog: " prefix; for kind
 * 'unterminated', as is with no newline (QEMU's error_printf of a text
 * without one: what is printed next continues the line).
 */
export type CheckReport = (line: string, kind?: 'error' | 'unterminated') => void;

/** Ends a check early: qemu-img prints "Check failed: <strerror(code)>". */
export class CheckAbort extends Error {
  constructor(readonly code: ErrnoCode) {
    super(`check aborted: ${code}`);
  }
}

/** The errno of a CheckAbort or a BlockError; anything else is a bug and is rethrown. */
export function errnoOf(e: unknown): ErrnoCode {
  if (e instanceof CheckAbort) return e.code;
  if (e instanceof BlockError) return e.code;
  throw e;
}

/** `%" PRIx64` of a 64-bit value (no 0x, lowercase). */
export function hex64(value: bigint | number): string {
  return BigInt.asUintN(64, BigInt(value)).toString(16);
}
