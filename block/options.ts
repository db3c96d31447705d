/*
 * blockdev-add style options: the zod schema of the keys every node takes
 * (QEMU's BlockdevOptionsBase) and value helpers that accept both typed JSON
 * and the strings of `key=value` syntax, as QEMU's input visitors do.
 *
 * Drivers declare their own keys as a zod object; `parseNodeOptions` checks
 * the common keys, then the driver's (strictly: an unknown key is refused
 * with QEMU's message), and returns both halves typed. Messages follow QEMU:
 *   Parameter 'read-only' expects 'on' or 'off'
 *   Block format 'raw' does not support the option 'foo'
 */
import { z } from 'zod';
import { BlockError } from './errors.js';
import type { OptionTree, OptionValue } from './keyval.js';
import { parseSize } from './units.js';

const BOOL_WORDS: Record<string, boolean> = { on: true, yes: true, true: true, off: false, no: false, false: false };

/** A boolean, or 'on'/'off' (also yes/no, true/false). */
export function zBool(key: string) {
  return z.union([z.boolean(), z.string()]).transform((v, ctx) => {
    if (typeof v === 'boolean') return v;
    const b = BOOL_WORDS[v];
    if (b === undefined) {
      ctx.addIssue({ code: 'custom', message: `Parameter '${key}' expects 'on' or 'off'` });
      return z.NEVER;
    }
    return b;
  });
}

/** A non-negative integer, or its decimal/hex string. */
export function zInt(key: string, opts: { min?: number; max?: number } = {}) {
  const min = opts.min ?? 0;
  const max = opts.max ?? Number.MAX_SAFE_INTEGER;
  return z.union([z.number(), z.string()]).transform((v, ctx) => {
    const n = typeof v === 'number' ? v : /^\s*(0x[0-9a-f]+|\d+)\s*$/i.test(v) ? Number(v) : NaN;
    if (!Number.isSafeInteger(n) || n < min || n > max) {
      ctx.addIssue({ code: 'custom', message: `Parameter '${key}' expects an integer between ${min} and ${max}` });
      return z.NEVER;
    }
    return n;
  });
}

/** A size in bytes: an integer, or a string with an optional k/M/G/T/P/E suffix. */
export function zSize(key: string) {
  return z.union([z.number(), z.string()]).transform((v, ctx) => {
    const n = typeof v === 'number' ? v : parseSize(v);
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

/** Node names as QEMU accepts them (id_wellformed, under 32 bytes). */
export const NODE_NAME_MAX_BYTES = 31;
export function invalidNodeName(name: string): string | null {
  if (name.length > NODE_NAME_MAX_BYTES) return `Node name too long`;
  if (!/^[A-Za-z][A-Za-z0-9._-]*$/.test(name)) return `Invalid node-name: '${name}'`;
  return null;
}

/** The keys every node takes (BlockdevOptionsBase). */
export const baseOptionsSchema = z.object({
  driver: z.string({ error: "Parameter 'driver' is required" }),
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
  if (issue.code === 'custom' || issue.message.startsWith('Parameter')) return issue.message;
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
  const r = schema.safeParse(options);
  if (!r.success) throw new BlockError('EINVAL', issueMessage(r.error, describeUnknown));
  return r.data;
}

export interface ParsedNodeOptions {
  base: BaseOptions;
  /** The driver's keys (everything but the common ones), not yet validated. */
  rest: Record<string, OptionValue | unknown>;
}

/** Splits the common keys from the driver's and validates the common ones. */
export function parseBaseOptions(options: Record<string, unknown>): ParsedNodeOptions {
  const baseIn: Record<string, unknown> = {};
  const rest: Record<string, unknown> = {};
  for (const [k, v] of Object.entries(options)) (BASE_KEYS.has(k) ? baseIn : rest)[k] = v;
  const base = parseWith(baseOptionsSchema, baseIn);
  const nameProblem = base['node-name'] !== undefined ? invalidNodeName(base['node-name']) : null;
  if (nameProblem) throw new BlockError('EINVAL', nameProblem);
  return { base, rest };
}
