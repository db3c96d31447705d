/*
 * Live mirror over QMP, against qemu-storage-daemon 7.2 and
 * qemu-storage-daemon-ts alike: the source qcow2 is exported writable
 * (nbd-server-start + block-export-add), our NbdClient writes random
 * 64 KiB blocks through the export for the whole job and keeps a model of
 * the final content; blockdev-mirror sync=full to a blockdev-add'ed qcow2,
 * to a raw file, or to an NBD client node whose server is a SECOND daemon
 * exporting an empty qcow2 (live storage migration between daemons:
 * ours→ours, qemu→ours, ours→qemu, and qemu→qemu as the reference);
 * READY, job-complete, the writer goes on after BLOCK_JOB_COMPLETED (its
 * writes now land on the target through the same export) and then stops.
 * No write failed, the export now serves the target (query-block-exports),
 * the statuses are QEMU's, and qemu-img compare of a raw file of the model
 * against the target says identical; qemu-img check is clean.
 *
 * Then the speed limit: a mirror started with `speed` and changed with
 * block-job-set-speed progresses at the set rate within 10% on ours over a
 * ~1.5 s window each (qemu's rate is logged for information: it copies
 * buf-size bursts between sleeps).
 *
 * Daemons listen on unix sockets in scratch directories and are stopped by
 * PID after each test; every loop and wait is bounded. Build first
 * (npm run build): the tests run dist/.
 */
import { randomBytes } from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { NbdClient } from '../../nbd/client.js';
import { missingPeers } from '../helpers/peers.js';
import { compareImages, createImage, qemuIo, QsdSession, stopAllSessions, tool } from '../helpers/qsd-script.js';
import { scratchDir } from '../helpers/tmp.js';

const MiB = 1024 * 1024;
const SIZE_BYTES = 16 * MiB;
const BLOCK_BYTES = 64 * 1024;
/** Upper bound on writer iterations (it normally stops when told). */
const WRITES_MAX = 100_000;
/** How long the writer goes on after BLOCK_JOB_COMPLETED, ms. */
const AFTER_PIVOT_MS = 200;
const root = scratchDir('qbt-qsd-live-');
afterEach(stopAllSessions);
let seq = 0;

/** Writes random 64 KiB blocks at random 4 KiB-aligned offsets until stopped; mirrors them into `model`. */
function startWriter(client: NbdClient, model: Buffer) {
  let stop = false;
  let writes = 0;
  const done = (async () => {
    for (let i = 0; !stop && i < WRITES_MAX; i++) {
      const offset = Math.floor(Math.random() * ((SIZE_BYTES - BLOCK_BYTES) / 4096)) * 4096;
      const data = randomBytes(BLOCK_BYTES);
      await client.write(offset, data);
      data.copy(model, offset);
      writes++;
    }
  })();
  return {
    writesSoFar: () => writes,
    async stop(): Promise<number> {
      stop = true;
      await done;
      return writes;
    },
  };
}

type Daemon = 'ours' | 'qemu';
type Target = { kind: 'qcow2' } | { kind: 'raw' } | { kind: 'nbd'; remote: Daemon };

/** The target node `tgt` on `a`; for nbd, daemon B exporting an empty qcow2. Returns the file to compare and B. */
async function addTarget(a: QsdSession, target: Target): Promise<{ file: string; fmt: string; b?: QsdSession }> {
  if (target.kind !== 'nbd') {
    const file = a.f(`tgt.${target.kind}`);
    await createImage(a.dir, file, String(SIZE_BYTES), { fmt: target.kind });
    await a.ok('blockdev-add', { driver: target.kind, 'node-name': 'tgt', file: a.fileRef(path.basename(file)) });
    return { file, fmt: target.kind };
  }
  const b = await QsdSession.start(path.join(a.dir, 'b'), target.remote === 'ours');
  await createImage(b.dir, 'remote.qcow2', String(SIZE_BYTES));
  await b.ok('blockdev-add', { driver: 'qcow2', 'node-name': 'disk', file: b.fileRef('remote.qcow2') });
  await b.ok('nbd-server-start', { addr: { type: 'unix', data: { path: b.f('nbd.sock') } } });
  await b.ok('block-export-add', { type: 'nbd', id: 'in', 'node-name': 'disk', name: 'tgt', writable: true });
  await a.ok('blockdev-add', { driver: 'nbd', 'node-name': 'tgt', server: { type: 'unix', path: b.f('nbd.sock') }, export: 'tgt' });
  return { file: b.f('remote.qcow2'), fmt: 'qcow2', b };
}

