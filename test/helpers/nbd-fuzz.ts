/*
 * The harness of the NBD server fuzzer (test/property/nbd-fuzz.test.ts):
 * an in-process server with a writable and a read-only export on raw
 * files, a byte model of what acknowledged commands left in the writable
 * one, a collector of the replies to a batch of requests, the well-behaved
 * client that checks the server after every case, and a sampler that
 * watches memory and the server's per-connection counters.
 *
 * The model (per byte): a value and a state — known; maybe zero (TRIM may
 * or may not have punched it); unknown (an unacknowledged write or two
 * concurrent writes may or may not have landed). A read checks known bytes
 * exactly and maybe-zero bytes against {value, 0}; an acknowledged write or
 * zeroing makes bytes known again. That is the "no acknowledged write is
 * lost" check: whatever a client was told succeeded reads back through
 * another client, however the first one was dropped afterwards.
 */
import fs from 'node:fs';
import path from 'node:path';
import { expect } from 'vitest';
import type { BlockGraph } from '../../block/graph.js';
import { Cmd, CmdFlag, MAX_BUFFER_BYTES, MAX_REQUESTS_IN_FLIGHT, ReplyType, isErrorChunk } from '../../nbd/protocol.js';
import { NbdServer, type ConnectionStats } from '../../nbd/server.js';
import { MAX_IN_FLIGHT_BYTES, MAX_QUEUED_INPUT_BYTES } from '../../nbd/server-connection.js';
import { decodeChunkPayload } from '../../nbd/wire-transmission.js';
import { RawNbdClient } from './nbd-raw-client.js';
import { testGraph } from './graphs.js';

export const KiB = 1024;
export const MiB = 1024 * KiB;
/** The writable export ('') and the read-only one ('ro'). */
export const RW_EXPORT_BYTES = MiB;
export const RO_EXPORT_BYTES = 64 * KiB;
export const RO_EXPORT = 'ro';
/** Cut off clients still negotiating after this long (the server's handshake limit). */
export const FUZZ_HANDSHAKE_SECONDS = 3;

const KNOWN = 0;
const MAYBE_ZERO = 1;
const UNKNOWN = 2;

/** Deterministic bytes for a payload: `bytes` from a 32-bit seed (xorshift). */
export function seededBytes(bytes: number, seed: number): Buffer {
  const out = Buffer.allocUnsafe(bytes);
  let x = seed | 1;
  for (let i = 0; i < bytes; i++) {
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    out[i] = x & 0xff;
  }
  return out;
}

/** What the writable export must hold. */
export class ExportModel {
  readonly value: Uint8Array;
  private readonly state: Uint8Array;

  constructor(initial: Uint8Array) {
    this.value = initial.slice();
    this.state = new Uint8Array(initial.length);
  }

  write(offset: number, data: Uint8Array): void {
    this.value.set(data, offset);
    this.state.fill(KNOWN, offset, offset + data.length);
  }

  zero(offset: number, bytes: number): void {
    this.value.fill(0, offset, offset + bytes);
    this.state.fill(KNOWN, offset, offset + bytes);
  }

  /** TRIM: each byte reads as before or as zero. */
  trimmed(offset: number, bytes: number): void {
    for (let i = offset; i < offset + bytes; i++) if (this.state[i] === KNOWN) this.state[i] = MAYBE_ZERO;
  }

  unknown(offset: number, bytes: number): void {
    this.state.fill(UNKNOWN, offset, offset + bytes);
  }

  /** The first byte of `got` (read at `offset`) that contradicts the model, described; or null. */
  mismatch(offset: number, got: Uint8Array): string | null {
    for (let i = 0; i < got.length; i++) {
      const at = offset + i;
      const s = this.state[at];
      if (s === UNKNOWN || got[i] === this.value[at] || (s === MAYBE_ZERO && got[i] === 0)) continue;
      return `byte ${at}: read ${got[i]}, expected ${this.value[at]}${s === MAYBE_ZERO ? ' or 0' : ''}`;
    }
    return null;
  }
}

/** The server under test with its two exports. */
export interface FuzzServer {
  server: NbdServer;
  graph: BlockGraph;
  socket: string;
  logs: string[];
  model: ExportModel;
  stop(): Promise<void>;
}

