/*
 * Model test: random sequences of write, write-zeroes (MAY_UNMAP, FUA,
 * NO_FALLBACK in any mix), discard, read, flush and reopen (close the graph,
 * open the image again) against a plain Uint8Array, over four stacks:
 *
 *   raw-file     raw over file, discard=unmap, detect-zeroes=unmap
 *   raw-window   raw with offset/size over file, writethrough backend
 *   null-co      null-co with read-zeroes=on (the model: always zeroes)
 *   raw-blkdebug raw over blkdebug (align=4096, max-transfer=65536) over
 *                file, discard=unmap: every unaligned request becomes
 *                read-modify-write at the blkdebug layer, which fails any
 *                request that breaks its limits
 *
 * What the model asserts, honestly: written bytes read back; zeroed bytes
 * read as zero; a discard is a hint, so a discarded byte reads as its old
 * value or zero (a punched hole), nothing else, until it is written again;
 * a NO_FALLBACK write-zeroes that fails with ENOTSUP leaves each byte old or
 * zero too (it may have zeroed part before failing). Bytes of the file
 * outside a raw window never change. Reopening changes nothing.
 *
 * Runs: PROPERTY_RUNS per stack (default below, sized so the file runs in a
 * few seconds on 2 cores), PROPERTY_SEED to replay, PROPERTY_PATH with it to
 * replay one shrunk counterexample. The seed is logged up front and
 * fast-check prints seed and path on failure.
 */
import fs from 'node:fs';
import path from 'node:path';
import fc from 'fast-check';
import { describe, it } from 'vitest';
import { BlockBackend } from '../../block/backend.js';
import { isBlockError } from '../../block/errors.js';
import { Req, alignDown } from '../../block/flags.js';
import type { OptionTree } from '../../block/keyval.js';
import { memGraph, pattern } from '../helpers/mem-driver.js';
import { scratchDir } from '../helpers/tmp.js';

const DEFAULT_RUNS = 100;
const NUM_RUNS = Number(process.env.PROPERTY_RUNS ?? DEFAULT_RUNS);
const SEED = Number(process.env.PROPERTY_SEED ?? Math.floor(Math.random() * 2 ** 31));
const PATH = process.env.PROPERTY_PATH;
const MAX_OPS = 40;
/** Per-stack time limit: generous per run, so a large PROPERTY_RUNS soak does not time out. */
const TIMEOUT_MS = Math.max(60_000, NUM_RUNS * 250);
const KiB = 1024;

console.log(`model.test: seed=${SEED} runs=${NUM_RUNS} per stack (replay: PROPERTY_SEED=${SEED} [PROPERTY_PATH=...])`);

const dir = scratchDir('qbt-model-');
let images = 0;

interface Stack {
  name: string;
  /** Guest-visible bytes. */
  sizeBytes: number;
  /** Host file bytes (0: no file). */
  fileBytes: number;
  /** Where the guest's byte 0 lives in the file. */
  windowOffset: number;
  /** Reads are always zero, whatever was written (null-co). */
  alwaysZero: boolean;
  writeCache: boolean;
  spec(filename: string): OptionTree;
}

const STACKS: Stack[] = [
  {
    name: 'raw-file', sizeBytes: 256 * KiB, fileBytes: 256 * KiB, windowOffset: 0, alwaysZero: false, writeCache: true,
    spec: (filename) => ({ driver: 'raw', discard: 'unmap', 'detect-zeroes': 'unmap', file: { driver: 'file', filename } }),
  },
  {
    name: 'raw-window', sizeBytes: 128 * KiB, fileBytes: 136 * KiB, windowOffset: 1536, alwaysZero: false, writeCache: false,
    spec: (filename) => ({ driver: 'raw', offset: 1536, size: 128 * KiB, file: { driver: 'file', filename } }),
  },
  {
    name: 'null-co', sizeBytes: 256 * KiB, fileBytes: 0, windowOffset: 0, alwaysZero: true, writeCache: true,
    spec: () => ({ driver: 'null-co', size: 256 * KiB, 'read-zeroes': true, discard: 'unmap' }),
  },
  {
    name: 'raw-blkdebug', sizeBytes: 256 * KiB, fileBytes: 256 * KiB, windowOffset: 0, alwaysZero: false, writeCache: true,
    spec: (filename) => ({
      driver: 'raw', discard: 'unmap',
      file: { driver: 'blkdebug', align: 4096, 'max-transfer': 65536, image: { driver: 'file', filename } },
    }),
  },
];

