/*
 * The options of the `nbd` protocol driver (QEMU's BlockdevOptionsNbd and
 * nbd_runtime_opts) and how QEMU turns them into a server address and an
 * export name (block/nbd.c nbd_process_options):
 *
 *   - a `filename` (URI or `nbd:` pseudo-name, nbd/uri.ts) sets
 *     `server.*` and `export`; giving those as well is refused
 *     ("Option 'export' cannot be used with a file name");
 *   - the legacy keys `host`/`port`/`path` become `server.*`
 *     ("path and host may not be used at the same time", …);
 *   - `server` is a SocketAddress: `type` inet (`host`, `port`) or unix
 *     (`path`), checked with the QAPI visitor's messages ("Parameter 'type'
 *     is missing", "Parameter 'port' is missing", "Parameter 'foo' is
 *     unexpected"); nothing at all is "NBD server address missing";
 *   - `export` (at most 4096 bytes), `x-dirty-bitmap` (a context queried
 *     instead of base:allocation), `reconnect-delay` and `open-timeout`
 *     (seconds), `tls-creds`/`tls-hostname`;
 *   - `multi-conn` (1–MAX_MULTI_CONN, default 1): connections to open when
 *     the server advertises multi-conn. QEMU 7.2 has no such option; it
 *     follows the proposal for upstream QEMU (and libnbd's nbdcopy
 *     --connections): one connection when the server does not advertise it.
 */
import { z } from 'zod';
import { BlockError } from '../block/errors.js';
import { zInt } from '../block/options.js';
import { MAX_STRING_BYTES } from '../nbd/protocol.js';
import { parseNbdFilename, type NbdAddress, type UriTls } from '../nbd/uri.js';

/** Most connections `multi-conn` may ask for (nbdcopy's and the upstream proposal's limit). */
export const MAX_MULTI_CONN = 16;

const zPort = (key: string) =>
  z.union([z.string(), z.number()], { error: `Invalid parameter type for '${key}', expected: string` }).transform(String);

export const nbdOptionsSchema = z.object({
  filename: z.string().optional(),
  server: z.record(z.string(), z.unknown(), { error: "Invalid parameter type for 'server', expected: object" }).optional(),
  export: z.string().optional(),
  'tls-creds': z.string().optional(),
  'tls-hostname': z.string().optional(),
  'x-dirty-bitmap': z.string().optional(),
  'reconnect-delay': zInt('reconnect-delay', { max: 2 ** 32 - 1 }).optional(),
  'open-timeout': zInt('open-timeout', { max: 2 ** 32 - 1 }).optional(),
  'multi-conn': zInt('multi-conn', { max: 2 ** 32 - 1 }).optional(),
  host: z.string().optional(),
  port: zPort('port').optional(),
  path: z.string().optional(),
});
export type NbdOptions = z.output<typeof nbdOptionsSchema>;

/** Everything the driver needs to connect. */
export interface NbdDriverConfig {
  address: NbdAddress;
  /** Absent: the default export "" (and no `/EXPORT` in the node's name). */
  exportName?: string;
  /** TLS asked for by an nbds URI. */
  uriTls?: UriTls;
  tlsCreds?: string;
  tlsHostname?: string;
  xDirtyBitmap?: string;
  reconnectDelaySeconds: number;
  openTimeoutSeconds: number;
  /** Connections wanted when the server allows several (absent: 1). */
  multiConn?: number;
}

const invalid = (message: string) => new BlockError('EINVAL', message);

/** The first option that conflicts with a filename, as QEMU names it. */
function filenameConflict(o: NbdOptions): string | null {
  for (const key of ['host', 'port', 'path', 'export'] as const) if (o[key] !== undefined) return key;
  const serverKey = o.server ? Object.keys(o.server)[0] : undefined;
  return serverKey === undefined ? null : `server.${serverKey}`;
}

