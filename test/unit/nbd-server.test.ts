/*
 * The NBD server driven with raw bytes over a unix socket: every option
 * and its QEMU answer, extended headers (which no installed client can
 * negotiate), the request checks and error codes, flag mapping, the
 * in-flight limit, DISC, export removal (safe/hard), max-connections,
 * graceful shutdown, and malformed traffic: each bad client is
 * disconnected alone and the server goes on serving the next one.
 */
import fs from 'node:fs';
import type net from 'node:net';
import path from 'node:path';
import { Duplex, PassThrough } from 'node:stream';
import { afterEach, describe, expect, it } from 'vitest';
import type { OptionTree } from '../../block/keyval.js';
import { Req } from '../../block/flags.js';
import { NbdExport, type NbdExportOptions } from '../../nbd/export.js';
import {
  Cmd,
  CmdFlag,
  ClientFlag,
  ContextId,
  HandshakeFlag,
  Info,
  NbdErr,
  Opt,
  Rep,
  ReplyType,
  StateFlag,
  TxFlag,
} from '../../nbd/protocol.js';
import { NbdServer, type NbdServerOptions } from '../../nbd/server.js';
import type { NbdServerTls } from '../../nbd/tls.js';
import { zeroFlags } from '../../nbd/server-requests.js';
import {
  decodeRepMetaContext,
  decodeRepServer,
  encodeInfoRequest,
  encodeMetaContextRequest,
  encodeOption,
} from '../../nbd/wire-handshake.js';
import { decodeChunkPayload, encodeBlockStatusPayload, encodeRequest, type ChunkPayload } from '../../nbd/wire-transmission.js';
import { memGraph, memOf, pattern } from '../helpers/mem-driver.js';
import { RawNbdClient, expectAck, type Chunk } from '../helpers/nbd-raw-client.js';
import { scratchDir } from '../helpers/tmp.js';
import { testGraph } from '../helpers/graphs.js';

const MiB = 1024 * 1024;
const dir = scratchDir('qbt-nbd-server-');
let socketSeq = 0;
const servers: NbdServer[] = [];
const clients: RawNbdClient[] = [];

afterEach(async () => {
  for (const c of clients.splice(0)) c.close();
  for (const s of servers.splice(0)) await s.close();
});

interface Setup {
  server: NbdServer;
  socket: string;
  logs: string[];
  exp: NbdExport;
  connect(): Promise<RawNbdClient>;
}

async function setup(
  opts: { node?: Record<string, unknown>; exp?: NbdExportOptions; server?: NbdServerOptions; extraExports?: string[] } = {},
): Promise<Setup> {
  const graph = memGraph();
  const node = await graph.openNode({ driver: 'test-mem', size: MiB, ...opts.node } as OptionTree);
  const logs: string[] = [];
  const server = new NbdServer({ log: (m) => logs.push(m), ...opts.server });
  servers.push(server);
  const exp = server.createExport(graph, node, { name: '', writable: true, ...opts.exp });
  for (const name of opts.extraExports ?? []) {
    const other = await graph.openNode({ driver: 'test-mem', size: 4096 } as OptionTree);
    server.createExport(graph, other, { name, description: `about ${name}` });
  }
  const socket = path.join(dir, `s${++socketSeq}.sock`);
  await server.listen({ type: 'unix', path: socket });
  const connect = async () => {
    const c = await RawNbdClient.connect(socket);
    clients.push(c);
    return c;
  };
  return { server, socket, logs, exp, connect };
}

const payloadOf = (c: Chunk): ChunkPayload => {
  const p = decodeChunkPayload(c.header.type, c.payload);
  if (!p.ok) throw new Error(p.reason);
  return p.value;
};

async function errorReply(c: RawNbdClient): Promise<{ error: number; message?: string }> {
  const [f] = await c.reply();
  if (f!.kind === 'simpleReply') return { error: f!.error };
  const p = payloadOf(f as Chunk) as { error: number; message: string };
  return { error: p.error, message: p.message };
}

/** After a bad client, the server still serves a good one. */
async function stillServes(s: Setup): Promise<void> {
  const c = await s.connect();
  await c.negotiate({ structured: true });
  c.request({ type: Cmd.READ, offset: 0, length: 512 });
  const frames = await c.reply();
  expect(frames.at(-1)!.kind).toBe('chunk');
}

// ---------------------------------------------------------------- handshake

