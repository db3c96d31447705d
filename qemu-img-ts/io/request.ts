/*
 * Running one request the way qemu-io's I/O commands do, and reporting it.
 *
 * The clock runs around the I/O call only (buffers are prepared before it
 * starts). A failure is reduced to its errno and printed as
 * `<word> failed: <strerror>` (qemu-io prints strerror(-ret), not the block
 * layer's message). On success the command's checks run first (read -P:
 * printed even with -q, and they can fail the command), then, unless -q,
 * the dump (read -v) and the statistics lines.
 *
 * Ranges are checked against the image before buffers are allocated: a
 * request reaching past the end fails with EIO (blk_check_byte_request) and
 * would otherwise make `read 0 2G` allocate 2 GiB first. Offsets beyond 2^53
 * are always past the end of any node here.
 */
import { BlockError, strerror, toBlockError, type ErrnoCode } from '../../block/errors.js';
import type { BlockBackend } from '../../block/backend.js';
import { formatReport } from './report.js';
import type { IoSession } from './session.js';

/** BDRV_REQUEST_MAX_BYTES: the longest request qemu-io issues. */
export const REQUEST_MAX_BYTES = 2147483136;
/** Fill byte of read buffers before the read (qemu_io_alloc). */
export const READ_FILL_BYTE = 0xab;
/** Fill byte of write buffers without -P. */
export const WRITE_FILL_BYTE = 0xcd;

export type Timed = { ok: true; elapsedNs: bigint } | { ok: false; errno: ErrnoCode };

/** The operating error behind a failure (system errors become BlockErrors); anything else is a bug and is rethrown. */
export function asBlockError(e: unknown): BlockError {
  if (e instanceof BlockError) return e;
  if (typeof (e as { code?: unknown } | null)?.code === 'string' && (e as { syscall?: unknown }).syscall !== undefined) {
    return toBlockError(e);
  }
  throw e;
}

/** An errno for a failed request (bugs are rethrown). */
export function errnoOf(e: unknown): ErrnoCode {
  return asBlockError(e).code;
}

/** Runs `io` and measures it. */
export async function timed(io: () => Promise<void>): Promise<Timed> {
  const start = process.hrtime.bigint();
  try {
    await io();
  } catch (e) {
    return { ok: false, errno: errnoOf(e) };
  }
  return { ok: true, elapsedNs: process.hrtime.bigint() - start };
}

/** blk_check_byte_request: whether [offset, offset + bytes) lies inside the image (else EIO). */
export function insideImage(blk: BlockBackend, offsetBytes: number, bytes: number): boolean {
  const length = blk.getLength();
  return Number.isSafeInteger(offsetBytes) && offsetBytes <= length && length - offsetBytes >= bytes;
}

/** `<op> failed: <strerror>`. */
export function failedMessage(op: string, errno: ErrnoCode): string {
  return `${op} failed: ${strerror(errno)}`;
}

/** What an I/O command reports, and how. */
export interface RequestReport {
  /** Word of the failure line: read, readv, write, writev, discard, aio_write. */
  failWord: string;
  /** Word of the statistics line: read, wrote, discard. */
  statsWord: string;
  offsetBytes: number;
  countBytes: number;
  /** -C */
  csv: boolean;
  /** -q */
  quiet: boolean;
  /** Runs after success even with -q (read -P); false fails the command. */
  verify?: () => boolean;
  /** Printed between the checks and the statistics unless -q (read -v). */
  dump?: () => void;
}

/** Prepares a request outside the clock (allocates, fills) and returns the request to time. */
export type PrepareRequest = () => () => Promise<void>;

/** Prints `<word> failed: …` and fails the command. */
export function requestFailed(s: IoSession, r: RequestReport, errno: ErrnoCode): false {
  s.print(failedMessage(r.failWord, errno));
  return false;
}

/** The output of a request that succeeded; false when its checks failed. */
export function requestDone(s: IoSession, r: RequestReport, elapsedNs: bigint): boolean {
  const ok = r.verify?.() ?? true;
  if (r.quiet) return ok;
  r.dump?.();
  const { statsWord: op, offsetBytes, countBytes, csv } = r;
  s.output.stdout(formatReport({ op, elapsedNs, offsetBytes, countBytes, totalBytes: countBytes, ops: 1, csv }));
  return ok;
}

/** Checks the range, runs the prepared request under the clock and reports it. */
export async function issueRequest(s: IoSession, r: RequestReport, prepare: PrepareRequest): Promise<boolean> {
  if (!insideImage(s.backend(), r.offsetBytes, r.countBytes)) return requestFailed(s, r, 'EIO');
  const t = await timed(prepare());
  return t.ok ? requestDone(s, r, t.elapsedNs) : requestFailed(s, r, t.errno);
}
