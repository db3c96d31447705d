/*
 * A tiny QMP client and a qemu-storage-daemon runner for interop tests.
 *
 * QMP is JSON lines over a unix socket: the server greets with {"QMP": …},
 * the client sends {"execute": "qmp_capabilities"} to leave negotiation,
 * then each command gets exactly one {"return": …} or {"error": …}; events
 * ({"event": …}) may arrive at any time and are collected in `events`.
 * Commands are sent one at a time (no "id" needed): `execute` waits for the
 * answer before the next may be sent, and every wait is bounded.
 *
 * `startStorageDaemon` runs qemu-storage-daemon (or ours, qemu-storage-daemon-ts) with a QMP monitor on
 * `<dir>/qmp-N.sock` plus the caller's arguments (blockdevs, NBD server,
 * exports listening on unix sockets only) and connects; `quit` asks it to
 * exit over QMP (it flushes and stores persistent bitmaps on the way out)
 * and waits for the process; `stop` ends it by PID if it still runs.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import fs from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { oursCommand } from './run.js';

/** Longest wait for the monitor socket to appear and accept, and for one answer. */
export const QMP_TIMEOUT_MS = 10_000;
/** Longest wait for the daemon to exit after `quit` or SIGTERM before SIGKILL. */
export const DAEMON_EXIT_MS = 10_000;
const POLL_MS = 20;

export interface QmpEvent {
  event: string;
  data?: unknown;
}

/** An {"error": {class, desc}} answer. */
export class QmpError extends Error {
  constructor(
    readonly errorClass: string,
    desc: string,
  ) {
    super(desc);
  }
}

type Answer = { return: unknown } | { error: { class: string; desc: string } };

export class QmpClient {
  readonly events: QmpEvent[] = [];
  private readonly lines: string[] = [];
  private waiter: (() => void) | null = null;
  private pending = '';
  private closed = false;

  private constructor(private readonly socket: net.Socket) {
    socket.setEncoding('utf8');
    socket.on('data', (chunk: string) => this.onData(chunk));
    socket.on('close', () => {
      this.closed = true;
      this.wake();
    });
    socket.on('error', () => undefined);
  }

  /** Connects to `socketPath` (waiting for it to listen), reads the greeting, negotiates capabilities. */
  static async connect(socketPath: string): Promise<QmpClient> {
    const socket = await connectWhenListening(socketPath);
    const client = new QmpClient(socket);
    const greeting = JSON.parse(await client.nextLine()) as Record<string, unknown>;
    if (!('QMP' in greeting)) throw new Error(`not a QMP greeting: ${JSON.stringify(greeting)}`);
    await client.execute('qmp_capabilities');
    return client;
  }

  /** Sends one command; resolves with its "return" value, rejects with QmpError on "error". */
  async execute<T = unknown>(command: string, args?: Record<string, unknown>): Promise<T> {
    this.socket.write(JSON.stringify(args ? { execute: command, arguments: args } : { execute: command }) + '\n');
    for (;;) {
      const msg = JSON.parse(await this.nextLine()) as Answer | QmpEvent;
      if ('event' in msg) this.events.push(msg);
      else if ('error' in msg) throw new QmpError(msg.error.class, msg.error.desc);
      else return msg.return as T;
    }
  }

  close(): void {
    this.socket.destroy();
  }

  private onData(chunk: string): void {
    this.pending += chunk;
    let nl: number;
    while ((nl = this.pending.indexOf('\n')) >= 0) {
      const line = this.pending.slice(0, nl).trim();
      this.pending = this.pending.slice(nl + 1);
      if (line) this.lines.push(line);
    }
    this.wake();
  }

  private wake(): void {
    const w = this.waiter;
    this.waiter = null;
    w?.();
  }

  private async nextLine(): Promise<string> {
    const deadline = Date.now() + QMP_TIMEOUT_MS;
    while (this.lines.length === 0) {
      if (this.closed) throw new Error('QMP connection closed');
      const left = deadline - Date.now();
      if (left <= 0) throw new Error(`no QMP answer within ${QMP_TIMEOUT_MS} ms`);
      await new Promise<void>((resolve) => {
        this.waiter = resolve;
        setTimeout(resolve, left);
      });
    }
    return this.lines.shift()!;
  }
}

async function connectWhenListening(socketPath: string): Promise<net.Socket> {
  const deadline = Date.now() + QMP_TIMEOUT_MS;
  while (Date.now() < deadline) {
    const socket = await new Promise<net.Socket | null>((resolve) => {
      const s = net.connect(socketPath);
      s.once('connect', () => resolve(s));
      s.once('error', () => resolve(null));
    });
    if (socket) return socket;
    await sleep(POLL_MS);
  }
  throw new Error(`QMP socket ${socketPath} did not accept within ${QMP_TIMEOUT_MS} ms`);
}

export interface StorageDaemon {
  pid: number;
  qmp: QmpClient;
  stderr(): string;
  /** `quit` over QMP, then the exit status once the process is gone. */
  quit(): Promise<number | null>;
  /** Ends the process by PID if it still runs (SIGTERM, SIGKILL after DAEMON_EXIT_MS). */
  stop(): Promise<void>;
}

let serial = 0;

/** qemu-storage-daemon (or with `ours`, qemu-storage-daemon-ts) with a QMP monitor on a unix socket in `dir`, plus `args`. */
export async function startStorageDaemon(dir: string, args: string[], opts: { ours?: boolean } = {}): Promise<StorageDaemon> {
  const qmpSocket = path.join(dir, `qmp-${process.pid}-${++serial}.sock`);
  fs.rmSync(qmpSocket, { force: true });
  const monitor = ['--chardev', `socket,path=${qmpSocket},server=on,wait=off,id=qmp0`, '--monitor', 'chardev=qmp0'];
  const [command, ...prefix] = opts.ours ? oursCommand('qemu-storage-daemon-ts') : ['qemu-storage-daemon'];
  const child = spawn(command!, [...prefix, ...monitor, ...args], { cwd: dir, stdio: ['ignore', 'ignore', 'pipe'] });
  let err = '';
  child.stderr!.on('data', (d: Buffer) => (err += d.toString()));
  const exited = new Promise<number | null>((resolve) => child.once('exit', (code) => resolve(code)));
  const stop = () => stopChild(child, exited);
  let qmp: QmpClient;
  try {
    qmp = await Promise.race([QmpClient.connect(qmpSocket), exited.then(() => Promise.reject(new Error(`qemu-storage-daemon exited: ${err}`)))]);
  } catch (e) {
    await stop();
    throw e;
  }
  const quit = async () => {
    await qmp.execute('quit').catch(() => undefined); // the daemon may close the socket before answering
    const timer = setTimeout(() => void stop(), DAEMON_EXIT_MS);
    const code = await exited;
    clearTimeout(timer);
    qmp.close();
    return code;
  };
  return { pid: child.pid!, qmp, stderr: () => err, quit, stop };
}

async function stopChild(child: ChildProcess, exited: Promise<unknown>): Promise<void> {
  if (child.exitCode !== null || child.signalCode !== null) return;
  process.kill(child.pid!, 'SIGTERM');
  const timer = setTimeout(() => child.exitCode === null && child.signalCode === null && process.kill(child.pid!, 'SIGKILL'), DAEMON_EXIT_MS);
  await exited;
  clearTimeout(timer);
}
