/*
 * QEMU's sanity checks of an x509 credentials directory
 * (qcrypto_tls_creds_x509_sanity_check), run when the object is created
 * unless `sanity-check=off`:
 *
 *   - our certificate (server-cert.pem or client-cert.pem, when readable)
 *     and every CA in ca-cert.pem: inside their validity period; basic
 *     constraints that say CA for the CAs and not for ours (a CA without
 *     the extension is refused, a leaf without it is fine); a critical
 *     keyUsage that allows certificate signing (CA) or digital signature
 *     and key encipherment (ours); a critical extKeyUsage that allows
 *     TLS server or client use as our endpoint needs;
 *   - our certificate is signed by one of the CAs.
 *
 * Each failure is one of QEMU's sentences naming the file. GnuTLS's own
 * error texts inside some of them ("Base64 unexpected header error.")
 * are reproduced for the common causes. At most MAX_CA_CERTS CAs are
 * read from ca-cert.pem, as QEMU's fixed array allows.
 */
import type crypto from 'node:crypto';
import fs from 'node:fs';
import { BlockError, toBlockError } from '../block/errors.js';
import { OID, readCertificate, type CertificateFields } from './tls-der.js';

/** QEMU's MAX_CERTS: the CA list it reads for the sanity check. */
export const MAX_CA_CERTS = 16;

/** GnuTLS's key usage bits (gnutls_x509_crt_get_key_usage). */
const KEY_DIGITAL_SIGNATURE = 0x80;
const KEY_KEY_ENCIPHERMENT = 0x20;
const KEY_CERT_SIGN = 0x04;

/** GnuTLS's texts for the PEM failures QEMU shows. */
export const GNUTLS_NO_HEADER = 'Base64 unexpected header error.';
export const GNUTLS_BASE64 = 'Base64 decoding error.';

const credsError = (message: string) => new BlockError('EINVAL', message);

/** One parsed certificate of a file. */
export interface LoadedCert {
  x509: crypto.X509Certificate;
  fields: CertificateFields;
}

/** The DER bodies of the `label` blocks of a PEM text, or GnuTLS's reason when there are none usable. */
export function pemBlocks(text: string, label: string): { ok: true; ders: Buffer[] } | { ok: false; reason: string } {
  const re = new RegExp(`-----BEGIN ${label}-----([^-]*)-----END ${label}-----`, 'g');
  const ders: Buffer[] = [];
  for (const m of text.matchAll(re)) {
    const b64 = m[1]!.replace(/\s+/g, '');
    if (!/^[A-Za-z0-9+/]*={0,2}$/.test(b64) || b64.length % 4 !== 0) return { ok: false, reason: GNUTLS_BASE64 };
    ders.push(Buffer.from(b64, 'base64'));
  }
  return ders.length > 0 ? { ok: true, ders } : { ok: false, reason: GNUTLS_NO_HEADER };
}

/** g_file_get_contents' failure text. */
export function readFailure(file: string, e: unknown): string {
  return `Failed to open file “${file}”: ${toBlockError(e).message}`;
}

function parseDer(der: Buffer): LoadedCert | string {
  const fields = readCertificate(der);
  if (!fields.ok) return `ASN1 parser: ${fields.reason}`;
  try {
    return { x509: new (process.getBuiltinModule('node:crypto').X509Certificate)(der), fields: fields.value };
  } catch (e) {
    return (e as Error).message;
  }
}

/** A certificate file's text; QEMU words a read failure the same for both kinds of file. */
function readCertFile(file: string): string {
  try {
    return fs.readFileSync(file, 'latin1');
  } catch (e) {
    throw credsError(`Cannot load CA cert list ${file}: ${readFailure(file, e)}`);
  }
}

/** qcrypto_tls_creds_load_cert: our own certificate (the first in the file). */
function loadOwnCert(file: string, isServer: boolean): LoadedCert {
  const blocks = pemBlocks(readCertFile(file), 'CERTIFICATE');
  const cert = blocks.ok ? parseDer(blocks.ders[0]!) : blocks.reason;
  if (typeof cert === 'string') throw credsError(`Unable to import ${isServer ? 'server' : 'client'} certificate ${file}: ${cert}`);
  return cert;
}

