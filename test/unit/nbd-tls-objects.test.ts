/*
 * TLS objects from plain data: credentials loading and QEMU's messages
 * for every way a directory or a property can be wrong (texts checked
 * against qemu-nbd 7.2), authz objects (simple, list with globs, list
 * file with refresh), lookups by id, GnuTLS priority strings, and the
 * certificate DN in GnuTLS's format — compared with the installed GnuTLS
 * itself (python ctypes) when it is there, and with its recorded answers
 * otherwise.
 */
import { execFileSync, spawnSync } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { beforeAll, describe, expect, it } from 'vitest';
import { AuthzListFile, createAuthz, globMatch } from '../../nbd/tls-authz.js';
import { createTlsCreds, PskCreds, X509Creds } from '../../nbd/tls-creds.js';
import { readCertificate } from '../../nbd/tls-der.js';
import { formatDn } from '../../nbd/tls-dn.js';
import { instantiateTlsObjects, resolveAuthz, resolveTlsCreds } from '../../nbd/tls-objects.js';
import { priorityVersions } from '../../nbd/tls-priority.js';
import { pemBlocks } from '../../nbd/tls-x509-check.js';
import { CLIENT_DN, issueCert, makeCa, makeTestPki, PSK_KEY_HEX, PSK_USER, type TestPki } from '../helpers/tls-certs.js';
import { scratchDir } from '../helpers/tmp.js';

const dir = scratchDir('qbt-nbd-tls-objects-');
let pki: TestPki;

beforeAll(() => {
  pki = makeTestPki(path.join(dir, 'pki'));
});

const x509 = (props: Record<string, unknown>) => createTlsCreds({ qomType: 'tls-creds-x509', id: 'tls0', props });
const psk = (props: Record<string, unknown>) => createTlsCreds({ qomType: 'tls-creds-psk', id: 'tls0', props });

/** A copy of a PKI directory with some files replaced or removed. */
function variant(from: string, name: string, changes: Record<string, string | null>): string {
  const to = path.join(dir, name);
  fs.mkdirSync(to, { recursive: true });
  for (const f of fs.readdirSync(from)) fs.copyFileSync(path.join(from, f), path.join(to, f));
  for (const [f, content] of Object.entries(changes)) {
    if (content === null) fs.rmSync(path.join(to, f));
    else fs.writeFileSync(path.join(to, f), content);
  }
  return to;
}

