/*
 * blockdev-backup beside qemu-storage-daemon 7.2: the same qcow2 chain
 * (base ← top, made by qemu-img and qemu-io) is backed up into a fresh
 * qcow2 target of the same size, once by our job (library level) and once
 * by the real daemon over QMP, with sync full and sync top (the top's
 * target then backs onto the same base). Both targets must read as the
 * source (qemu-img compare), be clean for qemu-img check, and map the same
 * (`qemu-img map --output=json`, host offsets dropped, runs merged).
 */
import fs from 'node:fs';
import path from 'node:path';
import { describe, expect, it } from 'vitest';
import type { MapEntry } from '../../block/map.js';
import { startBackup, type BackupSync } from '../../jobs/backup.js';
import { JobRegistry } from '../../jobs/registry.js';
import { testGraph } from '../helpers/graphs.js';
import { missingPeers } from '../helpers/peers.js';
import { startStorageDaemon } from '../helpers/qmp-client.js';
import { finishJobsAndQuit, sh } from '../helpers/qsd-jobs.js';
import { run } from '../helpers/run.js';
import { scratchDir } from '../helpers/tmp.js';

async function makeImages(dir: string, sync: BackupSync): Promise<void> {
  fs.mkdirSync(dir, { recursive: true });
  const io = (file: string, cmd: string) => sh('qemu-io', ['-f', 'qcow2', '-c', cmd, file], dir);
  await sh('qemu-img', ['create', '-q', '-f', 'qcow2', 'base.qcow2', '4M'], dir);
  await io('base.qcow2', 'write -P 1 0 1M');
  await sh('qemu-img', ['create', '-q', '-f', 'qcow2', '-b', 'base.qcow2', '-F', 'qcow2', 'top.qcow2'], dir);
  await io('top.qcow2', 'write -P 2 512k 1M');
  await io('top.qcow2', 'write -z 3M 64k');
  const backing = sync === 'top' ? ['-b', 'base.qcow2', '-F', 'qcow2'] : [];
  await sh('qemu-img', ['create', '-q', '-f', 'qcow2', ...backing, 'tgt.qcow2', '4M'], dir);
  await sh('qemu-img', ['convert', '-f', 'qcow2', '-O', 'raw', 'top.qcow2', 'ref.raw'], dir);
}

async function backupOurs(dir: string, sync: BackupSync): Promise<void> {
  const graph = testGraph();
  const jobs = new JobRegistry();
  const source = await graph.openImage(path.join(dir, 'top.qcow2'), { format: 'qcow2' });
  const target = await graph.openImage(path.join(dir, 'tgt.qcow2'), { format: 'qcow2', noBacking: true });
  source.userOwned = target.userOwned = true;
  const job = await startBackup({ graph, jobs }, { jobId: 'k', source, target, sync });
  await job.whenFinished();
  expect(job.error).toBeUndefined();
  await graph.closeAll();
}

async function backupQemu(dir: string, sync: BackupSync): Promise<void> {
  const qsd = await startStorageDaemon(dir, []);
  try {
    const file = (name: string) => ({ driver: 'file', filename: path.join(dir, name) });
    await qsd.qmp.execute('blockdev-add', { driver: 'qcow2', 'node-name': 'src', file: file('top.qcow2') });
    await qsd.qmp.execute('blockdev-add', { driver: 'qcow2', 'node-name': 'tgt', backing: null, file: file('tgt.qcow2') });
    await qsd.qmp.execute('blockdev-backup', { 'job-id': 'k', device: 'src', target: 'tgt', sync });
    await finishJobsAndQuit(qsd);
  } finally {
    await qsd.stop();
  }
}

async function observe(dir: string): Promise<string> {
  expect((await run('qemu-img', ['compare', '-f', 'raw', '-F', 'qcow2', 'ref.raw', 'tgt.qcow2'], { cwd: dir })).stdout).toBe('Images are identical.\n');
  expect((await run('qemu-img', ['check', '-q', 'tgt.qcow2'], { cwd: dir })).code).toBe(0);
  return JSON.stringify(mergedMap(await sh('qemu-img', ['map', '--output=json', 'tgt.qcow2'], dir)));
}

/**
 * The map without host offsets, adjacent entries of one kind merged: QEMU's
 * backup copies with parallel workers, so where clusters land in the
 * target file (and so where qemu-img map splits data) varies between runs.
 */
function mergedMap(json: string): MapEntry[] {
  const out: MapEntry[] = [];
  for (const { offset: _host, filename: _file, ...e } of JSON.parse(json) as MapEntry[]) {
    const last = out.at(-1);
    const same = last && last.depth === e.depth && last.present === e.present && last.zero === e.zero && last.data === e.data;
    if (same) last.length += e.length;
    else out.push(e);
  }
  return out;
}

describe.skipIf(missingPeers('qemu-img', 'qemu-io', 'qemu-storage-daemon'))('backup beside qemu-storage-daemon', () => {
  for (const sync of ['full', 'top'] as const) {
    it(`sync ${sync}`, async () => {
      const root = scratchDir('qbt-backup-');
      const ours = path.join(root, 'ours');
      const qemu = path.join(root, 'qemu');
      await makeImages(ours, sync);
      await makeImages(qemu, sync);
      await backupOurs(ours, sync);
      await backupQemu(qemu, sync);
      expect(await observe(ours)).toBe(await observe(qemu));
    }, 60_000);
  }
});