/** qcrypto_tls_creds_load_ca_cert_list. */
function loadCaList(file: string): LoadedCert[] {
  const blocks = pemBlocks(readCertFile(file), 'CERTIFICATE');
  const certs = blocks.ok ? blocks.ders.map(parseDer) : [];
  if (!blocks.ok || certs.length > MAX_CA_CERTS || certs.some((c) => typeof c === 'string')) {
    throw credsError(`Unable to import CA certificate list ${file}`);
  }
  return certs as LoadedCert[];
}

function checkTimes(f: CertificateFields, file: string, isServer: boolean, isCA: boolean, nowMs: number): void {
  const who = isCA ? 'CA' : isServer ? 'server' : 'client';
  if (f.notAfterMs < nowMs) throw credsError(`The ${who} certificate ${file} has expired`);
  if (f.notBeforeMs > nowMs) throw credsError(`The ${who} certificate ${file} is not yet active`);
}

function checkBasicConstraints(f: CertificateFields, file: string, isServer: boolean, isCA: boolean): void {
  const bc = f.basicConstraints;
  if (bc?.value.ca && !isCA) {
    throw credsError(`The certificate ${file} basic constraints show a CA, but we need one for a ${isServer ? 'server' : 'client'}`);
  }
  if (bc && !bc.value.ca && isCA) throw credsError(`The certificate ${file} basic constraints do not show a CA`);
  if (!bc && isCA) throw credsError(`The certificate ${file} is missing basic constraints for a CA`);
}

function checkKeyUsage(f: CertificateFields, file: string, isCA: boolean): void {
  const usage = f.keyUsage?.value ?? (isCA ? KEY_CERT_SIGN : KEY_DIGITAL_SIGNATURE | KEY_KEY_ENCIPHERMENT);
  if (!f.keyUsage?.critical) return;
  if (isCA && !(usage & KEY_CERT_SIGN)) throw credsError(`Certificate ${file} usage does not permit certificate signing`);
  if (isCA) return;
  if (!(usage & KEY_DIGITAL_SIGNATURE)) throw credsError(`Certificate ${file} usage does not permit digital signature`);
  if (!(usage & KEY_KEY_ENCIPHERMENT)) throw credsError(`Certificate ${file} usage does not permit key encipherment`);
}

function checkKeyPurpose(f: CertificateFields, file: string, isServer: boolean): void {
  const eku = f.extKeyUsage;
  if (!eku || !eku.critical) return;
  const any = eku.value.includes(OID.KP_ANY);
  const allowed = any || eku.value.includes(isServer ? OID.KP_SERVER_AUTH : OID.KP_CLIENT_AUTH);
  if (!allowed) throw credsError(`Certificate ${file} purpose does not allow use with a TLS ${isServer ? 'server' : 'client'}`);
}

function checkCert(c: LoadedCert, file: string, isServer: boolean, isCA: boolean, nowMs: number): void {
  checkTimes(c.fields, file, isServer, isCA, nowMs);
  checkBasicConstraints(c.fields, file, isServer, isCA);
  checkKeyUsage(c.fields, file, isCA);
  if (!isCA) checkKeyPurpose(c.fields, file, isServer);
}

/** qcrypto_tls_creds_check_cert_pair: one of the CAs must have signed our certificate. */
function checkPair(cert: LoadedCert, certFile: string, cas: LoadedCert[], caFile: string): void {
  const issuers = cas.filter((ca) => cert.x509.checkIssued(ca.x509));
  let reason: string | null = null;
  if (issuers.length === 0) reason = "The certificate hasn't got a known issuer";
  else if (!issuers.some((ca) => cert.x509.verify(ca.x509.publicKey))) reason = 'The certificate is not trusted';
  if (reason) throw credsError(`Our own certificate ${certFile} failed validation against ${caFile}: ${reason}`);
}

/** Runs QEMU's sanity check; `certFile` is undefined when the directory has none (client without a certificate). */
export function sanityCheckX509(caFile: string, certFile: string | undefined, isServer: boolean, nowMs = Date.now()): void {
  const readable = (f: string) => {
    try {
      fs.accessSync(f, fs.constants.R_OK);
      return true;
    } catch {
      return false;
    }
  };
  const cert = certFile !== undefined && readable(certFile) ? loadOwnCert(certFile, isServer) : undefined;
  const cas = readable(caFile) ? loadCaList(caFile) : [];
  if (cert) checkCert(cert, certFile!, isServer, false, nowMs);
  for (const ca of cas) checkCert(ca, caFile, isServer, true, nowMs);
  if (cert && cas.length > 0) checkPair(cert, certFile!, cas, caFile);
}
