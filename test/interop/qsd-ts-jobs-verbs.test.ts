/*
 * Job verbs over QMP, the same script against qemu-storage-daemon 7.2 and
 * qemu-storage-daemon-ts (fresh images per daemon, paths as $DIR):
 *
 *   - a mirror cancelled after READY with block-job-cancel (no force)
 *     ends with BLOCK_JOB_COMPLETED and leaves a consistent copy (qemu-img
 *     compare with the source after quit); one cancelled with job-cancel
 *     ends with BLOCK_JOB_CANCELLED;
 *   - a speed-limited mirror paused and resumed with job-pause/job-resume
 *     and block-job-pause/block-job-resume: the paused/running statuses,
 *     query-block-jobs and query-jobs while paused (progress numbers, which
 *     depend on timing, shown as a marker), block-job-set-speed;
 *   - the verbs' refusals, text for text: completing a job that is not
 *     ready and a stream, dismissing or finalizing a running job, unknown
 *     job ids for job-* and block-job-*, a duplicate and an invalid job id,
 *     a negative speed, resuming a job that is not paused;
 *   - drained sections of nodes running jobs use, each a paused/running
 *     (standby/ready when READY) pair of the job as in QEMU: transactions
 *     (the graph drained once, each backup's source until the end, its new
 *     job started inside), a job paused by the user (no pair), the exported
 *     node when an export goes (block-export-del, nbd-server-stop: two),
 *     a mirror's start and pivot under a node another job uses.
 *
 * Daemons listen on unix sockets in scratch directories and are stopped by
 * PID after each test. Build first (npm run build): the tests run dist/.
 */
import { afterEach, describe, expect, it } from 'vitest';
import { missingPeers } from '../helpers/peers.js';
import { expectSame, hideProgress, IDENTICAL, pairRunner, stableJobs } from '../helpers/qsd-compare.js';
import { compareImages, createImage, qemuIo, type QsdSession, stopAllSessions } from '../helpers/qsd-script.js';
import { scratchDir } from '../helpers/tmp.js';

const root = scratchDir('qbt-qsd-verbs-');
afterEach(stopAllSessions);
const both = pairRunner(root);

/** Speed of the throttled jobs, bytes/s: 8 MiB of data takes ~8 s, far longer than the script. */
const SLOW_BPS = 1024 * 1024;
/**
 * Mirror buffer of the throttled mirror: QEMU copies up to buf-size per
 * iteration before the rate limit makes it sleep, so with the default
 * (16 MiB) the whole source goes in one burst and the job is READY at once.
 */
const BUF_BYTES = 256 * 1024;
const UNKNOWN = 'nosuch';

/** A listing of jobs with progress numbers hidden and busy dropped. */
const listing = (v: unknown) => hideProgress(stableJobs(v));

async function images(s: QsdSession): Promise<void> {
  await createImage(s.dir, 'src.qcow2', '16M');
  await qemuIo(s.dir, 'src.qcow2', 'write -P 0x61 0 6M', 'write -P 0x62 10M 2M');
  for (const t of ['t1', 't2', 't3', 't4']) await createImage(s.dir, `${t}.qcow2`, '16M');
  await createImage(s.dir, 'base.qcow2', '16M');
  await qemuIo(s.dir, 'base.qcow2', 'write -P 0x71 0 8M');
  await createImage(s.dir, 'top.qcow2', '16M', { backing: 'base.qcow2' });
  await s.ok('blockdev-add', { driver: 'qcow2', 'node-name': 'src', file: s.fileRef('src.qcow2') });
  for (const t of ['t1', 't2', 't3', 't4']) await s.ok('blockdev-add', { driver: 'qcow2', 'node-name': t, file: s.fileRef(`${t}.qcow2`) });
  await s.ok('blockdev-add', { driver: 'qcow2', 'node-name': 'base', file: s.fileRef('base.qcow2') });
  await s.ok('blockdev-add', { driver: 'qcow2', 'node-name': 'top', backing: 'base', file: s.fileRef('top.qcow2') });
}

/** READY, then block-job-cancel (no force) and job-cancel. */
async function cancelScript(s: QsdSession) {
  await images(s);
  for (const [id, target, verb, args, end] of [
    ['m1', 't1', 'block-job-cancel', { device: 'm1' }, 'BLOCK_JOB_COMPLETED'],
    ['m2', 't2', 'job-cancel', { id: 'm2' }, 'BLOCK_JOB_CANCELLED'],
  ] as const) {
    await s.exec('blockdev-mirror', { 'job-id': id, device: 'src', target, sync: 'full' });
    await s.waitEvent('BLOCK_JOB_READY', (d) => d.device === id);
    await s.exec(verb, args);
    await s.waitEvent(end, (d) => d.device === id);
    await s.waitNoJobs();
  }
  return finish(s, ['m1', 'm2'], 't1.qcow2');
}

