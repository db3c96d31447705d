/*
 * The NBD client against a scripted fake server on a unix socket: each test
 * scripts the server's side byte for byte (with the shared codec), so
 * handshake fallbacks, reply assembly, out-of-order replies, per-chunk
 * errors, malformed replies, a server dying mid-reply, request splitting,
 * the in-flight limit, extended headers and reconnection are all exercised
 * without a real server. Every wait in the fake is bounded (FRAME_WAIT_MS),
 * and every client call is awaited with a deadline, so a hang is a failure.
 */
import fs from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { BlockError } from '../../block/errors.js';
import { NbdClient, type NbdClientOptions } from '../../nbd/client.js';
import { listExports } from '../../nbd/client-list.js';
import {
  Cmd,
  CmdFlag,
  HandshakeFlag,
  Info,
  NbdErr,
  Opt,
  Rep,
  ReplyFlag,
  ReplyType,
  StateFlag,
  TxFlag,
} from '../../nbd/protocol.js';
import { ClientStreamParser, type ClientFrame } from '../../nbd/stream.js';
import {
  decodeInfoRequest,
  decodeMetaContextRequest,
  encodeExportNameReply,
  encodeGreeting,
  encodeInfoBlockSize,
  encodeInfoExport,
  encodeOptionError,
  encodeOptionReply,
  encodeRepMetaContext,
  encodeRepServer,
} from '../../nbd/wire-handshake.js';
import {
  encodeBlockStatusChunk,
  encodeErrorChunk,
  encodeNoneChunk,
  encodeOffsetDataHeader,
  encodeOffsetHoleChunk,
  encodeSimpleReply,
  writeChunkHeader,
  type Extent,
  type ReplyTarget,
  type RequestHeader,
} from '../../nbd/wire-transmission.js';

/** Longest a fake server waits for the client's next frame. */
const FRAME_WAIT_MS = 5000;
/** Longest a client call may take before the test calls it a hang. */
const CALL_WAIT_MS = 8000;
const EXPORT_BYTES = 1 << 20;
const FLAGS_RW = TxFlag.HAS_FLAGS | TxFlag.SEND_FLUSH | TxFlag.SEND_FUA | TxFlag.SEND_TRIM | TxFlag.SEND_WRITE_ZEROES | TxFlag.SEND_FAST_ZERO | TxFlag.SEND_CACHE | TxFlag.SEND_DF;
const BASE_ALLOCATION_ID = 7;

// ---------------------------------------------------------------- the fake server

type Request = { header: RequestHeader; payload: Buffer | null };

/** The server end of one connection, read frame by frame. */
class FakeConn {
  private readonly parser = new ClientStreamParser();
  private readonly frames: ClientFrame[] = [];
  private wake: (() => void) | null = null;
  closed = false;
  extended = false;

  constructor(readonly socket: net.Socket) {
    socket.on('data', (d: Buffer) => {
      this.parser.push(d);
      for (let r = this.parser.next(); r.ok && r.value; r = this.parser.next()) this.frames.push(r.value);
      this.wake?.();
    });
    socket.on('error', () => undefined);
    socket.on('close', () => {
      this.closed = true;
      this.wake?.();
    });
  }

  async next(): Promise<ClientFrame> {
    const deadline = Date.now() + FRAME_WAIT_MS;
    while (this.frames.length === 0) {
      if (this.closed) throw new Error('client closed the connection');
      if (Date.now() > deadline) throw new Error('timed out waiting for the client');
      await new Promise<void>((resolve) => {
        this.wake = resolve;
        setTimeout(resolve, 50);
      });
    }
    return this.frames.shift()!;
  }

  async option(): Promise<{ option: number; data: Buffer }> {
    const f = await this.next();
    if (f.kind !== 'option') throw new Error(`expected an option, got ${f.kind}`);
    return { option: f.option, data: f.data ?? Buffer.alloc(0) };
  }

  async request(): Promise<Request> {
    const f = await this.next();
    if (f.kind !== 'request') throw new Error(`expected a request, got ${f.kind}`);
    return { header: f.header, payload: f.payload };
  }

  write(...parts: Buffer[]): void {
    for (const p of parts) this.socket.write(p);
  }

  reply(option: number, type: number, data?: Buffer): void {
    this.write(encodeOptionReply(option, type, data));
  }

