/*
 * QEMU's option strings: `key=value,key.sub=value` (keyval / QemuOpts) and
 * `json:{...}` pseudo-filenames, turned into nested option objects.
 *
 * Syntax: pairs separated by `,`; a `,` inside a value is written `,,`.
 * Dotted keys nest (`file.filename=x` -> { file: { filename: 'x' } }); an
 * object whose keys are exactly 0..n-1 becomes an array. Values stay strings:
 * the zod schemas coerce them ('on' -> true, '1M' -> 1048576), as QEMU's
 * keyval input visitor does. A pair without `=` is the implied key's value
 * when the caller names one (qemu-img's --image-opts implies `file`), else an
 * error, as is a key given twice or a key that is both a value and an object.
 */
import { BlockError } from './errors.js';

export type OptionTree = { [key: string]: OptionValue };
export type OptionValue = string | number | boolean | null | OptionTree | OptionValue[];

/** Splits `a=b,c=d,,e` into ordered [key, value] pairs. */
export function splitKeyval(text: string, impliedKey?: string): Array<[string, string]> {
  const pairs: Array<[string, string]> = [];
  let i = 0;
  while (i < text.length) {
    let key = '';
    while (i < text.length && text[i] !== '=' && text[i] !== ',') key += text[i++];
    if (text[i] !== '=') {
      if (impliedKey === undefined || pairs.length > 0 || key === '') {
        throw new BlockError('EINVAL', `Expected '=' after parameter '${key}'`);
      }
      pairs.push([impliedKey, key]);
      i++;
      continue;
    }
    i++;
    let value = '';
    while (i < text.length) {
      if (text[i] === ',') {
        if (text[i + 1] !== ',') break;
        i++;
      }
      value += text[i++];
    }
    i++;
    if (key === '') throw new BlockError('EINVAL', `Invalid parameter ''`);
    pairs.push([key, value]);
  }
  return pairs;
}

/** Nests dotted keys of a flat map; values are kept as they are. */
export function unflatten(flat: Iterable<[string, OptionValue]>): OptionTree {
  const root: OptionTree = {};
  for (const [dotted, value] of flat) {
    const parts = dotted.split('.');
    let obj: OptionTree = root;
    for (const [i, part] of parts.entries()) {
      const last = i === parts.length - 1;
      const existing = obj[part];
      if (last) {
        if (existing !== undefined) throw new BlockError('EINVAL', `Parameter '${dotted}' is set twice`);
        obj[part] = isPlainObject(value) ? unflatten(Object.entries(value)) : value;
      } else if (existing === undefined) {
        obj = obj[part] = {};
      } else if (isPlainObject(existing)) {
        obj = existing;
      } else {
        throw new BlockError('EINVAL', `Parameter '${parts.slice(0, i + 1).join('.')}' used inconsistently`);
      }
    }
  }
  return listify(root) as OptionTree;
}

function isPlainObject(v: unknown): v is OptionTree {
  return typeof v === 'object' && v !== null && !Array.isArray(v);
}

/** Objects keyed 0..n-1 become arrays, recursively. */
function listify(v: OptionValue): OptionValue {
  if (!isPlainObject(v)) return v;
  const keys = Object.keys(v);
  for (const k of keys) v[k] = listify(v[k]!);
  const isList = keys.length > 0 && keys.every((k, i) => k === String(i));
  return isList ? keys.map((k) => v[k]!) : v;
}

/** Parses `key=value,...` into a nested option tree. */
export function parseKeyval(text: string, impliedKey?: string): OptionTree {
  return unflatten(splitKeyval(text, impliedKey));
}

export const JSON_FILENAME_PREFIX = 'json:';

/** Parses a `json:{...}` pseudo-filename (dotted keys inside are nested too). */
export function parseJsonFilename(filename: string): OptionTree {
  let parsed: unknown;
  try {
    parsed = JSON.parse(filename.slice(JSON_FILENAME_PREFIX.length));
  } catch (e) {
    throw new BlockError('EINVAL', `Could not parse the JSON options: ${(e as Error).message}`);
  }
  if (!isPlainObject(parsed)) throw new BlockError('EINVAL', 'Invalid JSON object given');
  return unflatten(Object.entries(parsed));
}