describe('NBD server handshake', () => {
  it('greets with fixed newstyle and NO_ZEROES and lists exports with descriptions', async () => {
    const s = await setup({ exp: { name: 'a', description: 'first' }, extraExports: ['b'] });
    const c = await s.connect();
    expect(await c.greet()).toBe(HandshakeFlag.FIXED_NEWSTYLE | HandshakeFlag.NO_ZEROES);
    const replies = await c.option(Opt.LIST);
    expectAck(replies);
    expect(replies.slice(0, -1).map((r) => decodeRepServer(r.data))).toEqual([
      { ok: true, value: { name: 'a', description: 'first' } },
      { ok: true, value: { name: 'b', description: 'about b' } },
    ]);
  });

  it('answers INFO and GO as QEMU: NAME only when asked, DESCRIPTION, BLOCK_SIZE, EXPORT', async () => {
    const s = await setup({ exp: { name: 'e', description: 'd' } });
    const c = await s.connect();
    await c.greet();
    const info = await c.option(Opt.INFO, encodeInfoRequest({ name: 'e', infos: [Info.NAME] }));
    expectAck(info);
    expect(info.slice(0, -1).map((r) => r.data.readUInt16BE(0))).toEqual([Info.NAME, Info.DESCRIPTION, Info.BLOCK_SIZE, Info.EXPORT]);
    const go = await c.option(Opt.GO, encodeInfoRequest({ name: 'e', infos: [] }));
    expectAck(go);
    expect(go.slice(0, -1).map((r) => r.data.readUInt16BE(0))).toEqual([Info.DESCRIPTION, Info.BLOCK_SIZE, Info.EXPORT]);
  });

  it('GO without block sizes advertises minimum 1; flags are QEMU’s for a writable export', async () => {
    const s = await setup({ node: { align: 512 } });
    const c = await s.connect();
    const { infos } = await c.negotiate({ structured: true, infos: [] });
    expect(infos).toContainEqual({ type: Info.BLOCK_SIZE, minimum: 1, preferred: 4096, maximum: 32 * MiB });
    const exp = infos.find((i) => i.type === Info.EXPORT) as { transmissionFlags: number; sizeBytes: number };
    expect(exp.sizeBytes).toBe(MiB);
    const want =
      TxFlag.HAS_FLAGS | TxFlag.SEND_FLUSH | TxFlag.SEND_FUA | TxFlag.SEND_CACHE | TxFlag.CAN_MULTI_CONN |
      TxFlag.SEND_TRIM | TxFlag.SEND_WRITE_ZEROES | TxFlag.SEND_FAST_ZERO | TxFlag.SEND_DF;
    expect(exp.transmissionFlags).toBe(want);
  });

  it('INFO without a block-size request on an aligned export: ERR_BLOCK_SIZE_REQD after the infos', async () => {
    const s = await setup({ node: { align: 4096 } });
    const c = await s.connect();
    await c.greet();
    const replies = await c.option(Opt.INFO, encodeInfoRequest({ name: '', infos: [] }));
    const last = replies.at(-1)!;
    expect(last.type).toBe(Rep.ERR_BLOCK_SIZE_REQD);
    expect(last.data.toString()).toBe('request NBD_INFO_BLOCK_SIZE to use this export');
    const withSizes = await c.option(Opt.INFO, encodeInfoRequest({ name: '', infos: [Info.BLOCK_SIZE] }));
    expectAck(withSizes);
  });

  it('errors keep the handshake going: unknown option, missing export, TLS, lengths, names', async () => {
    const s = await setup();
    const c = await s.connect();
    await c.greet();
    const expectErr = async (option: number, data: Buffer | undefined, type: number, text: string) => {
      const [r] = await c.option(option, data);
      expect([r!.type, r!.data.toString()]).toEqual([type, text]);
    };
    await expectErr(9999, Buffer.from('junk'), Rep.ERR_UNSUP, 'Unsupported option 9999 (<unknown>)');
    await expectErr(Opt.GO, encodeInfoRequest({ name: 'nope', infos: [] }), Rep.ERR_UNKNOWN, "export 'nope' not present");
    await expectErr(Opt.STARTTLS, undefined, Rep.ERR_POLICY, 'TLS not configured');
    await expectErr(Opt.STRUCTURED_REPLY, Buffer.from([1]), Rep.ERR_INVALID, "option 'structured reply' has unexpected length");
    const long = Buffer.alloc(8);
    long.writeUInt32BE(5000, 0);
    await expectErr(Opt.INFO, long, Rep.ERR_INVALID, 'Invalid name length: 5000');
    await expectErr(Opt.GO, Buffer.from([0, 0]), Rep.ERR_INVALID, 'Inconsistent lengths in option go');
    const meta = encodeMetaContextRequest({ exportName: '', queries: ['base:allocation'] });
    await expectErr(Opt.SET_META_CONTEXT, meta, Rep.ERR_INVALID, "request option 'set meta context' when structured reply is not negotiated");
    expectAck(await c.option(Opt.STRUCTURED_REPLY));
    await expectErr(Opt.STRUCTURED_REPLY, undefined, Rep.ERR_INVALID, 'structured reply already negotiated');
    expectAck(await c.option(Opt.EXTENDED_HEADERS));
    await expectErr(Opt.STRUCTURED_REPLY, undefined, Rep.ERR_EXT_HEADER_REQD, 'extended headers already negotiated');
    await expectErr(Opt.EXTENDED_HEADERS, undefined, Rep.ERR_INVALID, 'extended headers already negotiated');
    expectAck(await c.option(Opt.ABORT));
    expect(await c.closedWithin()).toBe(true);
  });

  it('meta contexts: LIST wildcards, SET ids as QEMU, unknown queries ignored', async () => {
    const bitmap = { name: 'qemu:dirty-bitmap:b0', extents: async (_o: number, n: number) => [{ length: n, flags: 1 }] };
    const s = await setup({ exp: { allocationDepth: true, bitmapContexts: [bitmap] } });
    const c = await s.connect();
    await c.greet();
    const names = async (option: number, queries: string[]) => {
      const r = await c.option(option, encodeMetaContextRequest({ exportName: '', queries }));
      expectAck(r);
      return r.slice(0, -1).map((x) => {
        const d = decodeRepMetaContext(x.data);
        return d.ok ? `${d.value.id}:${d.value.name}` : d.reason;
      });
    };
    const all = ['0:base:allocation', '0:qemu:allocation-depth', '0:qemu:dirty-bitmap:b0'];
    expect(await names(Opt.LIST_META_CONTEXT, [])).toEqual(all);
    expect(await names(Opt.LIST_META_CONTEXT, ['qemu:'])).toEqual(all.slice(1));
    expect(await names(Opt.LIST_META_CONTEXT, ['qemu:dirty-bitmap:', 'base:'])).toEqual([all[0], all[2]]);
    expect(await names(Opt.LIST_META_CONTEXT, ['x-other:thing', 'base:nothing'])).toEqual([]);
    expectAck(await c.option(Opt.STRUCTURED_REPLY));
    expect(await names(Opt.SET_META_CONTEXT, ['qemu:dirty-bitmap:b0', 'base:allocation', 'qemu:'])).toEqual([
      '0:base:allocation',
      '2:qemu:dirty-bitmap:b0',
    ]);
  });

  it('EXPORT_NAME: reply with 124 zeroes unless NO_ZEROES; an unknown name disconnects', async () => {
    const s = await setup({ exp: { name: 'x' } });
    for (const flags of [ClientFlag.FIXED_NEWSTYLE, ClientFlag.FIXED_NEWSTYLE | ClientFlag.NO_ZEROES]) {
      const c = await s.connect();
      await c.greet(flags);
      c.parser.expectExportNameReply((flags & ClientFlag.NO_ZEROES) !== 0);
      c.send(encodeOption(Opt.EXPORT_NAME, Buffer.from('x')));
      const f = await c.frame();
      expect(f).toMatchObject({ kind: 'exportNameReply', sizeBytes: MiB });
      expect(c.parser.bufferedBytes).toBe(0);
    }
    const bad = await s.connect();
    await bad.greet();
    bad.send(encodeOption(Opt.EXPORT_NAME, Buffer.from('y')));
    expect(await bad.closedWithin()).toBe(true);
    expect(s.logs).toContain('option negotiation failed: export not found');
    await stillServes(s).catch(() => undefined);
  });
});

