/*
 * object-add and object-del (QEMU 7.2's qom/qom-qmp-cmds.c and
 * qom/object_interfaces.c), sharing the id space of `--object`.
 *
 * object-add {qom-type, id, ...properties} is checked in QEMU's order,
 * with its texts:
 *   1. the QAPI visit: `qom-type` present and one of 7.2's ObjectType
 *      values ("Parameter 'qom-type' does not accept value 'x'"), `id`
 *      present, then the type's properties ("Parameter 'identity' is
 *      missing", "Parameter 'x' is unexpected", a throttle-group's limits
 *      and their setters' "Property values cannot be negative", …);
 *   2. the type must be built into the daemon: ObjectType also lists
 *      machine types (memory backends, filters, …) that
 *      qemu-storage-daemon lacks, and `authz-listfile`, whose QOM type is
 *      really named authz-list-file — 7.2 answers "invalid object type: x"
 *      for all of them, and so do we;
 *   3. the id must be an identifier ("Parameter 'id' expects an
 *      identifier") and unused ("attempt to add duplicate property 'x' to
 *      object (type 'container')");
 *   4. completion: TLS credentials load their files ("Unable to access
 *      credentials …"), a secret needs `data` or `file`, a throttle-group
 *      becomes a group of the graph's throttle registry ("A group with
 *      this name already exists" when block_set_io_throttle made one of
 *      that name).
 * TLS credentials' property checks happen at completion too (they are not
 * separable from loading), so for them a duplicate id is reported before
 * a bad property. Types the daemon has but that have no effect here
 * (iothread, main-loop, thread-context, pr-manager-helper, secret_keyring,
 * tls-cipher-suites) are recorded as given, as `--object` does.
 *
 * object-del {id}: "object 'x' not found"; a throttle group with members
 * is "object 'x' is in use, can not be deleted". TLS credentials and
 * authz objects may go while a server uses them (QEMU keeps a reference;
 * so does our server).
 */
import { z } from 'zod';
import type { OptionTree } from '../block/keyval.js';
import { throttleConfigFromProps } from '../block/throttle-object.js';
import { throttleGroupsOf } from '../block/throttle-group.js';
import { createAuthz } from '../nbd/tls-authz.js';
import { createTlsObject, isTlsObjectType } from '../nbd/tls-objects.js';
import { Props, propError, type ObjectSpec } from '../nbd/tls-props.js';
import { defineCommand, genericError, type QmpCommand } from './command.js';
import type { Daemon } from './daemon.js';

/** QEMU 7.2's ObjectType enum (qapi/qom.json), as qemu-storage-daemon 7.2's schema has it. */
export const OBJECT_TYPES = [
  'authz-list', 'authz-listfile', 'authz-pam', 'authz-simple', 'can-bus', 'can-host-socketcan', 'colo-compare',
  'cryptodev-backend', 'cryptodev-backend-builtin', 'cryptodev-backend-lkcf', 'cryptodev-vhost-user', 'dbus-vmstate',
  'filter-buffer', 'filter-dump', 'filter-mirror', 'filter-redirector', 'filter-replay', 'filter-rewriter',
  'input-barrier', 'input-linux', 'iothread', 'main-loop', 'memory-backend-epc', 'memory-backend-file',
  'memory-backend-memfd', 'memory-backend-ram', 'pef-guest', 'pr-manager-helper', 'qtest', 'rng-builtin', 'rng-egd',
  'rng-random', 'secret', 'secret_keyring', 'sev-guest', 'thread-context', 's390-pv-guest', 'throttle-group',
  'tls-creds-anon', 'tls-creds-psk', 'tls-creds-x509', 'tls-cipher-suites', 'x-remote-object', 'x-vfio-user-server',
] as const;

/** The ObjectType values whose QOM type qemu-storage-daemon 7.2 is built with. */
const DAEMON_TYPES = new Set([
  'authz-list', 'authz-simple', 'iothread', 'main-loop', 'pr-manager-helper', 'secret', 'secret_keyring',
  'thread-context', 'throttle-group', 'tls-cipher-suites', 'tls-creds-anon', 'tls-creds-psk', 'tls-creds-x509',
]);

