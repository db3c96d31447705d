/*
 * The backup job and its copy-before-write filter, on RAM nodes (test-mem):
 * point-in-time copies while a user writes through a backend on the source,
 * bitmap syncs and bitmap-mode outcomes, error policies, pause/resume,
 * cancel, sync=none fleecing, the QMP argument checks and `transaction`'s
 * all-or-nothing behaviour.
 */
import { describe, expect, it } from 'vitest';
import { BlockBackend } from '../../block/backend.js';
import { bitmapAdd } from '../../block/dirty-bitmap-ops.js';
import { findDirtyBitmap } from '../../block/dirty-bitmap.js';
import { BlockError } from '../../block/errors.js';
import type { BlockGraph } from '../../block/graph.js';
import type { OptionTree } from '../../block/keyval.js';
import type { BlockNode } from '../../block/node.js';
import { startBackup, type BackupOptions } from '../../jobs/backup.js';
import type { Job } from '../../jobs/job.js';
import { JobRegistry } from '../../jobs/registry.js';
import { backupCommands } from '../../qmp/commands-backup.js';
import { calls, memGraph, memOf, pattern } from '../helpers/mem-driver.js';

const KiB = 1024;
const MiB = 1024 * KiB;
const SIZE = 2 * MiB;
const CLUSTER = 64 * KiB;

interface Setup {
  graph: BlockGraph;
  jobs: JobRegistry;
  events: Array<[string, Record<string, unknown>]>;
  source: BlockNode;
  target: BlockNode;
  blk: BlockBackend;
}

async function setup(): Promise<Setup> {
  const graph = memGraph();
  const events: Array<[string, Record<string, unknown>]> = [];
  const jobs = new JobRegistry((name, data) => events.push([name, data]));
  const open = async (name: string) => {
    const node = await graph.openNode({ driver: 'test-mem', 'node-name': name, size: SIZE } as OptionTree);
    node.userOwned = true;
    return node;
  };
  const source = await open('src');
  const target = await open('tgt');
  const blk = new BlockBackend(graph, source, { name: 'guest', writable: true });
  for (let off = 0; off < SIZE; off += CLUSTER) await blk.pwrite(off, pattern(CLUSTER, off / CLUSTER + 1));
  return { graph, jobs, events, source, target, blk };
}

const data = (node: BlockNode) => Buffer.from(memOf(node).data);
const statuses = (s: Setup) => s.events.filter(([e]) => e === 'JOB_STATUS_CHANGE').map(([, d]) => d.status);
const names = (s: Setup) => s.events.map(([e]) => e).filter((e) => e !== 'JOB_STATUS_CHANGE');

function backup(s: Setup, extra: Partial<BackupOptions> = {}): Promise<Job> {
  return startBackup({ graph: s.graph, jobs: s.jobs }, { jobId: 'b', source: s.source, target: s.target, sync: 'full', ...extra });
}

