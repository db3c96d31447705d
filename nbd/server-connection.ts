/*
 * One client connection of the NBD server: the socket, the incremental
 * parser, the handshake, and the requests in flight.
 *
 * Phases: `handshake` (greeting sent; options handled one at a time, the
 * socket paused while an option is answered) → `transmission` (after GO or
 * EXPORT_NAME) → `closing` → `closed`. A protocol error (bad magic, an
 * option over 32 MiB, unknown client flags, …) disconnects this client
 * only, after logging QEMU's message ("option negotiation failed: …" or
 * "Disconnect client, due to: …"); nothing a client sends can throw out of
 * here.
 *
 * Transmission: requests are parsed and started as they arrive, and run
 * concurrently; replies go out as each finishes (out of order). At most
 * MAX_REQUESTS_IN_FLIGHT requests and about MAX_IN_FLIGHT_BYTES of their
 * data are in flight; at the limit the socket is paused, so a fast client
 * is slowed by TCP, and memory stays bounded. A request stays in flight
 * until its last reply frame has been handed to the OS, so a client that
 * does not read its replies cannot make the server buffer without end.
 *
 * Ending: NBD_CMD_DISC stops reading; the connection closes once the
 * requests in flight are answered. A graceful server shutdown does the same
 * and answers requests that still arrive with ESHUTDOWN. A hard drop (hard
 * export removal) answers every request in flight with ESHUTDOWN at once
 * and closes; their block-layer work finishes in the background and its
 * replies are discarded. A handshake that takes longer than the server's
 * limit is cut off.
 */
import net from 'node:net';
import type { Duplex } from 'node:stream';
import { ClientStreamParser, type ClientFrame } from './stream.js';
import type { ExportClient, NbdExport } from './export.js';
import { Handshake, type HandshakeHost, type OptionOutcome } from './server-handshake.js';
import {
  checkRequest,
  handleRequest,
  replyError,
  type ActiveRequest,
  type ReplySink,
  type Transmission,
} from './server-requests.js';
import { Cmd, HandshakeFlag, MAX_BUFFER_BYTES, MAX_REQUESTS_IN_FLIGHT } from './protocol.js';
import { ReplyWriter } from './reply-writer.js';
import { openSocketSender } from './socket-sender.js';
import { encodeGreeting } from './wire-handshake.js';
import { EXTENDED_REQUEST_BYTES } from './wire-transmission.js';
import type { NbdServerTls } from './tls.js';
import type { BufferPool } from './buffer-pool.js';

/** Data bytes of requests in flight above which no new request is started. */
export const MAX_IN_FLIGHT_BYTES = 64 * 1024 * 1024;
/** Most bytes one socket read delivers (libuv reads 64 KiB at a time; TLS records are smaller). */
export const SOCKET_READ_BYTES = 64 * 1024;
/**
 * Received bytes a connection holds unparsed at most: the largest payload
 * it waits for, its request header, and the rest of the socket read that
 * completed it (the socket is paused before the next read).
 */
export const MAX_QUEUED_INPUT_BYTES = MAX_BUFFER_BYTES + EXTENDED_REQUEST_BYTES + SOCKET_READ_BYTES;

/** What a connection holds right now (diagnostics; tests check the bounds above). */
export interface ConnectionStats {
  requestsInFlight: number;
  /** READ/WRITE data bytes of the requests in flight (< MAX_IN_FLIGHT_BYTES + MAX_BUFFER_BYTES). */
  inFlightBytes: number;
  /** Received bytes not yet parsed (≤ MAX_QUEUED_INPUT_BYTES). */
  queuedInputBytes: number;
  /** Reply bytes written but not yet handed to the OS. */
  queuedReplyBytes: number;
}

/** What a connection needs from its server. */
export interface ConnectionHost {
  findExport(name: string): NbdExport | undefined;
  listExports(): readonly NbdExport[];
  readonly multiConn: boolean;
  readonly tls: NbdServerTls | null;
  readonly shuttingDown: boolean;
  readonly handshakeMaxMs: number;
  readonly pool: BufferPool;
  log(message: string): void;
  connectionClosed(conn: NbdConnection): void;
}

