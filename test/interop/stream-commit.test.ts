/*
 * Stream and intermediate commit jobs beside qemu-storage-daemon 7.2.
 *
 * The same three-layer qcow2 chain (base ← mid ← top, made by qemu-img and
 * qemu-io, with data, zeroes and a cluster written in two layers) is copied
 * twice: one copy goes through our job (library level, the chain opened as
 * qemu-img opens it), the other through the real daemon's block-stream or
 * block-commit over QMP (blockdev-add of each layer). Afterwards both sides
 * must read as the top did before (qemu-img compare against a raw
 * reference), be clean for qemu-img check, and print the same
 * `qemu-img info --backing-chain` (disk sizes and the scratch path
 * filtered) and the same `qemu-img map` (host offsets filtered).
 */
import fs from 'node:fs';
import path from 'node:path';
import { describe, expect, it } from 'vitest';
import type { BlockNode } from '../../block/node.js';
import { startCommit } from '../../jobs/commit.js';
import { JobRegistry } from '../../jobs/registry.js';
import { startStream } from '../../jobs/stream.js';
import { testGraph } from '../helpers/graphs.js';
import { missingPeers } from '../helpers/peers.js';
import { startStorageDaemon } from '../helpers/qmp-client.js';
import { finishJobsAndQuit, sh } from '../helpers/qsd-jobs.js';
import { run } from '../helpers/run.js';
import { scratchDir } from '../helpers/tmp.js';

const MiB = 1024 * 1024;
/** base (1 MiB of 0x01, a cluster of 0x0a at 3 MiB) ← mid (0x02 at 1 MiB, zeroes over 3 MiB) ← top (0x03 at 2 MiB). */
async function makeChain(dir: string): Promise<void> {
  fs.mkdirSync(dir, { recursive: true });
  const img = (args: string[]) => sh('qemu-img', args, dir);
  const io = (file: string, cmd: string) => sh('qemu-io', ['-f', 'qcow2', '-c', cmd, file], dir);
  await img(['create', '-q', '-f', 'qcow2', 'base.qcow2', '4M']);
  await io('base.qcow2', 'write -P 1 0 1M');
  await io('base.qcow2', 'write -P 10 3M 64k');
  await img(['create', '-q', '-f', 'qcow2', '-b', 'base.qcow2', '-F', 'qcow2', 'mid.qcow2']);
  await io('mid.qcow2', 'write -P 2 1M 1M');
  await io('mid.qcow2', 'write -z 3M 64k');
  await img(['create', '-q', '-f', 'qcow2', '-b', 'mid.qcow2', '-F', 'qcow2', 'top.qcow2']);
  await io('top.qcow2', 'write -P 3 2M 64k');
  await io('top.qcow2', 'write -P 4 1088k 4k');
  await img(['convert', '-f', 'qcow2', '-O', 'raw', 'top.qcow2', 'ref-top.raw']);
}

type Job = { kind: 'stream'; base?: 'base' | 'mid'; backingFile?: string } | { kind: 'commit'; backingFile?: string };

async function runOurs(dir: string, job: Job): Promise<void> {
  const graph = testGraph();
  const jobs = new JobRegistry();
  const top = await graph.openImage(path.join(dir, 'top.qcow2'), { format: 'qcow2' });
  top.userOwned = true;
  const byName = (suffix: string): BlockNode => [...graph.nodes.values()].find((n) => n.driver.name === 'qcow2' && n.filename.endsWith(suffix))!;
  const j =
    job.kind === 'stream'
      ? await startStream({ graph, jobs }, { jobId: 'j', device: top, base: job.base ? byName(`${job.base}.qcow2`) : null, backingFile: job.backingFile })
      : await startCommit({ graph, jobs }, { jobId: 'j', top: byName('mid.qcow2'), base: byName('base.qcow2'), backingFile: job.backingFile });
  await j.whenFinished();
  expect(j.error).toBeUndefined();
  await graph.closeAll();
}

async function runQemu(dir: string, job: Job): Promise<void> {
  const qsd = await startStorageDaemon(dir, []);
  try {
    const add = (name: string, backing?: string) =>
      qsd.qmp.execute('blockdev-add', { driver: 'qcow2', 'node-name': name, ...(backing ? { backing } : {}), file: { driver: 'file', filename: path.join(dir, `${name}.qcow2`) } });
    await add('base');
    await add('mid', 'base');
    await add('top', 'mid');
    const extra = job.backingFile ? { 'backing-file': job.backingFile } : {};
    if (job.kind === 'stream') await qsd.qmp.execute('block-stream', { 'job-id': 'j', device: 'top', ...(job.base ? { 'base-node': job.base } : {}), ...extra });
    else await qsd.qmp.execute('block-commit', { 'job-id': 'j', device: 'top', 'top-node': 'mid', 'base-node': 'base', ...extra });
    await finishJobsAndQuit(qsd);
  } finally {
    await qsd.stop();
  }
}

async function observe(dir: string): Promise<{ info: string; map: string }> {
  const compare = await run('qemu-img', ['compare', '-f', 'raw', '-F', 'qcow2', 'ref-top.raw', 'top.qcow2'], { cwd: dir });
  expect(compare.stdout).toBe('Images are identical.\n');
  for (const f of ['top.qcow2', 'base.qcow2']) expect((await run('qemu-img', ['check', '-q', f], { cwd: dir })).code).toBe(0);
  const info = (await sh('qemu-img', ['info', '--backing-chain', 'top.qcow2'], dir)).split(dir).join('$DIR').replace(/^disk size: .*$/gm, 'disk size: X');
  const map = (await sh('qemu-img', ['map', '--output=json', 'top.qcow2'], dir)).replace(/, "offset": \d+/g, '');
  return { info, map };
}

describe.skipIf(missingPeers('qemu-img', 'qemu-io', 'qemu-storage-daemon'))('stream and commit jobs beside qemu-storage-daemon', () => {
  const cases: Array<[string, Job]> = [
    ['stream the whole chain', { kind: 'stream' }],
    ['stream down to base', { kind: 'stream', base: 'base' }],
    ['stream down to base with backing-file', { kind: 'stream', base: 'base', backingFile: 'base.qcow2' }],
    ['commit mid into base', { kind: 'commit' }],
    ['commit mid into base with backing-file', { kind: 'commit', backingFile: 'base.qcow2' }],
  ];
  for (const [name, job] of cases) {
    it(name, async () => {
      const root = scratchDir('qbt-stream-');
      const ours = path.join(root, 'ours');
      const qemu = path.join(root, 'qemu');
      await makeChain(ours);
      await makeChain(qemu);
      await runOurs(ours, job);
      await runQemu(qemu, job);
      const a = await observe(ours);
      const b = await observe(qemu);
      expect(a.info).toBe(b.info);
      expect(a.map).toBe(b.map);
    }, 60_000);
  }

  // QEMU rewrites the header even with nothing to stream; its daemon would
  // write mid's json: name (mid was added with an explicit backing), so
  // only our side is checked: the name becomes mid's full path.
  it('stream with nothing to stream rewrites the backing name', async () => {
    const dir = path.join(scratchDir('qbt-stream-'), 'ours');
    await makeChain(dir);
    await runOurs(dir, { kind: 'stream', base: 'mid' });
    const { info } = await observe(dir);
    expect(info).toContain('backing file: $DIR/mid.qcow2\n');
  }, 60_000);
});
