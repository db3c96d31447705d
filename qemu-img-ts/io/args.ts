/*
 * qemu-io's parsing of command arguments: sizes and offsets (`cvtnum`),
 * pattern bytes and plain integers (`strtol` with base 0).
 *
 * cvtnum is qemu_strtosz (block/units.ts parseSizeBig, including 7.2's
 * accepted-with-a-warning `0x10k`) limited to INT64_MAX: anything above is
 * "too large". Values come back as JS numbers: exact up to 2^53, which
 * covers every offset a node can have; larger ones only ever reach "beyond
 * the end" checks and cvtstr, which take doubles in QEMU too.
 *
 * Error texts are qemu-io's (print_cvtnum_err), printed on stdout.
 */
import { parseSizeBig } from '../../block/units.js';

const INT64_MAX = (1n << 63n) - 1n;
/** glibc's LONG_MAX, where strtol saturates. */
const LONG_MAX = 2 ** 63 - 1;

export type CvtnumResult =
  | { ok: true; value: number; /** Text of a deprecation warning to print, if any. */ warning?: string }
  | { ok: false; errno: 'EINVAL' | 'ERANGE' };

/** qemu-io's cvtnum(): a byte count or offset, 0..INT64_MAX. */
export function cvtnum(text: string): CvtnumResult {
  let warning: string | undefined;
  const parsed = parseSizeBig(text, 'B', (message) => (warning = message));
  if (parsed === 'invalid') return { ok: false, errno: 'EINVAL' };
  if (parsed === 'range' || parsed > INT64_MAX) return { ok: false, errno: 'ERANGE' };
  return warning === undefined ? { ok: true, value: Number(parsed) } : { ok: true, value: Number(parsed), warning };
}

/** print_cvtnum_err's text for a failed cvtnum. */
export function cvtnumError(errno: 'EINVAL' | 'ERANGE', text: string): string {
  return errno === 'EINVAL'
    ? `Parsing error: non-numeric argument, or extraneous/unrecognized suffix -- ${text}`
    : `Parsing error: argument too large -- ${text}`;
}

/**
 * strtol(text, &end, 0) that must consume everything: decimal, 0x hex or
 * 0 octal, optional sign and leading white space. Null when characters are
 * left over. Saturates at LONG_MAX like glibc (callers only need "too big").
 */
export function strtolWhole(text: string): number | null {
  if (text === '') return 0;
  const m = /^\s*([+-]?)(0[xX][0-9a-fA-F]+|0[0-7]*|[1-9][0-9]*)$/.exec(text);
  if (!m) return null;
  const digits = m[2]!;
  const radix = /^0[xX]/.test(digits) ? 16 : digits.length > 1 && digits.startsWith('0') ? 8 : 10;
  const magnitude = Math.min(parseInt(radix === 16 ? digits.slice(2) : digits, radix), LONG_MAX);
  return m[1] === '-' && magnitude !== 0 ? -magnitude : magnitude;
}

/** The largest pattern byte (UCHAR_MAX). */
const PATTERN_MAX = 0xff;

/** parse_pattern(): a byte 0..255 in strtol syntax, or null. */
export function parsePattern(text: string): number | null {
  const v = strtolWhole(text);
  return v === null || v < 0 || v > PATTERN_MAX ? null : v;
}
