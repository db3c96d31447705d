/*
 * NbdClient: a connection to one export of an NBD server, with the
 * commands of the protocol as methods, large requests split to the
 * server's limits, and QEMU's reconnect behaviour.
 *
 * Commands: read (structured replies assembled from data and hole chunks),
 * write (FUA), writeZeroes (FUA, NO_HOLE, FAST_ZERO), trim (FUA), cache,
 * flush, blockStatus (any negotiated contexts, REQ_ONE), disconnect (DISC).
 * A command the export does not advertise fails with ENOTSUP before
 * anything is sent (the block layer falls back or ignores, as QEMU's
 * driver does); writes to a read-only export fail with EPERM. Server errors
 * arrive as BlockErrors with the NBD error's errno.
 *
 * Limits: READ and WRITE are split at the server's maximum payload
 * (NBD_INFO_BLOCK_SIZE maximum, at most 32 MiB, the default); WRITE_ZEROES
 * and CACHE at the same size and TRIM at 2^31 - 1 (QEMU's max_pwrite_zeroes
 * and max_pdiscard) unless extended headers lift the 32-bit length; block
 * status asks about at most 2^31 - 1 bytes without them. The pieces of one
 * call are in flight together, within the connection's 16 slots.
 *
 * Connection states (block/nbd.c): `connected`; `waiting` — the connection
 * was lost and reconnect-delay is running: requests wait for the new
 * connection and are re-sent on it; `failing` — no connection and no
 * waiting (the delay expired, or it is 0): requests fail at once with EIO
 * while attempts continue in the background; `closed` — by the user or
 * after a protocol error (QEMU's QUIT), for good. Reconnect attempts back
 * off 1, 2, 4, 8, 16 s as QEMU's connection thread does. Every wait is
 * bounded: by the delay, by the connection's life, or by close().
 */
import { BlockError } from '../block/errors.js';
import { ConnectionEndedError, NbdConnection, type RequestSpec } from './client-connection.js';
import { negotiate, type HandshakeOptions, type NbdExportInfo } from './client-handshake.js';
import { BlockStatusCollector, ReadCollector, StatusCollector, commandLabel, type BlockStatusReply, type ReplyCollector } from './client-replies.js';
import { connectSocket } from './client-socket.js';
import { Cmd, CmdFlag, MAX_BUFFER_BYTES, MAX_REQUESTS_IN_FLIGHT, TxFlag } from './protocol.js';
import type { NbdAddress } from './uri.js';

/** Largest length of a request without extended headers that QEMU sends for TRIM and BLOCK_STATUS (INT_MAX). */
export const COMPACT_LENGTH_MAX_BYTES = 2 ** 31 - 1;
/** Reconnect back-off (QEMU's connect thread): first wait and cap, in seconds. */
export const RECONNECT_FIRST_WAIT_SECONDS = 1;
export const RECONNECT_MAX_WAIT_SECONDS = 16;
/** How long a graceful disconnect waits for the DISC request to leave before dropping the socket. */
export const DISCONNECT_GRACE_MS = 1000;

export interface NbdClientOptions extends HandshakeOptions {
  address: NbdAddress;
  /** Seconds requests wait for a lost connection to come back (QEMU's reconnect-delay; default 0). */
  reconnectDelaySeconds?: number;
  /** Seconds the first connection is retried before open fails (QEMU's open-timeout; default 0: once). */
  openTimeoutSeconds?: number;
  /** Requests on the wire at once (default 16). */
  maxInFlight?: number;
}

export type ClientState = 'connected' | 'waiting' | 'failing' | 'closed';

const seconds = (s: number) => s * 1000;

/** A timer that does not keep the process alive. */
function sleep(ms: number, signal: AbortSignal): Promise<void> {
  return new Promise((resolve) => {
    const timer = setTimeout(done, ms);
    timer.unref();
    signal.addEventListener('abort', done, { once: true });
    function done() {
      clearTimeout(timer);
      signal.removeEventListener('abort', done);
      resolve();
    }
  });
}

function alignDown(value: number, align: number): number {
  return value - (value % align);
}

/** Connects and negotiates once. */
async function establish(opts: NbdClientOptions, signal: AbortSignal): Promise<NbdConnection> {
  const socket = await connectSocket(opts.address, signal);
  const onAbort = () => socket.destroy();
  signal.addEventListener('abort', onAbort, { once: true });
  try {
    const { frames, info } = await negotiate(socket, opts);
    return new NbdConnection(frames, info, opts.maxInFlight ?? MAX_REQUESTS_IN_FLIGHT);
  } finally {
    signal.removeEventListener('abort', onAbort);
  }
}