describe('tls-creds-x509', () => {
  it('loads server and client directories', () => {
    const server = x509({ endpoint: 'server', dir: pki.serverDir });
    expect(server).toBeInstanceOf(X509Creds);
    expect(server.endpoint).toBe('server');
    expect(server.verifyPeer).toBe(true);
    const client = x509({ dir: pki.clientDir, 'verify-peer': 'off' }) as X509Creds;
    expect(client.endpoint).toBe('client');
    expect(client.verifyPeer).toBe(false);
    expect(client.cert).toBeDefined();
    expect((x509({ dir: pki.caOnlyDir }) as X509Creds).cert).toBeUndefined();
  });

  it("gives QEMU's messages for missing files and bad properties", () => {
    const empty = path.join(dir, 'empty');
    fs.mkdirSync(empty, { recursive: true });
    expect(() => x509({ endpoint: 'server', dir: '/nonexist' })).toThrow('Unable to access credentials /nonexist/ca-cert.pem: No such file or directory');
    expect(() => x509({ endpoint: 'server', dir: empty })).toThrow(`Unable to access credentials ${empty}/ca-cert.pem: No such file or directory`);
    expect(() => x509({ endpoint: 'server' })).toThrow("Missing 'dir' property value");
    expect(() => x509({ endpoint: 'server', dir: pki.caOnlyDir })).toThrow(`Unable to access credentials ${pki.caOnlyDir}/server-cert.pem: No such file or directory`);
    expect(() => x509({ endpoint: 'bogus', dir: empty })).toThrow("Parameter 'endpoint' does not accept value 'bogus'");
    expect(() => x509({ endpoint: 'server', dir: empty, 'verify-peer': 'ON' })).toThrow("Parameter 'verify-peer' expects 'on' or 'off'");
    expect(() => x509({ endpoint: 'server', dir: empty, bogus: '1' })).toThrow("Parameter 'bogus' is unexpected");
    for (const yes of ['on', 'yes', 'true', 'y', true]) expect(x509({ dir: pki.clientDir, 'verify-peer': yes }).verifyPeer).toBe(true);
  });

  it("runs QEMU's sanity checks (and skips them with sanity-check=off)", () => {
    const garbageCert = variant(pki.serverDir, 'garbage-cert', { 'server-cert.pem': 'garbage\n' });
    expect(() => x509({ endpoint: 'server', dir: garbageCert })).toThrow(`Unable to import server certificate ${garbageCert}/server-cert.pem: Base64 unexpected header error.`);
    expect(() => x509({ endpoint: 'server', dir: garbageCert, 'sanity-check': 'off' })).toThrow(
      `Cannot load certificate '${garbageCert}/server-cert.pem' & key '${garbageCert}/server-key.pem': Base64 decoding error.`,
    );
    const garbageCa = variant(pki.serverDir, 'garbage-ca', { 'ca-cert.pem': 'garbage\n' });
    expect(() => x509({ endpoint: 'server', dir: garbageCa })).toThrow(`Unable to import CA certificate list ${garbageCa}/ca-cert.pem`);
    expect(x509({ endpoint: 'server', dir: garbageCa, 'sanity-check': 'off' })).toBeInstanceOf(X509Creds);
    const clientKey = fs.readFileSync(path.join(pki.clientDir, 'client-key.pem'), 'utf8');
    const mismatch = variant(pki.serverDir, 'mismatch', { 'server-key.pem': clientKey });
    expect(() => x509({ endpoint: 'server', dir: mismatch })).toThrow(
      `Cannot load certificate '${mismatch}/server-cert.pem' & key '${mismatch}/server-key.pem': The certificate and the given key do not match.`,
    );
    const foreign = variant(pki.rogueDir, 'foreign', {});
    expect(() => x509({ dir: foreign })).toThrow(
      `Our own certificate ${foreign}/client-cert.pem failed validation against ${foreign}/ca-cert.pem: The certificate hasn't got a known issuer`,
    );
    const caAsCert = variant(pki.serverDir, 'ca-as-cert', { 'server-cert.pem': fs.readFileSync(path.join(pki.serverDir, 'ca-cert.pem'), 'utf8') });
    expect(() => x509({ endpoint: 'server', dir: caAsCert })).toThrow(`The certificate ${caAsCert}/server-cert.pem basic constraints show a CA, but we need one for a server`);
    const crl = variant(pki.serverDir, 'bad-crl', { 'ca-crl.pem': 'garbage\n' });
    expect(() => x509({ endpoint: 'server', dir: crl })).toThrow(`Cannot load CRL '${crl}/ca-crl.pem': Base64 decoding error.`);
    const dh = variant(pki.serverDir, 'bad-dh', { 'dh-params.pem': 'garbage\n' });
    expect(() => x509({ endpoint: 'server', dir: dh })).toThrow(`Unable to load DH parameters from ${dh}/dh-params.pem: Base64 unexpected header error.`);
  });

  it('checks validity periods, CA constraints, key usage and purpose', () => {
    const now = Date.now();
    const year = 365 * 86400_000;
    const at = (nowMs: number) => () => createTlsCreds({ qomType: 'tls-creds-x509', id: 't', props: { endpoint: 'server', dir: pki.serverDir } }, { nowMs });
    expect(at(now + 20 * year)).toThrow(`The server certificate ${pki.serverDir}/server-cert.pem has expired`);
    expect(at(now - year)).toThrow(`The server certificate ${pki.serverDir}/server-cert.pem is not yet active`);
    // A CA without basicConstraints; server certificates with a critical client-only purpose or key usage.
    const ext = path.join(dir, 'odd.cnf');
    fs.writeFileSync(
      ext,
      '[ca]\nkeyUsage=critical,keyCertSign\n[purpose]\nextendedKeyUsage=critical,clientAuth\n[usage]\nkeyUsage=critical,digitalSignature\n',
    );
    makeCa(path.join(dir, 'no-bc-ca'), 'No BC CA', ext);
    const noBc = variant(pki.serverDir, 'no-bc', { 'ca-cert.pem': fs.readFileSync(path.join(dir, 'no-bc-ca', 'ca-cert.pem'), 'utf8') });
    expect(() => x509({ endpoint: 'server', dir: noBc })).toThrow(`The certificate ${noBc}/ca-cert.pem is missing basic constraints for a CA`);
    const caDir = path.join(pki.root, 'ca');
    issueCert(path.join(dir, 'purpose'), 'server', 'CN=localhost', 'purpose', caDir, ext);
    expect(() => x509({ endpoint: 'server', dir: path.join(dir, 'purpose') })).toThrow(
      `Certificate ${dir}/purpose/server-cert.pem purpose does not allow use with a TLS server`,
    );
    issueCert(path.join(dir, 'usage'), 'server', 'CN=localhost', 'usage', caDir, ext);
    expect(() => x509({ endpoint: 'server', dir: path.join(dir, 'usage') })).toThrow(`Certificate ${dir}/usage/server-cert.pem usage does not permit key encipherment`);
  });

  it('looks up a passwordid secret for an encrypted key', () => {
    const enc = variant(pki.clientDir, 'encrypted', {});
    execFileSync('openssl', ['pkcs8', '-topk8', '-in', 'client-key.pem', '-out', 'enc-key.pem', '-passout', 'pass:s3cret'], { cwd: enc });
    fs.renameSync(path.join(enc, 'enc-key.pem'), path.join(enc, 'client-key.pem'));
    const spec = { qomType: 'tls-creds-x509', id: 't', props: { dir: enc, passwordid: 'sec0' } };
    expect(() => createTlsCreds(spec)).toThrow("No secret with id 'sec0'");
    expect(() => createTlsCreds({ ...spec, props: { dir: enc } })).toThrow(`Cannot load certificate '${enc}/client-cert.pem' & key '${enc}/client-key.pem': Decryption has failed.`);
    expect(() => createTlsCreds(spec, { secret: () => 'wrong' })).toThrow(`Cannot load certificate '${enc}/client-cert.pem' & key '${enc}/client-key.pem': Decryption has failed.`);
    expect((createTlsCreds(spec, { secret: () => 's3cret' }) as X509Creds).passphrase).toBe('s3cret');
  });
});

