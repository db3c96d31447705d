/*
 * Active commit (QEMU's commit_active_start in block/mirror.c): the top of
 * a chain is in use, so its data goes into the base the way a mirror goes
 * into its target — a mirror_top filter above the top, a copy of what the
 * layers above the base allocate, READY, then job-complete moves the top's
 * users onto the base. Writes made meanwhile are copied as in a mirror.
 *
 * The base is made writable first (block/chain.ts reopenReadWrite opens a
 * writable twin; the twin takes over the base's node name and ownership, so
 * QMP names keep working). The job's edge on the base shares everything:
 * the layer above still reads it as its backing. The base grows to the
 * top's length when shorter. After the pivot the committed layers are
 * unreferenced (user-owned ones stay open, as blockdev nodes do), and an
 * overlay left on the base names it in its header (`backingFile`, default
 * the base's filename).
 *
 * Signature (stable, called by block-commit):
 *   startActiveCommit(ctx, { jobId, top, base, speed?, onError?,
 *     filterNodeName?, autoFinalize?, autoDismiss?, backingFile? }): Promise<Job>
 */
import { Perm } from '../block/flags.js';
import type { BlockGraph } from '../block/graph.js';
import type { BlockNode } from '../block/node.js';
import { reopenReadWrite } from '../block/chain.js';
import type { Job, OnErrorPolicy } from './job.js';
import { startMirrorJob, type MirrorCtx } from './mirror.js';

export interface ActiveCommitOptions {
  jobId: string;
  top: BlockNode;
  base: BlockNode;
  speed?: number;
  onError?: OnErrorPolicy;
  filterNodeName?: string;
  autoFinalize?: boolean;
  autoDismiss?: boolean;
  backingFile?: string;
}

export async function startActiveCommit(ctx: MirrorCtx, opts: ActiveCommitOptions): Promise<Job> {
  ctx.jobs.checkNewId(opts.jobId);
  const base = await writableInPlace(ctx.graph, opts.base);
  return startMirrorJob(
    ctx,
    {
      jobId: opts.jobId,
      source: opts.top,
      target: base,
      sync: 'full',
      speed: opts.speed,
      onSourceError: opts.onError,
      onTargetError: opts.onError,
      filterNodeName: opts.filterNodeName,
      autoFinalize: opts.autoFinalize,
      autoDismiss: opts.autoDismiss,
    },
    { type: 'commit', dirtyMode: 'above-target', targetShared: Perm.ALL, backingFile: opts.backingFile },
  );
}

/** A writable base under the same node name and ownership (see the note at the top). */
async function writableInPlace(graph: BlockGraph, base: BlockNode): Promise<BlockNode> {
  if (!base.readOnly) return base;
  const { nodeName, userOwned, autoNamed } = base;
  const twin = await reopenReadWrite(graph, base);
  if (userOwned) {
    base.userOwned = false;
    await graph.unref(base);
  }
  twin.userOwned = userOwned;
  if (!autoNamed && graph.nodes.get(nodeName) === undefined) {
    graph.nodes.delete(twin.nodeName);
    twin.nodeName = nodeName;
    graph.nodes.set(nodeName, twin);
  }
  return twin;
}