async function liveMirror(source: Daemon, target: Target) {
  const a = await QsdSession.start(path.join(root, `l${++seq}-${source}-${target.kind}`), source === 'ours');
  await createImage(a.dir, 'src.qcow2', String(SIZE_BYTES));
  await qemuIo(a.dir, 'src.qcow2', 'write -P 0x11 0 3M', 'write -P 0x22 9M 1M');
  const model = Buffer.alloc(SIZE_BYTES);
  model.fill(0x11, 0, 3 * MiB).fill(0x22, 9 * MiB, 10 * MiB);
  await a.ok('blockdev-add', { driver: 'qcow2', 'node-name': 'src', file: a.fileRef('src.qcow2') });
  const tgt = await addTarget(a, target);
  await a.ok('nbd-server-start', { addr: { type: 'unix', data: { path: a.f('nbd.sock') } } });
  await a.ok('block-export-add', { type: 'nbd', id: 'e0', 'node-name': 'src', name: 'disk', writable: true });
  const client = await NbdClient.connect({ address: { type: 'unix', path: a.f('nbd.sock') }, exportName: 'disk' });
  const writer = startWriter(client, model);
  let writes: number;
  try {
    await new Promise((r) => setTimeout(r, 50));
    await a.ok('blockdev-mirror', { 'job-id': 'm0', device: 'src', target: 'tgt', sync: 'full' });
    await a.waitEvent('BLOCK_JOB_READY', (d) => d.device === 'm0');
    await new Promise((r) => setTimeout(r, 100));
    await a.ok('job-complete', { id: 'm0' });
    await a.waitEvent('BLOCK_JOB_COMPLETED', (d) => d.device === 'm0');
    const atPivot = writer.writesSoFar();
    await new Promise((r) => setTimeout(r, AFTER_PIVOT_MS));
    writes = await writer.stop();
    expect(writes, 'writes after the pivot').toBeGreaterThan(atPivot);
    await client.flush();
  } finally {
    await writer.stop().catch(() => 0);
    await client.disconnect().catch(() => undefined);
  }
  await a.waitNoJobs();
  const exports = await a.ok('query-block-exports');
  await a.ok('block-export-del', { id: 'e0' });
  await a.waitEvent('BLOCK_EXPORT_DELETED');
  expect(await a.quit()).toBe(0);
  if (tgt.b) expect(await tgt.b.quit()).toBe(0);
  fs.writeFileSync(a.f('model.raw'), model);
  return {
    writes,
    statuses: a.jobEvents('m0').map((e) => (typeof e === 'string' ? e : (e as { event: string }).event)),
    exports,
    compare: await compareImages(a.dir, a.f('model.raw'), 'raw', tgt.file, tgt.fmt),
    check: tgt.fmt === 'qcow2' ? await tool(a.dir, 'qemu-img', ['check', '-q', tgt.file]) : { code: 0, out: '' },
  };
}

/** QEMU 7.2's statuses and events for a mirror that completes (peers/out/06-qmp-transcript.jsonl). */
const COMPLETED = ['created', 'running', 'ready', 'BLOCK_JOB_READY', 'waiting', 'pending', 'BLOCK_JOB_COMPLETED', 'concluded', 'null'];

type LiveResult = Awaited<ReturnType<typeof liveMirror>>;
const liveResults = new Map<string, LiveResult>();

/** Runs (once per label) the live mirror; later cases look at the same run. */
async function liveOnce(source: Daemon, target: Target): Promise<LiveResult> {
  const label = `${source}-${JSON.stringify(target)}`;
  if (!liveResults.has(label)) liveResults.set(label, await liveMirror(source, target));
  return liveResults.get(label)!;
}

/** query-block-exports after the pivot, as QEMU answers it: the export now on the target node. */
const EXPORT_ON_TARGET = [{ 'node-name': 'tgt', 'shutting-down': false, type: 'nbd', id: 'e0' }];

