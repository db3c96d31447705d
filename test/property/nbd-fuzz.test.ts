/*
 * Fuzzer for the NBD server's transmission phase (the handshake has its
 * own file, nbd-fuzz-handshake.test.ts). Each case negotiates a client in
 * a random mode (simple, structured or extended headers; with or without
 * base:allocation; on the writable or the read-only export), sends a batch
 * of random requests — unknown commands and flags, offsets and lengths past
 * the end up to 2^64 - 1, payloads past the 32 MiB limit, extended
 * BLOCK_STATUS payloads of bad lengths — one by one or pipelined, and ends
 * the connection in a random way: a plain close, DISC (with bytes after it,
 * or flagged with a payload), a half-close, a bad or wrong-size magic,
 * garbage after valid frames, a WRITE cut off half-way, or a WRITE
 * followed by a close before its reply.
 *
 * Oracle: every request gets the error nbd/README.md documents (EPERM for
 * writes to a read-only export, ENOSPC for writes past the end, EINVAL for
 * the rest, ENOTSUP only for FAST_ZERO) or success, in well-formed replies
 * (the raw client's parser checks every frame); requests whose payload the
 * server cannot read end the connection after the EINVAL; endings that
 * break the framing end it without another frame. Successful READs must
 * match a byte model of the export (helpers/nbd-fuzz.ts); failed
 * modifications must change nothing; a WRITE cut off half-way must not be
 * applied. After every case (FuzzSession.afterCase) the bad client is gone,
 * a second client connected all along still writes and reads correctly
 * (every acknowledged write reads back), and a new client can connect.
 * Over the run, memory growth and the server's per-connection counters
 * stay under named limits.
 *
 * Runs: a smoke run of SMOKE_RUNS cases is part of `npm test`. Longer run:
 * NBD_FUZZ_RUNS=5000 npx vitest run test/property/nbd-fuzz*.test.ts
 * (setting it also lets WRITE payloads grow to the 32 MiB limit).
 * PROPERTY_SEED replays a run, PROPERTY_PATH with it one shrunk
 * counterexample; the seed is printed up front.
 */
import fs from 'node:fs';
import path from 'node:path';
import fc from 'fast-check';
import { describe, expect, it } from 'vitest';
import {
  Cmd,
  CmdFlag,
  EXTENDED_REQUEST_MAGIC,
  MAX_BUFFER_BYTES,
  MAX_REQUESTS_IN_FLIGHT,
  NbdErr,
  REQUEST_MAGIC,
} from '../../nbd/protocol.js';
import { MAX_IN_FLIGHT_BYTES } from '../../nbd/server-connection.js';
import { NbdServer } from '../../nbd/server.js';
import { propertyRuns } from '../helpers/block-model.js';
import { testGraph } from '../helpers/graphs.js';
import {
  FuzzSession,
  MiB,
  RO_EXPORT,
  RO_EXPORT_BYTES,
  RW_EXPORT_BYTES,
  collectReplies,
  expectClosed,
  seededBytes,
  type Reply,
} from '../helpers/nbd-fuzz.js';
import { RawNbdClient } from '../helpers/nbd-raw-client.js';
import { scratchDir } from '../helpers/tmp.js';

const SMOKE_RUNS = 200;
const LONG = process.env.NBD_FUZZ_RUNS !== undefined;
const PROPERTY = propertyRuns('nbd-fuzz', Number(process.env.NBD_FUZZ_RUNS ?? SMOKE_RUNS));
const TIMEOUT_MS = Math.max(60_000, PROPERTY.runs * 200);
/** Largest payload a case sends (the server's limit in a long run). */
const SEND_LIMIT_BYTES = LONG ? MAX_BUFFER_BYTES : MiB;
const MAX_BATCH = 10;
const U64_MAX = (1n << 64n) - 1n;
const RO_INITIAL = seededBytes(RO_EXPORT_BYTES, 7);

const dir = scratchDir('qbt-nbd-fuzz-');

// ---------------------------------------------------------------- cases

