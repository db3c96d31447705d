/*
 * NBD addresses as users write them, and back.
 *
 * URIs follow QEMU 7.2's nbd_parse_uri (block/nbd.c) over its RFC 3986
 * parser (util/uri.c), plus the TLS schemes of the NBD URI standard that
 * libnbd implements:
 *
 *   nbd://HOST[:PORT][/EXPORT]          TCP, port 10809 when absent or 0
 *   nbd+tcp://…                         the same
 *   nbd+unix:///[EXPORT]?socket=PATH    unix socket; no host, no port
 *   nbds://…, nbds+unix://…             the same with TLS required; the
 *                                       query may add tls-certificates=DIR
 *                                       or tls-psk-file=FILE, and a user
 *                                       name (`nbds://alice@host/`) is the
 *                                       TLS (PSK) user name
 *
 * The export is the path without its first `/`, percent-decoded; an empty
 * path means the default export (no `export` option at all). QEMU refuses
 * any other query parameter (one `socket=` exactly for unix, none for TCP);
 * every failure is the one message "No valid URL specified".
 *
 * The legacy pseudo-filename `nbd:HOST:PORT[:exportname=NAME]` and
 * `nbd:unix:PATH[:exportname=NAME]` (nbd_parse_filename) is accepted too,
 * with QEMU's messages.
 *
 * `nbdExactFilename` is nbd_refresh_filename: the name qemu-img shows for
 * an NBD node, `nbd://HOST:PORT/EXPORT` or `nbd+unix:///EXPORT?socket=PATH`
 * (`nbds…` when TLS came from the URI).
 */
import { DEFAULT_PORT } from './protocol.js';

/** Where an NBD server listens (QEMU's SocketAddress, inet and unix variants). */
export type NbdAddress = { type: 'inet'; host: string; port: string } | { type: 'unix'; path: string };

/** TLS settings a URI can carry (libnbd's query parameters). */
export interface UriTls {
  /** Directory with ca-cert.pem, client-cert.pem, client-key.pem. */
  certificatesDir?: string;
  /** PSK keys file (`username:hexkey` lines). */
  pskFile?: string;
  /** PSK identity (the URI's user name). */
  username?: string;
}

/** What a filename says: the blockdev options QEMU derives from it. */
export interface ParsedNbdFilename {
  address: NbdAddress | null;
  /** Absent: the default export (""). */
  exportName?: string;
  /** Set for nbds:// and nbds+unix://. */
  tls?: UriTls;
}

export const NO_VALID_URL = 'No valid URL specified';
const EXPORTNAME_OPT = ':exportname=';

// ---------------------------------------------------------------- RFC 3986 pieces

interface UriParts {
  scheme: string;
  userinfo: string | null;
  host: string | null;
  port: number;
  path: string;
  query: string | null;
}