// ---------------------------------------------------------------- malformed traffic

describe('NBD server against malformed traffic', () => {
  const cases: Array<[string, (c: RawNbdClient) => Promise<void>, string | null]> = [
    ['unknown client flags', async (c) => void (await c.greet(0x80)), 'option negotiation failed: Unknown client flags 0x80 received'],
    [
      'bad option magic',
      async (c) => {
        await c.greet();
        c.send(Buffer.from('NOTMAGIC\0\0\0\x07\0\0\0\0'));
      },
      'option negotiation failed: Bad magic received',
    ],
    [
      'a 4 GiB option length',
      async (c) => {
        await c.greet();
        const h = encodeOption(Opt.GO);
        h.writeUInt32BE(0xffffffff, 12);
        c.send(h);
      },
      'option negotiation failed: len (4294967295) is larger than max len (33554432)',
    ],
    [
      'a request before negotiation',
      async (c) => {
        await c.greet();
        c.send(encodeRequest({ flags: 0, type: Cmd.READ, cookie: 1n, offset: 0, length: 512 }, false));
      },
      null,
    ],
    [
      'an abrupt close in the middle of an option',
      async (c) => {
        await c.greet();
        c.send(encodeOption(Opt.GO, encodeInfoRequest({ name: '', infos: [] })).subarray(0, 20));
        c.close();
      },
      null,
    ],
    [
      'a non-fixed-newstyle client asking for LIST',
      async (c) => {
        await c.greet(0);
        c.send(encodeOption(Opt.LIST));
      },
      'option negotiation failed: Unsupported option 3 (list)',
    ],
  ];
  for (const [name, act, log] of cases) {
    it(`disconnects on ${name} and keeps serving others`, async () => {
      const s = await setup();
      const c = await s.connect();
      await act(c);
      expect(await c.closedWithin()).toBe(true);
      if (log) expect(s.logs).toContain(log);
      await stillServes(s);
    });
  }

  it('skips an over-long option it does not know without buffering it', async () => {
    const s = await setup();
    const c = await s.connect();
    await c.greet();
    const replies = await c.option(77, Buffer.alloc(3 * MiB));
    expect(replies[0]!.type).toBe(Rep.ERR_UNSUP);
    expectAck(await c.option(Opt.STRUCTURED_REPLY));
  });

  it('bad request magic, oversize WRITE, abrupt close mid-WRITE: disconnect that client only', async () => {
    const s = await setup();
    const bad = await s.connect();
    await bad.negotiate({ structured: true });
    const req = encodeRequest({ flags: 0, type: Cmd.READ, cookie: 1n, offset: 0, length: 1 }, false);
    req.writeUInt32BE(0xdeadbeef, 0);
    bad.send(req);
    expect(await bad.closedWithin()).toBe(true);
    expect(s.logs).toContain('Disconnect client, due to: invalid magic (got 0xdeadbeef, expected 0x25609513)');

    const big = await s.connect();
    await big.negotiate({ structured: true });
    big.request({ type: Cmd.WRITE, offset: 0, length: 33 * MiB });
    expect(await errorReply(big)).toEqual({ error: NbdErr.EINVAL, message: 'len (34603008) is larger than max len (33554432)' });
    expect(await big.closedWithin()).toBe(true);

    const cut = await s.connect();
    await cut.negotiate({ structured: true });
    cut.socket.write(encodeRequest({ flags: 0, type: Cmd.WRITE, cookie: 1n, offset: 0, length: 65536 }, false));
    cut.socket.write(Buffer.alloc(1000, 1));
    cut.close();
    await stillServes(s);
  });
});

