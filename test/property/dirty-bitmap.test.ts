/*
 * Model tests for dirty bitmaps, against one boolean per granule:
 *
 *   1. DirtyBitmap alone: random set, reset, clear, resize, merge (same and
 *      other granularities) and serialise/deserialise round trips, sizes
 *      and ranges biased to the 2^15-granule chunk boundaries of the
 *      sparse store; after every step the dirty extents, the count and
 *      next-dirty/next-clean from random offsets agree with the model;
 *   2. marking through the request gate: random writes, write-zeroes,
 *      discards and truncates through a BlockBackend on the test-mem driver
 *      (request alignment 1, 512 or 4096) with two recording bitmaps and a
 *      disabled one: a recording bitmap is exactly the granules of the
 *      aligned ranges written (it never misses a write), a disabled one
 *      never changes;
 *   3. the same through qcow2 with persistent bitmaps, then close and
 *      reopen: the bitmaps read back from the image equal the model, and
 *      `qemu-img check` is clean (when qemu-img is installed).
 *
 * Runs: PROPERTY_RUNS (default below), PROPERTY_SEED to replay,
 * PROPERTY_PATH with it for one shrunk counterexample; the seed is logged.
 */
import { spawnSync } from 'node:child_process';
import path from 'node:path';
import fc from 'fast-check';
import { describe, expect, it } from 'vitest';
import { BlockBackend } from '../../block/backend.js';
import { createImage } from '../../block/create.js';
import { CHUNK_BITS } from '../../block/dirty-bitmap-bits.js';
import { DirtyBitmap, createDirtyBitmap, findDirtyBitmap } from '../../block/dirty-bitmap.js';
import { bitmapAdd } from '../../block/dirty-bitmap-ops.js';
import { alignDown, alignUp } from '../../block/flags.js';
import { BlockGraph } from '../../block/graph.js';
import { builtinDrivers } from '../../drivers/index.js';
import { propertyRuns } from '../helpers/block-model.js';
import { openMem } from '../helpers/mem-driver.js';
import { hasTool } from '../helpers/peers.js';
import { scratchDir } from '../helpers/tmp.js';

const PROPERTY = propertyRuns('dirty-bitmap.test', 60);
const TIMEOUT_MS = Math.max(120_000, PROPERTY.runs * 1000);
const KiB = 1024;

/** One boolean per granule. */
class GranuleModel {
  dirty: Uint8Array;
  constructor(readonly granularity: number, public sizeBytes: number) {
    this.dirty = new Uint8Array(Math.ceil(sizeBytes / granularity));
  }
  private span(offset: number, bytes: number): [number, number] {
    const end = Math.min(offset + bytes, this.sizeBytes);
    return [Math.floor(offset / this.granularity), Math.ceil(end / this.granularity)];
  }
  set(offset: number, bytes: number): void {
    if (bytes > 0) this.dirty.fill(1, ...this.span(offset, bytes));
  }
  reset(offset: number, bytes: number): void {
    if (bytes > 0) this.dirty.fill(0, ...this.span(offset, bytes));
  }
  resize(sizeBytes: number): void {
    const next = new Uint8Array(Math.ceil(sizeBytes / this.granularity));
    next.set(this.dirty.subarray(0, next.length));
    this.dirty = next;
    this.sizeBytes = sizeBytes;
  }
  /** Dirty runs in bytes, clipped to the size. */
  extents(): string[] {
    const out: string[] = [];
    for (let g = 0; g < this.dirty.length; ) {
      if (!this.dirty[g]) {
        g++;
        continue;
      }
      let e = g;
      while (e < this.dirty.length && this.dirty[e]) e++;
      const start = g * this.granularity;
      out.push(`${start}+${Math.min(e * this.granularity, this.sizeBytes) - start}`);
      g = e;
    }
    return out;
  }
  count(): number {
    return this.dirty.reduce((sum, v) => sum + v, 0) * this.granularity;
  }
}

const extentsOf = (bm: DirtyBitmap) => [...bm.dirtyExtents()].map((e) => `${e.offset}+${e.bytes}`);

