/*
 * The receiving half of an NBD client connection: socket bytes go through
 * the shared incremental parser (stream.ts ServerStreamParser) and come out
 * as frames — option replies during the handshake, simple replies and
 * reply chunks during transmission.
 *
 * Two ways to consume frames: the handshake awaits them one at a time with
 * `next(what)`; transmission installs a dispatcher that is called
 * synchronously for every frame as soon as it is complete, so replies never
 * queue up here. Either way nothing waits longer than the connection lives:
 * when the stream ends, errors, or the parser meets a protocol violation,
 * the stream is `ended` once with a reason, every waiter is rejected with
 * it, and the end listeners run (the connection fails its requests).
 *
 * End kinds: `lost` (EOF or a socket error: the server may come back, a
 * reconnect can help), `protocol` (the server broke the protocol; QEMU
 * quits such a connection for good), `closed` (we closed it).
 *
 * The greeting is looked at before the parser: a bad magic is reported with
 * the value QEMU prints ("Bad initial magic received: 0x48454c4c4f20574f"),
 * and an oldstyle server (which the shared parser does not speak) is read
 * here and handed on as an `exportNameReply` frame.
 */
import type { Duplex } from 'node:stream';
import { BlockError, isErrnoCode, strerror } from '../block/errors.js';
import { IHAVEOPT, NBDMAGIC, OLDSTYLE_MAGIC } from './protocol.js';
import { ServerStreamParser, type ServerFrame } from './stream.js';
import { encodeGreeting } from './wire-handshake.js';
import { readU64 } from './wire-util.js';

export type EndKind = 'lost' | 'protocol' | 'closed';

export interface StreamEnd {
  kind: EndKind;
  /** Why, in QEMU's words ("Unexpected end-of-file before all data were read"). */
  message: string;
}

export const EOF_MESSAGE = 'Unexpected end-of-file before all data were read';
/** Bytes that tell the greeting's kind: NBDMAGIC and the second magic. */
const PREFIX_BYTES = 16;
/** Oldstyle greeting: two magics, size (8), flags (4), 124 zero bytes. */
const OLDSTYLE_GREETING_BYTES = 152;

/** The message QEMU gives a socket error. */
function socketErrorMessage(e: unknown): string {
  const code = (e as { code?: string } | null)?.code;
  if (code === 'EPIPE') return 'Unable to write to socket: Broken pipe';
  if (code === 'ECONNRESET') return 'Unable to read from socket: Connection reset by peer';
  const text = isErrnoCode(code) ? strerror(code) : String((e as Error)?.message ?? e);
  return `Unable to read from socket: ${text}`;
}

interface Waiter {
  resolve(frame: ServerFrame): void;
  reject(e: Error): void;
  what: string;
}

export class FrameStream {
  private readonly parser: ServerStreamParser;
  private readonly queued: ServerFrame[] = [];
  private waiter: Waiter | null = null;
  private dispatcher: ((frame: ServerFrame) => void) | null = null;
  private readonly endListeners: Array<(end: StreamEnd) => void> = [];
  private prefix = Buffer.alloc(0);
  private detached = false;
  /** The greeting was parsed (or skipped): later failures are not about the magics. */
  private greeted = false;
  end: StreamEnd | null = null;

  private readonly onData = (chunk: Buffer) => this.receive(chunk);
  private readonly onEnd = () => this.finish({ kind: 'lost', message: EOF_MESSAGE });
  private readonly onError = (e: unknown) => this.finish({ kind: 'lost', message: socketErrorMessage(e) });
  private readonly onClose = () => this.finish({ kind: 'lost', message: EOF_MESSAGE });
  /**
   * How many data bytes follow a successful simple reply to `cookie` (the
   * READ's length; 0 for anything else). The connection sets it.
   */
  replyDataBytes: (cookie: bigint) => number = () => 0;

  /**
   * `afterGreeting`: the stream starts in the option phase (after STARTTLS,
   * the encrypted stream carries no greeting).
   */
  constructor(
    readonly stream: Duplex,
    afterGreeting = false,
  ) {
    this.parser = new ServerStreamParser({ simpleReplyDataBytes: (cookie) => this.replyDataBytes(cookie) });
    if (afterGreeting) {
      // The parser has no "start in options" switch: feed it a greeting and drop the frame.
      this.parser.push(encodeGreeting(0));
      this.parser.next();
      this.greeted = true;
    }
    stream.on('data', this.onData);
    stream.on('end', this.onEnd);
    stream.on('error', this.onError);
    stream.on('close', this.onClose);
  }

  get ended(): boolean {
    return this.end !== null;
  }

  /** The next handshake frame; rejects with `Failed to read WHAT: …` when the stream ends first. */
  next(what: string): Promise<ServerFrame> {
    const frame = this.queued.shift();
    if (frame) return Promise.resolve(frame);
    if (this.end) return Promise.reject(this.readError(what, this.end));
    return new Promise((resolve, reject) => {
      this.waiter = { resolve, reject, what };
    });
  }

