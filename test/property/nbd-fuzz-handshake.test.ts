/*
 * Fuzzer for the NBD server's handshake (the transmission phase has its
 * own file, nbd-fuzz.test.ts, whose note describes the shared harness and
 * the run settings). Each case greets the server with random client flags,
 * sends a few random options — unknown ones, ones that take no data given
 * some, INFO and LIST/SET_META_CONTEXT with unknown, over-long (> 4096
 * bytes), inconsistent or NUL-holding names, options longer than the 1 MiB
 * the server buffers — and ends in a random way: GO or EXPORT_NAME (then a
 * READ must work), ABORT, a bad option magic, an option length past the
 * 32 MiB limit up to 4 GiB, a request before negotiation, garbage, or an
 * option cut off by a close.
 *
 * Oracle: each option gets the reply type nbd/server-handshake.ts
 * documents (QEMU's: ERR_UNSUP, ERR_INVALID, ERR_UNKNOWN, ERR_TOO_BIG,
 * ERR_POLICY, ERR_EXT_HEADER_REQD, ACK) and the handshake goes on; the
 * fatal endings close the connection without another frame. After every
 * case the checks of FuzzSession.afterCase run (other clients unharmed,
 * acknowledged writes intact), and memory stays bounded over the run.
 *
 * Runs: SMOKE_RUNS cases in `npm test`; NBD_FUZZ_RUNS=N for a longer run
 * (which also sends options up to the 32 MiB limit); PROPERTY_SEED and
 * PROPERTY_PATH replay.
 */
import fc from 'fast-check';
import { describe, expect, it } from 'vitest';
import {
  ClientFlag,
  Cmd,
  IHAVEOPT,
  Info,
  MAX_BUFFER_BYTES,
  MAX_OPTION_BUFFER_BYTES,
  MAX_STRING_BYTES,
  Opt,
  REQUEST_MAGIC,
  Rep,
} from '../../nbd/protocol.js';
import { encodeClientFlags, encodeOption } from '../../nbd/wire-handshake.js';
import { propertyRuns } from '../helpers/block-model.js';
import { FuzzSession, MiB, RO_EXPORT, collectReplies, expectClosed, seededBytes } from '../helpers/nbd-fuzz.js';
import type { RawNbdClient } from '../helpers/nbd-raw-client.js';
import { scratchDir } from '../helpers/tmp.js';

const SMOKE_RUNS = 150;
const LONG = process.env.NBD_FUZZ_RUNS !== undefined;
const PROPERTY = propertyRuns('nbd-fuzz-handshake', Number(process.env.NBD_FUZZ_RUNS ?? SMOKE_RUNS));
const TIMEOUT_MS = Math.max(60_000, PROPERTY.runs * 200);
/** Largest option a case sends in full. */
const BIG_OPTION_BYTES = LONG ? MAX_BUFFER_BYTES : 3 * MiB;
const MAX_STEPS = 6;

const dir = scratchDir('qbt-nbd-fuzz-hs-');

// ---------------------------------------------------------------- cases

/** How an export name is written into INFO/GO/META data. */
type NameSpec =
  | { kind: 'rw' }
  | { kind: 'ro' }
  | { kind: 'unknown'; name: string }
  | { kind: 'long'; bytes: number }
  | { kind: 'lie'; extra: number }
  | { kind: 'nul' };

type Step =
  | { t: 'unknown'; option: number; bytes: number }
  | { t: 'noData'; option: number; bytes: number }
  | { t: 'info'; name: NameSpec; infos: number[]; countLie: boolean }
  | { t: 'meta'; option: number; name: NameSpec; queries: string[]; longQuery: boolean }
  | { t: 'big'; option: number; bytes: number };

type Ending =
  | { t: 'go'; ro: boolean }
  | { t: 'exportName'; name: NameSpec }
  | { t: 'abort' }
  | { t: 'badMagic'; magic: bigint }
  | { t: 'hugeLength'; option: number; length: number }
  | { t: 'requestEarly'; beforeFlags: boolean }
  | { t: 'garbage'; bytes: Uint8Array }
  | { t: 'truncated'; option: number; declared: number; sent: number };

