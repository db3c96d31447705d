/*
 * The model-test harness shared by the property tests (lifted from
 * test/property/model.test.ts): a per-byte model of what a block device
 * must read back, the random operations, and the step that applies one
 * operation to a device and to the model.
 *
 * What the model asserts, honestly: written bytes read back; zeroed bytes
 * read as zero; a discard is a hint, so a discarded byte reads as its old
 * value or zero, nothing else, until it is written again; a NO_FALLBACK
 * write-zeroes that fails with ENOTSUP leaves each byte old or zero too (it
 * may have zeroed part before failing). Reopening changes nothing.
 */
import fc from 'fast-check';
import type { BlockBackend } from '../../block/backend.js';
import { isBlockError } from '../../block/errors.js';
import { Req, alignDown } from '../../block/flags.js';
import { pattern } from './mem-driver.js';

const KiB = 1024;

/**
 * How many runs a property test makes and with which seed: PROPERTY_RUNS
 * (else `defaultRuns`), PROPERTY_SEED to replay, PROPERTY_PATH with it for
 * one shrunk counterexample. The seed is logged up front under `name`.
 */
export function propertyRuns(name: string, defaultRuns: number) {
  const runs = Number(process.env.PROPERTY_RUNS ?? defaultRuns);
  const seed = Number(process.env.PROPERTY_SEED ?? Math.floor(Math.random() * 2 ** 31));
  const replayPath = process.env.PROPERTY_PATH;
  console.log(`${name}: seed=${seed} runs=${runs} per stack (replay: PROPERTY_SEED=${seed} [PROPERTY_PATH=...])`);
  return { runs, parameters: { seed, numRuns: runs, ...(replayPath ? { path: replayPath } : {}) } };
}

/** Per byte: its value, and whether it may also read as zero (after a discard). */
export class Model {
  readonly value: Uint8Array;
  readonly maybeZero: Uint8Array;

  constructor(initial: Uint8Array, private readonly alwaysZero = false) {
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

export type Op =
  | { kind: 'write'; offset: number; bytes: number; seed: number; zeroData: boolean; fua: boolean }
  | { kind: 'zero'; offset: number; bytes: number; flags: number }
  | { kind: 'discard'; offset: number; bytes: number }
  | { kind: 'read'; offset: number; bytes: number }
  | { kind: 'flush' }
  | { kind: 'reopen' };

/** A range biased towards the interesting alignments (1, 512, 4096) and lengths (tiny, one block, past 64 KiB). */
export function rangeArb(sizeBytes: number) {
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

export function opArb(sizeBytes: number): fc.Arbitrary<Op> {
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

/** The device under test, as the step sees it. */
export interface ModelDevice {
  /** The open backend (changes on reopen). */
  backend(): BlockBackend;
  /** Closes and opens the device again. */
  reopen(): Promise<void>;
  sizeBytes: number;
  /** Discards leave the model as it is (a device whose reads are always zero). */
  discardKeepsModel?: boolean;
}

/** Reads [offset, offset + bytes) and throws a description if the model forbids what came back. */
export async function checkRead(device: ModelDevice, model: Model, offset: number, bytes: number, when: string): Promise<void> {
  const buf = new Uint8Array(bytes);
  await device.backend().pread(offset, buf);
  const problem = model.mismatch(offset, buf);
  if (problem) throw new Error(`${when}: ${problem}`);
}

/** Applies `op` to the device and the model, checking reads (and everything after a reopen). */
export async function applyOp(device: ModelDevice, model: Model, op: Op, when: string): Promise<void> {
  const blk = device.backend();
  switch (op.kind) {
    case 'write': {
      const data = op.zeroData ? new Uint8Array(op.bytes) : pattern(op.bytes, op.seed);
      await blk.pwrite(op.offset, data, op.fua ? Req.FUA : 0);
      model.write(op.offset, data);
      return;
    }
    case 'zero':
      try {
        await blk.pwriteZeroes(op.offset, op.bytes, op.flags);
        model.zero(op.offset, op.bytes);
      } catch (e) {
        if (!(op.flags & Req.NO_FALLBACK && isBlockError(e, 'ENOTSUP'))) throw e;
        model.blur(op.offset, op.bytes);
      }
      return;
    case 'discard':
      await blk.pdiscard(op.offset, op.bytes);
      if (!device.discardKeepsModel) model.blur(op.offset, op.bytes);
      return;
    case 'read':
      return checkRead(device, model, op.offset, op.bytes, when);
    case 'flush':
      return blk.flush();
    case 'reopen':
      await device.reopen();
      return checkRead(device, model, 0, device.sizeBytes, when);
  }
}
