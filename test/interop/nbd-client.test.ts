/*
 * Our NBD client (the `nbd` protocol driver under qemu-img-ts and
 * qemu-io-ts) against real servers, side by side with qemu-img/qemu-io 7.2
 * on the same server:
 *
 *   - qemu-nbd (unix socket and 127.0.0.1 TCP) exporting a qcow2 image with
 *     data, zeroed and never-written areas: info (text and JSON, probed raw
 *     and -f nbd), map (human and JSON), compare, --image-opts and legacy
 *     `nbd:` names, and every error message for bad URIs, missing servers
 *     and unknown exports — stdout, stderr and status equal;
 *   - convert out of NBD: a sparse export converts to the same allocation
 *     as qemu-img's conversion (`qemu-img map` of both outputs equal);
 *   - writes, zeroes (with and without -u), discards and FUA writes by
 *     qemu-io-ts through NBD are read back by qemu-io through the server;
 *   - a read-only export refuses writing with QEMU's message;
 *   - nbdkit: the memory plugin (no block sizes, different context ids),
 *     `--no-sr` (simple replies only, no block status) and
 *     `--mask-handshake=0` (no fixed newstyle: EXPORT_NAME at once);
 *   - our client against our own server (nbd/server.ts): extended headers
 *     negotiated, 64-bit lengths and BLOCK_STATUS_EXT.
 *
 * Each server is started on a socket in a scratch directory (or a free
 * port on 127.0.0.1) and stopped by PID after its test.
 */
import { execFileSync } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { afterEach, beforeAll, describe, expect, it } from 'vitest';
import { NbdClient } from '../../nbd/client.js';
import { listExports } from '../../nbd/client-list.js';
import { startNbdkit, startQemuNbd, stopAllPeers, type NbdPeer } from '../helpers/nbd-peers.js';
import { serveImage } from '../helpers/nbd-server.js';
import { missingPeers } from '../helpers/peers.js';
import { run, runOurs, type RunResult } from '../helpers/run.js';
import { scratchDir } from '../helpers/tmp.js';

const MiB = 1 << 20;

/** qemu-io's statistics lines carry timings; keep the byte counts. */
function maskTimings(text: string): string {
  return text.replace(/^(.*, \d+ ops; )(?:\d\d\.\d\d sec|\d+:\d\d:\d\d\.\d\d) \(.*\/sec and .* ops\/sec\)$/gm, '$1TIME (RATE/sec and RATE ops/sec)');
}

const outcome = (r: RunResult) => ({ stdout: maskTimings(r.stdout), stderr: maskTimings(r.stderr), code: r.code });

async function sameAsQemu(tool: 'qemu-img' | 'qemu-io', args: string[], cwd: string): Promise<void> {
  // One after the other: qemu-nbd serves several clients, nbdkit too, but the outputs must not depend on timing.
  const theirs = outcome(await run(tool, args, { cwd }));
  const ours = outcome(await runOurs(`${tool}-ts`, args, { cwd }));
  expect(ours).toEqual(theirs);
}

