/*
 * Reading the properties of a user-creatable object (tls-creds-*,
 * authz-*) from plain data, with the messages QEMU's QAPI input visitors
 * give: "Parameter 'x' is unexpected", "Parameter 'x' is missing",
 * "Parameter 'x' expects 'on' or 'off'", "Parameter 'x' does not accept
 * value 'y'", "Invalid parameter type for 'x', expected: string".
 *
 * Values come either from the command line (keyval: every value a string,
 * booleans spelled on/off/yes/no/true/false/y/n) or from JSON (real
 * booleans and strings); both are accepted. `path` names nested members
 * the way the source does: `rules.0.match` for keyval, `rules[0].match`
 * for JSON.
 */
import { BlockError } from '../block/errors.js';

/** The specification of one object, as `--object` or QMP object-add gives it. */
export interface ObjectSpec {
  qomType: string;
  id: string;
  props: Readonly<Record<string, unknown>>;
}

/** keyval spellings of booleans (QEMU's qapi_bool_parse). */
const TRUE_WORDS = ['on', 'yes', 'true', 'y'];
const FALSE_WORDS = ['off', 'no', 'false', 'n'];

export function propError(message: string): BlockError {
  return new BlockError('EINVAL', message);
}

/** A view of one object's (or one nested member's) properties. */
export class Props {
  constructor(
    private readonly values: Readonly<Record<string, unknown>>,
    private readonly prefix = '',
    private readonly jsonPaths = false,
  ) {}

  /** Fails on the first property not in `allowed` (in the order given). */
  only(allowed: readonly string[]): this {
    for (const key of Object.keys(this.values)) {
      if (!allowed.includes(key)) throw propError(`Parameter '${this.prefix}${key}' is unexpected`);
    }
    return this;
  }

  name(key: string): string {
    return this.prefix + key;
  }

  has(key: string): boolean {
    return this.values[key] !== undefined;
  }

  str(key: string): string | undefined {
    const v = this.values[key];
    if (v === undefined) return undefined;
    if (typeof v !== 'string') throw propError(`Invalid parameter type for '${this.name(key)}', expected: string`);
    return v;
  }

  requiredStr(key: string): string {
    const v = this.str(key);
    if (v === undefined) throw propError(`Parameter '${this.name(key)}' is missing`);
    return v;
  }

  bool(key: string, fallback: boolean): boolean {
    const v = this.values[key];
    if (v === undefined) return fallback;
    if (typeof v === 'boolean') return v;
    if (typeof v === 'string' && TRUE_WORDS.includes(v)) return true;
    if (typeof v === 'string' && FALSE_WORDS.includes(v)) return false;
    if (typeof v === 'string') throw propError(`Parameter '${this.name(key)}' expects 'on' or 'off'`);
    throw propError(`Invalid parameter type for '${this.name(key)}', expected: boolean`);
  }

  enumOf<T extends string>(key: string, values: readonly T[], fallback: T): T;
  enumOf<T extends string>(key: string, values: readonly T[]): T | undefined;
  enumOf<T extends string>(key: string, values: readonly T[], fallback?: T): T | undefined {
    const v = this.str(key);
    if (v === undefined) return fallback;
    if (!(values as readonly string[]).includes(v)) throw propError(`Parameter '${this.name(key)}' does not accept value '${v}'`);
    return v as T;
  }

  requiredEnum<T extends string>(key: string, values: readonly T[]): T {
    const v = this.enumOf(key, values);
    if (v === undefined) throw propError(`Parameter '${this.name(key)}' is missing`);
    return v;
  }

  /** A list member (a JSON array, or keyval's `key.0…` already made an array): one Props per element. */
  list(key: string): Props[] {
    const v = this.values[key];
    if (v === undefined) return [];
    if (!Array.isArray(v)) throw propError(`Invalid parameter type for '${this.name(key)}', expected: array`);
    return v.map((item, i) => {
      const path = this.jsonPaths ? `${this.name(key)}[${i}].` : `${this.name(key)}.${i}.`;
      if (item === null || typeof item !== 'object' || Array.isArray(item)) {
        throw propError(`Invalid parameter type for '${path.slice(0, -1)}', expected: object`);
      }
      return new Props(item as Record<string, unknown>, path, this.jsonPaths);
    });
  }
}