describe('backup job', () => {
  it('full: the target is the source at job start although writes land during the job', async () => {
    const s = await setup();
    const before = data(s.source);
    const job = await backup(s, { speed: 4 * MiB });
    expect(s.graph.nodes.has('src')).toBe(true);
    expect(s.blk.node.driver.name).toBe('copy-before-write');
    const writes = [0, 5, 17, 31].map(async (cluster, i) => {
      await new Promise((r) => setTimeout(r, 20 * i));
      await s.blk.pwrite(cluster * CLUSTER + 100, pattern(3000, 900 + i));
    });
    await Promise.all(writes);
    await job.whenFinished();
    expect(job.error).toBeUndefined();
    expect(data(s.target).equals(before)).toBe(true);
    expect(data(s.source).equals(before)).toBe(false);
    expect(s.blk.node).toBe(s.source);
    expect([...s.graph.nodes.values()].some((n) => n.driver.name === 'copy-before-write')).toBe(false);
    expect(statuses(s)).toEqual(['created', 'running', 'waiting', 'pending', 'concluded', 'null']);
    expect(names(s)).toEqual(['BLOCK_JOB_COMPLETED']);
    expect(s.events.find(([e]) => e === 'BLOCK_JOB_COMPLETED')![1]).toMatchObject({ len: SIZE, offset: SIZE, type: 'backup', device: 'b' });
  });

  it('incremental: copies only the dirty clusters; on success the bitmap keeps only writes made during the job', async () => {
    const s = await setup();
    const bm = await bitmapAdd(s.source, { name: 'b0', granularityBytes: CLUSTER });
    await s.blk.pwrite(3 * CLUSTER, pattern(CLUSTER, 77));
    await s.blk.pwrite(9 * CLUSTER + 10, pattern(10, 78));
    const snapshot = data(s.source);
    const job = await backup(s, { sync: 'bitmap', bitmap: bm, bitmapMode: 'on-success', speed: 1 * MiB });
    expect(bm.busy).toBe(true);
    await s.blk.pwrite(20 * CLUSTER, pattern(100, 79));
    await job.whenFinished();
    expect(job.error).toBeUndefined();
    const t = data(s.target);
    for (let c = 0; c < SIZE / CLUSTER; c++) {
      const part = t.subarray(c * CLUSTER, (c + 1) * CLUSTER);
      if (c === 3 || c === 9) expect(part.equals(snapshot.subarray(c * CLUSTER, (c + 1) * CLUSTER))).toBe(true);
      else expect(part.every((b) => b === 0)).toBe(true);
    }
    expect(bm.busy).toBe(false);
    expect([...bm.dirtyExtents()]).toEqual([{ offset: 20 * CLUSTER, bytes: CLUSTER }]);
    expect(s.source.dirtyBitmaps).toEqual([bm]);
  });

  it('bitmap-mode never keeps every bit; always clears the copied bits even on failure', async () => {
    for (const mode of ['never', 'always'] as const) {
      const s = await setup();
      const bm = await bitmapAdd(s.source, { name: 'b0', granularityBytes: CLUSTER });
      await s.blk.pwrite(2 * CLUSTER, pattern(CLUSTER, 5));
      await s.blk.pwrite(12 * CLUSTER, pattern(CLUSTER, 6));
      // The second cluster's write to the target fails.
      memOf(s.target).beforeCall = async (call) => {
        if (call.op === 'write' && call.offset === 12 * CLUSTER) throw new BlockError('EIO');
      };
      const job = await backup(s, { sync: 'bitmap', bitmap: bm, bitmapMode: mode });
      await job.whenFinished();
      expect(job.error).toBe('Input/output error');
      const left = [...bm.dirtyExtents()].map((e) => e.offset / CLUSTER);
      expect(left).toEqual(mode === 'never' ? [2, 12] : [12]);
    }
  });

  it('on-target-error stop pauses the job; after resume it retries and completes', async () => {
    const s = await setup();
    let failures = 1;
    memOf(s.target).beforeCall = async (call) => {
      if (call.op === 'write' && failures > 0) {
        failures--;
        throw new BlockError('ENOSPC');
      }
    };
    const before = data(s.source);
    const job = await backup(s, { onTargetError: 'stop' });
    for (let i = 0; i < 100 && job.status !== 'paused'; i++) await new Promise((r) => setTimeout(r, 5));
    expect(job.status).toBe('paused');
    expect(job.blockJobInfo()['io-status']).toBe('nospace');
    expect(s.events.find(([e]) => e === 'BLOCK_JOB_ERROR')![1]).toEqual({ device: 'b', operation: 'write', action: 'stop' });
    job.resume();
    await job.whenFinished();
    expect(job.error).toBeUndefined();
    expect(data(s.target).equals(before)).toBe(true);
  });

  it('on-source-error report fails the job with a read error event', async () => {
    const s = await setup();
    memOf(s.source).beforeCall = async (call) => {
      if (call.op === 'read') throw new BlockError('EIO');
    };
    const job = await backup(s);
    await job.whenFinished();
    expect(s.events.find(([e]) => e === 'BLOCK_JOB_ERROR')![1]).toEqual({ device: 'b', operation: 'read', action: 'report' });
    expect(s.events.find(([e]) => e === 'BLOCK_JOB_COMPLETED')![1]).toMatchObject({ error: 'Input/output error' });
    expect(statuses(s)).toEqual(['created', 'running', 'aborting', 'concluded', 'null']);
    expect(s.blk.node).toBe(s.source);
  });

  it('pause and resume; cancel ends with BLOCK_JOB_CANCELLED and takes the filter out', async () => {
    const s = await setup();
    const job = await backup(s, { speed: 256 * KiB });
    job.pause();
    for (let i = 0; i < 100 && job.status !== 'paused'; i++) await new Promise((r) => setTimeout(r, 5));
    expect(job.status).toBe('paused');
    const at = job.currentProgress;
    await new Promise((r) => setTimeout(r, 50));
    expect(job.currentProgress).toBe(at);
    job.resume();
    job.cancel(true);
    await job.whenFinished();
    expect(names(s)).toEqual(['BLOCK_JOB_CANCELLED']);
    expect(s.blk.node).toBe(s.source);
    expect([...s.graph.nodes.keys()].sort()).toEqual(['src', 'tgt']);
  });

  it('sync=none (fleecing): only clusters written during the job reach the target', async () => {
    const s = await setup();
    const before = data(s.source);
    const job = await backup(s, { sync: 'none', filterNodeName: 'fleece' });
    expect(s.graph.nodes.get('fleece')?.driver.name).toBe('copy-before-write');
    await s.blk.pwrite(7 * CLUSTER + 5, pattern(10, 42));
    await s.blk.pwrite(7 * CLUSTER + 500, pattern(10, 43));
    const t = data(s.target);
    expect(t.subarray(7 * CLUSTER, 8 * CLUSTER).equals(before.subarray(7 * CLUSTER, 8 * CLUSTER))).toBe(true);
    expect(t.subarray(0, 7 * CLUSTER).every((b) => b === 0)).toBe(true);
    job.cancel(true);
    await job.whenFinished();
    expect(names(s)).toEqual(['BLOCK_JOB_CANCELLED']);
  });
});

