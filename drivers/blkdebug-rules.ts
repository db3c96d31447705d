/*
 * blkdebug's rules (QEMU 7.2's block/blkdebug.c): a small state machine
 * driven by debug events (block/debug-event.ts) that arms error injection.
 *
 * Rules come from the `config` file (ini syntax, see parseConfigFile) and
 * then from the `inject-error` and `set-state` options, in that order;
 * each is tied to one event and, unless its `state` is 0, to one state.
 * The state starts at 1. When an event fires, the rules of that event
 * whose state matches the state *before* the event act:
 *   - set-state rules move the state to their `new_state` (when several
 *     match, the one given first wins, as QEMU's head-inserted list has it
 *     processed last);
 *   - inject-error rules become the active rules, replacing the previous
 *     active set (an event without a matching inject-error rule leaves it).
 * Every request (read, write, write-zeroes, discard, flush, block-status)
 * then looks for the first active rule, in the order given, whose `sector`
 * lies inside the request (any request when no sector is given; never a
 * zero-length one such as a flush) and whose `iotype` matches (by default
 * every type but block-status). That rule fails the request with its
 * errno: at once with `immediately`, else after one turn of the event loop
 * (QEMU reschedules the coroutine). A `once` rule is then deleted for
 * good. A matching rule with errno 0 lets the request through, hiding the
 * rules after it; a negative errno (QEMU returns it negated, which reads
 * as success) completes the request without passing it down.
 *
 * Errno numbers are Linux's; a number the block layer has no name for is
 * reported as EIO. Messages are those of QEMU's option parsing for
 * `json:` filenames and --image-opts (QemuOpts, qemu_config_parse). The
 * `suspend` rules (breakpoints of qemu-io's `break`/`resume`) are not
 * offered.
 */
import fs from 'node:fs/promises';
import { BlockError, ERRNO, isErrnoCode, strerror, type ErrnoCode } from '../block/errors.js';
import { BLKDEBUG_EVENTS, type BlkdebugEvent } from '../block/debug-event.js';
import { zBool } from '../block/options.js';

/** QAPI's BlkdebugIOType, in order (bit i of a rule's mask is type i). */
export const BLKDEBUG_IO_TYPES = ['read', 'write', 'write-zeroes', 'discard', 'flush', 'block-status'] as const;
export type BlkdebugIoType = (typeof BLKDEBUG_IO_TYPES)[number];

const ioBit = (t: BlkdebugIoType) => 1 << BLKDEBUG_IO_TYPES.indexOf(t);
/** The types a rule without `iotype` matches: all but block-status. */
const DEFAULT_IO_MASK = ['read', 'write', 'write-zeroes', 'discard', 'flush'].reduce((m, t) => m | ioBit(t as BlkdebugIoType), 0);
const SECTOR_BYTES = 512;
/** The state a blkdebug node starts in. */
export const INITIAL_STATE = 1;

export interface InjectErrorRule {
  readonly action: 'inject-error';
  readonly event: BlkdebugEvent;
  readonly state: number;
  readonly errno: number;
  readonly once: boolean;
  readonly immediately: boolean;
  /** Byte offset of `sector`, or -1: any request. */
  readonly offsetBytes: number;
  readonly ioMask: number;
}

export interface SetStateRule {
  readonly action: 'set-state';
  readonly event: BlkdebugEvent;
  readonly state: number;
  readonly newState: number;
}

export type BlkdebugRule = InjectErrorRule | SetStateRule;

/** What a failed request gets. */
export interface Injection {
  readonly errno: number;
  readonly immediately: boolean;
}

// ---------------------------------------------------------------- state machine

export class BlkdebugRules {
  state = INITIAL_STATE;
  /** Each event's rules, last given first (QEMU inserts at the head). */
  private readonly byEvent = new Map<BlkdebugEvent, BlkdebugRule[]>();
  /** The armed inject-error rules, in the order given. */
  private active: InjectErrorRule[] = [];

  constructor(rules: readonly BlkdebugRule[]) {
    for (const rule of rules) {
      const list = this.byEvent.get(rule.event);
      if (list) list.unshift(rule);
      else this.byEvent.set(rule.event, [rule]);
    }
  }

