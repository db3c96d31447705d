/*
 * TLS credential objects (QEMU's crypto/tlscreds*.c) built from plain
 * data, validated and loaded the way QEMU does when the object is created:
 *
 *   tls-creds-x509   dir=DIR holding (server endpoint) ca-cert.pem,
 *                    server-cert.pem, server-key.pem and optionally
 *                    ca-crl.pem, dh-params.pem; (client endpoint)
 *                    ca-cert.pem and optionally client-cert.pem +
 *                    client-key.pem. `sanity-check` (default on) runs
 *                    tls-x509-check.ts; `passwordid` names a secret that
 *                    decrypts the private key.
 *   tls-creds-psk    dir=DIR holding keys.psk (`identity:hexkey` lines)
 *                    and optionally dh-params.pem; a client uses the key
 *                    of `username` (default "qemu"), which a server must
 *                    not set.
 *   tls-creds-anon   anonymous Diffie-Hellman, optional dir for
 *                    dh-params.pem (server).
 *   common           endpoint=client|server (default client),
 *                    verify-peer=on|off (default on), priority (GnuTLS
 *                    priority string, see tls-priority.ts), loaded
 *                    (deprecated, ignored).
 *
 * Errors are QEMU's sentences ("Unable to access credentials DIR/ca-cert.pem:
 * No such file or directory", "Missing 'dir' property value", "Username bob
 * not found in PSK file DIR/keys.psk", "Cannot load certificate 'C' & key
 * 'K': The certificate and the given key do not match."). File paths are
 * `${dir}/${name}` exactly as QEMU builds them, so messages match.
 *
 * Loaded material stays in memory (node:tls options); a server's PSK keys
 * file is re-read at every handshake, as GnuTLS's file-backed PSK lookup
 * does, so edits take effect for later clients. It is resolved to an
 * absolute path at creation (qemu-nbd changes directory to / and then
 * fails to find a relative one; we do not reproduce that).
 */
import fs from 'node:fs';
import path from 'node:path';
import type tls from 'node:tls';
import { BlockError, toBlockError } from '../block/errors.js';
import { propError, Props, type ObjectSpec } from './tls-props.js';
import { GNUTLS_BASE64, pemBlocks, readFailure, sanityCheckX509 } from './tls-x509-check.js';
import { nodeTls } from './tls.js';

export const TLS_CREDS_TYPES = ['tls-creds-anon', 'tls-creds-psk', 'tls-creds-x509'] as const;
export type TlsCredsType = (typeof TLS_CREDS_TYPES)[number];
export type TlsEndpoint = 'client' | 'server';
const ENDPOINTS: readonly TlsEndpoint[] = ['client', 'server'];

/** File names inside a credentials directory (QEMU's QCRYPTO_TLS_CREDS_*). */
export const CredFile = {
  CA_CERT: 'ca-cert.pem',
  CA_CRL: 'ca-crl.pem',
  SERVER_CERT: 'server-cert.pem',
  SERVER_KEY: 'server-key.pem',
  CLIENT_CERT: 'client-cert.pem',
  CLIENT_KEY: 'client-key.pem',
  DH_PARAMS: 'dh-params.pem',
  PSK_KEYS: 'keys.psk',
} as const;

/** The PSK identity a client uses without `username` (QEMU's default). */
export const DEFAULT_PSK_USERNAME = 'qemu';

const COMMON_PROPS = ['dir', 'endpoint', 'verify-peer', 'priority', 'loaded'];
const X509_PROPS = [...COMMON_PROPS, 'sanity-check', 'passwordid'];
const PSK_PROPS = [...COMMON_PROPS, 'username'];

/** Options for creating credentials. */
export interface TlsCredsCreateOptions {
  /** The text of the secret object `id` (for x509 `passwordid`). */
  secret?: (id: string) => string;
  /** Clock for the certificate validity checks (tests). */
  nowMs?: number;
}

const credsError = (message: string) => new BlockError('EINVAL', message);

/** Properties every credentials type has. */
export abstract class TlsCreds {
  abstract readonly qomType: TlsCredsType;
  readonly id: string;
  readonly endpoint: TlsEndpoint;
  readonly verifyPeer: boolean;
  readonly dir: string | undefined;
  readonly priority: string | undefined;

  constructor(id: string, props: Props) {
    this.id = id;
    this.dir = props.str('dir');
    this.endpoint = props.enumOf('endpoint', ENDPOINTS, 'client');
    this.verifyPeer = props.bool('verify-peer', true);
    this.priority = props.str('priority');
    props.bool('loaded', true);
  }