describe('backup of zero areas (QEMU block-copy tasks)', () => {
  const SPARSE = 8 * MiB;

  /** A source of SPARSE bytes with data only in its first cluster, and an empty target. */
  async function sparseSetup(targetOpts: Record<string, unknown> = {}) {
    const graph = memGraph();
    const jobs = new JobRegistry(() => undefined);
    const open = async (name: string, extra: Record<string, unknown>) => {
      const node = await graph.openNode({ driver: 'test-mem', 'node-name': name, size: SPARSE, ...extra } as OptionTree);
      node.userOwned = true;
      return node;
    };
    const source = await open('src', {});
    const target = await open('tgt', targetOpts);
    await new BlockBackend(graph, source, { name: 'fill', writable: true }).pwrite(0, pattern(CLUSTER, 7));
    const run = (speed?: number) => startBackup({ graph, jobs }, { jobId: 'z', source, target, sync: 'full', ...(speed ? { speed } : {}) });
    const zeroWrites = () => calls(memOf(target).log, ['write-zeroes']);
    return { run, zeroWrites };
  }

  it('without a speed limit a zero run is one write-zeroes', async () => {
    const s = await sparseSetup();
    const job = await s.run();
    await job.whenFinished();
    expect(job.error).toBeUndefined();
    expect(s.zeroWrites()).toEqual([`write-zeroes ${CLUSTER}+${SPARSE - CLUSTER}`]);
  });

  it('with a speed limit zero runs go in 1 MiB chunks, each charged to the limit', async () => {
    const s = await sparseSetup();
    const job = await s.run(8 * MiB);
    const early = await new Promise<number>((r) => setTimeout(() => r(job.lenOffsetSpeed().offset), 150));
    await job.whenFinished();
    expect(job.error).toBeUndefined();
    // Paced like data: after 150 ms at 8 MiB/s about 1.2 MiB (plus the first chunks), far from all 8 MiB.
    expect(early).toBeLessThan(SPARSE / 2);
    // As QEMU's tasks: each chunk starts where the last one ended (after the data cluster).
    const chunks = Array.from({ length: SPARSE / MiB }, (_, i) => `write-zeroes ${CLUSTER + i * MiB}+${i < SPARSE / MiB - 1 ? MiB : MiB - CLUSTER}`);
    expect(s.zeroWrites()).toEqual(chunks);
  });

  it('chunks are capped by the nodes\' max transfer, aligned to the cluster', async () => {
    const s = await sparseSetup({ 'max-transfer': 3 * CLUSTER + 512 });
    const job = await s.run(1024 * MiB);
    await job.whenFinished();
    expect(s.zeroWrites().slice(0, 2)).toEqual([`write-zeroes ${CLUSTER}+${3 * CLUSTER}`, `write-zeroes ${4 * CLUSTER}+${3 * CLUSTER}`]);
  });
});

// ---------------------------------------------------------------- QMP

function command(name: string) {
  return backupCommands.find((c) => c.name === name)!;
}

async function qmp(s: Setup, name: string, args: Record<string, unknown>): Promise<unknown> {
  const c = command(name);
  return c.run({ graph: s.graph, jobs: s.jobs }, c.args.parse(args));
}

