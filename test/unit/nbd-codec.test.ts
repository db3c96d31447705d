/*
 * The NBD wire codec: every struct round-trips through its encoder and
 * decoder; both incremental parsers return the same frames however a
 * transcript is split (at every byte offset, and byte by byte); malformed
 * input yields a reason, never a throw.
 */
import { describe, expect, it } from 'vitest';
import {
  Cmd,
  CmdFlag,
  ClientFlag,
  HandshakeFlag,
  Info,
  MAX_BUFFER_BYTES,
  MAX_OPTION_BUFFER_BYTES,
  NbdErr,
  Opt,
  Rep,
  ReplyFlag,
  ReplyType,
  TxFlag,
  errnoToNbd,
  nbdErrMatchesErrno,
  nbdToErrno,
} from '../../nbd/protocol.js';
import { ClientStreamParser, ServerStreamParser, type ClientFrame, type ServerFrame } from '../../nbd/stream.js';
import {
  decodeGreeting,
  decodeInfoRequest,
  decodeMetaContextRequest,
  decodeRepInfo,
  decodeRepMetaContext,
  decodeRepServer,
  encodeClientFlags,
  encodeExportNameReply,
  encodeGreeting,
  encodeInfoBlockSize,
  encodeInfoDescription,
  encodeInfoExport,
  encodeInfoName,
  encodeInfoRequest,
  encodeMetaContextRequest,
  encodeOption,
  encodeOptionError,
  encodeOptionReply,
  encodeRepMetaContext,
  encodeRepServer,
} from '../../nbd/wire-handshake.js';
import {
  decodeBlockStatusPayload,
  decodeChunkHeader,
  decodeChunkPayload,
  decodeRequest,
  encodeBlockStatusChunk,
  encodeBlockStatusPayload,
  encodeErrorChunk,
  encodeNoneChunk,
  encodeOffsetDataHeader,
  encodeOffsetHoleChunk,
  encodeRequest,
  encodeSimpleReply,
  type ReplyTarget,
  type RequestHeader,
} from '../../nbd/wire-transmission.js';
import type { Decoded } from '../../nbd/wire-util.js';

const bytes = (n: number, fill: number) => Buffer.alloc(n, fill);

describe('NBD protocol constants', () => {
  it('NBD errors are the Linux errno values and map both ways', () => {
    expect(nbdErrMatchesErrno()).toBe(true);
    expect(errnoToNbd('EROFS')).toBe(NbdErr.EPERM);
    expect(errnoToNbd('EFBIG')).toBe(NbdErr.ENOSPC);
    expect(errnoToNbd('ENOENT')).toBe(NbdErr.EINVAL);
    expect(errnoToNbd('ESHUTDOWN')).toBe(NbdErr.ESHUTDOWN);
    expect(nbdToErrno(NbdErr.ENOTSUP)).toBe('ENOTSUP');
    expect(nbdToErrno(12345)).toBe('EINVAL');
  });
});

