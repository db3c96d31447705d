/*
 * Stream and intermediate commit jobs on small qcow2 chains made here:
 * results read as the top did, the backing edges and names after the job,
 * event sequences, progress, error policies with a failing filter in the
 * chain, pause/resume, cancel, and block-stream / block-commit argument
 * checks with QEMU's texts.
 */
import { describe, expect, it } from 'vitest';
import { BlockBackend } from '../../block/backend.js';
import { storedBackingName } from '../../block/chain.js';
import type { BlockNode } from '../../block/node.js';
import { startCommit } from '../../jobs/commit.js';
import { JobRegistry } from '../../jobs/registry.js';
import { startStream } from '../../jobs/stream.js';
import { streamCommitCommands } from '../../qmp/commands-stream-commit.js';
import { builtinDrivers } from '../../drivers/index.js';
import { testGraph } from '../helpers/graphs.js';
import { pattern } from '../helpers/mem-driver.js';
import { failing, failingReadsDriver, qcow2ChainFiles } from '../helpers/qcow2-chain.js';
import { scratchDir } from '../helpers/tmp.js';

const MiB = 1024 * 1024;
const SIZE = 4 * MiB;
const dir = scratchDir('qbt-stream-job-');
let serial = 0;

interface Chain {
  graph: ReturnType<typeof testGraph>;
  jobs: JobRegistry;
  events: Array<[string, Record<string, unknown>]>;
  top: BlockNode;
  mid: BlockNode;
  base: BlockNode;
  expected: Uint8Array;
}

/** base (1 MiB at 0) ← mid (1 MiB at 1 MiB; its file under a failing filter) ← top (64 KiB at 2 MiB). */
async function chain(): Promise<Chain> {
  const n = ++serial;
  const file = await qcow2ChainFiles(dir, String(n), SIZE);
  const graph = testGraph([...builtinDrivers, failingReadsDriver]);
  const events: Chain['events'] = [];
  const jobs = new JobRegistry((e, d) => events.push([e, d]));
  const open = (name: string, backing?: string, underFailing = false) => {
    const fileSpec = { driver: 'file', filename: file(name as 'base' | 'mid' | 'top') };
    return graph.openNode({
      driver: 'qcow2',
      'node-name': name,
      file: underFailing ? { driver: 'test-failing', file: fileSpec } : fileSpec,
      ...(backing ? { backing } : { backing: null }),
    } as never);
  };
  const base = await open('base');
  const mid = await open('mid', 'base', true);
  const top = await open('top', 'mid');
  for (const node of [base, mid, top]) node.userOwned = true;
  const write = async (node: BlockNode, offset: number, bytes: number, seed: number) => {
    const blk = new BlockBackend(graph, node, { writable: true });
    await blk.pwrite(offset, pattern(bytes, seed));
    await blk.close();
  };
  await write(base, 0, MiB, 1);
  await write(mid, MiB, MiB, 2);
  await write(top, 2 * MiB, 64 * 1024, 3);
  const expected = new Uint8Array(SIZE);
  const reader = new BlockBackend(graph, top);
  await reader.pread(0, expected);
  await reader.close();
  return { graph, jobs, events, top, mid, base, expected };
}

async function readAll(c: Chain, node: BlockNode): Promise<Uint8Array> {
  const out = new Uint8Array(SIZE);
  const blk = new BlockBackend(c.graph, node);
  await blk.pread(0, out);
  await blk.close();
  return out;
}

const statuses = (c: Chain) => c.events.filter(([e]) => e === 'JOB_STATUS_CHANGE').map(([, d]) => d.status);

