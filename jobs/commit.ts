/*
 * The intermediate commit job (QEMU's block/commit.c, block-commit with a
 * `top` below the active layer): copy into `base` everything the images
 * from `top` down to (not including) `base` allocate, then make `base` the
 * backing image of `top`'s overlays and drop the committed images.
 *
 * Set-up (startCommit, in commit_start's order): the caller has resolved
 * top and base (base below top). The job is created, a read-only base is
 * made writable in place (block/reopen.ts, as commit_start's
 * bdrv_reopen_set_read_only) — and read-only again when the job ends,
 * whatever the outcome, or when the set-up fails (commit_clean; a failure
 * to do so is ignored, as in QEMU) — then a `commit_top` filter
 * (drivers/commit-top.ts; named `filter-node-name`, else automatically)
 * is inserted above top: the overlays of top now read through it. The
 * job's permissions (commit_start, jobs/block-job.ts): an 'intermediate
 * node' edge on every node from top down to (not including) base, sharing
 * write and write unchanged (the job's own writes to base pass through the
 * chain above it) but not consistent read — those images stop being
 * consistent views — except on filters right above base; a BlockBackend
 * on base taking consistent read and write, and resize only when base is
 * shorter than top, sharing consistent read and write unchanged; and a
 * BlockBackend on top taking nothing and sharing everything, to read.
 *
 * Run: the base grows to top's length if it is shorter (never shrinks);
 * then chain-copy.ts's loop asks block status from top down to base for
 * each stretch and copies (read through top, plain write into base) only
 * what a committed image allocates, so the cost grows with the data. As in
 * QEMU's commit_run, `ignore` retries a failed stretch, progress counts the
 * whole length, and a stretch that was not copied costs no rate budget.
 *
 * Prepare (after success; bdrv_drop_intermediate): each overlay of top —
 * a node whose backing edge points at the filter — gets its header rewritten to
 * name `backingFile` if given, else the base's filename, with the base's
 * format (a read-only overlay is reopened read-write for that and
 * read-only again: block/chain.ts updateBackingName), and its backing edge
 * moved to base; the filter and the committed images, which nothing
 * references any more, are closed. The committed images are no longer
 * consistent views (base changed under them), as in QEMU. On failure or cancel the filter is taken out (its parents move back
 * onto top) and the graph is otherwise left alone: base holds a mix, top
 * still reads the same.
 *
 * Active commit (top is the device's active layer) is mirror's business:
 * jobs/mirror.ts.
 */
import { updateBackingName } from '../block/chain.js';
import { Perm } from '../block/flags.js';
import { truncate } from '../block/io.js';
import { BlockNode, ChildRole, detachChild, replaceChildNode, type BdrvChild } from '../block/node.js';
import { blockStatusAbove } from '../block/status.js';
import { reopenSetReadOnly } from '../block/reopen.js';
import { insertCommitTop, removeCommitTop } from '../drivers/commit-top.js';
import { runChainCopy } from './chain-copy.js';
import type { Job, JobDriver, OnErrorPolicy } from './job.js';
import { addIntermediateEdges, createBlockJob, jobBackend, JobEdges, type BlockJobOptions, type JobContext } from './block-job.js';

export interface CommitOptions extends BlockJobOptions {
  /** The node named as `device` (commit_start's bs, the job's main node), held by the job; default: top. */
  device?: BlockNode;
  top: BlockNode;
  base: BlockNode;
  backingFile?: string;
  onError?: OnErrorPolicy;
  /** Node name of the commit_top filter (default: automatic). */
  filterNodeName?: string;
}

interface CommitState {
  ctx: JobContext;
  top: BlockNode;
  base: BlockNode;
  backingFile: string | undefined;
  onError: OnErrorPolicy;
  filter: BlockNode | null;
  topEdge: BdrvChild | null;
  baseEdge: BdrvChild | null;
  /** The job's child_job edges on top..base (set once the job exists). */
  edges: JobEdges | null;
  /** The base was read-only: it is made so again at the end (commit_clean). */
  baseWasReadOnly: boolean;
}