  to(req: Request): ReplyTarget {
    return { extended: this.extended, cookie: req.header.cookie, offset: req.header.offset };
  }

  /** An OFFSET_DATA chunk with its data. */
  data(req: Request, offset: number, bytes: Buffer, flags = 0): void {
    this.write(encodeOffsetDataHeader(this.to(req), flags, offset, bytes.length), bytes);
  }

  hole(req: Request, offset: number, bytes: number, flags = 0): void {
    this.write(encodeOffsetHoleChunk(this.to(req), flags, offset, bytes));
  }

  done(req: Request): void {
    this.write(encodeNoneChunk(this.to(req), ReplyFlag.DONE));
  }

  error(req: Request, error: number, message = '', flags: number = ReplyFlag.DONE): void {
    this.write(encodeErrorChunk(this.to(req), flags, error, message));
  }

  simple(req: Request, error = 0, data?: Buffer): void {
    this.write(encodeSimpleReply(req.header.cookie, error), ...(data ? [data] : []));
  }

  status(req: Request, contextId: number, extents: Extent[], flags: number = ReplyFlag.DONE): void {
    this.write(encodeBlockStatusChunk(this.to(req), flags, contextId, extents));
  }

  /** A chunk with any type and raw payload (for malformed replies). */
  rawChunk(req: Request, flags: number, type: number, payload: Buffer): void {
    const head = Buffer.alloc(32);
    const n = writeChunkHeader(head, this.to(req), flags, type, payload.length);
    this.write(head.subarray(0, n), payload);
  }

  /** The handshake ended: requests follow. */
  parserEnter(extended: boolean): void {
    this.parser.enterTransmission(extended);
  }

  close(): void {
    this.socket.destroy();
  }
}

interface ServeOpts {
  greeting?: number;
  structured?: boolean;
  extended?: boolean;
  /** Contexts the server selects (names among the queries). */
  contexts?: Record<string, number>;
  go?: 'ok' | 'unsup';
  size?: number;
  flags?: number;
  blockSizes?: [number, number, number] | null;
}

/** The usual handshake of a modern server, up to the GO ACK; returns the queries the client sent. */
async function handshake(c: FakeConn, o: ServeOpts = {}): Promise<{ options: number[]; goInfos: number[] }> {
  c.write(encodeGreeting(o.greeting ?? HandshakeFlag.FIXED_NEWSTYLE | HandshakeFlag.NO_ZEROES));
  const first = await c.next();
  if (first.kind !== 'clientFlags') throw new Error('expected client flags');
  const options: number[] = [];
  for (;;) {
    const { option, data } = await c.option();
    options.push(option);
    if (option === Opt.EXTENDED_HEADERS) {
      if (o.extended) {
        c.reply(option, Rep.ACK);
        c.extended = true;
      } else c.reply(option, Rep.ERR_UNSUP);
    } else if (option === Opt.STRUCTURED_REPLY) {
      c.reply(option, o.structured === false ? Rep.ERR_UNSUP : Rep.ACK);
    } else if (option === Opt.SET_META_CONTEXT) {
      const q = decodeMetaContextRequest(data, option);
      const contexts = o.contexts ?? { 'base:allocation': BASE_ALLOCATION_ID };
      for (const name of q.ok ? q.value.queries : []) {
        if (contexts[name] !== undefined) c.reply(option, Rep.META_CONTEXT, encodeRepMetaContext({ id: contexts[name]!, name }));
      }
      c.reply(option, Rep.ACK);
    } else if (option === Opt.GO) {
      const req = decodeInfoRequest(data, option);
      if (o.go === 'unsup') {
        c.reply(option, Rep.ERR_UNSUP);
        continue;
      }
      c.reply(option, Rep.INFO, encodeInfoExport(o.size ?? EXPORT_BYTES, o.flags ?? FLAGS_RW));
      const sizes = o.blockSizes === undefined ? ([1, 4096, 1 << 25] as const) : o.blockSizes;
      if (sizes) c.reply(option, Rep.INFO, encodeInfoBlockSize({ minimum: sizes[0], preferred: sizes[1], maximum: sizes[2] }));
      c.reply(option, Rep.ACK);
      c.parserEnter(c.extended);
      return { options, goInfos: req.ok ? req.value.infos : [] };
    } else {
      throw new Error(`unscripted option ${option}`);
    }
  }
}

