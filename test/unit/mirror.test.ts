/*
 * The mirror job on RAM nodes: sync modes, READY and complete (the
 * source's users move to the target), cancel before and after READY,
 * pause/resume, the error policies, the speed limit, write-blocking mode
 * and its runtime switch, and a live mirror with an NBD client writing
 * through an export for the whole job.
 */
import path from 'node:path';
import { describe, expect, it } from 'vitest';
import { BlockBackend } from '../../block/backend.js';
import { BlockError } from '../../block/errors.js';
import type { BlockNode } from '../../block/node.js';
import { startMirror, type MirrorOptions } from '../../jobs/mirror.js';
import { NbdServer } from '../../nbd/server.js';
import { NbdClient } from '../../nbd/client.js';
import { memOf, pattern } from '../helpers/mem-driver.js';
import { scratchDir } from '../helpers/tmp.js';
import { COMPLETED_SEQUENCE, finished, jobWorld, type JobWorld } from '../helpers/mirror-setup.js';

const KiB = 1024;
const MiB = 1024 * KiB;
const dir = scratchDir('qbt-mirror-');

async function world(sizeBytes = 4 * MiB) {
  const w = jobWorld();
  const src = await w.mem('src', sizeBytes);
  const tgt = await w.mem('tgt', sizeBytes);
  const blk = new BlockBackend(w.graph, src, { name: 'guest', writable: true });
  // Some data: 1 MiB at 0, 64 KiB at 3 MiB.
  await blk.pwrite(0, pattern(MiB, 1));
  await blk.pwrite(3 * MiB, pattern(64 * KiB, 2));
  return { w, src, tgt, blk };
}

function mirror(w: JobWorld, src: BlockNode, tgt: BlockNode, opts: Partial<MirrorOptions> = {}) {
  return startMirror(w, { jobId: 'job0', source: src, target: tgt, sync: 'full', ...opts });
}

const same = (a: BlockNode, b: BlockNode) => Buffer.from(memOf(a).data).equals(Buffer.from(memOf(b).data));

