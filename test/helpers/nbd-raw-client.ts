/*
 * A raw-bytes NBD client for server tests: it sends exactly the bytes a
 * test builds (well-formed or not) and hands back decoded frames, so tests
 * can drive every option, header format and malformed input. Every wait is
 * bounded (FRAME_TIMEOUT_MS).
 */
import net from 'node:net';
import { ClientFlag, Cmd, Info, Opt, Rep, isErrorReply } from '../../nbd/protocol.js';
import { ServerStreamParser, type ServerFrame } from '../../nbd/stream.js';
import {
  decodeRepInfo,
  encodeClientFlags,
  encodeInfoRequest,
  encodeMetaContextRequest,
  encodeOption,
  type InfoReply,
} from '../../nbd/wire-handshake.js';
import { encodeRequest, type RequestHeader } from '../../nbd/wire-transmission.js';

export const FRAME_TIMEOUT_MS = 5000;

export type Chunk = Extract<ServerFrame, { kind: 'chunk' }>;
export type OptionReplyFrame = Extract<ServerFrame, { kind: 'optionReply' }>;

export class RawNbdClient {
  readonly parser: ServerStreamParser;
  private frames: ServerFrame[] = [];
  private waiters: Array<() => void> = [];
  private error: string | null = null;
  private ended = false;
  readonly readLengths = new Map<bigint, number>();
  readonly closed: Promise<void>;
  extended = false;
  private nextCookie = 1n;

  private constructor(readonly socket: net.Socket) {
    this.parser = new ServerStreamParser({ simpleReplyDataBytes: (c) => this.readLengths.get(c) ?? 0 });
    socket.on('data', (d: Buffer) => {
      this.parser.push(d);
      this.drainParser();
    });
    socket.on('error', () => undefined);
    this.closed = new Promise((resolve) =>
      socket.once('close', () => {
        this.ended = true;
        this.wake();
        resolve();
      }),
    );
  }

  static connect(path: string): Promise<RawNbdClient> {
    return new Promise((resolve, reject) => {
      const s = net.connect(path, () => resolve(new RawNbdClient(s)));
      s.once('error', reject);
    });
  }

  static connectTcp(host: string, port: number): Promise<RawNbdClient> {
    return new Promise((resolve, reject) => {
      const s = net.connect({ host, port }, () => resolve(new RawNbdClient(s)));
      s.once('error', reject);
    });
  }

  get isClosed(): boolean {
    return this.ended;
  }

  private drainParser(): void {
    for (;;) {
      const r = this.parser.next();
      if (!r.ok) {
        this.error = r.reason;
        break;
      }
      if (!r.value) break;
      this.frames.push(r.value);
    }
    this.wake();
  }

  private wake(): void {
    const w = this.waiters;
    this.waiters = [];
    for (const f of w) f();
  }

  send(...bufs: Buffer[]): void {
    this.socket.write(Buffer.concat(bufs));
  }

  /** The next frame; throws when the server closed, broke the protocol, or took too long. */
  async frame(timeoutMs = FRAME_TIMEOUT_MS): Promise<ServerFrame> {
    const deadline = Date.now() + timeoutMs;
    while (this.frames.length === 0) {
      if (this.error) throw new Error(`protocol error from server: ${this.error}`);
      if (this.ended) throw new Error('server closed the connection');
      const left = deadline - Date.now();
      if (left <= 0) throw new Error('timed out waiting for a frame');
      await new Promise<void>((resolve) => {
        const t = setTimeout(resolve, left);
        this.waiters.push(() => {
          clearTimeout(t);
          resolve();
        });
      });
    }
    return this.frames.shift()!;
  }

  /** Resolves true when the server closes the connection within the time limit. */
  async closedWithin(timeoutMs = FRAME_TIMEOUT_MS): Promise<boolean> {
    return Promise.race([this.closed.then(() => true), new Promise<boolean>((r) => setTimeout(() => r(false), timeoutMs))]);
  }

  async optionReply(): Promise<OptionReplyFrame> {
    const f = await this.frame();
    if (f.kind !== 'optionReply') throw new Error(`expected an option reply, got ${f.kind}`);
    return f;
  }

  /** Sends an option and collects its replies up to the final one. */
  async option(option: number, data?: Buffer): Promise<OptionReplyFrame[]> {
    this.send(encodeOption(option, data));
    const out: OptionReplyFrame[] = [];
    for (;;) {
      const r = await this.optionReply();
      out.push(r);
      if (r.type === Rep.ACK || isErrorReply(r.type)) return out;
    }
  }

  /** Reads the greeting and sends client flags. */
  async greet(flags = ClientFlag.FIXED_NEWSTYLE | ClientFlag.NO_ZEROES): Promise<number> {
    const g = await this.frame();
    if (g.kind !== 'greeting') throw new Error('no greeting');
    this.send(encodeClientFlags(flags));
    return g.handshakeFlags;
  }

  /** A whole fixed-newstyle handshake ending in GO; returns the INFO replies. */
  async negotiate(opts: { exportName?: string; structured?: boolean; extended?: boolean; contexts?: string[]; infos?: number[] } = {}) {
    await this.greet();
    if (opts.extended) expectAck(await this.option(Opt.EXTENDED_HEADERS));
    else if (opts.structured) expectAck(await this.option(Opt.STRUCTURED_REPLY));
    const exportName = opts.exportName ?? '';
    let contexts: OptionReplyFrame[] = [];
    if (opts.contexts) {
      contexts = await this.option(Opt.SET_META_CONTEXT, encodeMetaContextRequest({ exportName, queries: opts.contexts }));
      expectAck(contexts);
    }
    const replies = await this.option(Opt.GO, encodeInfoRequest({ name: exportName, infos: opts.infos ?? [Info.BLOCK_SIZE] }));
    expectAck(replies);
    this.extended = opts.extended ?? false;
    this.parser.enterTransmission(this.extended);
    const infos = replies.filter((r) => r.type === Rep.INFO).map((r) => infoOf(r));
    return { infos, contexts: contexts.filter((c) => c.type === Rep.META_CONTEXT) };
  }

  /** Sends a request (cookie assigned when absent); READs get their simple-reply length recorded. */
  request(h: Partial<RequestHeader> & { type: number }, payload?: Buffer): bigint {
    const cookie = h.cookie ?? this.nextCookie++;
    const header: RequestHeader = { flags: 0, offset: 0, length: 0, ...h, cookie };
    if (header.type === Cmd.READ) this.readLengths.set(cookie, header.length);
    this.socket.write(payload ? Buffer.concat([encodeRequest(header, this.extended), payload]) : encodeRequest(header, this.extended));
    return cookie;
  }

  /** All frames of one structured reply (up to the DONE chunk). */
  async reply(): Promise<ServerFrame[]> {
    const out: ServerFrame[] = [];
    for (;;) {
      const f = await this.frame();
      out.push(f);
      if (f.kind === 'simpleReply' || (f.kind === 'chunk' && f.header.flags & 1)) return out;
    }
  }

  close(): void {
    this.socket.destroy();
  }
}

export function expectAck(replies: OptionReplyFrame[]): void {
  const last = replies[replies.length - 1];
  if (!last || last.type !== Rep.ACK) {
    throw new Error(`option failed: type 0x${last?.type.toString(16)} ${last?.data.toString()}`);
  }
}

export function infoOf(r: OptionReplyFrame): InfoReply {
  const d = decodeRepInfo(r.data);
  if (!d.ok) throw new Error(d.reason);
  return d.value;
}