/** Per byte: its value, and whether it may also read as zero (after a discard). */
class Model {
  readonly value: Uint8Array;
  readonly maybeZero: Uint8Array;

  constructor(initial: Uint8Array, private readonly alwaysZero: boolean) {
    this.value = alwaysZero ? new Uint8Array(initial.length) : initial.slice();
    this.maybeZero = new Uint8Array(initial.length);
  }

  write(offset: number, data: Uint8Array): void {
    if (this.alwaysZero) return;
    this.value.set(data, offset);
    this.maybeZero.fill(0, offset, offset + data.length);
  }

  zero(offset: number, bytes: number): void {
    this.value.fill(0, offset, offset + bytes);
    this.maybeZero.fill(0, offset, offset + bytes);
  }

  /** The bytes may keep their value or read as zero. */
  blur(offset: number, bytes: number): void {
    this.maybeZero.fill(1, offset, offset + bytes);
  }

  /** A description of the first byte of `actual` (read at `offset`) the model forbids, or null. */
  mismatch(offset: number, actual: Uint8Array): string | null {
    for (let i = 0; i < actual.length; i++) {
      const want = this.value[offset + i]!;
      const got = actual[i]!;
      if (got === want || (got === 0 && this.maybeZero[offset + i])) continue;
      const also = this.maybeZero[offset + i] ? ' or 0' : '';
      return `byte ${offset + i}: read ${got}, model ${want}${also}`;
    }
    return null;
  }
}

type Op =
  | { kind: 'write'; offset: number; bytes: number; seed: number; zeroData: boolean; fua: boolean }
  | { kind: 'zero'; offset: number; bytes: number; flags: number }
  | { kind: 'discard'; offset: number; bytes: number }
  | { kind: 'read'; offset: number; bytes: number }
  | { kind: 'flush' }
  | { kind: 'reopen' };

/** A range biased towards the interesting alignments (1, 512, 4096) and lengths (tiny, one block, past 64 KiB). */
function rangeArb(sizeBytes: number) {
  return fc
    .record({
      offset: fc.nat(sizeBytes - 1),
      bytes: fc.oneof(fc.integer({ min: 1, max: 700 }), fc.integer({ min: 1, max: 9000 }), fc.integer({ min: 1, max: 140 * KiB })),
      align: fc.constantFrom(1, 1, 512, 4096),
    })
    .map(({ offset, bytes, align }) => {
      const start = alignDown(offset, align);
      return { offset: start, bytes: Math.min(Math.max(alignDown(bytes, align), align), sizeBytes - start) };
    });
}

function opArb(sizeBytes: number): fc.Arbitrary<Op> {
  const range = rangeArb(sizeBytes);
  return fc.oneof(
    { weight: 5, arbitrary: fc.record({ range, seed: fc.integer({ min: 0, max: 10_000 }), zeroData: fc.boolean(), fua: fc.boolean() })
      .map(({ range: r, seed, zeroData, fua }): Op => ({ kind: 'write', ...r, seed, zeroData: zeroData && seed % 4 === 0, fua })) },
    { weight: 3, arbitrary: fc.record({ range, flags: fc.subarray([Req.MAY_UNMAP, Req.FUA, Req.NO_FALLBACK]) })
      .map(({ range: r, flags }): Op => ({ kind: 'zero', ...r, flags: flags.reduce((a, b) => a | b, 0) })) },
    { weight: 2, arbitrary: range.map((r): Op => ({ kind: 'discard', ...r })) },
    { weight: 3, arbitrary: range.map((r): Op => ({ kind: 'read', ...r })) },
    { weight: 1, arbitrary: fc.constant<Op>({ kind: 'flush' }) },
    { weight: 1, arbitrary: fc.constant<Op>({ kind: 'reopen' }) },
  );
}

/** The image under test: a fresh file (when the stack has one) and a backend on the stack. */
class Subject {
  private blk: BlockBackend | null = null;
  readonly filename: string;
  readonly fileInitial: Uint8Array;