interface HsCase {
  flags: number;
  steps: Step[];
  ending: Ending;
}

const KNOWN_OPTIONS = Object.values(Opt).filter((o) => o !== Opt.PEEK_EXPORT) as number[];
const unknownOptionArb = fc
  .oneof(fc.integer({ min: 0, max: 20 }), fc.integer({ min: 0, max: 0xffffffff }))
  .filter((o) => !KNOWN_OPTIONS.includes(o));
const anyOptionArb = fc.oneof(fc.constantFrom(...KNOWN_OPTIONS), unknownOptionArb);

const nameArb: fc.Arbitrary<NameSpec> = fc.oneof(
  { weight: 4, arbitrary: fc.constant({ kind: 'rw' as const }) },
  { weight: 2, arbitrary: fc.constant({ kind: 'ro' as const }) },
  { weight: 2, arbitrary: fc.stringMatching(/^[a-z0-9]{1,90}$/).map((n) => ({ kind: 'unknown' as const, name: `x-${n}` })) },
  { weight: 2, arbitrary: fc.integer({ min: MAX_STRING_BYTES + 1, max: 70_000 }).map((bytes) => ({ kind: 'long' as const, bytes })) },
  { weight: 1, arbitrary: fc.integer({ min: 1, max: 0xffffff }).map((extra) => ({ kind: 'lie' as const, extra })) },
  { weight: 1, arbitrary: fc.constant({ kind: 'nul' as const }) },
);

const stepArb: fc.Arbitrary<Step> = fc.oneof(
  fc.record({ t: fc.constant('unknown' as const), option: unknownOptionArb, bytes: fc.integer({ min: 0, max: 8192 }) }),
  fc.record({
    t: fc.constant('noData' as const),
    option: fc.constantFrom(Opt.LIST, Opt.STARTTLS, Opt.STRUCTURED_REPLY, Opt.EXTENDED_HEADERS),
    bytes: fc.oneof(fc.constant(0), fc.integer({ min: 0, max: 300 })),
  }),
  fc.record({
    t: fc.constant('info' as const),
    name: nameArb,
    infos: fc.array(fc.integer({ min: 0, max: 0xffff }), { maxLength: 8 }),
    countLie: fc.boolean(),
  }),
  fc.record({
    t: fc.constant('meta' as const),
    option: fc.constantFrom(Opt.LIST_META_CONTEXT, Opt.SET_META_CONTEXT),
    name: nameArb,
    queries: fc.array(fc.constantFrom('base:allocation', 'base:', 'qemu:', 'qemu:allocation-depth', 'x:y', ''), { maxLength: 4 }),
    longQuery: fc.boolean(),
  }),
  fc.record({
    t: fc.constant('big' as const),
    option: fc.oneof(fc.constantFrom(Opt.GO, Opt.INFO, Opt.LIST_META_CONTEXT, Opt.SET_META_CONTEXT, Opt.LIST), unknownOptionArb),
    bytes: fc.integer({ min: MAX_OPTION_BUFFER_BYTES + 1, max: BIG_OPTION_BYTES }),
  }),
);

