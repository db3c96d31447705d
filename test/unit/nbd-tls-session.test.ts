/*
 * Both ends of the STARTTLS upgrade over a unix socket, without NBD
 * around them: x509 with tls-authz (allowed, denied, no certificate, a
 * foreign CA, verify-peer off), the client's server checks (host names,
 * unknown issuer), PSK (right key, wrong key, unknown identity, opt-in
 * identity authz), anonymous DH, priority strings forcing TLS 1.2, and a
 * server that already read the start of the client's handshake.
 */
import { execFileSync } from 'node:child_process';
import fs from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import type { Duplex } from 'node:stream';
import type tls from 'node:tls';
import { beforeAll, describe, expect, it } from 'vitest';
import { clientTls, clientTlsUpgrade } from '../../nbd/tls-client.js';
import { createTlsCreds, type TlsCreds } from '../../nbd/tls-creds.js';
import { instantiateTlsObjects, type ObjectLookup } from '../../nbd/tls-objects.js';
import { serverTls, type ServerTlsOptions } from '../../nbd/tls-server.js';
import { INTRUDER_DN, makeTestPki, PSK_USER, type TestPki } from '../helpers/tls-certs.js';
import { scratchDir } from '../helpers/tmp.js';

const dir = scratchDir('qbt-nbd-tls-session-');
let pki: TestPki;
let objects: ObjectLookup;

beforeAll(() => {
  pki = makeTestPki(path.join(dir, 'pki'));
  objects = instantiateTlsObjects([
    { qomType: 'authz-list', id: 'allow-client', props: { rules: [{ match: 'C=GB,O=Example,CN=client.*', policy: 'allow', format: 'glob' }] } },
    { qomType: 'authz-simple', id: 'alice-only', props: { identity: PSK_USER } },
  ]);
});

const creds = (qomType: string, props: Record<string, unknown>): TlsCreds => createTlsCreds({ qomType, id: 't', props });
const x509Server = (props: Record<string, unknown> = {}) => creds('tls-creds-x509', { endpoint: 'server', dir: pki.serverDir, ...props });
const x509Client = (d: string, props: Record<string, unknown> = {}) => creds('tls-creds-x509', { endpoint: 'client', dir: d, ...props });

type Settled = { ok: true; stream: Duplex } | { ok: false; message: string };
const settle = (p: Promise<Duplex>): Promise<Settled> =>
  p.then(
    (stream) => ({ ok: true as const, stream }),
    (e: Error) => ({ ok: false as const, message: e.message }),
  );

let sockets = 0;

/**
 * Connects a client upgrade to a server upgrade. With `serverReadsFirst`
 * the server takes the client's first bytes itself and hands them over as
 * `pending`, as the NBD server does with whatever followed STARTTLS.
 */
async function handshake(
  server: TlsCreds,
  serverOpts: ServerTlsOptions,
  client: TlsCreds,
  hostname: string | undefined,
  serverReadsFirst = false,
): Promise<{ server: Settled; client: Settled }> {
  const upgrader = serverTls(server, { objects, ...serverOpts });
  const socketPath = path.join(dir, `s${sockets++}.sock`);
  let serverSide!: Promise<Settled>;
  const accepted = new Promise<void>((resolve) => {
    const listener = net.createServer({ pauseOnConnect: true }, (socket) => {
      listener.close();
      if (!serverReadsFirst) {
        serverSide = settle(upgrader.upgrade(socket, Buffer.alloc(0)));
        return resolve();
      }
      socket.once('data', (first: Buffer) => {
        socket.pause();
        serverSide = settle(upgrader.upgrade(socket, first));
        resolve();
      });
      socket.resume();
    });
    listener.listen(socketPath);
  });
  const raw = net.connect(socketPath);
  await new Promise((r) => raw.once('connect', r));
  const clientSide = settle(clientTlsUpgrade(raw, client, hostname));
  await accepted;
  const result = { server: await serverSide, client: await clientSide };
  return result;
}

/** Sends a line each way over an established pair and closes both. */
async function exchange(a: Duplex, b: Duplex): Promise<[string, string]> {
  const read = (s: Duplex) => new Promise<string>((resolve) => s.once('data', (d: Buffer) => resolve(d.toString())));
  const [fromA, fromB] = [read(b), read(a)];
  a.write('ping');
  b.write('pong');
  const out: [string, string] = [await fromA, await fromB];
  a.destroy();
  b.destroy();
  return out;
}