describe('NBD handshake structs', () => {
  it('greeting', () => {
    const g = encodeGreeting(HandshakeFlag.FIXED_NEWSTYLE | HandshakeFlag.NO_ZEROES);
    expect(g.toString('hex')).toBe('4e42444d41474943' + '49484156454f5054' + '0003');
    expect(decodeGreeting(g)).toEqual({ ok: true, value: { handshakeFlags: 3 } });
    const bad = Buffer.from(g);
    bad[0] = 0;
    expect(decodeGreeting(bad).ok).toBe(false);
  });

  it('INFO/GO request round trip and QEMU reasons', () => {
    const data = encodeInfoRequest({ name: 'exp', infos: [Info.NAME, Info.BLOCK_SIZE] });
    expect(decodeInfoRequest(data, Opt.GO)).toEqual({ ok: true, value: { name: 'exp', infos: [1, 3] } });
    expect(decodeInfoRequest(data.subarray(0, 5), Opt.GO)).toEqual({ ok: false, reason: 'Inconsistent lengths in option go' });
    expect(decodeInfoRequest(Buffer.concat([data, Buffer.from([0])]), Opt.INFO)).toEqual({
      ok: false,
      reason: "option 'info' has unexpected length",
    });
    const long = Buffer.alloc(8);
    long.writeUInt32BE(5000, 0);
    expect(decodeInfoRequest(long, Opt.GO)).toEqual({ ok: false, reason: 'Invalid name length: 5000' });
    const nul = encodeInfoRequest({ name: 'a\0b', infos: [] });
    expect(decodeInfoRequest(nul, Opt.GO)).toEqual({ ok: false, reason: 'Unexpected embedded NUL in option go' });
  });

  it('meta context request skips over-long queries', () => {
    const req = { exportName: '', queries: ['base:allocation', 'x'.repeat(5000), 'qemu:'] };
    expect(decodeMetaContextRequest(encodeMetaContextRequest(req), Opt.SET_META_CONTEXT)).toEqual({
      ok: true,
      value: { exportName: '', queries: ['base:allocation', 'qemu:'] },
    });
  });

  it('replies: SERVER, INFO, META_CONTEXT, errors', () => {
    expect(decodeRepServer(encodeRepServer({ name: 'a', description: 'desc' }))).toEqual({
      ok: true,
      value: { name: 'a', description: 'desc' },
    });
    expect(decodeRepInfo(encodeInfoExport(2 ** 40 + 5, TxFlag.HAS_FLAGS | TxFlag.READ_ONLY)).ok && true).toBe(true);
    expect(decodeRepInfo(encodeInfoExport(2 ** 40 + 5, 3))).toEqual({
      ok: true,
      value: { type: Info.EXPORT, sizeBytes: 2 ** 40 + 5, transmissionFlags: 3 },
    });
    expect(decodeRepInfo(encodeInfoName('n'))).toEqual({ ok: true, value: { type: Info.NAME, name: 'n' } });
    expect(decodeRepInfo(encodeInfoDescription('d'))).toEqual({ ok: true, value: { type: Info.DESCRIPTION, description: 'd' } });
    expect(decodeRepInfo(encodeInfoBlockSize({ minimum: 1, preferred: 4096, maximum: MAX_BUFFER_BYTES }))).toEqual({
      ok: true,
      value: { type: Info.BLOCK_SIZE, minimum: 1, preferred: 4096, maximum: MAX_BUFFER_BYTES },
    });
    expect(decodeRepInfo(Buffer.from([0, 0, 1])).ok).toBe(false);
    expect(decodeRepMetaContext(encodeRepMetaContext({ id: 7, name: 'base:allocation' }))).toEqual({
      ok: true,
      value: { id: 7, name: 'base:allocation' },
    });
    const err = encodeOptionError(Opt.GO, Rep.ERR_UNKNOWN, "export 'x' not present");
    expect(err.readUInt32BE(12)).toBe(Rep.ERR_UNKNOWN);
    expect(err.subarray(20).toString()).toBe("export 'x' not present");
  });
});

