/*
 * Job error policies with errors injected by blkdebug, beside
 * qemu-storage-daemon 7.2: the same QMP scripts run against both daemons
 * (pairRunner) and give the same observable results.
 *
 *   - blockdev-mirror to a raw target whose file is a blkdebug node failing
 *     writes after raw's write_aio event: on-target-error report (errno 5
 *     at one sector: the job fails), ignore (once: the chunk is copied
 *     again), stop (once: the job pauses with io-status failed, then
 *     block-job-resume), enospc with errno 28 (pauses, io-status nospace)
 *     and with errno 5 (reports);
 *   - blockdev-backup from a qcow2 source whose file fails a read after
 *     qcow2's read_aio event: on-source-error report and stop + resume.
 *
 * Compared: every command's outcome (query-block-jobs while paused with
 * its io-status), the job's events (BLOCK_JOB_ERROR with operation and
 * action, JOB_STATUS_CHANGE statuses, COMPLETED with its error) without
 * progress numbers (how far a job got before the error depends on timing),
 * and for jobs that complete, qemu-img compare of source and target.
 * Besides: blkdebug nodes with rules from a config file, blockdev-add of
 * bad rules (QAPI's errors), and qemu-io beside qemu-io-ts on json:
 * filenames of raw and qcow2 over blkdebug (same lines, same qemu-img
 * check), including the cache-flush failures qemu-io reports at close.
 * Build first (npm run build).
 */
import fs from 'node:fs';
import path from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { missingPeers } from '../helpers/peers.js';
import { expectSame, IDENTICAL, pairRunner, stableJobs } from '../helpers/qsd-compare.js';
import { compareImages, createImage, must, qemuIo, QsdSession, stopAllSessions, tool } from '../helpers/qsd-script.js';
import { run, runOurs } from '../helpers/run.js';
import { scratchDir } from '../helpers/tmp.js';

const root = scratchDir('qbt-qsd-jobs-errors-');
afterEach(stopAllSessions);
const both = pairRunner(root);

/** The fields of job events that depend on how far the job got. */
const PROGRESS = ['len', 'offset'];

interface InjectError {
  event: string;
  errno?: number;
  once?: boolean;
  sector?: number;
  iotype?: string;
}

/** raw over blkdebug over `file`, failing as `rules` say. */
function blkdebugRaw(s: QsdSession, node: string, file: string, rules: InjectError[]): Record<string, unknown> {
  return { driver: 'raw', 'node-name': node, file: { driver: 'blkdebug', 'inject-error': rules, image: s.fileRef(file) } };
}

/** src.qcow2: 4 MiB, data at 0..1M and 3M..3M+64k. */
async function source(dir: string): Promise<void> {
  await createImage(dir, 'src.qcow2', '4M');
  await qemuIo(dir, 'src.qcow2', 'write -P 0xab 0 1M', 'write -P 0x5a 3M 64k');
}

type Policy = 'report' | 'ignore' | 'stop' | 'enospc';

/**
 * Mirrors src to a raw target failing writes per `rule`, with
 * on-target-error `policy`; when the job pauses, looks at the job listing
 * and resumes it; completes it after READY.
 */
async function mirrorScript(s: QsdSession, policy: Policy, rule: InjectError) {
  await source(s.dir);
  await createImage(s.dir, 'tgt.raw', '4M', { fmt: 'raw' });
  await s.ok('blockdev-add', { driver: 'qcow2', 'node-name': 'src', file: s.fileRef('src.qcow2') });
  await s.ok('blockdev-add', blkdebugRaw(s, 'tgt', 'tgt.raw', [rule]));
  await s.exec('blockdev-mirror', { 'job-id': 'm0', device: 'src', target: 'tgt', sync: 'full', 'on-target-error': policy });
  const end = await settle(s, 'm0', 'BLOCK_JOB_READY');
  if (end === 'BLOCK_JOB_READY') {
    await s.exec('job-complete', { id: 'm0' });
    await s.waitEvent('BLOCK_JOB_COMPLETED', (d) => d.device === 'm0');
  }
  await s.waitNoJobs();
  expect(await s.quit()).toBe(0);
  return {
    outcomes: s.outcomes,
    events: s.jobEvents('m0', PROGRESS),
    compare: end === 'BLOCK_JOB_READY' ? await compareImages(s.dir, 'src.qcow2', 'qcow2', 'tgt.raw', 'raw') : 'job failed',
  };
}

