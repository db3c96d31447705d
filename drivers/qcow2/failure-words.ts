/*
 * QEMU's two ways of wording a failed step, for the qcow2 driver:
 *   - error_setg_errno: the step, then strerror ("Failed to write refblock:
 *     No space left on device"), whatever the failure said (errnoError,
 *     withErrno);
 *   - error_prepend: the step before the failure's own words ("Failed to
 *     resize underlying file: Could not write zeros for preallocation: …",
 *     withPrefix).
 * A failure that is not a BlockError is a bug: withPrefix lets it through
 * unchanged; errnoError reports it as EIO, as QEMU's errno paths do.
 */
import { BlockError, strerror } from '../../block/errors.js';

/** A failure as QEMU's error_setg_errno reports it: the context, then strerror. */
export function errnoError(e: unknown, context: string): BlockError {
  const code = e instanceof BlockError ? e.code : 'EIO';
  return new BlockError(code, `${context}: ${strerror(code)}`, { cause: e });
}

/** Runs `run`; its failure comes out worded by errnoError ("What: strerror"). */
export async function withErrno<T>(context: string, run: () => Promise<T>): Promise<T> {
  try {
    return await run();
  } catch (e) {
    throw errnoError(e, context);
  }
}

/** Runs `run`; a BlockError it throws gets `context` before its own message (error_prepend). */
export async function withPrefix<T>(context: string, run: () => Promise<T>): Promise<T> {
  try {
    return await run();
  } catch (e) {
    if (!(e instanceof BlockError)) throw e;
    throw new BlockError(e.code, `${context}: ${e.message}`, { cause: e });
  }
}
