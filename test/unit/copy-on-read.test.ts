/*
 * The copy-on-read filter (drivers/copy-on-read.ts) and the gate's
 * copy-on-read path (block/copy-on-read-io.ts) on small qcow2 chains made
 * here (base ← mid ← top, 64 KiB clusters): a read through the filter
 * returns what a plain read of top returns, and afterwards top allocates
 * exactly the clusters the read touched that it lacked — with `bottom`,
 * only those a layer down to `bottom` allocates; zero clusters stay zero
 * (copied as write-zeroes); dirty bitmaps do not see the copies; PREFETCH
 * reads copy without filling the buffer. A seeded model test repeats
 * random reads against a cluster-set model. Open-time refusals carry
 * QEMU's texts.
 */
import { describe, expect, it } from 'vitest';
import { BlockBackend } from '../../block/backend.js';
import { createDirtyBitmap } from '../../block/dirty-bitmap.js';
import { Req, Status } from '../../block/flags.js';
import type { BlockGraph } from '../../block/graph.js';
import type { BlockNode } from '../../block/node.js';
import { blockStatus, isAllocated } from '../../block/status.js';
import { testGraph } from '../helpers/graphs.js';
import { pattern } from '../helpers/mem-driver.js';
import { prng } from '../helpers/crash-ops.mjs';
import { qcow2ChainFiles } from '../helpers/qcow2-chain.js';
import { scratchDir } from '../helpers/tmp.js';

const KiB = 1024;
const CLUSTER = 64 * KiB;
const CLUSTERS = 64;
const SIZE = CLUSTERS * CLUSTER;
const dir = scratchDir('qbt-cor-');
let serial = 0;

/** Which clusters each layer writes: data (by seed) or zeroes. */
interface Layout {
  base: number[];
  mid: number[];
  midZero: number[];
  top: number[];
}

const FIXED: Layout = { base: [0, 1, 2, 3, 10], mid: [4, 5, 6, 10, 11], midZero: [20, 21], top: [5, 30] };

interface Chain {
  graph: BlockGraph;
  base: BlockNode;
  mid: BlockNode;
  top: BlockNode;
  expected: Uint8Array;
}

async function writeClusters(graph: BlockGraph, node: BlockNode, clusters: number[], seed: number, zero = false): Promise<void> {
  const blk = new BlockBackend(graph, node, { writable: true });
  for (const c of clusters) {
    if (zero) await blk.pwriteZeroes(c * CLUSTER, CLUSTER);
    else await blk.pwrite(c * CLUSTER, pattern(CLUSTER, seed + c));
  }
  await blk.close();
}

async function readAll(graph: BlockGraph, node: BlockNode, flags = 0): Promise<Uint8Array> {
  const out = new Uint8Array(SIZE);
  const blk = new BlockBackend(graph, node);
  await blk.pread(0, out, flags);
  await blk.close();
  return out;
}

async function chain(layout: Layout = FIXED): Promise<Chain> {
  const n = ++serial;
  const file = await qcow2ChainFiles(dir, String(n), SIZE);
  const graph = testGraph();
  const open = (name: 'base' | 'mid' | 'top', backing: string | null) =>
    graph.openNode({ driver: 'qcow2', 'node-name': name, file: { driver: 'file', filename: file(name) }, backing } as never);
  const base = await open('base', null);
  const mid = await open('mid', 'base');
  const top = await open('top', 'mid');
  for (const node of [base, mid, top]) node.userOwned = true;
  await writeClusters(graph, base, layout.base, 100);
  await writeClusters(graph, mid, layout.mid, 200);
  await writeClusters(graph, mid, layout.midZero, 0, true);
  await writeClusters(graph, top, layout.top, 300);
  return { graph, base, mid, top, expected: await readAll(graph, top) };
}

/** The clusters `node` allocates itself. */
async function allocatedClusters(node: BlockNode): Promise<number[]> {
  const out: number[] = [];
  for (let c = 0; c < CLUSTERS; c++) if ((await isAllocated(node, c * CLUSTER, CLUSTER)).allocated) out.push(c);
  return out;
}

/** A copy-on-read node above top, owned as blockdev-add's are (a backend closing does not close it). */
async function filterOn(c: Chain, bottom?: string): Promise<BlockNode> {
  const filter = await c.graph.openNode({ driver: 'copy-on-read', 'node-name': 'cor', file: 'top', ...(bottom ? { bottom } : {}) } as never);
  filter.userOwned = true;
  return filter;
}

async function readThrough(c: Chain, filter: BlockNode, offsetBytes: number, bytes: number, flags = 0): Promise<Uint8Array> {
  const buf = new Uint8Array(bytes);
  const blk = new BlockBackend(c.graph, filter);
  await blk.pread(offsetBytes, buf, flags);
  await blk.close();
  return buf;
}

const sorted = (s: Iterable<number>) => [...new Set(s)].sort((a, b) => a - b);
const range = (from: number, to: number) => Array.from({ length: to - from }, (_, i) => from + i);