describe('stream job', () => {
  it('streams mid into top; top backs onto base; names and events as QEMU', async () => {
    const c = await chain();
    const job = await startStream(c, { jobId: 's', device: c.top, base: c.base });
    await job.whenFinished();
    expect(job.error).toBeUndefined();
    expect(c.top.backing?.node).toBe(c.base);
    expect(storedBackingName(c.top)).toBe(c.base.filename);
    expect(Buffer.from(await readAll(c, c.top)).equals(c.expected)).toBe(true);
    expect(statuses(c)).toEqual(['created', 'running', 'waiting', 'pending', 'concluded', 'null']);
    expect(c.events.find(([e]) => e === 'BLOCK_JOB_COMPLETED')![1]).toEqual({ type: 'stream', device: 's', len: SIZE, offset: SIZE, speed: 0 });
  });

  it('on-error ignore goes on but fails the job at the end and keeps the chain', async () => {
    const c = await chain();
    failing.failReads = 1;
    const job = await startStream(c, { jobId: 's', device: c.top, base: null, onError: 'ignore' });
    await job.whenFinished();
    failing.failReads = 0;
    expect(job.error).toBe('Input/output error');
    expect(c.events.filter(([e]) => e === 'BLOCK_JOB_ERROR').map(([, d]) => d)).toEqual([{ device: 's', operation: 'read', action: 'ignore' }]);
    expect(c.top.backing?.node).toBe(c.mid);
    expect(Buffer.from(await readAll(c, c.top)).equals(c.expected)).toBe(true);
  });

  it('on-error stop pauses; resume retries and completes', async () => {
    const c = await chain();
    failing.failReads = 1;
    const job = await startStream(c, { jobId: 's', device: c.top, base: null, onError: 'stop' });
    for (let i = 0; i < 200 && job.status !== 'paused'; i++) await new Promise((r) => setTimeout(r, 5));
    expect(job.status).toBe('paused');
    job.resume();
    await job.whenFinished();
    expect(job.error).toBeUndefined();
    expect(c.top.backing).toBeNull();
    expect(storedBackingName(c.top)).toBeNull();
    expect(Buffer.from(await readAll(c, c.top)).equals(c.expected)).toBe(true);
  });

  it('pause, resume and cancel under a speed limit', async () => {
    const c = await chain();
    const job = await startStream(c, { jobId: 's', device: c.top, base: null, speed: 512 * 1024 });
    job.pause();
    for (let i = 0; i < 200 && job.status !== 'paused'; i++) await new Promise((r) => setTimeout(r, 5));
    expect(job.status).toBe('paused');
    job.resume();
    job.cancel(true);
    await job.whenFinished();
    expect(c.events.map(([e]) => e).filter((e) => e !== 'JOB_STATUS_CHANGE')).toEqual(['BLOCK_JOB_CANCELLED']);
    expect(c.top.backing?.node).toBe(c.mid);
  });
});

describe('commit job', () => {
  it('commits mid into base; top backs onto base with the given name', async () => {
    const c = await chain();
    const job = await startCommit(c, { jobId: 'c', top: c.mid, base: c.base, backingFile: 'base-name.qcow2' });
    await job.whenFinished();
    expect(job.error).toBeUndefined();
    expect(c.top.backing?.node).toBe(c.base);
    expect(storedBackingName(c.top)).toBe('base-name.qcow2');
    expect(Buffer.from(await readAll(c, c.top)).equals(c.expected)).toBe(true);
    const baseView = await readAll(c, c.base);
    expect(Buffer.from(baseView.subarray(0, 2 * MiB)).equals(Buffer.from(c.expected.subarray(0, 2 * MiB)))).toBe(true);
    expect(c.events.find(([e]) => e === 'BLOCK_JOB_COMPLETED')![1]).toMatchObject({ type: 'commit', len: SIZE, offset: SIZE });
  });

  it('on-error report fails the job and leaves the chain', async () => {
    const c = await chain();
    failing.failReads = 1;
    const job = await startCommit(c, { jobId: 'c', top: c.mid, base: c.base });
    await job.whenFinished();
    failing.failReads = 0;
    expect(job.error).toBe('Input/output error');
    expect(statuses(c)).toEqual(['created', 'running', 'aborting', 'concluded', 'null']);
    expect(c.top.backing?.node).toBe(c.mid);
  });
});

