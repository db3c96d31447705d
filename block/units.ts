/*
 * Sizes as QEMU writes and reads them.
 *
 * parseSize is QEMU 7.2's qemu_strtosz (util/cutils.c do_strtosz), step by
 * step, because qemu-img's accepted inputs and results are the yardstick:
 *   1. a decimal integer, after optional whitespace and `+` (a `-` anywhere
 *      in it is invalid; more than 64 bits is out of range);
 *   2. `0x`/`0X` after a zero integer: reparsed as hex; a `.` after it is
 *      invalid; a suffix after it is still accepted in 7.2 with the warning
 *      "Using a multiplier suffix on hex numbers is deprecated: TEXT";
 *   3. otherwise an optional fraction, parsed as a C double (strtod) and
 *      turned into a 64-bit binary fixed-point fraction with a C cast: a
 *      fraction with an exponent (`1.5e3k`) is invalid; one that rounds to
 *      1.0 wraps to 0, so `1.9999999999999999999k` is 1024, as in 7.2;
 *   4. an optional one-letter suffix B/K/M/G/T/P/E (any case, powers of
 *      1024), else `defaultSuffix`; a non-zero fraction with a multiplier of
 *      1 is invalid (`1.5`, `1.5b`) but a zero one is not (`1.0`, `0.0b`);
 *   5. value = integer * multiplier + fraction * multiplier, rounded half
 *      up; above 2^64 - 1 it is out of range;
 *   6. anything left over (a space, `B` after `K`) makes it invalid, even
 *      when the number was out of range.
 * The value is exact (BigInt); parseSize returns a number when it fits in
 * 2^53 and 'range' otherwise (qemu-img's own limit is INT64_MAX: callers
 * that need it use parseSizeBig).
 *
 * sizeToStr follows size_to_str: the largest unit where the value is at
 * least 1000/1024 of it, printed with printf's "%0.3g" ("1 MiB", "1.5 GiB",
 * "0.977 MiB", "1e+03 KiB").
 */

const SUFFIX_POWER: Record<string, number> = { B: 0, K: 1, M: 2, G: 3, T: 4, P: 5, E: 6 };
const UINT64_MAX = (1n << 64n) - 1n;
const TWO_POW_64 = 2 ** 64;

export type SizeParse = number | 'invalid' | 'range';
export type SizeSuffix = keyof typeof SUFFIX_POWER;

/**
 * Parses a size string; `defaultSuffix` applies when none is given (qemu-img
 * uses B). `onWarning` receives QEMU's deprecation warning for hex numbers
 * with a suffix.
 */
export function parseSize(text: string, defaultSuffix: SizeSuffix = 'B', onWarning?: (message: string) => void): SizeParse {
  const big = parseSizeBig(text, defaultSuffix, onWarning);
  if (typeof big === 'string') return big;
  return big <= BigInt(Number.MAX_SAFE_INTEGER) ? Number(big) : 'range';
}

/** C's isspace() in the C locale, which strtoull and strtod skip. */
const LEADING = /^[ \t\n\v\f\r]*/;

/** As parseSize, with the exact value (up to 2^64 - 1). */
export function parseSizeBig(
  text: string,
  defaultSuffix: SizeSuffix = 'B',
  onWarning?: (message: string) => void,
): bigint | 'invalid' | 'range' {
  const decimal = /^([+-]?)(\d+)/.exec(text.replace(LEADING, ''));
  if (!decimal) return 'invalid';
  let rest = text.slice(text.length - text.replace(LEADING, '').length + decimal[0].length);
  let value = BigInt(decimal[2]!);
  if (value > UINT64_MAX) return rest === '' ? 'range' : 'invalid';
  if (decimal[1] === '-') return 'invalid';
  let fraction = 0n;
  let hex = false;
  if (decimal[2] === '0' && /^[xX]/.test(rest)) {
    const digits = /^[xX]([0-9a-fA-F]+)/.exec(rest);
    if (!digits) return 'invalid';
    value = BigInt(`0x${digits[1]}`);
    rest = rest.slice(digits[0].length);
    if (value > UINT64_MAX) return rest === '' ? 'range' : 'invalid';
    if (rest.startsWith('.')) return 'invalid';
    hex = true;
  } else if (rest.startsWith('.')) {
    const f = /^\.(\d+)([eE][+-]?\d+)?/.exec(rest);
    if (f?.[2] !== undefined) return 'invalid';
    rest = rest.slice(f ? f[0].length : 1);
    fraction = f ? fixedPointFraction(Number(`0.${f[1]}`)) : 0n;
  }
  let power = SUFFIX_POWER[(rest[0] ?? '').toUpperCase()];
  if (power !== undefined) {
    if (hex) onWarning?.(`Using a multiplier suffix on hex numbers is deprecated: ${text}`);
    rest = rest.slice(1);
  } else {
    power = SUFFIX_POWER[defaultSuffix]!;
  }
  if (rest !== '') return 'invalid';
  if (power === 0) return fraction === 0n ? value : 'invalid';
  const mul = 1n << BigInt(10 * power);
  const scaledFraction = fraction * mul;
  value = value * mul + (scaledFraction >> 64n) + ((scaledFraction >> 63n) & 1n);
  return value > UINT64_MAX ? 'range' : value;
}