type Script = (c: FakeConn, index: number) => Promise<void>;

const servers: net.Server[] = [];
const dirs: string[] = [];
const clients: NbdClient[] = [];

afterEach(async () => {
  for (const c of clients.splice(0)) c.close();
  for (const s of servers.splice(0)) await new Promise<void>((r) => s.close(() => r()));
  for (const d of dirs.splice(0)) fs.rmSync(d, { recursive: true, force: true });
});

/** A server running `script` for each connection (index 0, 1, …); errors in scripts are collected. */
async function fakeServer(script: Script): Promise<{ socket: string; errors: unknown[]; conns: FakeConn[]; server: net.Server }> {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'nbdc-unit-'));
  dirs.push(dir);
  const socket = path.join(dir, 'fake.sock');
  const errors: unknown[] = [];
  const conns: FakeConn[] = [];
  const server = net.createServer((s) => {
    const c = new FakeConn(s);
    const index = conns.push(c) - 1;
    script(c, index).catch((e) => {
      errors.push(e);
      c.close();
    });
  });
  servers.push(server);
  await new Promise<void>((resolve) => server.listen(socket, resolve));
  return { socket, errors, conns, server };
}

async function within<T>(p: Promise<T>, ms = CALL_WAIT_MS): Promise<T> {
  let timer: NodeJS.Timeout | undefined;
  const timeout = new Promise<never>((_, reject) => {
    timer = setTimeout(() => reject(new Error(`no answer within ${ms} ms (a hang)`)), ms);
  });
  try {
    return await Promise.race([p, timeout]);
  } finally {
    clearTimeout(timer);
  }
}

async function connect(socket: string, opts: Partial<NbdClientOptions> = {}): Promise<NbdClient> {
  const c = await within(NbdClient.connect({ address: { type: 'unix', path: socket }, exportName: 'exp', ...opts }));
  clients.push(c);
  return c;
}

async function rejection(p: Promise<unknown>): Promise<BlockError> {
  const e = await within(p.then(() => null, (err: unknown) => err));
  expect(e).toBeInstanceOf(BlockError);
  return e as BlockError;
}

const filled = (n: number, byte: number) => Buffer.alloc(n, byte);

// ---------------------------------------------------------------- handshake