describe.skipIf(missingPeers('qemu-img', 'qemu-io', 'qemu-nbd'))('NBD client against qemu-nbd', () => {
  const dir = scratchDir('qbt-nbdc-');
  const qemuImg = (...args: string[]) => execFileSync('qemu-img', args, { cwd: dir, encoding: 'utf8' });
  const qemuIo = (fmt: string, file: string, ...cmds: string[]) =>
    execFileSync('qemu-io', ['-f', fmt, ...cmds.flatMap((c) => ['-c', c]), file], { cwd: dir, encoding: 'utf8' });

  beforeAll(() => {
    qemuImg('create', '-q', '-f', 'qcow2', 'src.qcow2', '64M');
    qemuIo('qcow2', 'src.qcow2', 'write -P 0xab 1M 1M', 'write -z 8M 1M', 'write -P 0xcd 20M 64k', 'write -P 0 30M 64k');
    qemuImg('create', '-q', '-f', 'qcow2', 'sparse.qcow2', '2G');
    qemuIo('qcow2', 'sparse.qcow2', 'write -P 1 0 64k', 'write -P 2 1G 1M', 'write -z 1536M 4M', 'write -P 3 2047M 512k');
  });
  afterEach(stopAllPeers);

  const serve = (image: string, extra: Partial<Parameters<typeof startQemuNbd>[1]> = {}, tcp = false) =>
    startQemuNbd(tcp ? { tcp: true } : { unix: dir }, { image: path.join(dir, image), format: 'qcow2', ...extra });

  it('qemu-img info and map print what qemu-img prints (unix socket)', async () => {
    const peer = await serve('src.qcow2');
    const sock = peer.socket!;
    for (const args of [
      ['info', peer.uri],
      ['info', '--output=json', peer.uri],
      ['info', '-f', 'nbd', peer.uri],
      ['info', '-f', 'raw', '--output=json', peer.uri],
      ['map', peer.uri],
      ['map', '--output=json', peer.uri],
      ['map', '-f', 'nbd', '--output=json', '--start-offset=1M', '--max-length=20M', peer.uri],
      ['info', `nbd:unix:${sock}:exportname=exp`],
      ['info', '--image-opts', `driver=nbd,server.type=unix,server.path=${sock},export=exp`],
      ['map', '--output=json', '--image-opts', `driver=raw,file.driver=nbd,file.path=${sock},file.export=exp`],
      ['compare', peer.uri, 'src.qcow2', '-U'],
      ['compare', '-f', 'raw', '-F', 'raw', peer.uri, peer.uri],
    ]) {
      await sameAsQemu('qemu-img', args, dir);
    }
  });

  it('over TCP, names and output match too', async () => {
    const peer = await serve('src.qcow2', {}, true);
    for (const args of [['info', peer.uri], ['map', '--output=json', peer.uri], ['info', `nbd:127.0.0.1:${peer.port}:exportname=exp`]]) {
      await sameAsQemu('qemu-img', args, dir);
    }
    await sameAsQemu('qemu-img', ['info', '--image-opts', `driver=nbd,host=127.0.0.1,port=${peer.port},export=exp`], dir);
  });

  it('errors read as qemu-img and qemu-io write them', async () => {
    const peer = await serve('src.qcow2');
    const sock = peer.socket!;
    for (const name of [
      `nbd+unix:///nope?socket=${sock}`,
      `nbd+unix:///exp?socket=${sock}.missing`,
      `nbd+unix:///exp`,
      `nbd+unix://host/exp?socket=${sock}`,
      `nbd://`,
      `nbd:`,
      `nbd:127.0.0.1`,
      `nbd+unix:///exp?socket=${sock}&x=y`,
      `nbds+rdma://x/y`,
    ]) {
      await sameAsQemu('qemu-img', ['info', name], dir);
    }
    await sameAsQemu('qemu-io', ['-f', 'raw', '-c', 'read 0 512', `nbd+unix:///nope?socket=${sock}`], dir);
    for (const opts of ['driver=nbd', 'driver=nbd,server.type=unix', 'driver=nbd,path=/x,host=y', `driver=nbd,server.type=inet,server.host=127.0.0.1`]) {
      await sameAsQemu('qemu-img', ['info', '--image-opts', opts], dir);
    }
  });

  it('convert out of a sparse export allocates what qemu-img allocates', async () => {
    const peer = await serve('sparse.qcow2');
    for (const fmt of ['qcow2', 'raw']) {
      const theirs = await run('qemu-img', ['convert', '-O', fmt, peer.uri, `theirs.${fmt}`], { cwd: dir });
      const ours = await runOurs('qemu-img-ts', ['convert', '-O', fmt, peer.uri, `ours.${fmt}`], { cwd: dir });
      expect(outcome(ours)).toEqual(outcome(theirs));
      expect(qemuImg('map', '--output=json', '-f', fmt, `ours.${fmt}`)).toBe(qemuImg('map', '--output=json', '-f', fmt, `theirs.${fmt}`));
      expect(qemuImg('compare', '-f', fmt, '-F', fmt, `ours.${fmt}`, `theirs.${fmt}`)).toContain('Images are identical.');
    }
    // The raw output stays sparse: about what the export holds, not 2 GiB.
    expect(fs.statSync(path.join(dir, 'ours.raw')).blocks * 512).toBeLessThan(16 * MiB);
  });

  it('writes, zeroes, discards and FUA writes by qemu-io-ts are what qemu-io reads through the same server', async () => {
    qemuImg('create', '-q', '-f', 'qcow2', 'rw.qcow2', '16M');
    qemuIo('qcow2', 'rw.qcow2', 'write -P 0x77 0 16M');
    const peer = await serve('rw.qcow2', { extra: ['--discard=unmap'] });
    const writes = ['write -P 0x11 0 64k', 'write -z 64k 64k', 'write -z -u 128k 64k', 'discard 192k 64k', 'write -f -P 0x22 256k 4k', 'aio_write -P 0x33 1M 128k', 'flush'];
    for (const cmd of writes) await sameAsQemu('qemu-io', ['-f', 'raw', '-c', cmd, peer.uri], dir);
    // Both tools wrote the same things; now check the content through qemu-io.
    const check = ['read -P 0x11 0 64k', 'read -P 0 64k 128k', 'read -P 0x22 256k 4k', 'read -P 0x33 1M 128k', 'read -P 0x77 2M 1M'];
    const r = await run('qemu-io', ['-f', 'raw', ...check.flatMap((c) => ['-c', c]), peer.uri]);
    expect(r.code).toBe(0);
    expect(r.stdout).not.toContain('Pattern verification failed');
    // And ours reads what qemu-io writes.
    await run('qemu-io', ['-f', 'raw', '-c', 'write -P 0x44 5M 512k', peer.uri]);
    await sameAsQemu('qemu-io', ['-f', 'raw', '-c', 'read -P 0x44 5M 512k', '-c', 'read -v 5M 32', '-c', 'map', peer.uri], dir);
  });

  it('create and convert into an existing export behave as qemu-img (NBD cannot grow)', async () => {
    qemuImg('create', '-q', '-f', 'raw', 'target.raw', '16M');
    const peer = await serve('target.raw', { format: 'raw' });
    for (const args of [
      ['create', '-f', 'raw', peer.uri, '1G'],
      ['create', '-f', 'raw', peer.uri, '8M'],
      ['create', '-f', 'raw', '-o', 'preallocation=full', peer.uri, '8M'],
      ['create', '-f', 'raw', `nbd+unix:///nope?socket=${peer.socket}`, '1M'],
      ['resize', '-f', 'raw', peer.uri, '32M'],
      ['convert', '-n', '-f', 'qcow2', '-O', 'raw', 'src.qcow2', peer.uri],
      ['compare', '-f', 'raw', '-F', 'qcow2', peer.uri, 'src.qcow2', '-U'],
      ['create', '-f', 'qcow2', peer.uri, '8M'],
      ['info', peer.uri],
      ['check', peer.uri],
    ]) {
      await sameAsQemu('qemu-img', args, dir);
    }
  });

  it('nbds+unix with a PSK file: TLS with qemu-nbd --tls-creds', async () => {
    fs.mkdirSync(path.join(dir, 'psk'), { recursive: true });
    fs.writeFileSync(path.join(dir, 'psk/keys.psk'), `qemu:${'0123456789abcdef'.repeat(4)}\n`);
    const peer = await serve('src.qcow2', {
      extra: ['--object', `tls-creds-psk,id=tls0,endpoint=server,dir=${path.join(dir, 'psk')}`, '--tls-creds', 'tls0'],
    });
    await sameAsQemu('qemu-img', ['info', peer.uri], dir);
    const tlsUri = `nbds+unix://qemu@/exp?socket=${peer.socket}&tls-psk-file=${path.join(dir, 'psk/keys.psk')}`;
    const ours = await runOurs('qemu-img-ts', ['map', '--output=json', tlsUri], { cwd: dir });
    const theirs = await run('qemu-img', [
      'map',
      '--output=json',
      '--object',
      `tls-creds-psk,id=tls0,endpoint=client,dir=${path.join(dir, 'psk')},username=qemu`,
      '--image-opts',
      `driver=nbd,server.type=unix,server.path=${peer.socket},export=exp,tls-creds=tls0`,
    ]);
    expect(outcome(ours)).toEqual(outcome(theirs));
    const wrong = await runOurs('qemu-img-ts', ['info', tlsUri.replace('qemu@', 'nobody@')], { cwd: dir });
    expect(wrong.stderr).toContain('Key for username nobody not found');
  });

  it('a read-only export refuses writing with QEMU message, and reads work', async () => {
    const peer = await serve('src.qcow2', { readOnly: true });
    await sameAsQemu('qemu-io', ['-f', 'raw', '-c', 'write 0 512', peer.uri], dir);
    await sameAsQemu('qemu-io', ['-r', '-f', 'raw', '-c', 'read -P 0xab 1M 4k', peer.uri], dir);
    await sameAsQemu('qemu-img', ['convert', '-n', '-O', 'raw', 'src.qcow2', peer.uri], dir);
  });

  it('reconnect-delay: requests wait for a restarted server; past the delay they fail as qemu-io reports', async () => {
    qemuImg('create', '-q', '-f', 'raw', 'rc.raw', '4M');
    const restartable = () => startQemuNbd({ unix: dir, name: 'restart' }, { image: path.join(dir, 'rc.raw'), format: 'raw', exportName: 'rc' });
    let peer = await restartable();
    const opts = (delay: number) => `driver=raw,file.driver=nbd,file.path=${peer.socket},file.export=rc,file.reconnect-delay=${delay}`;
    // Timings leave both tools a second to start and connect before the server goes away.
    const cmds = ['-c', 'read 0 4k', '-c', 'sleep 3000', '-c', 'read 0 4k', '-c', 'write -P 5 0 4k'];
    const both = Promise.all([run('qemu-io', ['--image-opts', ...cmds, opts(20)]), runOurs('qemu-io-ts', ['--image-opts', ...cmds, opts(20)])]);
    await new Promise((r) => setTimeout(r, 1200));
    await peer.stop();
    await new Promise((r) => setTimeout(r, 1000));
    peer = await restartable();
    const [theirs, ours] = await both;
    expect(outcome(ours)).toEqual(outcome(theirs));
    expect(ours.stdout).toContain('wrote 4096/4096 bytes at offset 0');
    // Gone for good: a one-second delay, then EIO.
    const gone = ['-c', 'read 0 4k', '-c', 'sleep 2500', '-c', 'read 0 4k', '-c', 'read 0 4k'];
    const late = Promise.all([run('qemu-io', ['--image-opts', ...gone, opts(1)]), runOurs('qemu-io-ts', ['--image-opts', ...gone, opts(1)])]);
    await new Promise((r) => setTimeout(r, 1200));
    await peer.stop();
    const [theirsLate, oursLate] = await late;
    expect(outcome(oursLate)).toEqual(outcome(theirsLate));
    expect(oursLate.stdout).toContain('read failed: Input/output error');
  });

  it('x-dirty-bitmap reads another context as block status (qemu:dirty-bitmap:NAME, qemu:allocation-depth)', async () => {
    qemuImg('create', '-q', '-f', 'qcow2', 'bm.qcow2', '8M');
    qemuIo('qcow2', 'bm.qcow2', 'write 0 1M');
    qemuImg('bitmap', '--add', 'bm.qcow2', 'b0');
    qemuIo('qcow2', 'bm.qcow2', 'write 2M 512k', 'write -z 4M 1M');
    const peer = await serve('bm.qcow2', { extra: ['-B', 'b0', '--allocation-depth'] });
    for (const ctx of ['qemu:dirty-bitmap:b0', 'qemu:allocation-depth', 'qemu:dirty-bitmap:nope']) {
      await sameAsQemu('qemu-img', ['map', '--output=json', '--image-opts', `driver=nbd,path=${peer.socket},export=exp,x-dirty-bitmap=${ctx}`], dir);
    }
  });

  it('the library keeps many requests in flight and reads exactly the image', async () => {
    const peer = await serve('src.qcow2', { extra: ['--allocation-depth'] });
    const client = await NbdClient.connect({
      address: { type: 'unix', path: peer.socket! },
      exportName: 'exp',
      metaContexts: ['base:allocation', 'qemu:allocation-depth'],
    });
    try {
      const whole = Buffer.alloc(32 * MiB);
      const pieces = Array.from({ length: 128 }, (_, i) => client.read(i * 256 * 1024, whole.subarray(i * 256 * 1024, (i + 1) * 256 * 1024)));
      await Promise.all(pieces);
      qemuImg('convert', '-U', '-f', 'qcow2', '-O', 'raw', 'src.qcow2', 'src-copy.raw');
      const expected = fs.readFileSync(path.join(dir, 'src-copy.raw')).subarray(0, 32 * MiB);
      expect(whole.equals(expected)).toBe(true);
      const status = await client.blockStatus(0, 64 * MiB);
      expect(status.get('qemu:allocation-depth')?.[1]).toEqual({ length: MiB, flags: 1 });
      const listed = await listExports({ type: 'unix', path: peer.socket! });
      expect(listed.exports.map((e) => [e.name, e.info?.sizeBytes, e.contexts])).toEqual([
        ['exp', 64 * MiB, ['base:allocation', 'qemu:allocation-depth']],
      ]);
    } finally {
      await client.disconnect();
    }
  });
});