  constructor(private readonly stack: Stack) {
    this.filename = path.join(dir, `model-${images++}.img`);
    this.fileInitial = pattern(stack.fileBytes, images);
    if (stack.fileBytes > 0) fs.writeFileSync(this.filename, this.fileInitial);
  }

  async open(): Promise<BlockBackend> {
    const graph = memGraph();
    const node = await graph.openNode(this.stack.spec(this.filename));
    if (node.totalBytes !== this.stack.sizeBytes) throw new Error(`opened with ${node.totalBytes} bytes, expected ${this.stack.sizeBytes}`);
    this.blk = new BlockBackend(graph, node, { writable: true, writeCache: this.stack.writeCache });
    return this.blk;
  }

  async close(): Promise<void> {
    await this.blk?.close();
    this.blk = null;
  }

  async read(offset: number, bytes: number): Promise<Uint8Array> {
    const buf = new Uint8Array(bytes);
    await this.blk!.pread(offset, buf);
    return buf;
  }

  /** Bytes of the host file outside the guest's window, which nothing may change. */
  outsideWindowChanged(): string | null {
    if (this.stack.fileBytes === 0) return null;
    const now = fs.readFileSync(this.filename);
    if (now.length !== this.stack.fileBytes) return `host file is ${now.length} bytes, was ${this.stack.fileBytes}`;
    const { windowOffset, sizeBytes } = this.stack;
    for (const [from, to] of [[0, windowOffset], [windowOffset + sizeBytes, now.length]] as const) {
      if (!now.subarray(from, to).equals(this.fileInitial.subarray(from, to))) return `host bytes [${from}, ${to}) changed`;
    }
    return null;
  }
}

/** Runs `ops` on a fresh image of `stack`, failing with a description at the first divergence. */
async function runOps(stack: Stack, ops: Op[]): Promise<void> {
  const subject = new Subject(stack);
  const window = subject.fileInitial.subarray(stack.windowOffset, stack.windowOffset + stack.sizeBytes);
  const model = new Model(stack.fileBytes > 0 ? window : new Uint8Array(stack.sizeBytes), stack.alwaysZero);
  let blk = await subject.open();
  const check = async (offset: number, bytes: number, when: string) => {
    const problem = model.mismatch(offset, await subject.read(offset, bytes));
    if (problem) throw new Error(`${stack.name}: ${when}: ${problem}`);
  };
  try {
    for (const [step, op] of ops.entries()) {
      const when = `after op ${step} (${JSON.stringify(op)})`;
      switch (op.kind) {
        case 'write': {
          const data = op.zeroData ? new Uint8Array(op.bytes) : pattern(op.bytes, op.seed);
          await blk.pwrite(op.offset, data, op.fua ? Req.FUA : 0);
          model.write(op.offset, data);
          break;
        }
        case 'zero':
          try {
            await blk.pwriteZeroes(op.offset, op.bytes, op.flags);
            model.zero(op.offset, op.bytes);
          } catch (e) {
            if (!(op.flags & Req.NO_FALLBACK && isBlockError(e, 'ENOTSUP'))) throw e;
            model.blur(op.offset, op.bytes);
          }
          break;
        case 'discard':
          await blk.pdiscard(op.offset, op.bytes);
          if (!stack.alwaysZero) model.blur(op.offset, op.bytes);
          break;
        case 'read':
          await check(op.offset, op.bytes, when);
          break;
        case 'flush':
          await blk.flush();
          break;
        case 'reopen':
          await subject.close();
          blk = await subject.open();
          await check(0, stack.sizeBytes, when);
          break;
      }
    }
    await check(0, stack.sizeBytes, 'at the end');
  } finally {
    await subject.close();
  }
  const outside = subject.outsideWindowChanged();
  if (outside) throw new Error(`${stack.name}: ${outside}`);
}

describe('block stacks against a Uint8Array model', () => {
  for (const stack of STACKS) {
    it(`${stack.name}: random write/zero/discard/read/flush/reopen sequences`, async () => {
      await fc.assert(
        fc.asyncProperty(fc.array(opArb(stack.sizeBytes), { maxLength: MAX_OPS }), (ops) => runOps(stack, ops)),
        { seed: SEED, numRuns: NUM_RUNS, ...(PATH ? { path: PATH } : {}) },
      );
    }, TIMEOUT_MS);
  }
});