/** nbd_process_legacy_socket_options: host/port/path as a server address. */
function legacyServer(o: NbdOptions): Record<string, unknown> | undefined {
  const { host, port, path } = o;
  if (host === undefined && port === undefined && path === undefined) return o.server;
  if (o.server && Object.keys(o.server).length > 0) throw invalid("Cannot use 'server' and path/host/port at the same time");
  if (path !== undefined && host !== undefined) throw invalid('path and host may not be used at the same time');
  if (path !== undefined) {
    if (port !== undefined) throw invalid('port may not be used without host');
    return { type: 'unix', path };
  }
  if (host === undefined) return o.server;
  return { type: 'inet', host, port: port ?? '10809' };
}

const SERVER_KEYS: Record<string, readonly string[]> = {
  inet: ['host', 'port', 'numeric', 'to', 'ipv4', 'ipv6', 'keep-alive', 'mptcp'],
  unix: ['path', 'abstract', 'tight'],
};

function stringMember(server: Record<string, unknown>, key: string): string {
  const v = server[key];
  if (v === undefined) throw invalid(`Parameter '${key}' is missing`);
  if (typeof v !== 'string' && typeof v !== 'number') throw invalid(`Invalid parameter type for '${key}', expected: string`);
  return String(v);
}

/** visit_type_SocketAddress over the flattened `server.*` keys. */
function socketAddress(server: Record<string, unknown> | undefined): NbdAddress {
  if (!server || Object.keys(server).length === 0) throw invalid('NBD server address missing');
  const type = server.type;
  if (type === undefined) throw invalid("Parameter 'type' is missing");
  if (typeof type !== 'string' || !['inet', 'unix', 'vsock', 'fd'].includes(type)) {
    throw invalid(`Parameter 'type' does not accept value '${String(type)}'`);
  }
  const known = SERVER_KEYS[type];
  if (!known) throw invalid(`NBD server address type '${type}' is not supported`);
  const address: NbdAddress =
    type === 'unix'
      ? { type: 'unix', path: stringMember(server, 'path') }
      : { type: 'inet', host: stringMember(server, 'host'), port: stringMember(server, 'port') };
  const extra = Object.keys(server).find((k) => k !== 'type' && !known.includes(k));
  if (extra !== undefined) throw invalid(`Parameter '${extra}' is unexpected`);
  return address;
}

/** Checks the options and derives the connection settings. */
export function nbdConfig(o: NbdOptions): NbdDriverConfig {
  let server = o.server;
  let exportName = o.export;
  let uriTls: UriTls | undefined;
  if (o.filename !== undefined) {
    const conflict = filenameConflict(o);
    if (conflict) throw invalid(`Option '${conflict}' cannot be used with a file name`);
    const parsed = parseNbdFilename(o.filename);
    if (typeof parsed === 'string') throw invalid(parsed);
    server = parsed.address ? { ...parsed.address } : undefined;
    exportName = parsed.exportName;
    uriTls = parsed.tls;
  } else {
    server = legacyServer(o);
  }
  const address = socketAddress(server);
  if (exportName !== undefined && Buffer.byteLength(exportName) > MAX_STRING_BYTES) {
    throw invalid('export name too long to send to server');
  }
  if (o['x-dirty-bitmap'] !== undefined && Buffer.byteLength(o['x-dirty-bitmap']) > MAX_STRING_BYTES) {
    throw invalid('x-dirty-bitmap query too long to send to server');
  }
  const multiConn = o['multi-conn'] ?? 1;
  if (multiConn < 1 || multiConn > MAX_MULTI_CONN) throw invalid(`multi-conn must be between 1 and ${MAX_MULTI_CONN}`);
  return {
    address,
    ...(multiConn !== 1 ? { multiConn } : {}),
    ...(exportName !== undefined ? { exportName } : {}),
    ...(uriTls ? { uriTls } : {}),
    ...(o['tls-creds'] !== undefined ? { tlsCreds: o['tls-creds'] } : {}),
    ...(o['tls-hostname'] !== undefined ? { tlsHostname: o['tls-hostname'] } : {}),
    ...(o['x-dirty-bitmap'] !== undefined ? { xDirtyBitmap: o['x-dirty-bitmap'] } : {}),
    reconnectDelaySeconds: o['reconnect-delay'] ?? 0,
    openTimeoutSeconds: o['open-timeout'] ?? 0,
  };
}