// ---------------------------------------------------------------- transmission

describe('NBD server transmission', () => {
  it('checks requests with the spec’s errors and QEMU’s messages', async () => {
    const s = await setup();
    const c = await s.connect();
    await c.negotiate({ structured: true });
    const expectError = async (h: Parameters<RawNbdClient['request']>[0], error: number, message: string, payload?: Buffer) => {
      c.request(h, payload);
      expect(await errorReply(c)).toEqual({ error, message });
    };
    await expectError({ type: Cmd.READ, offset: MiB, length: 512 }, NbdErr.EINVAL, `operation past EOF; From: ${MiB}, Len: 512, Size: ${MiB}`);
    await expectError({ type: Cmd.WRITE, offset: MiB - 1, length: 2 }, NbdErr.ENOSPC, `operation past EOF; From: ${MiB - 1}, Len: 2, Size: ${MiB}`, Buffer.alloc(2));
    await expectError({ type: Cmd.WRITE_ZEROES, offset: MiB, length: 1 }, NbdErr.ENOSPC, `operation past EOF; From: ${MiB}, Len: 1, Size: ${MiB}`);
    await expectError({ type: Cmd.READ, length: 33 * MiB }, NbdErr.EINVAL, 'len (34603008) is larger than max len (33554432)');
    await expectError({ type: Cmd.FLUSH, flags: CmdFlag.REQ_ONE }, NbdErr.EINVAL, 'unsupported flags for command flush (got 0x8)');
    await expectError({ type: 42 }, NbdErr.EINVAL, 'invalid request type (42) received');
    await expectError({ type: Cmd.BLOCK_STATUS, length: 512 }, NbdErr.EINVAL, 'CMD_BLOCK_STATUS not negotiated');
    c.request({ type: Cmd.WRITE, offset: 0, length: 4 }, Buffer.from('abcd'));
    expect((await c.reply())[0]).toMatchObject({ kind: 'simpleReply', error: 0 });
  });

  it('read-only exports answer EPERM to writes, trims and zeroes', async () => {
    const s = await setup({ exp: { writable: false } });
    const c = await s.connect();
    const { infos } = await c.negotiate({ structured: false });
    const flags = (infos.find((i) => i.type === Info.EXPORT) as { transmissionFlags: number }).transmissionFlags;
    expect(flags & TxFlag.READ_ONLY).toBeTruthy();
    expect(flags & (TxFlag.SEND_TRIM | TxFlag.SEND_WRITE_ZEROES | TxFlag.SEND_DF)).toBe(0);
    for (const type of [Cmd.WRITE, Cmd.TRIM, Cmd.WRITE_ZEROES]) {
      c.request({ type, offset: 0, length: 4 }, type === Cmd.WRITE ? Buffer.alloc(4) : undefined);
      expect(await errorReply(c)).toEqual({ error: NbdErr.EPERM });
    }
  });

  it('structured reads: holes for zero areas, data runs as OFFSET_DATA; DF gives one chunk; simple replies carry data', async () => {
    const s = await setup();
    const mem = memOf(s.exp.backend.node);
    const data = pattern(8192, 3);
    await s.exp.backend.pwrite(65536, data);
    const c = await s.connect();
    await c.negotiate({ structured: true });
    c.request({ type: Cmd.READ, offset: 0, length: 3 * 65536 });
    const frames = (await c.reply()) as Chunk[];
    const payloads = frames.map(payloadOf);
    expect(payloads.map((p) => p.type)).toEqual([ReplyType.OFFSET_HOLE, ReplyType.OFFSET_DATA, ReplyType.OFFSET_HOLE]);
    expect(payloads[0]).toEqual({ type: ReplyType.OFFSET_HOLE, offset: 0, length: 65536 });
    expect((payloads[1] as { data: Buffer }).data).toEqual(Buffer.from(data));
    expect(frames.map((f) => f.header.flags)).toEqual([0, 0, 1]);
    c.request({ type: Cmd.READ, offset: 0, length: 3 * 65536, flags: CmdFlag.DF });
    const df = (await c.reply()) as Chunk[];
    expect(df).toHaveLength(1);
    expect((payloadOf(df[0]!) as { data: Buffer }).data.subarray(65536, 65536 + 8192)).toEqual(Buffer.from(data));
    expect(mem.data.length).toBe(MiB);

    const plain = await s.connect();
    await plain.negotiate({ structured: false });
    plain.request({ type: Cmd.READ, offset: 65536, length: 8192 });
    const [r] = await plain.reply();
    expect(r).toMatchObject({ kind: 'simpleReply', error: 0, data: Buffer.from(data) });
  });

  it('sparse reads of a host file see holes punched after its data region was cached', async () => {
    const file = path.join(dir, 'cache.raw');
    fs.writeFileSync(file, Buffer.alloc(MiB, 0x42));
    const graph = testGraph();
    const node = await graph.openImage(file, { format: 'raw', options: { discard: 'unmap' } });
    const server = new NbdServer();
    servers.push(server);
    server.createExport(graph, node, { name: '', writable: true });
    const socket = path.join(dir, `s${++socketSeq}.sock`);
    await server.listen({ type: 'unix', path: socket });
    const c = await RawNbdClient.connect(socket);
    clients.push(c);
    await c.negotiate({ structured: true });
    const types = async () => {
      c.request({ type: Cmd.READ, offset: 0, length: MiB });
      return ((await c.reply()) as Chunk[]).map((f) => payloadOf(f).type);
    };
    expect(await types()).toEqual([ReplyType.OFFSET_DATA]);
    c.request({ type: Cmd.WRITE_ZEROES, offset: 0, length: 65536 });
    await c.reply();
    expect(await types()).toEqual([ReplyType.OFFSET_HOLE, ReplyType.OFFSET_DATA]);
  });

  it('maps WRITE_ZEROES and FUA flags to the block layer as QEMU does', () => {
    expect(zeroFlags(0)).toBe(Req.MAY_UNMAP);
    expect(zeroFlags(CmdFlag.NO_HOLE)).toBe(0);
    expect(zeroFlags(CmdFlag.FUA | CmdFlag.FAST_ZERO)).toBe(Req.FUA | Req.MAY_UNMAP | Req.NO_FALLBACK);
  });

  it('writes, zeroes, trims and flushes reach the node with the right flags', async () => {
    const s = await setup({ node: { 'write-flags': Req.FUA, 'zero-flags': Req.FUA | Req.MAY_UNMAP | Req.NO_FALLBACK, discard: 'unmap' } });
    const mem = memOf(s.exp.backend.node);
    const c = await s.connect();
    await c.negotiate({ structured: true });
    const ok = async (h: Parameters<RawNbdClient['request']>[0], payload?: Buffer) => {
      c.request(h, payload);
      expect((await c.reply())[0]).toMatchObject({ kind: 'simpleReply', error: 0 });
    };
    mem.log.length = 0;
    await ok({ type: Cmd.WRITE, flags: CmdFlag.FUA, offset: 4096, length: 4096 }, Buffer.alloc(4096, 9));
    await ok({ type: Cmd.WRITE_ZEROES, offset: 8192, length: 4096 });
    await ok({ type: Cmd.WRITE_ZEROES, flags: CmdFlag.NO_HOLE | CmdFlag.FAST_ZERO, offset: 8192, length: 4096 });
    await ok({ type: Cmd.TRIM, offset: 0, length: 4096 });
    await ok({ type: Cmd.FLUSH });
    await ok({ type: Cmd.CACHE, offset: 0, length: 8192 });
    const ops = mem.log.filter((x) => x.op !== 'block-status').map((x) => `${x.op} ${x.offset}+${x.bytes}/${x.flags}`);
    expect(ops.slice(0, 4)).toEqual([
      `write 4096+4096/${Req.FUA}`,
      `write-zeroes 8192+4096/${Req.MAY_UNMAP}`,
      `write-zeroes 8192+4096/${Req.NO_FALLBACK}`,
      'discard 0+4096/0',
    ]);
    expect(ops).toContain('flush 0+0/0');
  });

  it('FAST_ZERO on a node that cannot zero fast fails with ENOTSUP and changes nothing', async () => {
    const s = await setup({ node: { driver: 'test-mem-bare', fill: 7 } });
    const c = await s.connect();
    await c.negotiate({ structured: true });
    c.request({ type: Cmd.WRITE_ZEROES, flags: CmdFlag.FAST_ZERO, offset: 0, length: 4096 });
    expect(await errorReply(c)).toEqual({ error: NbdErr.ENOTSUP, message: 'writing to file failed' });
    c.request({ type: Cmd.READ, offset: 0, length: 16, flags: CmdFlag.DF });
    expect((payloadOf((await c.reply())[0] as Chunk) as { data: Buffer }).data).toEqual(Buffer.alloc(16, 7));
  });

  it('block status for each negotiated context, REQ_ONE, and allocation depth', async () => {
    const s = await setup({ exp: { allocationDepth: true } });
    await s.exp.backend.pwrite(65536, pattern(65536, 1));
    const c = await s.connect();
    const { contexts } = await c.negotiate({ structured: true, contexts: ['base:allocation', 'qemu:allocation-depth'] });
    expect(contexts.map((x) => decodeRepMetaContext(x.data))).toEqual([
      { ok: true, value: { id: ContextId.BASE_ALLOCATION, name: 'base:allocation' } },
      { ok: true, value: { id: ContextId.ALLOCATION_DEPTH, name: 'qemu:allocation-depth' } },
    ]);
    c.request({ type: Cmd.BLOCK_STATUS, offset: 0, length: 4 * 65536 });
    const chunks = ((await c.reply()) as Chunk[]).map(payloadOf);
    const hz = StateFlag.HOLE | StateFlag.ZERO;
    expect(chunks).toEqual([
      { type: ReplyType.BLOCK_STATUS, contextId: 0, extents: [{ length: 65536, flags: hz }, { length: 65536, flags: 0 }, { length: 131072, flags: hz }] },
      { type: ReplyType.BLOCK_STATUS, contextId: 1, extents: [{ length: 4 * 65536, flags: 1 }] },
    ]);
    c.request({ type: Cmd.BLOCK_STATUS, flags: CmdFlag.REQ_ONE, offset: 0, length: 4 * 65536 });
    const one = ((await c.reply()) as Chunk[]).map(payloadOf);
    expect(one[0]).toEqual({ type: ReplyType.BLOCK_STATUS, contextId: 0, extents: [{ length: 65536, flags: hz }] });
    c.request({ type: Cmd.BLOCK_STATUS, offset: 0, length: 0 });
    expect(await errorReply(c)).toEqual({ error: NbdErr.EINVAL, message: 'need non-zero length' });
  });
});

