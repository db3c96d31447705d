/*
 * The NBD server: listeners (TCP and unix sockets), the exports it serves,
 * and its connections (QEMU's nbd-server-start, block-export-add/del and
 * the NBD part of qemu-nbd).
 *
 * Usage:
 *   const server = new NbdServer({ maxConnections: 1 });
 *   server.addExport(NbdExport.create(graph, node, { name: 'exp', writable: true }));
 *   await server.listen({ type: 'unix', path: '/tmp/nbd.sock' });
 *   …
 *   await server.close();
 *
 * Connections: at most `maxConnections` clients are served at once (0: no
 * limit); further ones wait, unanswered, until a slot frees (as QEMU stops
 * accepting), at most MAX_WAITING_CONNECTIONS of them, beyond which they
 * are closed. CAN_MULTI_CONN is advertised unless `maxConnections` is 1.
 * Each connection is independent: a misbehaving client is disconnected
 * alone.
 *
 * Exports: several per server, by name. `removeExport(name, 'safe')`
 * refuses while clients use the export; `'hard'` drops its clients
 * (requests in flight are answered ESHUTDOWN) and then closes it. An export
 * being removed is invisible to new clients.
 *
 * `close()` is the graceful shutdown: stop listening, close waiting and
 * negotiating connections, let connected clients' requests in flight
 * finish (later ones are answered ESHUTDOWN), close each connection when
 * idle (after SHUTDOWN_WAIT_MS at the latest), then close the exports,
 * which flushes their nodes.
 */
import fs from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import { BlockError, isErrnoCode, strerror } from '../block/errors.js';
import type { BlockGraph } from '../block/graph.js';
import type { BlockNode } from '../block/node.js';
import { BufferPool } from './buffer-pool.js';
import { NbdExport, type NbdExportOptions } from './export.js';
import { DEFAULT_PORT } from './protocol.js';
import { NbdConnection, type ConnectionHost, type ConnectionStats } from './server-connection.js';
import type { NbdServerTls } from './tls.js';

/** Default address of TCP listeners. */
export const DEFAULT_HOST = '127.0.0.1';
/** QEMU's default limit on simultaneous clients (nbd-server-start max-connections). */
export const DEFAULT_MAX_CONNECTIONS = 100;
/** QEMU's default handshake limit (handshake-max-seconds). */
export const DEFAULT_HANDSHAKE_MAX_SECONDS = 10;
/** Connections held unanswered while the server is full. */
export const MAX_WAITING_CONNECTIONS = 64;
/** How long a graceful shutdown waits for clients before closing them. */
export const SHUTDOWN_WAIT_MS = 10_000;

export type { ConnectionStats } from './server-connection.js';

export type NbdAddress = { type: 'inet'; host?: string; port?: number } | { type: 'unix'; path: string };

export interface NbdServerOptions {
  /** Clients served at once; 0 = unlimited (default 100, as QEMU). 1 also withdraws CAN_MULTI_CONN. */
  maxConnections?: number;
  /** Require TLS, upgraded through this seam (see tls.ts). */
  tls?: NbdServerTls | null;
  /** Cut off clients still negotiating after this long; 0 = never (default 10). */
  handshakeMaxSeconds?: number;
  /** Receives QEMU-style diagnostics ("Disconnect client, due to: …"). */
  log?: (message: string) => void;
  /** Called whenever a client connection ends (qemu-nbd without -t exits on the last one). */
  onClientClosed?: (info: { negotiated: boolean; remaining: number }) => void;
}

export class NbdServer {
  private readonly exports = new Map<string, NbdExport>();
  private readonly connections = new Set<NbdConnection>();
  private readonly waiting: net.Socket[] = [];
  private readonly listeners: { server: net.Server; unixPath?: string }[] = [];
  private readonly maxConnections: number;
  private readonly host: ConnectionHost;
  private shuttingDown = false;
  private readonly closedWaiters = new Set<() => void>();

