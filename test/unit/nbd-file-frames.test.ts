/*
 * READ replies sent straight from the host file (nbd/socket-sender.ts,
 * native/sender.c, block/io.ts preadvToHost), checked byte for byte against
 * the file over unix and TCP sockets: structured replies with holes, DF,
 * simple replies, extended headers, many requests of both paths in flight
 * at once (frames must never interleave), a file that shrank under the
 * export (the frame keeps its length, the tail reads as zeros), and a client
 * that stops reading while large replies are queued (the export is removed
 * hard and the server closes without waiting for it; others are served).
 * The ReplyWriter's ordering of stream and file frames is checked with a
 * fake sender.
 */
import { spawnSync } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { PassThrough } from 'node:stream';
import { afterEach, describe, expect, it, vi } from 'vitest';
import { loadHostIo } from '../../drivers/file/host-io.js';
import { Cmd, CmdFlag, ReplyType } from '../../nbd/protocol.js';
import { ReplyWriter } from '../../nbd/reply-writer.js';
import { FILE_FRAME_MIN_BYTES } from '../../nbd/server-requests.js';
import { NbdServer } from '../../nbd/server.js';
import type { SocketSender } from '../../nbd/socket-sender.js';
import { decodeChunkPayload } from '../../nbd/wire-transmission.js';
import type { NbdExport } from '../../nbd/export.js';
import type { ServerFrame } from '../../nbd/stream.js';
import { testGraph } from '../helpers/graphs.js';
import { RawNbdClient } from '../helpers/nbd-raw-client.js';
import { scratchDir } from '../helpers/tmp.js';

const KiB = 1024;
const MiB = 1024 * KiB;
const FILE_BYTES = 8 * MiB;
/** A punched hole in the file: its reads come back as OFFSET_HOLE chunks. */
const HOLE = { offset: 3 * MiB, bytes: MiB };
const dir = scratchDir('qbt-nbd-file-frames-');
/** How long a closing connection may flush before it is destroyed (nbd/server-connection.ts end()). */
const CLOSE_BOUND_MS = 5000;
const native = loadHostIo().native;
const servers: NbdServer[] = [];
const clients: RawNbdClient[] = [];
let seq = 0;

afterEach(async () => {
  for (const c of clients.splice(0)) c.close();
  for (const s of servers.splice(0)) await s.close();
});

interface Served {
  content: Buffer;
  filename: string;
  exp: NbdExport;
  server: NbdServer;
  /** How many READ ranges went out as file frames. */
  fileFrames(): number;
  connect(): Promise<RawNbdClient>;
}

async function serve(transport: 'unix' | 'tcp' = 'unix'): Promise<Served> {
  const filename = path.join(dir, `disk${++seq}.raw`);
  const content = randomBytes(FILE_BYTES);
  content.fill(0, HOLE.offset, HOLE.offset + HOLE.bytes);
  fs.writeFileSync(filename, content);
  if (native) await loadHostIo().punchHole(fs.openSync(filename, 'r+'), HOLE.offset, HOLE.bytes);
  const graph = testGraph();
  const node = await graph.openNode({ driver: 'raw', file: { driver: 'file', filename } });
  const server = new NbdServer({ log: () => undefined });
  servers.push(server);
  const exp = server.createExport(graph, node, { name: '', writable: true });
  const preadToHost = vi.spyOn(exp.backend, 'preadToHost');
  const socket = path.join(dir, `s${seq}.sock`);
  const addr = transport === 'unix' ? await server.listen({ type: 'unix', path: socket }) : await server.listen({ type: 'inet', host: '127.0.0.1', port: 0 });
  const connect = async () => {
    const c = transport === 'unix' ? await RawNbdClient.connect(socket) : await RawNbdClient.connectTcp('127.0.0.1', portOf(addr));
    clients.push(c);
    return c;
  };
  const fileFrames = () => preadToHost.mock.results.filter((r) => r.type === 'return').length;
  return { content, filename, exp, server, fileFrames, connect };
}

function portOf(addr: unknown): number {
  const port = (addr as { port?: number } | undefined)?.port;
  if (typeof port !== 'number') throw new Error(`no port in ${JSON.stringify(addr)}`);
  return port;
}

