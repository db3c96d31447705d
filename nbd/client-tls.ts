/*
 * TLS for the NBD client (after NBD_OPT_STARTTLS), from what an
 * `nbds://` / `nbds+unix://` URI says, as libnbd reads it:
 *
 *   tls-certificates=DIR   x509: DIR/ca-cert.pem verifies the server; the
 *                          client presents DIR/client-cert.pem and
 *                          DIR/client-key.pem when they exist (QEMU's
 *                          tls-creds-x509 directory layout)
 *   tls-psk-file=FILE      PSK: FILE holds `username:hexkey` lines; the
 *                          URI's user name (default: the login name)
 *                          picks the key; TLS 1.2 PSK cipher suites
 *   neither                x509 against the system's trusted CAs
 *
 * The server's certificate must match the host name of a TCP address (or
 * `tls-hostname`); over a unix socket there is no host name and only the
 * chain is verified.
 *
 * `tls-creds=ID` (the blockdev option, and qemu-nbd's --tls-creds) names a
 * `--object tls-creds-x509|psk|anon,endpoint=client,…`; see tlsFromCreds.
 */
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import type { Duplex } from 'node:stream';
import type { ConnectionOptions } from 'node:tls';
import { BlockError } from '../block/errors.js';
import type { ClientTlsUpgrade } from './client-handshake.js';
import { clientTls } from './tls-client.js';
import { createTlsObject, isTlsObjectType, resolveTlsCreds } from './tls-objects.js';
import type { NbdAddress, UriTls } from './uri.js';
import { nodeTls } from './tls.js';

/** The TLS part of a driver or CLI configuration. */
export interface ClientTlsConfig {
  address: NbdAddress;
  uriTls?: UriTls;
  tlsCreds?: string;
  tlsHostname?: string;
}

const PSK_CIPHERS = 'PSK-AES256-GCM-SHA384:PSK-AES128-GCM-SHA256:PSK-AES256-CBC-SHA384:PSK-AES128-CBC-SHA256';

function readOptional(file: string): Buffer | undefined {
  try {
    return fs.readFileSync(file);
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code === 'ENOENT') return undefined;
    throw e;
  }
}

function readRequired(file: string): Buffer {
  try {
    return fs.readFileSync(file);
  } catch (e) {
    throw new BlockError('EINVAL', `Unable to access credentials ${file}: ${(e as Error).message}`, { cause: e });
  }
}

/** The key for `username` in a PSK keys file (`username:hexkey` per line). */
export function pskKey(file: string, username: string): Buffer {
  const lines = readRequired(file).toString('utf8').split('\n');
  for (const line of lines) {
    const colon = line.indexOf(':');
    if (colon > 0 && line.slice(0, colon) === username) return Buffer.from(line.slice(colon + 1).trim(), 'hex');
  }
  throw new BlockError('EINVAL', `Key for username ${username} not found in ${file}`);
}

function x509Options(dir: string | undefined): ConnectionOptions {
  if (dir === undefined) return {};
  const ca = readRequired(path.join(dir, 'ca-cert.pem'));
  const cert = readOptional(path.join(dir, 'client-cert.pem'));
  const key = readOptional(path.join(dir, 'client-key.pem'));
  return { ca, ...(cert && key ? { cert, key } : {}) };
}

function pskOptions(file: string, username: string): ConnectionOptions {
  const psk = pskKey(file, username);
  return {
    ciphers: PSK_CIPHERS,
    maxVersion: 'TLSv1.2',
    pskCallback: () => ({ identity: username, psk }),
    checkServerIdentity: () => undefined,
  };
}

/** A STARTTLS upgrade with the given node:tls options. */
export function tlsUpgrade(options: ConnectionOptions): ClientTlsUpgrade {
  return {
    // node:tls is loaded on first use: the tools start faster when no TLS is involved.
    upgrade: (socket: Duplex) => {
      const tls = nodeTls();
      return new Promise((resolve, reject) => {
        const secure = tls.connect({ ...options, socket: socket as never, minVersion: 'TLSv1.2' });
        const onError = (e: Error) => {
          secure.destroy();
          reject(new BlockError('EIO', e.message, { cause: e }));
        };
        secure.once('error', onError);
        secure.once('secureConnect', () => {
          secure.off('error', onError);
          resolve(secure);
        });
      });
    },
  };
}

/** A user-created object, as `--object` gave it (QOM type, id and properties). */
export interface TlsCredsObject {
  qomType: string;
  id: string;
  props: Record<string, unknown>;
}

/**
 * QEMU's tls-creds objects on the client side (tls-objects.ts builds them:
 * x509 `dir` with ca-cert.pem and optionally client-cert.pem/client-key.pem,
 * PSK `dir` with keys.psk and `username`, anon); the server is checked
 * against `tls-hostname`, else the TCP host. Messages are nbd_get_tls_creds'.
 */
export function tlsFromCreds(id: string, obj: TlsCredsObject | undefined, config: ClientTlsConfig): ClientTlsUpgrade {
  const lookup = (wanted: string) => (wanted === id && obj ? (isTlsObjectType(obj.qomType) ? createTlsObject(obj) : obj) : undefined);
  const creds = resolveTlsCreds(lookup, id, 'client');
  return clientTls(creds, config.tlsHostname ?? (config.address.type === 'inet' ? config.address.host : undefined));
}

/** How the server is named for certificate checks: the host of a TCP address, or `tls-hostname`. */
function identityOptions(config: ClientTlsConfig): ConnectionOptions {
  const host = config.tlsHostname ?? (config.address.type === 'inet' ? config.address.host : undefined);
  if (host === undefined) return { checkServerIdentity: () => undefined };
  return /^[0-9.:]+$/.test(host) ? { host } : { servername: host };
}

/** The TLS upgrade a configuration asks for, or undefined for plain NBD. */
export function clientTlsFor(
  config: ClientTlsConfig,
  objects: ReadonlyMap<string, TlsCredsObject> = new Map(),
): ClientTlsUpgrade | undefined {
  if (config.tlsCreds !== undefined) return tlsFromCreds(config.tlsCreds, objects.get(config.tlsCreds), config);
  const t = config.uriTls;
  if (!t) return undefined;
  if (t.pskFile !== undefined) return tlsUpgrade(pskOptions(t.pskFile, t.username ?? os.userInfo().username));
  return tlsUpgrade({ ...identityOptions(config), ...x509Options(t.certificatesDir) });
}
