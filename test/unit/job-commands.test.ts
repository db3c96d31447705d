// The generic job QMP commands (qmp/commands-jobs.ts) run against a
// registry: lookups by id and device with QEMU's texts and error classes,
// block-job-cancel's paused refusal, queries' keys.
import { describe, expect, it } from 'vitest';
import type { JobDriver } from '../../jobs/job.js';
import { JobRegistry } from '../../jobs/registry.js';
import { QmpError } from '../../qmp/command.js';
import { jobCommands, type JobsContext } from '../../qmp/commands-jobs.js';

function call(ctx: JobsContext, name: string, args: unknown = {}): unknown {
  const cmd = jobCommands.find((c) => c.name === name);
  if (!cmd) throw new Error(`no command ${name}`);
  return cmd.run(ctx, cmd.args.parse(args));
}

const idle: JobDriver = { type: 'mirror', run: () => new Promise(() => {}) };

describe('job commands', () => {
  it('queries jobs and block jobs with QEMU keys', () => {
    const ctx = { jobs: new JobRegistry() };
    ctx.jobs.create(idle, { id: 'm0' });
    expect(call(ctx, 'query-jobs')).toEqual([{ id: 'm0', type: 'mirror', status: 'created', 'current-progress': 0, 'total-progress': 0 }]);
    expect(call(ctx, 'query-block-jobs')).toEqual([
      {
        type: 'mirror',
        device: 'm0',
        len: 0,
        offset: 0,
        busy: false,
        paused: true,
        speed: 0,
        'io-status': 'ok',
        ready: false,
        status: 'created',
        'auto-finalize': true,
        'auto-dismiss': true,
      },
    ]);
  });

  it('reports missing jobs like QEMU', () => {
    const ctx = { jobs: new JobRegistry() };
    expect(() => call(ctx, 'job-pause', { id: 'x' })).toThrow('Job not found');
    let err: unknown;
    try {
      call(ctx, 'block-job-pause', { device: 'x' });
    } catch (e) {
      err = e;
    }
    expect(err).toBeInstanceOf(QmpError);
    expect((err as QmpError).errorClass).toBe('DeviceNotActive');
    expect((err as QmpError).message).toBe("Block job 'x' not found");
    expect(() => call(ctx, 'job-pause', { id: 'x', extra: 1 })).toThrow();
  });

  it('refuses a soft cancel of a user-paused block job', () => {
    const ctx = { jobs: new JobRegistry() };
    const job = ctx.jobs.create(idle, { id: 'm1' });
    call(ctx, 'block-job-pause', { device: 'm1' });
    expect(() => call(ctx, 'block-job-cancel', { device: 'm1' })).toThrow("The block job for device 'm1' is currently paused");
    call(ctx, 'block-job-set-speed', { device: 'm1', speed: 1 << 20 });
    expect(job.speed).toBe(1 << 20);
    expect(() => call(ctx, 'block-job-complete', { device: 'm1' })).toThrow("Job 'm1' in state 'created' cannot accept command verb 'complete'");
    job.earlyFail();
  });
});