// ---------------------------------------------------------------- extended headers

describe('NBD server with extended headers', () => {
  it('echoes offsets, sends NONE for success, 64-bit block status, PAYLOAD_LEN writes', async () => {
    const s = await setup({ exp: { allocationDepth: true } });
    const c = await s.connect();
    const { infos } = await c.negotiate({ extended: true, contexts: ['base:allocation', 'qemu:allocation-depth'] });
    const flags = (infos.find((i) => i.type === Info.EXPORT) as { transmissionFlags: number }).transmissionFlags;
    expect(flags & TxFlag.BLOCK_STATUS_PAYLOAD).toBeTruthy();
    expect(flags & TxFlag.SEND_DF).toBeTruthy();

    c.request({ type: Cmd.WRITE, flags: CmdFlag.PAYLOAD_LEN, offset: 1024, length: 4 }, Buffer.from('wxyz'));
    const [w] = (await c.reply()) as Chunk[];
    expect(w!.header).toMatchObject({ type: ReplyType.NONE, flags: 1, requestOffset: 1024, length: 0 });

    c.request({ type: Cmd.READ, offset: 1024, length: 4 });
    const [r] = (await c.reply()) as Chunk[];
    expect(r!.header.requestOffset).toBe(1024);
    expect(payloadOf(r!)).toEqual({ type: ReplyType.OFFSET_DATA, offset: 1024, data: Buffer.from('wxyz') });

    c.request({ type: Cmd.BLOCK_STATUS, offset: 0, length: MiB });
    const bs = ((await c.reply()) as Chunk[]).map(payloadOf);
    expect(bs.map((p) => p.type)).toEqual([ReplyType.BLOCK_STATUS_EXT, ReplyType.BLOCK_STATUS_EXT]);

    c.request({ type: Cmd.BLOCK_STATUS, flags: CmdFlag.PAYLOAD_LEN, offset: 0, length: 12 }, encodeBlockStatusPayload({ effectLength: 4096, contextIds: [1] }));
    const filtered = ((await c.reply()) as Chunk[]).map(payloadOf);
    expect(filtered).toEqual([{ type: ReplyType.BLOCK_STATUS_EXT, contextId: 1, extents: [{ length: 4096, flags: 1 }] }]);

    c.request({ type: Cmd.BLOCK_STATUS, flags: CmdFlag.PAYLOAD_LEN, offset: 0, length: 16 }, encodeBlockStatusPayload({ effectLength: 4096, contextIds: [1, 1] }));
    expect(await errorReply(c)).toEqual({ error: NbdErr.EINVAL, message: 'CMD_BLOCK_STATUS payload not valid' });

    c.request({ type: Cmd.TRIM, flags: CmdFlag.PAYLOAD_LEN, offset: 0, length: 8 }, Buffer.alloc(8));
    expect(await errorReply(c)).toEqual({ error: NbdErr.EINVAL, message: 'unsupported flags for command trim (got 0x20)' });

    c.request({ type: Cmd.FLUSH });
    expect(((await c.reply()) as Chunk[])[0]!.header.type).toBe(ReplyType.NONE);
  });

  it('refuses EXPORT_NAME once extended headers are on', async () => {
    const s = await setup();
    const c = await s.connect();
    await c.greet();
    expectAck(await c.option(Opt.EXTENDED_HEADERS));
    c.send(encodeOption(Opt.EXPORT_NAME));
    expect(await c.closedWithin()).toBe(true);
    expect(s.logs).toContain('option negotiation failed: Extended headers already negotiated');
  });
});