  /** Transmission: every later frame goes to `dispatch`, synchronously. */
  setDispatcher(dispatch: (frame: ServerFrame) => void): void {
    this.dispatcher = dispatch;
    while (this.queued.length > 0 && !this.end) dispatch(this.queued.shift()!);
  }

  /** Runs `listener` once when the stream ends (at once if it has). */
  onEnded(listener: (end: StreamEnd) => void): void {
    if (this.end) listener(this.end);
    else this.endListeners.push(listener);
  }

  expectExportNameReply(noZeroes: boolean): void {
    this.parser.expectExportNameReply(noZeroes);
  }

  enterTransmission(extended: boolean): void {
    this.parser.enterTransmission(extended);
  }

  /** Writes one frame's parts back to back (one writev); a no-op once ended. */
  send(parts: readonly Uint8Array[]): void {
    if (this.end || parts.length === 0) return;
    const s = this.stream;
    s.cork();
    for (const part of parts) s.write(part);
    s.uncork();
  }

  /** Ends the stream with `kind` (protocol error or our own close) and destroys the socket. */
  close(kind: EndKind, message: string): void {
    this.finish({ kind, message });
  }

  /**
   * Stops reading without closing (STARTTLS hands the socket to TLS);
   * returns bytes received but not parsed.
   */
  detach(): Buffer {
    this.detached = true;
    this.stream.off('data', this.onData);
    this.stream.off('end', this.onEnd);
    this.stream.off('error', this.onError);
    this.stream.off('close', this.onClose);
    return this.parser.takeBuffered();
  }

  /** The eight bytes received at `at`, as QEMU prints a bad magic ("0x…"), or null. */
  private magicAt(at: number): string | null {
    if (this.prefix.length < at + 8) return null;
    return `0x${this.prefix.readBigUInt64BE(at).toString(16)}`;
  }

  /** QEMU's message for a greeting whose magics are wrong, with the value received; null if they are right. */
  private greetingProblem(): string | null {
    const initial = this.magicAt(0);
    if (initial !== null && this.prefix.readBigUInt64BE(0) !== NBDMAGIC) return `Bad initial magic received: ${initial}`;
    const server = this.magicAt(8);
    const magic = server === null ? null : this.prefix.readBigUInt64BE(8);
    if (magic !== null && magic !== IHAVEOPT && magic !== OLDSTYLE_MAGIC) return `Bad server magic received: ${server}`;
    return null;
  }

  private readError(what: string, end: StreamEnd): BlockError {
    if (end.kind === 'lost') return new BlockError('EIO', `Failed to read ${what}: ${end.message}`);
    return new BlockError(end.kind === 'protocol' ? 'EINVAL' : 'ESHUTDOWN', end.message);
  }

  private receive(chunk: Buffer): void {
    if (this.end) return;
    if (!this.greeted) {
      const rest = this.classifyGreeting(chunk);
      if (rest === null) return;
      chunk = rest;
    }
    this.parser.push(chunk);
    while (!this.end && !this.detached) {
      const r = this.parser.next();
      if (!r.ok) {
        this.finish({ kind: 'protocol', message: r.reason });
        return;
      }
      if (!r.value) return;
      this.deliver(r.value);
    }
  }

  /**
   * Collects the first bytes until the greeting's kind is known. QEMU checks
   * each magic as soon as it has its eight bytes; so do we. A newstyle
   * greeting goes on to the parser (returned); an oldstyle one (the export's
   * size and flags, then 124 zero bytes, and no options) becomes an
   * `exportNameReply` frame here and transmission starts. Null: wait for more.
   */
  private classifyGreeting(chunk: Buffer): Buffer | null {
    this.prefix = Buffer.concat([this.prefix, chunk]);
    const bad = this.greetingProblem();
    if (bad) {
      this.finish({ kind: 'protocol', message: bad });
      return null;
    }
    if (this.prefix.length < PREFIX_BYTES) return null;
    const bytes = this.prefix;
    if (bytes.readBigUInt64BE(8) !== OLDSTYLE_MAGIC) {
      this.greeted = true;
      return bytes;
    }
    if (bytes.length < OLDSTYLE_GREETING_BYTES) return null;
    const flags = bytes.readUInt32BE(24);
    if (flags > 0xffff) {
      this.finish({ kind: 'protocol', message: `Unexpected export flags 0x${flags.toString(16)}` });
      return null;
    }
    this.greeted = true;
    this.parser.enterTransmission(false);
    this.deliver({ kind: 'exportNameReply', sizeBytes: readU64(bytes, 16), transmissionFlags: flags });
    return bytes.subarray(OLDSTYLE_GREETING_BYTES);
  }

  private deliver(frame: ServerFrame): void {
    if (this.dispatcher) {
      this.dispatcher(frame);
      return;
    }
    const w = this.waiter;
    if (w) {
      this.waiter = null;
      w.resolve(frame);
    } else {
      this.queued.push(frame);
    }
  }

  private finish(end: StreamEnd): void {
    if (this.end || this.detached) return;
    this.end = end;
    this.parser.stop();
    this.stream.destroy();
    const w = this.waiter;
    this.waiter = null;
    w?.reject(this.readError(w.what, end));
    for (const listener of this.endListeners.splice(0)) listener(end);
  }
}