const endingArb: fc.Arbitrary<Ending> = fc.oneof(
  { weight: 4, arbitrary: fc.record({ t: fc.constant('go' as const), ro: fc.boolean() }) },
  { weight: 2, arbitrary: fc.record({ t: fc.constant('exportName' as const), name: nameArb }) },
  { weight: 1, arbitrary: fc.constant({ t: 'abort' as const }) },
  { weight: 1, arbitrary: fc.record({ t: fc.constant('badMagic' as const), magic: fc.bigInt({ min: 0n, max: (1n << 64n) - 1n }) }) },
  {
    weight: 2,
    arbitrary: fc.record({
      t: fc.constant('hugeLength' as const),
      option: anyOptionArb,
      length: fc.oneof(fc.constant(0xffffffff), fc.integer({ min: MAX_BUFFER_BYTES + 1, max: 0xffffffff })),
    }),
  },
  { weight: 1, arbitrary: fc.record({ t: fc.constant('requestEarly' as const), beforeFlags: fc.boolean() }) },
  { weight: 1, arbitrary: fc.record({ t: fc.constant('garbage' as const), bytes: fc.uint8Array({ minLength: 16, maxLength: 1000 }) }) },
  {
    weight: 1,
    arbitrary: fc
      .record({ t: fc.constant('truncated' as const), option: anyOptionArb, declared: fc.integer({ min: 1, max: 3 * MiB }), sent: fc.nat() })
      .map((e) => ({ ...e, sent: e.sent % e.declared })),
  },
);

const flagsArb = fc.oneof(
  { weight: 8, arbitrary: fc.constant(ClientFlag.FIXED_NEWSTYLE | ClientFlag.NO_ZEROES) },
  { weight: 1, arbitrary: fc.constant(ClientFlag.FIXED_NEWSTYLE) },
  { weight: 1, arbitrary: fc.constant(0) },
  { weight: 1, arbitrary: fc.integer({ min: 4, max: 0xffffffff }) },
);

const caseArb: fc.Arbitrary<HsCase> = fc.record({ flags: flagsArb, steps: fc.array(stepArb, { maxLength: MAX_STEPS }), ending: endingArb });

// ---------------------------------------------------------------- option data

function nameBytes(name: NameSpec): Buffer {
  const text = (s: string) => {
    const b = Buffer.from(s);
    const len = Buffer.alloc(4);
    len.writeUInt32BE(b.length, 0);
    return Buffer.concat([len, b]);
  };
  switch (name.kind) {
    case 'rw':
      return text('');
    case 'ro':
      return text(RO_EXPORT);
    case 'unknown':
      return text(name.name);
    case 'long':
      return text('n'.repeat(name.bytes));
    case 'nul':
      return text('r\0o');
    case 'lie': {
      // The length claims more bytes than the option holds.
      const b = text(RO_EXPORT);
      b.writeUInt32BE(Math.min(MAX_STRING_BYTES, RO_EXPORT.length + name.extra), 0);
      return b;
    }
  }
}

function infoData(step: Extract<Step, { t: 'info' }>): Buffer {
  const tail = Buffer.alloc(2 + 2 * step.infos.length);
  tail.writeUInt16BE(step.infos.length + (step.countLie ? 1 : 0), 0);
  step.infos.forEach((info, i) => tail.writeUInt16BE(info, 2 + 2 * i));
  return Buffer.concat([nameBytes(step.name), tail]);
}

function metaData(step: Extract<Step, { t: 'meta' }>): Buffer {
  const queries = step.longQuery ? [...step.queries, 'q'.repeat(MAX_STRING_BYTES + 1)] : step.queries;
  const count = Buffer.alloc(4);
  count.writeUInt32BE(queries.length, 0);
  return Buffer.concat([nameBytes(step.name), count, ...queries.map((q) => nameBytes({ kind: 'unknown', name: q }))]);
}

// ---------------------------------------------------------------- oracle

interface HsState {
  fixed: boolean;
  noZeroes: boolean;
  structured: boolean;
  extended: boolean;
}

/** A name that decodes and names an export (rw or ro); 'missing' or 'invalid' otherwise. */
function nameVerdict(name: NameSpec): 'ok' | 'missing' | 'invalid' {
  if (name.kind === 'rw' || name.kind === 'ro') return 'ok';
  return name.kind === 'unknown' ? 'missing' : 'invalid';
}

