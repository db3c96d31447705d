/*
 * Sizes as QEMU writes and reads them.
 *
 * parseSize follows qemu_strtosz (util/cutils.c): a decimal integer, an
 * optional fraction, an optional one-letter suffix B/K/M/G/T/P/E (any case,
 * powers of 1024), or a hex integer (`0x...`) with neither fraction nor
 * suffix. A fraction needs a suffix larger than bytes; the fractional part is
 * rounded half up. Negative numbers and trailing junk are invalid; results
 * above 2^64 - 1 are out of range. Exact arithmetic uses BigInt; callers get
 * a number when it fits in 2^53.
 *
 * sizeToStr follows size_to_str: the largest unit where the value is at
 * least 1, printed with three significant digits ("1 MiB", "1.5 GiB",
 * "4 KiB", "512 B").
 */

const SUFFIX_POWER: Record<string, number> = { B: 0, K: 1, M: 2, G: 3, T: 4, P: 5, E: 6 };
const UINT64_MAX = (1n << 64n) - 1n;

export type SizeParse = number | 'invalid' | 'range';

/** Parses a size string; `defaultSuffix` applies when none is given (qemu-img's -S uses B). */
export function parseSize(text: string, defaultSuffix: keyof typeof SUFFIX_POWER = 'B'): SizeParse {
  const big = parseSizeBig(text, defaultSuffix);
  if (typeof big === 'string') return big;
  return big <= BigInt(Number.MAX_SAFE_INTEGER) ? Number(big) : 'range';
}

/** As parseSize, with the exact value (up to 2^64 - 1). */
export function parseSizeBig(text: string, defaultSuffix: keyof typeof SUFFIX_POWER = 'B'): bigint | 'invalid' | 'range' {
  const s = text.replace(/^[\s]+/, '');
  const hex = /^0[xX]([0-9a-fA-F]+)$/.exec(s);
  if (hex) {
    const v = BigInt(`0x${hex[1]}`);
    return v > UINT64_MAX ? 'range' : v;
  }
  const m = /^(\d+)(?:\.(\d*))?([bBkKmMgGtTpPeE])?$/.exec(s);
  if (!m) return 'invalid';
  const power = SUFFIX_POWER[(m[3] ?? defaultSuffix).toUpperCase()]!;
  const mul = 1024n ** BigInt(power);
  const fraction = m[2] ?? '';
  if (m[2] !== undefined && mul === 1n) return 'invalid';
  let value = BigInt(m[1]!) * mul;
  if (fraction.length > 0 && /[1-9]/.test(fraction)) {
    const denom = 10n ** BigInt(fraction.length);
    const scaled = BigInt(fraction) * mul;
    value += (scaled * 2n + denom) / (denom * 2n);
  }
  return value > UINT64_MAX ? 'range' : value;
}

const UNIT_PREFIXES = ['', 'Ki', 'Mi', 'Gi', 'Ti', 'Pi', 'Ei'];

/**
 * Human size as QEMU's size_to_str prints it: the unit switches up once the
 * value reaches 1000 of the current unit, so 1000 KiB prints "0.977 MiB".
 */
export function sizeToStr(bytes: number): string {
  const exponent = bytes > 0 ? Math.floor(Math.log2(bytes / (1000 / 1024))) : 0;
  const i = Math.min(Math.max(Math.trunc(exponent / 10), 0), UNIT_PREFIXES.length - 1);
  return `${formatSignificant(BigInt(bytes), 1n << BigInt(i * 10), 3)} ${UNIT_PREFIXES[i]}B`;
}

/**
 * printf("%0.<digits>g") of num/den, exactly, with glibc's rounding (half to
 * even on exact ties: 1.125 -> "1.12").
 */
export function formatSignificant(num: bigint, den: bigint, digits: number): string {
  if (num === 0n) return '0';
  let exp10 = 0;
  while (num >= den * 10n ** BigInt(exp10 + 1)) exp10++;
  while (num * 10n ** BigInt(-exp10) < den) exp10--;
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