function expectLiveOk(r: LiveResult): void {
  expect(r.compare).toEqual({ code: 0, out: 'Images are identical.\n' });
  expect(r.check.code, r.check.out).toBe(0);
  expect(r.writes).toBeGreaterThan(20);
  expect(r.statuses).toEqual(COMPLETED);
  expect(r.exports).toEqual(EXPORT_ON_TARGET);
}

const SPEED_WINDOW_MS = 1500;
const SPEED_TOLERANCE = 0.1;

/** Offset progress per second of job `id` over SPEED_WINDOW_MS (query-block-jobs before and after). */
async function measureRate(s: QsdSession, id: string): Promise<number> {
  const offsetNow = async () => {
    const jobs = await s.daemon.qmp.execute<Array<{ device: string; offset: number }>>('query-block-jobs');
    return [jobs.find((j) => j.device === id)!.offset, performance.now()] as const;
  };
  const [o1, t1] = await offsetNow();
  await new Promise((r) => setTimeout(r, SPEED_WINDOW_MS));
  const [o2, t2] = await offsetNow();
  return ((o2 - o1) * 1000) / (t2 - t1);
}

/** Mirror of 48 MiB of data at 4 MiB/s, then set-speed 8 MiB/s: the two measured rates. */
async function speedScript(ours: boolean): Promise<number[]> {
  const s = await QsdSession.start(path.join(root, `speed-${ours ? 'ours' : 'qemu'}`), ours);
  await createImage(s.dir, 'src.qcow2', '64M');
  await qemuIo(s.dir, 'src.qcow2', 'write -P 0x33 0 48M');
  await createImage(s.dir, 'tgt.qcow2', '64M');
  await s.ok('blockdev-add', { driver: 'qcow2', 'node-name': 'src', file: s.fileRef('src.qcow2') });
  await s.ok('blockdev-add', { driver: 'qcow2', 'node-name': 'tgt', file: s.fileRef('tgt.qcow2') });
  await s.ok('blockdev-mirror', { 'job-id': 'm0', device: 'src', target: 'tgt', sync: 'full', speed: 4 * MiB });
  await new Promise((r) => setTimeout(r, 300));
  const slow = await measureRate(s, 'm0');
  await s.ok('block-job-set-speed', { device: 'm0', speed: 8 * MiB });
  await new Promise((r) => setTimeout(r, 300));
  const fast = await measureRate(s, 'm0');
  await s.stopJobs();
  expect(await s.quit()).toBe(0);
  return [slow, fast];
}

describe.skipIf(missingPeers('qemu-storage-daemon', 'qemu-img', 'qemu-io'))('live mirror over QMP beside qemu-storage-daemon 7.2', () => {
  for (const source of ['qemu', 'ours'] as const) {
    for (const kind of ['qcow2', 'raw'] as const) {
      it(`${source}: writer through the export, mirror to ${kind}, nothing lost across the pivot`, async () => {
        expectLiveOk(await liveOnce(source, { kind }));
      }, 90_000);
    }
  }


  const pairs: Array<[Daemon, Daemon]> = [['qemu', 'qemu'], ['ours', 'ours'], ['qemu', 'ours'], ['ours', 'qemu']];
  for (const [source, remote] of pairs) {
    it(`live storage migration ${source} → ${remote} (NBD export of a second daemon)`, async () => {
      expectLiveOk(await liveOnce(source, { kind: 'nbd', remote }));
    }, 90_000);
  }

  it('keeps the speed limit within 10% (speed at start, then block-job-set-speed)', async () => {
    const theirs = await speedScript(false);
    const ours = await speedScript(true);
    console.log(`mirror rate, MiB/s at 4 then 8 MiB/s: qemu ${theirs.map((r) => (r / MiB).toFixed(2)).join(', ')}; ours ${ours.map((r) => (r / MiB).toFixed(2)).join(', ')}`);
    expect(Math.abs(ours[0]! / (4 * MiB) - 1)).toBeLessThanOrEqual(SPEED_TOLERANCE);
    expect(Math.abs(ours[1]! / (8 * MiB) - 1)).toBeLessThanOrEqual(SPEED_TOLERANCE);
  }, 60_000);
});