export class NbdClient {
  private conn: NbdConnection;
  private stateNow: ClientState = 'connected';
  private closedReason = 'Connection closed';
  /** Wakes requests waiting for a connection (reconnected, gave up, or closed). */
  private waiters: Array<() => void> = [];
  private readonly lifetime = new AbortController();
  private reconnecting = false;
  private waitTimer: NodeJS.Timeout | null = null;
  /** When the reconnect delay of the current outage ends (ms since the epoch; Infinity when not waiting). */
  private waitDeadline = Infinity;

  private constructor(
    private readonly opts: NbdClientOptions,
    conn: NbdConnection,
  ) {
    this.conn = conn;
    this.watch(conn);
  }

  /** Connects, retrying for openTimeoutSeconds when set (the last attempt's error is reported). */
  static async connect(opts: NbdClientOptions): Promise<NbdClient> {
    const timeoutMs = seconds(opts.openTimeoutSeconds ?? 0);
    const deadline = Date.now() + timeoutMs;
    const stop = new AbortController();
    const timer = timeoutMs > 0 ? setTimeout(() => stop.abort(), timeoutMs) : null;
    let waitSeconds = RECONNECT_FIRST_WAIT_SECONDS;
    let lastError: unknown = null;
    try {
      for (;;) {
        try {
          return new NbdClient(opts, await establish(opts, stop.signal));
        } catch (e) {
          lastError = stop.signal.aborted && lastError ? lastError : e;
          if (timeoutMs === 0 || Date.now() >= deadline || stop.signal.aborted) throw lastError;
        }
        await sleep(seconds(waitSeconds), stop.signal);
        waitSeconds = Math.min(waitSeconds * 2, RECONNECT_MAX_WAIT_SECONDS);
      }
    } finally {
      if (timer) clearTimeout(timer);
    }
  }

  // ------------------------------------------------------------ what the server said

  get info(): NbdExportInfo {
    return this.conn.info;
  }

  get state(): ClientState {
    return this.stateNow;
  }

  get sizeBytes(): number {
    return this.info.sizeBytes;
  }

  /** A transmission flag of the export. */
  can(flag: number): boolean {
    return (this.info.flags & flag) !== 0;
  }

  get readOnly(): boolean {
    return this.can(TxFlag.READ_ONLY);
  }

  get extended(): boolean {
    return this.info.mode === 'extended';
  }

  /** Largest READ/WRITE payload: the server's maximum, at most (and by default) 32 MiB. */
  get maxPayloadBytes(): number {
    const max = this.info.maxBlock > 0 ? Math.min(this.info.maxBlock, MAX_BUFFER_BYTES) : MAX_BUFFER_BYTES;
    return alignDown(max, Math.max(1, this.info.minBlock));
  }

  /** Requests must be multiples of this (the server's minimum block size, else 1). */
  get alignmentBytes(): number {
    return Math.max(1, this.info.minBlock);
  }

  // ------------------------------------------------------------ commands

  async read(offsetBytes: number, buf: Uint8Array, opts: { df?: boolean } = {}): Promise<void> {
    if (opts.df) this.require(TxFlag.SEND_DF, 'DF');
    const flags = opts.df ? CmdFlag.DF : 0;
    const structured = this.info.mode === 'structured' || this.extended;
    await this.forPieces(offsetBytes, buf.length, this.maxPayloadBytes, (at, n) => {
      const piece = buf.subarray(at - offsetBytes, at - offsetBytes + n);
      return this.send({ type: Cmd.READ, flags, offsetBytes: at, lengthBytes: n }, () => new ReadCollector(at, piece, structured));
    });
  }

  async write(offsetBytes: number, buf: Uint8Array, opts: { fua?: boolean } = {}): Promise<void> {
    this.requireWritable();
    const flags = this.fuaFlag(opts.fua);
    await this.forPieces(offsetBytes, buf.length, this.maxPayloadBytes, (at, n) => {
      const payload = buf.subarray(at - offsetBytes, at - offsetBytes + n);
      return this.command({ type: Cmd.WRITE, flags, offsetBytes: at, lengthBytes: n, payload });
    });
  }

  async writeZeroes(offsetBytes: number, bytes: number, opts: { fua?: boolean; noHole?: boolean; fastZero?: boolean } = {}): Promise<void> {
    this.requireWritable();
    this.require(TxFlag.SEND_WRITE_ZEROES, 'WRITE_ZEROES');
    if (opts.fastZero) this.require(TxFlag.SEND_FAST_ZERO, 'FAST_ZERO');
    const flags = this.fuaFlag(opts.fua) | (opts.noHole ? CmdFlag.NO_HOLE : 0) | (opts.fastZero ? CmdFlag.FAST_ZERO : 0);
    const limit = this.extended ? Number.MAX_SAFE_INTEGER : this.maxPayloadBytes;
    await this.forPieces(offsetBytes, bytes, limit, (at, n) => this.command({ type: Cmd.WRITE_ZEROES, flags, offsetBytes: at, lengthBytes: n }));
  }

