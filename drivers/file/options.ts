/*
 * The `file` driver's blockdev options (QEMU 7.2 file-posix's
 * raw_runtime_opts), checked with QEMU's texts.
 *
 * Two readers meet here, as in QEMU. Options given as text or through a
 * json: filename go through QemuOpts: enums (`locking`, `aio`) take their
 * words, a JSON boolean reading as on/off ("invalid parameter value: X"
 * otherwise), `aio-max-batch` is a QemuOpts number (hex and octal too, and
 * "-N", which strtoull wraps), the booleans take on/off/yes/no/true/false.
 * Typed QMP input is checked first by QAPI's types (fileOptionsQapiProblem,
 * called by the monitor): enums must be strings naming a value
 * ("Parameter 'locking' does not accept value 'X'"), the rest by the JSON
 * types the schema records.
 *
 * What each option does is in file.ts's note.
 */
import { z } from 'zod';
import { zBool, zInt } from '../../block/options.js';
import type { LockingMode } from './lock.js';

/** OnOffAuto's values. */
const LOCKING_MODES = ['on', 'off', 'auto'] as const satisfies readonly LockingMode[];
/** BlockdevAioOptions' values. */
const AIO_MODES = ['threads', 'native', 'io_uring'] as const;
export type AioMode = (typeof AIO_MODES)[number];

/** The QemuOpts reading of an enum option (qapi_enum_parse): a word of `values`; a JSON boolean reads as on/off. */
function qemuOptsEnum<const T extends readonly string[]>(values: T) {
  return z.union([z.string(), z.boolean()]).transform((v, ctx) => {
    const word = typeof v === 'boolean' ? (v ? 'on' : 'off') : v;
    if (!(values as readonly string[]).includes(word)) {
      ctx.addIssue({ code: 'custom', message: `invalid parameter value: ${word}` });
      return z.NEVER;
    }
    return word as T[number];
  });
}

/** raw_runtime_opts, in QEMU's order of reading them. */
export const fileOptionsSchema = z.object({
  filename: z.string({ error: "The 'file' block driver requires a file name" }),
  aio: qemuOptsEnum(AIO_MODES).default('threads'),
  'aio-max-batch': zInt('aio-max-batch', { negative: true, min: -Infinity, max: Infinity }).default(0),
  locking: qemuOptsEnum(LOCKING_MODES).default('auto'),
  'pr-manager': z.union([z.string(), z.number().transform(String)]).optional(),
  'drop-cache': zBool('drop-cache').default(true),
  'x-check-cache-dropped': zBool('x-check-cache-dropped').default(false),
});
export type FileOptions = z.output<typeof fileOptionsSchema>;

/** The enum options QAPI types (BlockdevOptionsFile). */
const QAPI_ENUMS: ReadonlyArray<readonly [string, readonly string[]]> = [
  ['aio', AIO_MODES],
  ['locking', LOCKING_MODES],
];

/** QAPI's checks of the string and enum keys of a typed (QMP, JSON) definition at `prefix`, or null. */
export function fileOptionsQapiProblem(tree: Record<string, unknown>, prefix: string): string | null {
  const prManager = tree['pr-manager'];
  if (prManager !== undefined && typeof prManager !== 'string') {
    return `Invalid parameter type for '${prefix}pr-manager', expected: string`;
  }
  for (const [key, values] of QAPI_ENUMS) {
    const value = tree[key];
    if (value === undefined) continue;
    if (typeof value !== 'string') return `Invalid parameter type for '${prefix}${key}', expected: string`;
    if (!values.includes(value)) return `Parameter '${prefix}${key}' does not accept value '${value}'`;
  }
  return null;
}
