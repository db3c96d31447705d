/*
 * blockdev-add style options: the zod schema of the keys every node takes
 * (QEMU's BlockdevOptionsBase) and value helpers that accept both typed JSON
 * and the strings of `key=value` syntax, as QEMU's input visitors do.
 *
 * Drivers declare their own keys as a zod object; `parseBaseOptions`
 * checks the common keys and returns the rest, which the graph validates
 * strictly against the driver's schema (an unknown key is refused with
 * QEMU's message). Messages follow QEMU (QemuOpts' wording for numbers and
 * sizes):
 *   Parameter 'read-only' expects 'on' or 'off'
 *   Parameter 'latency-ns' expects a number
 *   Value '16E' is out of range for parameter 'size'
 *   Block format 'raw' does not support the option 'foo'
 */
import { z } from 'zod';
import { BlockError } from './errors.js';
import type { OptionTree, OptionValue } from './keyval.js';
import { parseSize } from './units.js';

/**
 * The JSON type QAPI gives a value these helpers accept as text too: QMP
 * and JSON command-line options are typed, so a string where a boolean or
 * an integer belongs is refused there (see qapiJsonType).
 */
export type QapiJsonType = 'boolean' | 'integer';
const jsonTypes = new WeakMap<z.ZodType, QapiJsonType>();

function typedAs<S extends z.ZodType>(schema: S, type: QapiJsonType): S {
  jsonTypes.set(schema, type);
  return schema;
}

/** The QAPI JSON type of a driver option's schema (optional, default and transform wrappers looked through), or null. */
export function qapiJsonType(schema: z.ZodType | undefined): QapiJsonType | null {
  let s: z.ZodType | undefined = schema;
  for (;;) {
    if (s instanceof z.ZodOptional || s instanceof z.ZodDefault) s = s.unwrap() as z.ZodType;
    else if (s instanceof z.ZodPipe) s = s.in as z.ZodType;
    else break;
  }
  return (s && jsonTypes.get(s)) ?? null;
}

const BOOL_WORDS: Record<string, boolean> = {
  on: true, yes: true, true: true, y: true,
  off: false, no: false, false: false, n: false,
};

/** A boolean, or 'on'/'off' (also yes/no, true/false, y/n: qapi_bool_parse). */
export function zBool(key: string) {
  return typedAs(z.union([z.boolean(), z.string()]), 'boolean').transform((v, ctx) => {
    if (typeof v === 'boolean') return v;
    const b = BOOL_WORDS[v];
    if (b === undefined) {
      ctx.addIssue({ code: 'custom', message: `Parameter '${key}' expects 'on' or 'off'` });
      return z.NEVER;
    }
    return b;
  });
}

/**
 * A string as QemuOpts reads a number (qemu_strtou64 with base 0): leading
 * whitespace, an optional `+` (or, when `negative`, `-`: strtoull takes
 * it), then hex (`0x`), octal (leading `0`) or decimal digits, nothing
 * after. Returns null when it is not a number.
 */
function parseNumber(text: string, negative = false): bigint | null {
  const m = /^[ \t\n\v\f\r]*([+-]?)(?:0[xX]([0-9a-fA-F]+)|(0[0-7]*)|([1-9][0-9]*))$/.exec(text);
  if (!m || (m[1] === '-' && !negative)) return null;
  const sign = m[1] === '-' ? -1n : 1n;
  if (m[2] !== undefined) return sign * BigInt(`0x${m[2]}`);
  if (m[3] !== undefined) return sign * BigInt(`0o${m[3].slice(1) || '0'}`);
  return sign * BigInt(m[4]!);
}

/** Whether `text` is an integer as qemu_strtoi64 reads it with base 0 (QAPI's keyval input: --blockdev a=b). */
export function isKeyvalInteger(text: string): boolean {
  return parseNumber(text, true) !== null;
}

/**
 * A non-negative integer, or its string as QemuOpts reads numbers (hex,
 * octal, decimal). Messages: "Parameter 'KEY' expects a number" for
 * anything else, "Value 'V' is too large for parameter 'KEY'" beyond
 * 2^64 - 1, and a range message for values outside [min, max]. With
 * `negative`, "-N" is a number too (QemuOpts wraps it to 2^64 - N; it is
 * kept negative here) and `min` defaults to -(2^53 - 1).
 */
export function zInt(key: string, opts: { min?: number; max?: number; negative?: boolean } = {}) {
  const min = opts.min ?? (opts.negative ? -Number.MAX_SAFE_INTEGER : 0);
  const max = opts.max ?? Number.MAX_SAFE_INTEGER;
  return typedAs(z.union([z.number(), z.string()]), 'integer').transform((v, ctx) => {
    const fail = (message: string) => {
      ctx.addIssue({ code: 'custom', message });
      return z.NEVER;
    };
    const n = typeof v === 'number' ? v : parseNumber(v, opts.negative);
    if (n === null || (typeof n === 'number' && !Number.isInteger(n))) return fail(`Parameter '${key}' expects a number`);
    if (typeof n === 'bigint' && (n >= 1n << 64n || n <= -(1n << 64n))) return fail(`Value '${v}' is too large for parameter '${key}'`);
    if (n < min || n > max) return fail(`Parameter '${key}' expects an integer between ${min} and ${max}`);
    return Number(n);
  });
}

