/*
 * Mirror and active commit on qcow2 chains made by qemu-img / qemu-io,
 * checked with the real tools: sync full / top / none into qcow2 and raw
 * targets read as the source (qemu-img compare), targets are clean
 * (qemu-img check) and stay sparse (qemu-img map), a sparse 4 TiB source
 * costs its data, and an active commit of a three-layer chain leaves a
 * base that reads as the top did, with the user moved onto it.
 */
import fs from 'node:fs';
import path from 'node:path';
import { describe, expect, it } from 'vitest';
import { BlockBackend } from '../../block/backend.js';
import type { BlockNode } from '../../block/node.js';
import { startActiveCommit, startMirror, type MirrorSync } from '../../jobs/mirror.js';
import { testGraph } from '../helpers/graphs.js';
import { missingPeers } from '../helpers/peers.js';
import { run } from '../helpers/run.js';
import { scratchDir } from '../helpers/tmp.js';
import { COMPLETED_SEQUENCE, finished, jobWorld } from '../helpers/mirror-setup.js';

const MiB = 1024 * 1024;
const root = scratchDir('qbt-mirror-interop-');
let seq = 0;

async function sh(cmd: string, args: string[], cwd: string): Promise<string> {
  const r = await run(cmd, args, { cwd });
  if (r.code !== 0) throw new Error(`${cmd} ${args.join(' ')}: ${r.stdout}${r.stderr}`);
  return r.stdout;
}

/** base (0x01 at 0, 1 MiB; 0x0a at 3 MiB) ← mid (0x02 at 1 MiB; zeroes over 3 MiB) ← top (0x03 at 2 MiB, 0x04 at 7 MiB); 8 MiB. */
const CHAIN_SCRIPT = [
  'qemu-img create -q -f qcow2 base.qcow2 8M',
  "qemu-io -f qcow2 -c 'write -P 1 0 1M' -c 'write -P 10 3M 64k' base.qcow2",
  'qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 mid.qcow2',
  "qemu-io -f qcow2 -c 'write -P 2 1M 1M' -c 'write -z 3M 64k' mid.qcow2",
  'qemu-img create -q -f qcow2 -b mid.qcow2 -F qcow2 top.qcow2',
  "qemu-io -f qcow2 -c 'write -P 3 2M 64k' -c 'write -P 4 7M 4k' top.qcow2",
].join(' && ');

async function makeChain(): Promise<string> {
  const dir = path.join(root, `c${++seq}`);
  fs.mkdirSync(dir);
  await sh('bash', ['-c', CHAIN_SCRIPT], dir);
  return dir;
}

/** The chain, its content as raw (expected.raw), and a user writing to the top. */
async function chainInUse() {
  const dir = await makeChain();
  await sh('qemu-img', ['convert', '-O', 'raw', 'top.qcow2', 'expected.raw'], dir);
  const w = jobWorld(testGraph());
  const top = await w.graph.openImage(path.join(dir, 'top.qcow2'), { format: 'qcow2' });
  top.userOwned = true;
  const user = new BlockBackend(w.graph, top, { name: 'guest', writable: true });
  return { dir, w, top, user };
}

/** Bytes qemu-img map says hold data. */
async function mappedDataBytes(file: string, dir: string): Promise<number> {
  const map = JSON.parse(await sh('qemu-img', ['map', '--output=json', file], dir)) as Array<{ length: number; data: boolean; depth: number }>;
  return map.filter((e) => e.data && e.depth === 0).reduce((sum, e) => sum + e.length, 0);
}

/**
 * Mirrors top.qcow2 into `target`. A target whose backing file is the
 * source itself is opened without it (`"backing": null`, as drive-mirror
 * opens such a target): opening the source's file a second time would be
 * refused by the source's image locks, as it is in QEMU.
 */
async function mirrorFile(dir: string, sync: MirrorSync, target: string, format: string, opts: { backedBySource?: boolean } = {}) {
  const w = jobWorld(testGraph());
  const src = await w.graph.openImage(path.join(dir, 'top.qcow2'), { format: 'qcow2' });
  const tgt = await w.graph.openImage(path.join(dir, target), { format, options: opts.backedBySource ? { backing: null } : undefined });
  src.userOwned = tgt.userOwned = true;
  const user = new BlockBackend(w.graph, src, { name: 'guest', writable: true });
  const job = await startMirror(w, { jobId: 'm', source: src, target: tgt, sync });
  await w.waitEvent('BLOCK_JOB_READY');
  job.complete();
  await finished(job);
  expect(w.sequence()).toEqual(COMPLETED_SEQUENCE);
  expect(user.node).toBe(tgt);
  await user.close();
  await w.graph.closeAll();
}

