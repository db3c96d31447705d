// The generic job state machine against QEMU's tables and event order
// (peers/out/06-qmp-transcript.jsonl): statuses, verbs refused in the wrong
// status with QEMU's texts, pause points, cancel (hard, soft, before start,
// while pending), error policies, auto-finalize/auto-dismiss.
import { describe, expect, it } from 'vitest';
import { BlockError } from '../../block/errors.js';
import { Job, JobError, SpeedLimit, type JobDriver } from '../../jobs/job.js';
import { JobRegistry } from '../../jobs/registry.js';
import { canTransition, idWellformed, verbAllowed } from '../../jobs/job-tables.js';

interface Ev {
  event: string;
  data: Record<string, unknown>;
}

function setup() {
  const events: Ev[] = [];
  const reg = new JobRegistry((event, data) => events.push({ event, data }));
  const statuses = () => events.filter((e) => e.event === 'JOB_STATUS_CHANGE').map((e) => e.data.status);
  const names = () => events.map((e) => (e.event === 'JOB_STATUS_CHANGE' ? String(e.data.status) : e.event));
  return { events, reg, statuses, names };
}

/** A job that copies `steps` chunks of 1 MiB, with a pause point after each, until released. */
function steppingDriver(opts: { steps: number; ready?: boolean; fail?: BlockError; type?: JobDriver['type'] } = { steps: 3 }) {
  let release: () => void = () => {};
  const gate = new Promise<void>((r) => (release = r));
  let completed = false;
  const driver: JobDriver = {
    type: opts.type ?? 'stream',
    async run(job: Job) {
      job.progressSetRemaining(opts.steps << 20);
      for (let i = 0; i < opts.steps; i++) {
        if (job.isCancelled()) return;
        job.progressUpdate(1 << 20);
        await job.pausePoint();
      }
      if (opts.fail) throw opts.fail;
      if (opts.ready) {
        job.transitionToReady();
        while (!completed && !job.cancelRequested()) {
          await job.sleep(5);
          await job.pausePoint();
        }
        return;
      }
      await gate;
    },
    ...(opts.ready
      ? {
          complete: () => {
            completed = true;
          },
          cancel: (job: Job, force: boolean) => force || !job.isReady(),
        }
      : {}),
  };
  return { driver, release };
}

const tick = () => new Promise((r) => setTimeout(r, 10));
/** Longest wait for a job to reach a state in these tests. */
const WAIT_LIMIT_MS = 5000;

async function waitFor(cond: () => boolean): Promise<void> {
  const deadline = Date.now() + WAIT_LIMIT_MS;
  while (!cond()) {
    if (Date.now() > deadline) throw new Error('condition not reached in time');
    await tick();
  }
}

describe('job tables', () => {
  it('follows JobSTT and JobVerbTable', () => {
    expect(canTransition('created', 'running')).toBe(true);
    expect(canTransition('running', 'concluded')).toBe(false);
    expect(canTransition('aborting', 'aborting')).toBe(true);
    expect(verbAllowed('complete', 'running')).toBe(false);
    expect(verbAllowed('complete', 'standby')).toBe(true);
    expect(verbAllowed('dismiss', 'concluded')).toBe(true);
    expect(verbAllowed('cancel', 'concluded')).toBe(false);
  });

  it('checks ids like id_wellformed', () => {
    expect(idWellformed('job0')).toBe(true);
    expect(idWellformed('a.b-c_d')).toBe(true);
    expect(idWellformed('0job')).toBe(false);
    expect(idWellformed('')).toBe(false);
  });
});