  async trim(offsetBytes: number, bytes: number, opts: { fua?: boolean } = {}): Promise<void> {
    this.requireWritable();
    this.require(TxFlag.SEND_TRIM, 'TRIM');
    const flags = this.fuaFlag(opts.fua);
    const limit = this.extended ? Number.MAX_SAFE_INTEGER : alignDown(COMPACT_LENGTH_MAX_BYTES, this.alignmentBytes);
    await this.forPieces(offsetBytes, bytes, limit, (at, n) => this.command({ type: Cmd.TRIM, flags, offsetBytes: at, lengthBytes: n }));
  }

  async cache(offsetBytes: number, bytes: number): Promise<void> {
    this.require(TxFlag.SEND_CACHE, 'CACHE');
    const limit = this.extended ? Number.MAX_SAFE_INTEGER : this.maxPayloadBytes;
    await this.forPieces(offsetBytes, bytes, limit, (at, n) => this.command({ type: Cmd.CACHE, flags: 0, offsetBytes: at, lengthBytes: n }));
  }

  async flush(): Promise<void> {
    this.require(TxFlag.SEND_FLUSH, 'FLUSH');
    await this.command({ type: Cmd.FLUSH, flags: 0, offsetBytes: 0, lengthBytes: 0 });
  }

  /**
   * Block status of [offset, offset + bytes) for every negotiated context
   * (or those named). The answer may describe less than asked (servers stop
   * early; without extended headers at most 2^31 - 1 bytes are asked);
   * extents never reach past the request.
   */
  async blockStatus(offsetBytes: number, bytes: number, opts: { reqOne?: boolean } = {}): Promise<BlockStatusReply> {
    if (this.info.contexts.size === 0) throw new BlockError('ENOTSUP', 'NBD server negotiated no metadata contexts');
    const limit = this.extended ? bytes : Math.min(bytes, alignDown(COMPACT_LENGTH_MAX_BYTES, this.alignmentBytes));
    const flags = opts.reqOne ? CmdFlag.REQ_ONE : 0;
    return this.send({ type: Cmd.BLOCK_STATUS, flags, offsetBytes, lengthBytes: limit }, () => {
      const byId = new Map([...this.conn.info.contexts].map(([name, id]) => [id, name] as const));
      return new BlockStatusCollector(byId, limit, opts.reqOne ?? false);
    });
  }

  /** Graceful end: waits for requests in flight, sends NBD_CMD_DISC, closes. */
  async disconnect(): Promise<void> {
    if (this.stateNow === 'closed') return;
    this.shutDown('Connection closed by the client');
    const conn = this.conn;
    await conn.drained();
    if (!conn.ended) {
      conn.sendDisconnect();
      await conn.endGracefully(DISCONNECT_GRACE_MS);
    }
  }

  /** Hard close: requests in flight fail, nothing more is sent. */
  close(): void {
    if (this.stateNow === 'closed') return;
    this.shutDown('Connection closed by the client');
    this.conn.close();
  }

  // ------------------------------------------------------------ sending

  private require(flag: number, what: string): void {
    if (!this.can(flag)) throw new BlockError('ENOTSUP', `NBD server does not support ${what}`);
  }

  private requireWritable(): void {
    if (this.readOnly) throw new BlockError('EPERM', 'NBD export is read-only');
  }

  private fuaFlag(fua: boolean | undefined): number {
    if (!fua) return 0;
    this.require(TxFlag.SEND_FUA, 'FUA');
    return CmdFlag.FUA;
  }

  /** Runs `op` on pieces of at most `limit` bytes, all at once; fails with the first error after all settle. */
  private async forPieces(offsetBytes: number, bytes: number, limit: number, op: (at: number, n: number) => Promise<unknown>): Promise<void> {
    if (bytes === 0) return;
    const pieces: Array<Promise<unknown>> = [];
    for (let done = 0; done < bytes; ) {
      const n = Math.min(limit, bytes - done);
      pieces.push(op(offsetBytes + done, n));
      done += n;
    }
    const results = await Promise.allSettled(pieces);
    const failed = results.find((r): r is PromiseRejectedResult => r.status === 'rejected');
    if (failed) throw failed.reason;
  }

