/*
 * Incremental parsers for the two directions of an NBD connection. Bytes
 * are pushed as they arrive, in chunks of any size; `next()` returns one
 * complete frame, `null` when more bytes are needed, or a reason when the
 * peer broke the protocol (the caller then disconnects). The result never
 * depends on how the stream was split (tested at every split point).
 *
 * ClientStreamParser (what a server reads): client flags, then options
 * (header + data), then, after the caller says the handshake ended
 * (`enterTransmission`), requests with their payload. ServerStreamParser
 * (what a client reads): the greeting, option replies, the EXPORT_NAME
 * reply when the caller expects one, then simple replies and structured or
 * extended reply chunks.
 *
 * Memory is bounded: an option longer than MAX_BUFFER_BYTES is a protocol
 * error; one longer than MAX_OPTION_BUFFER_BYTES is skipped as it arrives
 * and reported with `data: null`; a request payload longer than
 * MAX_BUFFER_BYTES is reported `oversize` without being read, after which
 * the parser stops (QEMU replies EINVAL and disconnects). A stopped
 * parser drops its queue and whatever is pushed later. Option replies
 * and reply chunks are bounded the same way on the client side.
 */
import { ByteQueue } from './byte-queue.js';
import {
  EXTENDED_REPLY_MAGIC,
  MAX_BUFFER_BYTES,
  MAX_OPTION_BUFFER_BYTES,
  SIMPLE_REPLY_MAGIC,
  STRUCTURED_REPLY_MAGIC,
  EXPORT_NAME_REPLY_PAD_BYTES,
} from './protocol.js';
import {
  CLIENT_FLAGS_BYTES,
  EXPORT_NAME_REPLY_BYTES,
  GREETING_BYTES,
  OPTION_HEADER_BYTES,
  OPTION_REPLY_HEADER_BYTES,
  decodeClientFlags,
  decodeExportNameReply,
  decodeGreeting,
  decodeOptionHeader,
  decodeOptionReplyHeader,
  type OptionHeader,
  type OptionReplyHeader,
} from './wire-handshake.js';
import {
  SIMPLE_REPLY_BYTES,
  chunkHeaderBytes,
  decodeChunkHeader,
  decodeRequest,
  requestBytes,
  requestPayloadBytes,
  type ChunkHeader,
  type RequestHeader,
} from './wire-transmission.js';
import { fail, ok, type Decoded } from './wire-util.js';

/** Largest reply chunk payload a client accepts: a full read plus chunk overhead. */
export const MAX_CHUNK_PAYLOAD_BYTES = MAX_BUFFER_BYTES + 1024;

type Phase = 'start' | 'options' | 'exportName' | 'transmission' | 'stopped';

// ---------------------------------------------------------------- client -> server

export type ClientFrame =
  | { kind: 'clientFlags'; flags: number }
  /** `data` is null when the option was longer than MAX_OPTION_BUFFER_BYTES and was skipped. */
  | { kind: 'option'; option: number; length: number; data: Buffer | null }
  /**
   * `payload` is the WRITE data or extended payload; `oversize` means it was
   * too long and not read; `payloadAllocated` that it came from the
   * parser's `allocPayload` (the receiver owns it) rather than being a view
   * of received bytes.
   */
  | { kind: 'request'; header: RequestHeader; payload: Buffer | null; oversize: boolean; payloadAllocated?: boolean };

export interface ClientStreamOptions {
  /** Allocates buffers for payloads that arrived in several pieces (e.g. from a pool). */
  allocPayload?: (bytes: number) => Buffer;
}

export class ClientStreamParser {
  constructor(private readonly opts: ClientStreamOptions = {}) {}

  private readonly queue = new ByteQueue();
  private phase: Phase = 'start';
  private extended = false;
  private option: OptionHeader | null = null;
  private skipLeft = 0;
  private request: { header: RequestHeader; payloadBytes: number } | null = null;

  /** Queues received bytes; a stopped parser drops them (nothing will read them). */
  push(chunk: Buffer): void {
    if (this.phase !== 'stopped') this.queue.push(chunk);
  }

  /** Bytes received and not yet returned in a frame. */
  get bufferedBytes(): number {
    return this.queue.length;
  }

  /** The handshake ended (GO or EXPORT_NAME succeeded): requests follow. */
  enterTransmission(extended: boolean): void {
    this.phase = 'transmission';
    this.extended = extended;
  }

  /** Returns no more frames and drops what is queued or still arrives (after a fatal frame, DISC, or when closing). */
  stop(): void {
    this.phase = 'stopped';
    this.queue.skip(this.queue.length);
  }