  /**
   * qcrypto_tls_creds_get_path: `${dir}/${file}`, or undefined when an
   * optional file does not exist (or there is no dir).
   */
  protected credPath(file: string, required: boolean): string | undefined {
    if (this.dir === undefined) {
      if (required) throw credsError("Missing 'dir' property value");
      return undefined;
    }
    const full = `${this.dir}/${file}`;
    try {
      fs.statSync(full);
      return full;
    } catch (e) {
      const err = toBlockError(e);
      if (err.code === 'ENOENT' && !required) return undefined;
      throw new BlockError(err.code, `Unable to access credentials ${full}: ${err.message}`);
    }
  }

  /** DH parameters for DHE key exchange: dh-params.pem when given, else generated ones (OpenSSL's built-in groups). */
  protected loadDhParams(file: string | undefined): Buffer | 'auto' {
    if (file === undefined) return 'auto';
    let pem: Buffer;
    try {
      pem = fs.readFileSync(file);
    } catch (e) {
      throw credsError(readFailure(file, e));
    }
    const blocks = pemBlocks(pem.toString('latin1'), 'DH PARAMETERS');
    const reason = blocks.ok ? tryContext({ dhparam: pem }) : blocks.reason;
    if (reason !== null) throw credsError(`Unable to load DH parameters from ${file}: ${reason}`);
    return pem;
  }
}

/** Null when node:tls accepts `options`, else why not. */
function tryContext(options: tls.SecureContextOptions): string | null {
  try {
    nodeTls().createSecureContext(options);
    return null;
  } catch (e) {
    return (e as Error).message;
  }
}

/** GnuTLS's GNUTLS_E_FILE_ERROR text. */
const GNUTLS_FILE_ERROR = 'Error while reading file.';

/** A credentials file GnuTLS would load; `context` is QEMU's sentence for a failure. */
function readCredFile(file: string, context: string): Buffer {
  try {
    return fs.readFileSync(file);
  } catch {
    throw credsError(`${context}: ${GNUTLS_FILE_ERROR}`);
  }
}

/** GnuTLS's wording for why a certificate + key pair does not load. */
function keyPairFailure(cert: Buffer, key: Buffer, passphrase: string | undefined): string | null {
  const certBlocks = pemBlocks(cert.toString('latin1'), 'CERTIFICATE');
  if (!certBlocks.ok) return GNUTLS_BASE64;
  const reason = tryContext({ cert, key, passphrase });
  if (reason === null) return null;
  if (/key values mismatch/.test(reason)) return 'The certificate and the given key do not match.';
  if (/bad decrypt|bad password/i.test(reason)) return 'Decryption has failed.';
  return 'The requested data were not available.';
}

export class X509Creds extends TlsCreds {
  readonly qomType = 'tls-creds-x509';
  readonly sanityCheck: boolean;
  readonly passwordId: string | undefined;
  /** PEM contents. */
  readonly ca: Buffer;
  readonly crl: Buffer | undefined;
  readonly cert: Buffer | undefined;
  readonly key: Buffer | undefined;
  readonly passphrase: string | undefined;
  readonly dhparam: Buffer | 'auto';

  constructor(spec: ObjectSpec, opts: TlsCredsCreateOptions = {}) {
    const props = new Props(spec.props).only(X509_PROPS);
    super(spec.id, props);
    this.sanityCheck = props.bool('sanity-check', true);
    this.passwordId = props.str('passwordid');
    const server = this.endpoint === 'server';
    const caFile = this.credPath(CredFile.CA_CERT, true)!;
    const crlFile = server ? this.credPath(CredFile.CA_CRL, false) : undefined;
    const certFile = this.credPath(server ? CredFile.SERVER_CERT : CredFile.CLIENT_CERT, server);
    const keyFile = this.credPath(server ? CredFile.SERVER_KEY : CredFile.CLIENT_KEY, server);
    const dhFile = server ? this.credPath(CredFile.DH_PARAMS, false) : undefined;
    if (this.sanityCheck) sanityCheckX509(caFile, certFile, server, opts.nowMs);
    this.ca = readCredFile(caFile, `Cannot load CA certificate '${caFile}'`);
    if (certFile !== undefined && keyFile !== undefined) {
      this.passphrase = this.passwordId !== undefined ? lookupSecret(opts, this.passwordId) : undefined;
      const context = `Cannot load certificate '${certFile}' & key '${keyFile}'`;
      this.cert = readCredFile(certFile, context);
      this.key = readCredFile(keyFile, context);
      const reason = keyPairFailure(this.cert, this.key, this.passphrase);
      if (reason) throw credsError(`${context}: ${reason}`);
    }
    if (crlFile !== undefined) {
      this.crl = readCredFile(crlFile, `Cannot load CRL '${crlFile}'`);
      const parses = pemBlocks(this.crl.toString('latin1'), 'X509 CRL').ok && tryContext({ crl: this.crl }) === null;
      if (!parses) throw credsError(`Cannot load CRL '${crlFile}': ${GNUTLS_BASE64}`);
    }
    this.dhparam = server ? this.loadDhParams(dhFile) : 'auto';
  }
}

