/*
 * The filters of stream (copy-on-read) and intermediate commit (commit_top)
 * over a job's life: inserted above the device / top with the users moved
 * onto them (a BlockBackend stands for an export), named by
 * filter-node-name or automatically, and gone — users back on the node
 * below — after completion, cancel and a failed job. A read by the user
 * while the stream runs copies into the device (bottom respected).
 */
import { describe, expect, it } from 'vitest';
import { BlockBackend } from '../../block/backend.js';
import type { BlockGraph } from '../../block/graph.js';
import type { BlockNode } from '../../block/node.js';
import { isAllocated } from '../../block/status.js';
import { builtinDrivers } from '../../drivers/index.js';
import { startCommit } from '../../jobs/commit.js';
import type { Job } from '../../jobs/job.js';
import { JobRegistry } from '../../jobs/registry.js';
import { startStream } from '../../jobs/stream.js';
import { testGraph } from '../helpers/graphs.js';
import { pattern } from '../helpers/mem-driver.js';
import { failing, failingReadsDriver, qcow2ChainFiles } from '../helpers/qcow2-chain.js';
import { scratchDir } from '../helpers/tmp.js';

const MiB = 1024 * 1024;
const SIZE = 4 * MiB;
const dir = scratchDir('qbt-cor-jobs-');
let serial = 0;

interface Setup {
  graph: BlockGraph;
  jobs: JobRegistry;
  base: BlockNode;
  mid: BlockNode;
  top: BlockNode;
  user: BlockBackend;
}

/** base (data 0..1M) ← mid (data 1M..2M; its file under a failing filter) ← top; a user backend on top. */
async function setup(): Promise<Setup> {
  const n = ++serial;
  const file = await qcow2ChainFiles(dir, String(n), SIZE);
  const graph = testGraph([...builtinDrivers, failingReadsDriver]);
  const open = (name: 'base' | 'mid' | 'top', backing: string | null, underFailing = false) => {
    const fileSpec = { driver: 'file', filename: file(name) };
    return graph.openNode({ driver: 'qcow2', 'node-name': name, file: underFailing ? { driver: 'test-failing', file: fileSpec } : fileSpec, backing } as never);
  };
  const base = await open('base', null);
  const mid = await open('mid', 'base', true);
  const top = await open('top', 'mid');
  for (const node of [base, mid, top]) node.userOwned = true;
  for (const [node, offset, seed] of [[base, 0, 1], [mid, MiB, 2]] as const) {
    const blk = new BlockBackend(graph, node, { writable: true });
    await blk.pwrite(offset, pattern(MiB, seed));
    await blk.close();
  }
  return { graph, jobs: new JobRegistry(() => undefined), base, mid, top, user: new BlockBackend(graph, top, { writable: true }) };
}

const filters = (s: Setup) => [...s.graph.nodes.values()].filter((n) => n.driver.isFilter && n.driver.name !== 'test-failing');

/** Starts a job whose first read of mid fails (on-error report); it must fail with EIO. */
async function expectReadFailure(start: () => Promise<Job>): Promise<void> {
  failing.failReads = 1;
  try {
    const job = await start();
    await job.whenFinished();
    expect(job.error).toBe('Input/output error');
  } finally {
    failing.failReads = 0;
  }
}

describe('stream copy-on-read filter', () => {
  it('sits above the device while the job runs, users read through it, and goes at completion', async () => {
    const s = await setup();
    const job = await startStream(s, { jobId: 's', device: s.top, base: s.base, speed: 1, filterNodeName: 'cor' });
    const [filter] = filters(s);
    expect([filter!.nodeName, filter!.driver.name]).toEqual(['cor', 'copy-on-read']);
    expect(s.user.node).toBe(filter);
    // A user read of base's data copies nothing (bottom is mid); of mid's data, the cluster read.
    await s.user.pread(4096, new Uint8Array(4096));
    await s.user.pread(MiB + 600 * 1024, new Uint8Array(4096));
    expect((await isAllocated(s.top, 0, 64 * 1024)).allocated).toBe(false);
    expect((await isAllocated(s.top, MiB + 576 * 1024, 64 * 1024)).allocated).toBe(true);
    job.setSpeed(0);
    await job.whenFinished();
    expect(job.error).toBeUndefined();
    expect(filters(s)).toEqual([]);
    expect(s.user.node).toBe(s.top);
    expect(s.top.backing?.node).toBe(s.base);
  });

  it('goes on cancel and on failure; an automatic name otherwise', async () => {
    const s = await setup();
    const job = await startStream(s, { jobId: 's', device: s.top, base: null, speed: 1 });
    expect(filters(s).map((n) => [n.autoNamed, n.driver.name])).toEqual([[true, 'copy-on-read']]);
    job.cancel(true);
    await job.whenFinished();
    expect(filters(s)).toEqual([]);
    expect(s.user.node).toBe(s.top);
    await expectReadFailure(() => startStream(s, { jobId: 's2', device: s.top, base: s.base }));
    expect(filters(s)).toEqual([]);
    expect(s.user.node).toBe(s.top);
    expect(s.top.backing?.node).toBe(s.mid);
  });

  it('a refused job leaves no filter', async () => {
    const s = await setup();
    await expect(startStream(s, { jobId: 's', device: s.top, base: null, speed: -1 })).rejects.toThrow("Parameter 'speed' expects a non-negative value");
    await expect(startStream(s, { jobId: 's', device: s.top, base: null, filterNodeName: 'mid' })).rejects.toThrow("Could not create node: Duplicate nodes with node-name='mid'");
    expect(filters(s)).toEqual([]);
    expect(s.user.node).toBe(s.top);
  });
});

describe('intermediate commit commit_top filter', () => {
  it('sits above top while the job runs and goes at completion, cancel and failure', async () => {
    const s = await setup();
    const job = await startCommit(s, { jobId: 'c', top: s.mid, base: s.base, speed: 1, filterNodeName: 'ct' });
    const [filter] = filters(s);
    expect([filter!.nodeName, filter!.driver.name, filter!.readOnly]).toEqual(['ct', 'commit_top', true]);
    expect(s.top.backing?.node).toBe(filter);
    job.cancel(true);
    await job.whenFinished();
    expect(filters(s)).toEqual([]);
    expect(s.top.backing?.node).toBe(s.mid);

    await expectReadFailure(() => startCommit(s, { jobId: 'c2', top: s.mid, base: s.base }));
    expect(filters(s)).toEqual([]);
    expect(s.top.backing?.node).toBe(s.mid);

    const done = await startCommit(s, { jobId: 'c3', top: s.mid, base: s.base });
    await done.whenFinished();
    expect(done.error).toBeUndefined();
    expect(filters(s)).toEqual([]);
    expect(s.top.backing?.node).toBe(s.base);
  });
});
