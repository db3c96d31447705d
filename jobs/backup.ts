/*
 * The backup job (QEMU's block/backup.c, blockdev-backup): the target ends
 * as the source was when the job started, while the source stays in use.
 *
 * Set-up (startBackup): the job's cluster is the larger of 64 KiB and the
 * target's cluster size. A copy-before-write filter node
 * (block/copy-before-write.ts; named `filterNodeName` or automatically) is
 * opened over the source and the target, and every parent of the source is
 * moved onto it, so no write reaches the source without its old clusters
 * being copied first. The copy bitmap says what the target still lacks:
 *   full    every cluster;
 *   top     the clusters the source image itself allocates (the rest is the
 *           backing chain's, which the target is expected to share);
 *   bitmap  the user bitmap's dirty clusters (incremental is bitmap with
 *           bitmap-mode on-success);
 *   none    every cluster, but the job copies nothing itself: only writes
 *           copy (fleecing); it runs until cancelled.
 * A user bitmap is busy while the job runs; it stops recording and a hidden
 * successor bitmap records the writes made meanwhile, as QEMU's
 * create_successor. Progress is the copy bitmap's dirty bytes at the start,
 * advanced by every copy (the filter's included).
 *
 * Run: walk the copy bitmap's dirty areas from the start until none is
 * left, copying a piece at a time (copies the filter made meanwhile are
 * skipped), sleeping for the speed limit after each piece. With a speed
 * limit, zero runs go in chunks like data (QEMU's block-copy charges each
 * task, zeroes included), so a mostly empty source takes its length at the
 * speed; without one a zero run is one piece. A failed piece
 * goes through on-source-error (read) or on-target-error (write): `stop`
 * pauses and retries after resume, `ignore` retries, `report` fails.
 *
 * End: on success with bitmap-mode on-success or always, the user bitmap
 * becomes the successor (the writes made during the job: what the next
 * incremental backup needs); otherwise (failure, cancel, or never) the
 * successor is merged back into it; on failure with always, the clusters
 * the job did not copy are merged in too. Then the filter is taken out
 * (parents back onto the source) and closed, the target flushed.
 *
 * Left out: discard-source, x-perf, on-cbw-error (QEMU 8+); copy offload.
 * Guest writes racing a failing copy fail with the copy's error, as QEMU
 * 7.2's filter does.
 */
import { BlockCopy, CopyError, cbwChildren, setCopyState } from '../block/copy-before-write.js';
import { BitmapCheck, createDirtyBitmap, releaseDirtyBitmap, requireBitmap, type DirtyBitmap } from '../block/dirty-bitmap.js';
import { BlockError, toBlockError } from '../block/errors.js';
import { flush } from '../block/io.js';
import { replaceChildNodes, type BlockNode } from '../block/node.js';
import type { BlockdevRef } from '../block/options.js';
import { isAllocated } from '../block/status.js';
import { JobError, type Job, type JobDriver, type OnErrorPolicy } from './job.js';
import { createBlockJob, type BlockJobOptions, type JobContext } from './block-job.js';

/** QEMU's BACKUP_CLUSTER_SIZE_DEFAULT. */
export const BACKUP_CLUSTER_MIN_BYTES = 64 * 1024;
/** How long a sync=none job sleeps between looks at its cancel flag (a verb wakes it sooner). */
const IDLE_SLEEP_MS = 1000;

export type BackupSync = 'full' | 'top' | 'none' | 'bitmap';
export type BitmapMode = 'on-success' | 'never' | 'always';

export interface BackupOptions extends BlockJobOptions {
  source: BlockNode;
  target: BlockNode;
  sync: BackupSync;
  bitmap?: DirtyBitmap;
  bitmapMode?: BitmapMode;
  compress?: boolean;
  onSourceError?: OnErrorPolicy;
  onTargetError?: OnErrorPolicy;
  filterNodeName?: string;
}

interface BackupState {
  ctx: JobContext;
  opts: BackupOptions;
  filter: BlockNode | null;
  copier: BlockCopy | null;
  successor: DirtyBitmap | null;
  bitmapWasDisabled: boolean;
}

/** backup_job_create's checks, with QEMU's texts. */
function checkBackup(o: BackupOptions): void {
  if (o.source === o.target) throw new JobError('Source and target cannot be the same');
  if (o.compress && !o.target.driver.has.pwritevCompressed) throw new JobError('Compression is not supported for this drive '); // QEMU names the device: none for a node
  if (o.source.totalBytes !== o.target.totalBytes) throw new JobError('Source and target image have different sizes');
  if (o.bitmap) requireBitmap(o.bitmap, BitmapCheck.DEFAULT);
}

/** Creates and starts a backup job (see the note at the top). */
export async function startBackup(ctx: JobContext, opts: BackupOptions): Promise<Job> {
  const job = await createBackup(ctx, opts);
  job.start();
  return job;
}

/**
 * Sets a backup job up without starting it (a transaction's prepare): the
 * filter is in place and the bitmaps frozen, so this is the job's point in
 * time. Start it with job.start(), or undo it with job.cancel(true).
 */