/** Backs src (its file failing one read after read_aio) up to a new qcow2 with on-source-error `policy`. */
async function backupScript(s: QsdSession, policy: Policy) {
  await source(s.dir);
  await createImage(s.dir, 'bk.qcow2', '4M');
  const file = { driver: 'blkdebug', 'inject-error': [{ event: 'read_aio', once: true }], image: s.fileRef('src.qcow2') };
  await s.ok('blockdev-add', { driver: 'qcow2', 'node-name': 'src', file });
  await s.ok('blockdev-add', { driver: 'qcow2', 'node-name': 'bk', file: s.fileRef('bk.qcow2') });
  await s.exec('blockdev-backup', { 'job-id': 'b0', device: 'src', target: 'bk', sync: 'full', 'on-source-error': policy });
  const end = await settle(s, 'b0', 'BLOCK_JOB_COMPLETED');
  await s.waitNoJobs();
  expect(await s.quit()).toBe(0);
  return {
    outcomes: s.outcomes,
    events: s.jobEvents('b0', PROGRESS),
    compare: end === 'BLOCK_JOB_COMPLETED' && policy !== 'report' ? await compareImages(s.dir, 'src.qcow2', 'qcow2', 'bk.qcow2', 'qcow2') : 'job failed',
  };
}

/** Bound on pause/resume rounds of one job. */
const RESUMES_MAX = 4;

/**
 * Runs job `id` until `goal` (its READY or COMPLETED event) or its
 * concluded status after an error: each time it pauses on an error, the
 * job listing is recorded and the job resumed. Returns which came first.
 */
async function settle(s: QsdSession, id: string, goal: string): Promise<string> {
  for (let resumes = 0; ; resumes++) {
    const found = await firstOf(s, id, goal, resumes);
    if (found !== 'paused' || resumes >= RESUMES_MAX) return found;
    await s.exec('query-block-jobs', undefined, stableJobs);
    await s.exec('block-job-resume', { device: id });
  }
}

/**
 * Waits for the next of: the goal event, the job concluding, the job
 * pausing after its (resumes+1)-th error with action stop (a backup also
 * pauses once at its start, for a drain, in both daemons).
 */
async function firstOf(s: QsdSession, id: string, goal: string, resumes: number): Promise<string> {
  const mine = () => s.events().filter((e) => e.data.id === id || e.data.device === id);
  const stoppedAndPaused = () => {
    const events = mine();
    const stops = events.flatMap((e, i) => (e.event === 'BLOCK_JOB_ERROR' && e.data.action === 'stop' ? [i] : []));
    const at = stops[resumes];
    return at !== undefined && events.slice(at).some((e) => e.event === 'JOB_STATUS_CHANGE' && e.data.status === 'paused');
  };
  const hit = (e: { event: string; data: Record<string, unknown> }) => e.event === goal || (e.event === 'JOB_STATUS_CHANGE' && e.data.status === 'concluded');
  await s.waitEvent('JOB_STATUS_CHANGE', () => stoppedAndPaused() || mine().some(hit));
  const done = mine().find(hit);
  return done ? (done.event === goal ? goal : 'concluded') : 'paused';
}

/** A fresh image for qemu-io: 1 MiB raw, or 4 MiB qcow2 with data at 0..64k. */
async function ioImage(dir: string, fmt: 'raw' | 'qcow2'): Promise<string> {
  const name = `io.${fmt}`;
  await must(dir, 'qemu-img', ['create', '-q', '-f', fmt, name, fmt === 'raw' ? '1M' : '4M']);
  if (fmt === 'qcow2') await qemuIo(dir, name, 'write -P 7 0 64k');
  return name;
}

/**
 * qemu-io and qemu-io-ts on one json: filename (`fmt` over blkdebug over a
 * fresh image): output (rates and times masked) and status, then what
 * qemu-img check says of the image.
 */
async function qemuIoBoth(dir: string, fmt: 'raw' | 'qcow2', rules: Record<string, unknown>, cmds: string[]) {
  const out = async (ours: boolean) => {
    const filename = await ioImage(dir, fmt);
    const json = `json:${JSON.stringify({ driver: fmt, file: { driver: 'blkdebug', ...rules, image: { driver: 'file', filename } } })}`;
    const args = [...cmds.flatMap((c) => ['-c', c]), json];
    const r = ours ? await runOurs('qemu-io-ts', args, { cwd: dir }) : await run('qemu-io', args, { cwd: dir });
    const check = fmt === 'qcow2' ? await tool(dir, 'qemu-img', ['check', filename]) : null;
    return { code: r.code, out: (r.stdout + r.stderr).replace(/ \(.*\/sec and .* ops\/sec\)/g, '').replace(/\d+\.\d+ sec/g, 'T'), check };
  };
  return [await out(false), await out(true)];
}