  constructor(private readonly opts: NbdServerOptions = {}) {
    this.maxConnections = opts.maxConnections ?? DEFAULT_MAX_CONNECTIONS;
    if (!Number.isInteger(this.maxConnections) || this.maxConnections < 0) {
      throw new BlockError('EINVAL', `Invalid max-connections ${this.maxConnections}`);
    }
    const server = this;
    this.host = {
      findExport: (name) => this.exports.get(name),
      listExports: () => [...this.exports.values()],
      multiConn: this.maxConnections !== 1,
      tls: opts.tls ?? null,
      get shuttingDown() {
        return server.shuttingDown;
      },
      handshakeMaxMs: (opts.handshakeMaxSeconds ?? DEFAULT_HANDSHAKE_MAX_SECONDS) * 1000,
      pool: new BufferPool(),
      log: (message) => opts.log?.(message),
      connectionClosed: (conn) => this.connectionClosed(conn),
    };
  }

  // ------------------------------------------------------------ exports

  /** Adds an export; its name must be new. */
  addExport(exp: NbdExport): NbdExport {
    if (this.shuttingDown) throw new BlockError('ESHUTDOWN', 'NBD server is shutting down');
    if (this.exports.has(exp.name)) throw new BlockError('EEXIST', `NBD server already has export named '${exp.name}'`);
    this.exports.set(exp.name, exp);
    return exp;
  }

  /** Opens a backend on `node` and exports it. */
  createExport(graph: BlockGraph, node: BlockNode, opts: NbdExportOptions = {}): NbdExport {
    const name = opts.name ?? node.nodeName;
    if (this.exports.has(name)) throw new BlockError('EEXIST', `NBD server already has export named '${name}'`);
    return this.addExport(NbdExport.create(graph, node, opts));
  }

  getExport(name: string): NbdExport | undefined {
    return this.exports.get(name);
  }

  listExports(): NbdExport[] {
    return [...this.exports.values()];
  }

  /** Removes an export: `safe` refuses while clients use it, `hard` drops them. */
  async removeExport(name: string, mode: 'safe' | 'hard' = 'safe'): Promise<void> {
    const exp = this.exports.get(name);
    if (!exp || exp.removing) throw new BlockError('ENOENT', `Export '${name}' is not found`);
    if (mode === 'safe' && exp.clients.size > 0) throw new BlockError('EBUSY', `export '${name}' still in use`);
    exp.removing = true;
    for (const client of [...exp.clients]) client.dropHard('export is being removed');
    await this.waitUntil(() => exp.clients.size === 0, SHUTDOWN_WAIT_MS);
    this.exports.delete(name);
    await exp.close();
  }

  // ------------------------------------------------------------ listening

  /** Starts listening; resolves with the bound address (a port for TCP). */
  async listen(addr: NbdAddress): Promise<net.AddressInfo | string> {
    // allowHalfOpen: a client that half-closes after its requests still gets their replies (the connection ends its side).
    const server = net.createServer({ noDelay: true, pauseOnConnect: true, allowHalfOpen: true }, (socket) => this.accept(socket));
    let unixPath: string | undefined;
    if (addr.type === 'unix') {
      unixPath = addr.path;
      removeStaleSocket(unixPath);
    }
    await new Promise<void>((resolve, reject) => {
      server.once('error', reject);
      if (addr.type === 'unix') server.listen(addr.path, resolve);
      else server.listen(addr.port ?? DEFAULT_PORT, addr.host ?? DEFAULT_HOST, resolve);
    });
    server.on('error', (e) => this.host.log(`listener error: ${e.message}`));
    this.listeners.push({ server, unixPath });
    const bound = server.address();
    return bound ?? '';
  }

  /** Clients connected (negotiating or transmitting). */
  get connectionCount(): number {
    return this.connections.size;
  }

  /** What each connection holds now (see ConnectionStats for the bounds). */
  connectionStats(): ConnectionStats[] {
    return [...this.connections].map((c) => c.stats);
  }

