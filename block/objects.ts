/*
 * `--object` (QEMU's user_creatable_process_cmdline): QOM objects given on
 * the command line, such as secrets for encrypted images.
 *
 * The definition is keyval with `qom-type` implied for the first element,
 * or JSON when it starts with `{` (read by QEMU's JSON parser; booleans
 * and numbers are recorded as keyval would give them, on/off and decimal
 * text, for the users that read the properties).
 * Checks in QEMU's order, each with QEMU's text: `help` (alone, or after a
 * type) lists the types or the type's properties and ends the program
 * with status 0; qom-type missing or unknown; id missing or not an
 * identifier; a property the type does not have; an id used twice; then the
 * type's own completion check (a secret needs `data` or `file`).
 *
 * Objects are recorded here, not instantiated: the users instantiate the
 * ones they need (nbd/tls-objects.ts for TLS credentials and authz,
 * block/throttle-group.ts for throttle groups). Property checks exist for
 * `secret`, `secret_keyring` and `throttle-group`. Shared by qemu-img-ts,
 * qemu-nbd-ts and the daemon (`--object`, object-add), hence in block/.
 */
import { BlockError } from './errors.js';
import { parseJsonOption, parseKeyval, type OptionTree, type OptionValue } from './keyval.js';
import { throttleConfigFromProps } from './throttle-object.js';

/** The user-creatable types of qemu-img 7.2, in its `--object help` order. */
const QOM_TYPES = [
  'authz-list',
  'authz-list-file',
  'authz-simple',
  'main-loop',
  'pr-manager-helper',
  'secret',
  'secret_keyring',
  'thread-context',
  'throttle-group',
  'tls-cipher-suites',
  'tls-creds-anon',
  'tls-creds-psk',
  'tls-creds-x509',
] as const;

/** Properties (and their help type names) of the types we check. */
const PROPERTIES: Partial<Record<string, Record<string, string>>> = {
  secret: { data: 'string', file: 'string', format: 'QCryptoSecretFormat', iv: 'string', keyid: 'string' },
  secret_keyring: { format: 'QCryptoSecretFormat', iv: 'string', keyid: 'string', serial: 'int32' },
};

const ID_PATTERN = /^[A-Za-z][A-Za-z0-9._-]*$/;

export interface UserObject {
  qomType: string;
  id: string;
  props: OptionTree;
}

export class ObjectRegistry {
  readonly objects = new Map<string, UserObject>();

  /** Adds an object from its definition; returns help text to print instead, or null. */
  add(definition: string): string | null {
    const json = definition.startsWith('{');
    const elements = definition.split(',');
    if (!json && (elements.includes('help') || elements.includes('?'))) return helpFor(elements[0]!.replace(/^qom-type=/, ''));
    const tree = json ? asKeyvalText(parseJsonOption(definition)) : parseKeyval(definition, 'qom-type');
    const { 'qom-type': qomType, id, ...props } = tree;
    if (typeof qomType !== 'string') throw new BlockError('EINVAL', "Parameter 'qom-type' is missing");
    if (!(QOM_TYPES as readonly string[]).includes(qomType)) {
      throw new BlockError('EINVAL', `Parameter 'qom-type' does not accept value '${qomType}'`);
    }
    if (typeof id !== 'string') throw new BlockError('EINVAL', "Parameter 'id' is missing");
    if (!ID_PATTERN.test(id)) {
      throw new BlockError(
        'EINVAL',
        "Parameter 'id' expects an identifier\nIdentifiers consist of letters, digits, '-', '.', '_', starting with a letter.",
      );
    }
    checkProperties(qomType, props);
    if (qomType === 'throttle-group') throttleConfigFromProps(props);
    if (this.objects.has(id)) {
      throw new BlockError('EEXIST', `attempt to add duplicate property '${id}' to object (type 'container')`);
    }
    if (qomType === 'secret' && props.data === undefined && props.file === undefined) {
      throw new BlockError('EINVAL', "Either 'file' or 'data' must be provided");
    }
    this.objects.set(id, { qomType, id, props });
    return null;
  }
}

/** JSON scalars as keyval text: booleans on/off, numbers in decimal. */
function asKeyvalText(tree: OptionTree): OptionTree {
  const out: OptionTree = {};
  for (const [key, value] of Object.entries(tree)) out[key] = scalarText(value);
  return out;
}

function scalarText(value: OptionValue): OptionValue {
  if (typeof value === 'boolean') return value ? 'on' : 'off';
  if (typeof value === 'number') return String(value);
  if (Array.isArray(value)) return value.map(scalarText);
  if (value !== null && typeof value === 'object') return asKeyvalText(value);
  return value;
}

function checkProperties(qomType: string, props: OptionTree): void {
  const known = PROPERTIES[qomType];
  if (!known) return;
  for (const key of Object.keys(props)) {
    if (!(key in known)) throw new BlockError('EINVAL', `Parameter '${key}' is unexpected`);
  }
}

/** `--object help` or `--object TYPE,help`. */
function helpFor(first: string): string {
  const known = PROPERTIES[first];
  if (known) {
    const lines = Object.entries(known).map(([name, type]) => `  ${name}=<${type}>\n`);
    return `${first} options:\n${lines.join('')}`;
  }
  return `List of user creatable objects:\n${QOM_TYPES.map((t) => `  ${t}\n`).join('')}`;
}