/** After the jobs are gone: quit, then the outcomes, the jobs' events and qemu-img compare of src with `copy`. */
async function finish(s: QsdSession, ids: string[], copy: string) {
  await s.waitNoJobs();
  expect(await s.quit()).toBe(0);
  return {
    outcomes: s.outcomes,
    events: ids.map((id) => s.jobEvents(id, ['len', 'offset'])),
    copy: await compareImages(s.dir, 'src.qcow2', 'qcow2', copy, 'qcow2'),
  };
}

/** The refusals of a running (not ready) speed-limited mirror and stream, and of unknown ids. */
async function refusals(s: QsdSession): Promise<void> {
  for (const verb of ['job-complete', 'job-dismiss', 'job-finalize', 'job-resume']) await s.exec(verb, { id: 'm3' });
  for (const verb of ['block-job-complete', 'block-job-resume']) await s.exec(verb, { device: 'm3' });
  for (const verb of ['job-pause', 'job-resume', 'job-cancel', 'job-complete', 'job-dismiss', 'job-finalize']) await s.exec(verb, { id: UNKNOWN });
  for (const verb of ['block-job-pause', 'block-job-resume', 'block-job-cancel', 'block-job-complete']) await s.exec(verb, { device: UNKNOWN });
  await s.exec('block-job-set-speed', { device: UNKNOWN, speed: 0 });
  await s.exec('blockdev-mirror', { 'job-id': 'm3', device: 'top', target: 't4', sync: 'full' });
  for (const bad of ['1bad', 'a b', '#x', '']) await s.exec('blockdev-mirror', { 'job-id': bad, device: 'top', target: 't4', sync: 'full' });
  await s.exec('block-stream', { 'job-id': 'st', device: 'top', speed: SLOW_BPS });
  for (const verb of ['job-complete', 'job-dismiss']) await s.exec(verb, { id: 'st' });
  await s.exec('block-job-complete', { device: 'st' });
  await s.exec('blockdev-backup', { 'job-id': 'b9', device: 'src', target: 't4', sync: 'bitmap', bitmap: 'nob', 'bitmap-mode': 'on-success' });
  await s.exec('blockdev-backup', { 'job-id': 'b9', device: 'src', target: 't4', sync: 'bitmap' });
  await s.ok('block-job-set-speed', { device: 'st', speed: 0 });
  await s.waitEvent('BLOCK_JOB_COMPLETED', (d) => d.device === 'st');
}

/** Pause/resume of a speed-limited mirror, the refusals meanwhile, then full speed and complete. */
async function pauseScript(s: QsdSession) {
  await images(s);
  await s.exec('blockdev-mirror', { 'job-id': 'm3', device: 'src', target: 't3', sync: 'full', speed: SLOW_BPS, 'buf-size': BUF_BYTES });
  await s.exec('job-pause', { id: 'm3' });
  await s.waitStatus('m3', 'paused');
  await s.exec('query-block-jobs', undefined, listing);
  await s.exec('query-jobs', undefined, listing);
  await s.exec('job-pause', { id: 'm3' });
  await s.exec('job-resume', { id: 'm3' });
  await s.exec('job-resume', { id: 'm3' });
  await s.waitEvent('JOB_STATUS_CHANGE', (d) => d.id === 'm3' && d.status === 'running' && countStatus(s, 'm3', 'running') >= 2);
  await s.exec('block-job-pause', { device: 'm3' });
  await s.waitEvent('JOB_STATUS_CHANGE', (d) => d.id === 'm3' && d.status === 'paused' && countStatus(s, 'm3', 'paused') >= 2);
  await s.exec('query-block-jobs', undefined, listing);
  await s.exec('block-job-resume', { device: 'm3' });
  await s.waitEvent('JOB_STATUS_CHANGE', (d) => d.id === 'm3' && d.status === 'running' && countStatus(s, 'm3', 'running') >= 3);
  await s.exec('block-job-set-speed', { device: 'm3', speed: 2 * SLOW_BPS });
  await s.exec('query-block-jobs', undefined, listing);
  await refusals(s);
  await s.exec('block-job-set-speed', { device: 'm3', speed: 0 });
  await s.waitEvent('BLOCK_JOB_READY', (d) => d.device === 'm3');
  await s.exec('job-complete', { id: 'm3' });
  await s.waitEvent('BLOCK_JOB_COMPLETED', (d) => d.device === 'm3');
  return finish(s, ['m3', 'st'], 't3.qcow2');
}

