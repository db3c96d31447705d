/*
 * The generic job verbs and queries (qapi/job.json, the job parts of
 * qapi/block-core.json): job-* address a job by `id`, block-job-* by
 * `device` (which is the job id for every job this daemon makes) and say
 * "Block job 'x' not found" with class DeviceNotActive when it is missing,
 * as blockdev.c's find_block_job_locked. job-cancel is a forced cancel;
 * block-job-cancel is soft unless `force`, and refuses a user-paused job
 * without `force`, as QEMU 7.2. The verbs themselves and their refusals
 * live in jobs/job.ts.
 */
import { z } from 'zod';
import type { Job } from '../jobs/job.js';
import type { JobRegistry } from '../jobs/registry.js';
import { QmpError, defineCommand, type QmpCommand } from './command.js';

export interface JobsContext {
  jobs: JobRegistry;
}

function blockJob(ctx: JobsContext, device: string): Job {
  const job = ctx.jobs.find(device);
  if (!job || !job.isBlockJob) throw new QmpError('DeviceNotActive', `Block job '${device}' not found`);
  return job;
}

/** A verb command: look the job up by the one key of `args`, apply, return {}. */
function verb<K extends 'id' | 'device'>(
  name: string,
  key: K,
  find: (ctx: JobsContext, id: string) => Job,
  apply: (job: Job) => void,
): QmpCommand<JobsContext> {
  const args = z.strictObject({ [key]: z.string() } as Record<K, z.ZodString>);
  return defineCommand({
    name,
    args,
    run(ctx: JobsContext, parsed) {
      apply(find(ctx, (parsed as Record<K, string>)[key]));
      return {};
    },
  });
}

const anyJob = (ctx: JobsContext, id: string) => ctx.jobs.get(id);
const jobVerb = (name: string, apply: (job: Job) => void) => verb(name, 'id', anyJob, apply);
/** block-job-* verbs address the job by `device`, finalize and dismiss by `id`. */
const blockJobVerb = (name: string, apply: (job: Job) => void) => verb(name, 'device', blockJob, apply);
const blockJobVerbById = (name: string, apply: (job: Job) => void) => verb(name, 'id', blockJob, apply);

const blockJobCancel = z.strictObject({ device: z.string(), force: z.boolean().optional() });
const setSpeed = z.strictObject({ device: z.string(), speed: z.number().int() });
const blockJobChange = z.strictObject({
  id: z.string(),
  type: z.enum(['mirror']),
  'copy-mode': z.enum(['background', 'write-blocking']),
});

export const jobCommands: QmpCommand<JobsContext>[] = [
  defineCommand({
    name: 'query-jobs',
    args: z.strictObject({}),
    run: (ctx: JobsContext) => ctx.jobs.list().map((j) => j.info()),
  }),
  defineCommand({
    name: 'query-block-jobs',
    args: z.strictObject({}),
    run: (ctx: JobsContext) => ctx.jobs.blockJobs().map((j) => j.blockJobInfo()),
  }),
  jobVerb('job-pause', (j) => j.pause()),
  jobVerb('job-resume', (j) => j.resume()),
  jobVerb('job-cancel', (j) => j.cancel(true)),
  jobVerb('job-complete', (j) => j.complete()),
  jobVerb('job-finalize', (j) => j.finalize()),
  jobVerb('job-dismiss', (j) => j.dismiss()),
  blockJobVerb('block-job-pause', (j) => j.pause()),
  blockJobVerb('block-job-resume', (j) => j.resume()),
  blockJobVerb('block-job-complete', (j) => j.complete()),
  blockJobVerbById('block-job-finalize', (j) => j.finalize()),
  blockJobVerbById('block-job-dismiss', (j) => j.dismiss()),
  defineCommand({
    name: 'block-job-cancel',
    args: blockJobCancel,
    run(ctx: JobsContext, args: z.infer<typeof blockJobCancel>) {
      const job = blockJob(ctx, args.device);
      const force = args.force ?? false;
      if (job.userPaused && !force) {
        throw new QmpError('GenericError', `The block job for device '${args.device}' is currently paused`);
      }
      job.cancel(force);
      return {};
    },
  }),
  defineCommand({
    name: 'block-job-set-speed',
    args: setSpeed,
    run(ctx: JobsContext, args: z.infer<typeof setSpeed>) {
      blockJob(ctx, args.device).setSpeed(args.speed);
      return {};
    },
  }),
  defineCommand({
    name: 'block-job-change',
    args: blockJobChange,
    run(ctx: JobsContext, args: z.infer<typeof blockJobChange>) {
      const job = blockJob(ctx, args.id);
      if (job.type !== args.type) {
        throw new QmpError('GenericError', `Job type does not match specified type`);
      }
      job.change({ 'copy-mode': args['copy-mode'] });
      return {};
    },
  }),
];
