/*
 * Test PKI made with the openssl CLI: a CA, a server certificate for
 * localhost / 127.0.0.1, client certificates with known distinguished
 * names, one from a foreign CA, and PSK keys files — laid out as QEMU's
 * tls-creds-x509 / tls-creds-psk directories (which libnbd's
 * tls-certificates= and tls-psk-file= read too).
 *
 *   server/    ca-cert.pem server-cert.pem server-key.pem
 *   client/    ca-cert.pem client-cert.pem client-key.pem   (CLIENT_DN)
 *   intruder/  the same CA, another DN                       (INTRUDER_DN)
 *   rogue/     a client certificate from a CA the server does not trust
 *   ca-only/   ca-cert.pem alone (a client without a certificate)
 *   psk/       keys.psk with PSK_USER's key (server and qemu clients)
 *   psk-wrong/ keys.psk with a different key for PSK_USER
 *
 * makeServerDirWithCrl adds server-crl/, whose ca-crl.pem revokes a
 * client certificate.
 *
 * EC P-256 keys keep generation to a fraction of a second. Runs
 * synchronously: call it before starting in-process servers.
 */
import { execFileSync } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';

export const CLIENT_DN = 'C=GB,O=Example,CN=client.example.com';
export const INTRUDER_DN = 'C=GB,O=Example,CN=intruder.example.com';
export const PSK_USER = 'alice';
export const PSK_KEY_HEX = '0123456789abcdef0123456789abcdef';
const WRONG_KEY_HEX = 'fedcba9876543210fedcba9876543210';

const EXTENSIONS = `
[ca]
basicConstraints=critical,CA:TRUE
keyUsage=critical,keyCertSign,cRLSign
subjectKeyIdentifier=hash
[server]
basicConstraints=critical,CA:FALSE
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=serverAuth
subjectAltName=DNS:localhost,IP:127.0.0.1
[client]
basicConstraints=critical,CA:FALSE
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=clientAuth
`;

export interface TestPki {
  root: string;
  serverDir: string;
  clientDir: string;
  intruderDir: string;
  rogueDir: string;
  caOnlyDir: string;
  pskDir: string;
  pskWrongDir: string;
}

/** "/C=GB/O=Example/CN=x" from "C=GB,O=Example,CN=x" (certificate order). */
const subj = (dn: string) => '/' + dn.split(',').join('/');

function openssl(cwd: string, ...args: string[]): void {
  execFileSync('openssl', args, { cwd, stdio: ['ignore', 'ignore', 'pipe'] });
}

function newKey(dir: string, file: string): void {
  openssl(dir, 'ecparam', '-name', 'prime256v1', '-genkey', '-noout', '-out', file);
}

/** A self-signed CA in `dir` (ca-key.pem, ca-cert.pem). */
export function makeCa(dir: string, cn: string, extFile: string): void {
  fs.mkdirSync(dir, { recursive: true });
  newKey(dir, 'ca-key.pem');
  openssl(dir, 'req', '-new', '-x509', '-key', 'ca-key.pem', '-out', 'ca-cert.pem', '-days', '3650', '-subj', `/CN=${cn}`, '-config', extFile, '-extensions', 'ca');
}

/** `<name>-cert.pem` + `<name>-key.pem` in `dir`, signed by the CA in `caDir`, with that CA's certificate beside them. */
export function issueCert(dir: string, name: string, dn: string, section: string, caDir: string, extFile: string): void {
  fs.mkdirSync(dir, { recursive: true });
  newKey(dir, `${name}-key.pem`);
  openssl(dir, 'req', '-new', '-key', `${name}-key.pem`, '-subj', subj(dn), '-out', `${name}.csr`);
  const ca = (f: string) => path.join(caDir, f);
  openssl(dir, 'x509', '-req', '-in', `${name}.csr`, '-CA', ca('ca-cert.pem'), '-CAkey', ca('ca-key.pem'), '-set_serial', String(Date.now()), '-days', '3650', '-extfile', extFile, '-extensions', section, '-out', `${name}-cert.pem`);
  fs.rmSync(path.join(dir, `${name}.csr`));
  fs.copyFileSync(ca('ca-cert.pem'), path.join(dir, 'ca-cert.pem'));
}

/**
 * A copy of the server directory whose ca-crl.pem revokes the certificate
 * in `revokedDir` (openssl ca with a scratch database).
 */
export function makeServerDirWithCrl(pki: TestPki, revokedDir: string): string {
  const out = path.join(pki.root, 'server-crl');
  fs.cpSync(pki.serverDir, out, { recursive: true });
  const db = path.join(pki.root, 'crl-db');
  fs.mkdirSync(db, { recursive: true });
  fs.writeFileSync(path.join(db, 'index.txt'), '');
  fs.writeFileSync(path.join(db, 'crlnumber'), '01\n');
  fs.writeFileSync(path.join(db, 'ca.cnf'), '[ca]\ndefault_ca=d\n[d]\ndatabase=index.txt\ncrlnumber=crlnumber\ndefault_md=sha256\ndefault_crl_days=3650\n');
  const ca = ['-config', 'ca.cnf', '-keyfile', path.join(pki.root, 'ca/ca-key.pem'), '-cert', path.join(pki.root, 'ca/ca-cert.pem')];
  openssl(db, 'ca', ...ca, '-revoke', path.join(revokedDir, 'client-cert.pem'));
  openssl(db, 'ca', ...ca, '-gencrl', '-out', path.join(out, 'ca-crl.pem'));
  return out;
}

/** Builds the whole layout under `root`. */
export function makeTestPki(root: string): TestPki {
  fs.mkdirSync(root, { recursive: true });
  const ext = path.join(root, 'ext.cnf');
  fs.writeFileSync(ext, EXTENSIONS);
  const at = (d: string) => path.join(root, d);
  makeCa(at('ca'), 'Test CA', ext);
  makeCa(at('other-ca'), 'Other CA', ext);
  issueCert(at('server'), 'server', 'CN=localhost,O=Example,C=GB', 'server', at('ca'), ext);
  issueCert(at('client'), 'client', CLIENT_DN, 'client', at('ca'), ext);
  issueCert(at('intruder'), 'client', INTRUDER_DN, 'client', at('ca'), ext);
  issueCert(at('rogue'), 'client', 'C=GB,O=Rogue,CN=rogue.example.com', 'client', at('other-ca'), ext);
  fs.copyFileSync(path.join(at('ca'), 'ca-cert.pem'), path.join(at('rogue'), 'ca-cert.pem'));
  fs.mkdirSync(at('ca-only'));
  fs.copyFileSync(path.join(at('ca'), 'ca-cert.pem'), path.join(at('ca-only'), 'ca-cert.pem'));
  for (const [d, key] of [
    ['psk', PSK_KEY_HEX],
    ['psk-wrong', WRONG_KEY_HEX],
  ] as const) {
    fs.mkdirSync(at(d));
    fs.writeFileSync(path.join(at(d), 'keys.psk'), `${PSK_USER}:${key}\n`);
  }
  return {
    root,
    serverDir: at('server'),
    clientDir: at('client'),
    intruderDir: at('intruder'),
    rogueDir: at('rogue'),
    caOnlyDir: at('ca-only'),
    pskDir: at('psk'),
    pskWrongDir: at('psk-wrong'),
  };
}