type Mode = 'simple' | 'structured' | 'extended';

interface ReqSpec {
  type: number;
  flags: number;
  offset: bigint;
  length: bigint;
  seed: number;
  /** Extended BLOCK_STATUS with PAYLOAD_LEN: the payload (effect length, context ids, stray bytes). */
  bs?: { effect: bigint; ids: number[]; junk: number };
}

type Ending =
  | { t: 'close' }
  | { t: 'disc'; trailing: number; flags: number; length: bigint }
  | { t: 'halfClose' }
  | { t: 'badMagic'; magic: number }
  | { t: 'otherMagic' }
  | { t: 'garbage'; bytes: Uint8Array }
  | { t: 'cutWrite'; offset: number; length: number; sentPercent: number }
  | { t: 'unackedWrite'; offset: number; length: number; seed: number };

interface TxCase {
  mode: Mode;
  contexts: boolean;
  ro: boolean;
  pipelined: boolean;
  reqs: ReqSpec[];
  ending: Ending;
}

const KNOWN_TYPES = [Cmd.READ, Cmd.WRITE, Cmd.FLUSH, Cmd.TRIM, Cmd.CACHE, Cmd.WRITE_ZEROES, Cmd.BLOCK_STATUS];

const typeArb = fc.oneof(
  { weight: 8, arbitrary: fc.constantFrom(...KNOWN_TYPES) },
  { weight: 1, arbitrary: fc.integer({ min: 8, max: 0xffff }) },
);

const offsetArb = fc.oneof(
  { weight: 6, arbitrary: fc.bigInt({ min: 0n, max: BigInt(RW_EXPORT_BYTES) }) },
  { weight: 2, arbitrary: fc.bigInt({ min: BigInt(RW_EXPORT_BYTES - 4096), max: BigInt(RW_EXPORT_BYTES + 4096) }) },
  { weight: 1, arbitrary: fc.bigInt({ min: 0n, max: U64_MAX }) },
  { weight: 1, arbitrary: fc.constantFrom(2n ** 53n - 1n, 2n ** 53n, 2n ** 63n, U64_MAX, 2n ** 32n, 2n ** 32n - 1n) },
);

const lengthArb = fc.oneof(
  { weight: 4, arbitrary: fc.bigInt({ min: 0n, max: 4096n }) },
  { weight: 4, arbitrary: fc.bigInt({ min: 0n, max: 256n * 1024n }) },
  { weight: 1, arbitrary: fc.bigInt({ min: BigInt(RW_EXPORT_BYTES - 4096), max: BigInt(RW_EXPORT_BYTES + 4096) }) },
  { weight: 1, arbitrary: fc.bigInt({ min: BigInt(MAX_BUFFER_BYTES - 1), max: 0xffffffffn }) },
  { weight: 1, arbitrary: fc.bigInt({ min: 0n, max: U64_MAX }) },
);

const flagsArb = fc.oneof(
  { weight: 3, arbitrary: fc.integer({ min: 0, max: 0x3f }) },
  { weight: 3, arbitrary: fc.constant(0) },
  { weight: 1, arbitrary: fc.integer({ min: 0, max: 0xffff }) },
);

const bsPayloadArb = fc.record({
  effect: fc.oneof(fc.bigInt({ min: 0n, max: BigInt(2 * RW_EXPORT_BYTES) }), fc.bigInt({ min: 0n, max: U64_MAX })),
  ids: fc.oneof(fc.constant<number[]>([0]), fc.array(fc.integer({ min: 0, max: 4 }), { maxLength: 3 })),
  junk: fc.oneof({ weight: 3, arbitrary: fc.constant(0) }, { weight: 1, arbitrary: fc.integer({ min: 1, max: 3 }) }),
});

const reqArb: fc.Arbitrary<ReqSpec> = fc
  .record({ type: typeArb, flags: flagsArb, offset: offsetArb, length: lengthArb, seed: fc.integer(), bs: fc.option(bsPayloadArb) })
  .map(({ bs, ...r }) => (bs && r.type === Cmd.BLOCK_STATUS ? { ...r, bs } : r));