/** Asserts that `bm` and `model` agree on extents, count, and a few random next-dirty/next-clean queries. */
function agree(bm: DirtyBitmap, model: GranuleModel, probes: number[], when: string): void {
  expect(extentsOf(bm), when).toEqual(model.extents());
  expect(bm.dirtyBytes, when).toBe(model.count());
  for (const p of probes) {
    const at = p % Math.max(1, model.sizeBytes);
    const g = Math.floor(at / model.granularity);
    let d = g;
    while (d < model.dirty.length && !model.dirty[d]) d++;
    let c = g;
    while (c < model.dirty.length && model.dirty[c]) c++;
    const wantDirty = d < model.dirty.length ? Math.max(at, d * model.granularity) : -1;
    const cleanAt = Math.max(at, c * model.granularity);
    const wantClean = c < model.dirty.length && cleanAt < model.sizeBytes ? cleanAt : -1;
    expect(bm.nextDirty(at), `${when}: nextDirty(${at})`).toBe(model.sizeBytes > 0 ? wantDirty : -1);
    expect(bm.nextClean(at), `${when}: nextClean(${at})`).toBe(model.sizeBytes > 0 ? wantClean : -1);
  }
}

// ---------------------------------------------------------------- 1. the bitmap alone

type BitmapOp =
  | { kind: 'set' | 'reset'; offset: number; bytes: number }
  | { kind: 'clear' }
  | { kind: 'resize'; sizeBytes: number }
  | { kind: 'merge'; granularity: number; ranges: Array<{ offset: number; bytes: number }> }
  | { kind: 'roundtrip' };

const GRANULARITIES = [512, 4096, 65536] as const;

/** Offsets biased to chunk boundaries (CHUNK_BITS granules) of a bitmap of `g` bytes per granule. */
function offsetArb(g: number, sizeBytes: number): fc.Arbitrary<number> {
  const chunkBytes = CHUNK_BITS * g;
  return fc.oneof(
    fc.nat(sizeBytes),
    fc.record({ k: fc.nat(4), d: fc.integer({ min: -3 * g, max: 3 * g }) }).map(({ k, d }) => Math.min(sizeBytes, Math.max(0, k * chunkBytes + d))),
  );
}

function bitmapOpArb(g: number, sizeBytes: number): fc.Arbitrary<BitmapOp> {
  const chunkBytes = CHUNK_BITS * g;
  const range = fc.record({
    offset: offsetArb(g, sizeBytes),
    bytes: fc.oneof(fc.integer({ min: 1, max: 3 * g }), fc.integer({ min: 1, max: 2 * chunkBytes })),
  });
  return fc.oneof(
    { weight: 6, arbitrary: range.map((r): BitmapOp => ({ kind: 'set', ...r })) },
    // Resets are granule-aligned, as QEMU's callers make them.
    { weight: 3, arbitrary: range.map((r): BitmapOp => ({ kind: 'reset', offset: alignDown(r.offset, g), bytes: alignUp(r.bytes, g) })) },
    { weight: 1, arbitrary: fc.constant<BitmapOp>({ kind: 'clear' }) },
    { weight: 1, arbitrary: offsetArb(g, 3 * chunkBytes).map((s): BitmapOp => ({ kind: 'resize', sizeBytes: alignUp(s, 512) })) },
    { weight: 2, arbitrary: fc.record({ granularity: fc.constantFrom(...GRANULARITIES), ranges: fc.array(range, { maxLength: 4 }) })
      .map((m): BitmapOp => ({ kind: 'merge', ...m })) },
    { weight: 1, arbitrary: fc.constant<BitmapOp>({ kind: 'roundtrip' }) },
  );
}

function applyBitmapOp(bm: DirtyBitmap, model: GranuleModel, op: BitmapOp): DirtyBitmap {
  switch (op.kind) {
    case 'set':
      bm.setDirty(op.offset, op.bytes);
      model.set(op.offset, op.bytes);
      return bm;
    case 'reset':
      bm.resetDirty(op.offset, op.bytes);
      model.reset(op.offset, op.bytes);
      return bm;
    case 'clear':
      bm.clear();
      model.reset(0, model.sizeBytes);
      return bm;
    case 'resize':
      bm.resize(op.sizeBytes);
      model.resize(op.sizeBytes);
      return bm;
    case 'merge': {
      const src = new DirtyBitmap('src', op.granularity, bm.sizeBytes);
      const srcModel = new GranuleModel(op.granularity, bm.sizeBytes);
      for (const r of op.ranges) {
        src.setDirty(r.offset, r.bytes);
        srcModel.set(r.offset, r.bytes);
      }
      bm.mergeFrom(src);
      for (const e of srcModel.extents()) {
        const [offset, bytes] = e.split('+').map(Number) as [number, number];
        model.set(offset, bytes);
      }
      return bm;
    }
    case 'roundtrip': {
      const buf = new Uint8Array(bm.serializationBytes());
      bm.serialize(0, bm.sizeBytes, buf);
      const back = new DirtyBitmap('back', bm.granularityBytes, bm.sizeBytes);
      back.deserialize(0, bm.sizeBytes, buf);
      return back;
    }
  }
}