describe('NBD client handshake', () => {
  it('negotiates extended headers or structured replies, base:allocation and GO with a block-size request, in QEMU order', async () => {
    let seen: { options: number[]; goInfos: number[] } | null = null;
    const { socket } = await fakeServer(async (c) => {
      seen = await handshake(c);
      await c.request();
    });
    const client = await connect(socket);
    expect(seen!.options).toEqual([Opt.EXTENDED_HEADERS, Opt.STRUCTURED_REPLY, Opt.SET_META_CONTEXT, Opt.GO]);
    expect(seen!.goInfos).toEqual([Info.BLOCK_SIZE]);
    expect(client.info).toMatchObject({ name: 'exp', sizeBytes: EXPORT_BYTES, flags: FLAGS_RW, minBlock: 1, optBlock: 4096, maxBlock: 1 << 25, mode: 'structured' });
    expect([...client.info.contexts]).toEqual([['base:allocation', BASE_ALLOCATION_ID]]);
  });

  it('falls back to LIST and EXPORT_NAME when GO is unsupported, reading the 124 zero bytes without NO_ZEROES', async () => {
    const { socket } = await fakeServer(async (c) => {
      c.write(encodeGreeting(HandshakeFlag.FIXED_NEWSTYLE));
      await c.next();
      for (;;) {
        const { option } = await c.option();
        if (option === Opt.LIST) {
          c.reply(option, Rep.SERVER, encodeRepServer({ name: 'other', description: '' }));
          c.reply(option, Rep.SERVER, encodeRepServer({ name: 'exp', description: 'the export' }));
          c.reply(option, Rep.ACK);
        } else if (option === Opt.EXPORT_NAME) {
          c.write(encodeExportNameReply(EXPORT_BYTES, TxFlag.HAS_FLAGS | TxFlag.READ_ONLY, false));
          c.parserEnter(false);
          break;
        } else c.reply(option, Rep.ERR_UNSUP);
      }
      const req = await c.request();
      c.simple(req, 0, filled(req.header.length, 0x5a));
    });
    const client = await connect(socket);
    expect(client.info).toMatchObject({ sizeBytes: EXPORT_BYTES, mode: 'simple', minBlock: 0 });
    expect(client.readOnly).toBe(true);
    const buf = Buffer.alloc(4096);
    await within(client.read(0, buf));
    expect(buf.every((b) => b === 0x5a)).toBe(true);
    await expect(client.write(0, buf)).rejects.toMatchObject({ code: 'EPERM' });
  });

  it('says "No export with name" when the LIST fallback lacks the export', async () => {
    const { socket } = await fakeServer(async (c) => {
      c.write(encodeGreeting(HandshakeFlag.FIXED_NEWSTYLE | HandshakeFlag.NO_ZEROES));
      await c.next();
      for (;;) {
        const { option } = await c.option();
        if (option === Opt.LIST) {
          c.reply(option, Rep.SERVER, encodeRepServer({ name: 'other', description: '' }));
          c.reply(option, Rep.ACK);
        } else if (option === Opt.ABORT) return;
        else c.reply(option, Rep.ERR_UNSUP);
      }
    });
    const e = await rejection(NbdClient.connect({ address: { type: 'unix', path: socket }, exportName: 'exp' }));
    expect(e.message).toBe("No export with name 'exp' available");
  });

  it('goes straight to EXPORT_NAME with a server that is not fixed newstyle', async () => {
    const { socket } = await fakeServer(async (c) => {
      c.write(encodeGreeting(0));
      await c.next();
      const { option, data } = await c.option();
      expect(option).toBe(Opt.EXPORT_NAME);
      expect(data.toString()).toBe('exp');
      c.write(encodeExportNameReply(EXPORT_BYTES, TxFlag.HAS_FLAGS, false));
      c.parserEnter(false);
      await c.request();
    });
    const client = await connect(socket);
    expect(client.info.mode).toBe('export-name');
  });

  it('accepts an oldstyle server for the default export only', async () => {
    const oldstyle = () => {
      const g = Buffer.alloc(152);
      g.write('NBDMAGIC', 0, 'latin1');
      g.writeBigUInt64BE(0x00420281861253n, 8);
      g.writeBigUInt64BE(BigInt(EXPORT_BYTES), 16);
      g.writeUInt32BE(TxFlag.HAS_FLAGS | TxFlag.SEND_FLUSH, 24);
      return g;
    };
    const { socket } = await fakeServer(async (c) => {
      // The greeting arrives in pieces, the last one with the first reply's bytes missing.
      const g = oldstyle();
      c.write(g.subarray(0, 10));
      await new Promise((r) => setTimeout(r, 10));
      c.write(g.subarray(10));
      c.parserEnter(false);
      const req = await c.request();
      expect(req.header.type).toBe(Cmd.FLUSH);
      c.simple(req);
    });
    const client = await connect(socket, { exportName: '' });
    expect(client.info).toMatchObject({ mode: 'oldstyle', sizeBytes: EXPORT_BYTES });
    await within(client.flush());
    const { socket: s2 } = await fakeServer(async (c) => c.write(oldstyle()));
    const e = await rejection(NbdClient.connect({ address: { type: 'unix', path: s2 }, exportName: 'x' }));
    expect(e.message).toBe('Server does not support non-empty export names');
  });

  it('reports option errors with QEMU text and the server message', async () => {
    const { socket } = await fakeServer(async (c) => {
      c.write(encodeGreeting(HandshakeFlag.FIXED_NEWSTYLE | HandshakeFlag.NO_ZEROES));
      await c.next();
      for (;;) {
        const { option } = await c.option();
        if (option === Opt.GO) c.write(encodeOptionError(option, Rep.ERR_UNKNOWN, "export 'exp' not present"));
        else if (option === Opt.ABORT) return;
        else c.reply(option, Rep.ERR_UNSUP);
      }
    });
    const e = await rejection(NbdClient.connect({ address: { type: 'unix', path: socket }, exportName: 'exp' }));
    expect(e.message).toBe("Requested export not available\nserver reported: export 'exp' not present");
  });

  it('reports a bad greeting and an early EOF as QEMU does', async () => {
    const { socket } = await fakeServer(async (c) => {
      c.write(Buffer.from('HELLO WORLD THIS IS NOT NBD\n'));
    });
    const e = await rejection(NbdClient.connect({ address: { type: 'unix', path: socket }, exportName: '' }));
    expect(e.message).toBe('Bad initial magic received: 0x48454c4c4f20574f');
    const { socket: s2 } = await fakeServer(async (c) => c.close());
    const e2 = await rejection(NbdClient.connect({ address: { type: 'unix', path: s2 }, exportName: '' }));
    expect(e2.message).toBe('Failed to read initial magic: Unexpected end-of-file before all data were read');
    const e3 = await rejection(NbdClient.connect({ address: { type: 'unix', path: `${s2}.none` }, exportName: '' }));
    expect(e3.message).toBe(`Failed to connect to '${s2}.none': No such file or directory`);
  });

  it('refuses invalid block sizes', async () => {
    const { socket } = await fakeServer(async (c) => {
      await handshake(c, { blockSizes: [3, 4096, 1 << 25] });
    });
    const e = await rejection(NbdClient.connect({ address: { type: 'unix', path: socket }, exportName: 'exp' }));
    expect(e.message).toBe('server minimum block size 3 is not a power of two');
  });

  it('lists exports with INFO and LIST_META_CONTEXT, ending with ABORT', async () => {
    let aborted = false;
    const { socket } = await fakeServer(async (c) => {
      c.write(encodeGreeting(HandshakeFlag.FIXED_NEWSTYLE | HandshakeFlag.NO_ZEROES));
      await c.next();
      for (;;) {
        const { option, data } = await c.option();
        if (option === Opt.LIST) {
          c.reply(option, Rep.SERVER, encodeRepServer({ name: 'a', description: 'first' }));
          c.reply(option, Rep.ACK);
        } else if (option === Opt.INFO) {
          c.reply(option, Rep.INFO, encodeInfoExport(4096, TxFlag.HAS_FLAGS));
          c.reply(option, Rep.ACK);
        } else if (option === Opt.LIST_META_CONTEXT) {
          const q = decodeMetaContextRequest(data, option);
          if (q.ok && q.value.queries.length === 0) c.reply(option, Rep.META_CONTEXT, encodeRepMetaContext({ id: 0, name: 'base:allocation' }));
          else c.reply(option, Rep.META_CONTEXT, encodeRepMetaContext({ id: 0, name: 'qemu:allocation-depth' }));
          c.reply(option, Rep.ACK);
        } else if (option === Opt.ABORT) {
          aborted = true;
          return;
        } else if (option === Opt.STRUCTURED_REPLY) c.reply(option, Rep.ACK);
        else c.reply(option, Rep.ERR_UNSUP);
      }
    });
    const listed = await within(listExports({ type: 'unix', path: socket }));
    expect(listed.exports).toMatchObject([{ name: 'a', description: 'first', info: { sizeBytes: 4096 }, contexts: ['base:allocation', 'qemu:allocation-depth'] }]);
    await within(new Promise((r) => setTimeout(r, 50)));
    expect(aborted).toBe(true);
  });
});