const endingArb: fc.Arbitrary<Ending> = fc.oneof(
  fc.constant({ t: 'close' as const }),
  fc.record({ t: fc.constant('disc' as const), trailing: fc.integer({ min: 0, max: 200 }), flags: flagsArb, length: lengthArb }),
  fc.constant({ t: 'halfClose' as const }),
  fc.record({ t: fc.constant('badMagic' as const), magic: fc.integer({ min: 0, max: 0xffffffff }) }),
  fc.constant({ t: 'otherMagic' as const }),
  fc.record({ t: fc.constant('garbage' as const), bytes: fc.uint8Array({ minLength: 1, maxLength: 2000 }) }),
  fc.record({
    t: fc.constant('cutWrite' as const),
    offset: fc.integer({ min: 0, max: RW_EXPORT_BYTES - 1 }),
    length: fc.integer({ min: 2, max: 256 * 1024 }),
    sentPercent: fc.integer({ min: 0, max: 99 }),
  }),
  fc.record({
    t: fc.constant('unackedWrite' as const),
    offset: fc.integer({ min: 0, max: RW_EXPORT_BYTES - 1 }),
    length: fc.integer({ min: 1, max: 64 * 1024 }),
    seed: fc.integer(),
  }),
);

const caseArb: fc.Arbitrary<TxCase> = fc.record({
  mode: fc.constantFrom<Mode>('simple', 'structured', 'extended'),
  contexts: fc.boolean(),
  ro: fc.boolean(),
  pipelined: fc.boolean(),
  reqs: fc.array(reqArb, { maxLength: MAX_BATCH }),
  ending: endingArb,
});

// ---------------------------------------------------------------- wire (independent of the server's codec)

const isExtended = (c: TxCase) => c.mode === 'extended';
const exportBytes = (c: TxCase) => (c.ro ? RO_EXPORT_BYTES : RW_EXPORT_BYTES);

function header(extended: boolean, flags: number, type: number, cookie: bigint, offset: bigint, length: bigint, magic?: number): Buffer {
  const buf = Buffer.alloc(extended ? 32 : 28);
  buf.writeUInt32BE(magic ?? (extended ? EXTENDED_REQUEST_MAGIC : REQUEST_MAGIC), 0);
  buf.writeUInt16BE(flags, 4);
  buf.writeUInt16BE(type, 6);
  buf.writeBigUInt64BE(cookie, 8);
  buf.writeBigUInt64BE(offset, 16);
  if (extended) buf.writeBigUInt64BE(length, 24);
  else buf.writeUInt32BE(Number(length & 0xffffffffn), 24);
  return buf;
}

/** The request as sent: compact lengths are 32 bits; a BLOCK_STATUS payload fixes the length. */
function normalise(c: TxCase, r: ReqSpec): ReqSpec {
  const ext = isExtended(c);
  let { flags, length } = r;
  if (!ext) length &= 0xffffffffn;
  if (r.bs && ext) {
    flags |= CmdFlag.PAYLOAD_LEN;
    length = BigInt(8 + 4 * r.bs.ids.length + r.bs.junk);
  }
  const payload = payloadBytes(ext, { ...r, flags, length });
  // Payloads the server reads (≤ 32 MiB) are sent in full: keep them within what a case sends.
  if (payload > BigInt(SEND_LIMIT_BYTES) && payload <= BigInt(MAX_BUFFER_BYTES)) length %= BigInt(SEND_LIMIT_BYTES + 1);
  return { ...r, flags, length, bs: ext ? r.bs : undefined };
}

/** Bytes that follow the header on the wire, as the NBD spec frames them. */
function payloadBytes(extended: boolean, r: ReqSpec): bigint {
  if (r.type === Cmd.DISC) return 0n;
  if (r.type === Cmd.WRITE) return r.length;
  return extended && r.flags & CmdFlag.PAYLOAD_LEN ? r.length : 0n;
}