function lookupSecret(opts: TlsCredsCreateOptions, id: string): string {
  if (!opts.secret) throw credsError(`No secret with id '${id}'`);
  return opts.secret(id);
}

/** One `identity:hexkey` line of a PSK keys file. */
interface PskEntry {
  identity: string;
  hexKey: string;
}

function parseKeysFile(text: string): PskEntry[] {
  return text
    .split('\n')
    .map((line) => ({ line, colon: line.indexOf(':') }))
    .filter(({ colon }) => colon >= 0)
    .map(({ line, colon }) => ({ identity: line.slice(0, colon), hexKey: line.slice(colon + 1) }));
}

/** A hex key as GnuTLS decodes it, or null when it is not hex. */
function decodeHexKey(hex: string): Buffer | null {
  const trimmed = hex.replace(/[\s]+$/, '');
  if (trimmed.length === 0 || trimmed.length % 2 || !/^[0-9a-fA-F]*$/.test(trimmed)) return null;
  return Buffer.from(trimmed, 'hex');
}

export class PskCreds extends TlsCreds {
  readonly qomType = 'tls-creds-psk';
  /** Absolute path of keys.psk. */
  readonly keysFile: string;
  /** Client: the identity sent and its key. */
  readonly username: string | undefined;
  readonly clientKey: Buffer | undefined;
  readonly dhparam: Buffer | 'auto';

  constructor(spec: ObjectSpec) {
    const props = new Props(spec.props).only(PSK_PROPS);
    super(spec.id, props);
    const username = props.str('username');
    if (this.endpoint === 'server') {
      if (username !== undefined) throw credsError('username should not be set when endpoint=server');
      const dhFile = this.credPath(CredFile.DH_PARAMS, false);
      this.keysFile = path.resolve(this.credPath(CredFile.PSK_KEYS, true)!);
      this.dhparam = this.loadDhParams(dhFile);
      return;
    }
    const keysFile = this.credPath(CredFile.PSK_KEYS, true)!;
    this.keysFile = path.resolve(keysFile);
    this.username = username ?? DEFAULT_PSK_USERNAME;
    this.clientKey = this.clientLookup(keysFile, this.username);
    this.dhparam = 'auto';
  }

  /** QEMU's lookup_key: the first line `username:key`. */
  private clientLookup(keysFile: string, username: string): Buffer {
    let text: string;
    try {
      text = fs.readFileSync(keysFile, 'utf8');
    } catch (e) {
      throw credsError(`Cannot read PSK file ${keysFile}: ${readFailure(keysFile, e)}`);
    }
    const entry = parseKeysFile(text).find((e) => e.identity === username);
    if (!entry) throw credsError(`Username ${username} not found in PSK file ${keysFile}`);
    const key = decodeHexKey(entry.hexKey);
    if (!key) throw credsError(`Key for username ${username} in PSK file ${keysFile} is not hexadecimal`);
    return key;
  }

  /** Server: the key of `identity`, read from keys.psk now; null when unknown or unreadable. */
  serverKey(identity: string): Buffer | null {
    let text: string;
    try {
      text = fs.readFileSync(this.keysFile, 'utf8');
    } catch {
      return null;
    }
    const entry = parseKeysFile(text).find((e) => e.identity === identity);
    return entry ? decodeHexKey(entry.hexKey) : null;
  }
}

export class AnonCreds extends TlsCreds {
  readonly qomType = 'tls-creds-anon';
  readonly dhparam: Buffer | 'auto';

  constructor(spec: ObjectSpec) {
    const props = new Props(spec.props).only(COMMON_PROPS);
    super(spec.id, props);
    this.dhparam = this.endpoint === 'server' ? this.loadDhParams(this.credPath(CredFile.DH_PARAMS, false)) : 'auto';
  }
}

export function isTlsCredsType(qomType: string): qomType is TlsCredsType {
  return (TLS_CREDS_TYPES as readonly string[]).includes(qomType);
}

/** Creates and loads credentials from their specification (QEMU's messages on failure). */
export function createTlsCreds(spec: ObjectSpec, opts: TlsCredsCreateOptions = {}): TlsCreds {
  switch (spec.qomType) {
    case 'tls-creds-x509':
      return new X509Creds(spec, opts);
    case 'tls-creds-psk':
      return new PskCreds(spec);
    case 'tls-creds-anon':
      return new AnonCreds(spec);
    default:
      throw propError(`Parameter 'qom-type' does not accept value '${spec.qomType}'`);
  }
}