/** The final reply type an option gets (ERR_* or ACK); the state is updated on success. */
function expectStep(s: HsState, step: Step): number {
  switch (step.t) {
    case 'unknown':
      return Rep.ERR_UNSUP;
    case 'noData':
      return expectNoData(s, step.option, step.bytes);
    case 'info': {
      const verdict = step.countLie ? 'invalid' : nameVerdict(step.name);
      return verdict === 'ok' ? Rep.ACK : verdict === 'missing' ? Rep.ERR_UNKNOWN : Rep.ERR_INVALID;
    }
    case 'meta': {
      if (step.option === Opt.SET_META_CONTEXT && !s.structured) return Rep.ERR_INVALID;
      const verdict = nameVerdict(step.name);
      return verdict === 'ok' ? Rep.ACK : verdict === 'missing' ? Rep.ERR_UNKNOWN : Rep.ERR_INVALID;
    }
    case 'big':
      if (step.option === Opt.LIST) return Rep.ERR_INVALID;
      if (step.option === Opt.SET_META_CONTEXT && !s.structured) return Rep.ERR_INVALID;
      return KNOWN_OPTIONS.includes(step.option) ? Rep.ERR_TOO_BIG : Rep.ERR_UNSUP;
  }
}

function expectNoData(s: HsState, option: number, bytes: number): number {
  if (bytes > 0) return Rep.ERR_INVALID;
  switch (option) {
    case Opt.LIST:
      return Rep.ACK;
    case Opt.STARTTLS:
      return Rep.ERR_POLICY;
    case Opt.STRUCTURED_REPLY:
      if (s.extended) return Rep.ERR_EXT_HEADER_REQD;
      if (s.structured) return Rep.ERR_INVALID;
      s.structured = true;
      return Rep.ACK;
    default:
      if (s.extended) return Rep.ERR_INVALID;
      s.extended = s.structured = true;
      return Rep.ACK;
  }
}

function stepData(step: Step): Buffer {
  switch (step.t) {
    case 'unknown':
    case 'noData':
    case 'big':
      return seededBytes(step.bytes, step.bytes + 1);
    case 'info':
      return infoData(step);
    case 'meta':
      return metaData(step);
  }
}

const stepOption = (step: Step) => (step.t === 'info' ? Opt.INFO : step.t === 'meta' || step.t === 'unknown' || step.t === 'noData' || step.t === 'big' ? step.option : 0);

// ---------------------------------------------------------------- running a case

/** A READ on the negotiated connection must succeed. */
async function expectServes(c: RawNbdClient, extended: boolean): Promise<void> {
  c.extended = extended;
  const cookie = c.request({ type: Cmd.READ, offset: 0, length: 512 });
  const replies = await collectReplies(c, new Map([[cookie, { offset: 0, length: 512 }]]));
  expect(replies.get(cookie)!.error, 'READ after the handshake').toBe(0);
}

async function runEnding(c: RawNbdClient, s: HsState, e: Ending): Promise<void> {
  switch (e.t) {
    case 'go': {
      const replies = await c.option(Opt.GO, infoData({ t: 'info', name: { kind: e.ro ? 'ro' : 'rw' }, infos: [Info.BLOCK_SIZE], countLie: false }));
      expect(replies.at(-1)!.type, 'GO').toBe(Rep.ACK);
      c.parser.enterTransmission(s.extended);
      return expectServes(c, s.extended);
    }
    case 'exportName':
      return exportName(c, s, e.name);
    case 'abort':
      c.send(encodeOption(Opt.ABORT));
      if (s.fixed) expect((await c.optionReply()).type, 'ABORT').toBe(Rep.ACK);
      return expectClosed(c, 'ABORT');
    case 'badMagic': {
      const h = encodeOption(Opt.LIST);
      h.writeBigUInt64BE(e.magic === IHAVEOPT ? e.magic ^ 1n : e.magic, 0);
      c.send(h);
      return expectClosed(c, 'bad option magic');
    }
    case 'hugeLength': {
      const h = encodeOption(e.option);
      h.writeUInt32BE(e.length, 12);
      c.send(h, seededBytes(64, 5));
      return expectClosed(c, `option length ${e.length}`);
    }
    case 'requestEarly':
      return requestEarly(c, e.beforeFlags);
    case 'garbage': {
      const bytes = Buffer.from(e.bytes);
      if (bytes.readBigUInt64BE(0) === IHAVEOPT) bytes[0]! ^= 1;
      c.send(bytes);
      return expectClosed(c, 'garbage');
    }
    case 'truncated': {
      const h = encodeOption(e.option);
      h.writeUInt32BE(e.declared, 12);
      c.send(h, seededBytes(e.sent, 9));
      return c.close();
    }
  }
}