// ---------------------------------------------------------------- replies

describe('NBD client replies', () => {
  it('assembles a structured read from data and hole chunks in any order', async () => {
    const { socket } = await fakeServer(async (c) => {
      await handshake(c);
      const req = await c.request();
      expect(req.header).toMatchObject({ type: Cmd.READ, offset: 8192, length: 12288 });
      c.hole(req, 12288, 4096);
      c.data(req, 16384, filled(4096, 3));
      c.data(req, 8192, filled(4096, 1), ReplyFlag.DONE);
    });
    const client = await connect(socket);
    const buf = Buffer.alloc(12288, 0xff);
    await within(client.read(8192, buf));
    expect(buf.subarray(0, 4096).every((b) => b === 1)).toBe(true);
    expect(buf.subarray(4096, 8192).every((b) => b === 0)).toBe(true);
    expect(buf.subarray(8192).every((b) => b === 3)).toBe(true);
  });

  it('matches out-of-order replies to their requests by cookie', async () => {
    const { socket } = await fakeServer(async (c) => {
      await handshake(c);
      const reqs = [await c.request(), await c.request(), await c.request()];
      for (const req of reqs.reverse()) c.data(req, req.header.offset, filled(req.header.length, req.header.offset / 4096), ReplyFlag.DONE);
    });
    const client = await connect(socket);
    const bufs = [Buffer.alloc(4096), Buffer.alloc(4096), Buffer.alloc(4096)];
    await within(Promise.all(bufs.map((b, i) => client.read(4096 * (i + 1), b))));
    bufs.forEach((b, i) => expect(b[0]).toBe(i + 1));
  });

  it('fails only the request an error chunk belongs to, with its errno; the connection stays usable', async () => {
    const { socket } = await fakeServer(async (c) => {
      await handshake(c);
      const bad = await c.request();
      const good = await c.request();
      c.data(bad, bad.header.offset, filled(512, 9));
      c.error(bad, NbdErr.EIO, 'disk on fire', 0);
      c.hole(bad, bad.header.offset + 512, bad.header.length - 512);
      c.done(bad);
      c.data(good, good.header.offset, filled(good.header.length, 4), ReplyFlag.DONE);
      const w = await c.request();
      c.error(w, NbdErr.ENOSPC);
      const z = await c.request();
      c.simple(z, NbdErr.EPERM);
      const f = await c.request();
      c.simple(f);
    });
    const client = await connect(socket);
    const [bad, good] = await within(Promise.allSettled([client.read(0, Buffer.alloc(4096)), client.read(4096, Buffer.alloc(4096))]));
    expect(bad).toMatchObject({ status: 'rejected', reason: { code: 'EIO' } });
    expect(good.status).toBe('fulfilled');
    expect((await rejection(client.write(0, Buffer.alloc(512)))).code).toBe('ENOSPC');
    expect((await rejection(client.writeZeroes(0, 512))).code).toBe('EPERM');
    await within(client.flush());
  });

  it('treats an unknown error chunk type as the request failing, an unknown data type as a protocol error', async () => {
    const { socket } = await fakeServer(async (c) => {
      await handshake(c);
      const a = await c.request();
      const payload = Buffer.alloc(6);
      payload.writeUInt32BE(NbdErr.ENOMEM, 0);
      c.rawChunk(a, ReplyFlag.DONE, (1 << 15) | 77, payload);
      const b = await c.request();
      c.rawChunk(b, ReplyFlag.DONE, 42, Buffer.alloc(4));
    });
    const client = await connect(socket);
    expect((await rejection(client.flush())).code).toBe('ENOMEM');
    const e = await rejection(client.flush());
    expect(e.code).toBe('EINVAL');
    expect(e.message).toContain('unknown structured reply chunk type 42');
    expect((await rejection(client.flush())).code).toBe('EIO');
    expect(client.state).toBe('closed');
  });

  it('ends the connection on a chunk outside the request; every other request fails with EIO, none hangs', async () => {
    const { socket } = await fakeServer(async (c) => {
      await handshake(c);
      const a = await c.request();
      await c.request();
      c.data(a, a.header.offset + 4096, filled(4096, 1), ReplyFlag.DONE);
    });
    const client = await connect(socket);
    const [a, b] = await within(Promise.allSettled([client.read(0, Buffer.alloc(4096)), client.read(8192, Buffer.alloc(4096))]));
    expect(a).toMatchObject({ status: 'rejected', reason: { code: 'EINVAL', message: 'Protocol error: server sent chunk exceeding requested region' } });
    expect(b).toMatchObject({ status: 'rejected', reason: { code: 'EIO' } });
    expect((await rejection(client.read(0, Buffer.alloc(512)))).code).toBe('EIO');
  });

  it('rejects reads whose chunks leave a gap, an unknown cookie, and a simple reply to a structured read', async () => {
    const cases: Array<(c: FakeConn, req: Request) => void> = [
      (c, req) => c.data(req, req.header.offset, filled(1024, 1), ReplyFlag.DONE),
      (c, req) => c.simple({ ...req, header: { ...req.header, cookie: 999n } }),
      (c, req) => c.simple(req),
    ];
    for (const misbehave of cases) {
      const { socket } = await fakeServer(async (c) => {
        await handshake(c);
        misbehave(c, await c.request());
      });
      const client = await connect(socket);
      expect((await rejection(client.read(0, Buffer.alloc(4096)))).code).toMatch(/EINVAL|EIO/);
      expect(client.state).toBe('closed');
    }
  });

  it('fails requests promptly when the server closes mid-reply', async () => {
    const { socket } = await fakeServer(async (c) => {
      await handshake(c);
      const a = await c.request();
      await c.request();
      const head = encodeOffsetDataHeader(c.to(a), ReplyFlag.DONE, a.header.offset, a.header.length);
      c.write(head, filled(100, 1));
      setTimeout(() => c.close(), 20);
    });
    const client = await connect(socket);
    const results = await within(Promise.allSettled([client.read(0, Buffer.alloc(4096)), client.read(4096, Buffer.alloc(4096))]), 3000);
    for (const r of results) expect(r).toMatchObject({ status: 'rejected', reason: { code: 'EIO' } });
    expect(client.state).toBe('failing');
  });

  it('returns block status per context, clamped to the request; REQ_ONE keeps one extent', async () => {
    const { socket } = await fakeServer(async (c) => {
      await handshake(c, { contexts: { 'base:allocation': 3, 'qemu:allocation-depth': 9 } });
      const a = await c.request();
      expect(a.header).toMatchObject({ type: Cmd.BLOCK_STATUS, flags: 0, offset: 0, length: 65536 });
      c.status(a, 9, [{ length: 65536 * 4, flags: 1 }], 0);
      c.status(a, 3, [{ length: 4096, flags: 0 }, { length: 1 << 20, flags: StateFlag.HOLE | StateFlag.ZERO }]);
      const b = await c.request();
      expect(b.header.flags).toBe(CmdFlag.REQ_ONE);
      c.status(b, 3, [{ length: 512, flags: 0 }, { length: 512, flags: 3 }], 0);
      c.status(b, 9, [{ length: 1024, flags: 2 }]);
      const bad = await c.request();
      c.status(bad, 5, [{ length: 512, flags: 0 }]);
    });
    const client = await connect(socket, { metaContexts: ['base:allocation', 'qemu:allocation-depth'] });
    const all = await within(client.blockStatus(0, 65536));
    expect(all.get('base:allocation')).toEqual([{ length: 4096, flags: 0 }, { length: 61440, flags: 3 }]);
    expect(all.get('qemu:allocation-depth')).toEqual([{ length: 65536, flags: 1 }]);
    const one = await within(client.blockStatus(0, 65536, { reqOne: true }));
    expect(one.get('base:allocation')).toEqual([{ length: 512, flags: 0 }]);
    const e = await rejection(client.blockStatus(0, 4096));
    expect(e.message).toContain('unexpected context id 5');
  });
});