  /** blkdebug_debug_event: the rules of `event` for the current state act. */
  event(event: BlkdebugEvent): void {
    const rules = this.byEvent.get(event);
    if (rules === undefined) return;
    let newState = this.state;
    let armed: InjectErrorRule[] | null = null;
    for (const rule of rules) {
      if (rule.state !== 0 && rule.state !== this.state) continue;
      if (rule.action === 'set-state') newState = rule.newState;
      else (armed ??= []).unshift(rule);
    }
    if (armed) this.active = armed;
    this.state = newState;
  }

  /** rule_check: the injection for a request, or null to let it through; deletes a `once` rule it used. */
  check(offsetBytes: number, bytes: number, type: BlkdebugIoType): Injection | null {
    if (this.active.length === 0) return null;
    const bit = ioBit(type);
    const rule = this.active.find(
      (r) =>
        (r.offsetBytes === -1 || (bytes > 0 && r.offsetBytes >= offsetBytes && r.offsetBytes < offsetBytes + bytes)) &&
        (r.ioMask & bit) !== 0,
    );
    if (rule === undefined || rule.errno === 0) return null;
    if (rule.once) this.remove(rule);
    return rule;
  }

  private remove(rule: InjectErrorRule): void {
    this.active = this.active.filter((r) => r !== rule);
    const list = this.byEvent.get(rule.event)!;
    list.splice(list.indexOf(rule), 1);
  }
}

/** The BlockError for an injected errno (Linux numbering; unnamed numbers read as EIO). */
export function injectedError(errno: number): BlockError {
  const code = (Object.keys(ERRNO) as ErrnoCode[]).find((c) => ERRNO[c] === errno) ?? 'EIO';
  return new BlockError(code);
}

// ---------------------------------------------------------------- option parsing

type Group = 'inject-error' | 'set-state';
/** QemuOpts types of each group's keys (inject_error_opts, set_state_opts). */
const GROUP_KEYS: Record<Group, Record<string, 'string' | 'number' | 'bool'>> = {
  'inject-error': { event: 'string', state: 'number', iotype: 'string', errno: 'number', sector: 'number', once: 'bool', immediately: 'bool' },
  'set-state': { event: 'string', state: 'number', new_state: 'number' },
};
type Typed = Record<string, string | number | boolean>;

/** One rule's keys as QemuOpts reads them; `unknownKey` words the refusal of a key the group lacks. */
function typedRule(group: Group, values: Record<string, unknown>, unknownKey: (key: string) => string): Typed {
  const out: Typed = {};
  for (const [key, value] of Object.entries(values)) {
    const type = GROUP_KEYS[group][key];
    if (type === undefined) throw invalid(unknownKey(key));
    if (type === 'string') out[key] = typeof value === 'string' ? value : String(value);
    else if (type === 'number') out[key] = optNumber(key, value);
    else out[key] = optBool(key, value);
  }
  return out;
}

/** A QemuOpts number: an integer, or its text (decimal, 0x hex, 0 octal; a leading `-` wraps as strtoull does). */
function optNumber(key: string, value: unknown): number {
  if (typeof value === 'number' && Number.isInteger(value)) return value;
  const m = typeof value === 'string' ? /^\s*([+-]?)(0[xX][0-9a-fA-F]+|0[0-7]*|[1-9][0-9]*)$/.exec(value) : null;
  if (!m) throw invalid(`Parameter '${key}' expects a number`);
  const digits = m[2]!;
  const n = Number(/^0[0-7]+$/.test(digits) ? `0o${digits.slice(1)}` : digits);
  return m[1] === '-' ? -n : n;
}

function optBool(key: string, value: unknown): boolean {
  const r = zBool(key).safeParse(value);
  if (!r.success) throw invalid(`Parameter '${key}' expects 'on' or 'off'`);
  return r.data;
}

/** QEMU's ints are 32-bit: a wrapped value compares as C would. */
const int32 = (n: number) => Number(BigInt.asIntN(32, BigInt(n)));

