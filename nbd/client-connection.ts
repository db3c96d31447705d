/*
 * One NBD connection in the transmission phase: requests go out with a
 * fresh cookie each, replies come back in any order and are matched to
 * their request by cookie (block/nbd.c's requests[] table, as a map).
 *
 * At most `maxInFlight` requests (16, QEMU's MAX_NBD_REQUESTS) are on the
 * wire; further ones wait for a slot in FIFO order. Frames are decoded as
 * they arrive and handed to the request's ReplyCollector synchronously; a
 * request completes when its simple reply or its DONE chunk arrives.
 *
 * Failure: a frame that breaks the protocol (unknown cookie, a structured
 * reply nobody negotiated, a collector's ProtocolError) fails the request
 * it belongs to with EINVAL and ends the connection; when the connection
 * ends for any reason every request in flight and every request waiting
 * for a slot is rejected with a ConnectionEndedError carrying the reason,
 * so no caller waits on a dead socket. The client decides whether to retry
 * on a new connection (client.ts).
 *
 * Request data (WRITE payloads) is written straight from the caller's
 * buffer after the header, in one corked write; the caller must not change
 * it until the request settles.
 */
import { BlockError } from '../block/errors.js';
import { Cmd, ReplyFlag } from './protocol.js';
import type { FrameStream, StreamEnd } from './client-frames.js';
import type { NbdExportInfo } from './client-handshake.js';
import { ProtocolError, decodeChunk, type ReplyCollector } from './client-replies.js';
import type { ServerFrame } from './stream.js';
import { encodeRequest, type ChunkHeader } from './wire-transmission.js';

/** A request as sent: type, flags, range, and the WRITE payload if any. */
export interface RequestSpec {
  type: number;
  flags: number;
  offsetBytes: number;
  lengthBytes: number;
  payload?: Uint8Array;
}

/** The connection ended under a request; `end` says why. */
export class ConnectionEndedError extends BlockError {
  constructor(readonly end: StreamEnd) {
    super('EIO', `Connection closed: ${end.message}`);
  }
}

interface InFlight {
  spec: RequestSpec;
  collector: ReplyCollector<unknown>;
  resolve(value: unknown): void;
  reject(e: Error): void;
}

export class NbdConnection {
  private readonly pending = new Map<bigint, InFlight>();
  private readonly slotWaiters: Array<{ resolve(): void; reject(e: Error): void }> = [];
  private used = 0;
  private idleWaiters: Array<() => void> = [];
  private nextCookie = 1n;
  private readonly extended: boolean;
  private readonly structured: boolean;

  constructor(
    readonly frames: FrameStream,
    readonly info: NbdExportInfo,
    readonly maxInFlight: number,
  ) {
    this.extended = info.mode === 'extended';
    this.structured = info.mode === 'structured' || this.extended;
    frames.replyDataBytes = (cookie) => this.pending.get(cookie)?.collector.simpleDataBytes ?? 0;
    frames.setDispatcher((frame) => this.dispatch(frame));
    frames.onEnded((end) => this.failAll(end));
  }

  get ended(): StreamEnd | null {
    return this.frames.end;
  }

  /** Requests on the wire. */
  get inFlight(): number {
    return this.pending.size;
  }

  /** Sends a request and resolves with what its collector assembled. */
  async request<T>(spec: RequestSpec, collector: ReplyCollector<T>): Promise<T> {
    await this.acquireSlot();
    try {
      return await new Promise<T>((resolve, reject) => {
        const end = this.frames.end;
        if (end) {
          reject(new ConnectionEndedError(end));
          return;
        }
        const cookie = this.nextCookie++;
        this.pending.set(cookie, { spec, collector, resolve: resolve as (v: unknown) => void, reject });
        const header = encodeRequest(
          { flags: spec.flags, type: spec.type, cookie, offset: spec.offsetBytes, length: spec.lengthBytes },
          this.extended,
        );
        this.frames.send(spec.payload ? [header, spec.payload] : [header]);
      });
    } finally {
      this.releaseSlot();
    }
  }

  /** NBD_CMD_DISC (no reply), as a courtesy before closing. */
  sendDisconnect(): void {
    const header = encodeRequest({ flags: 0, type: Cmd.DISC, cookie: this.nextCookie++, offset: 0, length: 0 }, this.extended);
    this.frames.send([header]);
  }