export async function createBackup(ctx: JobContext, opts: BackupOptions): Promise<Job> {
  ctx.jobs.checkNewId(opts.jobId);
  checkBackup(opts);
  const s: BackupState = { ctx, opts, filter: null, copier: null, successor: null, bitmapWasDisabled: false };
  const job = createBlockJob(ctx, backupDriver(s), opts, [opts.source, opts.target]);
  try {
    await insertFilter(s, job);
    await fillCopyBitmap(s);
  } catch (e) {
    await removeFilter(s);
    job.earlyFail();
    throw e;
  }
  // The filter is the job's main node in QEMU (block_job_create on the cbw node).
  job.holdNode(s.filter!);
  freezeBitmap(s);
  job.progressSetRemaining(s.copier!.copyBitmap.dirtyBytes);
  return job;
}

function clusterBytesFor(target: BlockNode): number {
  return Math.max(BACKUP_CLUSTER_MIN_BYTES, target.driver.getInfo(target)?.clusterBytes ?? 0);
}

async function insertFilter(s: BackupState, job: Job): Promise<void> {
  const { source, target, filterNodeName } = s.opts;
  const options: Record<string, unknown> = { driver: 'copy-before-write', file: source.nodeName, target: target.nodeName };
  if (filterNodeName !== undefined) options['node-name'] = filterNodeName;
  const parents = [...source.parents];
  const filter = await s.ctx.graph.openNode(options as BlockdevRef);
  s.filter = filter;
  const { file, target: targetEdge } = cbwChildren(filter);
  s.copier = new BlockCopy(file, targetEdge, {
    clusterBytes: clusterBytesFor(target),
    compress: s.opts.compress ?? false,
    onCopied: (bytes) => job.progressUpdate(bytes),
  });
  replaceChildNodes(parents, filter);
  setCopyState(filter, s.copier);
}

/** Takes the filter out: its parents go back onto the source, then it closes. */
async function removeFilter(s: BackupState): Promise<void> {
  const filter = s.filter;
  if (!filter) return;
  s.filter = null;
  setCopyState(filter, null);
  replaceChildNodes([...filter.parents], s.opts.source);
  await s.ctx.graph.closeNode(filter);
}

async function fillCopyBitmap(s: BackupState): Promise<void> {
  const copyBitmap = s.copier!.copyBitmap;
  const { sync, bitmap, source } = s.opts;
  if (sync === 'bitmap') {
    copyBitmap.mergeFrom(bitmap!);
    return;
  }
  if (sync !== 'top') {
    copyBitmap.setDirty(0, copyBitmap.sizeBytes);
    return;
  }
  for (let offset = 0; offset < source.totalBytes; ) {
    const st = await isAllocated(source, offset, source.totalBytes - offset);
    if (!(st.pnum > 0)) throw new BlockError('EIO', `Block status made no progress at offset ${offset}`);
    if (st.allocated) copyBitmap.setDirty(offset, st.pnum);
    offset += st.pnum;
  }
}

/** create_successor: the user bitmap stops recording and is busy; a hidden one records instead. */
function freezeBitmap(s: BackupState): void {
  const bm = s.opts.bitmap;
  if (!bm) return;
  s.bitmapWasDisabled = bm.disabled;
  s.successor = createDirtyBitmap(s.opts.source, bm.granularityBytes, null);
  s.successor.disabled = bm.disabled;
  bm.disabled = true;
  bm.busy = true;
}

/** backup_cleanup_sync_bitmap (see the note at the top). */
function settleBitmap(s: BackupState, succeeded: boolean): void {
  const bm = s.opts.bitmap;
  const successor = s.successor;
  if (!bm || !successor) return;
  const mode = s.opts.bitmapMode ?? 'on-success';
  const sync = (succeeded || mode === 'always') && mode !== 'never';
  if (sync) bm.clear();
  bm.mergeFrom(successor);
  if (!succeeded && mode === 'always') bm.mergeFrom(s.copier!.copyBitmap);
  releaseDirtyBitmap(s.opts.source, successor);
  s.successor = null;
  bm.disabled = s.bitmapWasDisabled;
  bm.busy = false;
}

function backupDriver(s: BackupState): JobDriver {
  return {
    type: 'backup',
    run: (job) => (s.opts.sync === 'none' ? idleUntilCancelled(job) : backupRun(job, s)),
    commit: () => settleBitmap(s, true),
    abort: () => settleBitmap(s, false),
    clean: async () => {
      await removeFilter(s);
      await flush(s.opts.target);
    },
  };
}

async function idleUntilCancelled(job: Job): Promise<void> {
  while (!job.isCancelled()) {
    await job.sleep(IDLE_SLEEP_MS);
    await job.pausePoint();
  }
}

async function backupRun(job: Job, s: BackupState): Promise<void> {
  const copier = s.copier!;
  for (;;) {
    await job.pausePoint();
    if (job.isCancelled()) return;
    const area = copier.copyBitmap.nextDirtyArea(0, copier.lengthBytes);
    if (!area) return;
    let copied = 0;
    try {
      copied = await copier.copyFirstOf(area.offset, area.bytes, job.speed > 0 ? copier.chunkBytes : undefined);
    } catch (e) {
      const err = e instanceof CopyError ? e : new CopyError(true, toBlockError(e));
      const policy = (err.isRead ? s.opts.onSourceError : s.opts.onTargetError) ?? 'report';
      if (job.errorAction(err, err.isRead, policy) === 'report') throw err;
    }
    await job.rateLimit(copied);
  }
}
