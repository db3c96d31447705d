/*
 * QEMU's option strings: `key=value,key.sub=value` (util/keyval.c) and
 * `json:{...}` pseudo-filenames, turned into nested option objects.
 *
 * Syntax, as keyval_parse: pairs separated by `,`; a `,` inside a value is
 * written `,,`; a trailing `,` is ignored. A key is dot-separated fragments:
 * the first a QAPI name (`_`? letter, then letters, digits, `-`, `_`), the
 * others a QAPI name or a list index (decimal digits), each under 128
 * bytes; anything else is "Invalid parameter 'KEY'". Dotted keys nest
 * (`file.filename=x` -> { file: { filename: 'x' } }); a key given twice
 * keeps its last value; a key used both as a value and as an object is
 * "Parameters 'KEY.*' used inconsistently". An object whose keys are all
 * list indexes becomes an array, in index order (`01` is index 1); a gap is
 * "Parameter 'KEY.N' missing"; indexes mixed with names are inconsistent.
 * The root is never a list. Values stay strings: the zod schemas coerce them
 * ('on' -> true, '1M' -> 1048576), as QEMU's keyval input visitor does.
 *
 * A pair without `=` is the implied key's value when the caller names one
 * (qemu-img's --image-opts implies `file`) and it comes first; that value
 * cannot contain `,`. Otherwise it is "Expected '=' after parameter 'KEY'".
 * `help` requests are the caller's business and are not recognised here.
 *
 * json: filenames parse as JSON; their dotted keys are nested the same way
 * (QEMU flattens then crumples them), an object value merging with what
 * dotted keys already put there.
 */
import { BlockError } from './errors.js';
import { parseQemuJson } from './json-stream.js';

export type OptionTree = { [key: string]: OptionValue };
export type OptionValue = string | number | boolean | null | OptionTree | OptionValue[];

/** Longest key fragment keyval accepts (its key_in_cur buffer holds 128 bytes with the NUL). */
export const KEY_FRAGMENT_MAX_BYTES = 127;
/** Largest list index (key_to_index stops at INT_MAX). */
const INDEX_MAX = 2 ** 31 - 1;

const QAPI_NAME = /^_?[A-Za-z][A-Za-z0-9_-]*/;
const INDEX = /^[0-9]+/;

function invalid(message: string): BlockError {
  return new BlockError('EINVAL', message);
}

/** A list index fragment as its canonical decimal (`007` -> `7`), or null. */
function indexOf(fragment: string): string | null {
  if (!/^[0-9]+$/.test(fragment)) return null;
  const n = Number(fragment);
  return n <= INDEX_MAX ? String(n) : null;
}

/**
 * Checks a key's fragments (keyval_parse_one) and returns it with list
 * indexes in canonical form.
 */
function checkKey(key: string): string {
  const fragments: string[] = [];
  for (let s = 0; ; ) {
    const rest = key.slice(s);
    const digits = s > 0 ? INDEX.exec(rest)?.[0] : undefined;
    const index = digits === undefined ? null : indexOf(digits);
    const fragment = index !== null ? digits! : (QAPI_NAME.exec(rest)?.[0] ?? '');
    const len = fragment.length;
    if (len === 0 || (s + len < key.length && key[s + len] !== '.')) throw invalid(`Invalid parameter '${key}'`);
    if (len > KEY_FRAGMENT_MAX_BYTES) {
      throw invalid(`Parameter${s > 0 || len !== key.length ? ' fragment' : ''} '${fragment}' is too long`);
    }
    fragments.push(index ?? fragment);
    s += len;
    if (s === key.length) return fragments.join('.');
    s++;
  }
}

/** Splits `a=b,c=d,,e` into ordered [key, value] pairs (keys checked, indexes canonical). */
export function splitKeyval(text: string, impliedKey?: string): Array<[string, string]> {
  const pairs: Array<[string, string]> = [];
  let i = 0;
  while (i < text.length) {
    let len = 0;
    while (i + len < text.length && text[i + len] !== '=' && text[i + len] !== ',') len++;
    if (impliedKey !== undefined && pairs.length === 0 && len > 0 && text[i + len] !== '=') {
      pairs.push([impliedKey, text.slice(i, i + len)]);
      i += len + 1;
      continue;
    }
    const key = checkKey(text.slice(i, i + len));
    i += len;
    if (text[i] !== '=') throw invalid(`Expected '=' after parameter '${key}'`);
    i++;
    let value = '';
    while (i < text.length) {
      if (text[i] === ',') {
        i++;
        if (text[i] !== ',') break;
      }
      value += text[i++];
    }
    pairs.push([key, value]);
  }
  return pairs;
}

