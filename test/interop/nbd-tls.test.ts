/*
 * NBD over TLS with the real peers, our server beside qemu-nbd 7.2 on the
 * same image and credentials:
 *
 *   (a) our server (in-process NbdServer, `tls: serverTls(…)`) against
 *       nbdinfo (nbds:// with tls-certificates=DIR, nbds+unix:// with
 *       tls-psk-file and a user name), qemu-img info and qemu-io with
 *       `--object tls-creds-x509|psk,endpoint=client` — outputs compared
 *       with qemu-nbd's; a client without TLS gets the TLS-required
 *       error; a certificate whose DN is not in the tls-authz list, one
 *       from a foreign CA, none at all, and a wrong PSK key are refused,
 *       and both servers log the same sentence;
 *   (b) our client side (clientTls) inside the NBD client (nbd/client.ts)
 *       against qemu-nbd --tls-creds (x509 over TCP and unix, PSK), and
 *       refused by qemu-nbd's tls-authz when its DN is not listed.
 *
 * Peers run asynchronously: our server shares this process's event loop.
 */
import { execFileSync } from 'node:child_process';
import path from 'node:path';
import type { Duplex } from 'node:stream';
import type tls from 'node:tls';
import { afterEach, beforeAll, describe, expect, it } from 'vitest';
import { NbdClient } from '../../nbd/client.js';
import type { ClientTlsUpgrade } from '../../nbd/client-handshake.js';
import type { NbdServerTls } from '../../nbd/tls.js';
import { clientTls } from '../../nbd/tls-client.js';
import { createTlsCreds, type TlsCreds } from '../../nbd/tls-creds.js';
import { instantiateTlsObjects, resolveTlsCreds } from '../../nbd/tls-objects.js';
import { serverTls } from '../../nbd/tls-server.js';
import { serveImage, type OurServer } from '../helpers/nbd-server.js';
import { startQemuNbd, stopAllPeers, type NbdPeer } from '../helpers/nbd-peers.js';
import { missingPeers } from '../helpers/peers.js';
import { run, type RunResult } from '../helpers/run.js';
import { CLIENT_DN, INTRUDER_DN, makeServerDirWithCrl, makeTestPki, PSK_USER, type TestPki } from '../helpers/tls-certs.js';
import { scratchDir } from '../helpers/tmp.js';

const IMAGE_BYTES = 4 * 1024 * 1024;

/** Notes the TLS version an upgrade negotiated. */
function recordProtocol(stream: Duplex, into: string[]): Duplex {
  into.push((stream as tls.TLSSocket).getProtocol() ?? '?');
  return stream;
}

/** clientTls that also records the negotiated version. */
function recordingClientTls(creds: TlsCreds, hostname: string | undefined, into: string[]): ClientTlsUpgrade {
  const inner = clientTls(creds, hostname);
  return { upgrade: (s) => inner.upgrade(s).then((t) => recordProtocol(t, into)) };
}
/** tls-authz rules both servers use: the client's DN only. */
const AUTHZ_RULES = `rules.0.match=${CLIENT_DN.replaceAll(',', ',,')},rules.0.policy=allow`;