  /** Starts at the option phase (a fresh stream after STARTTLS: client flags were read before). */
  startAtOptions(): void {
    this.phase = 'options';
  }

  /** Hands over the bytes received but not parsed (e.g. the start of a TLS handshake). */
  takeBuffered(): Buffer {
    return this.queue.drain();
  }

  next(): Decoded<ClientFrame | null> {
    switch (this.phase) {
      case 'start':
        return this.clientFlags();
      case 'options':
        return this.nextOption();
      case 'transmission':
        return this.nextRequest();
      default:
        return ok(null);
    }
  }

  private clientFlags(): Decoded<ClientFrame | null> {
    if (this.queue.length < CLIENT_FLAGS_BYTES) return ok(null);
    this.phase = 'options';
    return ok({ kind: 'clientFlags', flags: decodeClientFlags(this.queue.take(CLIENT_FLAGS_BYTES)) });
  }

  private nextOption(): Decoded<ClientFrame | null> {
    if (!this.option) {
      if (this.queue.length < OPTION_HEADER_BYTES) return ok(null);
      const header = decodeOptionHeader(this.queue.take(OPTION_HEADER_BYTES));
      if (!header.ok) return this.failed(header.reason);
      if (header.value.length > MAX_BUFFER_BYTES) {
        return this.failed(`len (${header.value.length}) is larger than max len (${MAX_BUFFER_BYTES})`);
      }
      this.option = header.value;
      this.skipLeft = header.value.length > MAX_OPTION_BUFFER_BYTES ? header.value.length : 0;
    }
    const { option, length } = this.option;
    if (this.skipLeft > 0) {
      this.skipLeft -= this.queue.skip(this.skipLeft);
      if (this.skipLeft > 0) return ok(null);
      this.option = null;
      return ok({ kind: 'option', option, length, data: null });
    }
    if (this.queue.length < length) return ok(null);
    this.option = null;
    return ok({ kind: 'option', option, length, data: this.queue.take(length) });
  }

  private nextRequest(): Decoded<ClientFrame | null> {
    if (!this.request) {
      const bytes = requestBytes(this.extended);
      if (this.queue.length < bytes) return ok(null);
      const header = decodeRequest(this.queue.take(bytes), this.extended);
      if (!header.ok) return this.failed(header.reason);
      const payloadBytes = requestPayloadBytes(header.value, this.extended);
      if (payloadBytes > MAX_BUFFER_BYTES) {
        this.phase = 'stopped';
        return ok({ kind: 'request', header: header.value, payload: null, oversize: true });
      }
      this.request = { header: header.value, payloadBytes };
    }
    const { header, payloadBytes } = this.request;
    if (this.queue.length < payloadBytes) return ok(null);
    this.request = null;
    if (payloadBytes === 0) return ok({ kind: 'request', header, payload: null, oversize: false });
    const payload = this.queue.take(payloadBytes, this.opts.allocPayload);
    const frame: ClientFrame = { kind: 'request', header, payload, oversize: false };
    if (this.queue.gathered && this.opts.allocPayload) frame.payloadAllocated = true;
    return ok(frame);
  }

  private failed(reason: string): Decoded<never> {
    this.phase = 'stopped';
    return fail(reason);
  }
}

// ---------------------------------------------------------------- server -> client

export type ServerFrame =
  | { kind: 'greeting'; handshakeFlags: number }
  | { kind: 'optionReply'; option: number; type: number; data: Buffer }
  | { kind: 'exportNameReply'; sizeBytes: number; transmissionFlags: number }
  /** `data` holds the bytes of a successful simple reply to a READ. */
  | { kind: 'simpleReply'; cookie: bigint; error: number; data: Buffer | null }
  | { kind: 'chunk'; header: ChunkHeader; payload: Buffer };

export interface ServerStreamOptions {
  /**
   * How many data bytes follow a successful simple reply with this cookie:
   * the length of the READ it answers, else 0 (simple replies are not
   * self-describing; only the client knows).
   */
  simpleReplyDataBytes(cookie: bigint): number;
}

export class ServerStreamParser {
  private readonly queue = new ByteQueue();
  private phase: Phase = 'start';
  private extended = false;
  private noZeroes = true;
  private optionReply: OptionReplyHeader | null = null;
  private simple: { cookie: bigint; error: number; dataBytes: number } | null = null;
  private chunk: ChunkHeader | null = null;

  constructor(private readonly opts: ServerStreamOptions) {}

  push(chunk: Buffer): void {
    this.queue.push(chunk);
  }

  get bufferedBytes(): number {
    return this.queue.length;
  }