function payloadOf(extended: boolean, r: ReqSpec): Buffer | null {
  const bytes = payloadBytes(extended, r);
  if (bytes === 0n || bytes > BigInt(MAX_BUFFER_BYTES)) return null;
  if (!r.bs) return seededBytes(Number(bytes), r.seed);
  const buf = Buffer.alloc(Number(bytes));
  buf.writeBigUInt64BE(r.bs.effect, 0);
  r.bs.ids.forEach((id, i) => buf.writeUInt32BE(id, 8 + 4 * i));
  return buf;
}

// ---------------------------------------------------------------- oracle

interface Expected {
  /** Acceptable errors (0 = success). */
  errors: number[];
  /** The server ends the connection after answering (it could not read the payload). */
  closeAfter: boolean;
}

const isWriteCmd = (type: number) => type === Cmd.WRITE || type === Cmd.TRIM || type === Cmd.WRITE_ZEROES;

/** The flags QEMU accepts for a command (FUA on all of them). */
function validFlags(c: TxCase, r: ReqSpec, withPayload: boolean): number {
  switch (r.type) {
    case Cmd.READ:
      return CmdFlag.FUA | (c.mode === 'simple' ? 0 : CmdFlag.DF);
    case Cmd.WRITE:
      return CmdFlag.FUA | (isExtended(c) ? CmdFlag.PAYLOAD_LEN : 0);
    case Cmd.WRITE_ZEROES:
      return CmdFlag.FUA | CmdFlag.NO_HOLE | CmdFlag.FAST_ZERO;
    case Cmd.BLOCK_STATUS:
      return CmdFlag.FUA | CmdFlag.REQ_ONE | (withPayload ? CmdFlag.PAYLOAD_LEN : 0);
    default:
      return CmdFlag.FUA;
  }
}

/** The length a request acts on: an extended BLOCK_STATUS payload's effect length; 0 for other payload carriers; null for a bad payload. */
function effectLength(c: TxCase, r: ReqSpec, withPayload: boolean): bigint | null {
  if (!withPayload) return r.length;
  if (r.type !== Cmd.BLOCK_STATUS) return 0n;
  const valid = r.bs && r.bs.junk === 0 && c.contexts && r.bs.ids.length === 1 && r.bs.ids[0] === 0;
  return valid ? r.bs!.effect : null;
}

/** What nbd/README.md says the server answers, in its check order. */
function expected(c: TxCase, r: ReqSpec): Expected {
  const fail = (code: number, closeAfter = false): Expected => ({ errors: [code], closeAfter });
  const ext = isExtended(c);
  if (payloadBytes(ext, r) > BigInt(MAX_BUFFER_BYTES)) return fail(NbdErr.EINVAL, true);
  const withPayload = ext && (r.flags & CmdFlag.PAYLOAD_LEN) !== 0 && r.type !== Cmd.WRITE;
  const bounded = r.type === Cmd.READ || r.type === Cmd.WRITE || r.type === Cmd.CACHE || withPayload;
  if (bounded && r.length > BigInt(MAX_BUFFER_BYTES)) return fail(NbdErr.EINVAL);
  const effect = effectLength(c, r, withPayload);
  if (isWriteCmd(r.type) && c.ro) return fail(NbdErr.EPERM);
  const size = BigInt(exportBytes(c));
  if (r.offset > size || (effect ?? 0n) > size - r.offset) {
    return fail(r.type === Cmd.WRITE || r.type === Cmd.WRITE_ZEROES ? NbdErr.ENOSPC : NbdErr.EINVAL);
  }
  if (r.flags & ~validFlags(c, r, withPayload) || !KNOWN_TYPES.includes(r.type as never)) return fail(NbdErr.EINVAL);
  if (r.type === Cmd.BLOCK_STATUS && (effect === null || effect === 0n || !c.contexts || c.mode === 'simple')) return fail(NbdErr.EINVAL);
  if (r.type === Cmd.WRITE_ZEROES && r.flags & CmdFlag.FAST_ZERO) return { errors: [0, NbdErr.ENOTSUP], closeAfter: false };
  return { errors: [0], closeAfter: false };
}