// ---------------------------------------------------------------- TLS seam

/** A "TLS" that only swaps streams: enough to test the server's side of STARTTLS. */
const passthroughTls: NbdServerTls = {
  async upgrade(socket: net.Socket, pending: Buffer) {
    const readable = new PassThrough();
    readable.write(pending);
    socket.pipe(readable);
    socket.resume();
    return Duplex.from({ readable, writable: socket });
  },
};

describe('NBD server requiring TLS (seam)', () => {
  it('refuses options before STARTTLS, upgrades on STARTTLS, then serves', async () => {
    const s = await setup({ server: { tls: passthroughTls } });
    const c = await s.connect();
    await c.greet();
    const [go] = await c.option(Opt.GO, encodeInfoRequest({ name: '', infos: [] }));
    expect([go!.type, go!.data.toString()]).toEqual([Rep.ERR_TLS_REQD, 'Option 0x7 not permitted before TLS']);
    expectAck(await c.option(Opt.STARTTLS));
    const [again] = await c.option(Opt.STARTTLS);
    expect([again!.type, again!.data.toString()]).toEqual([Rep.ERR_INVALID, 'TLS already enabled']);
    expectAck(await c.option(Opt.STRUCTURED_REPLY));
    expectAck(await c.option(Opt.GO, encodeInfoRequest({ name: '', infos: [] })));
    c.parser.enterTransmission(false);
    c.request({ type: Cmd.READ, offset: 0, length: 512 });
    expect(((await c.reply()) as Chunk[]).map((f) => f.header.type)).toEqual([ReplyType.OFFSET_HOLE]);
  });

  it('EXPORT_NAME before TLS disconnects; ABORT gets ERR_TLS_REQD and a close; a failed upgrade drops the client', async () => {
    const failing: NbdServerTls = { upgrade: async () => Promise.reject(new Error('handshake failed')) };
    const s = await setup({ server: { tls: failing } });
    const a = await s.connect();
    await a.greet();
    a.send(encodeOption(Opt.EXPORT_NAME));
    expect(await a.closedWithin()).toBe(true);
    expect(s.logs).toContain('option negotiation failed: Option 0x1 not permitted before TLS');
    const b = await s.connect();
    await b.greet();
    expect((await b.option(Opt.ABORT))[0]!.type).toBe(Rep.ERR_TLS_REQD);
    expect(await b.closedWithin()).toBe(true);
    const c = await s.connect();
    await c.greet();
    expectAck(await c.option(Opt.STARTTLS));
    expect(await c.closedWithin()).toBe(true);
    expect(s.logs).toContain('option negotiation failed: handshake failed');
  });
});