describe('job life cycle', () => {
  it('runs to null with the event order of qemu-storage-daemon', async () => {
    const { reg, names } = setup();
    const { driver, release } = steppingDriver({ steps: 2 });
    const job = reg.create(driver, { id: 'stream0' });
    job.start();
    release();
    await job.whenFinished();
    expect(names()).toEqual(['created', 'running', 'waiting', 'pending', 'BLOCK_JOB_COMPLETED', 'concluded', 'null']);
    expect(reg.find('stream0')).toBeUndefined();
  });

  it('emits READY and completes a mirror-like job on complete()', async () => {
    const { reg, names, events } = setup();
    const { driver } = steppingDriver({ steps: 4, ready: true, type: 'mirror' });
    const job = reg.create(driver, { id: 'm0' });
    expect(() => job.complete()).toThrow("Job 'm0' in state 'created' cannot accept command verb 'complete'");
    job.start();
    await waitFor(() => job.isReady());
    job.complete();
    await job.whenFinished();
    expect(names()).toEqual(['created', 'running', 'ready', 'BLOCK_JOB_READY', 'waiting', 'pending', 'BLOCK_JOB_COMPLETED', 'concluded', 'null']);
    expect(events.find((e) => e.event === 'BLOCK_JOB_READY')!.data).toEqual({ type: 'mirror', device: 'm0', len: 4 << 20, offset: 4 << 20, speed: 0 });
  });

  it('refuses complete on jobs without it', async () => {
    const { reg } = setup();
    const { driver, release } = steppingDriver({ steps: 1 });
    const job = reg.create(driver, { id: 's' });
    job.start();
    await tick();
    expect(() => job.complete()).toThrow("Job 's' in state 'running' cannot accept command verb 'complete'");
    release();
    await job.whenFinished();
  });

  it('waits in pending without auto-finalize and in concluded without auto-dismiss', async () => {
    const { reg, names } = setup();
    const { driver, release } = steppingDriver({ steps: 1 });
    const job = reg.create(driver, { id: 'j', autoFinalize: false, autoDismiss: false });
    job.start();
    release();
    await waitFor(() => job.status === 'pending');
    expect(names().slice(-1)).toEqual(['BLOCK_JOB_PENDING']);
    expect(() => job.dismiss()).toThrow("Job 'j' in state 'pending' cannot accept command verb 'dismiss'");
    job.finalize();
    await job.whenFinished();
    expect(job.status).toBe('concluded');
    expect(reg.find('j')).toBe(job);
    job.dismiss();
    expect(job.status).toBe('null');
    expect(reg.find('j')).toBeUndefined();
  });
});

describe('pause and resume', () => {
  it('pauses at the next pause point and resumes', async () => {
    const { reg, statuses } = setup();
    const { driver, release } = steppingDriver({ steps: 3 });
    const job = reg.create(driver, { id: 'p' });
    job.pause(); // while created: pauses at the first pause point
    job.start();
    await tick();
    expect(job.status).toBe('paused');
    expect(job.blockJobInfo()).toMatchObject({ paused: true, busy: false, status: 'paused' });
    expect(() => job.pause()).toThrow('Job is already paused');
    job.resume();
    expect(() => job.resume()).toThrow("Can't resume a job that was not paused");
    release();
    await job.whenFinished();
    expect(statuses().slice(0, 4)).toEqual(['created', 'running', 'paused', 'running']);
  });

  it('goes to standby when paused while ready', async () => {
    const { reg, statuses } = setup();
    const { driver } = steppingDriver({ steps: 1, ready: true, type: 'mirror' });
    const job = reg.create(driver, { id: 'r' });
    job.start();
    await waitFor(() => job.isReady());
    job.pause();
    await waitFor(() => job.status === 'standby');
    job.complete(); // allowed in standby
    job.resume();
    await job.whenFinished();
    expect(statuses()).toContain('standby');
  });
});

describe('cancel', () => {
  it('hard cancel aborts with BLOCK_JOB_CANCELLED', async () => {
    const { reg, names } = setup();
    const { driver } = steppingDriver({ steps: 1000 });
    const job = reg.create(driver, { id: 'c' });
    job.pause();
    job.start();
    await tick();
    job.cancel(false); // a paused job resumes to see the cancel
    await job.whenFinished();
    expect(names()).toEqual(['created', 'running', 'paused', 'running', 'aborting', 'BLOCK_JOB_CANCELLED', 'concluded', 'null']);
  });

  it('soft cancel after READY completes without error', async () => {
    const { reg, names } = setup();
    const { driver } = steppingDriver({ steps: 1, ready: true, type: 'mirror' });
    const job = reg.create(driver, { id: 'soft' });
    job.start();
    await waitFor(() => job.isReady());
    job.cancel(false);
    expect(job.isCancelled()).toBe(false);
    expect(job.cancelRequested()).toBe(true);
    await job.whenFinished();
    expect(names()).toContain('BLOCK_JOB_COMPLETED');
    expect(names()).not.toContain('BLOCK_JOB_CANCELLED');
  });

  it('cancel before start emits no end event', async () => {
    const { reg, names } = setup();
    const { driver } = steppingDriver({ steps: 1 });
    const job = reg.create(driver, { id: 'early' });
    job.cancel(false);
    await job.whenFinished();
    expect(names()).toEqual(['created', 'aborting', 'concluded', 'null']);
  });

  it('cancel while pending aborts', async () => {
    const { reg, names } = setup();
    const { driver, release } = steppingDriver({ steps: 1 });
    const job = reg.create(driver, { id: 'pend', autoFinalize: false });
    job.start();
    release();
    await waitFor(() => job.status === 'pending');
    job.cancel(false);
    await job.whenFinished();
    expect(names().slice(-6)).toEqual(['pending', 'BLOCK_JOB_PENDING', 'aborting', 'BLOCK_JOB_CANCELLED', 'concluded', 'null']);
  });
});

