/*
 * Active commit (QEMU's commit_active_start in block/mirror.c): the top of
 * a chain is in use, so its data goes into the base the way a mirror goes
 * into its target — a mirror_top filter above the top, a copy of what the
 * layers above the base allocate, READY, then job-complete moves the top's
 * users onto the base. Writes made meanwhile are copied as in a mirror.
 *
 * The base is made writable first, in place (block/reopen.ts, as
 * commit_active_start), and read-only again if the set-up fails. Later
 * only the pivot changes it, as for any mirror (mirror_exit_common): the
 * base takes the read-only state of the top it replaces, so a read-only
 * top leaves a read-only base; a cancelled or failed job leaves the base
 * writable, as QEMU 7.2 does. The job's edge on the base shares everything:
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
import type { BlockNode } from '../block/node.js';
import { reopenSetReadOnly } from '../block/reopen.js';
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
  const { base } = opts;
  const baseWasReadOnly = base.readOnly;
  if (baseWasReadOnly) await reopenSetReadOnly(base, false);
  try {
    return await startMirrorJob(
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
  } catch (e) {
    // error_restore_flags: the set-up's error is the one reported.
    if (baseWasReadOnly) await reopenSetReadOnly(base, true).catch(() => undefined);
    throw e;
  }
}
