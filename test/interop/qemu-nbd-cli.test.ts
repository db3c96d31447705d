/*
 * qemu-nbd-ts against qemu-nbd 7.2: the same command lines give the same
 * errors and exit statuses; the same image served by either looks the same
 * to nbdinfo; the server's life (exit after the last client, -t, signals,
 * --fork with --pid-file, -r) is qemu-nbd's.
 *
 * Servers listen on unix sockets in a scratch directory and are stopped by
 * PID at the end of each test.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { afterEach, describe, expect, it } from 'vitest';
import { missingPeers } from '../helpers/peers.js';
import { oursCommand, run, runOurs } from '../helpers/run.js';
import { scratchDir } from '../helpers/tmp.js';
import { CLIENT_DN, PSK_USER, makeTestPki } from '../helpers/tls-certs.js';

const START_MS = 10_000;
const POLL_MS = 20;
const dir = scratchDir('qnbd-cli-');
const children = new Set<ChildProcess>();
/** --pid-file paths of forked servers, stopped after each test whatever happened in it. */
const pidFiles = new Set<string>();
let serial = 0;

afterEach(async () => {
  for (const c of children) if (c.exitCode === null && c.signalCode === null) c.kill('SIGKILL');
  children.clear();
  for (const f of pidFiles) stopForked(f);
  pidFiles.clear();
});

function stopForked(pidFile: string): void {
  if (!fs.existsSync(pidFile)) return;
  try {
    process.kill(Number(fs.readFileSync(pidFile, 'utf8').trim()), 'SIGTERM');
  } catch {
    // already gone
  }
}

type Side = 'ours' | 'peer';

function command(side: Side): [string, string[]] {
  if (side === 'peer') return ['qemu-nbd', []];
  const [node, bin] = oursCommand('qemu-nbd-ts');
  return [node, [bin]];
}

function runNbd(side: Side, args: string[]) {
  if (side === 'ours') return runOurs('qemu-nbd-ts', args, { cwd: dir, timeoutMs: 20_000 });
  return run('qemu-nbd', args, { cwd: dir, timeoutMs: 20_000 });
}

interface Server {
  child: ChildProcess;
  socket: string;
  uri: (exportName?: string) => string;
  exited: Promise<number>;
  stderr: () => string;
}

/** Starts a server on a fresh unix socket and waits until the socket exists. */
async function start(side: Side, args: string[]): Promise<Server> {
  const socket = path.join(dir, `${side}-${++serial}.sock`);
  const [cmd, pre] = command(side);
  const child = spawn(cmd, [...pre, '-k', socket, ...args], { cwd: dir, stdio: ['ignore', 'ignore', 'pipe'] });
  children.add(child);
  let err = '';
  child.stderr!.on('data', (d: Buffer) => (err += d.toString()));
  const exited = new Promise<number>((resolve) => child.on('exit', (code, sig) => resolve(code ?? (sig ? 128 : 0))));
  for (let waited = 0; !fs.existsSync(socket); waited += POLL_MS) {
    if (waited > START_MS || child.exitCode !== null) throw new Error(`${side} did not start: ${err}`);
    await sleep(POLL_MS);
  }
  return { child, socket, uri: (name = '') => `nbd+unix:///${name}?socket=${socket}`, exited, stderr: () => err };
}

function image(name: string, sizeBytes = 1 << 20): string {
  const file = path.join(dir, name);
  fs.writeFileSync(file, Buffer.alloc(sizeBytes));
  return file;
}