describe('verbs while finalizing', () => {
  /** A driver whose prepare (the finalize step) waits until `finish` is called. */
  function slowFinalize() {
    let finish!: () => void;
    const finished = new Promise<void>((r) => (finish = r));
    const driver: JobDriver = { type: 'backup', run: async () => {}, prepare: () => finished };
    return { driver, finish };
  }

  it('a cancel or a second finalize arriving while an auto-finalize runs is ignored, never a crash', async () => {
    const { reg, names } = setup();
    const { driver, finish } = slowFinalize();
    const job = reg.create(driver, { id: 'fin' });
    job.start();
    await waitFor(() => job.status === 'pending');
    job.cancel(false);
    job.cancel(true);
    finish();
    await job.whenFinished();
    expect(names().slice(-4)).toEqual(['pending', 'BLOCK_JOB_COMPLETED', 'concluded', 'null']);
  });

  it('job-finalize twice, then cancel, while the first finalize runs: one ending', async () => {
    const { reg, names } = setup();
    const { driver, finish } = slowFinalize();
    const job = reg.create(driver, { id: 'fin2', autoFinalize: false });
    job.start();
    await waitFor(() => job.status === 'pending');
    job.finalize();
    job.finalize();
    job.cancel(false);
    finish();
    await job.whenFinished();
    expect(names().filter((n) => n === 'concluded' || n === 'BLOCK_JOB_COMPLETED' || n === 'BLOCK_JOB_CANCELLED')).toEqual([
      'BLOCK_JOB_COMPLETED',
      'concluded',
    ]);
  });
});

describe('errors', () => {
  it('a failing job reports BLOCK_JOB_COMPLETED with the error and aborts', async () => {
    const { reg, names, events } = setup();
    const { driver } = steppingDriver({ steps: 1, fail: new BlockError('EIO') });
    const job = reg.create(driver, { id: 'f', autoDismiss: false });
    job.start();
    await job.whenFinished();
    expect(names()).toEqual(['created', 'running', 'aborting', 'BLOCK_JOB_COMPLETED', 'concluded']);
    expect(events.find((e) => e.event === 'BLOCK_JOB_COMPLETED')!.data.error).toBe('Input/output error');
    expect(job.info()).toMatchObject({ status: 'concluded', error: 'Input/output error' });
  });

  it('maps policies to actions like block_job_error_action', () => {
    const { reg, events } = setup();
    const job = reg.create({ type: 'backup', run: async () => {} }, { id: 'e' });
    const nospc = new BlockError('ENOSPC');
    const eio = new BlockError('EIO');
    expect(job.errorAction(eio, true, 'report')).toBe('report');
    expect(job.errorAction(eio, false, 'ignore')).toBe('ignore');
    expect(job.errorAction(eio, false, 'enospc')).toBe('report');
    expect(job.errorAction(nospc, false, 'enospc')).toBe('stop');
    expect(job.blockJobInfo()).toMatchObject({ 'io-status': 'nospace', paused: true });
    expect(events.filter((e) => e.event === 'BLOCK_JOB_ERROR').map((e) => e.data)).toEqual([
      { device: 'e', operation: 'read', action: 'report' },
      { device: 'e', operation: 'write', action: 'ignore' },
      { device: 'e', operation: 'write', action: 'report' },
      { device: 'e', operation: 'write', action: 'stop' },
    ]);
    job.earlyFail();
  });
});

describe('registry', () => {
  it('checks new ids with QEMU texts', () => {
    const { reg } = setup();
    const driver: JobDriver = { type: 'stream', run: async () => {} };
    expect(() => reg.create(driver, { id: '1x' })).toThrow("Invalid job ID '1x'");
    reg.create(driver, { id: 'x' });
    expect(() => reg.create(driver, { id: 'x' })).toThrow("Job ID 'x' already in use");
    expect(() => reg.get('nope')).toThrow(JobError);
    expect(() => reg.get('nope')).toThrow('Job not found');
  });

  it('set-speed validates and applies', () => {
    const { reg } = setup();
    const job = reg.create({ type: 'mirror', run: async () => {} }, { id: 's' });
    expect(() => job.setSpeed(-1)).toThrow("Parameter 'speed' expects a non-negative value");
    job.setSpeed(1 << 20);
    expect(job.blockJobInfo().speed).toBe(1 << 20);
    job.earlyFail();
  });
});

describe('speed limit', () => {
  it('holds the long-run rate to the speed on the throttle bucket', () => {
    let now = 0;
    const limit = new SpeedLimit(1 << 20, () => now);
    let copied = 0;
    // Copy 64 KiB chunks, sleeping as told, for 10 simulated seconds.
    while (now < 10_000) {
      copied += 65536;
      now += limit.delayFor(65536);
    }
    expect(copied / (now / 1000)).toBeGreaterThan(0.95 * (1 << 20));
    expect(copied / (now / 1000)).toBeLessThan(1.05 * (1 << 20));
    limit.setSpeed(0);
    expect(limit.delayFor(1 << 30)).toBe(0);
  });
});