function expectOk(r: Settled): Duplex {
  if (!r.ok) throw new Error(`expected success, got: ${r.message}`);
  return r.stream;
}

describe('x509', () => {
  it('an authorised client certificate connects; data flows both ways', async () => {
    for (const serverReadsFirst of [false, true]) {
      const r = await handshake(x509Server(), { authzId: 'allow-client' }, x509Client(pki.clientDir), 'localhost', serverReadsFirst);
      const s = expectOk(r.server);
      const c = expectOk(r.client);
      expect(await exchange(c, s)).toEqual(['ping', 'pong']);
    }
  });

  it('a certificate whose DN the authz object does not allow is dropped', async () => {
    const r = await handshake(x509Server(), { authzId: 'allow-client' }, x509Client(pki.intruderDir), '127.0.0.1');
    expect(r.server).toEqual({ ok: false, message: `TLS x509 authz check for ${INTRUDER_DN} is denied` });
    if (r.client.ok) r.client.stream.destroy();
  });

  it("refuses clients without a certificate or from a foreign CA, with QEMU's reasons", async () => {
    const none = await handshake(x509Server(), {}, x509Client(pki.caOnlyDir), 'localhost');
    expect(none.server).toEqual({ ok: false, message: 'Verify failed: No certificate was found.' });
    const rogue = await handshake(x509Server(), {}, x509Client(pki.rogueDir, { 'sanity-check': 'off' }), 'localhost');
    expect(rogue.server).toEqual({ ok: false, message: "The certificate hasn't got a known issuer" });
    for (const r of [none, rogue]) if (r.client.ok) r.client.stream.destroy();
  });

  it('with verify-peer off the server checks nothing, not even tls-authz (as QEMU)', async () => {
    const r = await handshake(x509Server({ 'verify-peer': 'off' }), { authzId: 'allow-client' }, x509Client(pki.rogueDir, { 'sanity-check': 'off' }), 'localhost');
    expect(await exchange(expectOk(r.client), expectOk(r.server))).toEqual(['ping', 'pong']);
  });

  it('a missing authz object refuses the client at connection time', async () => {
    const r = await handshake(x509Server(), { authzId: 'nosuch' }, x509Client(pki.clientDir), 'localhost');
    expect(r.server).toEqual({ ok: false, message: 'Cannot find QAuthZ object ID nosuch' });
    if (r.client.ok) r.client.stream.destroy();
  });

  it('the client checks the server: host name, known issuer', async () => {
    const cases: Array<[string | undefined, string | null, TlsCreds]> = [
      ['localhost', null, x509Client(pki.clientDir)],
      ['127.0.0.1', null, x509Client(pki.clientDir)],
      [undefined, 'No hostname for certificate validation', x509Client(pki.clientDir)],
      ['wrong.example.com', 'Certificate does not match the hostname wrong.example.com', x509Client(pki.clientDir)],
      [undefined, null, x509Client(pki.clientDir, { 'verify-peer': 'off' })],
    ];
    for (const [hostname, refusal, client] of cases) {
      const r = await handshake(x509Server({ 'verify-peer': 'off' }), {}, client, hostname);
      if (refusal === null) expect(await exchange(expectOk(r.client), expectOk(r.server))).toEqual(['ping', 'pong']);
      else expect(r.client).toEqual({ ok: false, message: refusal });
      if (refusal !== null && r.server.ok) r.server.stream.destroy();
    }
    const foreignCa = x509Client(path.join(pki.root, 'other-ca'), {});
    const r = await handshake(x509Server({ 'verify-peer': 'off' }), {}, foreignCa, 'localhost');
    expect(r.client).toEqual({ ok: false, message: "The certificate hasn't got a known issuer" });
    if (r.server.ok) r.server.stream.destroy();
  });

  it('priority NORMAL:-VERS-TLS1.3 negotiates TLS 1.2', async () => {
    const r = await handshake(x509Server(), { authzId: 'allow-client' }, x509Client(pki.clientDir, { priority: 'NORMAL:-VERS-TLS1.3' }), 'localhost');
    expect((expectOk(r.client) as tls.TLSSocket).getProtocol()).toBe('TLSv1.2');
    expect(await exchange(expectOk(r.client), expectOk(r.server))).toEqual(['ping', 'pong']);
  });
});