describe('mirror', () => {
  it('copies, becomes READY, and on complete moves the users onto the target', async () => {
    const { w, src, tgt, blk } = await world();
    const job = await mirror(w, src, tgt);
    expect(blk.node.driver.name).toBe('mirror_top');
    await w.waitEvent('BLOCK_JOB_READY');
    job.complete();
    await finished(job);
    expect(w.sequence()).toEqual(COMPLETED_SEQUENCE);
    expect(same(src, tgt)).toBe(true);
    expect(blk.node).toBe(tgt);
    expect(w.graph.nodes.has('src')).toBe(true);
    expect([...w.graph.nodes.values()].some((n) => n.driver.name === 'mirror_top')).toBe(false);
    const ready = w.events.find((e) => e.event === 'BLOCK_JOB_READY')!.data;
    expect(ready).toMatchObject({ type: 'mirror', device: 'job0', speed: 0 });
    expect(ready.len).toBe(ready.offset);
  });

  it('copies only what is allocated: zero areas of a fresh target stay untouched', async () => {
    const { w, src, tgt } = await world();
    const job = await mirror(w, src, tgt);
    await w.waitEvent('BLOCK_JOB_READY');
    job.complete();
    await finished(job);
    const writes = memOf(tgt).log.filter((c) => c.op === 'write' || c.op === 'write-zeroes');
    const written = writes.reduce((sum, c) => sum + c.bytes, 0);
    expect(written).toBe(MiB + 64 * KiB);
  });

  it('sync none copies only writes made during the job', async () => {
    const { w, src, tgt, blk } = await world();
    const job = await mirror(w, src, tgt, { sync: 'none' });
    await w.waitEvent('BLOCK_JOB_READY');
    await blk.pwrite(2 * MiB, pattern(128 * KiB, 3));
    job.complete();
    await finished(job);
    const t = memOf(tgt).data;
    expect(Buffer.from(t.subarray(2 * MiB, 2 * MiB + 128 * KiB)).equals(Buffer.from(pattern(128 * KiB, 3)))).toBe(true);
    expect(t.subarray(0, MiB).every((b) => b === 0)).toBe(true);
  });

  it('cancel before READY aborts: users stay on the source, no pivot, CANCELLED', async () => {
    const { w, src, tgt, blk } = await world();
    const job = await mirror(w, src, tgt, { speed: 256 * KiB });
    await w.waitEvent('JOB_STATUS_CHANGE', 'running');
    job.cancel(false);
    await finished(job);
    expect(w.sequence()).toEqual(['created', 'running', 'aborting', 'BLOCK_JOB_CANCELLED', 'concluded', 'null']);
    expect(blk.node).toBe(src);
    expect(src.parents.map((e) => e.parent)).toEqual([blk]);
  });

  it('cancel after READY finishes cleanly without a pivot: a point-in-time copy, COMPLETED', async () => {
    const { w, src, tgt, blk } = await world();
    const job = await mirror(w, src, tgt);
    await w.waitEvent('BLOCK_JOB_READY');
    await blk.pwrite(MiB, pattern(64 * KiB, 4));
    job.cancel(false);
    await finished(job);
    expect(w.sequence()).toEqual(COMPLETED_SEQUENCE);
    expect(blk.node).toBe(src);
    expect(same(src, tgt)).toBe(true);
  });

  it('pause and resume: paused, running, then READY', async () => {
    const { w, src, tgt } = await world();
    const job = await mirror(w, src, tgt, { speed: 1 * MiB });
    await w.waitEvent('JOB_STATUS_CHANGE', 'running');
    job.pause();
    await w.waitEvent('JOB_STATUS_CHANGE', 'paused');
    const progress = job.currentProgress;
    await new Promise((r) => setTimeout(r, 150));
    expect(job.currentProgress - progress).toBeLessThanOrEqual(MiB);
    job.resume();
    job.setSpeed(0);
    await w.waitEvent('BLOCK_JOB_READY');
    job.complete();
    await finished(job);
    expect(w.sequence()).toEqual(['created', 'running', 'paused', 'running', ...COMPLETED_SEQUENCE.slice(2)]);
  });

  it('refuses bad granularity and buf-size with QEMU texts', async () => {
    const { w, src, tgt } = await world();
    await expect(mirror(w, src, tgt, { granularity: 256 })).rejects.toThrow("Parameter 'granularity' expects a value in range [512B, 64MB]");
    await expect(mirror(w, src, tgt, { granularity: 3 * 4096 })).rejects.toThrow("Parameter 'granularity' expects a power of 2");
    await expect(mirror(w, src, tgt, { bufSize: -1 })).rejects.toThrow("Invalid parameter 'buf-size'");
    await expect(mirror(w, src, src)).rejects.toThrow("Can't mirror node into itself");
    expect(w.jobs.list()).toEqual([]);
  });
});