describe('tls-creds-psk and anon', () => {
  it('reads keys.psk as QEMU does', () => {
    const client = psk({ dir: pki.pskDir, username: PSK_USER }) as PskCreds;
    expect(client.clientKey!.toString('hex')).toBe(PSK_KEY_HEX);
    const server = psk({ endpoint: 'server', dir: pki.pskDir }) as PskCreds;
    expect(server.serverKey(PSK_USER)!.toString('hex')).toBe(PSK_KEY_HEX);
    expect(server.serverKey('mallory')).toBeNull();
    expect(() => psk({ dir: pki.pskDir, username: 'bob' })).toThrow(`Username bob not found in PSK file ${pki.pskDir}/keys.psk`);
    expect(() => psk({ dir: pki.pskDir })).toThrow(`Username qemu not found in PSK file ${pki.pskDir}/keys.psk`);
    expect(() => psk({ endpoint: 'server', dir: pki.pskDir, username: 'x' })).toThrow('username should not be set when endpoint=server');
    expect(() => psk({ endpoint: 'server', dir: pki.serverDir })).toThrow(`Unable to access credentials ${pki.serverDir}/keys.psk: No such file or directory`);
  });

  it('re-reads the server keys file at each lookup', () => {
    const d = variant(pki.pskDir, 'psk-edit', {});
    const server = psk({ endpoint: 'server', dir: d }) as PskCreds;
    expect(server.serverKey('bob')).toBeNull();
    fs.appendFileSync(path.join(d, 'keys.psk'), 'bob:00ff\n');
    expect(server.serverKey('bob')!.toString('hex')).toBe('00ff');
  });

  it('creates anonymous credentials without a directory', () => {
    expect(createTlsCreds({ qomType: 'tls-creds-anon', id: 'a', props: { endpoint: 'server' } }).qomType).toBe('tls-creds-anon');
    expect(() => createTlsCreds({ qomType: 'tls-creds-anon', id: 'a', props: { username: 'x' } })).toThrow("Parameter 'username' is unexpected");
  });
});