/** Rules still armed at close: only the refcount cache fails, both fail, both with ENOSPC. */
const CLOSE_FLUSH_RULES: Array<Record<string, unknown>> = [
  { event: 'cluster_alloc', iotype: 'write' },
  { event: 'l2_update' },
  { event: 'write_aio', iotype: 'flush', errno: 28 },
];

/** qemu-io runs on raw over blkdebug: rules and commands. */
const RAW_IO: Array<[Record<string, unknown>, string[]]> = [
  [{ 'inject-error': [{ event: 'write_aio' }] }, ['write 0 4k', 'read 0 4k', 'flush']],
  [{ 'inject-error': [{ event: 'read_aio', once: true }] }, ['write 0 4k', 'read 0 4k', 'read 0 4k']],
  [{ 'inject-error': [{ event: 'write_aio', errno: 28, sector: 7 }] }, ['write 0 4k', 'read 0 4k', 'read 4k 4k']],
  [{ 'inject-error': [{ event: 'write_aio', iotype: 'flush' }] }, ['write 0 4k', 'read 0 4k']],
  [{ 'inject-error': [{ event: 'read_aio', state: 2 }], 'set-state': [{ event: 'write_aio', new_state: 2 }] }, ['read 0 4k', 'write 0 4k', 'read 0 4k']],
  [{ 'inject-error': [{ event: 'none', iotype: 'discard' }] }, ['write -z 0 4k', 'discard 0 4k']],
  [{ 'inject-error': [{ event: 'foo' }] }, ['read 0 1']],
  [{ 'inject-error': [{}] }, ['read 0 1']],
  [{ 'inject-error': [{ event: 'none', bogus: 1 }] }, ['read 0 1']],
  [{ 'inject-error': [{ event: 'none', errno: 'x' }] }, ['read 0 1']],
];

/** qemu-io runs on qcow2 over blkdebug, driven by qcow2's data and metadata events. */
const QCOW2_IO: Array<[Record<string, unknown>, string[]]> = [
  [{ 'inject-error': [{ event: 'write_aio', iotype: 'write' }] }, ['write 0 4k', 'read 0 4k']],
  [{ 'inject-error': [{ event: 'l2_update', once: true }] }, ['write 2M 4k', 'flush', 'write 2M 4k']],
  [{ 'inject-error': [{ event: 'l2_load', iotype: 'read', once: true }] }, ['read 0 4k', 'read 0 4k']],
  [{ 'inject-error': [{ event: 'refblock_update_part', once: true }] }, ['write 2M 64k', 'flush', 'read 2M 4k']],
  [{ 'inject-error': [{ event: 'read_aio', errno: 28, iotype: 'read' }] }, ['read 0 4k', 'read 2M 4k', 'write 1M 4k']],
  [{ 'inject-error': [{ event: 'l1_update', iotype: 'write', once: true }], 'set-state': [{ event: 'cluster_alloc', new_state: 2 }] }, ['write 3M 4k', 'write 1M 4k']],
];

