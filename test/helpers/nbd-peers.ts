/*
 * Real NBD servers for client tests: qemu-nbd and nbdkit, each started on a
 * unix socket in a scratch directory (or on 127.0.0.1 at a free port) and
 * stopped by PID. `start*` resolves once the server accepts connections
 * (polled, at most SERVER_START_MS); `stop` sends SIGTERM and waits for the
 * exit (SIGKILL after SERVER_STOP_MS). `stopAllPeers` in an afterEach/afterAll
 * stops whatever a test left running.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import fs from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';

/** Longest wait for a server to listen. */
export const SERVER_START_MS = 10_000;
/** Longest wait for a server to exit after SIGTERM. */
export const SERVER_STOP_MS = 5_000;
const POLL_MS = 20;

export interface NbdPeer {
  pid: number;
  /** `nbd+unix:///EXPORT?socket=…` or `nbd://127.0.0.1:PORT/EXPORT`. */
  uri: string;
  socket?: string;
  port?: number;
  stderr(): string;
  stop(): Promise<void>;
}

const running = new Set<NbdPeer>();

/** A TCP port on 127.0.0.1 that was free a moment ago. */
export async function freePort(): Promise<number> {
  const server = net.createServer();
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  const port = (server.address() as net.AddressInfo).port;
  await new Promise<void>((resolve) => server.close(() => resolve()));
  return port;
}

function canConnect(opts: net.NetConnectOpts): Promise<boolean> {
  return new Promise((resolve) => {
    const s = net.connect(opts);
    s.once('connect', () => {
      s.destroy();
      resolve(true);
    });
    s.once('error', () => resolve(false));
  });
}

async function waitListening(child: ChildProcess, target: net.NetConnectOpts, err: () => string): Promise<void> {
  const deadline = Date.now() + SERVER_START_MS;
  while (Date.now() < deadline) {
    if (child.exitCode !== null || child.signalCode !== null) throw new Error(`server exited early: ${err()}`);
    if ('path' in target && !fs.existsSync(target.path)) {
      await sleep(POLL_MS);
      continue;
    }
    if (await canConnect(target)) return;
    await sleep(POLL_MS);
  }
  throw new Error(`server did not listen within ${SERVER_START_MS} ms: ${err()}`);
}

function stopper(child: ChildProcess, peer: () => NbdPeer): () => Promise<void> {
  return async () => {
    running.delete(peer());
    if (child.exitCode !== null || child.signalCode !== null) return;
    const exited = new Promise<void>((resolve) => child.once('exit', () => resolve()));
    process.kill(child.pid!, 'SIGTERM');
    const timer = setTimeout(() => child.pid && child.exitCode === null && process.kill(child.pid, 'SIGKILL'), SERVER_STOP_MS);
    await exited;
    clearTimeout(timer);
  };
}

/** Where a server listens: a socket in the directory `unix` (named `name`, else a fresh name), or a TCP port. */
export type Listen = { unix: string; name?: string } | { tcp: true };

async function startServer(cmd: string, args: string[], where: { socket?: string; port?: number }, uri: string): Promise<NbdPeer> {
  const child = spawn(cmd, args, { stdio: ['ignore', 'ignore', 'pipe'] });
  let errText = '';
  child.stderr!.on('data', (d: Buffer) => (errText += d.toString()));
  const target: net.NetConnectOpts = where.socket ? { path: where.socket } : { host: '127.0.0.1', port: where.port! };
  const peer: NbdPeer = { pid: child.pid!, uri, ...where, stderr: () => errText, stop: stopper(child, () => peer) };
  running.add(peer);
  try {
    await waitListening(child, target, () => errText);
  } catch (e) {
    await peer.stop();
    throw e;
  }
  return peer;
}

async function endpoint(listen: Listen, name: string, exportName: string) {
  if ('unix' in listen) {
    const socket = path.join(listen.unix, `${listen.name ?? name}.sock`);
    fs.rmSync(socket, { force: true });
    return { where: { socket }, uri: `nbd+unix:///${exportName}?socket=${socket}` };
  }
  const port = await freePort();
  return { where: { port }, uri: `nbd://127.0.0.1:${port}/${exportName}` };
}

let serial = 0;

export interface QemuNbdOptions {
  image: string;
  format: string;
  exportName?: string;
  readOnly?: boolean;
  /** Further qemu-nbd options (e.g. `--allocation-depth`, `-B`, `--discard=unmap`). */
  extra?: string[];
}

/** qemu-nbd -t -e 8 serving `image` (persistent, several clients at once). */
export async function startQemuNbd(listen: Listen, o: QemuNbdOptions): Promise<NbdPeer> {
  const exportName = o.exportName ?? 'exp';
  const { where, uri } = await endpoint(listen, `qemu-nbd-${process.pid}-${++serial}`, exportName);
  const addr = where.socket ? ['-k', where.socket] : ['-b', '127.0.0.1', '-p', String(where.port)];
  const args = ['-t', '-e', '8', '-f', o.format, '-x', exportName, ...addr, ...(o.readOnly ? ['-r'] : []), ...(o.extra ?? []), o.image];
  return startServer('qemu-nbd', args, where, uri);
}

/** nbdkit in the foreground: `nbdkit -f [filters/flags…] PLUGIN ARGS…` (default export ""). */
export async function startNbdkit(listen: Listen, pluginArgs: string[], flags: string[] = []): Promise<NbdPeer> {
  const { where, uri } = await endpoint(listen, `nbdkit-${process.pid}-${++serial}`, '');
  const addr = where.socket ? ['-U', where.socket] : ['-i', '127.0.0.1', '-p', String(where.port)];
  return startServer('nbdkit', ['-f', ...addr, ...flags, ...pluginArgs], where, uri);
}

/** Stops every server still running. */
export async function stopAllPeers(): Promise<void> {
  await Promise.all([...running].map((p) => p.stop()));
}