type Phase = 'handshake' | 'transmission' | 'closing' | 'closed';

export class NbdConnection implements ExportClient, ReplySink {
  private stream: Duplex;
  private parser: ClientStreamParser;
  private readonly writer: ReplyWriter;
  private readonly handshake: Handshake;
  private phase: Phase = 'handshake';
  private optionBusy = false;
  private pumping = false;
  private transmission: Transmission | null = null;
  private readonly inFlight = new Set<ActiveRequest>();
  private inFlightBytes = 0;
  /** No further requests are read (DISC, hard drop, fatal frame). */
  private stopReading = false;
  /** The client half-closed: serve what was received, then close. */
  private inputEnded = false;
  /** Requests still arriving are answered ESHUTDOWN (graceful shutdown). */
  private refusing = false;
  private handshakeTimer: NodeJS.Timeout | null = null;
  private readonly onData = (chunk: Buffer) => {
    this.parser.push(chunk);
    this.pump();
  };
  /** The connection completed the handshake (for the server's accounting). */
  negotiated = false;
  exp: NbdExport | null = null;

  constructor(
    private readonly host: ConnectionHost,
    readonly socket: net.Socket,
  ) {
    this.stream = socket;
    this.parser = this.newParser();
    this.writer = new ReplyWriter(socket, () => this.destroy());
    this.handshake = new Handshake(this.handshakeHost());
  }

  /** Sends the greeting and starts reading. */
  start(): void {
    if (this.socket instanceof net.Socket) this.socket.setNoDelay(true);
    this.socket.on('error', () => undefined);
    this.socket.on('close', () => this.closed());
    this.listen(this.socket);
    if (this.host.handshakeMaxMs > 0) {
      this.handshakeTimer = setTimeout(() => this.fatal('handshake timed out'), this.host.handshakeMaxMs);
    }
    void this.writer.send([encodeGreeting(HandshakeFlag.FIXED_NEWSTYLE | HandshakeFlag.NO_ZEROES)]);
    this.pump();
  }

  get isClosed(): boolean {
    return this.phase === 'closed';
  }

  /** Payloads that span socket chunks are gathered into pooled buffers. */
  private newParser(): ClientStreamParser {
    const pool = this.host.pool;
    return new ClientStreamParser({ allocPayload: (bytes) => pool.acquire(bytes) });
  }

  get requestsInFlight(): number {
    return this.inFlight.size;
  }

  get stats(): ConnectionStats {
    return {
      requestsInFlight: this.inFlight.size,
      inFlightBytes: this.inFlightBytes,
      queuedInputBytes: this.parser.bufferedBytes,
      queuedReplyBytes: this.stream.writableLength,
    };
  }

  private listen(stream: Duplex): void {
    stream.on('data', this.onData);
    stream.on('end', () => this.endOfInput());
  }

  private handshakeHost(): HandshakeHost {
    const host = this.host;
    return {
      findExport: (name) => host.findExport(name),
      listExports: () => host.listExports(),
      multiConn: host.multiConn,
      tlsConfigured: host.tls !== null,
      get shuttingDown() {
        return host.shuttingDown;
      },
      send: (parts) => this.writer.send(parts),
      startTls: () => this.startTls(),
    };
  }

  // ------------------------------------------------------------ reading

  /** Takes frames while the phase and the limits allow; pauses the stream otherwise. */
  private pump(): void {
    if (this.pumping) return;
    this.pumping = true;
    try {
      this.takeFrames();
    } finally {
      this.pumping = false;
    }
    this.maybeFinish();
  }

  private takeFrames(): void {
    while (this.phase === 'handshake' || this.phase === 'transmission') {
      if (this.blocked()) {
        this.stream.pause();
        return;
      }
      const r = this.parser.next();
      if (!r.ok) return this.fatal(r.reason);
      if (!r.value) break;
      this.dispatch(r.value);
    }
    if (!this.stopReading && !this.inputEnded && this.phase !== 'closed') this.stream.resume();
  }