export async function startFuzzServer(dir: string): Promise<FuzzServer> {
  const graph = testGraph();
  graph.syncIo = false;
  const rwFile = path.join(dir, 'rw.img');
  const roFile = path.join(dir, 'ro.img');
  const initial = seededBytes(RW_EXPORT_BYTES, 0x5eed);
  initial.fill(0, RW_EXPORT_BYTES / 2, (RW_EXPORT_BYTES * 3) / 4); // a zero area: holes in sparse reads
  fs.writeFileSync(rwFile, initial);
  fs.writeFileSync(roFile, seededBytes(RO_EXPORT_BYTES, 7));
  const logs: string[] = [];
  const server = new NbdServer({ log: (m) => logs.push(m), handshakeMaxSeconds: FUZZ_HANDSHAKE_SECONDS });
  const rw = await graph.openImage(rwFile, { format: 'raw', readOnly: false, options: { discard: 'unmap' } as never });
  server.createExport(graph, rw, { name: '', writable: true });
  const ro = await graph.openImage(roFile, { format: 'raw', readOnly: true });
  server.createExport(graph, ro, { name: RO_EXPORT, writable: false });
  const socket = path.join(dir, 'fuzz.sock');
  await server.listen({ type: 'unix', path: socket });
  const stop = async () => {
    await server.close();
    await graph.closeAll();
  };
  return { server, graph, socket, logs, model: new ExportModel(initial), stop };
}

// ---------------------------------------------------------------- replies

/** One request's reply: its error (0 = success) and, for a successful READ, the bytes it returned. */
export interface Reply {
  error: number;
  message?: string;
  data?: Buffer;
}

/**
 * Reads frames until each cookie in `pending` (cookie → READ offset and
 * length; 0 length for other commands) has its final reply. Checks the
 * reply structure: no unknown or repeated cookie, chunks of a READ inside
 * its range and covering it exactly once. Throws when the server closes
 * first or breaks the protocol.
 */
export async function collectReplies(
  client: RawNbdClient,
  pending: Map<bigint, { offset: number; length: number }>,
  opts: { allowClose?: boolean } = {},
) {
  const out = new Map<bigint, Reply>();
  const parts = new Map<bigint, { data: Buffer; covered: number; error: number; message?: string }>();
  while (out.size < pending.size) {
    let f;
    try {
      f = await client.frame();
    } catch (e) {
      // With allowClose, a close ends the collection: requests not yet answered stay out of the map.
      if (opts.allowClose && (e as Error).message === 'server closed the connection') return out;
      throw e;
    }
    const cookie = f.kind === 'simpleReply' ? f.cookie : f.kind === 'chunk' ? f.header.cookie : null;
    if (cookie === null) throw new Error(`unexpected ${f.kind} frame in transmission`);
    const req = pending.get(cookie);
    if (!req || out.has(cookie)) throw new Error(`reply for a cookie not in flight: ${cookie}`);
    if (f.kind === 'simpleReply') {
      out.set(cookie, { error: f.error, ...(f.data ? { data: f.data } : {}) });
      continue;
    }
    const chunk = f as Extract<typeof f, { kind: 'chunk' }>;
    let acc = parts.get(cookie);
    if (!acc) parts.set(cookie, (acc = { data: Buffer.alloc(req.length), covered: 0, error: 0 }));
    addChunk(acc, req, chunk.header.type, chunk.payload);
    if (!(chunk.header.flags & 1)) continue;
    if (acc.error === 0 && acc.covered !== req.length) {
      throw new Error(`READ ${req.offset}+${req.length}: chunks cover ${acc.covered} bytes`);
    }
    out.set(cookie, acc.error ? { error: acc.error, message: acc.message } : { error: 0, data: acc.data });
  }
  return out;
}

