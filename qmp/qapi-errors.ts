/*
 * zod's validation issues in the words of QEMU 7.2's QObject input visitor
 * (qapi/qobject-input-visitor.c), so a schema violation reads as it does
 * from qemu-storage-daemon:
 *
 *   missing key          Parameter 'NAME' is missing
 *   key not in schema    Parameter 'NAME' is unexpected
 *   wrong JSON type      Invalid parameter type for 'NAME', expected: string|boolean|object|array
 *   not an integer       Parameter 'NAME' expects integer
 *   enum value unknown   Parameter 'NAME' does not accept value 'V'
 *
 * NAME is the full name QEMU prints: members of nested objects joined with
 * '.', list elements as `[i]`. Custom issues (schemas that check a value
 * themselves, e.g. block/options.ts) keep their own message. QEMU stops at
 * the first problem it meets while visiting in schema order; zod reports
 * problems in about that order, so the first issue is the one answered.
 */
import { z } from 'zod';

/** QEMU's full_name(): `a.b[2].c`. */
export function qapiFullName(path: readonly PropertyKey[]): string {
  let name = '';
  for (const part of path) {
    if (typeof part === 'number') name += `[${part}]`;
    else name += name === '' ? String(part) : `.${String(part)}`;
  }
  return name;
}

/** The message qUint64 gives its issues, so they read "expects uint64". */
const UINT64 = 'uint64';

/** A QAPI uint64 (QEMU also takes a negative integer, as its two's complement; we refuse it). */
export function qUint64() {
  return z.number({ error: UINT64 }).int({ error: UINT64 }).min(0, { error: UINT64 });
}

const TYPE_WORDS: Record<string, string> = { string: 'string', boolean: 'boolean', object: 'object', array: 'array', record: 'object' };

/** The text of one issue. */
export function qapiIssueText(issue: z.core.$ZodIssue): string {
  const name = qapiFullName(issue.path);
  switch (issue.code) {
    case 'unrecognized_keys':
      return `Parameter '${qapiFullName([...issue.path, issue.keys[0]!])}' is unexpected`;
    case 'invalid_type': {
      if (!('input' in issue) || issue.input === undefined) return `Parameter '${name}' is missing`;
      const word = TYPE_WORDS[issue.expected];
      if (word) return `Invalid parameter type for '${name}', expected: ${word}`;
      return `Parameter '${name}' expects ${issue.message === UINT64 ? 'uint64' : 'integer'}`;
    }
    case 'invalid_value':
      if (typeof issue.input !== 'string') return `Invalid parameter type for '${name}', expected: string`;
      return `Parameter '${name}' does not accept value '${issue.input}'`;
    case 'too_small':
    case 'too_big':
      return `Parameter '${name}' expects ${issue.message === UINT64 ? 'uint64' : 'integer'}`;
    case 'invalid_union':
      if (!('input' in issue) || issue.input === undefined) return `Parameter '${name}' is missing`;
      return `Invalid parameter type for '${name}'`;
    default:
      return issue.message;
  }
}

/** Parses `input` with `schema`; throws the first issue's QEMU text as an Error. */
export function parseQapi<S extends z.ZodType>(schema: S, input: unknown): z.infer<S> {
  const r = schema.safeParse(input, { reportInput: true });
  if (r.success) return r.data;
  throw new QapiInputError(qapiIssueText(r.error.issues[0]!));
}

export class QapiInputError extends Error {}