/** `(uint64_t)(fraction * 0x1p64)` as x86-64 computes it: 1.0 wraps to 0. */
function fixedPointFraction(fraction: number): bigint {
  const scaled = fraction * TWO_POW_64;
  return scaled >= TWO_POW_64 ? 0n : BigInt(Math.floor(scaled));
}

const UNIT_PREFIXES = ['', 'Ki', 'Mi', 'Gi', 'Ti', 'Pi', 'Ei'];

/**
 * Human size as QEMU's size_to_str prints it: the unit switches up once the
 * value reaches 1000 of the current unit, so 1000 KiB prints "0.977 MiB".
 */
export function sizeToStr(bytes: number): string {
  const exponent = bytes > 0 ? floorLog2(bytes / (1000 / 1024)) : 0;
  const i = Math.min(Math.max(Math.trunc(exponent / 10), 0), UNIT_PREFIXES.length - 1);
  return `${formatSignificant(BigInt(bytes), 1n << BigInt(i * 10), 3)} ${UNIT_PREFIXES[i]}B`;
}

/** floor(log2(x)) for x > 0, exactly (frexp's exponent - 1; Math.log2 may round up just below a power of two). */
function floorLog2(x: number): number {
  let e = Math.floor(Math.log2(x));
  if (2 ** e > x) e--;
  else if (2 ** (e + 1) <= x) e++;
  return e;
}

/**
 * printf("%0.<digits>g") of num/den, exactly, with glibc's rounding (half to
 * even on exact ties: 1.125 -> "1.12").
 */
export function formatSignificant(num: bigint, den: bigint, digits: number): string {
  if (num === 0n) return '0';
  let exp10 = 0;
  while (num >= den * 10n ** BigInt(exp10 + 1)) exp10++;
  while (exp10 <= 0 && num * 10n ** BigInt(-exp10) < den) exp10--;
  let n = roundHalfEven(num, den, digits - 1 - exp10);
  if (n === 10n ** BigInt(digits)) {
    n /= 10n;
    exp10++;
  }
  const text = n.toString();
  if (exp10 < -4 || exp10 >= digits) {
    const mantissa = `${text[0]}.${text.slice(1)}`.replace(/\.?0+$/, '');
    const e = Math.abs(exp10).toString().padStart(2, '0');
    return `${mantissa}e${exp10 < 0 ? '-' : '+'}${e}`;
  }
  const pointAt = exp10 + 1;
  const padded = pointAt <= 0 ? '0'.repeat(1 - pointAt) + text : text;
  const intLen = Math.max(pointAt, 1);
  const fixed = `${padded.slice(0, intLen)}.${padded.slice(intLen)}`;
  return fixed.replace(/\.?0+$/, '').replace(/\.$/, '');
}

/** round(num/den * 10^shift) with ties to even. */
function roundHalfEven(num: bigint, den: bigint, shift: number): bigint {
  const [a, b] = shift >= 0 ? [num * 10n ** BigInt(shift), den] : [num, den * 10n ** BigInt(-shift)];
  const q = a / b;
  const twiceRest = (a % b) * 2n;
  if (twiceRest > b || (twiceRest === b && q % 2n === 1n)) return q + 1n;
  return q;
}