describe('blockdev-backup and transaction over QMP', () => {
  it("refuses bad arguments with QEMU's texts", async () => {
    const s = await setup();
    await bitmapAdd(s.source, { name: 'bm' });
    const cases: Array<[Record<string, unknown>, string]> = [
      [{ target: 'src', sync: 'full' }, 'Source and target cannot be the same'],
      [{ target: 'nope', sync: 'full' }, "Cannot find device='nope' nor node-name='nope'"],
      [{ sync: 'bitmap' }, "must provide a valid bitmap name for 'bitmap' sync mode"],
      [{ sync: 'incremental' }, "must provide a valid bitmap name for 'incremental' sync mode"],
      [{ sync: 'bitmap', bitmap: 'zz' }, "Bitmap 'zz' could not be found"],
      [{ sync: 'bitmap', bitmap: 'bm' }, 'Bitmap sync mode must be given when providing a bitmap'],
      [{ sync: 'incremental', bitmap: 'bm', 'bitmap-mode': 'always' }, "Bitmap sync mode must be 'on-success' when using sync mode 'incremental'"],
      [{ sync: 'full', 'bitmap-mode': 'always' }, 'Cannot specify bitmap sync mode without a bitmap'],
      [{ sync: 'full', bitmap: 'bm', 'bitmap-mode': 'never' }, "Bitmap sync mode 'never' has no meaningful effect when combined with sync mode 'full'"],
      [{ sync: 'none', bitmap: 'bm', 'bitmap-mode': 'always' }, "sync mode 'none' does not produce meaningful bitmap outputs"],
      [{ sync: 'full', compress: true }, 'Compression is not supported for this drive '],
    ];
    for (const [args, message] of cases) {
      await expect(qmp(s, 'blockdev-backup', { 'job-id': 'k', device: 'src', target: 'tgt', ...args })).rejects.toThrow(message);
    }
    await expect(qmp(s, 'blockdev-backup', { device: 'src', target: 'tgt', sync: 'full' })).rejects.toThrow("Invalid job ID ''");
    await expect(qmp(s, 'transaction', { actions: [{ type: 'bogus', data: {} }] })).rejects.toThrow("Parameter 'type' does not accept value 'bogus'");
    await expect(qmp(s, 'blockdev-backup', { 'job-id': 'k', device: 'src', target: 'tgt', sync: 'full', speed: -1 })).rejects.toThrow(
      "Parameter 'speed' expects a non-negative value",
    );
    expect(statuses(s)).toEqual(['created', 'null']);
    expect(s.blk.node).toBe(s.source);
  });

  it('transaction: a failing action rolls back the earlier ones', async () => {
    const s = await setup();
    await bitmapAdd(s.source, { name: 'old' });
    await s.blk.pwrite(0, pattern(10, 1));
    const actions = [
      { type: 'block-dirty-bitmap-add', data: { node: 'src', name: 'new' } },
      { type: 'block-dirty-bitmap-clear', data: { node: 'src', name: 'old' } },
      { type: 'block-dirty-bitmap-disable', data: { node: 'src', name: 'old' } },
      { type: 'blockdev-backup', data: { 'job-id': 'k', device: 'src', target: 'tgt', sync: 'full' } },
      { type: 'abort', data: {} },
    ];
    await expect(qmp(s, 'transaction', { actions })).rejects.toThrow('Transaction aborted using Abort action');
    expect(findDirtyBitmap(s.source, 'new')).toBeNull();
    const old = findDirtyBitmap(s.source, 'old')!;
    expect(old.dirtyBytes).toBeGreaterThan(0);
    expect(old.disabled).toBe(false);
    expect(s.blk.node).toBe(s.source);
    expect(s.jobs.list()).toEqual([]);
    expect(data(s.target).every((b) => b === 0)).toBe(true);
  });

  it('transaction: bitmap rotation and a backup start at one point in time', async () => {
    const s = await setup();
    await bitmapAdd(s.source, { name: 'b0', granularityBytes: CLUSTER });
    await s.blk.pwrite(4 * CLUSTER, pattern(10, 1));
    const actions = [
      { type: 'block-dirty-bitmap-add', data: { node: 'src', name: 'b1', granularity: CLUSTER } },
      { type: 'blockdev-backup', data: { 'job-id': 'k', device: 'src', target: 'tgt', sync: 'incremental', bitmap: 'b0' } },
    ];
    const before = data(s.source);
    await qmp(s, 'transaction', { actions });
    await s.blk.pwrite(6 * CLUSTER, pattern(10, 2));
    await s.jobs.get('k').whenFinished();
    expect(data(s.target).subarray(4 * CLUSTER, 5 * CLUSTER).equals(before.subarray(4 * CLUSTER, 5 * CLUSTER))).toBe(true);
    expect([...findDirtyBitmap(s.source, 'b1')!.dirtyExtents()]).toEqual([{ offset: 6 * CLUSTER, bytes: CLUSTER }]);
    expect([...findDirtyBitmap(s.source, 'b0')!.dirtyExtents()]).toEqual([{ offset: 6 * CLUSTER, bytes: CLUSTER }]);
  });
});