  private command(spec: RequestSpec): Promise<void> {
    return this.send(spec, () => new StatusCollector(commandLabel(spec.type)));
  }

  /**
   * Sends on the current connection; when the connection is lost under the
   * request and reconnect-delay allows, waits for the next one and sends
   * again (QEMU re-sends every request the lost connection swallowed).
   */
  private async send<T>(spec: RequestSpec, collector: () => ReplyCollector<T>): Promise<T> {
    let deadline = 0;
    for (;;) {
      const conn = await this.connection(deadline);
      try {
        return await conn.request(spec, collector());
      } catch (e) {
        if (!(e instanceof ConnectionEndedError) || e.end.kind !== 'lost') throw e;
        if (deadline === 0) deadline = Date.now() + seconds(this.opts.reconnectDelaySeconds ?? 0);
        if (Date.now() >= deadline) throw new BlockError('EIO', e.message);
      }
    }
  }

  // ------------------------------------------------------------ reconnect

  /** The connection to send on, waiting (until `deadline`, or the state's own) while reconnecting. */
  private async connection(deadline: number): Promise<NbdConnection> {
    for (;;) {
      if (this.stateNow === 'connected' && !this.conn.ended) return this.conn;
      if (this.stateNow === 'closed') throw new BlockError('EIO', this.closedReason);
      if (this.stateNow === 'failing' || (deadline !== 0 && Date.now() >= deadline)) {
        throw new BlockError('EIO', 'No connection at the moment');
      }
      await this.nextStateChange(deadline);
    }
  }

  /**
   * Waits for the state to change, at most until the earlier of `deadline`
   * and the end of the reconnect delay. The timer is what keeps a process
   * whose only work is this request alive while the server is away.
   */
  private nextStateChange(deadline: number): Promise<void> {
    const until = Math.min(deadline || Infinity, this.waitDeadline);
    return new Promise((resolve) => {
      const timer = until === Infinity ? null : setTimeout(wake, Math.max(0, until - Date.now()));
      function wake() {
        if (timer) clearTimeout(timer);
        resolve();
      }
      this.waiters.push(wake);
    });
  }

  private wakeAll(): void {
    for (const wake of this.waiters.splice(0)) wake();
  }

  private watch(conn: NbdConnection): void {
    conn.frames.onEnded((end) => {
      if (this.conn !== conn || this.stateNow === 'closed') return;
      if (end.kind !== 'lost') {
        this.shutDown(`Connection closed: ${end.message}`);
        return;
      }
      this.connectionLost();
    });
  }

  private connectionLost(): void {
    const delayMs = seconds(this.opts.reconnectDelaySeconds ?? 0);
    this.stateNow = delayMs > 0 ? 'waiting' : 'failing';
    if (delayMs > 0) {
      this.waitDeadline = Date.now() + delayMs;
      this.waitTimer = setTimeout(() => {
        this.stopWaiting();
        if (this.stateNow === 'waiting') this.stateNow = 'failing';
        this.wakeAll();
      }, delayMs);
      this.waitTimer.unref();
    }
    this.wakeAll();
    void this.reconnectLoop();
  }

  private async reconnectLoop(): Promise<void> {
    if (this.reconnecting) return;
    this.reconnecting = true;
    let waitSeconds = RECONNECT_FIRST_WAIT_SECONDS;
    try {
      while (this.stateNow === 'waiting' || this.stateNow === 'failing') {
        const conn = await establish(this.opts, this.lifetime.signal).catch(() => null);
        if (conn) return this.adopt(conn);
        await sleep(seconds(waitSeconds), this.lifetime.signal);
        waitSeconds = Math.min(waitSeconds * 2, RECONNECT_MAX_WAIT_SECONDS);
      }
    } finally {
      this.reconnecting = false;
    }
  }

  /** Takes a new connection, unless the client was closed meanwhile or the export changed size. */
  private adopt(conn: NbdConnection): void {
    if (this.stateNow === 'closed') {
      conn.close();
      return;
    }
    if (conn.info.sizeBytes !== this.conn.info.sizeBytes) {
      conn.close();
      this.shutDown('Connection closed: the export changed size across a reconnection');
      return;
    }
    this.stopWaiting();
    this.conn = conn;
    this.stateNow = 'connected';
    this.watch(conn);
    this.wakeAll();
  }

  private stopWaiting(): void {
    if (this.waitTimer) clearTimeout(this.waitTimer);
    this.waitTimer = null;
    this.waitDeadline = Infinity;
  }

  private shutDown(reason: string): void {
    this.stateNow = 'closed';
    this.closedReason = reason;
    this.stopWaiting();
    this.lifetime.abort();
    this.wakeAll();
  }
}