/** add_rule: the rule a typed group makes (event and iotype checked here, as QEMU does). */
function buildRule(group: Group, t: Typed): BlkdebugRule {
  if (t.event === undefined) throw invalid('Missing event name for rule');
  const event = enumValue(BLKDEBUG_EVENTS, t.event as string);
  const state = int32((t.state as number | undefined) ?? 0);
  if (group === 'set-state') return { action: 'set-state', event, state, newState: int32((t.new_state as number | undefined) ?? 0) };
  const sector = (t.sector as number | undefined) ?? -1;
  const ioMask = t.iotype === undefined ? DEFAULT_IO_MASK : ioBit(enumValue(BLKDEBUG_IO_TYPES, t.iotype as string));
  return {
    action: 'inject-error',
    event,
    state,
    errno: int32((t.errno as number | undefined) ?? ERRNO.EIO),
    once: (t.once as boolean | undefined) ?? false,
    immediately: (t.immediately as boolean | undefined) ?? false,
    offsetBytes: sector === -1 ? -1 : sector * SECTOR_BYTES,
    ioMask,
  };
}

function enumValue<T extends string>(values: readonly T[], text: string): T {
  if (!(values as readonly string[]).includes(text)) throw invalid(`invalid parameter value: ${text}`);
  return text as T;
}

const invalid = (message: string) => new BlockError('EINVAL', message);

/** A group's entries as options give them: a list of rules, or one rule object (QEMU's flattened form takes both). */
function optionEntries(value: unknown): Array<Record<string, unknown>> {
  if (value === undefined) return [];
  const list = Array.isArray(value) ? value : [value];
  return list.map((v) => (typeof v === 'object' && v !== null && !Array.isArray(v) ? (v as Record<string, unknown>) : {}));
}

/** One section of a config file, or one rule from the options. */
interface RuleSource {
  group: Group;
  typed: Typed;
}

/**
 * read_config: the rules of the config file (if any), then those of the
 * `inject-error` and `set-state` options; all inject-error rules are built
 * before the set-state ones, each group in the order given.
 */
export async function readRules(configPath: string | undefined, options: { 'inject-error'?: unknown; 'set-state'?: unknown }): Promise<BlkdebugRule[]> {
  const sources: RuleSource[] = configPath === undefined ? [] : parseConfigFile(await readConfigText(configPath));
  for (const group of ['inject-error', 'set-state'] as const) {
    const unknownKey = (key: string) => `[${group}] section doesn't support the option '${key}'`;
    for (const values of optionEntries(options[group])) sources.push({ group, typed: typedRule(group, values, unknownKey) });
  }
  const ordered = [...sources.filter((s) => s.group === 'inject-error'), ...sources.filter((s) => s.group === 'set-state')];
  return ordered.map((s) => buildRule(s.group, s.typed));
}

async function readConfigText(configPath: string): Promise<string> {
  try {
    return await fs.readFile(configPath, 'latin1');
  } catch (e) {
    const code = (e as NodeJS.ErrnoException).code;
    const errno: ErrnoCode = isErrnoCode(code) ? code : 'EIO';
    throw new BlockError(errno, `Could not read blkdebug config file: ${strerror(errno)}`);
  }
}

// ---------------------------------------------------------------- config file

/** sscanf field widths of qemu_config_parse (group and id 63 bytes, key 63, value 1023). */
const CONFIG_NAME_MAX = 63;
const CONFIG_VALUE_MAX = 1023;
const GROUP_ID_LINE = new RegExp(`^\\[(\\S{1,${CONFIG_NAME_MAX}})\\s*"([^"]{1,${CONFIG_NAME_MAX}})"`);
const GROUP_LINE = new RegExp(`^\\[([^\\]]{1,${CONFIG_NAME_MAX}})`);
const KEY = new RegExp(`^\\s*(\\S{1,${CONFIG_NAME_MAX}})`);
const QUOTED_VALUE = new RegExp(`^\\s*=\\s*"([^"]{1,${CONFIG_VALUE_MAX}})`);

interface Section {
  group: string;
  id: string | null;
  values: Record<string, string>;
}

/**
 * qemu_config_parse for blkdebug's two groups. A line is empty (skipped),
 * a `#` comment, a `[group]` or `[group "id"]` header, or `key = "value"`
 * (anything after the key that is not `= "…"` leaves the value empty).
 * Each section is checked when the next header or the end is reached:
 * "There is no option group 'G'", "Duplicate ID 'I' for G", "Invalid
 * parameter 'K'", and the value types; a line before any header is "no
 * group defined", a blank line with spaces a "parse error".
 */