describe.skipIf(missingPeers('qemu-img', 'qemu-io', 'nbdkit'))('NBD client against nbdkit', () => {
  const dir = scratchDir('qbt-nbdkit-');
  afterEach(stopAllPeers);

  const kit = (flags: string[] = [], plugin = ['memory', '64M']): Promise<NbdPeer> => startNbdkit({ unix: dir }, plugin, flags);

  it('the memory plugin: info, map and qemu-io writes read back by qemu-io', async () => {
    const peer = await kit();
    await sameAsQemu('qemu-io', ['-f', 'raw', '-c', 'write -P 0x5a 1M 1M', '-c', 'write -z 3M 1M', '-c', 'discard 1536k 64k', peer.uri], dir);
    for (const args of [['info', peer.uri], ['info', '--output=json', peer.uri], ['map', '--output=json', peer.uri], ['map', peer.uri]]) {
      await sameAsQemu('qemu-img', args, dir);
    }
    await sameAsQemu('qemu-io', ['-f', 'raw', '-c', 'read -P 0x5a 1M 512k', '-c', 'read -P 0 1536k 64k', '-c', 'read -P 0 3M 1M', peer.uri], dir);
  });

  it('--no-sr: simple replies, no block status; output as qemu-img', async () => {
    const peer = await kit(['--no-sr']);
    await run('qemu-io', ['-f', 'raw', '-c', 'write -P 7 0 64k', peer.uri]);
    for (const args of [['info', peer.uri], ['map', '--output=json', peer.uri]]) await sameAsQemu('qemu-img', args, dir);
    await sameAsQemu('qemu-io', ['-f', 'raw', '-c', 'read -P 7 0 64k', '-c', 'write -z 64k 64k', '-c', 'read -P 0 64k 64k', peer.uri], dir);
    await sameAsQemu('qemu-img', ['convert', '-O', 'qcow2', peer.uri, 'nosr.qcow2'], dir);
  });

  it('--oldstyle: size and flags in the greeting, default export only', async () => {
    const peer = await kit(['--oldstyle']);
    for (const args of [['info', peer.uri], ['map', '--output=json', peer.uri]]) await sameAsQemu('qemu-img', args, dir);
    await sameAsQemu('qemu-img', ['info', peer.uri.replace(':///', ':///other')], dir);
  });

  it('--tls=require with a PSK file: nbds+unix works, plain nbd+unix gets QEMU message', async () => {
    const psk = path.join(dir, 'keys.psk');
    fs.writeFileSync(psk, `alice:${'00112233'.repeat(4)}\n`);
    const peer = await kit([`--tls=require`, `--tls-psk=${psk}`]);
    await sameAsQemu('qemu-img', ['info', peer.uri], dir);
    const tlsUri = `nbds+unix://alice@/?socket=${peer.socket}&tls-psk-file=${psk}`;
    await run('qemu-io', ['-f', 'raw', '-c', 'write -P 0x61 0 64k', peer.uri]).catch(() => undefined);
    const w = await runOurs('qemu-io-ts', ['-f', 'raw', '-c', 'write -P 0x62 64k 64k', '-c', 'read -P 0x62 64k 64k', tlsUri], { cwd: dir });
    expect(w.code).toBe(0);
    expect(w.stdout).toContain('read 65536/65536 bytes at offset 65536');
    const info = await runOurs('qemu-img-ts', ['info', tlsUri], { cwd: dir });
    expect(info.stdout).toContain(`image: nbds+unix://?socket=${peer.socket}`);
  });

  it('--mask-handshake=0: the old EXPORT_NAME handshake', async () => {
    const peer = await kit(['--mask-handshake=0']);
    await run('qemu-io', ['-f', 'raw', '-c', 'write -P 9 4k 4k', peer.uri]);
    for (const args of [['info', peer.uri], ['map', '--output=json', peer.uri]]) await sameAsQemu('qemu-img', args, dir);
    await sameAsQemu('qemu-io', ['-f', 'raw', '-c', 'read -P 9 4k 4k', peer.uri], dir);
    const client = await NbdClient.connect({ address: { type: 'unix', path: peer.socket! }, exportName: '' });
    expect(client.info.mode).toBe('export-name');
    await client.disconnect();
  });
});