/**
 * A size in bytes: an integer, or a string with an optional k/M/G/T/P/E
 * suffix (qemu_strtosz), with QemuOpts' messages; sizes past 2^53 - 1,
 * which a JS number cannot hold exactly, are out of range.
 */
export function zSize(key: string) {
  return typedAs(z.union([z.number(), z.string()]), 'integer').transform((v, ctx) => {
    const n = typeof v === 'number' ? v : parseSize(v);
    if (n === 'range' || (typeof n === 'number' && n > Number.MAX_SAFE_INTEGER)) {
      ctx.addIssue({ code: 'custom', message: `Value '${v}' is out of range for parameter '${key}'` });
      return z.NEVER;
    }
    if (typeof n !== 'number' || !Number.isSafeInteger(n) || n < 0) {
      ctx.addIssue({
        code: 'custom',
        message: `Parameter '${key}' expects a non-negative number below 2^64\nOptional suffix k, M, G, T, P or E means kilo-, mega-, giga-, tera-, peta-\nand exabytes, respectively.`,
      });
      return z.NEVER;
    }
    return n;
  });
}

/** One of a fixed set of words. */
export function zEnum<const T extends readonly [string, ...string[]]>(key: string, values: T) {
  return z.string().transform((v, ctx) => {
    if (!(values as readonly string[]).includes(v)) {
      ctx.addIssue({ code: 'custom', message: `Parameter '${key}' does not accept value '${v}'` });
      return z.NEVER;
    }
    return v as T[number];
  });
}

/** A reference to a child: a node name, or the child's options inline. */
export const zBlockdevRef = z.union([z.string(), z.record(z.string(), z.unknown())]);
export type BlockdevRef = string | OptionTree;

/**
 * Node names as QEMU accepts them (bdrv_assign_node_name): well-formed
 * (id_wellformed: a letter, then letters, digits, `-`, `.`, `_`) is checked
 * first, then the length (under 32 bytes).
 */
export const NODE_NAME_MAX_BYTES = 31;
export function invalidNodeName(name: string): string | null {
  if (!/^[A-Za-z][A-Za-z0-9._-]*$/.test(name)) return `Invalid node-name: '${name}'`;
  if (name.length > NODE_NAME_MAX_BYTES) return `Node name too long`;
  return null;
}

/** The keys every node takes (BlockdevOptionsBase). */
export const baseOptionsSchema = z.object({
  driver: z.string({ error: (issue) => (issue.input === undefined ? "Parameter 'driver' is required" : undefined) }),
  'node-name': z.string().optional(),
  discard: zEnum('discard', ['ignore', 'off', 'unmap', 'on'] as const).optional(),
  cache: z
    .object({ direct: zBool('cache.direct').optional(), 'no-flush': zBool('cache.no-flush').optional() })
    .strict()
    .optional(),
  'read-only': zBool('read-only').optional(),
  'auto-read-only': zBool('auto-read-only').optional(),
  'force-share': zBool('force-share').optional(),
  'detect-zeroes': zEnum('detect-zeroes', ['off', 'on', 'unmap'] as const).optional(),
});
export type BaseOptions = z.output<typeof baseOptionsSchema>;

const BASE_KEYS = new Set(Object.keys(baseOptionsSchema.shape));

/** First zod issue as QEMU-style text. */
function issueMessage(error: z.ZodError, describeUnknown: (key: string) => string): string {
  const issue = error.issues[0]!;
  if (issue.code === 'unrecognized_keys') {
    const prefix = issue.path.length ? `${issue.path.join('.')}.` : '';
    return describeUnknown(prefix + issue.keys[0]);
  }
  // A schema's own message (given with `error:`) wins over the generic texts below.
  if (issue.code === 'custom' || !issue.message.startsWith('Invalid input')) return issue.message;
  const key = issue.path.join('.');
  if (issue.code === 'invalid_type' && issue.input === undefined) return `Parameter '${key}' is required`;
  return `Invalid parameter type for '${key}', expected: ${issue.code === 'invalid_type' ? issue.expected : 'valid value'}`;
}

/** Validates `options` against `schema`, throwing a one-line BlockError (EINVAL). */
export function parseWith<S extends z.ZodType>(
  schema: S,
  options: unknown,
  describeUnknown: (key: string) => string = (k) => `Invalid parameter '${k}'`,
): z.output<S> {
  // reportInput: issues carry the input, so a missing key ("is required")
  // can be told from a key of the wrong type ("Invalid parameter type").
  const r = schema.safeParse(options, { reportInput: true });
  if (!r.success) throw new BlockError('EINVAL', issueMessage(r.error, describeUnknown));
  return r.data;
}

export interface ParsedNodeOptions {
  base: BaseOptions;
  /** The driver's keys (everything but the common ones), not yet validated. */
  rest: Record<string, OptionValue | unknown>;
}

/** Splits the common keys from the driver's and validates the common ones. */
export function parseBaseOptions(
  options: Record<string, unknown>,
  describeUnknown?: (key: string) => string,
): ParsedNodeOptions {
  const baseIn: Record<string, unknown> = {};
  const rest: Record<string, unknown> = {};
  for (const [k, v] of Object.entries(options)) (BASE_KEYS.has(k) ? baseIn : rest)[k] = v;
  const base = parseWith(baseOptionsSchema, baseIn, describeUnknown);
  const nameProblem = base['node-name'] !== undefined ? invalidNodeName(base['node-name']) : null;
  if (nameProblem) throw new BlockError('EINVAL', nameProblem);
  return { base, rest };
}
