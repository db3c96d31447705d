/*
 * From credentials to node:tls options, shared by both ends of the NBD
 * STARTTLS upgrade, and QEMU's wording for certificate checks.
 *
 *   x509  certificate + key (server; client when it has both), the CA
 *         list, the CRL (server), DH parameters; node never rejects a
 *         peer itself (rejectUnauthorized off, no identity callback):
 *         QEMU's checks run after the handshake, with its messages
 *         (tls-server.ts, tls-client.ts).
 *   psk   PSK cipher suites for TLS 1.2 plus TLS 1.3's external PSK, which
 *         GnuTLS (qemu, libnbd) and OpenSSL negotiate together with a
 *         SHA-256 suite; the key callback is the caller's.
 *   anon  anonymous DH suites (QEMU's +ANON-DH), TLS 1.2 at most (TLS
 *         1.3 has none), which OpenSSL only allows at security level 0.
 *
 * Versions come from the priority string (tls-priority.ts); TLS 1.2 is
 * the floor either way. As in QEMU, a bad priority string is found when a
 * session starts: each connection fails with its message, not the
 * creation of the credentials or of the server.
 */
import type tls from 'node:tls';
import { BlockError } from '../block/errors.js';
import { AnonCreds, PskCreds, X509Creds, type TlsCreds } from './tls-creds.js';
import { priorityVersions } from './tls-priority.js';

/** QEMU's additions to the priority of PSK and anon sessions (crypto/tlssession.c). */
const PRIORITY_ADDITIONAL: Record<string, string> = {
  'tls-creds-psk': '+ECDHE-PSK:+DHE-PSK:+PSK',
  'tls-creds-anon': '+ANON-DH',
};
const PSK_CIPHERS = 'ECDHEPSK:DHEPSK:PSK';
const ANON_CIPHERS = 'ADH:@SECLEVEL=0';

/** The node:tls options for `creds` as `side` of the connection; throws QEMU's priority error. */
export function contextOptions(creds: TlsCreds, side: 'server' | 'client'): tls.SecureContextOptions & tls.CommonConnectionOptions {
  const versions = priorityVersions(creds.priority);
  if (!versions.ok) throw priorityError(creds, versions.reason);
  const base = { minVersion: versions.minVersion, maxVersion: versions.maxVersion, rejectUnauthorized: false };
  if (creds instanceof X509Creds) {
    const own = creds.cert && creds.key ? { cert: creds.cert, key: creds.key, passphrase: creds.passphrase } : {};
    return { ...base, ...own, ca: creds.ca, ...(creds.crl ? { crl: creds.crl } : {}), ...(side === 'server' ? { dhparam: creds.dhparam } : {}) };
  }
  if (creds instanceof PskCreds) {
    return { ...base, ciphers: PSK_CIPHERS, ...(side === 'server' ? { dhparam: creds.dhparam } : {}) };
  }
  if (creds instanceof AnonCreds) {
    if (versions.minVersion === 'TLSv1.3') throw priorityError(creds, 'No or insufficient priorities were set.');
    return { ...base, maxVersion: 'TLSv1.2', ciphers: ANON_CIPHERS, ...(side === 'server' ? { dhparam: creds.dhparam } : {}) };
  }
  throw new BlockError('EINVAL', `Unsupported TLS credentials type ${creds.qomType}`);
}

function priorityError(creds: TlsCreds, reason: string): BlockError {
  const extra = PRIORITY_ADDITIONAL[creds.qomType];
  if (extra === undefined) return new BlockError('EINVAL', `Cannot set default TLS session priority ${creds.priority ?? 'NORMAL'}: ${reason}`);
  return new BlockError('EINVAL', `Unable to set TLS session priority ${creds.priority ?? 'NORMAL'}:${extra}: ${reason}`);
}

/** OpenSSL verification results (node's authorizationError codes) QEMU words specially. */
const UNKNOWN_ISSUER = new Set([
  'UNABLE_TO_GET_ISSUER_CERT',
  'UNABLE_TO_GET_ISSUER_CERT_LOCALLY',
  'UNABLE_TO_VERIFY_LEAF_SIGNATURE',
  'SELF_SIGNED_CERT_IN_CHAIN',
  'DEPTH_ZERO_SELF_SIGNED_CERT',
]);
const INSECURE = new Set(['CA_MD_TOO_WEAK', 'EE_KEY_TOO_SMALL', 'CA_KEY_TOO_SMALL']);

/** The reason QEMU gives for a failed gnutls_certificate_verify_peers2 status. */
export function verifyFailureReason(code: string): string {
  if (code === 'CERT_REVOKED') return 'The certificate has been revoked';
  if (UNKNOWN_ISSUER.has(code)) return "The certificate hasn't got a known issuer";
  if (INSECURE.has(code)) return 'The certificate uses an insecure algorithm';
  return 'The certificate is not trusted';
}

/** The error an upgrade fails with: the connection is refused for the reason given. */
export function tlsRefused(message: string, cause?: unknown): BlockError {
  return new BlockError('EACCES', message, cause === undefined ? undefined : { cause });
}
