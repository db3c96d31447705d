/*
 * What stream, commit and backup share when they create their job, as
 * QEMU's block_job_create: the job is registered (id checked) in status
 * created, then the speed is checked — a negative one fails the job early
 * (created → null, no other event) with QEMU's text. The nodes it works on
 * are claimed: busy for other jobs, and held so that their drains pause it.
 *
 * Permissions a job holds (QEMU 7.2's blockjob.c):
 *   - its BlockBackends (`jobBackend`): the edges it does I/O through, which
 *     take and share what the kind says, named in conflicts as QEMU names
 *     an unnamed BlockBackend ("an unnamed block device" as 'root');
 *   - its child_job edges (`JobEdges`, block_job_add_bdrv): on the nodes
 *     the job must keep as they are (stream's intermediate images, commit's
 *     top..base chain, mirror's source). Every job in QEMU 7.2 takes
 *     nothing there (perm 0) and shares only what the kind allows, so a
 *     user who then asks for more (a writable export of an image being
 *     streamed away) is refused with "... unshared by stream job 'j'
 *     (uses node 'mid' as 'intermediate node' child)". These edges never
 *     move with a node's parents (QEMU's stay_at_node): kinds pass them to
 *     block/replace.ts as edges to keep, or drop them before a move. QEMU's
 *     edges that share everything ("main node", mirror's and backup's
 *     "target", commit's "base") change no permission and are not made;
 *     their op blockers are (claimNodes).
 * Left out: QEMU keeps the child_job edges (and so the nodes) until the job
 * is freed — after job-dismiss; here they go when the kind's graph work is
 * done (prepare) or the job concludes, whichever is first.
 */
import { Perm } from '../block/flags.js';
import { attachChild, detachChild, TransientParent, type BdrvChild, type BlockNode, type EdgeParent } from '../block/node.js';
import type { BlockGraph } from '../block/graph.js';
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

/** What QEMU calls a BlockBackend without a name in permission conflicts. */
const UNNAMED_BACKEND = 'an unnamed block device';

/** A job's own BlockBackend on `node` (blk_new_with_bs): its I/O edge, 'root' in QEMU's messages. */
export function jobBackend(node: BlockNode, perm: number, shared: number): BdrvChild {
  return attachChild(new TransientParent(UNNAMED_BACKEND), 'root', 0, node, perm, shared);
}

/**
 * The parent of a job's child_job edges: named after the job in conflicts
 * ("stream job 'j'"). Drains reach the job through Job.holdNode, so this
 * parent passes none on and has nothing in flight.
 */
class JobEdgeParent implements EdgeParent {
  readonly inFlight = 0;
  readonly isJob = true;
  constructor(private readonly job: Job) {}
  describe(): string {
    return this.job.describe();
  }
  async waitIdle(): Promise<void> {}
  drainedBegin(): void {}
  drainedEnd(): void {}
}

/** A job's child_job edges (see the note at the top); all are dropped when the job concludes at the latest. */
export class JobEdges {
  private readonly parent: JobEdgeParent;
  private readonly edges: BdrvChild[] = [];

  constructor(private readonly job: Job) {
    this.parent = new JobEdgeParent(job);
    job.addCleanup(() => this.removeAll());
  }

  /** block_job_add_bdrv(job, name, node, 0, shared): claims `node` and holds it sharing only `shared`; throws QEMU's conflict. */
  add(name: string, node: BlockNode, shared: number): void {
    this.edges.push(attachChild(this.parent, name, 0, node, 0, shared));
    claimNodes(this.job, [node]);
  }

  /** The edges, for block/replace.ts's `keep`. */
  get all(): readonly BdrvChild[] {
    return this.edges;
  }

  /** block_job_remove_all_bdrv, newest first. */
  removeAll(): void {
    for (const edge of this.edges.splice(0).reverse()) detachChild(edge);
  }
}

/**
 * The child_job edges from `top` down to `base` (commit_start, and
 * mirror_start_job for active commit, which starts below its top): write
 * and write unchanged shared, consistent read too from the topmost node
 * that is only filters above base on.
 */
export function addIntermediateEdges(edges: JobEdges, top: BlockNode, base: BlockNode): void {
  let shared = Perm.WRITE_UNCHANGED | Perm.WRITE;
  for (let n: BlockNode | null = top; n && n !== base; n = n.filterOrCowNode) {
    if (n.skipFilters() === base.skipFilters()) shared |= Perm.CONSISTENT_READ;
    edges.add('intermediate node', n, shared);
  }
}