describe('block-stream and block-commit arguments', () => {
  async function qmp(c: Chain, name: string, args: Record<string, unknown>) {
    const cmd = streamCommitCommands.find((x) => x.name === name)!;
    return cmd.run(c, cmd.args.parse(args));
  }

  it("refuses what QEMU refuses, with QEMU's texts", async () => {
    const c = await chain();
    const stream: Array<[Record<string, unknown>, string]> = [
      [{ device: 'nope' }, "Cannot find device='nope' nor node-name='nope'"],
      [{ 'base-node': 'top' }, "Node 'top' is not a backing image of 'top'"],
      [{ base: 'nothere' }, "Can't find 'nothere' in the backing chain"],
      [{ base: 'x', 'base-node': 'base' }, "'base' and 'base-node' cannot be specified at the same time"],
      [{ bottom: 'mid', 'base-node': 'base' }, "'bottom' and 'base-node' cannot be specified at the same time"],
      [{ 'backing-file': 'zz' }, 'backing file specified, but streaming the entire chain'],
      [{ 'base-node': 'zz' }, "Cannot find device='' nor node-name='zz'"],
      [{ bottom: 'zz' }, "Cannot find device='' nor node-name='zz'"],
    ];
    for (const [args, message] of stream) await expect(qmp(c, 'block-stream', { 'job-id': 's', device: 'top', ...args })).rejects.toThrow(message);
    const commit: Array<[Record<string, unknown>, string]> = [
      [{ device: 'nope' }, "Device 'nope' not found"],
      [{ top: 'nothere' }, 'Top image file nothere not found'],
      [{ base: 'nothere' }, "Can't find 'nothere' in the backing chain"],
      [{ 'top-node': 'mid', 'base-node': 'mid' }, 'cannot commit an image into itself'],
      [{ 'top-node': 'base', 'base-node': 'mid' }, "'mid' is not in this backing file chain"],
      [{ top: 'x', 'top-node': 'mid' }, "'top-node' and 'top' are mutually exclusive"],
      [{ base: 'x', 'base-node': 'base' }, "'base-node' and 'base' are mutually exclusive"],
      [{ device: 'base' }, 'Need a root block node'],
      [{ 'top-node': 'zz' }, "Cannot find device='' nor node-name='zz'"],
      [{ 'base-node': 'zz' }, "Cannot find device='' nor node-name='zz'"],
      [{ 'backing-file': 'q' }, "'backing-file' specified, but 'top' is the active layer"],
    ];
    for (const [args, message] of commit) await expect(qmp(c, 'block-commit', { 'job-id': 'c', device: 'top', ...args })).rejects.toThrow(message);
    await expect(qmp(c, 'block-stream', { device: 'top' })).rejects.toThrow("Invalid job ID ''");
    await expect(qmp(c, 'block-commit', { 'job-id': 'c', device: 'top', 'top-node': 'mid', speed: -1 })).rejects.toThrow(
      "Parameter 'speed' expects a non-negative value",
    );
    expect(statuses(c)).toEqual(['created', 'null']);
  });

  it('block-stream with bottom streams down to and including bottom', async () => {
    const c = await chain();
    await qmp(c, 'block-stream', { 'job-id': 's', device: 'top', bottom: 'mid' });
    await c.jobs.get('s').whenFinished();
    expect(c.top.backing?.node).toBe(c.base);
    expect(Buffer.from(await readAll(c, c.top)).equals(c.expected)).toBe(true);
  });

  it('block-commit of the active layer is an active commit (READY, then job-complete)', async () => {
    const c = await chain();
    await qmp(c, 'block-commit', { 'job-id': 'a', device: 'top' });
    const job = c.jobs.get('a');
    for (let i = 0; i < 400 && job.status !== 'ready'; i++) await new Promise((r) => setTimeout(r, 5));
    expect(job.status).toBe('ready');
    expect(job.type).toBe('commit');
    job.complete();
    await job.whenFinished();
    expect(job.error).toBeUndefined();
    expect(Buffer.from(await readAll(c, c.base)).equals(c.expected)).toBe(true);
  });
});