describe('DirtyBitmap against one boolean per granule', () => {
  for (const g of GRANULARITIES) {
    it(`granularity ${g}: random set/reset/clear/resize/merge/serialise sequences`, () => {
      const size = fc.oneof(fc.integer({ min: 0, max: 3 * CHUNK_BITS * g }), fc.constantFrom(CHUNK_BITS * g, 2 * CHUNK_BITS * g - 512));
      fc.assert(
        fc.property(
          size.map((s) => alignUp(s, 512)).chain((sizeBytes) =>
            fc.tuple(fc.constant(sizeBytes), fc.array(bitmapOpArb(g, sizeBytes), { maxLength: 25 }), fc.array(fc.nat(), { maxLength: 6 })),
          ),
          ([sizeBytes, ops, probes]) => {
            let bm = new DirtyBitmap('b', g, sizeBytes);
            const model = new GranuleModel(g, sizeBytes);
            for (const [step, op] of ops.entries()) {
              bm = applyBitmapOp(bm, model, op);
              agree(bm, model, probes, `g=${g} step ${step} ${JSON.stringify(op).slice(0, 200)}`);
            }
          },
        ),
        PROPERTY.parameters,
      );
    }, TIMEOUT_MS);
  }
});

// ---------------------------------------------------------------- 2. marking through the gate

type GateOp =
  | { kind: 'write' | 'zero' | 'discard'; offset: number; bytes: number }
  | { kind: 'truncate'; sizeBytes: number };

const GATE_BYTES = 256 * KiB;

function gateOpArb(): fc.Arbitrary<GateOp> {
  const range = fc.record({
    offset: fc.nat(GATE_BYTES - 1),
    bytes: fc.oneof(fc.integer({ min: 1, max: 700 }), fc.integer({ min: 1, max: 70 * KiB })),
  });
  return fc.oneof(
    { weight: 5, arbitrary: range.map((r): GateOp => ({ kind: 'write', ...r })) },
    { weight: 3, arbitrary: range.map((r): GateOp => ({ kind: 'zero', ...r })) },
    { weight: 2, arbitrary: range.map((r): GateOp => ({ kind: 'discard', ...r })) },
    { weight: 1, arbitrary: fc.integer({ min: 1, max: 2 * GATE_BYTES }).map((s): GateOp => ({ kind: 'truncate', sizeBytes: alignUp(s, 4096) })) },
  );
}

/** The bytes one operation makes dirty: the range the gate hands the driver (aligned for writes), clipped to the device. */
function dirtied(op: Extract<GateOp, { offset: number }>, align: number, sizeBytes: number): [number, number] {
  const start = op.kind === 'discard' ? op.offset : alignDown(op.offset, align);
  const end = op.kind === 'discard' ? op.offset + op.bytes : alignUp(op.offset + op.bytes, align);
  return [start, Math.min(end, alignUp(sizeBytes, align)) - start];
}

interface Tracked {
  name: string;
  model: GranuleModel;
}

async function runGateOps(align: number, ops: GateOp[]): Promise<void> {
  const { node, blk } = await openMem({ size: GATE_BYTES, align, discard: 'unmap' });
  const tracked: Tracked[] = [
    { name: 'fine', model: new GranuleModel(512, GATE_BYTES) },
    { name: 'coarse', model: new GranuleModel(64 * KiB, GATE_BYTES) },
  ];
  for (const t of tracked) createDirtyBitmap(node, t.model.granularity, t.name);
  const disabled = createDirtyBitmap(node, 4096, 'off');
  const disabledModel = new GranuleModel(4096, GATE_BYTES);
  disabled.setDirty(4096, 1);
  disabledModel.set(4096, 1);
  disabled.disabled = true;
  let sizeBytes = GATE_BYTES;
  for (const [step, op] of ops.entries()) {
    const when = `align ${align}, step ${step} ${JSON.stringify(op)}`;
    if (op.kind === 'truncate') {
      await blk.truncate(op.sizeBytes);
      sizeBytes = op.sizeBytes;
      for (const t of tracked) t.model.resize(sizeBytes);
      disabledModel.resize(sizeBytes);
    } else {
      const offset = Math.min(op.offset, Math.max(0, sizeBytes - 1));
      const bytes = Math.min(op.bytes, sizeBytes - offset);
      if (bytes <= 0) continue;
      const clipped = { ...op, offset, bytes };
      if (op.kind === 'write') await blk.pwrite(offset, new Uint8Array(bytes).fill(7));
      else if (op.kind === 'zero') await blk.pwriteZeroes(offset, bytes);
      else await blk.pdiscard(offset, bytes);
      for (const t of tracked) t.model.set(...dirtied(clipped, align, sizeBytes));
    }
    for (const t of tracked) agree(findDirtyBitmap(node, t.name)!, t.model, [], `${when}: bitmap ${t.name}`);
    agree(disabled, disabledModel, [], `${when}: the disabled bitmap changes only with the size`);
  }
  await blk.close();
}