/** Reads every frame until each cookie's reply is complete; the bytes each READ returned. */
async function collect(c: RawNbdClient, reads: Map<bigint, { offset: number; length: number }>): Promise<Map<bigint, Buffer>> {
  const out = new Map<bigint, Buffer>();
  for (const [cookie, r] of reads) out.set(cookie, Buffer.alloc(r.length, 0xee));
  const open = new Set(reads.keys());
  while (open.size > 0) {
    const f: ServerFrame = await c.frame();
    if (f.kind === 'simpleReply') {
      expect(f.error).toBe(0);
      f.data?.copy(out.get(f.cookie)!);
      open.delete(f.cookie);
      continue;
    }
    if (f.kind !== 'chunk') throw new Error(`unexpected ${f.kind}`);
    const r = reads.get(f.header.cookie)!;
    const p = decodeChunkPayload(f.header.type, f.payload);
    if (!p.ok) throw new Error(p.reason);
    const v = p.value as { type: number; offset?: number; data?: Buffer; length?: number };
    const at = Number(v.offset) - r.offset;
    if (v.type === ReplyType.OFFSET_DATA) v.data!.copy(out.get(f.header.cookie)!, at);
    else if (v.type === ReplyType.OFFSET_HOLE) out.get(f.header.cookie)!.fill(0, at, at + v.length!);
    else if (v.type !== ReplyType.NONE) throw new Error(`unexpected chunk type ${v.type}`);
    if (f.header.flags & 1) open.delete(f.header.cookie);
  }
  return out;
}

async function readAll(c: RawNbdClient, ranges: Array<{ offset: number; length: number; flags?: number }>): Promise<Buffer[]> {
  const reads = new Map<bigint, { offset: number; length: number }>();
  const cookies = ranges.map((r) => {
    const cookie = c.request({ type: Cmd.READ, offset: r.offset, length: r.length, flags: r.flags ?? 0 });
    reads.set(cookie, r);
    return cookie;
  });
  const got = await collect(c, reads);
  return cookies.map((k) => got.get(k)!);
}

const RANGES = [
  { offset: 0, length: MiB },
  { offset: 12345, length: 200_000 },
  { offset: HOLE.offset - 100 * KiB, length: HOLE.bytes + 200 * KiB },
  { offset: FILE_BYTES - FILE_FRAME_MIN_BYTES, length: FILE_FRAME_MIN_BYTES },
  { offset: 4096, length: 4096 },
];