export function parseConfigFile(text: string): RuleSource[] {
  const out: RuleSource[] = [];
  const ids = new Set<string>();
  let section: Section | null = null;
  const close = () => {
    if (section) out.push(checkSection(section, ids));
  };
  for (const line of text.split(/(?<=\n)/)) {
    if (line.startsWith('\n') || line.startsWith('#')) continue;
    const header = line.startsWith('[') ? (GROUP_ID_LINE.exec(line) ?? GROUP_LINE.exec(line)) : null;
    if (header) {
      close();
      section = { group: header[1]!, id: header[2] ?? null, values: {} };
      continue;
    }
    const key = KEY.exec(line);
    if (!key) throw invalid('parse error');
    if (!section) throw invalid('no group defined');
    section.values[key[1]!] = QUOTED_VALUE.exec(line.slice(key[0].length))?.[1] ?? '';
  }
  close();
  return out;
}

function checkSection(section: Section, ids: Set<string>): RuleSource {
  const { group, id } = section;
  if (group !== 'inject-error' && group !== 'set-state') throw invalid(`There is no option group '${group}'`);
  if (id !== null) {
    if (ids.has(`${group}\0${id}`)) throw invalid(`Duplicate ID '${id}' for ${group}`);
    ids.add(`${group}\0${id}`);
  }
  return { group, typed: typedRule(group, section.values, (key) => `Invalid parameter '${key}'`) };
}

// ---------------------------------------------------------------- QAPI (blockdev-add over QMP)

type QapiType = 'event' | 'iotype' | 'int' | 'bool';
/** BlkdebugInjectErrorOptions and BlkdebugSetStateOptions members, in schema order (required ones marked). */
const QAPI_MEMBERS: Record<Group, Array<[string, QapiType, boolean]>> = {
  'inject-error': [['event', 'event', true], ['state', 'int', false], ['iotype', 'iotype', false], ['errno', 'int', false], ['sector', 'int', false], ['once', 'bool', false], ['immediately', 'bool', false]],
  'set-state': [['event', 'event', true], ['state', 'int', false], ['new_state', 'int', true]],
};
const QAPI_ENUMS: Record<'event' | 'iotype', readonly string[]> = { event: BLKDEBUG_EVENTS, iotype: BLKDEBUG_IO_TYPES };
const QAPI_TYPE_NAMES: Record<QapiType, string> = { event: 'string', iotype: 'string', int: 'integer', bool: 'boolean' };

/**
 * What QAPI's input visitor says about typed (QMP) `inject-error` and
 * `set-state` lists at `prefix` ("Parameter 'inject-error[0].event' is
 * missing", "Parameter 'event' does not accept value 'x'", …), or null;
 * nothing in keyval form (--blockdev a=b), where the rules are text.
 */
export function qapiRulesProblem(tree: Record<string, unknown>, prefix: string, typed: boolean): string | null {
  if (!typed) return null;
  for (const group of ['inject-error', 'set-state'] as const) {
    const list = tree[group];
    if (list === undefined) continue;
    if (!Array.isArray(list)) return `Invalid parameter type for '${prefix}${group}', expected: array`;
    for (let i = 0; i < list.length; i++) {
      const problem = qapiRuleProblem(group, list[i], `${prefix}${group}[${i}]`);
      if (problem) return problem;
    }
  }
  return null;
}

function qapiRuleProblem(group: Group, rule: unknown, name: string): string | null {
  if (typeof rule !== 'object' || rule === null || Array.isArray(rule)) return `Invalid parameter type for '${name}', expected: object`;
  const values = rule as Record<string, unknown>;
  for (const [key, type, required] of QAPI_MEMBERS[group]) {
    const v = values[key];
    if (v === undefined) {
      if (required) return `Parameter '${name}.${key}' is missing`;
      continue;
    }
    const typeOk = type === 'int' ? Number.isInteger(v) : type === 'bool' ? typeof v === 'boolean' : typeof v === 'string';
    if (!typeOk) return `Invalid parameter type for '${name}.${key}', expected: ${QAPI_TYPE_NAMES[type]}`;
    if ((type === 'event' || type === 'iotype') && !QAPI_ENUMS[type].includes(v as string)) return `Parameter '${key}' does not accept value '${v as string}'`;
  }
  const known = new Set(QAPI_MEMBERS[group].map(([key]) => key));
  const extra = Object.keys(values).find((key) => !known.has(key));
  return extra === undefined ? null : `Parameter '${name}.${extra}' is unexpected`;
}