async function exportName(c: RawNbdClient, s: HsState, name: NameSpec): Promise<void> {
  // EXPORT_NAME carries the bare name: it must be one of the exports' names exactly.
  const data = nameBytes(name).subarray(4);
  const text = data.toString();
  const ok = (text === '' || text === RO_EXPORT) && !s.extended;
  if (!ok) {
    c.send(encodeOption(Opt.EXPORT_NAME, data));
    return expectClosed(c, 'EXPORT_NAME');
  }
  c.parser.expectExportNameReply(s.noZeroes);
  c.send(encodeOption(Opt.EXPORT_NAME, data));
  expect((await c.frame()).kind).toBe('exportNameReply');
  return expectServes(c, false);
}

async function requestEarly(c: RawNbdClient, beforeFlags: boolean): Promise<void> {
  const req = Buffer.alloc(28);
  req.writeUInt32BE(REQUEST_MAGIC, 0);
  req.writeUInt16BE(Cmd.READ, 6);
  req.writeUInt32BE(512, 24);
  // Before the client flags, the request's magic is read as flags (unknown bits); after them, as an option's magic.
  c.send(req);
  return expectClosed(c, beforeFlags ? 'a request instead of client flags' : 'a request before negotiation');
}

async function runCase(session: FuzzSession, hs: HsCase): Promise<void> {
  const c = await session.connect();
  const greeting = await c.frame();
  expect(greeting.kind).toBe('greeting');
  if (hs.ending.t === 'requestEarly' && hs.ending.beforeFlags) return endCase(session, requestEarly(c, true));
  c.send(encodeClientFlags(hs.flags));
  if (hs.flags & ~(ClientFlag.FIXED_NEWSTYLE | ClientFlag.NO_ZEROES)) return endCase(session, expectClosed(c, 'unknown client flags'));
  const s: HsState = { fixed: (hs.flags & ClientFlag.FIXED_NEWSTYLE) !== 0, noZeroes: (hs.flags & ClientFlag.NO_ZEROES) !== 0, structured: false, extended: false };
  for (const step of hs.steps) {
    if (!s.fixed) {
      // Without fixed newstyle only EXPORT_NAME is understood: anything else ends the connection.
      c.send(encodeOption(stepOption(step), stepData(step)));
      return endCase(session, expectClosed(c, 'an option from a non-fixed-newstyle client'));
    }
    const want = expectStep(s, step);
    const replies = await c.option(stepOption(step), stepData(step));
    expect(replies.at(-1)!.type, `reply to ${JSON.stringify(step)}`).toBe(want);
  }
  if (!s.fixed && hs.ending.t !== 'exportName' && hs.ending.t !== 'truncated') {
    c.send(encodeOption(Opt.LIST));
    return endCase(session, expectClosed(c, 'an option from a non-fixed-newstyle client'));
  }
  return endCase(session, runEnding(c, s, hs.ending));
}

async function endCase(session: FuzzSession, ending: Promise<void>): Promise<void> {
  await ending;
  await session.afterCase();
}

// ---------------------------------------------------------------- tests

describe('NBD server handshake under malformed options', () => {
  it(
    'answers every option as documented, drops only the bad client, stays bounded',
    async () => {
      const session = await FuzzSession.start(dir);
      try {
        await fc.assert(
          fc.asyncProperty(caseArb, (hs) => runCase(session, hs)),
          PROPERTY.parameters,
        );
      } finally {
        const peaks = await session.finish();
        console.log(`nbd-fuzz-handshake: peaks ${JSON.stringify(peaks)}`);
      }
    },
    TIMEOUT_MS,
  );
});