describe('NBD transmission structs', () => {
  it('requests, compact and extended, with 64-bit offsets', () => {
    const req: RequestHeader = { flags: CmdFlag.FUA, type: Cmd.WRITE, cookie: 0xfedcba9876543210n, offset: 2 ** 50 + 3, length: 4096 };
    expect(encodeRequest(req, false).length).toBe(28);
    expect(decodeRequest(encodeRequest(req, false), false)).toEqual({ ok: true, value: req });
    const ext = { ...req, length: 2 ** 40 };
    expect(encodeRequest(ext, true).length).toBe(32);
    expect(decodeRequest(encodeRequest(ext, true), true)).toEqual({ ok: true, value: ext });
    expect(decodeRequest(encodeRequest(req, false), true).ok).toBe(false);
    const huge = encodeRequest(req, false);
    huge.writeBigUInt64BE(0xffffffffffffffffn, 16);
    const d = decodeRequest(huge, false);
    expect(d.ok && d.value.offsetBig).toBe(0xffffffffffffffffn);
  });

  it('chunks round-trip in both header formats', () => {
    for (const extended of [false, true]) {
      const to: ReplyTarget = { extended, cookie: 42n, offset: 8192 };
      const check = (buf: Buffer, extra = Buffer.alloc(0)) => {
        const h = decodeChunkHeader(buf, extended);
        if (!h.ok) throw new Error(h.reason);
        if (extended) expect(h.value.requestOffset).toBe(8192);
        const payload = Buffer.concat([buf.subarray(extended ? 32 : 20), extra]);
        expect(payload.length).toBe(h.value.length);
        const p = decodeChunkPayload(h.value.type, payload);
        if (!p.ok) throw new Error(p.reason);
        return { header: h.value, payload: p.value };
      };
      expect(check(encodeNoneChunk(to, ReplyFlag.DONE)).payload).toEqual({ type: ReplyType.NONE });
      const data = bytes(10, 7);
      expect(check(encodeOffsetDataHeader(to, 0, 8192, 10), data).payload).toEqual({ type: ReplyType.OFFSET_DATA, offset: 8192, data });
      expect(check(encodeOffsetHoleChunk(to, ReplyFlag.DONE, 9000, 512)).payload).toEqual({ type: ReplyType.OFFSET_HOLE, offset: 9000, length: 512 });
      const extents = [{ length: 65536, flags: 0 }, { length: 512, flags: 3 }];
      const bs = check(encodeBlockStatusChunk(to, ReplyFlag.DONE, 1, extents));
      expect(bs.payload).toEqual({ type: extended ? ReplyType.BLOCK_STATUS_EXT : ReplyType.BLOCK_STATUS, contextId: 1, extents });
      expect(check(encodeErrorChunk(to, ReplyFlag.DONE, NbdErr.EINVAL, 'bad')).payload).toEqual({ type: ReplyType.ERROR, error: 22, message: 'bad' });
      expect(check(encodeErrorChunk(to, ReplyFlag.DONE, NbdErr.EIO, 'io', 4096)).payload).toEqual({
        type: ReplyType.ERROR_OFFSET,
        error: 5,
        message: 'io',
        offset: 4096,
      });
    }
  });

  it('malformed chunk payloads give reasons', () => {
    expect(decodeChunkPayload(ReplyType.OFFSET_HOLE, Buffer.alloc(11)).ok).toBe(false);
    expect(decodeChunkPayload(ReplyType.OFFSET_DATA, Buffer.alloc(8)).ok).toBe(false);
    expect(decodeChunkPayload(ReplyType.BLOCK_STATUS, Buffer.alloc(8)).ok).toBe(false);
    expect(decodeChunkPayload(ReplyType.NONE, Buffer.alloc(1)).ok).toBe(false);
    expect(decodeChunkPayload(77, Buffer.alloc(0)).ok).toBe(false);
    const unknownErr = decodeChunkPayload(0x8077, Buffer.from([0, 0, 0, 5, 0, 0]));
    expect(unknownErr).toEqual({ ok: true, value: { type: 0x8077, unknownError: true, error: 5, message: '' } });
    expect(decodeChunkPayload(ReplyType.ERROR, Buffer.from([0, 0, 0, 5, 0, 9])).ok).toBe(false);
  });

  it('block status payload', () => {
    const p = { effectLength: 2 ** 33, contextIds: [0, 2] };
    expect(decodeBlockStatusPayload(encodeBlockStatusPayload(p))).toEqual({ ok: true, value: p });
    expect(decodeBlockStatusPayload(Buffer.alloc(10)).ok).toBe(false);
  });
});

// ---------------------------------------------------------------- split-point transcripts

/** Pushes `chunks` into a parser, collecting frames (and a final reason); `after` sees each frame. */
function feed<F>(p: { push(b: Buffer): void; next(): Decoded<F | null> }, chunks: Buffer[], after: (f: F) => void): (F | string)[] {
  const out: (F | string)[] = [];
  for (const c of chunks) {
    p.push(c);
    for (let r = p.next(); ; r = p.next()) {
      if (!r.ok) {
        out.push(r.reason);
        break;
      }
      if (!r.value) break;
      out.push(r.value);
      after(r.value);
    }
  }
  return out;
}

/** A client stream, entering transmission after GO / EXPORT_NAME. */
function parseClientStream(chunks: Buffer[], extended: boolean): (ClientFrame | string)[] {
  const p = new ClientStreamParser();
  return feed(p, chunks, (f) => {
    if (f.kind === 'option' && (f.option === Opt.GO || f.option === Opt.EXPORT_NAME)) p.enterTransmission(extended);
  });
}

/** A server stream, entering transmission after GO's ACK. */
function parseServerStream(chunks: Buffer[], extended: boolean, readLengths: Map<bigint, number>): (ServerFrame | string)[] {
  const p = new ServerStreamParser({ simpleReplyDataBytes: (c) => readLengths.get(c) ?? 0 });
  return feed(p, chunks, (f) => {
    if (f.kind === 'optionReply' && f.option === Opt.GO && f.type === Rep.ACK) p.enterTransmission(extended);
  });
}

/** Checks that every two-way split and the byte-by-byte feed give the same frames as one push. */
function expectSplitInvariant<T>(transcript: Buffer, parse: (chunks: Buffer[]) => T[]): T[] {
  const whole = parse([transcript]);
  for (let cut = 0; cut <= transcript.length; cut++) {
    expect(parse([transcript.subarray(0, cut), transcript.subarray(cut)])).toEqual(whole);
  }
  const single = [...transcript].map((b) => Buffer.from([b]));
  expect(parse(single)).toEqual(whole);
  return whole;
}