describe.skipIf(!native)('NBD READ replies from the host file', () => {
  for (const mode of [
    { name: 'structured', opts: { structured: true }, flags: 0 },
    { name: 'structured with DF', opts: { structured: true }, flags: CmdFlag.DF },
    { name: 'simple replies', opts: {}, flags: 0 },
    { name: 'extended headers', opts: { extended: true }, flags: 0 },
  ]) {
    it(`return the file's bytes: ${mode.name}`, async () => {
      const s = await serve();
      const c = await s.connect();
      await c.negotiate(mode.opts);
      const got = await readAll(c, RANGES.map((r) => ({ ...r, flags: mode.flags })));
      RANGES.forEach((r, i) => expect(got[i]!.equals(s.content.subarray(r.offset, r.offset + r.length))).toBe(true));
      expect(s.fileFrames()).toBeGreaterThan(0);
    });
  }

  it('keeps frames whole with both paths in flight at once, over TCP too', async () => {
    for (const transport of ['unix', 'tcp'] as const) {
      const s = await serve(transport);
      const c = await s.connect();
      await c.negotiate({ structured: true });
      const ranges = Array.from({ length: 48 }, (_, i) => ({
        offset: ((i * 7919) % 120) * 64 * KiB + (i % 3) * 512,
        length: i % 2 ? 4 * KiB + i : 256 * KiB,
      }));
      const got = await readAll(c, ranges);
      ranges.forEach((r, i) => expect(got[i]!.equals(s.content.subarray(r.offset, r.offset + r.length))).toBe(true));
      expect(s.fileFrames()).toBeGreaterThan(0);
    }
  });

  it('serves a qcow2 image: data runs from its file, other clusters read as before', async () => {
    const filename = path.join(dir, `img${++seq}.qcow2`);
    const graph = testGraph();
    await graph.createImage('qcow2', filename, new Map([['size', String(FILE_BYTES)]]));
    const node = await graph.openImage(filename, { format: 'qcow2' });
    const content = Buffer.alloc(FILE_BYTES);
    const server = new NbdServer({ log: () => undefined });
    servers.push(server);
    const exp = server.createExport(graph, node, { name: '', writable: true });
    // Data in runs (one whose clusters lie in the file in reverse order), a zeroed cluster, the rest unallocated.
    for (const [offset, bytes] of [[0, 2 * MiB], [5 * MiB, MiB], [3 * MiB + 64 * KiB, 64 * KiB], [3 * MiB, 64 * KiB]] as const) {
      const data = randomBytes(bytes);
      await exp.backend.pwrite(offset, data);
      data.copy(content, offset);
    }
    await exp.backend.pwriteZeroes(MiB, 64 * KiB, 0);
    content.fill(0, MiB, MiB + 64 * KiB);
    const preadToHost = vi.spyOn(exp.backend, 'preadToHost');
    const socket = path.join(dir, `s${seq}.sock`);
    await server.listen({ type: 'unix', path: socket });
    const c = await RawNbdClient.connect(socket);
    clients.push(c);
    await c.negotiate({ structured: true });
    const ranges = [
      { offset: 0, length: MiB },
      { offset: 512 * KiB, length: MiB },
      { offset: 4 * MiB + 512 * KiB, length: MiB },
      { offset: 5 * MiB, length: MiB, flags: CmdFlag.DF },
      { offset: 3 * MiB, length: 128 * KiB },
      { offset: 4 * MiB + 512 * KiB, length: MiB, flags: CmdFlag.DF },
    ];
    const got = await readAll(c, ranges);
    ranges.forEach((r, i) => expect(got[i]!.equals(content.subarray(r.offset, r.offset + r.length))).toBe(true));
    const handled = await Promise.all(preadToHost.mock.results.map((r) => r.value as Promise<boolean>));
    expect(handled).toContain(true);
    expect(handled).toContain(false);
  });

  it('pads with zeros where the file shrank under the export', async () => {
    const s = await serve();
    fs.truncateSync(s.filename, FILE_BYTES - 100 * KiB);
    const c = await s.connect();
    await c.negotiate({ structured: true });
    const [got] = await readAll(c, [{ offset: FILE_BYTES - MiB, length: MiB, flags: CmdFlag.DF }]);
    const want = Buffer.concat([s.content.subarray(FILE_BYTES - MiB, FILE_BYTES - 100 * KiB), Buffer.alloc(100 * KiB)]);
    expect(got!.equals(want)).toBe(true);
  });

  it('a client that stopped reading is served others beside it, and dropped within the close bound', async () => {
    const s = await serve();
    const stuck = await s.connect();
    await stuck.negotiate({ structured: true });
    stuck.socket.pause();
    for (let i = 0; i < 16; i++) stuck.request({ type: Cmd.READ, offset: (i % 8) * MiB, length: MiB, flags: CmdFlag.DF });
    // The stuck client's replies fill the socket; another client is still answered.
    await new Promise((resolve) => setTimeout(resolve, 200));
    const other = await s.connect();
    await other.negotiate({ structured: true });
    const [got] = await readAll(other, [{ offset: 0, length: MiB }]);
    expect(got!.equals(s.content.subarray(0, MiB))).toBe(true);
    // Its queued frames are flushed for at most the connection's close bound (5 s), then it is cut off.
    const started = Date.now();
    await s.server.removeExport('', 'hard');
    await s.server.close();
    expect(Date.now() - started).toBeLessThan(CLOSE_BOUND_MS + 2000);
    stuck.socket.resume();
    expect(await stuck.closedWithin(2000)).toBe(true);
  }, 20_000);
});

// ---------------------------------------------------------------- writer

class FakeSender implements SocketSender {
  readonly queued: Array<{ label: string; done: (sent: boolean) => void }> = [];
  closedWith: boolean | null = null;
  constructor(private readonly log: string[]) {}
  sendFile(header: Buffer): Promise<boolean> {
    return new Promise((resolve) => this.queued.push({ label: header.toString(), done: (sent) => (this.log.push(header.toString()), resolve(sent)) }));
  }
  close(abort: boolean): void {
    this.closedWith = abort;
  }
}