// ---------------------------------------------------------------- running a case

interface Sent {
  spec: ReqSpec;
  expect: Expected;
  payload: Buffer | null;
}

/** Applies a successful request to the model; returns the range it changed, if any. */
function applyEffect(s: FuzzSession, c: TxCase, sent: Sent, reply: Reply): [number, number] | null {
  const { spec } = sent;
  if (reply.error !== 0 || c.ro) return null;
  const offset = Number(spec.offset);
  const length = Number(spec.length);
  if (spec.type === Cmd.WRITE && length > 0) s.model.write(offset, sent.payload!);
  else if (spec.type === Cmd.WRITE_ZEROES && length > 0) s.model.zero(offset, length);
  else if (spec.type === Cmd.TRIM && length > 0) s.model.trimmed(offset, length);
  else return null;
  return [offset, offset + length];
}

function checkRead(s: FuzzSession, c: TxCase, sent: Sent, reply: Reply): void {
  if (sent.spec.type !== Cmd.READ || reply.error !== 0) return;
  const offset = Number(sent.spec.offset);
  const data = reply.data ?? Buffer.alloc(0);
  expect(data.length, 'READ length').toBe(Number(sent.spec.length));
  if (c.ro) expect(data.equals(RO_INITIAL.subarray(offset, offset + data.length)), 'read-only export contents').toBe(true);
  else expect(s.model.mismatch(offset, data), `READ ${offset}+${data.length}`).toBeNull();
}

function checkReply(sent: Sent, reply: Reply | undefined): void {
  const what = `${JSON.stringify(sent.spec, (_k, v) => (typeof v === 'bigint' ? v.toString() : v))}`;
  expect(reply, `no reply to ${what}`).toBeDefined();
  expect(sent.expect.errors, `error ${reply!.error} (${reply!.message ?? ''}) for ${what}`).toContain(reply!.error);
}

const overlaps = (a: [number, number], b: [number, number]) => a[0] < b[1] && b[0] < a[1];

/**
 * Pipelined: requests run concurrently, so bytes two successful
 * modifications both touched are unknown afterwards, and READs that overlap
 * a modification of the batch are not checked.
 */
function settleBatch(s: FuzzSession, c: TxCase, sent: Sent[], replies: Map<bigint, Reply>, cookies: bigint[]): void {
  const changed: [number, number][] = [];
  sent.forEach((x, i) => {
    const reply = replies.get(cookies[i]!);
    if (!reply) {
      // Dropped with the connection: an unacknowledged modification may or may not have landed.
      if (isWriteCmd(x.spec.type) && x.expect.errors.includes(0) && !c.ro) s.model.unknown(Number(x.spec.offset), Number(x.spec.length));
      return;
    }
    checkReply(x, reply);
    const range = applyEffect(s, c, x, reply);
    if (range) changed.push(range);
  });
  for (let i = 0; i < changed.length; i++) {
    for (let j = i + 1; j < changed.length; j++) {
      if (!overlaps(changed[i]!, changed[j]!)) continue;
      s.model.unknown(changed[i]![0], changed[i]![1] - changed[i]![0]);
      s.model.unknown(changed[j]![0], changed[j]![1] - changed[j]![0]);
    }
  }
  sent.forEach((x, i) => {
    const reply = replies.get(cookies[i]!);
    if (!reply || x.spec.type !== Cmd.READ) return;
    const range: [number, number] = [Number(x.spec.offset), Number(x.spec.offset + x.spec.length)];
    if (!changed.some((ch) => overlaps(ch, range))) checkRead(s, c, x, reply);
  });
}

function sendRequest(client: RawNbdClient, c: TxCase, sent: Sent, cookie: bigint): void {
  const { spec } = sent;
  const h = header(isExtended(c), spec.flags, spec.type, cookie, spec.offset, spec.length);
  // Simple replies are not self-describing: the client must know how much data a READ's reply carries.
  if (spec.type === Cmd.READ) client.readLengths.set(cookie, Number(spec.length));
  client.send(sent.payload ? Buffer.concat([h, sent.payload]) : h);
}