// ---------------------------------------------------------------- limits

describe('NBD client limits', () => {
  it('splits reads and writes at the server maximum and keeps at most 16 requests on the wire', async () => {
    let maxOutstanding = 0;
    const { socket } = await fakeServer(async (c) => {
      await handshake(c, { blockSizes: [512, 4096, 65536] });
      let seen = 0;
      const queue: Request[] = [];
      while (seen < 64) {
        // Collect everything the client sends before answering anything.
        queue.push(await c.request());
        seen++;
        await new Promise((r) => setTimeout(r, 2));
        if (queue.length === 16 || seen === 64) {
          maxOutstanding = Math.max(maxOutstanding, queue.length);
          for (const req of queue.splice(0)) {
            expect(req.header.length).toBe(65536);
            if (req.header.type === Cmd.READ) c.data(req, req.header.offset, filled(65536, req.header.offset / 65536), ReplyFlag.DONE);
            else {
              expect(req.payload?.[0]).toBe(req.header.offset / 65536 - 32);
              c.simple(req);
            }
          }
        }
      }
    });
    const client = await connect(socket);
    expect(client.maxPayloadBytes).toBe(65536);
    const buf = Buffer.alloc(32 * 65536);
    const data = Buffer.alloc(32 * 65536);
    for (let i = 0; i < 32; i++) data.fill(i, i * 65536, (i + 1) * 65536);
    await within(Promise.all([client.read(0, buf), client.write(32 * 65536, data)]));
    for (let i = 0; i < 32; i++) expect(buf[i * 65536]).toBe(i);
    expect(maxOutstanding).toBeLessThanOrEqual(16);
    expect(maxOutstanding).toBeGreaterThan(1);
  });

  it('refuses what the export does not advertise without sending anything', async () => {
    const { socket } = await fakeServer(async (c) => {
      await handshake(c, { flags: TxFlag.HAS_FLAGS });
      await c.request().catch(() => undefined);
    });
    const client = await connect(socket);
    for (const p of [client.flush(), client.trim(0, 512), client.writeZeroes(0, 512), client.cache(0, 512), client.write(0, Buffer.alloc(1), { fua: true }), client.read(0, Buffer.alloc(1), { df: true })]) {
      expect((await rejection(p)).code).toBe('ENOTSUP');
    }
  });
});