describe('copy-on-read filter', () => {
  it('copies exactly the clusters an unaligned read touched; data unchanged', async () => {
    const c = await chain();
    const filter = await filterOn(c);
    const offset = 3 * CLUSTER + 100;
    const bytes = 2 * CLUSTER + 5000; // clusters 3, 4, 5 (5 already in top)
    const got = await readThrough(c, filter, offset, bytes);
    expect(Buffer.from(got).equals(Buffer.from(c.expected.subarray(offset, offset + bytes)))).toBe(true);
    expect(await allocatedClusters(c.top)).toEqual(sorted([...FIXED.top, 3, 4, 5]));
    expect(Buffer.from(await readAll(c.graph, c.top)).equals(c.expected)).toBe(true);
  });

  it('with bottom copies only what the layers down to bottom allocate', async () => {
    const c = await chain();
    const filter = await filterOn(c, 'mid');
    const got = await readAll(c.graph, filter);
    expect(Buffer.from(got).equals(c.expected)).toBe(true);
    // base's clusters 0-3 are not copied; 10 is (mid allocates it too); mid's zero clusters are.
    expect(await allocatedClusters(c.top)).toEqual(sorted([...FIXED.top, ...FIXED.mid, ...FIXED.midZero]));
  });

  it('without bottom copies every layer, and zero clusters stay zero', async () => {
    const c = await chain();
    const filter = await filterOn(c);
    // A piece that reads as zeroes (mid's zero clusters, a cluster no layer allocates) is written as write-zeroes.
    await readThrough(c, filter, 20 * CLUSTER, 2 * CLUSTER);
    await readThrough(c, filter, 40 * CLUSTER + 1, 10);
    for (const z of [...FIXED.midZero, 40]) {
      const st = await blockStatus(c.top, z * CLUSTER, CLUSTER);
      expect(st.status & (Status.ZERO | Status.DATA | Status.ALLOCATED), `cluster ${z}`).toBe(Status.ZERO | Status.ALLOCATED);
    }
    await readAll(c.graph, filter);
    expect(await allocatedClusters(c.top)).toEqual(range(0, CLUSTERS));
    expect(Buffer.from(await readAll(c.graph, c.top)).equals(c.expected)).toBe(true);
  });

  it('a PREFETCH read copies without filling the buffer', async () => {
    const c = await chain();
    const filter = await filterOn(c, 'mid');
    const got = await readThrough(c, filter, 4 * CLUSTER, 2 * CLUSTER, Req.PREFETCH);
    expect(got.every((b) => b === 0)).toBe(true);
    expect(await allocatedClusters(c.top)).toEqual(sorted([...FIXED.top, 4]));
  });

  it('copies are not guest writes: dirty bitmaps stay clean; writes pass through', async () => {
    const c = await chain();
    const bitmap = createDirtyBitmap(c.top, CLUSTER, 'b0');
    const filter = await filterOn(c);
    await readAll(c.graph, filter);
    expect(bitmap.dirtyBytes).toBe(0);
    const blk = new BlockBackend(c.graph, filter, { writable: true });
    await blk.pwrite(50 * CLUSTER, pattern(4 * KiB, 9));
    await blk.close();
    expect(bitmap.dirtyBytes).toBe(CLUSTER);
  });

  it('a plain read of the child copies nothing', async () => {
    const c = await chain();
    await filterOn(c);
    await readAll(c.graph, c.top);
    expect(await allocatedClusters(c.top)).toEqual(FIXED.top);
  });

  it('refuses what QEMU refuses, with its texts', async () => {
    const c = await chain();
    const open = (opts: Record<string, unknown>) => c.graph.openNode({ driver: 'copy-on-read', ...opts } as never);
    await expect(open({ file: 'base', bottom: 'nosuch' })).rejects.toThrow("Bottom node 'nosuch' not found");
    await open({ 'node-name': 'f1', file: 'top' });
    await expect(open({ file: 'top', bottom: 'f1' })).rejects.toThrow("Bottom node 'f1' is a filter");
    await expect(open({ file: 'mid', bottom: 'top' })).rejects.toThrow("Bottom node 'top' is not in the backing chain of 'mid'");
    // A second node on base's file, which 'base' holds writable: force-share, as -U, or its image locks refuse it.
    const ro = await c.graph.openNode({ driver: 'qcow2', 'node-name': 'ro', 'read-only': true, 'force-share': true, file: { driver: 'file', filename: c.base.filename }, backing: null } as never);
    await expect(open({ file: ro.nodeName })).rejects.toThrow('Block node is read-only');
    expect([...c.graph.nodes.values()].filter((n) => n.driver.name === 'copy-on-read').map((n) => n.nodeName)).toEqual(['f1']);
  });
});

function randomLayout(next: () => number): Layout {
  const pick = (p: number) => range(0, CLUSTERS).filter(() => next() < p);
  return { base: pick(0.3), mid: pick(0.3), midZero: pick(0.1), top: pick(0.15) };
}

describe('copy-on-read model', () => {
  for (const seed of [1, 2, 3]) {
    for (const bottom of [undefined, 'mid', 'base']) {
      it(`seed ${seed}, bottom ${bottom ?? 'none'}: random reads allocate what the model says`, async () => {
        const next = prng(seed);
        const layout = randomLayout(next);
        const c = await chain(layout);
        const filter = await filterOn(c, bottom);
        // Clusters whose data a read through the filter copies into top.
        const copyable = new Set(bottom === 'mid' ? [...layout.mid, ...layout.midZero] : bottom === 'base' ? [...layout.base, ...layout.mid, ...layout.midZero] : range(0, CLUSTERS));
        const model = new Set(await allocatedClusters(c.top));
        for (let i = 0; i < 12; i++) {
          const offset = Math.floor(next() * SIZE);
          const bytes = 1 + Math.floor(next() * Math.min(SIZE - offset, 5 * CLUSTER));
          const got = await readThrough(c, filter, offset, bytes);
          expect(Buffer.from(got).equals(Buffer.from(c.expected.subarray(offset, offset + bytes))), `read ${i}`).toBe(true);
          for (let cl = Math.floor(offset / CLUSTER); cl * CLUSTER < offset + bytes; cl++) if (copyable.has(cl)) model.add(cl);
          expect(await allocatedClusters(c.top), `after read ${i} at ${offset}+${bytes}`).toEqual(sorted(model));
        }
        expect(Buffer.from(await readAll(c.graph, c.top)).equals(c.expected)).toBe(true);
      });
    }
  }
});
