/*
 * Operating errors of the block layer.
 *
 * Two channels, as in QEMU and nbdkit: things that can go wrong at run time
 * (a missing file, a write to a read-only node, a hostile image, a full disk)
 * are a `BlockError` carrying an errno-like `code` and a one-line human
 * message; programmer errors are `assert`s. Bytes read from disk or network
 * never reach an assert: validators return a reason and the caller turns it
 * into a `BlockError`.
 *
 * `ENOTSUP` has a special meaning inside the layer: "this driver cannot do
 * that, fall back" (write-zeroes becomes zero-buffer writes, discard is
 * ignored). Every other code propagates to the user.
 *
 * The numbers are Linux's, because QEMU reports them (NBD errors, qemu-io's
 * strerror texts) and the peers we are compared against run on Linux.
 */

/** errno names and numbers (Linux values). */
export const ERRNO = {
  EPERM: 1,
  ENOENT: 2,
  EIO: 5,
  ENXIO: 6,
  E2BIG: 7,
  EBADF: 9,
  EAGAIN: 11,
  ENOMEM: 12,
  EACCES: 13,
  EBUSY: 16,
  EEXIST: 17,
  ENOTDIR: 20,
  EISDIR: 21,
  EINVAL: 22,
  EFBIG: 27,
  ENOSPC: 28,
  EROFS: 30,
  ERANGE: 34,
  ELOOP: 40,
  ENODATA: 61,
  EOVERFLOW: 75,
  ENOTSUP: 95,
  EADDRINUSE: 98,
  EADDRNOTAVAIL: 99,
  ESHUTDOWN: 108,
  ETIMEDOUT: 110,
  ECONNREFUSED: 111,
  ECANCELED: 125,
  ENOMEDIUM: 123,
} as const;

export type ErrnoCode = keyof typeof ERRNO;

/** glibc's strerror() texts, so messages read exactly like QEMU's tools. */
const STRERROR: Record<ErrnoCode, string> = {
  EPERM: 'Operation not permitted',
  ENOENT: 'No such file or directory',
  EIO: 'Input/output error',
  ENXIO: 'No such device or address',
  E2BIG: 'Argument list too long',
  EBADF: 'Bad file descriptor',
  EAGAIN: 'Resource temporarily unavailable',
  ENOMEM: 'Cannot allocate memory',
  EACCES: 'Permission denied',
  EBUSY: 'Device or resource busy',
  EEXIST: 'File exists',
  ENOTDIR: 'Not a directory',
  EISDIR: 'Is a directory',
  EINVAL: 'Invalid argument',
  EFBIG: 'File too large',
  ENOSPC: 'No space left on device',
  EROFS: 'Read-only file system',
  ERANGE: 'Numerical result out of range',
  ELOOP: 'Too many levels of symbolic links',
  ENODATA: 'No data available',
  EOVERFLOW: 'Value too large for defined data type',
  ENOTSUP: 'Operation not supported',
  EADDRINUSE: 'Address already in use',
  EADDRNOTAVAIL: 'Cannot assign requested address',
  ESHUTDOWN: 'Cannot send after transport endpoint shutdown',
  ETIMEDOUT: 'Connection timed out',
  ECONNREFUSED: 'Connection refused',
  ECANCELED: 'Operation canceled',
  ENOMEDIUM: 'No medium found',
};

/**
 * A programmer's invariant (never about disk or network bytes, which get
 * validators returning reasons). Lighter than node:assert, whose loading
 * alone costs the command-line tools ~20 ms of start-up.
 */
export function invariant(condition: unknown, message = 'invariant violated'): asserts condition {
  if (!condition) throw new Error(`internal error: ${message}`);
}

export function strerror(code: ErrnoCode): string {
  return STRERROR[code];
}

export function isErrnoCode(code: unknown): code is ErrnoCode {
  return typeof code === 'string' && Object.prototype.hasOwnProperty.call(ERRNO, code);
}

/** The one operating error of the block layer. */
export class BlockError extends Error {
  override readonly name = 'BlockError';
  readonly code: ErrnoCode;

  /** `message` defaults to strerror(code). */
  constructor(code: ErrnoCode, message?: string, options?: { cause?: unknown }) {
    super(message ?? STRERROR[code], options);
    this.code = code;
  }

  get errno(): number {
    return ERRNO[this.code];
  }
}

export function isBlockError(e: unknown, code?: ErrnoCode): e is BlockError {
  return e instanceof BlockError && (code === undefined || e.code === code);
}

/**
 * Turns anything thrown by Node's fs/net layers into a BlockError with the
 * same errno name (unknown system codes become EIO). BlockErrors pass through.
 * `context` prefixes the message, e.g. "Could not open 'x.img'".
 */
export function toBlockError(e: unknown, context?: string): BlockError {
  if (e instanceof BlockError) {
    return context ? new BlockError(e.code, `${context}: ${e.message}`, { cause: e }) : e;
  }
  const sysCode = (e as { code?: unknown } | null)?.code;
  const code: ErrnoCode = isErrnoCode(sysCode) ? sysCode : sysCode === 'EOPNOTSUPP' ? 'ENOTSUP' : 'EIO';
  const text = isErrnoCode(sysCode) || sysCode === 'EOPNOTSUPP' ? STRERROR[code] : String((e as Error)?.message ?? e);
  return new BlockError(code, context ? `${context}: ${text}` : text, { cause: e });
}