function isPlainObject(v: unknown): v is OptionTree {
  return typeof v === 'object' && v !== null && !Array.isArray(v);
}

function inconsistent(path: readonly string[]): BlockError {
  return invalid(`Parameters '${path.join('.')}.*' used inconsistently`);
}

/** Puts `value` at the dotted `path` under `root`, merging objects and replacing scalars. */
function put(root: OptionTree, path: readonly string[], value: OptionValue): void {
  let obj = root;
  for (const [i, part] of path.entries()) {
    const here = path.slice(0, i + 1);
    const existing = obj[part];
    if (i < path.length - 1) {
      if (existing === undefined) obj = obj[part] = {};
      else if (isPlainObject(existing)) obj = existing;
      else throw inconsistent(here);
      continue;
    }
    if (isPlainObject(value)) {
      if (existing !== undefined && !isPlainObject(existing)) throw inconsistent(here);
      const target = isPlainObject(existing) ? existing : (obj[part] = {});
      for (const [k, v] of Object.entries(value)) put(target, k.split('.'), v);
    } else {
      if (isPlainObject(existing)) throw inconsistent(here);
      obj[part] = value;
    }
  }
}

/** Nests dotted keys of a flat map (values kept as they are) and makes index-keyed objects lists. */
export function unflatten(flat: Iterable<[string, OptionValue]>): OptionTree {
  const root: OptionTree = {};
  for (const [dotted, value] of flat) put(root, dotted.split('.'), value);
  for (const [k, v] of Object.entries(root)) root[k] = listify(v, [k]);
  return root;
}

/** Objects keyed by list indexes become arrays, recursively (keyval_listify). */
function listify(v: OptionValue, path: readonly string[]): OptionValue {
  if (!isPlainObject(v)) return v;
  const keys = Object.keys(v);
  for (const k of keys) v[k] = listify(v[k]!, [...path, k]);
  const indexes = keys.map(indexOf);
  if (keys.length === 0 || indexes.every((n) => n === null)) return v;
  if (indexes.some((n) => n === null)) throw inconsistent(path);
  const list: OptionValue[] = [];
  for (const k of keys) list[Number(indexOf(k))] = v[k]!;
  for (let n = 0; n < list.length; n++) {
    if (!(n in list)) throw invalid(`Parameter '${[...path, n].join('.')}' missing`);
  }
  return list;
}

/** Parses `key=value,...` into a nested option tree. */
export function parseKeyval(text: string, impliedKey?: string): OptionTree {
  return unflatten(splitKeyval(text, impliedKey));
}

export const JSON_FILENAME_PREFIX = 'json:';

/** Parses a `json:{...}` pseudo-filename (dotted keys inside are nested too). */
export function parseJsonFilename(filename: string): OptionTree {
  return jsonObjectTree(filename.slice(JSON_FILENAME_PREFIX.length), 'Could not parse the JSON options: ');
}

/**
 * A JSON option argument (qemu-storage-daemon's `--blockdev {...}`, which
 * QEMU reads as JSON when it starts with `{`): QEMU's JSON errors as they
 * are, without the filename's prefix.
 */
export function parseJsonOption(text: string): OptionTree {
  return jsonObjectTree(text, '');
}

/** A JSON object as an option tree; parse errors get `errorPrefix`. */
function jsonObjectTree(text: string, errorPrefix: string): OptionTree {
  let parsed: unknown;
  try {
    parsed = parseQemuJson(text);
  } catch (e) {
    throw invalid(errorPrefix + (e as Error).message);
  }
  if (!isPlainObject(parsed)) throw invalid('Invalid JSON object given');
  return unflatten(Object.entries(parsed));
}