/** Creates and starts an intermediate commit job (see the note at the top). */
export async function startCommit(ctx: JobContext, opts: CommitOptions): Promise<Job> {
  ctx.jobs.checkNewId(opts.jobId);
  const s: CommitState = { ctx, top: opts.top, base: opts.base, backingFile: opts.backingFile, onError: opts.onError ?? 'report', filter: null, topEdge: null, baseEdge: null, edges: null, baseWasReadOnly: false };
  const baseResize = s.base.totalBytes < s.top.totalBytes ? Perm.RESIZE : 0;
  const job = createBlockJob(ctx, commitDriver(s), opts, [...new Set([opts.device ?? opts.top, opts.top, opts.base])]);
  try {
    if (s.base.readOnly) {
      await reopenSetReadOnly(s.base, false);
      s.baseWasReadOnly = true;
    }
    s.filter = await insertCommitTop(ctx.graph, s.top, opts.filterNodeName);
    s.edges = new JobEdges(job);
    addIntermediateEdges(s.edges, s.top, s.base);
    s.baseEdge = jobBackend(s.base, Perm.CONSISTENT_READ | Perm.WRITE | baseResize, Perm.CONSISTENT_READ | Perm.WRITE_UNCHANGED);
    s.topEdge = jobBackend(s.top, 0, Perm.ALL);
  } catch (e) {
    await commitClean(s);
    job.earlyFail();
    throw e;
  }
  job.start();
  return job;
}

/** The job's edges go, and the filter if prepare did not drop it (commit_abort, commit_clean). */
async function releaseEdges(s: CommitState): Promise<void> {
  if (s.topEdge) detachChild(s.topEdge);
  if (s.baseEdge) detachChild(s.baseEdge);
  s.topEdge = s.baseEdge = null;
  s.edges?.removeAll();
  const filter = s.filter;
  s.filter = null;
  if (filter) await removeCommitTop(s.ctx.graph, filter);
}

/** commit_clean: the job's edges (and the filter) go, then a read-only base is so again. */
async function commitClean(s: CommitState): Promise<void> {
  await releaseEdges(s);
  if (!s.baseWasReadOnly) return;
  s.baseWasReadOnly = false;
  await reopenSetReadOnly(s.base, true).catch(() => undefined);
}

function commitDriver(s: CommitState): JobDriver {
  return {
    type: 'commit',
    run: (job) => commitRun(job, s),
    prepare: () => dropIntermediate(s),
    clean: () => commitClean(s),
  };
}

async function commitRun(job: Job, s: CommitState): Promise<void> {
  const lengthBytes = s.top.totalBytes;
  if (s.base.totalBytes < lengthBytes) await truncate(s.baseEdge!, lengthBytes, false, 'off');
  await runChainCopy(job, {
    read: s.topEdge!,
    write: s.baseEdge!,
    lengthBytes,
    onError: s.onError,
    ignoreMeans: 'retry',
    decide: async (offset, maxBytes) => {
      const st = await blockStatusAbove(s.top, s.base, offset, maxBytes, false);
      return { copy: st.depth > 0, bytes: st.pnum };
    },
  });
}

/** The nodes whose backing edge points at `node`, with those edges. */
function overlayEdges(node: BlockNode): BdrvChild[] {
  return node.parents.filter((e) => e.role & ChildRole.COW && e.parent instanceof BlockNode);
}

/** bdrv_drop_intermediate: overlays of top (now the filter's parents) back onto base; the filter and the committed images close. */
async function dropIntermediate(s: CommitState): Promise<void> {
  // commit_prepare: the base's BlockBackend goes first; the committed images drop out below.
  if (s.baseEdge) detachChild(s.baseEdge);
  s.baseEdge = null;
  s.edges?.removeAll();
  const base = s.base.skipFilters();
  const name = s.backingFile ?? base.filename;
  const above = s.filter ?? s.top;
  for (const edge of overlayEdges(above)) {
    await updateBackingName(edge.parent as BlockNode, name, base.driver.name);
    replaceChildNode(edge, s.base);
  }
  if (s.topEdge) detachChild(s.topEdge);
  s.topEdge = null;
  if (s.filter && s.filter.parents.length === 0) {
    await s.ctx.graph.closeNode(s.filter);
    s.filter = null;
  }
  await s.ctx.graph.unref(s.top);
}