describe('NBD client against our own server', () => {
  const dir = scratchDir('qbt-nbd-self-');

  it('negotiates extended headers: 64-bit lengths and BLOCK_STATUS_EXT', async () => {
    execFileSync('qemu-img', ['create', '-q', '-f', 'qcow2', path.join(dir, 'big.qcow2'), '8G']);
    const ours = await serveImage(dir, 'big.qcow2', { writable: true, format: 'qcow2', name: 'big' });
    const client = await NbdClient.connect({ address: { type: 'unix', path: ours.socket }, exportName: 'big' });
    try {
      expect(client.info.mode).toBe('extended');
      expect(client.extended).toBe(true);
      await client.write(5 * 2 ** 30, Buffer.alloc(64 * 1024, 0x42));
      // One request longer than 4 GiB, which compact headers cannot carry.
      await client.writeZeroes(0, 5 * 2 ** 30);
      const status = await client.blockStatus(0, 8 * 2 ** 30);
      const extents = status.get('base:allocation')!;
      expect(extents[0]!.length).toBeGreaterThan(2 ** 32);
      const sum = extents.reduce((n, e) => n + e.length, 0);
      expect(sum).toBeLessThanOrEqual(8 * 2 ** 30);
      const back = Buffer.alloc(64 * 1024);
      await client.read(5 * 2 ** 30, back);
      expect(back.every((b) => b === 0x42)).toBe(true);
    } finally {
      await client.disconnect();
    }
  });
});