const SECRET_PROPS = ['data', 'file', 'format', 'iv', 'keyid'];
/** id_wellformed. */
const ID_PATTERN = /^[A-Za-z][A-Za-z0-9._-]*$/;

/**
 * throttleConfigFromProps also reads `--object`'s keyval, where numbers
 * come as strings; in JSON a string is the wrong type. Wrapped in an array
 * it gets the JSON text ("Invalid parameter type for 'x', expected:
 * integer") at the place the visitor meets it.
 */
function jsonIntegers(props: Readonly<Record<string, unknown>>): Record<string, unknown> {
  const wrap = (v: unknown) => (typeof v === 'string' ? [v] : v);
  const out: Record<string, unknown> = {};
  for (const [key, value] of Object.entries(props)) {
    const isObject = typeof value === 'object' && value !== null && !Array.isArray(value);
    out[key] = isObject ? Object.fromEntries(Object.entries(value).map(([k, v]) => [k, wrap(v)])) : wrap(value);
  }
  return out;
}

/** Step 1 for the types whose properties we know (see the note at the top). */
function visitProperties(spec: ObjectSpec): void {
  const props = new Props(spec.props, '', true);
  switch (spec.qomType) {
    case 'throttle-group':
      throttleConfigFromProps(jsonIntegers(spec.props));
      return;
    case 'authz-simple':
    case 'authz-list':
      createAuthz(spec);
      return;
    case 'authz-listfile':
      props.only(['filename', 'refresh']).requiredStr('filename');
      props.bool('refresh', true);
      return;
    case 'secret':
      props.only(SECRET_PROPS);
      return;
  }
}

/** Step 4: the object's own completion, and its registration with whoever uses it. */
function complete(d: Daemon, spec: ObjectSpec): void {
  if (isTlsObjectType(spec.qomType)) d.tlsObjects.set(spec.id, createTlsObject(spec));
  if (spec.qomType === 'secret' && spec.props.data === undefined && spec.props.file === undefined) {
    throw propError("Either 'file' or 'data' must be provided");
  }
  if (spec.qomType === 'throttle-group') throttleGroupsOf(d.graph).createObject(spec.id, spec.props);
}

/** qmp_object_add (see the note at the top). */
export function objectAdd(d: Daemon, spec: ObjectSpec): void {
  visitProperties(spec);
  if (!DAEMON_TYPES.has(spec.qomType)) throw genericError(`invalid object type: ${spec.qomType}`);
  if (!ID_PATTERN.test(spec.id)) throw genericError("Parameter 'id' expects an identifier");
  if (d.objects.objects.has(spec.id)) {
    throw genericError(`attempt to add duplicate property '${spec.id}' to object (type 'container')`);
  }
  complete(d, spec);
  d.objects.objects.set(spec.id, { qomType: spec.qomType, id: spec.id, props: spec.props as OptionTree });
}

/** qmp_object_del / user_creatable_del. */
export function objectDel(d: Daemon, id: string): void {
  const spec = d.objects.objects.get(id);
  if (!spec) throw genericError(`object '${id}' not found`);
  if (spec.qomType === 'throttle-group') throttleGroupsOf(d.graph).deleteObject(id);
  d.tlsObjects.delete(id);
  d.objects.objects.delete(id);
}

export const objectCommands: QmpCommand<Daemon>[] = [
  defineCommand({
    name: 'object-add',
    args: z.looseObject({ 'qom-type': z.string(), id: z.string().optional() }),
    run(d: Daemon, args) {
      const { 'qom-type': qomType, id, ...props } = args;
      if (!(OBJECT_TYPES as readonly string[]).includes(qomType)) {
        throw genericError(`Parameter 'qom-type' does not accept value '${qomType}'`);
      }
      if (id === undefined) throw genericError("Parameter 'id' is missing");
      objectAdd(d, { qomType, id, props });
      return {};
    },
  }),
  defineCommand({
    name: 'object-del',
    args: z.strictObject({ id: z.string() }),
    run(d: Daemon, args) {
      objectDel(d, args.id);
      return {};
    },
  }),
];