describe('authz objects', () => {
  it('authz-simple allows exactly its identity', () => {
    const a = createAuthz({ qomType: 'authz-simple', id: 'a', props: { identity: CLIENT_DN } });
    expect(a.isAllowed(CLIENT_DN)).toBe(true);
    expect(a.isAllowed(CLIENT_DN + ' ')).toBe(false);
    expect(() => createAuthz({ qomType: 'authz-simple', id: 'a', props: {} })).toThrow("Parameter 'identity' is missing");
  });

  it('authz-list: first matching rule decides, else the policy; globs as GLib', () => {
    const rules = [
      { match: 'C=GB,O=Example,CN=intruder.example.com', policy: 'deny' },
      { match: 'C=GB,O=Example,CN=*.example.com', policy: 'allow', format: 'glob' },
    ];
    const a = createAuthz({ qomType: 'authz-list', id: 'a', props: { rules } });
    expect(a.isAllowed(CLIENT_DN)).toBe(true);
    expect(a.isAllowed('C=GB,O=Example,CN=intruder.example.com')).toBe(false);
    expect(a.isAllowed('C=FR,O=Example,CN=client.example.com')).toBe(false);
    const open = createAuthz({ qomType: 'authz-list', id: 'a', props: { policy: 'allow', rules: [{ match: 'x', policy: 'deny' }] } });
    expect(open.isAllowed('anyone')).toBe(true);
    expect(open.isAllowed('x')).toBe(false);
    expect(() => createAuthz({ qomType: 'authz-list', id: 'a', props: { policy: 'maybe' } })).toThrow("Parameter 'policy' does not accept value 'maybe'");
    expect(() => createAuthz({ qomType: 'authz-list', id: 'a', props: { rules: [{ match: 'x' }] } })).toThrow("Parameter 'rules.0.policy' is missing");
    expect(() => createAuthz({ qomType: 'authz-list', id: 'a', props: { rules: [{ policy: 'allow' }] } })).toThrow("Parameter 'rules.0.match' is missing");
  });

  it('globMatch follows g_pattern_match_simple', () => {
    expect(globMatch('*', '')).toBe(true);
    expect(globMatch('a*c', 'abbbc')).toBe(true);
    expect(globMatch('a?c', 'ac')).toBe(false);
    expect(globMatch('a?c', 'aëc')).toBe(true);
    expect(globMatch('*.example.com', 'CN=x.example.com')).toBe(true);
    expect(globMatch('a*b*c', 'aXbYbZc')).toBe(true);
    expect(globMatch('a*b*c', 'aXbYbZ')).toBe(false);
    expect(globMatch('\\*', '\\x')).toBe(true);
  });

  it('authz-list-file loads JSON and refreshes when the file changes', () => {
    const file = path.join(dir, 'authz.json');
    fs.writeFileSync(file, JSON.stringify({ policy: 'deny', rules: [{ match: CLIENT_DN, policy: 'allow' }] }));
    const a = createAuthz({ qomType: 'authz-list-file', id: 'f', props: { filename: file } }) as AuthzListFile;
    expect(a.isAllowed(CLIENT_DN)).toBe(true);
    fs.writeFileSync(file, JSON.stringify({ policy: 'deny', rules: [] }) + '\n');
    expect(a.isAllowed(CLIENT_DN)).toBe(false);
    fs.writeFileSync(file, '{ broken');
    expect(a.isAllowed(CLIENT_DN)).toBe(false);
    expect(a.reloadError).toMatch(/^JSON parse error/);
    fs.writeFileSync(file, JSON.stringify({ policy: 'allow' }));
    expect(a.isAllowed('anyone')).toBe(true);
    const fixed = createAuthz({ qomType: 'authz-list-file', id: 'g', props: { filename: file, refresh: 'off' } });
    fs.writeFileSync(file, JSON.stringify({ policy: 'deny' }) + '   ');
    expect(fixed.isAllowed('anyone')).toBe(true);
  });

  it("authz-list-file gives QEMU's messages", () => {
    const mk = (props: Record<string, unknown>) => () => createAuthz({ qomType: 'authz-list-file', id: 'f', props });
    expect(mk({})).toThrow("Parameter 'filename' is missing");
    expect(mk({ filename: '/nonexist.json' })).toThrow("Unable to read '/nonexist.json': Failed to open file “/nonexist.json”: No such file or directory");
    const arr = path.join(dir, 'arr.json');
    fs.writeFileSync(arr, '[1]');
    expect(mk({ filename: arr })).toThrow(`File '${arr}' must contain a JSON object`);
    const bad = path.join(dir, 'bad-rule.json');
    fs.writeFileSync(bad, JSON.stringify({ rules: [{ match: 'x', policy: 'allow', format: 'regex' }] }));
    expect(mk({ filename: bad })).toThrow("Parameter 'rules[0].format' does not accept value 'regex'");
    const cwd = process.cwd();
    process.chdir(dir);
    try {
      fs.writeFileSync('relative.json', '{}');
      expect(mk({ filename: 'relative.json' })).toThrow('Filename must be an absolute path');
      expect(mk({ filename: 'relative.json', refresh: false })()).toBeInstanceOf(AuthzListFile);
    } finally {
      process.chdir(cwd);
    }
  });
});