describe('mirror op sizes (mirror_iteration)', () => {
  /** A 40 MiB source with 1 MiB of data at 0 and a target that gets the whole length dirty (zero_target, no unmap). */
  async function sparseWorld() {
    const w = jobWorld();
    const src = await w.mem('src', 40 * MiB);
    const tgt = await w.mem('tgt', 40 * MiB);
    const blk = new BlockBackend(w.graph, src, { name: 'guest', writable: true });
    await blk.pwrite(0, pattern(MiB, 1));
    return { w, src, tgt };
  }

  async function mirrorToEnd(w: JobWorld, src: BlockNode, tgt: BlockNode) {
    const job = await mirror(w, src, tgt, { zeroTarget: true });
    await w.waitEvent('BLOCK_JOB_READY');
    job.complete();
    await finished(job);
  }

  it('a run without data is one op of up to buf-size; data goes in ops of at most 1 MiB', async () => {
    const { w, src, tgt } = await sparseWorld();
    await mirrorToEnd(w, src, tgt);
    const log = memOf(tgt).log;
    const zeroes = log.filter((c) => c.op === 'write-zeroes').map((c) => c.bytes);
    expect(zeroes).toEqual([16 * MiB, 16 * MiB, 7 * MiB]);
    expect(log.filter((c) => c.op === 'write').every((c) => c.bytes <= MiB)).toBe(true);
    expect(same(src, tgt)).toBe(true);
  });

  it('data found inside an op sized as a zero run is copied through one buffer, a piece at a time', async () => {
    const { w, src, tgt } = await sparseWorld();
    // Once the op over [1 MiB, 17 MiB) was sized as zeroes, 2.5 MiB of data appear at 5 MiB
    // behind the dirty bitmap's back: the op's own block status sees them and copies them.
    const fresh = pattern(2.5 * MiB, 7);
    let statusAt1MiB = 0;
    memOf(src).beforeCall = (call) => {
      if (call.op !== 'block-status' || call.offset !== MiB || ++statusAt1MiB !== 2) return;
      memOf(src).data.set(fresh, 5 * MiB);
      memOf(src).allocated.fill(1, 5 * MiB, 7.5 * MiB);
    };
    await mirrorToEnd(w, src, tgt);
    const writes = memOf(tgt).log.filter((c) => c.op === 'write' && c.offset >= 5 * MiB);
    expect(writes.map((c) => [c.offset / MiB, c.bytes / MiB])).toEqual([[5, 1], [6, 1], [7, 0.5]]);
    expect(same(src, tgt)).toBe(true);
  });
});

describe('mirror error policies (failing target writes)', () => {
  async function failingTarget(failures: number) {
    const setup = await world();
    let left = failures;
    memOf(setup.tgt).beforeCall = (call) => {
      if (call.op === 'write' && left > 0) {
        left--;
        throw new BlockError('EIO');
      }
    };
    return setup;
  }

  it('report: the job fails with the error', async () => {
    const { w, src, tgt, blk } = await failingTarget(1000);
    const job = await mirror(w, src, tgt, { onTargetError: 'report' });
    await finished(job);
    const done = w.events.find((e) => e.event === 'BLOCK_JOB_COMPLETED')!;
    expect(done.data.error).toBe('Input/output error');
    expect(w.events.find((e) => e.event === 'BLOCK_JOB_ERROR')!.data).toEqual({ device: 'job0', operation: 'write', action: 'report' });
    expect(blk.node).toBe(src);
  });

  it('ignore: the range is retried and the job completes', async () => {
    const { w, src, tgt } = await failingTarget(3);
    const job = await mirror(w, src, tgt, { onTargetError: 'ignore' });
    await w.waitEvent('BLOCK_JOB_READY');
    job.complete();
    await finished(job);
    expect(w.events.filter((e) => e.event === 'BLOCK_JOB_ERROR').map((e) => e.data.action)).toEqual(['ignore', 'ignore', 'ignore']);
    expect(same(src, tgt)).toBe(true);
  });

  it('stop: the job pauses with BLOCK_JOB_ERROR, and completes after resume', async () => {
    const { w, src, tgt } = await failingTarget(1);
    const job = await mirror(w, src, tgt, { onTargetError: 'stop' });
    await w.waitEvent('BLOCK_JOB_ERROR');
    await w.waitEvent('JOB_STATUS_CHANGE', 'paused');
    expect(job.blockJobInfo()['io-status']).toBe('failed');
    job.resume();
    await w.waitEvent('BLOCK_JOB_READY');
    job.complete();
    await finished(job);
    expect(same(src, tgt)).toBe(true);
  });
});

describe('mirror speed', () => {
  it('keeps to the speed limit within 10%', async () => {
    const { w, src, tgt } = await world();
    const speed = MiB;
    const start = performance.now();
    const job = await mirror(w, src, tgt, { speed, granularity: 64 * KiB, bufSize: 256 * KiB });
    await w.waitEvent('BLOCK_JOB_READY');
    const seconds = (performance.now() - start) / 1000;
    const expected = (MiB + 64 * KiB) / speed;
    expect(Math.abs(seconds - expected) / expected).toBeLessThan(0.1);
    job.cancel(true);
    await finished(job);
  });
});

