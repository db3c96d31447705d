/*
 * Model test of the mirror under concurrent guest I/O: random writes,
 * write-zeroes (with and without unmap) and discards go through a user's
 * backend before the job starts, while it copies, around a runtime switch
 * to write-blocking, and after READY; then job-complete. The target must
 * then read exactly as the source, and the source as the model (bytes in
 * request order; a discarded byte may also read as zero, a discard being
 * a hint),
 * whatever granularity, buf-size, copy mode and request alignment were
 * drawn. Both nodes are opened with discard=unmap. Requests are issued one after the other but interleave with the
 * job's copies, and a few are issued in bursts of concurrent,
 * non-overlapping requests.
 *
 * Runs: PROPERTY_RUNS (default below), PROPERTY_SEED to replay; the seed is logged.
 */
import fc from 'fast-check';
import { describe, expect, it } from 'vitest';
import { BlockBackend } from '../../block/backend.js';
import { Req } from '../../block/flags.js';
import { startMirror } from '../../jobs/mirror.js';
import { Model, propertyRuns } from '../helpers/block-model.js';
import { memOf, pattern } from '../helpers/mem-driver.js';
import { finished, jobWorld } from '../helpers/mirror-setup.js';

const PROPERTY = propertyRuns('mirror-model.test', 25);
const TIMEOUT_MS = Math.max(120_000, PROPERTY.runs * 4000);
const SIZE_BYTES = 2 * 1024 * 1024;
const UNIT_BYTES = 512;

type Op = { kind: 'write' | 'zero' | 'zero-unmap' | 'discard'; offset: number; bytes: number; seed: number };

const opArb: fc.Arbitrary<Op> = fc
  .record({
    kind: fc.constantFrom('write', 'write', 'write', 'zero', 'zero-unmap', 'discard'),
    unit: fc.integer({ min: 0, max: SIZE_BYTES / UNIT_BYTES - 1 }),
    units: fc.integer({ min: 1, max: 300 }),
    seed: fc.integer({ min: 1, max: 1000 }),
  })
  .map(({ kind, unit, units, seed }) => {
    const offset = unit * UNIT_BYTES;
    return { kind: kind as Op['kind'], offset, bytes: Math.min(units * UNIT_BYTES, SIZE_BYTES - offset), seed };
  });

const scenarioArb = fc.record({
  granularity: fc.constantFrom(512, 4096, 65536),
  align: fc.constantFrom(1, 512, 4096),
  bufSize: fc.constantFrom(65536, 1 << 20),
  copyMode: fc.constantFrom('background', 'write-blocking') as fc.Arbitrary<'background' | 'write-blocking'>,
  switchToBlocking: fc.boolean(),
  before: fc.array(opArb, { maxLength: 8 }),
  during: fc.array(opArb, { maxLength: 30 }),
  burst: fc.array(opArb, { maxLength: 6 }),
  after: fc.array(opArb, { maxLength: 10 }),
});

function apply(model: Model, op: Op): void {
  if (op.kind === 'write') model.write(op.offset, pattern(op.bytes, op.seed));
  else if (op.kind === 'discard') model.blur(op.offset, op.bytes);
  else model.zero(op.offset, op.bytes);
}

function issue(blk: BlockBackend, op: Op): Promise<void> {
  if (op.kind === 'write') return blk.pwrite(op.offset, pattern(op.bytes, op.seed));
  if (op.kind === 'discard') return blk.pdiscard(op.offset, op.bytes);
  return blk.pwriteZeroes(op.offset, op.bytes, op.kind === 'zero-unmap' ? Req.MAY_UNMAP : 0);
}

/** Keeps the ops of a burst that do not overlap an earlier one of it. */
function disjoint(ops: Op[]): Op[] {
  const kept: Op[] = [];
  for (const op of ops) {
    if (kept.every((k) => op.offset + op.bytes <= k.offset || k.offset + k.bytes <= op.offset)) kept.push(op);
  }
  return kept;
}

type Scenario = typeof scenarioArb extends fc.Arbitrary<infer T> ? T : never;

async function runScenario(s: Scenario): Promise<void> {
  const w = jobWorld();
  const src = await w.mem('src', SIZE_BYTES, { discard: 'unmap', align: s.align });
  const tgt = await w.mem('tgt', SIZE_BYTES, { discard: 'unmap' });
  const blk = new BlockBackend(w.graph, src, { writable: true });
  const model = new Model(new Uint8Array(SIZE_BYTES));
  const run = async (ops: Op[]) => {
    for (const op of ops) {
      await issue(blk, op);
      apply(model, op);
    }
  };
  await run(s.before);
  const job = await startMirror(w, {
    jobId: 'p',
    source: src,
    target: tgt,
    sync: 'full',
    granularity: s.granularity,
    bufSize: s.bufSize,
    copyMode: s.copyMode,
  });
  await run(s.during.slice(0, s.during.length >> 1));
  if (s.switchToBlocking) job.change({ 'copy-mode': 'write-blocking' });
  await run(s.during.slice(s.during.length >> 1));
  const burst = disjoint(s.burst);
  await Promise.all(burst.map((op) => issue(blk, op)));
  for (const op of burst) apply(model, op);
  await w.waitEvent('BLOCK_JOB_READY');
  await run(s.after);
  job.complete();
  await finished(job);
  expect(blk.node).toBe(tgt);
  expect(model.mismatch(0, memOf(src).data)).toBe(null);
  expect(Buffer.from(memOf(tgt).data).equals(Buffer.from(memOf(src).data))).toBe(true);
  await w.graph.closeAll();
}

describe('mirror under concurrent guest I/O', () => {
  it('the target reads as the model after complete', async () => {
    await fc.assert(fc.asyncProperty(scenarioArb, runScenario), PROPERTY.parameters);
  }, TIMEOUT_MS);
});