  private blocked(): boolean {
    if (this.stopReading) return true;
    if (this.phase === 'handshake') return this.optionBusy;
    return this.inFlight.size >= MAX_REQUESTS_IN_FLIGHT || this.inFlightBytes >= MAX_IN_FLIGHT_BYTES;
  }

  private dispatch(frame: ClientFrame): void {
    switch (frame.kind) {
      case 'clientFlags': {
        const reason = this.handshake.clientFlags(frame.flags);
        if (reason) this.fatal(reason);
        return;
      }
      case 'option':
        this.optionBusy = true;
        this.handshake
          .option(frame.option, frame.length, frame.data)
          .then((outcome) => this.optionDone(outcome), (e: unknown) => this.fatal(String((e as Error)?.message ?? e)))
          .finally(() => {
            this.optionBusy = false;
            this.pump();
          });
        return;
      case 'request':
        this.startRequest(frame);
        return;
    }
  }

  private endOfInput(): void {
    this.inputEnded = true;
    if (this.phase === 'handshake') this.destroy();
    else this.pump();
  }

  // ------------------------------------------------------------ handshake

  private optionDone(outcome: OptionOutcome): void {
    if (this.phase !== 'handshake') return;
    if (outcome.next === 'close') {
      if (outcome.error) this.fatal(outcome.error);
      else this.end();
      return;
    }
    if (outcome.next === 'transmission') this.enterTransmission(outcome.exp);
  }

  private enterTransmission(exp: NbdExport): void {
    if (this.handshakeTimer) clearTimeout(this.handshakeTimer);
    this.handshakeTimer = null;
    this.phase = 'transmission';
    this.negotiated = true;
    this.exp = exp;
    exp.clients.add(this);
    const hs = this.handshake;
    this.transmission = { exp, structured: hs.structured, extended: hs.extended, contexts: hs.contexts, pool: this.host.pool };
    this.parser.enterTransmission(hs.extended);
    // Plain sockets answer large READs from the host file on a thread of their own.
    const sender = this.stream === this.socket && this.socket instanceof net.Socket ? openSocketSender(this.socket) : null;
    if (sender) this.writer.attachSender(sender);
    if (this.host.shuttingDown) this.beginShutdown();
  }

  private async startTls(): Promise<void> {
    const tls = this.host.tls;
    if (!tls || !(this.socket instanceof net.Socket)) throw new Error('TLS is not configured');
    this.stream.removeListener('data', this.onData);
    this.stream.pause();
    const pending = this.parser.takeBuffered();
    const secure = await tls.upgrade(this.socket, pending);
    this.stream = secure;
    this.writer.setStream(secure);
    this.parser = this.newParser();
    this.parser.startAtOptions();
    secure.on('error', () => undefined);
    secure.on('close', () => this.closed());
    this.listen(secure);
  }

  // ------------------------------------------------------------ transmission

  private startRequest(frame: Extract<ClientFrame, { kind: 'request' }>): void {
    const t = this.transmission!;
    const h = frame.header;
    if (h.type === Cmd.DISC || frame.oversize) {
      // After DISC nothing is read; after an over-long request the stream is out of step.
      this.stopReading = true;
      this.parser.stop();
      if (h.type === Cmd.DISC) return;
    }
    const req: ActiveRequest = {
      header: h,
      payload: frame.payload,
      target: { extended: t.extended, cookie: h.cookie, offset: h.offset, offsetBig: h.offsetBig },
      answered: false,
    };
    const cost = h.type === Cmd.READ || h.type === Cmd.WRITE ? Math.min(h.length, MAX_IN_FLIGHT_BYTES) : 0;
    this.inFlight.add(req);
    this.inFlightBytes += cost;
    void this.serve(t, req, frame.oversize).finally(() => {
      // The block layer is done with the payload: a pooled one can be reused.
      if (frame.payloadAllocated && frame.payload) this.host.pool.release(frame.payload);
      this.inFlight.delete(req);
      this.inFlightBytes -= cost;
      this.pump();
    });
  }