const URI_SHAPE = /^([A-Za-z][A-Za-z0-9+.-]*):(?:\/\/([^/?#]*))?([^?#]*)(?:\?([^#]*))?(?:#.*)?$/;
const AUTHORITY_SHAPE = /^(?:([^@]*)@)?(\[[^\]]*\]|[^:]*)(?::([0-9]*))?$/;

function percentDecode(text: string): string | null {
  try {
    return decodeURIComponent(text);
  } catch {
    return null;
  }
}

/** Splits a URI; null when it does not parse (QEMU's uri_parse failing). */
function splitUri(text: string): UriParts | null {
  const m = URI_SHAPE.exec(text);
  if (!m) return null;
  const [, scheme, authority, rawPath, query] = m;
  let userinfo: string | null = null;
  let host: string | null = null;
  let port = 0;
  if (authority !== undefined) {
    const a = AUTHORITY_SHAPE.exec(authority);
    if (!a) return null;
    userinfo = a[1] === undefined ? null : percentDecode(a[1]);
    host = a[2] ? percentDecode(a[2]) : null;
    if (a[3]) port = Number(a[3]);
    if (port > 65535) return null;
  }
  const path = percentDecode(rawPath!);
  if (path === null) return null;
  return { scheme: scheme!, userinfo, host, port, path, query: query ?? null };
}

/** query_params_parse: `name=value` pairs split on `&` and `;`, decoded; null if malformed. */
function queryParams(query: string | null): Array<[string, string]> | null {
  if (query === null || query === '') return [];
  const out: Array<[string, string]> = [];
  for (const pair of query.split(/[&;]/)) {
    if (pair === '') continue;
    const eq = pair.indexOf('=');
    if (eq < 0) return null;
    const name = percentDecode(pair.slice(0, eq));
    const value = percentDecode(pair.slice(eq + 1));
    if (name === null || value === null) return null;
    out.push([name, value]);
  }
  return out;
}

// ---------------------------------------------------------------- URIs

type Scheme = { unix: boolean; tls: boolean };

const SCHEMES: Record<string, Scheme> = {
  nbd: { unix: false, tls: false },
  'nbd+tcp': { unix: false, tls: false },
  'nbd+unix': { unix: true, tls: false },
  nbds: { unix: false, tls: true },
  'nbds+tcp': { unix: false, tls: true },
  'nbds+unix': { unix: true, tls: true },
};

/** TLS query parameters allowed with nbds schemes, by name. */
const TLS_PARAMS: Record<string, keyof UriTls> = {
  'tls-certificates': 'certificatesDir',
  'tls-psk-file': 'pskFile',
};

/** Parses an NBD URI; returns the reason (QEMU's one message) when it is not one. */
export function parseNbdUri(text: string): ParsedNbdFilename | string {
  const uri = splitUri(text);
  const scheme = uri ? SCHEMES[uri.scheme] : undefined;
  if (!uri || !scheme) return NO_VALID_URL;
  const params = queryParams(uri.query);
  if (!params) return NO_VALID_URL;
  const out: ParsedNbdFilename = { address: null };
  const path = uri.path.startsWith('/') ? uri.path.slice(1) : uri.path;
  if (path !== '') out.exportName = path;
  let socket: string | undefined;
  const tls: UriTls = {};
  for (const [name, value] of params) {
    if (scheme.unix && name === 'socket' && socket === undefined) socket = value;
    else if (scheme.tls && TLS_PARAMS[name] !== undefined) tls[TLS_PARAMS[name]!] = value;
    else return NO_VALID_URL;
  }
  if (scheme.unix) {
    if (uri.host !== null || uri.port !== 0 || socket === undefined) return NO_VALID_URL;
    out.address = { type: 'unix', path: socket };
  } else {
    if (uri.host === null) return NO_VALID_URL;
    const host = uri.host.startsWith('[') ? uri.host.slice(1, -1) : uri.host;
    out.address = { type: 'inet', host, port: String(uri.port || DEFAULT_PORT) };
  }
  if (scheme.tls) {
    if (uri.userinfo) tls.username = uri.userinfo;
    out.tls = tls;
  }
  return out;
}

// ---------------------------------------------------------------- legacy nbd: names

/** inet_parse for `HOST:PORT` and `[V6]:PORT` (options after `,` are not supported). */
function parseHostPort(spec: string): NbdAddress | string {
  const m = /^(?:\[([^\]]*)\]|([^:[\]]*)):([^:,]+)$/.exec(spec);
  if (!m) return `error parsing address '${spec}'`;
  return { type: 'inet', host: m[1] ?? m[2]!, port: m[3]! };
}

/** nbd_parse_filename for names without `://`. */
function parseLegacy(filename: string): ParsedNbdFilename | string {
  let file = filename;
  const out: ParsedNbdFilename = { address: null };
  const at = file.indexOf(EXPORTNAME_OPT);
  if (at >= 0) {
    const name = file.slice(at + EXPORTNAME_OPT.length);
    // QEMU stops here for an empty name, leaving no address: "server address missing".
    if (name === '') return out;
    out.exportName = name;
    file = file.slice(0, at);
  }
  if (!file.startsWith('nbd:')) return "File name string for NBD must start with 'nbd:'";
  const hostSpec = file.slice('nbd:'.length);
  if (hostSpec === '') return out;
  if (hostSpec.startsWith('unix:')) {
    out.address = { type: 'unix', path: hostSpec.slice('unix:'.length) };
    return out;
  }
  const addr = parseHostPort(hostSpec);
  if (typeof addr === 'string') return addr;
  out.address = addr;
  return out;
}

/** bdrv_parse_filename for the nbd protocols: a URI, or the legacy form. */
export function parseNbdFilename(filename: string): ParsedNbdFilename | string {
  return filename.includes('://') ? parseNbdUri(filename) : parseLegacy(filename);
}

// ---------------------------------------------------------------- back to a name

/** nbd_refresh_filename; `tls` adds the `s` of the TLS schemes. */
export function nbdExactFilename(address: NbdAddress, exportName: string | undefined, tls = false): string {
  const s = tls ? 's' : '';
  if (address.type === 'unix') {
    return exportName === undefined
      ? `nbd${s}+unix://?socket=${address.path}`
      : `nbd${s}+unix:///${exportName}?socket=${address.path}`;
  }
  const base = `nbd${s}://${address.host}:${address.port}`;
  return exportName === undefined ? base : `${base}/${exportName}`;
}

/** How QEMU names an address in messages: `host:port` or the socket path. */
export function describeAddress(address: NbdAddress): string {
  return address.type === 'unix' ? address.path : `${address.host}:${address.port}`;
}