/** Sources with 4 MiB of data (so throttled jobs last) and empty targets, all 16 MiB. */
async function drainImages(s: QsdSession, sources: string[], targets: string[]): Promise<void> {
  for (const n of sources) {
    await createImage(s.dir, `${n}.qcow2`, '16M');
    await qemuIo(s.dir, `${n}.qcow2`, 'write -P 0x5c 0 4M');
  }
  for (const n of targets) await createImage(s.dir, `${n}.qcow2`, '16M');
  for (const n of [...sources, ...targets]) await s.ok('blockdev-add', { driver: 'qcow2', 'node-name': n, file: s.fileRef(`${n}.qcow2`) });
}

const slowBackup = (id: string, device: string, target: string) => ({ type: 'blockdev-backup', data: { 'job-id': id, device, target, sync: 'full', speed: SLOW_BPS } });

/**
 * A throttled mirror m1 while: a transaction starts two throttled backups;
 * b1 is paused by the user and an empty transaction drains everything; an
 * export of m1's source and one of b1's source go (block-export-del,
 * nbd-server-stop);
 * m1 is READY and the graph is drained again. Then everything at full
 * speed to the end.
 */
async function drainScript(s: QsdSession) {
  await drainImages(s, ['a', 'b', 'c'], ['ta', 'tb', 'tc']);
  await s.exec('blockdev-mirror', { 'job-id': 'm1', device: 'a', target: 'ta', sync: 'full', speed: SLOW_BPS, 'buf-size': BUF_BYTES });
  await s.exec('transaction', { actions: [slowBackup('b1', 'b', 'tb'), slowBackup('b2', 'c', 'tc')] });
  await s.exec('job-pause', { id: 'b1' });
  await s.waitStatus('b1', 'paused');
  await s.exec('transaction', { actions: [] });
  await s.exec('job-resume', { id: 'b1' });
  await s.ok('nbd-server-start', { addr: { type: 'unix', data: { path: s.f('nbd.sock') } } });
  await s.exec('block-export-add', { type: 'nbd', id: 'e0', 'node-name': 'a' });
  await s.exec('block-export-del', { id: 'e0' });
  await s.waitEvent('BLOCK_EXPORT_DELETED', (d) => d.id === 'e0');
  await s.exec('block-export-add', { type: 'nbd', id: 'e1', 'node-name': 'b' });
  await s.exec('nbd-server-stop');
  await s.waitEvent('BLOCK_EXPORT_DELETED', (d) => d.id === 'e1');
  await s.exec('block-job-set-speed', { device: 'm1', speed: 0 });
  await s.waitEvent('BLOCK_JOB_READY', (d) => d.device === 'm1');
  await s.exec('transaction', { actions: [] });
  await s.exec('job-complete', { id: 'm1' });
  for (const id of ['b1', 'b2']) await s.exec('block-job-set-speed', { device: id, speed: 0 });
  for (const id of ['m1', 'b1', 'b2']) await s.waitEvent('BLOCK_JOB_COMPLETED', (d) => d.device === id);
  await s.waitNoJobs();
  expect(await s.quit()).toBe(0);
  return { outcomes: s.outcomes, events: ['m1', 'b1', 'b2'].map((id) => s.jobEvents(id, ['len', 'offset'])) };
}

/**
 * A throttled mirror m1 while a second mirror m2 starts (after one refused
 * for a source that is not a root node), gets READY and pivots to its
 * target: their drains reach no node m1 uses, so m1 shows no pause. Then m1
 * at full speed, complete.
 */
async function mirrorBesideScript(s: QsdSession) {
  await images(s);
  await s.exec('blockdev-mirror', { 'job-id': 'm1', device: 'src', target: 't1', sync: 'full', speed: SLOW_BPS, 'buf-size': BUF_BYTES });
  await s.exec('blockdev-mirror', { 'job-id': 'm2', device: 'base', target: 't2', sync: 'full' });
  await s.exec('blockdev-mirror', { 'job-id': 'm2', device: 'top', target: 't2', sync: 'full' });
  await s.waitEvent('BLOCK_JOB_READY', (d) => d.device === 'm2');
  await s.exec('job-complete', { id: 'm2' });
  await s.waitEvent('BLOCK_JOB_COMPLETED', (d) => d.device === 'm2');
  await s.exec('block-job-set-speed', { device: 'm1', speed: 0 });
  await s.waitEvent('BLOCK_JOB_READY', (d) => d.device === 'm1');
  await s.exec('job-complete', { id: 'm1' });
  await s.waitEvent('BLOCK_JOB_COMPLETED', (d) => d.device === 'm1');
  await s.waitNoJobs();
  expect(await s.quit()).toBe(0);
  return {
    outcomes: s.outcomes,
    events: ['m1', 'm2'].map((id) => s.jobEvents(id, ['len', 'offset'])),
    copy: await compareImages(s.dir, 'src.qcow2', 'qcow2', 't1.qcow2', 'qcow2'),
  };
}