// ---------------------------------------------------------------- TCP

describe('NBD server over TCP', () => {
  it('listens on 127.0.0.1 with a free port and serves a client there', async () => {
    const graph = memGraph();
    const node = await graph.openNode({ driver: 'test-mem', size: MiB } as OptionTree);
    const server = new NbdServer();
    servers.push(server);
    server.createExport(graph, node, { name: 'tcp', writable: true });
    const addr = await server.listen({ type: 'inet', port: 0 });
    expect(typeof addr === 'object' && addr.address).toBe('127.0.0.1');
    const port = typeof addr === 'object' ? addr.port : 0;
    const c = await RawNbdClient.connectTcp('127.0.0.1', port);
    clients.push(c);
    await c.negotiate({ exportName: 'tcp', structured: true });
    c.request({ type: Cmd.WRITE, offset: 512, length: 3 }, Buffer.from('tcp'));
    expect((await c.reply())[0]).toMatchObject({ kind: 'simpleReply', error: 0 });
    c.request({ type: Cmd.READ, offset: 512, length: 3 });
    expect(payloadOf((await c.reply())[0] as Chunk)).toEqual({ type: ReplyType.OFFSET_DATA, offset: 512, data: Buffer.from('tcp') });
  });
});

// ---------------------------------------------------------------- concurrency and lifetime