describe.skipIf(missingPeers('qemu-storage-daemon', 'qemu-img', 'qemu-io'))('job error policies with blkdebug beside qemu-storage-daemon 7.2', () => {
  const cases: Array<[string, Policy, InjectError, boolean]> = [
    ['report, errno 5 at one sector', 'report', { event: 'write_aio', errno: 5, sector: 1024 }, false],
    ['ignore, once', 'ignore', { event: 'write_aio', errno: 5, once: true }, true],
    ['stop, once, then block-job-resume', 'stop', { event: 'write_aio', errno: 5, once: true }, true],
    ['enospc with errno 28, once: pauses, then resume', 'enospc', { event: 'write_aio', errno: 28, once: true }, true],
    ['enospc with errno 5: reports', 'enospc', { event: 'write_aio', errno: 5, sector: 0 }, false],
  ];
  for (const [name, policy, rule, completes] of cases) {
    it(`blockdev-mirror on-target-error ${name}: same events, listings and target`, async () => {
      const [theirs, ours] = await both(`mirror-${policy}-${rule.errno}-${rule.once ? 'once' : rule.sector}`, (s) => mirrorScript(s, policy, rule));
      if (completes) expect(theirs.compare).toEqual(IDENTICAL);
      expectSame(theirs, ours, { progress: false });
    }, 60_000);
  }

  for (const policy of ['report', 'stop'] as const) {
    it(`blockdev-backup on-source-error ${policy} after a read_aio error: same events and backup`, async () => {
      const [theirs, ours] = await both(`backup-${policy}`, (s) => backupScript(s, policy));
      if (policy === 'stop') expect(theirs.compare).toEqual(IDENTICAL);
      expectSame(theirs, ours, { progress: false });
    }, 60_000);
  }

  for (const [fmt, scripts] of [['raw', RAW_IO], ['qcow2', QCOW2_IO]] as const) {
    it(`qemu-io and qemu-io-ts print the same lines for json: ${fmt} over blkdebug filenames`, async () => {
      const dir = path.join(root, `qemu-io-${fmt}`);
      fs.mkdirSync(dir, { recursive: true });
      for (const [rules, cmds] of scripts) {
        const [theirs, ours] = await qemuIoBoth(dir, fmt, rules, cmds);
        expect(ours, JSON.stringify(rules)).toEqual(theirs);
      }
    }, 60_000);
  }

  // A rule still armed when the image closes fails qcow2's cache flush at
  // close: QEMU prints "qemu-io: Failed to flush the refcount block cache:
  // Input/output error" (qcow2_inactivate), for each cache that fails.
  it('qemu-io-ts reports a failed qcow2 cache flush at close as qemu-io does', async () => {
    const dir = path.join(root, 'qemu-io-close');
    fs.mkdirSync(dir, { recursive: true });
    for (const rule of CLOSE_FLUSH_RULES) {
      const [theirs, ours] = await qemuIoBoth(dir, 'qcow2', { 'inject-error': [rule] }, ['write 0 4k', 'write 2M 4k']);
      expect(theirs.out).toContain('Failed to flush the refcount block cache');
      expect(ours, JSON.stringify(rule)).toEqual(theirs);
    }
  }, 60_000);

  it('qsd and ours open a blkdebug node with rules from a config file alike', async () => {
    const [theirs, ours] = await both('config', async (s) => {
      await must(s.dir, 'sh', ['-c', 'printf \'[inject-error]\\nevent = "none"\\niotype = "read"\\n\' > rules.ini']);
      await createImage(s.dir, 'c.raw', '1M', { fmt: 'raw' });
      await s.exec('blockdev-add', { driver: 'blkdebug', 'node-name': 'd', config: s.f('rules.ini'), image: s.fileRef('c.raw') });
      await s.exec('blockdev-add', { driver: 'blkdebug', 'node-name': 'e', config: s.f('missing.ini'), image: s.fileRef('c.raw') });
      await s.ok('nbd-server-start', { addr: { type: 'unix', data: { path: s.f('nbd.sock') } } });
      await s.ok('block-export-add', { type: 'nbd', id: 'x', 'node-name': 'd' });
      const read = await tool(s.dir, 'qemu-io', ['-r', '-f', 'raw', '-c', 'read 0 512', `nbd+unix:///d?socket=${s.f('nbd.sock')}`]);
      expect(await s.quit()).toBe(0);
      return { outcomes: s.outcomes, read: { code: read.code, out: read.out.replace(/ \(.*\)/, '') } };
    });
    expectSame(theirs, ours);
  }, 60_000);

  it('blockdev-add refuses bad rules with the same QMP errors', async () => {
    const [theirs, ours] = await both('bad-rules', async (s) => {
      await createImage(s.dir, 'c.raw', '1M', { fmt: 'raw' });
      for (const rules of BAD_RULES) await s.exec('blockdev-add', { driver: 'blkdebug', 'node-name': 'd', ...rules, image: s.fileRef('c.raw') });
      expect(await s.quit()).toBe(0);
      return { outcomes: s.outcomes };
    });
    expectSame(theirs, ours);
  }, 60_000);
});

/** Rules QAPI or blkdebug refuses. */
const BAD_RULES: Array<Record<string, unknown>> = [
  { 'inject-error': [{ event: 'foo' }] },
  { 'inject-error': [{}] },
  { 'inject-error': [{ event: 'write_aio', iotype: 'foo' }] },
  { 'inject-error': [{ event: 'write_aio', errno: 'x' }] },
  { 'inject-error': [{ event: 'write_aio', bogus: 1 }] },
  { 'inject-error': { event: 'write_aio' } },
  { 'inject-error': [{ event: 'write_aio', once: 'maybe' }] },
  { 'set-state': [{ event: 'write_aio' }] },
];