const readRange = (x: Sent) => ({ offset: Number(x.spec.offset), length: x.spec.type === Cmd.READ && x.expect.errors.includes(0) ? Number(x.spec.length) : 0 });

/**
 * Sends the requests (stopping after one whose payload the server cannot
 * read) and checks their replies; returns whether the server closed, and
 * what the ending already sent expects when it went out behind the batch.
 */
async function runBatch(s: FuzzSession, client: RawNbdClient, c: TxCase, prepared: Sent[]) {
  const cookies = prepared.map((_, i) => BigInt(i + 1));
  const cut = prepared.findIndex((x) => x.expect.closeAfter);
  const batch = cut >= 0 ? prepared.slice(0, cut + 1) : prepared;
  let closing: string | null = null;
  if (!c.pipelined) {
    for (const [i, x] of batch.entries()) {
      sendRequest(client, c, x, cookies[i]!);
      const replies = await collectReplies(client, new Map([[cookies[i]!, readRange(x)]]));
      const reply = replies.get(cookies[i]!)!;
      checkReply(x, reply);
      applyEffect(s, c, x, reply);
      checkRead(s, c, x, reply);
    }
  } else {
    batch.forEach((x, i) => sendRequest(client, c, x, cookies[i]!));
    if (cut < 0 && sendsEarly(c)) closing = sendEnding(s, client, c);
    const pending = new Map(batch.map((x, i) => [cookies[i]!, readRange(x)] as const));
    // The server closes after an oversize request: replies to the others may be lost with it.
    const replies = await collectReplies(client, pending, { allowClose: cut >= 0 });
    if (cut >= 0) expect(replies.has(cookies[cut]!), 'the oversize request is answered before the close').toBe(true);
    settleBatch(s, c, batch, replies, cookies);
  }
  if (cut >= 0) await expectClosed(client, 'after a payload the server cannot read');
  return { closed: cut >= 0, closing };
}

async function negotiate(s: FuzzSession, c: TxCase): Promise<RawNbdClient> {
  const client = await s.connect();
  await client.negotiate({
    exportName: c.ro ? RO_EXPORT : '',
    structured: c.mode === 'structured',
    extended: isExtended(c),
    ...(c.contexts && c.mode !== 'simple' ? { contexts: ['base:allocation'] } : {}),
  });
  return client;
}

/** Endings sent right behind a pipelined batch: the server must answer the batch before it closes. */
const sendsEarly = (c: TxCase) => c.pipelined && (c.ending.t === 'disc' || c.ending.t === 'halfClose');

/**
 * Sends the case's ending; returns what should happen next: the server
 * closes the connection (a description for the message), or null when the
 * client closed it itself.
 */
function sendEnding(s: FuzzSession, client: RawNbdClient, c: TxCase): string | null {
  const e = c.ending;
  const ext = isExtended(c);
  const expectedMagic = ext ? EXTENDED_REQUEST_MAGIC : REQUEST_MAGIC;
  switch (e.t) {
    case 'close':
      client.close();
      return null;
    case 'disc':
      client.send(header(ext, e.flags, Cmd.DISC, 99n, 0n, ext ? e.length : e.length & 0xffffffffn), seededBytes(e.trailing, 3));
      return 'DISC';
    case 'halfClose':
      client.socket.end();
      return 'half-close';
    case 'badMagic':
      client.send(header(ext, 0, Cmd.READ, 98n, 0n, 512n, e.magic === expectedMagic ? e.magic ^ 1 : e.magic));
      return 'bad magic';
    case 'otherMagic':
      // A header of the other size with the other magic: the server must not take it for its own.
      client.send(header(!ext, 0, Cmd.READ, 97n, 0n, 512n), Buffer.alloc(8));
      return 'magic of the other header size';
    case 'garbage': {
      const bytes = Buffer.from(e.bytes);
      if (bytes.length >= 4 && bytes.readUInt32BE(0) === expectedMagic) bytes[0]! ^= 1;
      client.send(bytes);
      if (bytes.length >= (ext ? 32 : 28)) return 'garbage';
      client.close();
      return null;
    }
    case 'cutWrite': {
      const length = Math.min(e.length, RW_EXPORT_BYTES - e.offset);
      const sent = Math.floor((length * e.sentPercent) / 100);
      client.send(header(ext, 0, Cmd.WRITE, 96n, BigInt(e.offset), BigInt(length)), seededBytes(sent, 11));
      // Nothing of this write may land: the model stays as it is.
      client.close();
      return null;
    }
    case 'unackedWrite': {
      const length = Math.min(e.length, RW_EXPORT_BYTES - e.offset);
      client.send(header(ext, 0, Cmd.WRITE, 95n, BigInt(e.offset), BigInt(length)), seededBytes(length, e.seed));
      client.close();
      if (!c.ro) s.model.unknown(e.offset, length);
      return null;
    }
  }
}

