/*
 * QEMU's JSON writer (qobject/json-writer.c, as qobject_to_json and
 * qobject_to_json_pretty use it in 7.2), so `--output=json` is byte for
 * byte what qemu-img prints.
 *
 * Layout. Pretty: every member and element on its own line, indented four
 * spaces per level, `": "` between key and value, `,` at line ends; an
 * empty container is `{` newline `}` (at its own indent). Compact (used for
 * `json:{...}` filenames): `{"a": 1, "b": 2}` — a space after `,` and `:`.
 *
 * Key order. A QDict is a hash table of QDICT_BUCKET_MAX buckets and the
 * writer walks the buckets in order, so members come out in tdb_hash order,
 * not insertion order: that is why qemu-img prints `virtual-size, filename,
 * cluster-size, format, actual-size, format-specific, dirty-flag`. Within a
 * bucket the newest member comes first (QLIST_INSERT_HEAD). `qdictEntries`
 * gives that order for any object, taking the object's own key order as the
 * insertion order (callers insert in QAPI schema order, as QEMU's output
 * visitor does), so nested objects (format-specific data) come out right too.
 *
 * Strings: `"` `\` and \b \f \n \r \t escaped; other code points below 0x20
 * or from 0x7F up as \uXXXX with UPPERCASE hex; beyond the BMP as a
 * surrogate pair; a lone surrogate (invalid UTF-8 in QEMU) as \uFFFD.
 * Numbers: integers (number or bigint) in decimal; non-integers as "%.17g".
 * Members whose value is `undefined` are absent (QAPI's has_x = false).
 */
import { formatSignificant } from './units.js';
import { invariant } from './errors.js';

export type QValue = null | boolean | number | bigint | string | readonly QValue[] | QDictValue;
export interface QDictValue {
  readonly [key: string]: QValue | undefined;
}

/** Number of hash buckets of a QDict (qobject/qdict.c). */
const QDICT_BUCKET_MAX = 512;
/** printf precision QEMU uses for doubles. */
const DOUBLE_DIGITS = 17;
const INDENT = '    ';

/** QEMU's tdb_hash of a key (bytes of its UTF-8), as an unsigned 32-bit value. */
function tdbHash(key: string): number {
  const bytes = Buffer.from(key, 'utf8');
  let value = Math.imul(0x238f13af, bytes.length) >>> 0;
  for (let i = 0; i < bytes.length; i++) {
    value = (value + ((bytes[i]! << ((i * 5) % 24)) >>> 0)) >>> 0;
  }
  return (Math.imul(1103515243, value) + 12345) >>> 0;
}

/** The members of `obj` in the order a QDict built from it iterates them. */
export function qdictEntries(obj: QDictValue): Array<[string, QValue]> {
  const present = Object.entries(obj).filter((e): e is [string, QValue] => e[1] !== undefined);
  const slot = new Map(present.map(([k], i) => [k, { bucket: tdbHash(k) % QDICT_BUCKET_MAX, inserted: i }]));
  return present.sort(([a], [b]) => {
    const sa = slot.get(a)!;
    const sb = slot.get(b)!;
    return sa.bucket - sb.bucket || sb.inserted - sa.inserted;
  });
}

/** A JSON string literal as QEMU's quoted_str writes it. */
export function quoteString(text: string): string {
  let out = '"';
  for (const ch of text) {
    out += escapeCodePoint(ch.codePointAt(0)!);
  }
  return `${out}"`;
}

const SHORT_ESCAPES: Record<number, string> = {
  0x22: '\\"',
  0x5c: '\\\\',
  0x08: '\\b',
  0x0c: '\\f',
  0x0a: '\\n',
  0x0d: '\\r',
  0x09: '\\t',
};

function hex4(n: number): string {
  return `\\u${n.toString(16).toUpperCase().padStart(4, '0')}`;
}

function escapeCodePoint(cp: number): string {
  const short = SHORT_ESCAPES[cp];
  if (short !== undefined) return short;
  if (cp >= 0xd800 && cp <= 0xdfff) return hex4(0xfffd);
  if (cp > 0xffff) return hex4(0xd800 + ((cp - 0x10000) >> 10)) + hex4(0xdc00 + ((cp - 0x10000) & 0x3ff));
  if (cp < 0x20 || cp >= 0x7f) return hex4(cp);
  return String.fromCodePoint(cp);
}

/** A number as QEMU prints a QNum: integers exactly, doubles with "%.17g". */
export function formatNumber(n: number | bigint): string {
  if (typeof n === 'bigint') return n.toString();
  if (Number.isInteger(n)) return BigInt(n).toString();
  invariant(Number.isFinite(n), 'JSON cannot carry inf or nan');
  const sign = n < 0 ? '-' : '';
  const [num, den] = exactFraction(Math.abs(n));
  return sign + formatSignificant(num, den, DOUBLE_DIGITS);
}

/** A finite positive double as an exact fraction num/den with den a power of two. */
function exactFraction(x: number): [bigint, bigint] {
  let den = 1n;
  while (!Number.isInteger(x)) {
    x *= 2;
    den *= 2n;
  }
  return [BigInt(x), den];
}

/** qobject_to_json_pretty: the pretty form, without a trailing newline. */
export function toJsonPretty(value: QValue): string {
  return write(value, 0, true);
}

/** qobject_to_json: the one-line form (as in `json:{...}` filenames). */
export function toJsonCompact(value: QValue): string {
  return write(value, 0, false);
}

function write(value: QValue, depth: number, pretty: boolean): string {
  if (value === null) return 'null';
  if (typeof value === 'boolean') return value ? 'true' : 'false';
  if (typeof value === 'number' || typeof value === 'bigint') return formatNumber(value);
  if (typeof value === 'string') return quoteString(value);
  if (isList(value)) return container('[', ']', value.map((v) => write(v, depth + 1, pretty)), depth, pretty);
  const members = qdictEntries(value).map(([k, v]) => `${quoteString(k)}: ${write(v, depth + 1, pretty)}`);
  return container('{', '}', members, depth, pretty);
}

function isList(value: QValue): value is readonly QValue[] {
  return Array.isArray(value);
}

function container(open: string, close: string, items: string[], depth: number, pretty: boolean): string {
  if (!pretty) return `${open}${items.join(', ')}${close}`;
  const inner = INDENT.repeat(depth + 1);
  const body = items.map((item) => `\n${inner}${item}`).join(',');
  return `${open}${body}\n${INDENT.repeat(depth)}${close}`;
}
