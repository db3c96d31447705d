/*
 * The properties of a `throttle-group` object (QEMU's ThrottleGroupProperties):
 * `limits` (a ThrottleLimits object: `limits.bps-total=N` on the command
 * line) and the legacy flat `x-bps-total`, `x-iops-read-max-length`, …,
 * `x-iops-size`.
 *
 * QEMU checks them in three passes, and so do we, to give the same first
 * error:
 *   1. the QAPI visitor, in schema order (`limits` and its members first,
 *      then the x- properties from iops-total to iops-size): each value
 *      must be an integer ("Parameter 'x' expects integer" for command-line
 *      strings, "Invalid parameter type for 'x', expected: integer" for
 *      JSON), then unknown keys ("Parameter 'x' is unexpected");
 *   2. the property setters, in the iteration order of QEMU's QDict (a
 *      hash of the key; see qdictOrder): an x- value must not be negative,
 *      a burst length must fit 32 bits (QEMU's text lacks a space there:
 *      "…must be in therange…"); setting `limits` merges it into what the
 *      x- properties set so far and validates the result;
 *   3. completion: the whole configuration is validated (throttle_is_valid).
 */
import { BlockError } from './errors.js';
import { BURST_LENGTH_MAX, LIMIT_KEYS, emptyThrottleConfig, invalidThrottleConfig, setLimit, type LimitKey, type ThrottleConfig } from './throttle.js';

/** Prefix of the flat legacy properties (THROTTLE_OPT_PREFIX in throttle-groups.c). */
const LEGACY_PREFIX = 'x-';
/** Buckets of QEMU's QDict hash table (QDICT_BUCKET_MAX). */
const QDICT_BUCKETS = 512;
/** keyval integers: decimal, 0x hex or 0 octal, as qemu_strtoi64 with base 0. */
const KEYVAL_INT = /^[+-]?(0x[0-9a-f]+|0[0-7]*|[1-9][0-9]*)$/i;

function invalid(message: string): BlockError {
  return new BlockError('EINVAL', message);
}

/** An int64 property value from JSON (number) or the command line (string). */
function intValue(value: unknown, label: string): number {
  if (typeof value === 'number' && Number.isInteger(value)) return value;
  if (typeof value === 'string') {
    if (!KEYVAL_INT.test(value)) throw invalid(`Parameter '${label}' expects integer`);
    const negative = value.startsWith('-');
    const digits = value.replace(/^[+-]/, '');
    const magnitude = /^0x/i.test(digits) ? parseInt(digits, 16) : digits.length > 1 && digits.startsWith('0') ? parseInt(digits, 8) : Number(digits);
    return negative ? -magnitude : magnitude;
  }
  throw invalid(`Invalid parameter type for '${label}', expected: integer`);
}

/** Pass 1 for `limits`: members in schema order, then unknown members. */
function visitLimits(value: unknown): Map<LimitKey, number> {
  if (typeof value !== 'object' || value === null || Array.isArray(value)) {
    throw invalid("Invalid parameter type for 'limits', expected: object");
  }
  const obj = value as Record<string, unknown>;
  const out = new Map<LimitKey, number>();
  for (const key of LIMIT_KEYS) {
    if (obj[key.name] !== undefined) out.set(key, intValue(obj[key.name], `limits.${key.name}`));
  }
  const unknown = Object.keys(obj).find((k) => !LIMIT_KEYS.some((key) => key.name === k));
  if (unknown !== undefined) throw invalid(`Parameter 'limits.${unknown}' is unexpected`);
  return out;
}

/** Pass 1: the visitor. Returns the values by property name, in schema order. */
function visitProps(props: Record<string, unknown>): Map<string, number | Map<LimitKey, number>> {
  const out = new Map<string, number | Map<LimitKey, number>>();
  if (props.limits !== undefined) out.set('limits', visitLimits(props.limits));
  for (const key of LIMIT_KEYS) {
    const name = LEGACY_PREFIX + key.name;
    if (props[name] !== undefined) out.set(name, intValue(props[name], name));
  }
  const unknown = Object.keys(props).find((k) => !out.has(k) && props[k] !== undefined);
  if (unknown !== undefined) throw invalid(`Parameter '${unknown}' is unexpected`);
  return out;
}

/** QEMU's tdb_hash of a QDict key, reduced to its bucket. */
function qdictBucket(key: string): number {
  const bytes = Buffer.from(key, 'utf8');
  let value = Math.imul(0x238f13af, bytes.length) >>> 0;
  for (let i = 0; i < bytes.length; i++) value = (value + (bytes[i]! << ((i * 5) % 24))) >>> 0;
  return ((Math.imul(1103515243, value) + 12345) >>> 0) % QDICT_BUCKETS;
}

/**
 * The order QEMU iterates a QDict whose keys were inserted in `keys` order:
 * by hash bucket, and within a bucket the latest insertion first.
 */
export function qdictOrder(keys: readonly string[]): string[] {
  const indexed = keys.map((k, i) => ({ k, i, b: qdictBucket(k) }));
  indexed.sort((x, y) => x.b - y.b || y.i - x.i);
  return indexed.map((e) => e.k);
}

/** Pass 2 for one x- property (throttle_group_set). */
function setLegacy(cfg: ThrottleConfig, name: string, value: number): void {
  if (value < 0) throw invalid('Property values cannot be negative');
  const key = LIMIT_KEYS.find((k) => LEGACY_PREFIX + k.name === name)!;
  if (setLimit(cfg, key, value) !== null) throw invalid(`${name} value must be in therange [0, ${BURST_LENGTH_MAX}]`);
}

/** Pass 2 for `limits` (throttle_group_set_limits). */
function setLimits(cfg: ThrottleConfig, limits: Map<LimitKey, number>): void {
  for (const [key, value] of limits) {
    const reason = setLimit(cfg, key, value);
    if (reason) throw invalid(reason);
  }
  const reason = invalidThrottleConfig(cfg);
  if (reason) throw invalid(reason);
}

/**
 * The configuration a `throttle-group` object's properties describe, or
 * EINVAL with QEMU's message (see the note at the top).
 */
export function throttleConfigFromProps(props: Readonly<Record<string, unknown>>): ThrottleConfig {
  const values = visitProps(props as Record<string, unknown>);
  const cfg = emptyThrottleConfig();
  for (const name of qdictOrder([...values.keys()])) {
    const value = values.get(name)!;
    if (typeof value === 'number') setLegacy(cfg, name, value);
    else setLimits(cfg, value);
  }
  const reason = invalidThrottleConfig(cfg);
  if (reason) throw invalid(reason);
  return cfg;
}