describe('the gate marks every write in the recording bitmaps', () => {
  for (const align of [1, 512, 4096]) {
    it(`request alignment ${align}: writes, write-zeroes, discards and truncates`, async () => {
      await fc.assert(fc.asyncProperty(fc.array(gateOpArb(), { maxLength: 30 }), (ops) => runGateOps(align, ops)), PROPERTY.parameters);
    }, TIMEOUT_MS);
  }
});

// ---------------------------------------------------------------- 3. qcow2, persisted

const dir = scratchDir('qbt-bitmap-model-');
let images = 0;
const QCOW2_BYTES = 1024 * KiB;

async function openQcow2(graph: BlockGraph, filename: string): Promise<BlockBackend> {
  const node = await graph.openImage(filename, { format: 'qcow2', options: { discard: 'unmap' } });
  return new BlockBackend(graph, node, { writable: true, resizable: true });
}

async function runQcow2Ops(clusterBytes: number, ops: GateOp[]): Promise<void> {
  const filename = path.join(dir, `img-${images++}.qcow2`);
  const setup = new BlockGraph(builtinDrivers);
  await createImage(setup, { format: 'qcow2', filename, sizeBytes: QCOW2_BYTES, options: [['cluster_size', String(clusterBytes)]] });
  await setup.closeAll();
  const models: Tracked[] = [
    { name: 'b512', model: new GranuleModel(512, QCOW2_BYTES) },
    { name: 'b64k', model: new GranuleModel(64 * KiB, QCOW2_BYTES) },
  ];
  let graph = new BlockGraph(builtinDrivers);
  let blk = await openQcow2(graph, filename);
  for (const t of models) await bitmapAdd(blk.node, { name: t.name, granularityBytes: t.model.granularity, persistent: true });
  let sizeBytes = QCOW2_BYTES;
  for (const op of ops) {
    if (op.kind === 'truncate') {
      if (op.sizeBytes < 64 * KiB) continue;
      await blk.truncate(op.sizeBytes);
      sizeBytes = op.sizeBytes;
      for (const t of models) t.model.resize(sizeBytes);
      continue;
    }
    const offset = Math.min(op.offset * 4, sizeBytes - 1);
    const bytes = Math.min(op.bytes, sizeBytes - offset);
    if (op.kind === 'write') await blk.pwrite(offset, new Uint8Array(bytes).fill(9));
    else if (op.kind === 'zero') await blk.pwriteZeroes(offset, bytes);
    else await blk.pdiscard(offset, bytes);
    for (const t of models) t.model.set(offset, bytes);
  }
  await blk.close();
  await graph.closeAll();
  graph = new BlockGraph(builtinDrivers);
  blk = await openQcow2(graph, filename);
  try {
    for (const t of models) agree(findDirtyBitmap(blk.node, t.name)!, t.model, [], `reopened, bitmap ${t.name}`);
  } finally {
    await blk.close();
    await graph.closeAll();
  }
  if (hasTool('qemu-img')) {
    const r = spawnSync('qemu-img', ['check', '-f', 'qcow2', filename], { encoding: 'utf8' });
    if (r.status !== 0) throw new Error(`qemu-img check exit ${r.status}: ${r.stdout}${r.stderr}`);
  }
}

describe('qcow2 persistent bitmaps survive close and reopen', () => {
  for (const clusterBytes of [512, 65536]) {
    it(`cluster size ${clusterBytes}: random writes, then the stored bitmaps equal the model`, async () => {
      const runs = Math.max(1, Math.floor(PROPERTY.runs / 3));
      await fc.assert(fc.asyncProperty(fc.array(gateOpArb(), { maxLength: 20 }), (ops) => runQcow2Ops(clusterBytes, ops)), {
        ...PROPERTY.parameters,
        numRuns: runs,
      });
    }, TIMEOUT_MS);
  }
});
