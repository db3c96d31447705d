/*
 * The jobs of one daemon (or one embedding program), by id.
 *
 * `create` checks the id as QEMU's job_create does (well-formed, unused),
 * builds the job in status created and keeps it until it reaches null;
 * the caller starts it once its set-up (filters, permissions) succeeded, or
 * drops it with `discard` when set-up failed. Events go to the sink given
 * at construction. Lookups by id give QEMU's texts when the job is missing.
 */
import { Job, JobError, type JobDriver, type JobEventSink, type JobOptions } from './job.js';
import { idWellformed } from './job-tables.js';

export class JobRegistry {
  private readonly jobs = new Map<string, Job>();

  constructor(private readonly emit: JobEventSink = () => {}) {}

  /** Checks a job id before anything is built for it. */
  checkNewId(id: string | undefined): string {
    if (id === undefined) throw new JobError('An explicit job ID is required');
    if (!idWellformed(id)) throw new JobError(`Invalid job ID '${id}'`);
    if (this.jobs.has(id)) throw new JobError(`Job ID '${id}' already in use`);
    return id;
  }

  /** Creates a job in status created (JOB_STATUS_CHANGE emitted); start it with job.start(). */
  create(driver: JobDriver, opts: JobOptions): Job {
    this.checkNewId(opts.id);
    const job = new Job(driver, opts, this.emit, (gone) => this.jobs.delete(gone.id));
    this.jobs.set(opts.id, job);
    return job;
  }

  /** The job with this id, or undefined. */
  find(id: string): Job | undefined {
    return this.jobs.get(id);
  }

  /** For job-* verbs: QEMU's "Job not found". */
  get(id: string): Job {
    const job = this.jobs.get(id);
    if (!job) throw new JobError('Job not found');
    return job;
  }

  /** Newest first, as QEMU's job list (QLIST_INSERT_HEAD) and so query-jobs. */
  list(): Job[] {
    return [...this.jobs.values()].reverse();
  }

  blockJobs(): Job[] {
    return this.list().filter((j) => j.isBlockJob);
  }

  /** Cancels every job and waits until they are finished (daemon shutdown, QEMU's job_cancel_sync_all). */
  async cancelAll(): Promise<void> {
    const running = this.list().filter((j) => !j.isFinished);
    for (const job of running) {
      try {
        job.cancel(true);
      } catch {
        // A job in a status that refuses cancel is finishing on its own.
      }
    }
    await Promise.all(running.map((j) => j.whenFinished()));
  }
}