  /** Resolves when no request is in flight or waiting for a slot (or the connection ended). */
  drained(): Promise<void> {
    if (this.idle()) return Promise.resolve();
    return new Promise((resolve) => this.idleWaiters.push(resolve));
  }

  /**
   * Half-closes after what was written is sent, then drops the socket;
   * gives up waiting for the write after `graceMs`.
   */
  endGracefully(graceMs: number): Promise<void> {
    return new Promise((resolve) => {
      const done = () => {
        clearTimeout(timer);
        this.close();
        resolve();
      };
      const timer = setTimeout(done, graceMs);
      this.frames.stream.end(done);
    });
  }

  /** Ends the connection now; requests still in flight fail. */
  close(message = 'Connection closed by the client'): void {
    this.frames.close('closed', message);
  }

  // ------------------------------------------------------------ slots

  private acquireSlot(): Promise<void> {
    const end = this.frames.end;
    if (end) return Promise.reject(new ConnectionEndedError(end));
    if (this.used < this.maxInFlight) {
      this.used++;
      return Promise.resolve();
    }
    return new Promise((resolve, reject) => this.slotWaiters.push({ resolve, reject }));
  }

  private releaseSlot(): void {
    const next = this.slotWaiters.shift();
    if (next) next.resolve();
    else this.used--;
    if (this.idle()) for (const wake of this.idleWaiters.splice(0)) wake();
  }

  private idle(): boolean {
    return this.frames.end !== null || (this.used === 0 && this.slotWaiters.length === 0);
  }

  // ------------------------------------------------------------ replies

  private dispatch(frame: ServerFrame): void {
    try {
      if (frame.kind === 'simpleReply') this.onSimple(frame.cookie, frame.error, frame.data);
      else if (frame.kind === 'chunk') this.onChunk(frame.header, frame.payload);
      else throw new ProtocolError(`Protocol error: unexpected ${frame.kind} frame during transmission`);
    } catch (e) {
      if (!(e instanceof ProtocolError)) throw e;
      this.protocolFailure(frame, e.message);
    }
  }

  private owner(cookie: bigint): InFlight {
    const req = this.pending.get(cookie);
    if (!req) throw new ProtocolError('unexpected cookie value');
    return req;
  }

  private onSimple(cookie: bigint, error: number, data: Buffer | null): void {
    const req = this.owner(cookie);
    if (this.structured && req.spec.type === Cmd.READ) {
      throw new ProtocolError('Protocol error: simple reply when structured reply chunk was expected');
    }
    req.collector.onSimple(error, data);
    this.complete(cookie, req);
  }

  private onChunk(header: ChunkHeader, raw: Buffer): void {
    if (!this.structured) throw new ProtocolError('unexpected structured reply');
    const req = this.owner(header.cookie);
    req.collector.onChunk(header, decodeChunk(header, raw));
    if (header.flags & ReplyFlag.DONE) this.complete(header.cookie, req);
  }

  private complete(cookie: bigint, req: InFlight): void {
    this.pending.delete(cookie);
    try {
      req.resolve(req.collector.finish());
    } catch (e) {
      if (e instanceof ProtocolError) {
        req.reject(new BlockError('EINVAL', e.message));
        this.frames.close('protocol', e.message);
        return;
      }
      req.reject(e as Error);
    }
  }

  /** The request the bad frame answered fails with EINVAL; then the connection ends. */
  private protocolFailure(frame: ServerFrame, message: string): void {
    const cookie = frame.kind === 'simpleReply' ? frame.cookie : frame.kind === 'chunk' ? frame.header.cookie : null;
    const req = cookie === null ? undefined : this.pending.get(cookie);
    if (req && cookie !== null) {
      this.pending.delete(cookie);
      req.reject(new BlockError('EINVAL', message));
    }
    this.frames.close('protocol', message);
  }

  private failAll(end: StreamEnd): void {
    const requests = [...this.pending.values()];
    this.pending.clear();
    for (const req of requests) req.reject(new ConnectionEndedError(end));
    for (const w of this.slotWaiters.splice(0)) w.reject(new ConnectionEndedError(end));
    for (const wake of this.idleWaiters.splice(0)) wake();
  }
}