describe.skipIf(missingPeers('qemu-nbd', 'nbdinfo', 'qemu-io'))('qemu-nbd-ts against qemu-nbd 7.2', () => {
  const raw = image('a.raw');

  // Command lines that fail before any server starts: same stderr, same status.
  const failures: [string, string[]][] = [
    ['no image', []],
    ['two images', [raw, raw]],
    ['missing file', ['-f', 'raw', 'no-such-file']],
    ['bad shared count', ['-e', 'abc', raw]],
    ['negative shared count', ['-e', '-1', raw]],
    ['bad cache mode', ['--cache=bogus', raw]],
    ['cache twice', ['-n', '--cache=none', raw]],
    ['bad discard mode', ['--discard=bogus', raw]],
    ['bad detect-zeroes', ['--detect-zeroes=bogus', raw]],
    ['detect-zeroes=unmap before discard', ['--detect-zeroes=unmap', '--discard=unmap', raw]],
    ['bad aio mode', ['--aio=bogus', raw]],
    ['relative socket', ['-k', 'rel.sock', raw]],
    ['export name too long', ['-x', 'x'.repeat(4097), raw]],
    ['description too long', ['-D', 'd'.repeat(4097), raw]],
    ['unknown option', ['-Q', raw]],
    ['missing argument', ['-x']],
    ['list with a file', ['-L', raw]],
    ['list with per-device settings', ['-L', '-x', 'e']],
    ['list with fork', ['-L', '--fork']],
    ['tls-authz without tls-creds', ['--tls-authz', 'a', raw]],
    ['tls-creds with a unix socket', ['--tls-creds', 't', '-k', '/tmp/x.sock', raw]],
    ['unknown tls-creds id', ['--tls-creds', 'nope', raw]],
    ['tls-creds not credentials', ['--object', 'secret,id=s0,data=x', '--tls-creds', 's0', raw]],
    ['tls-creds with a client endpoint', ['--object', 'tls-creds-anon,id=t0,endpoint=client', '--tls-creds', 't0', raw]],
    ['tls-authz with -L', ['--tls-creds', 't', '-L', '--tls-authz', 'a']],
    ['tls-hostname without -L', ['--object', 'tls-creds-anon,id=t0,endpoint=server', '--tls-creds', 't0', '--tls-hostname', 'h', raw]],
    ['bad offset', ['-o', 'x1', raw]],
    ['bad port', ['-f', 'raw', '-b', '127.0.0.1', '-p', 'abc', raw]],
    ['-L to a missing socket', ['-L', '-k', '/nonexistent-dir/s.sock']],
    ['-L to a closed port', ['-L', '-b', '127.0.0.1', '-p', '1']],
    ['socket in a missing directory', ['-f', 'raw', '-k', '/nonexistent-dir/s.sock', raw]],
  ];
  it.each(failures)('%s', async (_label, args) => {
    const [ours, peer] = await Promise.all([runNbd('ours', args), runNbd('peer', args)]);
    expect({ code: ours.code, stderr: ours.stderr }).toEqual({ code: peer.code, stderr: peer.stderr });
  });

  it('nbdinfo --json sees the same export (raw and a qcow2 overlay with -A)', async () => {
    const qcow2 = path.join(dir, 'b.qcow2');
    const top = path.join(dir, 'top.qcow2');
    await run('qemu-img', ['create', '-q', '-f', 'qcow2', qcow2, '4M']);
    await run('qemu-io', ['-f', 'qcow2', '-c', 'write -P 0xab 0 1M', '-c', 'write -z 1M 512k', qcow2]);
    await run('qemu-img', ['create', '-q', '-f', 'qcow2', '-b', qcow2, '-F', 'qcow2', top]);
    await run('qemu-io', ['-f', 'qcow2', '-c', 'write -P 0xef 512k 128k', top]);
    const cases: [string[], string[]][] = [
      [['-f', 'raw', '-x', 'exp', '-D', 'a raw image', raw], ['--json']],
      [['-r', '-f', 'qcow2', '-x', 'exp', '-A', top], ['--json']],
      [['-r', '-f', 'qcow2', '-x', 'exp', '-A', top], ['--map']],
      [['-r', '-f', 'qcow2', '-x', 'exp', '-A', top], ['--map=qemu:allocation-depth']],
    ];
    for (const [serverArgs, infoArgs] of cases) {
      const seen: string[] = [];
      for (const side of ['ours', 'peer'] as const) {
        const s = await start(side, serverArgs);
        const info = await run('nbdinfo', [...infoArgs, s.uri('exp')]);
        expect(info.code, info.stderr).toBe(0);
        seen.push(info.stdout.replaceAll(s.socket, 'SOCKET'));
        expect(await s.exited).toBe(0); // the last client left: the server ends
      }
      expect(seen[0]).toBe(seen[1]);
    }
  });

  it('-t keeps serving after clients leave; SIGTERM ends it with status 0 and removes the socket', async () => {
    const s = await start('ours', ['-t', '-f', 'raw', raw]);
    for (let i = 0; i < 3; i++) expect((await run('nbdinfo', ['--size', s.uri()])).stdout).toBe('1048576\n');
    s.child.kill('SIGTERM');
    expect(await s.exited).toBe(0);
    expect(fs.existsSync(s.socket)).toBe(false);
  });

  it('-r: qemu-io cannot open the export for writing, as with qemu-nbd; without -r writes land in the image', async () => {
    const file = image('w.raw');
    const denied: string[] = [];
    for (const side of ['ours', 'peer'] as const) {
      const ro = await start(side, ['-r', '-f', 'raw', file]);
      const r = await run('qemu-io', ['-f', 'raw', '-c', 'write -P 0x11 0 4k', ro.uri()]);
      denied.push(`${r.code} ${r.stdout}${r.stderr}`.replaceAll(ro.socket, 'SOCKET'));
      await ro.exited;
    }
    expect(denied[0]).toBe(denied[1]);
    const rw = await start('ours', ['-f', 'raw', file]);
    const wrote = await run('qemu-io', ['-f', 'raw', '-c', 'write -P 0x22 4k 4k', rw.uri()]);
    expect(wrote.code, wrote.stderr).toBe(0);
    expect(await rw.exited).toBe(0);
    const check = await run('qemu-io', ['-f', 'raw', '-r', '-c', 'read -P 0x22 4k 4k', '-c', 'read -P 0 0 4k', file]);
    expect(check.stdout).not.toContain('Pattern verification failed');
    expect(check.code).toBe(0);
  });

  it('--fork returns once the server listens; --pid-file names the server', async () => {
    const socket = path.join(dir, 'fork.sock');
    const pidFile = path.join(dir, 'fork.pid');
    pidFiles.add(pidFile);
    // The server keeps the parent's stderr (as qemu-nbd's does), so it goes to a file, not a pipe we would wait on.
    const errFile = path.join(dir, 'fork.err');
    const errFd = fs.openSync(errFile, 'w');
    const [node, bin] = oursCommand('qemu-nbd-ts');
    const parent = spawn(node, [bin, '--fork', '--pid-file', pidFile, '-t', '-k', socket, '-f', 'raw', raw], { stdio: ['ignore', 'ignore', errFd] });
    fs.closeSync(errFd);
    const status = await new Promise<number | null>((resolve) => parent.on('exit', (code) => resolve(code)));
    expect(status, fs.readFileSync(errFile, 'utf8')).toBe(0);
    expect(Number(fs.readFileSync(pidFile, 'utf8').trim())).toBeGreaterThan(0);
    try {
      expect(fs.existsSync(socket)).toBe(true);
      expect((await run('nbdinfo', ['--size', `nbd+unix:///?socket=${socket}`])).stdout).toBe('1048576\n');
    } finally {
      stopForked(pidFile);
    }
    for (let waited = 0; fs.existsSync(socket) && waited < START_MS; waited += POLL_MS) await sleep(POLL_MS);
    expect(fs.existsSync(socket)).toBe(false);
  });

  it('--fork reports a failure with the child status and message', async () => {
    const [ours, peer] = await Promise.all([
      runNbd('ours', ['--fork', '-f', 'raw', '-k', path.join(dir, 'f2.sock'), 'no-such-file']),
      runNbd('peer', ['--fork', '-f', 'raw', '-k', path.join(dir, 'f3.sock'), 'no-such-file']),
    ]);
    expect({ code: ours.code, stderr: ours.stderr }).toEqual({ code: peer.code, stderr: peer.stderr });
  });

  it('multi-conn follows -e as in qemu-nbd', async () => {
    for (const args of [['-e', '2'], ['-e', '2', '-r'], ['-r'], ['-e', '0']]) {
      const can: number[] = [];
      for (const side of ['ours', 'peer'] as const) {
        const s = await start(side, ['-t', ...args, '-f', 'raw', raw]);
        can.push((await run('nbdinfo', ['--can', 'multi-conn', s.uri()])).code);
        s.child.kill('SIGTERM');
        await s.exited;
      }
      expect(can[0], args.join(' ')).toBe(can[1]);
    }
  });

  it('-L lists a server the same way (qemu-nbd and ours as servers, with -D and -A)', async () => {
    for (const server of ['ours', 'peer'] as const) {
      const s = await start(server, ['-t', '-e', '4', '-r', '-f', 'raw', '-x', 'exp', '-D', 'the description', '-A', raw]);
      const listings: string[] = [];
      for (const side of ['ours', 'peer'] as const) {
        const r = await runNbd(side, ['-L', '-k', s.socket]);
        listings.push(`${r.code}\n${r.stdout}${r.stderr}`);
      }
      // Against our server our client negotiates extended headers, which adds one flag qemu 7.2 never sees.
      if (server === 'ours') listings[0] = listings[0]!.replace(/flags: 0x1([0-9a-f]{3}) \((.*) block-status-payload \)/, 'flags: 0x$1 ($2 )');
      expect(listings[0], `server: ${server}`).toBe(listings[1]);
      expect(listings[0]).toContain("export: 'exp'");
      s.child.kill('SIGTERM');
      expect(await s.exited).toBe(0);
    }
  });

  it('TLS: x509 with tls-authz and PSK, served by qemu-nbd-ts, seen as from qemu-nbd; -L over TLS', async () => {
    const pki = makeTestPki(path.join(dir, 'pki'));
    const authz = `authz-simple,id=auth0,identity=${CLIENT_DN.replaceAll(",", ",,")}`;
    const x509 = ['--object', `tls-creds-x509,id=tls0,endpoint=server,dir=${pki.serverDir}`, '--object', authz, '--tls-creds', 'tls0', '--tls-authz', 'auth0'];
    const psk = ['--object', `tls-creds-psk,id=tls0,endpoint=server,dir=${pki.pskDir}`, '--tls-creds', 'tls0'];
    const probes: [string[], (socket: string) => string[]][] = [
      [x509, (sock) => ['--json', `nbds+unix:///exp?socket=${sock}&tls-certificates=${pki.clientDir}`]],
      [x509, (sock) => ['--size', `nbds+unix:///exp?socket=${sock}&tls-certificates=${pki.intruderDir}`]],
      [x509, (sock) => ['--size', `nbd+unix:///exp?socket=${sock}`]],
      [psk, (sock) => ['--size', `nbds+unix://${PSK_USER}@/exp?socket=${sock}&tls-psk-file=${path.join(pki.pskDir, 'keys.psk')}`]],
    ];
    for (const [serverArgs, infoArgs] of probes) {
      const seen: string[] = [];
      for (const side of ['ours', 'peer'] as const) {
        const s = await start(side, ['-t', '-r', '-f', 'raw', '-x', 'exp', ...serverArgs, raw]);
        const r = await run('nbdinfo', infoArgs(s.socket));
        seen.push(`${r.code === 0 ? 'ok' : 'refused'}\n${r.stdout.replaceAll(s.socket, 'SOCKET')}`);
        s.child.kill('SIGTERM');
        expect(await s.exited).toBe(0);
      }
      expect(seen[0], infoArgs('S').join(' ')).toBe(seen[1]);
    }
    const s = await start('ours', ['-t', '-r', '-f', 'raw', '-x', 'exp', ...x509, raw]);
    const client = ['--object', `tls-creds-x509,id=c0,endpoint=client,dir=${pki.clientDir}`, '--tls-creds', 'c0', '--tls-hostname', 'localhost'];
    const listed = await Promise.all((['ours', 'peer'] as const).map((side) => runNbd(side, ['-L', '-k', s.socket, ...client])));
    expect(listed[0]!.code, listed[0]!.stderr).toBe(0);
    const strip = (t: string) => t.replace(/flags: 0x1([0-9a-f]{3}) \((.*) block-status-payload \)/, 'flags: 0x$1 ($2 )');
    expect(strip(listed[0]!.stdout)).toBe(listed[1]!.stdout);
    s.child.kill('SIGTERM');
    await s.exited;
  });
});