// ---------------------------------------------------------------- extended headers

describe('NBD client with extended headers', () => {
  it('sends 32-byte requests with 64-bit lengths and reads extended replies and BLOCK_STATUS_EXT', async () => {
    const { socket } = await fakeServer(async (c) => {
      const { options } = await handshake(c, { extended: true, size: 2 ** 33, contexts: { 'base:allocation': 1 } });
      expect(options).toEqual([Opt.EXTENDED_HEADERS, Opt.SET_META_CONTEXT, Opt.GO]);
      const z = await c.request();
      expect(z.header).toMatchObject({ type: Cmd.WRITE_ZEROES, offset: 0, length: 2 ** 32 + 4096 });
      c.done(z);
      const bs = await c.request();
      expect(bs.header.length).toBe(2 ** 33);
      c.status(bs, 1, [{ length: 2 ** 32 + 512, flags: 3 }, { length: 2 ** 32 - 512, flags: 0 }]);
      const r = await c.request();
      c.data(r, r.header.offset, filled(r.header.length, 8), ReplyFlag.DONE);
    });
    const client = await connect(socket);
    expect(client.extended).toBe(true);
    await within(client.writeZeroes(0, 2 ** 32 + 4096));
    const st = await within(client.blockStatus(0, 2 ** 33));
    expect(st.get('base:allocation')).toEqual([{ length: 2 ** 32 + 512, flags: 3 }, { length: 2 ** 32 - 512, flags: 0 }]);
    const buf = Buffer.alloc(4096);
    await within(client.read(2 ** 32, buf));
    expect(buf[4095]).toBe(8);
  });
});