  private accept(socket: net.Socket): void {
    if (this.shuttingDown) return void socket.destroy();
    if (this.maxConnections > 0 && this.connections.size >= this.maxConnections) {
      if (this.waiting.length >= MAX_WAITING_CONNECTIONS) return void socket.destroy();
      socket.on('error', () => undefined);
      socket.once('close', () => {
        const i = this.waiting.indexOf(socket);
        if (i >= 0) this.waiting.splice(i, 1);
      });
      this.waiting.push(socket);
      return;
    }
    const conn = new NbdConnection(this.host, socket);
    this.connections.add(conn);
    conn.start();
  }

  private connectionClosed(conn: NbdConnection): void {
    if (!this.connections.delete(conn)) return;
    this.opts.onClientClosed?.({ negotiated: conn.negotiated, remaining: this.connections.size });
    for (const w of [...this.closedWaiters]) w();
    while (!this.shuttingDown && this.waiting.length > 0) {
      if (this.maxConnections > 0 && this.connections.size >= this.maxConnections) break;
      const next = this.waiting.shift()!;
      if (!next.destroyed) this.accept(next);
    }
  }

  /** Resolves when `done()` holds (checked whenever a connection closes) or after `timeoutMs`. */
  private waitUntil(done: () => boolean, timeoutMs: number): Promise<boolean> {
    if (done()) return Promise.resolve(true);
    return new Promise((resolve) => {
      const check = () => {
        if (!done()) return;
        finish(true);
      };
      const timer = setTimeout(() => finish(false), timeoutMs);
      const finish = (ok: boolean) => {
        clearTimeout(timer);
        this.closedWaiters.delete(check);
        resolve(ok);
      };
      this.closedWaiters.add(check);
    });
  }

  // ------------------------------------------------------------ shutdown

  /** Graceful shutdown (see the file comment). Safe to call twice. */
  async close(): Promise<void> {
    if (this.shuttingDown) {
      await this.waitUntil(() => this.connections.size === 0, SHUTDOWN_WAIT_MS);
      return;
    }
    this.shuttingDown = true;
    // net.Server's close callback waits for every connection: start it now, await it last.
    const listenersClosed = Promise.all(this.listeners.splice(0).map((l) => closeListener(l.server, l.unixPath)));
    for (const s of this.waiting.splice(0)) s.destroy();
    for (const conn of [...this.connections]) conn.beginShutdown();
    const idle = await this.waitUntil(() => this.connections.size === 0, SHUTDOWN_WAIT_MS);
    if (!idle) for (const conn of [...this.connections]) conn.dropHard('Server is shutting down');
    await this.waitUntil(() => this.connections.size === 0, SHUTDOWN_WAIT_MS);
    await listenersClosed;
    let failure: unknown = null;
    for (const exp of [...this.exports.values()]) {
      this.exports.delete(exp.name);
      await exp.close().catch((e: unknown) => (failure ??= e));
    }
    if (failure) throw failure;
  }
}

/** QEMU unlinks a leftover socket file before binding a unix listener. */
function removeStaleSocket(path: string): void {
  try {
    if (fs.lstatSync(path).isSocket()) fs.unlinkSync(path);
  } catch {
    // absent: nothing to remove
  }
}

function closeListener(server: net.Server, unixPath?: string): Promise<void> {
  return new Promise((resolve) => {
    server.close(() => {
      if (unixPath) removeStaleSocket(unixPath);
      resolve();
    });
  });
}

/** QEMU's socket_listen messages for a listen that failed. */
export function listenFailure(addr: NbdAddress, e: unknown): string {
  let code = (e as NodeJS.ErrnoException).code;
  // Node reports a unix socket in a missing directory as EACCES; bind(2) says ENOENT.
  if (addr.type === 'unix' && code === 'EACCES' && !fs.existsSync(path.dirname(addr.path))) code = 'ENOENT';
  const reason = isErrnoCode(code) ? strerror(code) : (e as Error).message;
  if (addr.type === 'unix') return `Failed to bind socket to ${addr.path}: ${reason}`;
  if (code === 'EADDRINUSE') return `Failed to find an available port: ${reason}`;
  return `Failed to bind socket: ${reason}`;
}