describe('incremental parsers at every split point', () => {
  it('client stream: flags, options, compact requests with a WRITE payload', () => {
    const write: RequestHeader = { flags: CmdFlag.FUA, type: Cmd.WRITE, cookie: 1n, offset: 512, length: 5 };
    const read: RequestHeader = { flags: 0, type: Cmd.READ, cookie: 2n, offset: 0, length: 4096 };
    const disc: RequestHeader = { flags: 0, type: Cmd.DISC, cookie: 3n, offset: 0, length: 0 };
    const transcript = Buffer.concat([
      encodeClientFlags(ClientFlag.FIXED_NEWSTYLE | ClientFlag.NO_ZEROES),
      encodeOption(Opt.STRUCTURED_REPLY),
      encodeOption(Opt.SET_META_CONTEXT, encodeMetaContextRequest({ exportName: 'e', queries: ['base:allocation'] })),
      encodeOption(Opt.GO, encodeInfoRequest({ name: 'e', infos: [Info.BLOCK_SIZE] })),
      encodeRequest(write, false),
      Buffer.from('hello'),
      encodeRequest(read, false),
      encodeRequest(disc, false),
    ]);
    const frames = expectSplitInvariant(transcript, (c) => parseClientStream(c, false));
    expect(frames.map((f) => (typeof f === 'string' ? f : f.kind))).toEqual([
      'clientFlags', 'option', 'option', 'option', 'request', 'request', 'request',
    ]);
    const w = frames[4] as Extract<ClientFrame, { kind: 'request' }>;
    expect(w.header).toEqual(write);
    expect(w.payload?.toString()).toBe('hello');
  });

  it('client stream: extended requests with PAYLOAD_LEN', () => {
    const bs: RequestHeader = { flags: CmdFlag.PAYLOAD_LEN, type: Cmd.BLOCK_STATUS, cookie: 9n, offset: 0, length: 12 };
    const transcript = Buffer.concat([
      encodeClientFlags(ClientFlag.FIXED_NEWSTYLE),
      encodeOption(Opt.EXTENDED_HEADERS),
      encodeOption(Opt.GO, encodeInfoRequest({ name: '', infos: [] })),
      encodeRequest(bs, true),
      encodeBlockStatusPayload({ effectLength: 2 ** 36, contextIds: [1] }),
      encodeRequest({ flags: 0, type: Cmd.FLUSH, cookie: 10n, offset: 0, length: 0 }, true),
    ]);
    const frames = expectSplitInvariant(transcript, (c) => parseClientStream(c, true));
    const r = frames[3] as Extract<ClientFrame, { kind: 'request' }>;
    expect(r.header).toEqual(bs);
    expect(decodeBlockStatusPayload(r.payload!)).toEqual({ ok: true, value: { effectLength: 2 ** 36, contextIds: [1] } });
    expect(frames).toHaveLength(5);
  });

  it('server stream: greeting, option replies, simple and structured replies', () => {
    const to: ReplyTarget = { extended: false, cookie: 5n, offset: 0 };
    const transcript = Buffer.concat([
      encodeGreeting(3),
      encodeOptionReply(Opt.STRUCTURED_REPLY, Rep.ACK),
      encodeOptionReply(Opt.GO, Rep.INFO, encodeInfoExport(1 << 20, TxFlag.HAS_FLAGS)),
      encodeOptionReply(Opt.GO, Rep.ACK),
      encodeSimpleReply(4n, 0),
      Buffer.from('data'),
      encodeSimpleReply(6n, NbdErr.EIO),
      encodeOffsetDataHeader(to, 0, 0, 3),
      Buffer.from('abc'),
      encodeOffsetHoleChunk(to, 0, 3, 509),
      encodeBlockStatusChunk({ ...to, cookie: 7n }, ReplyFlag.DONE, 0, [{ length: 512, flags: 3 }]),
      encodeErrorChunk({ ...to, cookie: 8n }, ReplyFlag.DONE, NbdErr.EINVAL, 'nope'),
      encodeNoneChunk(to, ReplyFlag.DONE),
    ]);
    const frames = expectSplitInvariant(transcript, (c) => parseServerStream(c, false, new Map([[4n, 4], [6n, 4]])));
    expect(frames.map((f) => (typeof f === 'string' ? f : f.kind))).toEqual([
      'greeting', 'optionReply', 'optionReply', 'optionReply', 'simpleReply', 'simpleReply', 'chunk', 'chunk', 'chunk', 'chunk', 'chunk',
    ]);
    expect((frames[4] as Extract<ServerFrame, { kind: 'simpleReply' }>).data?.toString()).toBe('data');
    expect((frames[5] as Extract<ServerFrame, { kind: 'simpleReply' }>).data).toBeNull();
  });

  it('server stream: EXPORT_NAME reply with and without zero padding, then extended replies', () => {
    for (const noZeroes of [false, true]) {
      const transcript = Buffer.concat([encodeGreeting(3), encodeExportNameReply(4096, 1, noZeroes)]);
      const parse = (chunks: Buffer[]) => {
        const p = new ServerStreamParser({ simpleReplyDataBytes: () => 0 });
        return feed(p, chunks, (f) => {
          if (f.kind === 'greeting') p.expectExportNameReply(noZeroes);
        });
      };
      expect(expectSplitInvariant(transcript, parse)[1]).toEqual({ kind: 'exportNameReply', sizeBytes: 4096, transmissionFlags: 1 });
    }
    const to: ReplyTarget = { extended: true, cookie: 1n, offset: 1 << 20 };
    const transcript = Buffer.concat([
      encodeGreeting(3),
      encodeOptionReply(Opt.GO, Rep.ACK),
      encodeBlockStatusChunk(to, ReplyFlag.DONE, 0, [{ length: 2 ** 34, flags: 1 }]),
    ]);
    const frames = expectSplitInvariant(transcript, (c) => parseServerStream(c, true, new Map()));
    const chunk = frames[2] as Extract<ServerFrame, { kind: 'chunk' }>;
    expect(chunk.header.requestOffset).toBe(1 << 20);
    expect(decodeChunkPayload(chunk.header.type, chunk.payload)).toEqual({
      ok: true,
      value: { type: ReplyType.BLOCK_STATUS_EXT, contextId: 0, extents: [{ length: 2 ** 34, flags: 1 }] },
    });
  });
});