describe.skipIf(missingPeers('qemu-img', 'qemu-io'))('mirror interop', () => {
  for (const [sync, format] of [
    ['full', 'qcow2'],
    ['full', 'raw'],
    ['top', 'qcow2'],
  ] as const) {
    it(`sync ${sync} into ${format}: identical, clean, sparse`, async () => {
      const dir = await makeChain();
      const target = `t.${format}`;
      const backing = sync === 'top' ? ['-b', 'mid.qcow2', '-F', 'qcow2'] : [];
      await sh('qemu-img', ['create', '-q', '-f', format, ...backing, target, '8M'], dir);
      await mirrorFile(dir, sync, target, format);
      const cmp = await run('qemu-img', ['compare', '-f', 'qcow2', '-F', format, 'top.qcow2', target], { cwd: dir });
      expect(cmp.stdout + cmp.stderr).toBe('Images are identical.\n');
      if (format === 'qcow2') expect((await run('qemu-img', ['check', target], { cwd: dir })).code).toBe(0);
      const data = await mappedDataBytes(target, dir);
      if (sync === 'top') expect(data).toBe(await mappedDataBytes('top.qcow2', dir));
      else expect(data).toBeLessThanOrEqual(4 * MiB);
    });
  }

  it('sync none into a qcow2 over the same backing: only new writes', async () => {
    const dir = await makeChain();
    await sh('qemu-img', ['create', '-q', '-f', 'qcow2', '-b', 'top.qcow2', '-F', 'qcow2', 't.qcow2'], dir);
    await mirrorFile(dir, 'none', 't.qcow2', 'qcow2', { backedBySource: true });
    const cmp = await run('qemu-img', ['compare', 'top.qcow2', 't.qcow2'], { cwd: dir });
    expect(cmp.stdout).toBe('Images are identical.\n');
    expect(await mappedDataBytes('t.qcow2', dir)).toBe(0);
  });

  it('a sparse 4 TiB source costs its data, not its size', async () => {
    const dir = path.join(root, 'huge');
    fs.mkdirSync(dir);
    await sh('qemu-img', ['create', '-q', '-f', 'qcow2', 'src.qcow2', '4T'], dir);
    await sh('qemu-io', ['-f', 'qcow2', '-c', 'write -P 7 1T 1M', '-c', 'write -P 8 3T 64k', 'src.qcow2'], dir);
    await sh('qemu-img', ['create', '-q', '-f', 'qcow2', 't.qcow2', '4T'], dir);
    const w = jobWorld(testGraph());
    const src = await w.graph.openImage(path.join(dir, 'src.qcow2'), { format: 'qcow2' });
    const tgt = await w.graph.openImage(path.join(dir, 't.qcow2'), { format: 'qcow2' });
    src.userOwned = tgt.userOwned = true;
    const start = performance.now();
    const job = await startMirror(w, { jobId: 'huge', source: src, target: tgt, sync: 'full' });
    await w.waitEvent('BLOCK_JOB_READY');
    job.complete();
    await finished(job);
    expect(performance.now() - start).toBeLessThan(5000);
    expect(job.totalProgress).toBe(MiB + 64 * 1024);
    await w.graph.closeAll();
    expect(await mappedDataBytes('t.qcow2', dir)).toBe(MiB + 64 * 1024);
    const cmp = await run('qemu-img', ['compare', 'src.qcow2', 't.qcow2'], { cwd: dir, timeoutMs: 120_000 });
    expect(cmp.stdout).toBe('Images are identical.\n');
  });

  it('active commit of a three-layer chain: the base reads as the top, the user moves onto it', async () => {
    const { dir, w, top, user } = await chainInUse();
    let base: BlockNode = top.cowChild!.node.cowChild!.node;
    const job = await startActiveCommit(w, { jobId: 'c', top, base });
    await w.waitEvent('BLOCK_JOB_READY');
    await user.pwrite(5 * MiB, new Uint8Array(4096).fill(0x55));
    await sh('qemu-io', ['-f', 'raw', '-c', 'write -P 0x55 5M 4k', 'expected.raw'], dir);
    job.complete();
    await finished(job);
    expect(w.sequence()).toEqual(COMPLETED_SEQUENCE);
    expect(w.events.find((e) => e.event === 'BLOCK_JOB_COMPLETED')!.data.type).toBe('commit');
    base = user.node;
    expect(base.filename).toBe(path.join(dir, 'base.qcow2'));
    expect(base.readOnly).toBe(false);
    await user.close();
    await w.graph.closeAll();
    const cmp = await run('qemu-img', ['compare', '-f', 'qcow2', '-F', 'raw', 'base.qcow2', 'expected.raw'], { cwd: dir });
    expect(cmp.stdout + cmp.stderr).toBe('Images are identical.\n');
    expect((await run('qemu-img', ['check', 'base.qcow2'], { cwd: dir })).code).toBe(0);
  });

  it('active commit below an overlay: the overlay now names the base in its header', async () => {
    const { dir, w, top, user } = await chainInUse();
    const mid = top.cowChild!.node;
    const job = await startActiveCommit(w, { jobId: 'c', top: mid, base: mid.cowChild!.node, backingFile: 'base.qcow2' });
    await w.waitEvent('BLOCK_JOB_READY');
    job.complete();
    await finished(job);
    expect(top.cowChild!.node.filename).toBe(path.join(dir, 'base.qcow2'));
    await user.close();
    await w.graph.closeAll();
    const info = JSON.parse(await sh('qemu-img', ['info', '--output=json', 'top.qcow2'], dir)) as Record<string, unknown>;
    expect(info['backing-filename']).toBe('base.qcow2');
    const cmp = await run('qemu-img', ['compare', '-F', 'raw', 'top.qcow2', 'expected.raw'], { cwd: dir });
    expect(cmp.stdout + cmp.stderr).toBe('Images are identical.\n');
    expect((await run('qemu-img', ['check', 'base.qcow2'], { cwd: dir })).code).toBe(0);
  });
});
