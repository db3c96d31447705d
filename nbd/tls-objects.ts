/*
 * TLS-related user-creatable objects by id: creating them from `--object`
 * specifications, and finding them the way QEMU's users do, with QEMU's
 * messages.
 *
 * Callers keep their own id → object table (qemu-nbd-ts and qemu-img-ts
 * also hold secrets and other types) and pass a lookup function; it may
 * return anything, and only TlsCreds / Authz instances count as such:
 *
 *   const objects = instantiateTlsObjects(specs);          // creation errors here
 *   const creds = resolveTlsCreds(objects, 'tls0', 'server');
 *   const tls = serverTls(creds, { authzId: 'auth0', objects });
 *
 * Messages (callers add their own prefix, e.g. qemu-nbd's "Failed to get
 * TLS creds: "): "No TLS credentials with id 'x'", "Object with id 'x' is
 * not TLS credentials", "Expected TLS credentials for a server endpoint";
 * "Cannot find QAuthZ object ID x", "Object 'x' is not a QAuthZ subclass".
 */
import { BlockError } from '../block/errors.js';
import { AUTHZ_TYPES, Authz, createAuthz } from './tls-authz.js';
import { createTlsCreds, isTlsCredsType, TLS_CREDS_TYPES, TlsCreds, type TlsCredsCreateOptions, type TlsEndpoint } from './tls-creds.js';
import type { ObjectSpec } from './tls-props.js';

export type { ObjectSpec } from './tls-props.js';

/** Finds a user-creatable object by id; undefined when there is none. */
export type ObjectLookup = (id: string) => unknown;

export type TlsObject = TlsCreds | Authz;

export const TLS_OBJECT_TYPES: readonly string[] = [...TLS_CREDS_TYPES, ...AUTHZ_TYPES];

export function isTlsObjectType(qomType: string): boolean {
  return TLS_OBJECT_TYPES.includes(qomType);
}

/** Creates one tls-creds-* or authz-* object (loading files, with QEMU's errors). */
export function createTlsObject(spec: ObjectSpec, opts: TlsCredsCreateOptions = {}): TlsObject {
  return isTlsCredsType(spec.qomType) ? createTlsCreds(spec, opts) : createAuthz(spec);
}

/**
 * Creates the TLS and authz objects among `specs`, in order (the first
 * failure throws), and returns a lookup that yields them by id and the
 * other specifications unchanged.
 */
export function instantiateTlsObjects(specs: Iterable<ObjectSpec>, opts: TlsCredsCreateOptions = {}): ObjectLookup {
  const table = new Map<string, unknown>();
  for (const spec of specs) table.set(spec.id, isTlsObjectType(spec.qomType) ? createTlsObject(spec, opts) : spec);
  return (id) => table.get(id);
}

/** nbd_get_tls_creds / qcrypto_tls_creds_check_endpoint. */
export function resolveTlsCreds(lookup: ObjectLookup, id: string, endpoint: TlsEndpoint): TlsCreds {
  const obj = lookup(id);
  if (obj === undefined) throw new BlockError('ENOENT', `No TLS credentials with id '${id}'`);
  if (!(obj instanceof TlsCreds)) throw new BlockError('EINVAL', `Object with id '${id}' is not TLS credentials`);
  if (obj.endpoint !== endpoint) throw new BlockError('EINVAL', `Expected TLS credentials for a ${endpoint} endpoint`);
  return obj;
}

/** qauthz_is_allowed_by_id's lookup. */
export function resolveAuthz(lookup: ObjectLookup, id: string): Authz {
  const obj = lookup(id);
  if (obj === undefined) throw new BlockError('ENOENT', `Cannot find QAuthZ object ID ${id}`);
  if (!(obj instanceof Authz)) throw new BlockError('EINVAL', `Object '${id}' is not a QAuthZ subclass`);
  return obj;
}