describe('malformed streams', () => {
  it('bad option magic is a protocol error', () => {
    const bad = encodeOption(Opt.GO);
    bad[0] = 0x58;
    expect(parseClientStream([encodeClientFlags(1), bad], false)).toEqual([{ kind: 'clientFlags', flags: 1 }, 'Bad magic received']);
  });

  it('an option over 32 MiB is a protocol error before any data is buffered', () => {
    const header = encodeOption(99);
    header.writeUInt32BE(0xffffffff, 12);
    expect(parseClientStream([encodeClientFlags(1), header], false)[1]).toBe('len (4294967295) is larger than max len (33554432)');
  });

  it('an option over the buffer limit is skipped as it arrives', () => {
    const p = new ClientStreamParser();
    const length = MAX_OPTION_BUFFER_BYTES + 10;
    const header = encodeOption(Opt.SET_META_CONTEXT).subarray(0, 16);
    header.writeUInt32BE(length, 12);
    p.push(encodeClientFlags(1));
    p.next();
    p.push(header);
    for (let sent = 0; sent < length; sent += 65536) {
      expect(p.next()).toEqual({ ok: true, value: null });
      p.push(Buffer.alloc(Math.min(65536, length - sent)));
      expect(p.bufferedBytes).toBeLessThanOrEqual(65536);
    }
    expect(p.next()).toEqual({ ok: true, value: { kind: 'option', option: Opt.SET_META_CONTEXT, length, data: null } });
  });

  it('a WRITE over 32 MiB is reported oversize and the parser stops', () => {
    const p = new ClientStreamParser();
    p.enterTransmission(false);
    p.push(encodeRequest({ flags: 0, type: Cmd.WRITE, cookie: 1n, offset: 0, length: MAX_BUFFER_BYTES + 1 }, false));
    const r = p.next();
    expect(r.ok && r.value?.kind === 'request' && r.value.oversize).toBe(true);
    p.push(encodeRequest({ flags: 0, type: Cmd.FLUSH, cookie: 2n, offset: 0, length: 0 }, false));
    expect(p.next()).toEqual({ ok: true, value: null });
  });

  it('a bad request magic is a protocol error', () => {
    const p = new ClientStreamParser();
    p.enterTransmission(false);
    const req = encodeRequest({ flags: 0, type: Cmd.READ, cookie: 1n, offset: 0, length: 1 }, false);
    req.writeUInt32BE(0x12345678, 0);
    p.push(req);
    expect(p.next()).toEqual({ ok: false, reason: 'invalid magic (got 0x12345678, expected 0x25609513)' });
  });

  it('a server reply with an unknown magic is a protocol error', () => {
    const frames = parseServerStream([encodeGreeting(3), encodeOptionReply(Opt.GO, Rep.ACK), Buffer.from('XXXXXXXXXXXXXXXX')], false, new Map());
    expect(frames.at(-1)).toMatch(/invalid reply magic/);
  });
});