async function runCase(s: FuzzSession, c: TxCase): Promise<void> {
  const client = await negotiate(s, c);
  const prepared = c.reqs.map((r) => {
    const spec = normalise(c, r);
    return { spec, expect: expected(c, spec), payload: payloadOf(isExtended(c), spec) };
  });
  const { closed, closing } = await runBatch(s, client, c, prepared);
  const closes = closed ? null : (closing ?? sendEnding(s, client, c));
  if (closes) await expectClosed(client, closes);
  await s.afterCase();
}

// ---------------------------------------------------------------- tests

describe('NBD server under malformed and hostile requests', () => {
  it(
    'answers every request as documented, drops only the bad client, loses no acknowledged write, stays bounded',
    async () => {
      const session = await FuzzSession.start(dir);
      try {
        await fc.assert(
          fc.asyncProperty(caseArb, (c) => runCase(session, c)),
          PROPERTY.parameters,
        );
      } finally {
        const peaks = await session.finish();
        console.log(`nbd-fuzz: peaks ${JSON.stringify(peaks)}`);
      }
    },
    TIMEOUT_MS,
  );

  it('a client that never reads its replies holds at most the in-flight limit', async () => {
    const graph = testGraph();
    graph.syncIo = false;
    const file = path.join(dir, 'big.img');
    fs.writeFileSync(file, '');
    fs.truncateSync(file, 256 * MiB);
    const node = await graph.openImage(file, { format: 'raw', readOnly: true });
    const server = new NbdServer();
    server.createExport(graph, node, { name: '' });
    const socket = path.join(dir, 'big.sock');
    await server.listen({ type: 'unix', path: socket });
    const client = await RawNbdClient.connect(socket);
    try {
      await client.negotiate({ structured: true });
      client.socket.pause();
      const reads = 6;
      for (let i = 0; i < reads; i++) client.request({ type: Cmd.READ, offset: i * MAX_BUFFER_BYTES, length: MAX_BUFFER_BYTES, flags: CmdFlag.DF });
      for (let i = 0; i < 40; i++) client.request({ type: Cmd.FLUSH });
      await new Promise((r) => setTimeout(r, 500));
      const [stats] = server.connectionStats();
      expect(stats!.requestsInFlight).toBeLessThanOrEqual(MAX_REQUESTS_IN_FLIGHT);
      expect(stats!.inFlightBytes).toBeLessThan(MAX_IN_FLIGHT_BYTES + MAX_BUFFER_BYTES);
      expect(stats!.queuedReplyBytes).toBeLessThan(MAX_IN_FLIGHT_BYTES + MAX_BUFFER_BYTES + MiB);
      client.socket.resume();
      let answered = 0;
      while (answered < reads + 40) {
        const f = await client.frame();
        if (f.kind === 'simpleReply' || (f.kind === 'chunk' && f.header.flags & 1)) answered++;
      }
    } finally {
      client.close();
      await server.close();
    }
  });
});