describe('mirror copy modes', () => {
  it('write-blocking: a guest write is on the target when it completes', async () => {
    const { w, src, tgt, blk } = await world();
    const job = await mirror(w, src, tgt, { copyMode: 'write-blocking' });
    await w.waitEvent('BLOCK_JOB_READY');
    await blk.pwrite(2 * MiB + 512, pattern(4096, 9));
    expect(Buffer.from(memOf(tgt).data.subarray(2 * MiB + 512, 2 * MiB + 512 + 4096)).equals(Buffer.from(pattern(4096, 9)))).toBe(true);
    job.complete();
    await finished(job);
    expect(same(src, tgt)).toBe(true);
  });

  it('block-job-change switches background to write-blocking and back', async () => {
    const { w, src, tgt, blk } = await world();
    const job = await mirror(w, src, tgt);
    await w.waitEvent('BLOCK_JOB_READY');
    // Paused (standby), the copy loop stands still: only write-blocking writes reach the target.
    job.pause();
    await w.waitEvent('JOB_STATUS_CHANGE', 'standby');
    job.change({ 'copy-mode': 'write-blocking' });
    job.change({ 'copy-mode': 'write-blocking' });
    await blk.pwrite(3 * MiB + 4096, pattern(4096, 5));
    expect(memOf(tgt).data[3 * MiB + 4096]).toBe(pattern(1, 5)[0]);
    job.change({ 'copy-mode': 'background' });
    await blk.pwrite(2 * MiB, pattern(4096, 6));
    expect(memOf(tgt).data[2 * MiB]).not.toBe(pattern(1, 6)[0]);
    expect(() => job.change({ 'copy-mode': 'sideways' })).toThrow("Invalid copy mode 'sideways'");
    job.resume();
    job.complete();
    await finished(job);
    expect(same(src, tgt)).toBe(true);
  });
});

describe('live mirror through an NBD export', () => {
  for (const copyMode of ['background', 'write-blocking'] as const) {
    it(`loses no write across the pivot (${copyMode})`, async () => {
      const size = 8 * MiB;
      const w = jobWorld();
      const src = await w.mem('src', size);
      const tgt = await w.mem('tgt', size);
      const server = new NbdServer();
      const exp = server.createExport(w.graph, src, { name: 'disk', writable: true });
      const socket = path.join(dir, `${copyMode}.sock`);
      await server.listen({ type: 'unix', path: socket });
      const client = await NbdClient.connect({ address: { type: 'unix', path: socket }, exportName: 'disk' });
      const model = new Uint8Array(size);
      let stop = false;
      let writes = 0;
      const writer = (async () => {
        for (let seq = 1; !stop && seq < 100_000; seq++) {
          const off = Math.floor(Math.random() * (size / 4096 - 16)) * 4096 + (seq % 7) * 512;
          const data = pattern(4096 * (1 + (seq % 4)), seq);
          await client.write(off, data);
          model.set(data, off);
          writes++;
        }
      })();
      try {
        await new Promise((r) => setTimeout(r, 30));
        const job = await startMirror(w, { jobId: 'live', source: src, target: tgt, sync: 'full', copyMode });
        await w.waitEvent('BLOCK_JOB_READY');
        await new Promise((r) => setTimeout(r, 100));
        job.complete();
        await finished(job);
        expect(exp.backend.node).toBe(tgt);
        await new Promise((r) => setTimeout(r, 50));
        stop = true;
        await writer;
        const back = new Uint8Array(4096);
        await client.read(0, back);
      } finally {
        stop = true;
        await writer.catch(() => undefined);
        await client.disconnect();
        await server.close();
      }
      expect(writes).toBeGreaterThan(50);
      expect(Buffer.from(memOf(tgt).data).equals(Buffer.from(model))).toBe(true);
    });
  }
});