/** A second job on a node a running stream uses, and a negative speed. */
async function busyScript(s: QsdSession) {
  await images(s);
  await s.exec('block-stream', { 'job-id': 'st', device: 'top', speed: SLOW_BPS });
  await s.exec('block-stream', { 'job-id': 'st2', device: 'top' });
  await s.exec('block-job-set-speed', { device: 'st', speed: -1 });
  await s.stopJobs();
  expect(await s.quit()).toBe(0);
  return { outcomes: s.outcomes };
}

function countStatus(s: QsdSession, id: string, status: string): number {
  return s.events().filter((e) => e.event === 'JOB_STATUS_CHANGE' && e.data.id === id && e.data.status === status).length;
}

describe.skipIf(missingPeers('qemu-storage-daemon', 'qemu-img', 'qemu-io'))('job verbs over QMP beside qemu-storage-daemon 7.2', () => {
  it('cancel after READY: block-job-cancel completes with a consistent copy, job-cancel cancels', async () => {
    const [theirs, ours] = await both('cancel', cancelScript);
    expect(theirs.copy).toEqual(IDENTICAL);
    expectSame(theirs, ours);
  }, 60_000);

  it('pause/resume, set-speed and the verbs refusals give the same statuses and texts', async () => {
    const [theirs, ours] = await both('pause', pauseScript);
    expect(theirs.copy).toEqual(IDENTICAL);
    const whilePaused = theirs.outcomes.find(([cmd]) => cmd.startsWith('query-block-jobs'))![1] as { return: Array<Record<string, unknown>> };
    expect(whilePaused.return[0]).toMatchObject({ device: 'm3', paused: true, status: 'paused', ready: false });
    expectSame(theirs, ours);
  }, 90_000);

  // QEMU pauses running jobs for every drained section of a node they use: each
  // of the two refused blockdev-backup transactions drains the whole graph
  // (bdrv_drain_all: m3 and st) and then its source (src: m3), so m3 shows six
  // paused/running pairs (two explicit), st two. Ours derives them from the same drains.
  it('pause/resume: the drain pauses as QEMU emits them', async () => {
    const [theirs, ours] = await both('pause', pauseScript);
    expect(ours.events).toEqual(theirs.events);
  }, 90_000);

  // m1: a pair for each transaction (bdrv_drain_all), two for the export of its
  // source going (blk_unref drains, then blk_remove_bs), standby/ready once READY;
  // b1/b2: created, running, paused, running (started inside their sources' drains),
  // a pair per later drain, none for b1 while the user has paused it.
  it('drained sections: transactions, a user-paused job, exports going, a READY job', async () => {
    const [theirs, ours] = await both('drain', drainScript);
    expect(theirs.events[0]).toContain('standby');
    expectSame(theirs, ours);
  }, 90_000);

  // A mirror's start drains its source (the filter goes in) and its pivot the source
  // and the target. QEMU only mirrors a root node (refused otherwise: "Need a root
  // block node") whose target no BlockBackend uses, and no other job can hold
  // either, so these drains pause no other job: m1 shows none, in both daemons.
  it('a mirror starting and pivoting beside a running mirror: no pause of it', async () => {
    const [theirs, ours] = await both('mirror-beside', mirrorBesideScript);
    expect(theirs.copy).toEqual(IDENTICAL);
    expectSame(theirs, ours);
  }, 90_000);

  // block-stream job-id=st2 device=top while stream 'st' runs on top: "Node 'top' is busy:
  // block device is in use by block job: stream"; block-job-set-speed speed=-1: "Parameter
  // 'speed' expects a non-negative value" — in both daemons.
  it('a second job on a busy node and a negative speed: refused as by QEMU', async () => {
    const [theirs, ours] = await both('busy', busyScript);
    expectSame(theirs, ours);
  }, 60_000);
});