describe.skipIf(missingPeers('qemu-img', 'qemu-io', 'qemu-nbd', 'nbdinfo'))('NBD with TLS: our server and client beside qemu-nbd 7.2', () => {
  const dir = scratchDir('qbt-nbd-tls-');
  let pki: TestPki;
  const image = () => path.join(dir, 'disk.raw');

  beforeAll(() => {
    pki = makeTestPki(path.join(dir, 'pki'));
    execFileSync('qemu-img', ['create', '-q', '-f', 'raw', image(), String(IMAGE_BYTES)]);
    execFileSync('qemu-io', ['-f', 'raw', '-c', 'write -P 0x5a 0 1M', '-c', 'write -P 0xa5 2M 64k', image()]);
  });
  afterEach(() => stopAllPeers());

  /** Our server with x509 or PSK credentials and the authz list, on a unix socket and a TCP port. */
  async function ours(kind: 'x509' | 'psk'): Promise<{ server: OurServer; port: number; protocols: string[] }> {
    const objects = instantiateTlsObjects([
      kind === 'x509'
        ? { qomType: 'tls-creds-x509', id: 'tls0', props: { endpoint: 'server', dir: pki.serverDir } }
        : { qomType: 'tls-creds-psk', id: 'tls0', props: { endpoint: 'server', dir: pki.pskDir } },
      { qomType: 'authz-list', id: 'auth0', props: { rules: [{ match: CLIENT_DN, policy: 'allow' }] } },
    ]);
    const inner = serverTls(resolveTlsCreds(objects, 'tls0', 'server'), { authzId: 'auth0', objects });
    const protocols: string[] = [];
    const tls: NbdServerTls = { upgrade: (s, pending) => inner.upgrade(s, pending).then((t) => recordProtocol(t, protocols)) };
    const server = await serveImage(dir, 'disk.raw', { format: 'raw', name: 'exp', server: { tls } }, `ours-${kind}.sock`);
    const bound = await server.server.listen({ type: 'inet', host: '127.0.0.1', port: 0 });
    return { server, port: typeof bound === 'string' ? 0 : bound.port, protocols };
  }

  /** qemu-nbd with the same credentials and authz list. */
  function theirs(kind: 'x509' | 'psk', listen: { unix: string } | { tcp: true } = { unix: dir }): Promise<NbdPeer> {
    const creds =
      kind === 'x509' ? `tls-creds-x509,id=tls0,endpoint=server,dir=${pki.serverDir}` : `tls-creds-psk,id=tls0,endpoint=server,dir=${pki.pskDir}`;
    return startQemuNbd(listen, {
      image: image(),
      format: 'raw',
      readOnly: true,
      extra: ['--object', creds, '--object', `authz-list,id=auth0,${AUTHZ_RULES}`, '--tls-creds', 'tls0', '--tls-authz', 'auth0'],
    });
  }

  const mask = (r: RunResult, ...paths: string[]) => {
    const m = (t: string) => paths.reduce((acc, p) => acc.replaceAll(p, '@SOCK@'), t);
    return { stdout: m(r.stdout), stderr: m(r.stderr), code: r.code };
  };
  const x509Uri = (socket: string, certs: string) => `nbds+unix:///exp?socket=${socket}&tls-certificates=${certs}`;
  const pskUri = (socket: string, keys: string) => `nbds+unix://${PSK_USER}@/exp?socket=${socket}&tls-psk-file=${keys}`;
  /** qemu-nbd's log lines about refused clients, without its program name. */
  const refusals = (stderr: string) =>
    stderr
      .split('\n')
      .filter((l) => /authz|Verify failed|known issuer|revoked|TLS handshake/.test(l))
      .map((l) => l.replace(/^qemu-nbd: /, ''));

  it('nbdinfo over x509 (unix and TCP) and PSK prints the same from both servers', async () => {
    const { server, port, protocols } = await ours('x509');
    const peer = await theirs('x509');
    for (const args of [[], ['--json'], ['--map']]) {
      const [a, b] = await Promise.all([run('nbdinfo', [...args, x509Uri(server.socket, pki.clientDir)]), run('nbdinfo', [...args, x509Uri(peer.socket!, pki.clientDir)])]);
      expect(mask(a, server.socket), args.join(' ')).toEqual(mask(b, peer.socket!));
      expect(a.code).toBe(0);
    }
    const tcp = await run('nbdinfo', ['--size', `nbds://127.0.0.1:${port}/exp?tls-certificates=${pki.clientDir}`]);
    expect(tcp).toMatchObject({ code: 0, stdout: `${IMAGE_BYTES}\n` });
    expect(server.logs).toEqual([]);

    const psk = await ours('psk');
    const pskPeer = await theirs('psk');
    const keys = path.join(pki.pskDir, 'keys.psk');
    const [a, b] = await Promise.all([run('nbdinfo', ['--json', pskUri(psk.server.socket, keys)]), run('nbdinfo', ['--json', pskUri(pskPeer.socket!, keys)])]);
    expect(mask(a, psk.server.socket)).toEqual(mask(b, pskPeer.socket!));
    expect(a.stdout).toContain('"TLS": true');
    // libnbd (GnuTLS) and node (OpenSSL) agree on TLS 1.3, PSK included.
    expect(new Set([...protocols, ...psk.protocols])).toEqual(new Set(['TLSv1.3']));
  });

  it('qemu-img info and qemu-io through tls-creds objects read the same from both servers', async () => {
    const { server, port } = await ours('x509');
    const peer = await theirs('x509');
    const x509Client = ['--object', `tls-creds-x509,id=tls0,endpoint=client,dir=${pki.clientDir}`];
    const unixOpts = (socket: string) => `driver=nbd,server.type=unix,server.path=${socket},export=exp,tls-creds=tls0,tls-hostname=localhost`;
    const [a, b] = await Promise.all([
      run('qemu-img', ['info', ...x509Client, '--image-opts', unixOpts(server.socket)]),
      run('qemu-img', ['info', ...x509Client, '--image-opts', unixOpts(peer.socket!)]),
    ]);
    expect(mask(a, server.socket)).toEqual(mask(b, peer.socket!));
    expect(a.code).toBe(0);
    const tcpOpts = `driver=nbd,server.type=inet,server.host=127.0.0.1,server.port=${port},export=exp,tls-creds=tls0`;
    const io = await run('qemu-io', ['-r', ...x509Client, '--image-opts', tcpOpts, '-c', 'read -P 0x5a 0 1M', '-c', 'read -P 0xa5 2M 64k', '-c', 'read -P 0 3M 1M']);
    expect(io.stderr).toBe('');
    expect(io.stdout).toContain('read 65536/65536 bytes at offset 2097152');

    const psk = await ours('psk');
    const pskClient = ['--object', `tls-creds-psk,id=tls0,endpoint=client,dir=${pki.pskDir},username=${PSK_USER}`];
    const pskRead = await run('qemu-io', ['-r', ...pskClient, '--image-opts', unixOpts(psk.server.socket).replace(',tls-hostname=localhost', ''), '-c', 'read -P 0x5a 0 1M']);
    expect(pskRead).toMatchObject({ code: 0, stderr: '' });
    expect(psk.protocols).toEqual(['TLSv1.3']);
  });

  it('clients without TLS get the TLS-required error, as from qemu-nbd', async () => {
    const { server } = await ours('x509');
    const peer = await theirs('x509');
    for (const [cmd, args] of [
      ['nbdinfo', (s: string) => [`nbd+unix:///exp?socket=${s}`]],
      ['qemu-img', (s: string) => ['info', `nbd+unix:///exp?socket=${s}`]],
    ] as const) {
      const [a, b] = await Promise.all([run(cmd, args(server.socket)), run(cmd, args(peer.socket!))]);
      expect(mask(a, server.socket), cmd).toEqual(mask(b, peer.socket!));
      expect(a.code).not.toBe(0);
    }
    const qemuImg = await run('qemu-img', ['info', `nbd+unix:///exp?socket=${server.socket}`]);
    expect(qemuImg.stderr).toContain('TLS negotiation required before option 7 (go)');
  });

  it('refused clients: DN not in tls-authz, a foreign CA, no certificate, a wrong PSK key — both servers log the same', async () => {
    const { server } = await ours('x509');
    const peer = await theirs('x509');
    const attempts = [pki.intruderDir, pki.rogueDir, pki.caOnlyDir];
    for (const certs of attempts) {
      const [a, b] = await Promise.all([run('nbdinfo', [x509Uri(server.socket, certs)]), run('nbdinfo', [x509Uri(peer.socket!, certs)])]);
      expect(a.code, certs).not.toBe(0);
      expect(b.code, certs).not.toBe(0);
    }
    const logged = server.logs.filter((l) => l.startsWith('option negotiation failed: '));
    expect(logged).toEqual([
      `option negotiation failed: TLS x509 authz check for ${INTRUDER_DN} is denied`,
      // GnuTLS clients offer no certificate the server's CA list does not name.
      'option negotiation failed: Verify failed: No certificate was found.',
      'option negotiation failed: Verify failed: No certificate was found.',
    ]);
    await new Promise((r) => setTimeout(r, 200));
    expect(refusals(peer.stderr()).map((l) => 'option negotiation failed: ' + l.replace(/^option negotiation failed: /, ''))).toEqual(logged);

    const psk = await ours('psk');
    const wrong = await run('nbdinfo', [pskUri(psk.server.socket, path.join(pki.pskWrongDir, 'keys.psk'))]);
    expect(wrong.code).not.toBe(0);
    expect(psk.server.logs.join('\n')).toMatch(/option negotiation failed: TLS handshake failed: /);
  });

  it('a revoked client certificate (ca-crl.pem) is refused by both servers alike', async () => {
    const crlDir = makeServerDirWithCrl(pki, pki.intruderDir);
    const tls = serverTls(createTlsCreds({ qomType: 'tls-creds-x509', id: 'tls0', props: { endpoint: 'server', dir: crlDir } }));
    const server = await serveImage(dir, 'disk.raw', { format: 'raw', name: 'exp', server: { tls } }, 'ours-crl.sock');
    const peer = await startQemuNbd({ unix: dir }, {
      image: image(),
      format: 'raw',
      readOnly: true,
      extra: ['--object', `tls-creds-x509,id=tls0,endpoint=server,dir=${crlDir}`, '--tls-creds', 'tls0'],
    });
    for (const certs of [pki.intruderDir, pki.clientDir]) {
      const [a, b] = await Promise.all([run('nbdinfo', ['--size', x509Uri(server.socket, certs)]), run('nbdinfo', ['--size', x509Uri(peer.socket!, certs)])]);
      expect(a.code, certs).toBe(b.code);
    }
    await new Promise((r) => setTimeout(r, 200));
    expect(server.logs).toEqual(['option negotiation failed: The certificate has been revoked']);
    expect(refusals(peer.stderr())).toEqual(['option negotiation failed: The certificate has been revoked']);
  });

  it('anonymous TLS (tls-creds-anon) both ways with qemu', async () => {
    const anon = serverTls(createTlsCreds({ qomType: 'tls-creds-anon', id: 'a', props: { endpoint: 'server' } }));
    const protocols: string[] = [];
    const tls: NbdServerTls = { upgrade: (s, pending) => anon.upgrade(s, pending).then((t) => recordProtocol(t, protocols)) };
    const server = await serveImage(dir, 'disk.raw', { format: 'raw', name: 'exp', server: { tls } }, 'ours-anon.sock');
    const opts = `driver=nbd,server.type=unix,server.path=${server.socket},export=exp,tls-creds=tls0`;
    const io = await run('qemu-io', ['-r', '--object', 'tls-creds-anon,id=tls0,endpoint=client', '--image-opts', opts, '-c', 'read -P 0xa5 2M 64k']);
    expect(io).toMatchObject({ code: 0, stderr: '' });
    const peer = await startQemuNbd({ unix: dir }, {
      image: image(),
      format: 'raw',
      readOnly: true,
      extra: ['--object', 'tls-creds-anon,id=tls0,endpoint=server', '--tls-creds', 'tls0'],
    });
    const creds = createTlsCreds({ qomType: 'tls-creds-anon', id: 'a', props: {} });
    const client = await NbdClient.connect({ address: { type: 'unix', path: peer.socket! }, exportName: 'exp', tls: recordingClientTls(creds, undefined, protocols) });
    expect((await readThrough(client)).every((b) => b === 0xa5)).toBe(true);
    expect(protocols).toEqual(['TLSv1.2', 'TLSv1.2']);
  });

  // ------------------------------------------------------------ (b) our client

  const clientCreds = (props: Record<string, unknown>, qomType = 'tls-creds-x509'): TlsCreds => createTlsCreds({ qomType, id: 'tls0', props });

  async function readThrough(client: NbdClient): Promise<Buffer> {
    const buf = Buffer.alloc(64 * 1024);
    await client.read(2 * 1024 * 1024, buf);
    await client.disconnect();
    return buf;
  }

  it('our client upgrades to TLS with qemu-nbd: x509 over TCP and unix, PSK', async () => {
    const tcp = await theirs('x509', { tcp: true });
    const creds = clientCreds({ dir: pki.clientDir });
    const viaTcp = await NbdClient.connect({ address: { type: 'inet', host: '127.0.0.1', port: String(tcp.port) }, exportName: 'exp', tls: clientTls(creds, '127.0.0.1') });
    expect(viaTcp.sizeBytes).toBe(IMAGE_BYTES);
    expect((await readThrough(viaTcp)).every((b) => b === 0xa5)).toBe(true);

    const unix = await theirs('x509');
    const viaUnix = await NbdClient.connect({ address: { type: 'unix', path: unix.socket! }, exportName: 'exp', tls: clientTls(creds, 'localhost') });
    expect((await readThrough(viaUnix)).every((b) => b === 0xa5)).toBe(true);
    await expect(NbdClient.connect({ address: { type: 'unix', path: unix.socket! }, exportName: 'exp', tls: clientTls(creds) })).rejects.toThrow(
      'No hostname for certificate validation',
    );

    const pskPeer = await theirs('psk');
    const psk = clientCreds({ dir: pki.pskDir, username: PSK_USER }, 'tls-creds-psk');
    const protocols: string[] = [];
    const viaPsk = await NbdClient.connect({ address: { type: 'unix', path: pskPeer.socket! }, exportName: 'exp', tls: recordingClientTls(psk, undefined, protocols) });
    expect((await readThrough(viaPsk)).every((b) => b === 0xa5)).toBe(true);
    const psk12 = clientCreds({ dir: pki.pskDir, username: PSK_USER, priority: 'NORMAL:-VERS-TLS1.3' }, 'tls-creds-psk');
    const viaPsk12 = await NbdClient.connect({ address: { type: 'unix', path: pskPeer.socket! }, exportName: 'exp', tls: recordingClientTls(psk12, undefined, protocols) });
    expect((await readThrough(viaPsk12)).every((b) => b === 0xa5)).toBe(true);
    expect(protocols).toEqual(['TLSv1.3', 'TLSv1.2']);
  });

  it("qemu-nbd's tls-authz refuses our client when its DN is not listed", async () => {
    const peer = await theirs('x509');
    const intruder = clientCreds({ dir: pki.intruderDir });
    await expect(NbdClient.connect({ address: { type: 'unix', path: peer.socket! }, exportName: 'exp', tls: clientTls(intruder, 'localhost') })).rejects.toThrow();
    await new Promise((r) => setTimeout(r, 200));
    expect(refusals(peer.stderr())).toContain(`option negotiation failed: TLS x509 authz check for ${INTRUDER_DN} is denied`);
  });
});