describe.skipIf(missingPeers('qemu-img', 'qemu-nbd', 'openssl'))('NBD client over x509 TLS', () => {
  const dir = scratchDir('qbt-nbd-x509-');
  afterEach(stopAllPeers);

  /** A CA and server/client certificates for localhost and 127.0.0.1, in qemu's tls-creds-x509 layout. */
  function makeCertificates(certs: string): void {
    const ssl = (...args: string[]) => execFileSync('openssl', args, { cwd: certs, stdio: 'ignore' });
    fs.mkdirSync(certs, { recursive: true });
    ssl('req', '-x509', '-newkey', 'rsa:2048', '-nodes', '-keyout', 'ca-key.pem', '-out', 'ca-cert.pem', '-days', '2', '-subj', '/CN=test CA');
    fs.writeFileSync(path.join(certs, 'ext.cnf'), 'subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\n');
    for (const who of ['server', 'client']) {
      ssl('req', '-newkey', 'rsa:2048', '-nodes', '-keyout', `${who}-key.pem`, '-out', `${who}.csr`, '-subj', `/CN=${who}`);
      ssl('x509', '-req', '-in', `${who}.csr`, '-CA', 'ca-cert.pem', '-CAkey', 'ca-key.pem', '-CAcreateserial', '-out', `${who}-cert.pem`, '-days', '2', '-extfile', 'ext.cnf');
    }
  }

  it('nbds:// with tls-certificates, and --object tls-creds-x509 with tls-creds, against qemu-nbd', async () => {
    const certs = path.join(dir, 'certs');
    makeCertificates(certs);
    execFileSync('qemu-img', ['create', '-q', '-f', 'raw', path.join(dir, 'x.raw'), '4M']);
    const creds = ['--object', `tls-creds-x509,id=tls0,endpoint=server,dir=${certs}`, '--tls-creds', 'tls0'];
    const peer = await startQemuNbd({ tcp: true }, { image: path.join(dir, 'x.raw'), format: 'raw', extra: creds });
    const uri = `nbds://127.0.0.1:${peer.port}/exp?tls-certificates=${certs}`;
    const w = await runOurs('qemu-io-ts', ['-f', 'raw', '-c', 'write -P 0x71 0 64k', '-c', 'read -P 0x71 0 64k', uri]);
    expect(w.stderr).toBe('');
    expect(w.code).toBe(0);
    const opts = ['--object', `tls-creds-x509,id=t,endpoint=client,dir=${certs}`, '--image-opts', `driver=nbd,host=127.0.0.1,port=${peer.port},export=exp,tls-creds=t`];
    await sameAsQemu('qemu-img', ['map', '--output=json', ...opts], dir);
    await sameAsQemu('qemu-img', ['info', ...opts], dir);
    // Without the CA the server's certificate is not trusted.
    const untrusted = await runOurs('qemu-img-ts', ['info', `nbds://127.0.0.1:${peer.port}/exp`]);
    expect(untrusted.code).toBe(1);
    expect(untrusted.stderr).toMatch(/^qemu-img: Could not open 'nbds:.*': .*certificate/);
  });
});