describe('PSK and anonymous', () => {
  const pskServer = () => creds('tls-creds-psk', { endpoint: 'server', dir: pki.pskDir });
  const pskClient = (d: string, props: Record<string, unknown> = {}) => creds('tls-creds-psk', { dir: d, username: PSK_USER, ...props });

  it('the right key connects over TLS 1.3 and, with the priority, TLS 1.2', async () => {
    for (const [priority, protocol] of [
      [undefined, 'TLSv1.3'],
      ['NORMAL:-VERS-TLS1.3', 'TLSv1.2'],
    ] as const) {
      const r = await handshake(pskServer(), {}, pskClient(pki.pskDir, priority ? { priority } : {}), undefined);
      expect((expectOk(r.server) as tls.TLSSocket).getProtocol()).toBe(protocol);
      expect(await exchange(expectOk(r.client), expectOk(r.server))).toEqual(['ping', 'pong']);
    }
  });

  it('a wrong key or an unknown identity fails the handshake', async () => {
    const wrong = await handshake(pskServer(), {}, pskClient(pki.pskWrongDir), undefined);
    expect(wrong.server.ok).toBe(false);
    expect(wrong.client.ok).toBe(false);
    expect(!wrong.server.ok && wrong.server.message).toMatch(/^TLS handshake failed: /);
  });

  it('tls-authz applies to PSK identities only when asked (QEMU 7.2 ignores it)', async () => {
    const ignored = await handshake(pskServer(), { authzId: 'allow-client' }, pskClient(pki.pskDir), undefined);
    expect(await exchange(expectOk(ignored.client), expectOk(ignored.server))).toEqual(['ping', 'pong']);
    const denied = await handshake(pskServer(), { authzId: 'allow-client', authorizePskIdentity: true }, pskClient(pki.pskDir), undefined);
    expect(denied.server).toEqual({ ok: false, message: `TLS PSK authz check for ${PSK_USER} is denied` });
    if (denied.client.ok) denied.client.stream.destroy();
    const allowed = await handshake(pskServer(), { authzId: 'alice-only', authorizePskIdentity: true }, pskClient(pki.pskDir), undefined);
    expect(await exchange(expectOk(allowed.client), expectOk(allowed.server))).toEqual(['ping', 'pong']);
  });

  it('anonymous credentials negotiate TLS 1.2 without certificates, with generated or given DH parameters', async () => {
    const dhDir = path.join(dir, 'dh');
    fs.mkdirSync(dhDir, { recursive: true });
    execFileSync('openssl', ['genpkey', '-genparam', '-algorithm', 'DH', '-pkeyopt', 'dh_param:ffdhe2048', '-out', path.join(dhDir, 'dh-params.pem')]);
    for (const props of [{}, { dir: dhDir }]) {
      const r = await handshake(creds('tls-creds-anon', { endpoint: 'server', ...props }), {}, creds('tls-creds-anon', {}), undefined);
      expect((expectOk(r.server) as tls.TLSSocket).getProtocol()).toBe('TLSv1.2');
      expect((expectOk(r.server) as tls.TLSSocket).getCipher().name).toMatch(/^ADH-/);
      expect(await exchange(expectOk(r.client), expectOk(r.server))).toEqual(['ping', 'pong']);
    }
  });
});

describe('API checks', () => {
  it('each end wants credentials for its endpoint', () => {
    expect(() => serverTls(x509Client(pki.clientDir))).toThrow('Expected TLS credentials for a server endpoint');
    expect(() => clientTls(x509Server())).toThrow('Expected TLS credentials for a client endpoint');
  });

  it("a bad priority string fails each session with QEMU's message", async () => {
    const r = await handshake(x509Server({ priority: 'BOGUS' }), {}, creds('tls-creds-anon', { priority: 'NORMAL' }), undefined);
    expect(r.server).toEqual({ ok: false, message: 'Cannot set default TLS session priority BOGUS: The request is invalid.' });
    const anon = await handshake(creds('tls-creds-anon', { endpoint: 'server', priority: 'BOGUS' }), {}, creds('tls-creds-anon', {}), undefined);
    expect(anon.server).toEqual({ ok: false, message: 'Unable to set TLS session priority BOGUS:+ANON-DH: The request is invalid.' });
    const psk = await handshake(creds('tls-creds-psk', { endpoint: 'server', dir: pki.pskDir }), {}, creds('tls-creds-psk', { dir: pki.pskDir, username: PSK_USER, priority: 'BOGUS' }), undefined);
    expect(psk.client).toEqual({ ok: false, message: 'Unable to set TLS session priority BOGUS:+ECDHE-PSK:+DHE-PSK:+PSK: The request is invalid.' });
    for (const x of [r.client, anon.client, psk.server]) if (x.ok) x.stream.destroy();
  });
});
