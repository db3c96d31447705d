/*
 * What stream, commit and backup share when they create their job, as
 * QEMU's block_job_create: the job is registered (id checked) in status
 * created, then the speed is checked — a negative one fails the job early
 * (created → null, no other event) with QEMU's text. The nodes it works on
 * are claimed: busy for other jobs, and held so that their drains pause it.
 */
import type { BlockGraph } from '../block/graph.js';
import type { BlockNode } from '../block/node.js';
import { blockAllOps, opBlockedError } from '../block/op-blockers.js';
import { JobError, type Job, type JobDriver } from './job.js';
import type { JobRegistry } from './registry.js';

/** What a job kind needs of its daemon (or embedding program). */
export interface JobContext {
  graph: BlockGraph;
  jobs: JobRegistry;
}

/** The creation options every block job command takes. */
export interface BlockJobOptions {
  jobId: string;
  /** Bytes per second; 0 or absent: unlimited; negative: refused. */
  speed?: number;
  autoFinalize?: boolean;
  autoDismiss?: boolean;
}

/**
 * Marks the nodes busy with this job until it concludes and holds them, so
 * their drains pause it (block_job_add_bdrv: the op blocker and the
 * child_job edge).
 */
export function claimNodes(job: Job, nodes: readonly BlockNode[]): void {
  const reason = `block device is in use by block job: ${job.type}`;
  for (const node of new Set(nodes)) {
    job.addCleanup(blockAllOps(node, reason));
    job.holdNode(node);
  }
}

/** The busy refusal for the first of `nodes` another job holds (bdrv_op_is_blocked), if any. */
export function checkNodesFree(nodes: readonly BlockNode[]): void {
  for (const node of nodes) {
    const err = opBlockedError(node);
    if (err) throw err;
  }
}

/** block_job_create: the job in status created, or QEMU's refusal. */
export function createBlockJob(ctx: JobContext, driver: JobDriver, opts: BlockJobOptions, nodes: readonly BlockNode[] = []): Job {
  checkNodesFree(nodes);
  const job = ctx.jobs.create(driver, {
    id: opts.jobId,
    speed: Math.max(0, opts.speed ?? 0),
    autoFinalize: opts.autoFinalize,
    autoDismiss: opts.autoDismiss,
  });
  if (opts.speed !== undefined && opts.speed < 0) {
    job.earlyFail();
    throw new JobError("Parameter 'speed' expects a non-negative value");
  }
  claimNodes(job, nodes);
  return job;
}