describe('object lookup', () => {
  it("resolves credentials and authz by id with QEMU's messages", () => {
    const objects = instantiateTlsObjects([
      { qomType: 'tls-creds-x509', id: 'tls0', props: { endpoint: 'server', dir: pki.serverDir } },
      { qomType: 'authz-simple', id: 'auth0', props: { identity: CLIENT_DN } },
      { qomType: 'secret', id: 'sec0', props: { data: 'x' } },
    ]);
    expect(resolveTlsCreds(objects, 'tls0', 'server').qomType).toBe('tls-creds-x509');
    expect(() => resolveTlsCreds(objects, 'tls0', 'client')).toThrow('Expected TLS credentials for a client endpoint');
    expect(() => resolveTlsCreds(objects, 'nope', 'server')).toThrow("No TLS credentials with id 'nope'");
    expect(() => resolveTlsCreds(objects, 'auth0', 'server')).toThrow("Object with id 'auth0' is not TLS credentials");
    expect(resolveAuthz(objects, 'auth0').isAllowed(CLIENT_DN)).toBe(true);
    expect(() => resolveAuthz(objects, 'nosuch')).toThrow('Cannot find QAuthZ object ID nosuch');
    expect(() => resolveAuthz(objects, 'sec0')).toThrow("Object 'sec0' is not a QAuthZ subclass");
  });
});

describe('priority strings', () => {
  it('honours version tokens and rejects unknown keywords', () => {
    expect(priorityVersions(undefined)).toEqual({ ok: true, minVersion: 'TLSv1.2', maxVersion: 'TLSv1.3' });
    expect(priorityVersions('NORMAL:-VERS-TLS1.3')).toEqual({ ok: true, minVersion: 'TLSv1.2', maxVersion: 'TLSv1.2' });
    expect(priorityVersions('NORMAL:-VERS-ALL:+VERS-TLS1.3')).toEqual({ ok: true, minVersion: 'TLSv1.3', maxVersion: 'TLSv1.3' });
    expect(priorityVersions('@SYSTEM:!VERS-TLS1.2')).toEqual({ ok: true, minVersion: 'TLSv1.3', maxVersion: 'TLSv1.3' });
    expect(priorityVersions('NONE:+VERS-TLS1.2:+AES-128-GCM')).toEqual({ ok: true, minVersion: 'TLSv1.2', maxVersion: 'TLSv1.2' });
    expect(priorityVersions('BOGUS')).toEqual({ ok: false, reason: 'The request is invalid.' });
    expect(priorityVersions('NORMAL:-VERS-TLS1.2:-VERS-TLS1.3')).toEqual({ ok: false, reason: 'No or insufficient priorities were set.' });
  });
});

// ---------------------------------------------------------------- DN format

/** Subjects with GnuTLS 3.7.9's answers (recorded from gnutls_x509_crt_get_dn). */
const DN_CASES: Array<{ args: string[]; dn: string; config?: string }> = [
  { args: ['-subj', `/${CLIENT_DN.split(',').join('/')}`], dn: CLIENT_DN },
  {
    args: ['-subj', '/C=GB/O=Acme, Inc./OU=R\\+D/CN=#hash "q" <x>;/emailAddress=a@b.c/DC=example/DC=com'],
    dn: 'C=GB,O=Acme\\, Inc.,OU=R\\+D,CN=\\#hash \\"q\\" \\<x\\>\\;,EMAIL=a@b.c,DC=example,DC=com',
  },
  { args: ['-multivalue-rdn', '-subj', '/CN=multi+UID=u1/O=Example'], dn: 'CN=multi+UID=u1,O=Example' },
  {
    args: ['-subj', '/houseIdentifier=H1/unstructuredName=un/CN=x/serialNumber=1234/title=Dr/street=Main St/L=Town/ST=State/GN=Given/SN=Sur/initials=I/pseudonym=P/postalCode=123'],
    dn: '2.5.4.51=#0c024831,1.2.840.113549.1.9.2=#0c02756e,CN=x,serialNumber=1234,title=Dr,street=Main St,L=Town,ST=State,givenName=Given,surName=Sur,initials=I,pseudonym=P,postalCode=123',
  },
  { args: ['-utf8', '-subj', '/CN=Zoë Ünicode/O=日本'], dn: 'CN=Zoë Ünicode,O=日本' },
  { args: ['-subj', '/CN= lead/O=trail /OU=a\\\\b'], dn: 'CN=\\ lead,O=trail\\ ,OU=a\\\\b' },
  { args: ['-utf8', '-subj', '/CN=Zoë Ünicode/O=日本/C=GB'], dn: 'CN=Zoë Ünicode,O=日本,C=GB', config: 'string_mask=pkix' },
  { args: ['-utf8', '-subj', '/CN=Zoë/O=plain'], dn: 'CN=\\#5a6feb,O=plain', config: 'string_mask=default' },
];