describe('ReplyWriter with a sender', () => {
  function writer() {
    const log: string[] = [];
    const stream = new PassThrough();
    stream.on('data', (d: Buffer) => log.push(d.toString()));
    const sender = new FakeSender(log);
    let broken = 0;
    const w = new ReplyWriter(stream, () => broken++);
    w.attachSender(sender);
    return { log, sender, w, broken: () => broken };
  }

  it('keeps stream frames and file frames in the order they were sent', async () => {
    const { log, sender, w } = writer();
    const done = [w.send([Buffer.from('a')]), w.sendFile(Buffer.from('F1'), 3, 0, 1), w.sendFile(Buffer.from('F2'), 3, 0, 1), w.send([Buffer.from('b')])];
    // F1 waits for 'a' to be written; F2 follows F1 without waiting; 'b' waits for both.
    await vi.waitFor(() => expect(sender.queued.map((q) => q.label)).toEqual(['F1', 'F2']));
    expect(log).toEqual(['a']);
    sender.queued[0]!.done(true);
    sender.queued[1]!.done(true);
    await Promise.all(done);
    expect(log).toEqual(['a', 'F1', 'F2', 'b']);
    await w.idle();
  });

  it('a failed file frame closes the writer and reports the break', async () => {
    const { sender, w, broken } = writer();
    const f = w.sendFile(Buffer.from('F'), 3, 0, 1);
    await vi.waitFor(() => expect(sender.queued).toHaveLength(1));
    sender.queued[0]!.done(false);
    await f;
    expect(broken()).toBe(1);
    expect(sender.closedWith).toBe(true);
    expect(w.sendsFiles).toBe(false);
  });

  it('idle() waits for file frames; releaseSender lets the thread end gracefully', async () => {
    const { sender, w } = writer();
    void w.sendFile(Buffer.from('F'), 3, 0, 1);
    let idle = false;
    const p = w.idle().then(() => (idle = true));
    await vi.waitFor(() => expect(sender.queued).toHaveLength(1));
    expect(idle).toBe(false);
    sender.queued[0]!.done(true);
    await p;
    w.releaseSender();
    expect(sender.closedWith).toBe(false);
  });
});

describe.skipIf(!native)('the sending thread at exit', () => {
  /** Runs of each case: the crash at teardown was a race. */
  const EXIT_ROUNDS = 8;

  it('ends cleanly when the process leaves its loop: a sender closed just before, and one left open', () => {
    const module = path.resolve('dist/nbd/socket-sender.js');
    const file = path.join(dir, 'exit-frames.raw');
    fs.writeFileSync(file, Buffer.alloc(MiB, 7));
    const script = (mode: string, socketPath: string) => `
      import fs from 'node:fs';
      import net from 'node:net';
      import { openSocketSender } from ${JSON.stringify(module)};
      const mode = ${JSON.stringify(mode)};
      let client;
      const server = net.createServer((socket) => {
        const sender = openSocketSender(socket);
        const fd = fs.openSync(${JSON.stringify(file)}, 'r');
        sender.sendFile(Buffer.alloc(16), fd, 0, ${MiB}).then((sent) => {
          if (!sent) console.error('not sent');
          if (mode === 'closed') sender.close(false);
          fs.closeSync(fd);
          socket.destroy();
          client.destroy();
          server.close();
        });
      });
      server.listen(${JSON.stringify(socketPath)}, () => {
        client = net.connect(${JSON.stringify(socketPath)});
        client.resume();
      });
    `;
    const statuses = new Map<string, number>();
    for (let round = 0; round < EXIT_ROUNDS; round++) {
      for (const mode of ['closed', 'open']) {
        const socketPath = path.join(dir, `exit-${mode}-${round}.sock`);
        const run = spawnSync(process.execPath, ['--input-type=module', '-e', script(mode, socketPath)], { encoding: 'utf8', timeout: 60_000 });
        const key = `${mode} ${run.status ?? run.signal} ${run.stderr.trim()}`;
        statuses.set(key, (statuses.get(key) ?? 0) + 1);
      }
    }
    expect(Object.fromEntries(statuses)).toEqual({ 'closed 0 ': EXIT_ROUNDS, 'open 0 ': EXIT_ROUNDS });
  });
});