// ---------------------------------------------------------------- reconnect

/** Serves one request on the first connection, drops it, and turns every later connection away. */
const dropsAfterFirstRequest: Script = async (c, index) => {
  if (index > 0) return c.close();
  await handshake(c);
  await c.request();
  c.close();
};

describe('NBD client reconnect', () => {
  it('re-sends a request lost with the connection once it reconnects within reconnect-delay', async () => {
    const { socket, conns } = await fakeServer(async (c, index) => {
      await handshake(c);
      const req = await c.request();
      if (index === 0) {
        c.close();
        return;
      }
      c.data(req, req.header.offset, filled(req.header.length, 6), ReplyFlag.DONE);
    });
    const client = await connect(socket, { reconnectDelaySeconds: 5 });
    const buf = Buffer.alloc(4096);
    await within(client.read(0, buf));
    expect(buf[0]).toBe(6);
    expect(conns.length).toBe(2);
    expect(client.state).toBe('connected');
  });

  it('fails with EIO at once without reconnect-delay', async () => {
    const { socket } = await fakeServer(dropsAfterFirstRequest);
    const client = await connect(socket, { reconnectDelaySeconds: 0 });
    const started = Date.now();
    expect((await rejection(client.read(0, Buffer.alloc(512)))).code).toBe('EIO');
    expect((await rejection(client.read(0, Buffer.alloc(512)))).code).toBe('EIO');
    expect(Date.now() - started).toBeLessThan(500);
    expect(client.state).toBe('failing');
  });

  it('fails with EIO after reconnect-delay when the server stays away', async () => {
    const { socket } = await fakeServer(dropsAfterFirstRequest);
    const client = await connect(socket, { reconnectDelaySeconds: 1 });
    const started = Date.now();
    expect((await rejection(client.read(0, Buffer.alloc(512)))).code).toBe('EIO');
    const waited = Date.now() - started;
    expect(waited).toBeGreaterThanOrEqual(900);
    expect(waited).toBeLessThan(3000);
    expect(client.state).toBe('failing');
    client.close();
    expect(client.state).toBe('closed');
  });

  it('sends NBD_CMD_DISC on a graceful disconnect', async () => {
    let disc = false;
    const { socket } = await fakeServer(async (c) => {
      await handshake(c);
      const req = await c.request();
      disc = req.header.type === Cmd.DISC;
    });
    const client = await connect(socket);
    await within(client.disconnect());
    await within(new Promise((r) => setTimeout(r, 50)));
    expect(disc).toBe(true);
    expect((await rejection(client.flush())).code).toBe('EIO');
  });
});