function addChunk(
  acc: { data: Buffer; covered: number; error: number; message?: string },
  req: { offset: number; length: number },
  type: number,
  payload: Buffer,
): void {
  const p = decodeChunkPayload(type, payload);
  if (!p.ok) throw new Error(`bad chunk: ${p.reason}`);
  const v = p.value;
  if (isErrorChunk(type)) {
    const e = v as { error: number; message: string };
    acc.error = e.error;
    acc.message = e.message;
    return;
  }
  let offset: number;
  let data: Buffer | null = null;
  let bytes: number;
  if (v.type === ReplyType.OFFSET_DATA) {
    const d = v as { offset: number; data: Buffer };
    ({ offset, data } = d);
    bytes = d.data.length;
  } else if (v.type === ReplyType.OFFSET_HOLE) {
    ({ offset, length: bytes } = v as { offset: number; length: number });
  } else {
    return;
  }
  const at = offset - req.offset;
  if (at < 0 || at + bytes > req.length || bytes === 0) throw new Error(`chunk ${offset}+${bytes} outside READ ${req.offset}+${req.length}`);
  if (data) data.copy(acc.data, at);
  else acc.data.fill(0, at, at + bytes);
  acc.covered += bytes;
}

// ---------------------------------------------------------------- the well-behaved client

/**
 * A write of fresh bytes and a read of the whole export through `good`,
 * checked against the model; the write is recorded in the model once
 * acknowledged.
 */
export async function checkGoodClient(good: RawNbdClient, model: ExportModel, seed: number): Promise<void> {
  const length = 1 + (seed % (64 * KiB));
  const offset = (seed * 7919) % (RW_EXPORT_BYTES - length);
  const data = seededBytes(length, seed);
  const w = good.request({ type: Cmd.WRITE, offset, length }, data);
  const r = good.request({ type: Cmd.READ, offset: 0, length: RW_EXPORT_BYTES, flags: seed % 2 ? CmdFlag.DF : 0 });
  const replies = await collectReplies(
    good,
    new Map([
      [w, { offset, length: 0 }],
      [r, { offset: 0, length: RW_EXPORT_BYTES }],
    ]),
  );
  expect(replies.get(w)!.error, 'the good client’s write').toBe(0);
  // The READ was sent after the WRITE but may run concurrently: check it against the model before the write only outside it.
  const read = replies.get(r)!;
  expect(read.error, 'the good client’s read').toBe(0);
  model.write(offset, data);
  const before = model.mismatch(0, read.data!.subarray(0, offset)) ?? model.mismatch(offset + length, read.data!.subarray(offset + length));
  expect(before, 'export contents seen by the good client').toBeNull();
  const r2 = good.request({ type: Cmd.READ, offset, length });
  const again = await collectReplies(good, new Map([[r2, { offset, length }]]));
  expect(model.mismatch(offset, again.get(r2)!.data!), 'the good client’s write read back').toBeNull();
}

// ---------------------------------------------------------------- memory and counters

/** Highest values seen by a Watch. */
export interface Peaks {
  rssBytes: number;
  arrayBuffersBytes: number;
  requestsInFlight: number;
  inFlightBytes: number;
  queuedInputBytes: number;
  queuedReplyBytes: number;
}

/** Samples process memory and the server's connection counters every `intervalMs`. */
export class Watch {
  readonly base = process.memoryUsage();
  readonly peaks: Peaks = {
    rssBytes: 0,
    arrayBuffersBytes: 0,
    requestsInFlight: 0,
    inFlightBytes: 0,
    queuedInputBytes: 0,
    queuedReplyBytes: 0,
  };
  private readonly timer: NodeJS.Timeout;

  constructor(
    private readonly server: NbdServer,
    intervalMs = 20,
  ) {
    this.timer = setInterval(() => this.sample(), intervalMs);
  }

  sample(): void {
    const m = process.memoryUsage();
    const p = this.peaks;
    p.rssBytes = Math.max(p.rssBytes, m.rss);
    p.arrayBuffersBytes = Math.max(p.arrayBuffersBytes, m.arrayBuffers);
    for (const s of this.server.connectionStats()) this.fold(s);
  }

  private fold(s: ConnectionStats): void {
    const p = this.peaks;
    p.requestsInFlight = Math.max(p.requestsInFlight, s.requestsInFlight);
    p.inFlightBytes = Math.max(p.inFlightBytes, s.inFlightBytes);
    p.queuedInputBytes = Math.max(p.queuedInputBytes, s.queuedInputBytes);
    p.queuedReplyBytes = Math.max(p.queuedReplyBytes, s.queuedReplyBytes);
  }

  stop(): Peaks {
    this.sample();
    clearInterval(this.timer);
    return this.peaks;
  }
}

