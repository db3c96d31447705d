/*
 * QMP monitors on unix sockets (qemu-storage-daemon's `--chardev
 * socket,path=P,server=on,wait=off,id=X` + `--monitor chardev=X`).
 *
 * Clients that connect before `serve()` (while the daemon still processes
 * its command line) wait unanswered. A chardev serves one client at a time, as QEMU's socket chardev does:
 * a second connection waits, unanswered, until the first one ends (at
 * most MAX_WAITING_CLIENTS wait; more are closed). Each client gets the
 * greeting and starts in negotiation mode; `qmp_capabilities` moves it to
 * command mode (the command asks the session to switch). Inputs are cut
 * by json-stream.ts and run one at a time in arrival order, each answered
 * with one line of QEMU's compact JSON; a client may send ahead, but once
 * MAX_QUEUED_REQUESTS wait, reading from it pauses (QEMU's
 * QMP_REQ_QUEUE_LEN_MAX). Events go to every client in command mode.
 * Nothing a client sends stops the daemon: bad input is answered with an
 * error and the stream goes on.
 */
import fs from 'node:fs';
import net from 'node:net';
import { toJsonCompact, type QValue } from '../block/qjson.js';
import { errorResponse, type Dispatcher, type MonitorMode, type MonitorSession } from './dispatch.js';
import { JsonStream, type StreamItem } from '../block/json-stream.js';

/** Requests a client may have queued before its socket is paused. */
export const MAX_QUEUED_REQUESTS = 8;
/** Connections held while a chardev's client is active. */
export const MAX_WAITING_CLIENTS = 16;

/** The greeting's contents (QMP's "version" and "capabilities"). */
export interface Greeting {
  version: { qemu: { micro: number; minor: number; major: number }; package: string };
  capabilities: string[];
}

/** One connected client. */
export class MonitorClient implements MonitorSession {
  mode: MonitorMode = 'negotiation';
  private readonly stream = new JsonStream();
  private readonly queue: StreamItem[] = [];
  private running = false;
  closed = false;

  constructor(
    private readonly socket: net.Socket,
    private readonly run: (session: MonitorClient, item: StreamItem) => Promise<unknown>,
  ) {
    socket.on('data', (chunk: Buffer) => this.onData(chunk));
    socket.on('error', () => undefined);
  }

  send(message: QValue): void {
    if (this.closed || this.socket.destroyed) return;
    this.socket.write(toJsonCompact(message) + '\n');
  }

  private onData(chunk: Buffer): void {
    this.queue.push(...this.stream.push(chunk));
    if (this.queue.length >= MAX_QUEUED_REQUESTS) this.socket.pause();
    void this.drain();
  }

  private async drain(): Promise<void> {
    if (this.running) return;
    this.running = true;
    while (this.queue.length > 0 && !this.closed) {
      const item = this.queue.shift()!;
      this.send((await this.run(this, item)) as QValue);
      if (this.queue.length < MAX_QUEUED_REQUESTS) this.socket.resume();
    }
    this.running = false;
  }

  /** Ends the connection once what was sent is flushed. */
  close(): void {
    this.closed = true;
    this.socket.end();
  }
}

/** A socket chardev with a QMP monitor on it. */
export class QmpMonitor {
  private readonly server: net.Server;
  private active: MonitorClient | null = null;
  private readonly waiting: net.Socket[] = [];
  /** Clients are greeted only once the daemon is up (QEMU's main loop starts after the options). */
  private serving = false;

  constructor(
    readonly path: string,
    private readonly greeting: () => Greeting,
    private readonly run: (session: MonitorClient, item: StreamItem) => Promise<unknown>,
  ) {
    this.server = net.createServer((socket) => this.accept(socket));
  }

  /** Binds the socket (a stale socket file is replaced). */
  async listen(): Promise<void> {
    removeSocketFile(this.path);
    await new Promise<void>((resolve, reject) => {
      this.server.once('error', reject);
      this.server.listen(this.path, () => {
        this.server.off('error', reject);
        resolve();
      });
    });
    this.server.on('error', () => undefined);
  }

  /** The client in command mode, if any (events go there). */
  get commandClient(): MonitorClient | null {
    return this.active && this.active.mode === 'command' && !this.active.closed ? this.active : null;
  }

  /** Starts greeting clients (those that connected early first). */
  serve(): void {
    this.serving = true;
    this.acceptNext();
  }

  private accept(socket: net.Socket): void {
    if (this.active || !this.serving) {
      if (this.waiting.length >= MAX_WAITING_CLIENTS) return void socket.destroy();
      socket.pause();
      socket.on('error', () => undefined);
      this.waiting.push(socket);
      return;
    }
    const client = new MonitorClient(socket, this.run);
    this.active = client;
    socket.on('close', () => {
      client.closed = true;
      if (this.active === client) this.active = null;
      this.acceptNext();
    });
    client.send({ QMP: this.greeting() } as unknown as QValue);
  }

  private acceptNext(): void {
    while (this.serving && !this.active && this.waiting.length > 0) {
      const next = this.waiting.shift()!;
      if (next.destroyed) continue;
      this.accept(next);
      next.resume();
    }
  }

  async close(): Promise<void> {
    for (const s of this.waiting.splice(0)) s.destroy();
    this.active?.close();
    await new Promise<void>((resolve) => this.server.close(() => resolve()));
    removeSocketFile(this.path);
  }
}

/** Runs one stream item through the dispatcher: a parse error becomes its GenericError. */
export function itemRunner<Ctx>(dispatcher: Dispatcher<Ctx>, ctx: Ctx): (session: MonitorClient, item: StreamItem) => Promise<unknown> {
  return async (session, item) => ('error' in item ? errorResponse('GenericError', item.error) : dispatcher.dispatch(ctx, session, item.value));
}

function removeSocketFile(path: string): void {
  try {
    if (fs.lstatSync(path).isSocket()) fs.unlinkSync(path);
  } catch {
    // absent: nothing to remove
  }
}