/** gnutls_x509_crt_get_dn through python ctypes, or null when that is not available. */
function gnutlsDn(pemFile: string): string | null {
  const script = [
    'import ctypes, sys',
    "g = ctypes.CDLL('libgnutls.so.30')",
    'class D(ctypes.Structure): _fields_ = [("data", ctypes.c_char_p), ("size", ctypes.c_uint)]',
    "data = open(sys.argv[1], 'rb').read(); crt = ctypes.c_void_p(); g.gnutls_x509_crt_init(ctypes.byref(crt))",
    'd = D(data, len(data)); assert g.gnutls_x509_crt_import(crt, ctypes.byref(d), 1) == 0',
    'buf = ctypes.create_string_buffer(4096); n = ctypes.c_size_t(4096)',
    'assert g.gnutls_x509_crt_get_dn(crt, buf, ctypes.byref(n)) == 0',
    'sys.stdout.buffer.write(buf.raw[:n.value])',
  ].join('\n');
  const r = spawnSync('/usr/bin/python3', ['-c', script, pemFile], { encoding: 'utf8' });
  return r.status === 0 ? r.stdout : null;
}

describe('certificate DN as GnuTLS prints it', () => {
  it('formats every attribute kind, escape and string type like gnutls_x509_crt_get_dn', () => {
    const d = path.join(dir, 'dn');
    fs.mkdirSync(d, { recursive: true });
    execFileSync('openssl', ['ecparam', '-name', 'prime256v1', '-genkey', '-noout', '-out', 'k.pem'], { cwd: d });
    DN_CASES.forEach((c, i) => {
      const cnf = path.join(d, `c${i}.cnf`);
      fs.writeFileSync(cnf, `[req]\ndistinguished_name=dn\n${c.config ?? ''}\n[dn]\n`);
      const pem = path.join(d, `c${i}.pem`);
      execFileSync('openssl', ['req', '-new', '-x509', '-key', 'k.pem', '-out', pem, '-days', '10', '-config', cnf, ...c.args], { cwd: d, stdio: 'ignore' });
      const blocks = pemBlocks(fs.readFileSync(pem, 'latin1'), 'CERTIFICATE');
      if (!blocks.ok) throw new Error(blocks.reason);
      const fields = readCertificate(blocks.ders[0]!);
      if (!fields.ok) throw new Error(fields.reason);
      expect(formatDn(fields.value.subject)).toBe(c.dn);
      const oracle = gnutlsDn(pem);
      if (oracle !== null) expect(oracle).toBe(c.dn);
    });
  });

  it('never throws on malformed DER', () => {
    const der = pemBlocks(fs.readFileSync(path.join(pki.clientDir, 'client-cert.pem'), 'latin1'), 'CERTIFICATE');
    if (!der.ok) throw new Error(der.reason);
    const bytes = der.ders[0]!;
    for (let cut = 0; cut < bytes.length; cut += 7) expect(readCertificate(bytes.subarray(0, cut)).ok).toBe(false);
    const flipped = Buffer.from(bytes);
    for (let i = 0; i < flipped.length; i += 11) {
      flipped[i] ^= 0xff;
      readCertificate(flipped);
      flipped[i] ^= 0xff;
    }
    expect(readCertificate(bytes).ok).toBe(true);
  });
});