  private async serve(t: Transmission, req: ActiveRequest, oversize: boolean): Promise<void> {
    try {
      if (this.refusing) return await replyError(t, this, req, { code: 'ESHUTDOWN', message: 'Server is shutting down' });
      const err = checkRequest(t, req);
      if (err) {
        await replyError(t, this, req, err);
        // The payload of an over-long request was not read: the stream is out of step.
        if (oversize) this.fatal(err.message, true);
        return;
      }
      await handleRequest(t, this, req);
    } catch (e) {
      this.host.log(`Disconnect client, due to: ${String((e as Error)?.message ?? e)}`);
      this.destroy();
    }
  }

  /** ReplySink: one frame of the reply to `req`; dropped once answered or closed. */
  send(req: ActiveRequest, parts: Buffer[], final: boolean): Promise<void> {
    if (req.answered) return Promise.resolve();
    if (final) req.answered = true;
    return this.writer.send(parts);
  }

  /** ReplySink: whether `sendFile` frames can go out on this connection. */
  get sendsFiles(): boolean {
    return this.writer.sendsFiles;
  }

  /** ReplySink: a frame of `header` and a host file's range, as `send`. */
  sendFile(req: ActiveRequest, header: Buffer, fd: number, offsetBytes: number, bytes: number, final: boolean): Promise<void> {
    if (req.answered) return Promise.resolve();
    if (final) req.answered = true;
    return this.writer.sendFile(header, fd, offsetBytes, bytes);
  }

  // ------------------------------------------------------------ ending

  /** Graceful shutdown: finish requests in flight, refuse later ones, then close. */
  beginShutdown(): void {
    if (this.phase === 'handshake') return this.destroy();
    this.refusing = true;
    this.maybeFinish();
  }

  /** Hard drop: ESHUTDOWN for everything in flight, then close. */
  dropHard(reason: string): void {
    if (this.phase === 'closed') return;
    this.stopReading = true;
    const t = this.transmission;
    if (t) {
      for (const req of this.inFlight) void replyError(t, this, req, { code: 'ESHUTDOWN', message: reason });
    }
    this.end();
  }

  /** Closes once nothing is in flight, after DISC, end of input, or during shutdown. */
  private maybeFinish(): void {
    if (this.phase !== 'transmission' || this.inFlight.size > 0) return;
    if (this.stopReading || this.inputEnded || (this.refusing && this.parser.bufferedBytes === 0)) this.end();
  }

  /** A protocol error: log QEMU's message and disconnect this client. */
  private fatal(reason: string, afterReply = false): void {
    if (this.phase === 'closed' || this.phase === 'closing') return;
    const prefix = this.phase === 'handshake' ? 'option negotiation failed: ' : 'Disconnect client, due to: ';
    this.host.log(prefix + reason);
    this.parser.stop();
    this.stopReading = true;
    if (afterReply) this.end();
    else this.destroy();
  }

  /** Flushes what was written, then closes. */
  private end(): void {
    if (this.phase === 'closed' || this.phase === 'closing') return;
    this.phase = 'closing';
    // Nothing more is parsed: what the client still sends is dropped, not queued.
    this.parser.stop();
    this.writer.close();
    // Frames still on the sender's thread go first; then the write side closes.
    void this.writer.idle().then(() => {
      this.writer.releaseSender();
      this.stream.end();
    });
    // A client that never reads would keep the socket half-open: bound the wait.
    setTimeout(() => this.destroy(), 5_000).unref();
  }

  private destroy(): void {
    if (this.phase === 'closed') return;
    this.writer.abort();
    this.stream.destroy();
    if (this.stream !== this.socket) this.socket.destroy();
    this.closed();
  }

  private closed(): void {
    if (this.phase === 'closed') return;
    this.phase = 'closed';
    if (this.handshakeTimer) clearTimeout(this.handshakeTimer);
    this.parser.stop();
    this.writer.abort();
    for (const req of this.inFlight) req.answered = true;
    if (!this.socket.destroyed) this.socket.destroy();
    this.exp?.clients.delete(this);
    this.host.connectionClosed(this);
  }
}