/** Resolves once the server has exactly `count` connections (bounded wait). */
export async function connectionsSettle(server: NbdServer, count: number, timeoutMs = 5000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (server.connectionCount !== count) {
    if (Date.now() > deadline) throw new Error(`server still has ${server.connectionCount} connections, expected ${count}`);
    await new Promise((r) => setTimeout(r, 5));
  }
}

// ---------------------------------------------------------------- one fuzz session

/** Growth over the session's start that memory may not exceed (in-flight limits plus the buffer pool, with room for the test's own data). */
export const RSS_GROWTH_LIMIT_BYTES = 512 * MiB;
export const ARRAY_BUFFERS_GROWTH_LIMIT_BYTES = 256 * MiB;
/** Reply bytes a connection may have queued beyond its data in flight (headers, block-status chunks, option replies). */
export const REPLY_OVERHEAD_BYTES = 16 * MiB;

/**
 * A server, its good client (connected for the whole session) and the
 * watch. `afterCase` runs the checks every case ends with: the bad client
 * is gone and nobody else was dropped, the good client still writes and
 * reads correctly, and a new client can still connect and read.
 */
export class FuzzSession {
  private cases = 0;
  private readonly clients: RawNbdClient[] = [];

  private constructor(
    readonly fuzz: FuzzServer,
    readonly good: RawNbdClient,
    readonly watch: Watch,
  ) {}

  static async start(dir: string): Promise<FuzzSession> {
    const fuzz = await startFuzzServer(dir);
    const good = await RawNbdClient.connect(fuzz.socket);
    await good.negotiate({ structured: true });
    return new FuzzSession(fuzz, good, new Watch(fuzz.server));
  }

  get server(): NbdServer {
    return this.fuzz.server;
  }

  get model(): ExportModel {
    return this.fuzz.model;
  }

  async connect(): Promise<RawNbdClient> {
    const c = await RawNbdClient.connect(this.fuzz.socket);
    this.clients.push(c);
    return c;
  }

  async afterCase(): Promise<void> {
    for (const c of this.clients.splice(0)) c.close();
    await connectionsSettle(this.server, 1);
    expect(this.good.isClosed, 'the good client was dropped').toBe(false);
    this.cases++;
    await checkGoodClient(this.good, this.model, this.cases * 2654435761);
    const fresh = await this.connect();
    await fresh.negotiate({ structured: this.cases % 2 === 0 });
    const cookie = fresh.request({ type: Cmd.READ, offset: 0, length: 4096 });
    const replies = await collectReplies(fresh, new Map([[cookie, { offset: 0, length: 4096 }]]));
    expect(this.model.mismatch(0, replies.get(cookie)!.data!), 'a new client’s read').toBeNull();
    fresh.close();
    await connectionsSettle(this.server, 1);
  }

  /** Stops the watch, checks the bounds, closes everything; returns the peaks. */
  async finish(): Promise<Peaks> {
    const peaks = this.watch.stop();
    for (const c of this.clients.splice(0)) c.close();
    this.good.close();
    await this.fuzz.stop();
    const base = this.watch.base;
    expect(peaks.requestsInFlight).toBeLessThanOrEqual(MAX_REQUESTS_IN_FLIGHT);
    expect(peaks.inFlightBytes).toBeLessThan(MAX_IN_FLIGHT_BYTES + MAX_BUFFER_BYTES);
    expect(peaks.queuedInputBytes).toBeLessThanOrEqual(MAX_QUEUED_INPUT_BYTES);
    expect(peaks.queuedReplyBytes).toBeLessThan(MAX_IN_FLIGHT_BYTES + MAX_BUFFER_BYTES + REPLY_OVERHEAD_BYTES);
    expect(peaks.rssBytes - base.rss, 'RSS growth').toBeLessThan(RSS_GROWTH_LIMIT_BYTES);
    expect(peaks.arrayBuffersBytes - base.arrayBuffers, 'arrayBuffers growth').toBeLessThan(ARRAY_BUFFERS_GROWTH_LIMIT_BYTES);
    return peaks;
  }
}

/** Expects the server to close `c` without sending anything more. */
export async function expectClosed(c: RawNbdClient, what: string): Promise<void> {
  const frame = await c.frame().then(
    (f) => f.kind,
    (e: Error) => e.message,
  );
  expect(frame, `${what}: the server should close the connection`).toBe('server closed the connection');
}