describe('NBD server concurrency and lifetime', () => {
  const slow = { driver: 'null-co', size: MiB, 'read-zeroes': true, 'latency-ns': 30_000_000 };

  it('keeps at most 16 requests in flight and answers every pipelined request', async () => {
    const s = await setup({ node: slow, exp: { writable: false } });
    const c = await s.connect();
    await c.negotiate({ structured: true });
    let maxInFlight = 0;
    const sampler = setInterval(() => (maxInFlight = Math.max(maxInFlight, s.exp.backend.inFlight)), 2);
    const cookies = new Set<bigint>();
    for (let i = 0; i < 40; i++) cookies.add(c.request({ type: Cmd.READ, offset: i * 4096, length: 4096, flags: CmdFlag.DF }));
    const seen = new Set<bigint>();
    while (seen.size < 40) {
      const f = await c.frame();
      if (f.kind === 'chunk') seen.add(f.header.cookie);
    }
    clearInterval(sampler);
    expect(seen).toEqual(cookies);
    expect(maxInFlight).toBeGreaterThan(1);
    expect(maxInFlight).toBeLessThanOrEqual(16);
  });

  it('a client stuck on slow requests does not hold up another client', async () => {
    const s = await setup({ node: { driver: 'test-mem', size: MiB } });
    const mem = memOf(s.exp.backend.node);
    let release: () => void = () => undefined;
    const gate = new Promise<void>((r) => (release = r));
    mem.beforeCall = (call) => (call.op === 'read' && call.offset === 0 ? gate : undefined);
    const stuck = await s.connect();
    await stuck.negotiate({ structured: true });
    stuck.request({ type: Cmd.READ, offset: 0, length: 512, flags: CmdFlag.DF });
    const other = await s.connect();
    await other.negotiate({ structured: true });
    other.request({ type: Cmd.READ, offset: 4096, length: 512, flags: CmdFlag.DF });
    expect(((await other.reply())[0] as Chunk).header.type).toBe(ReplyType.OFFSET_DATA);
    release();
    expect(((await stuck.reply())[0] as Chunk).header.type).toBe(ReplyType.OFFSET_DATA);
  });

  it('DISC: requests in flight are answered, then the server closes', async () => {
    const s = await setup({ node: slow, exp: { writable: false } });
    const c = await s.connect();
    await c.negotiate({ structured: true });
    c.request({ type: Cmd.READ, offset: 0, length: 512, flags: CmdFlag.DF });
    c.request({ type: Cmd.DISC });
    const [f] = await c.reply();
    expect(f!.kind).toBe('chunk');
    expect(await c.closedWithin()).toBe(true);
  });

  it('safe removal is refused while a client is connected; hard removal answers ESHUTDOWN and drops it', async () => {
    const s = await setup({ node: slow, exp: { writable: false, name: 'e' } });
    const c = await s.connect();
    await c.negotiate({ structured: true, exportName: 'e' });
    await expect(s.server.removeExport('e', 'safe')).rejects.toThrow("export 'e' still in use");
    c.request({ type: Cmd.READ, offset: 0, length: 512 });
    await new Promise((r) => setTimeout(r, 5));
    const removal = s.server.removeExport('e', 'hard');
    expect(await errorReply(c)).toEqual({ error: NbdErr.ESHUTDOWN, message: 'export is being removed' });
    expect(await c.closedWithin()).toBe(true);
    await removal;
    expect(s.server.getExport('e')).toBeUndefined();
    const late = await s.connect();
    await late.greet();
    const [r] = await late.option(Opt.GO, encodeInfoRequest({ name: 'e', infos: [] }));
    expect(r!.type).toBe(Rep.ERR_UNKNOWN);
  });

  it('max-connections 1: no multi-conn, and a second client waits for the first', async () => {
    const s = await setup({ server: { maxConnections: 1 } });
    const first = await s.connect();
    const { infos } = await first.negotiate({ structured: true });
    expect((infos.find((i) => i.type === Info.EXPORT) as { transmissionFlags: number }).transmissionFlags & TxFlag.CAN_MULTI_CONN).toBe(0);
    const second = await s.connect();
    await expect(second.frame(200)).rejects.toThrow('timed out');
    first.request({ type: Cmd.DISC });
    expect((await second.frame()).kind).toBe('greeting');
  });

  it('graceful shutdown finishes requests in flight, then closes clients and exports', async () => {
    const s = await setup({ node: slow, exp: { writable: false } });
    const c = await s.connect();
    await c.negotiate({ structured: true });
    c.request({ type: Cmd.READ, offset: 0, length: 512, flags: CmdFlag.DF });
    await new Promise((r) => setTimeout(r, 5));
    const closing = s.server.close();
    const [f] = (await c.reply()) as Chunk[];
    expect(f!.header.type).toBe(ReplyType.OFFSET_DATA);
    expect(await c.closedWithin()).toBe(true);
    await closing;
    expect(s.server.listExports()).toEqual([]);
  });
});