  /** The client sent NBD_OPT_EXPORT_NAME: the next frame is its reply. */
  expectExportNameReply(noZeroes: boolean): void {
    this.phase = 'exportName';
    this.noZeroes = noZeroes;
  }

  /** GO succeeded (or the EXPORT_NAME reply was read): replies follow. */
  enterTransmission(extended: boolean): void {
    this.phase = 'transmission';
    this.extended = extended;
  }

  stop(): void {
    this.phase = 'stopped';
  }

  takeBuffered(): Buffer {
    return this.queue.drain();
  }

  next(): Decoded<ServerFrame | null> {
    switch (this.phase) {
      case 'start':
        return this.greeting();
      case 'options':
        return this.nextOptionReply();
      case 'exportName':
        return this.exportNameReply();
      case 'transmission':
        return this.nextReply();
      default:
        return ok(null);
    }
  }

  private greeting(): Decoded<ServerFrame | null> {
    if (this.queue.length < GREETING_BYTES) return ok(null);
    const g = decodeGreeting(this.queue.take(GREETING_BYTES));
    if (!g.ok) return this.failed(g.reason);
    this.phase = 'options';
    return ok({ kind: 'greeting', handshakeFlags: g.value.handshakeFlags });
  }

  private nextOptionReply(): Decoded<ServerFrame | null> {
    if (!this.optionReply) {
      if (this.queue.length < OPTION_REPLY_HEADER_BYTES) return ok(null);
      const h = decodeOptionReplyHeader(this.queue.take(OPTION_REPLY_HEADER_BYTES));
      if (!h.ok) return this.failed(h.reason);
      if (h.value.length > MAX_OPTION_BUFFER_BYTES) return this.failed(`option reply too long: ${h.value.length} bytes`);
      this.optionReply = h.value;
    }
    const { option, type, length } = this.optionReply;
    if (this.queue.length < length) return ok(null);
    this.optionReply = null;
    return ok({ kind: 'optionReply', option, type, data: this.queue.take(length) });
  }

  private exportNameReply(): Decoded<ServerFrame | null> {
    const bytes = EXPORT_NAME_REPLY_BYTES + (this.noZeroes ? 0 : EXPORT_NAME_REPLY_PAD_BYTES);
    if (this.queue.length < bytes) return ok(null);
    const reply = decodeExportNameReply(this.queue.take(bytes));
    this.phase = 'transmission';
    return ok({ kind: 'exportNameReply', ...reply });
  }

  private nextReply(): Decoded<ServerFrame | null> {
    if (this.simple) return this.simpleReplyData();
    if (this.chunk) return this.chunkPayload();
    const magicBytes = this.queue.peek(4);
    if (!magicBytes) return ok(null);
    const magic = magicBytes.readUInt32BE(0);
    if (!this.extended && magic === SIMPLE_REPLY_MAGIC) {
      if (this.queue.length < SIMPLE_REPLY_BYTES) return ok(null);
      const h = this.queue.take(SIMPLE_REPLY_BYTES);
      const cookie = h.readBigUInt64BE(8);
      const error = h.readUInt32BE(4);
      const dataBytes = error === 0 ? this.opts.simpleReplyDataBytes(cookie) : 0;
      this.simple = { cookie, error, dataBytes };
      return this.simpleReplyData();
    }
    const expected = this.extended ? EXTENDED_REPLY_MAGIC : STRUCTURED_REPLY_MAGIC;
    if (magic !== expected) return this.failed(`invalid reply magic 0x${magic.toString(16)}`);
    const bytes = chunkHeaderBytes(this.extended);
    if (this.queue.length < bytes) return ok(null);
    const h = decodeChunkHeader(this.queue.take(bytes), this.extended);
    if (!h.ok) return this.failed(h.reason);
    if (h.value.length > MAX_CHUNK_PAYLOAD_BYTES) return this.failed(`reply chunk too long: ${h.value.length} bytes`);
    this.chunk = h.value;
    return this.chunkPayload();
  }

  private simpleReplyData(): Decoded<ServerFrame | null> {
    const { cookie, error, dataBytes } = this.simple!;
    if (this.queue.length < dataBytes) return ok(null);
    this.simple = null;
    return ok({ kind: 'simpleReply', cookie, error, data: dataBytes > 0 ? this.queue.take(dataBytes) : null });
  }

  private chunkPayload(): Decoded<ServerFrame | null> {
    const header = this.chunk!;
    if (this.queue.length < header.length) return ok(null);
    this.chunk = null;
    return ok({ kind: 'chunk', header, payload: this.queue.take(header.length) });
  }

  private failed(reason: string): Decoded<never> {
    this.phase = 'stopped';
    return fail(reason);
  }
}
