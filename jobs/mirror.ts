/*
 * The mirror job and active commit (QEMU's block/mirror.c).
 *
 * Public entry points (stable; the QMP commands and block-commit call them):
 *   startMirror(ctx: MirrorCtx, opts: MirrorOptions): Promise<Job>
 *   startActiveCommit(ctx: MirrorCtx, opts: { jobId: string; top: BlockNode;
 *     base: BlockNode; speed?: number; onError?: OnErrorPolicy;
 *     filterNodeName?: string; autoFinalize?: boolean; autoDismiss?: boolean;
 *     backingFile?: string }): Promise<Job>          (jobs/mirror-commit.ts)
 * Both do the set-up QEMU's mirror_start_job does (checks, filter, bitmap,
 * edges), start the job and return it; a set-up failure throws with QEMU's
 * text and the job goes created → null. They are async because opening
 * the filter node (and reopening a read-only base) is.
 *
 * Set-up: a `mirror_top` filter (drivers/mirror-top.ts) is opened above the
 * source and every parent of the source (exports' BlockBackends, overlays)
 * moves onto it; the job writes the target through its own edge; an
 * anonymous dirty bitmap at `granularity` hangs off the filter. The job's
 * permissions (mirror_start_job, jobs/block-job.ts): the target edge takes
 * write (resize when shorter) and shares write unchanged only (everything
 * but resize for active commit); its BlockBackend on the filter takes
 * consistent read and shares no resize; a 'source' edge on the source
 * shares the same; active commit adds 'intermediate node' edges from below
 * the top down to the base, as intermediate commit does. The bitmap
 * is disabled for the gate: the filter's hooks (`write` below) mark it, so
 * the copy mode alone decides what a guest write does:
 *   background      the write goes to the source, then its range is dirty;
 *   write-blocking  the write claims its granules (waiting for copies of
 *                   them), goes to the source, then to the target; granules
 *                   it covers whole become clean; a target failure only
 *                   dirties the range (and asks the error policy). A
 *                   discard leaves undefined content, so it is handled
 *                   as in background mode (the range is copied later).
 * `change({copy-mode})` switches between the two modes at run time.
 *
 * run(): with zero_target (sync=full; the QMP layer decides as QEMU's
 * blockdev.c: always for blockdev-mirror, for drive-mirror when the target
 * existed or has no zero init), a target that can write zeroes with unmap
 * (qcow2 v3 opened with discard=unmap, no backing) is zeroed first in
 * requests of ZERO_REQUEST_MAX_BYTES that count no progress, then what the
 * source's chain allocates is dirty; any other target gets the whole
 * length dirty (copied: zero areas as write-zeroes). Then initial dirtying
 * by mode (mirror-dirty.ts; its cost grows with the allocated data, not
 * the virtual size), then the copy loop: up to IN_FLIGHT_MAX ops, data
 * ops of at most IO_MAX_BYTES with buf-size bytes of buffers in all, a
 * run without data one op of up to buf-size (QEMU's mirror_iteration),
 * each claiming its range and clearing its granules before reading (a
 * write landing meanwhile dirties them again), choosing by block status
 * through the source's chain: zero → write zeroes (MAY_UNMAP with unmap,
 * kept whatever the target's discard option: QEMU's job writes through a
 * BlockBackend, whose write-zeroes does not drop it),
 * no data → discard (or zeroes), else read + write into a buffer reused
 * from op to op (CopyBuffers: a fresh 1 MiB per op cost zero-filling and
 * garbage collection, a quarter of the job's time). Progress: total =
 * done + dirty + in flight, so it grows with new writes. Clean and idle ⇒
 * READY. After READY new writes keep being copied until job-complete or
 * a soft cancel: then, once what is dirty fits in buf-size, the source is
 * drained (guest writes wait), the rest copied, the target flushed, and
 * run() returns with the drain held. QEMU instead waits for a moment when
 * nothing is dirty before it drains, which a steady writer in background
 * mode may never give it; draining at buf-size converges whatever the
 * writer does, and holds guests for at most one buffer of copying.
 *
 * Exit (mirror_exit_common), from prepare on success or abort: hooks off,
 * bitmap released, the job's target edge dropped; the filter is drained
 * and stopped (it takes nothing of its child from now on); unless the job
 * failed, drive-mirror's target gets its backing image (targetBacking); on complete
 * (not on a soft cancel) the target is reopened with the read-only state
 * of `replaces` (default: the source) if it differs (block/reopen.ts), and
 * the parents of `replaces` (the source's only parent is then the filter;
 * the job's own edges stay) move onto the target; the job's edges go; the
 * filter's parents move onto the filter's child (the target after a
 * pivot, else the source) and the filter closes; the drains end. Source and target are
 * unref'd: user-owned (blockdev-add) nodes and nodes with users stay open
 * (drive-mirror's target closes after a cancel). Active commit also rewrites
 * the backing file name in any overlay now sitting on the base.
 *
 * Errors of copy ops follow on-source-error (reads) and on-target-error
 * (writes) through job.errorAction: report fails the job; ignore leaves the
 * range dirty, to be retried after IGNORE_RETRY_MS; stop pauses the job,
 * which retries after job-resume.
 *
 * Left out: `replaces` checks at complete time, BLOCK_JOB's
 * `actively-synced` (8.2; QEMU 7.2 does not report it), target cluster
 * alignment of copy ops;
 * the initial zeroing runs one request at a time (QEMU keeps up to
 * MAX_IN_FLIGHT of them in flight).
 */
import { BlockError, toBlockError } from '../block/errors.js';
import { Perm, Req, Status, alignDown, isPowerOfTwo } from '../block/flags.js';
import { flush, pdiscard, preadv, pwriteZeroes, pwritev, truncate } from '../block/io.js';
import { BlockNode, detachChild, type BdrvChild } from '../block/node.js';
import { createDirtyBitmap, defaultBitmapGranularity, releaseDirtyBitmap, type DirtyBitmap } from '../block/dirty-bitmap.js';
import { drainedBegin, drainedEnd } from '../block/drain.js';
import { blockStatusAbove, type ChainStatusResult } from '../block/status.js';
import { moveParents, replaceNode } from '../block/replace.js';
import { backingChainNext, changeBackingFile, openStoredBacking, setBackingNode } from '../block/chain.js';
import { reopenSetReadOnly } from '../block/reopen.js';
import type { BlockGraph } from '../block/graph.js';
import { insertMirrorTop, mirrorTopChild, setMirrorTopHooks, stopMirrorTop, type GuestWrite, type MirrorTopHooks } from '../drivers/mirror-top.js';
import { addIntermediateEdges, checkNodesFree, claimNodes, jobBackend, JobEdges } from './block-job.js';
import { JobError, type Job, type JobDriver, type OnErrorPolicy } from './job.js';
import type { JobRegistry } from './registry.js';
import { CopyBuffers, InFlightOps } from './mirror-ops.js';
import { dirtyInit, type DirtyInitMode } from './mirror-dirty.js';

/** What the job shares on the filter and the source (mirror_start_job): no resize, the length is read once. */
const MIRROR_JOB_SHARED = Perm.CONSISTENT_READ | Perm.WRITE_UNCHANGED | Perm.WRITE;
/** Largest copy op (QEMU's MAX_IO_BYTES). */
export const IO_MAX_BYTES = 1 << 20;
/** Copy ops in flight at once (MAX_IN_FLIGHT). */
export const IN_FLIGHT_MAX = 16;
/** Largest write-zeroes of the initial zeroing (QEMU: INT_MAX aligned down to the granularity). */
const ZERO_REQUEST_MAX_BYTES = 0x7fffffff;
/** Default buf-size (DEFAULT_MIRROR_BUF_SIZE). */
export const DEFAULT_BUF_BYTES = IN_FLIGHT_MAX * IO_MAX_BYTES;
/** Granularity bounds (blockdev_mirror_common). */
export const GRANULARITY_MIN_BYTES = 512;
export const GRANULARITY_MAX_BYTES = 64 << 20;
/** How long an idle READY loop waits before looking again (QEMU sleeps a slice). */
const IDLE_POLL_MS = 100;
/** Delay before retrying ranges whose copy failed under on-*-error=ignore. */
const IGNORE_RETRY_MS = 20;

export type MirrorSync = 'full' | 'top' | 'none';
export type CopyMode = 'background' | 'write-blocking';

export interface MirrorCtx {
  graph: BlockGraph;
  jobs: JobRegistry;
}

export interface MirrorOptions {
  jobId: string;
  source: BlockNode;
  target: BlockNode;
  sync: MirrorSync;
  /** Node whose parents move to the target on completion (default: the source). */
  replaces?: BlockNode;
  speed?: number;
  /** Bytes; 0 or absent: the default for the target. */
  granularity?: number;
  /** Bytes; 0 or absent: DEFAULT_BUF_BYTES. */
  bufSize?: number;
  onSourceError?: OnErrorPolicy;
  onTargetError?: OnErrorPolicy;
  filterNodeName?: string;
  copyMode?: CopyMode;
  /**
   * sync=full only: true zeroes the target first (or copies everything),
   * false trusts it to read as zeroes (QEMU's zero_target); absent: zero
   * areas are written only where the target does not read zeroes.
   */
  zeroTarget?: boolean;
  /** Discard / unmap zero areas on the target (default true). */
  unmap?: boolean;
  /**
   * drive-mirror (QEMU's backing_mode): the target was opened without its
   * backing image and gets one on exit, unless the job failed — 'source':
   * the source (sync none) or the source's backing image (sync top);
   * 'open': the backing file its header names. Absent (blockdev-mirror):
   * the target's chain is left as it is.
   */
  targetBacking?: 'source' | 'open';
  autoFinalize?: boolean;
  autoDismiss?: boolean;
}

/** Internal: what active commit changes in a mirror. */
export interface MirrorKind {
  type: 'mirror' | 'commit';
  dirtyMode: DirtyInitMode;
  /** Share everything on the target (it is a backing node in use). */
  targetShared: number;
  /** Rewrite backing names in overlays moved onto the target (commit: this name or the target's filename). */
  backingFile?: string;
}

/** Checks granularity and buf-size as blockdev_mirror_common / mirror_start_job do; returns granularity. */
export function checkMirrorSizes(target: BlockNode, granularity: number | undefined, bufSize: number | undefined): number {
  const g = granularity ?? 0;
  if (g !== 0 && (g < GRANULARITY_MIN_BYTES || g > GRANULARITY_MAX_BYTES)) {
    throw new JobError("Parameter 'granularity' expects a value in range [512B, 64MB]");
  }
  if (g !== 0 && !isPowerOfTwo(g)) throw new JobError("Parameter 'granularity' expects a power of 2");
  if (bufSize !== undefined && bufSize < 0) throw new JobError("Invalid parameter 'buf-size'");
  return g === 0 ? defaultBitmapGranularity(target) : g;
}

export class Mirror implements JobDriver, MirrorTopHooks {
  readonly type: 'mirror' | 'commit';
  job!: Job;
  filter!: BlockNode;
  bitmap!: DirtyBitmap;
  targetEdge: BdrvChild | null = null;
  /** The job's own BlockBackend on the filter (block_job_create's): consistent read, no resize shared. */
  private jobEdge: BdrvChild | null = null;
  /** The job's child_job edges: 'source', and for active commit 'intermediate node' down to the base. */
  private edges: JobEdges | null = null;
  readonly ops: InFlightOps;
  /** Ends the job loop's current wait (waitForWork), if it is waiting. */
  private wakeLoop: (() => void) | null = null;
  copyMode: CopyMode;
  private shouldComplete = false;
  private drainHeld = false;
  private exited = false;
  private failure: BlockError | null = null;
  private retryDelayDue = false;
  private cursorBytes = 0;
  /** A run of source data zeroRunBytes saw last, [start, end): ops inside it are sized as data without asking. */
  private knownDataStartBytes = 0;
  private knownDataEndBytes = 0;
  private readonly bufBytes: number;
  /** Copy buffers, reused from op to op (allocating 1 MiB per op costs zero-fill and GC). */
  private readonly buffers: CopyBuffers;

  constructor(
    private readonly graph: BlockGraph,
    readonly source: BlockNode,
    readonly target: BlockNode,
    private readonly opts: MirrorOptions,
    readonly granularityBytes: number,
    private readonly kind: MirrorKind,
  ) {
    this.type = kind.type;
    this.copyMode = opts.copyMode ?? 'background';
    this.bufBytes = Math.max(opts.bufSize || DEFAULT_BUF_BYTES, granularityBytes);
    this.ops = new InFlightOps(granularityBytes, () => this.wake());
    // The largest op issueCopy makes: a granule, else up to IO_MAX_BYTES within buf-size.
    this.buffers = new CopyBuffers(Math.max(granularityBytes, Math.min(IO_MAX_BYTES, this.bufBytes)), IN_FLIGHT_MAX);
  }

  // ------------------------------------------------------------ set-up

  /** Filter, bitmap, edges, parents moved (mirror_start_job); undone on failure. */
  async setUp(job: Job): Promise<void> {
    this.job = job;
    this.filter = await insertMirrorTop(this.graph, this.source, this.opts.filterNodeName ?? null);
    try {
      const resize = this.target.totalBytes < this.source.totalBytes ? Perm.RESIZE : 0;
      // QEMU's mirror writes through a BlockBackend of its own: "an unnamed block device" as 'root'.
      this.targetEdge = jobBackend(this.target, Perm.WRITE | resize, this.kind.targetShared);
      this.bitmap = createDirtyBitmap(this.filter, this.granularityBytes, null);
      this.bitmap.disabled = true;
      setMirrorTopHooks(this.filter, this);
      await replaceNode(this.source, this.filter);
      this.jobEdge = jobBackend(this.filter, Perm.CONSISTENT_READ, MIRROR_JOB_SHARED);
      this.edges = new JobEdges(job);
      this.edges.add('source', this.source, MIRROR_JOB_SHARED);
      const below = this.source.filterOrCowNode;
      if (this.kind.type === 'commit' && below) addIntermediateEdges(this.edges, below, this.target);
    } catch (e) {
      await this.exit(false, true);
      throw e;
    }
  }

  // ------------------------------------------------------------ guest writes (filter hooks)

  async write(req: GuestWrite): Promise<void> {
    const edge = this.targetEdge;
    if (this.copyMode === 'background' || !edge || req.discard) {
      try {
        await req.toSource();
      } finally {
        this.markDirty(req.offsetBytes, req.bytes);
      }
      return;
    }
    const op = await this.ops.claim(req.offsetBytes, req.bytes, true);
    try {
      try {
        await req.toSource();
      } catch (e) {
        this.markDirty(req.offsetBytes, req.bytes);
        throw e;
      }
      await this.writeTargetToo(req, edge);
    } finally {
      this.ops.end(op);
    }
  }

  /** do_sync_target_write: the target gets the same write; whole granules become clean. */
  private async writeTargetToo(req: GuestWrite, edge: BdrvChild): Promise<void> {
    try {
      await req.toEdge(edge);
    } catch (e) {
      this.markDirty(req.offsetBytes, req.bytes);
      this.onError(toBlockError(e), false);
      return;
    }
    const g = this.granularityBytes;
    const start = Math.ceil(req.offsetBytes / g) * g;
    const end = Math.min(alignDown(req.offsetBytes + req.bytes, g), this.bitmap.sizeBytes);
    if (req.offsetBytes + req.bytes >= this.bitmap.sizeBytes) this.bitmap.resetDirty(start, this.bitmap.sizeBytes - start);
    else if (end > start) this.bitmap.resetDirty(start, end - start);
  }

  private markDirty(offsetBytes: number, bytes: number): void {
    if (this.bitmap.sizeBytes !== this.filter.totalBytes) this.bitmap.resize(this.filter.totalBytes);
    this.bitmap.setDirty(offsetBytes, bytes);
    this.wake();
  }

  // ------------------------------------------------------------ run

  async run(job: Job): Promise<void> {
    await this.growTarget();
    await dirtyInit(this, await this.initialDirtyMode(job));
    if (job.isCancelled()) return;
    await this.copyLoop(job);
    await this.ops.waitAll();
    if (this.failure) throw this.failure;
    if (this.drainHeld) await flush(this.target);
  }

  /** zero_target's part of mirror_dirty_init (see the note at the top); the mode left for dirtyInit. */
  private async initialDirtyMode(job: Job): Promise<DirtyInitMode> {
    const mode = this.kind.dirtyMode;
    if (mode !== 'full') return mode;
    if (this.opts.zeroTarget === undefined) return 'full-sparse';
    if (!this.opts.zeroTarget) return 'full';
    if (!canWriteZeroesWithUnmap(this.target)) return 'all';
    await this.zeroWholeTarget(job);
    return 'full';
  }

  /** Write-zeroes over the whole length, counting no progress; a failure dirties its range. */
  private async zeroWholeTarget(job: Job): Promise<void> {
    const lengthBytes = this.source.totalBytes;
    const chunkBytes = alignDown(ZERO_REQUEST_MAX_BYTES, this.granularityBytes);
    for (let at = 0; at < lengthBytes && !job.isCancelled(); ) {
      const n = Math.min(chunkBytes, lengthBytes - at);
      const op = await this.ops.claim(at, n, false);
      try {
        await pwriteZeroes(this.targetEdge!, at, n, this.unmap ? Req.MAY_UNMAP : 0, true);
      } catch (e) {
        this.markDirty(at, n);
        this.onError(toBlockError(e), false);
      } finally {
        this.ops.end(op);
      }
      at += n;
      await job.pausePoint();
    }
  }

  /** A target shorter than the source grows to its length (commit's base; mirror targets). */
  private async growTarget(): Promise<void> {
    if (this.target.totalBytes >= this.source.totalBytes) return;
    await truncate(this.targetEdge!, this.source.totalBytes, false, 'off');
  }

  private async copyLoop(job: Job): Promise<void> {
    for (;;) {
      if (this.failure) return;
      if (job.isCancelled()) return;
      const dirty = this.bitmap.dirtyBytes;
      job.progressSetRemaining(this.ops.copyBytes + dirty + this.ops.activeBytes);
      if (this.retryDelayDue) {
        this.retryDelayDue = false;
        await job.sleep(IGNORE_RETRY_MS);
      }
      if (dirty > 0 && this.roomForCopy()) {
        const issued = await this.issueCopy();
        if (issued > 0) {
          await job.rateLimit(issued);
          continue;
        }
      }
      if (this.finalPhaseDue(dirty)) {
        // Our own drain: it pauses other jobs on the source's ancestors, never this one.
        await job.ownDrainBegin(() => drainedBegin(this.source));
        this.drainHeld = true;
        continue;
      }
      if (dirty === 0 && this.ops.count === 0) {
        if (!job.isReady()) job.transitionToReady();
        if (this.drainHeld) return;
      }
      await this.waitForWork();
      await job.pausePoint();
    }
  }

  private roomForCopy(): boolean {
    return this.ops.copyCount < IN_FLIGHT_MAX && this.ops.bufferBytes < this.bufBytes;
  }

  /** Waits for an op to end, a guest write, a verb, or a poll interval (one waiter at a time: memory stays flat). */
  private waitForWork(): Promise<void> {
    return new Promise<void>((resolve) => {
      const done = (): void => {
        clearTimeout(timer);
        this.wakeLoop = null;
        resolve();
      };
      const timer = setTimeout(done, IDLE_POLL_MS);
      this.wakeLoop = done;
    });
  }

  private wake(): void {
    this.wakeLoop?.();
  }

  /**
   * Time to hold guest writes and copy the rest: complete (or a soft
   * cancel) was asked, the job is READY, and what is left fits in one
   * buffer, so guests wait for at most buf-size bytes of copying.
   */
  private finalPhaseDue(dirtyBytes: number): boolean {
    if (this.drainHeld || !this.job.isReady()) return false;
    if (!this.shouldComplete && !this.job.cancelRequested()) return false;
    return dirtyBytes + this.ops.copyBytes <= this.bufBytes;
  }

  // ------------------------------------------------------------ copy ops

  /** Claims the next dirty run and starts copying it; returns the bytes claimed (0: none now). */
  private async issueCopy(): Promise<number> {
    const g = this.granularityBytes;
    let start = this.bitmap.nextDirty(this.cursorBytes);
    if (start < 0) start = this.bitmap.nextDirty(0);
    if (start < 0) return 0;
    start = alignDown(start, g);
    const zeroRunBytes = this.inKnownData(start) ? 0 : await this.zeroRunBytes(start);
    await this.ops.waitConflicts(start, g);
    // Re-check after the waits: an active write may have claimed the granule since.
    if (!this.bitmap.isDirty(start) || !this.roomForCopy() || this.ops.conflicting(start, g)) return 0;
    const zeroRun = zeroRunBytes >= g;
    const maxBytes = zeroRun ? Math.min(zeroRunBytes, this.bufBytes) : Math.max(g, Math.min(IO_MAX_BYTES, this.bufBytes - this.ops.bufferBytes));
    const size = this.bitmap.sizeBytes;
    // The dirty run from `start`, cut at maxBytes (in whole granules) and before the next op's granules.
    const limit = Math.min(size, start + Math.max(g, alignDown(maxBytes, g)), this.ops.nextClaimedAfter(start));
    const clean = this.bitmap.nextClean(start, limit - start);
    const end = clean < 0 ? limit : clean;
    this.cursorBytes = end >= size ? 0 : end;
    const op = this.ops.begin(start, end - start, false, zeroRun ? 0 : end - start);
    this.bitmap.resetDirty(start, end - start);
    void this.copyRange(start, end - start).finally(() => this.ops.end(op));
    return end - start;
  }

  /**
   * Sizes the next op (mirror_iteration): where the source has no data
   * from `start` (zeroes, unallocated), the whole run up to buf-size is
   * one op, as QEMU cuts only data at IO_MAX_BYTES; returns that run's
   * length in whole granules, 0 for data or when unknown. A run of data
   * seen here is remembered (knownDataEndBytes), so data ops do not ask
   * again. The answer may be stale once the op is claimed; it only sizes
   * the op: copyRange asks again after the granules were reset.
   */
  private async zeroRunBytes(start: number): Promise<number> {
    let st: ChainStatusResult;
    try {
      st = await blockStatusAbove(this.source, null, start, Math.min(this.bufBytes, this.source.totalBytes - start));
    } catch {
      return 0; // copyRange meets the failure and applies the error policy
    }
    if (!(st.status & Status.DATA)) return alignDown(st.pnum, this.granularityBytes);
    this.knownDataStartBytes = start;
    this.knownDataEndBytes = start + st.pnum;
    return 0;
  }

  private inKnownData(offsetBytes: number): boolean {
    return offsetBytes >= this.knownDataStartBytes && offsetBytes < this.knownDataEndBytes;
  }

  /**
   * Copies [offset, offset + bytes) piece by piece as block status says;
   * failures go to the policies. Data moves through one copy buffer in
   * pieces of at most its capacity (an op sized as a zero run may meet
   * data that a guest wrote meanwhile).
   */
  private async copyRange(offsetBytes: number, bytes: number): Promise<void> {
    const end = offsetBytes + bytes;
    let buffer: Uint8Array | null = null;
    try {
      for (let at = offsetBytes; at < end; ) {
        try {
          const st = await readSide(() => blockStatusAbove(this.source, null, at, end - at));
          let n = Math.max(1, Math.min(st.pnum, end - at));
          if (this.movesData(st.status)) {
            buffer ??= this.buffers.take(Math.min(bytes, this.buffers.capacityBytes));
            n = Math.min(n, buffer.length);
            await this.copyData(at, buffer.subarray(0, n));
          } else {
            await this.clearPiece(at, n, st.status);
          }
          this.job.progressUpdate(n);
          at += n;
        } catch (e) {
          this.markDirty(at, end - at);
          const isRead = e instanceof SourceFailure;
          this.onError(isRead ? e.error : toBlockError(e), isRead);
          return;
        }
      }
    } finally {
      if (buffer) this.buffers.give(buffer);
    }
  }

  /** Whether a piece with this block status is read and written (else clearPiece). */
  private movesData(status: number): boolean {
    return !(status & Status.ZERO) && ((status & Status.DATA) !== 0 || !this.unmap);
  }

  /** A piece with data: read from the source (through the filter), written to the target. */
  private async copyData(offsetBytes: number, buf: Uint8Array): Promise<void> {
    await readSide(() => preadv(mirrorTopChild(this.filter), offsetBytes, buf));
    await pwritev(this.targetEdge!, offsetBytes, buf);
  }

  /** A piece without data to move: zeroes (MAY_UNMAP with unmap), or a discard where the source has nothing. */
  private async clearPiece(offsetBytes: number, bytes: number, status: number): Promise<void> {
    if (status & Status.ZERO) await pwriteZeroes(this.targetEdge!, offsetBytes, bytes, this.unmap ? Req.MAY_UNMAP : 0, true);
    else await pdiscard(this.targetEdge!, offsetBytes, bytes);
  }

  get unmap(): boolean {
    return this.opts.unmap ?? true;
  }

  /** A failed request under the source/target policy (mirror_error_action). */
  private onError(err: BlockError, isRead: boolean): void {
    const policy = (isRead ? this.opts.onSourceError : this.opts.onTargetError) ?? 'report';
    const action = this.job.errorAction(err, isRead, policy);
    if (action === 'report') this.failure ??= err;
    else if (action === 'ignore') this.retryDelayDue = true;
    this.wake();
  }

  // ------------------------------------------------------------ verbs

  complete(): void {
    this.shouldComplete = true;
    this.wake();
  }

  /** A pause wants the loop at its pause point: the idle wait ends (QEMU's mirror sleeps there). */
  kick(): void {
    this.wake();
  }

  cancel(job: Job, force: boolean): boolean {
    this.wake();
    return force || !job.isReady();
  }

  /**
   * block-job-change {copy-mode}: each guest write looks at the mode when it
   * starts, so a switch takes effect with the next write either way. QEMU
   * (8.2+) only goes background → write-blocking; going back is ours: the
   * writes after it are copied later, as in any background mirror.
   */
  change(_job: Job, args: Record<string, unknown>): void {
    const wanted = args['copy-mode'];
    if (wanted === undefined) return;
    if (wanted !== 'background' && wanted !== 'write-blocking') throw new JobError(`Invalid copy mode '${String(wanted)}'`);
    this.copyMode = wanted;
  }

  // ------------------------------------------------------------ exit

  async prepare(): Promise<void> {
    await this.exit(this.shouldComplete, false);
  }

  async abort(): Promise<void> {
    await this.exit(false, true);
  }

  /** mirror_exit_common (see the note at the top). */
  private async exit(pivot: boolean, failed: boolean): Promise<void> {
    if (this.exited) return;
    this.exited = true;
    setMirrorTopHooks(this.filter, null);
    if (this.bitmap) releaseDirtyBitmap(this.filter, this.bitmap);
    if (this.targetEdge) detachChild(this.targetEdge);
    this.targetEdge = null;
    // The filter stops passing its users' permissions on, and stays drained until it is gone.
    await drainedBegin(this.filter);
    let moved: BdrvChild[] = [];
    let backingFailure: unknown = null;
    try {
      stopMirrorTop(this.filter);
      if (!failed) backingFailure = await this.attachTargetBacking().then(() => null, (e: unknown) => e);
      moved = await this.pivotAndRemoveFilter(pivot);
    } finally {
      drainedEnd(this.filter);
      if (this.drainHeld) this.job.ownDrainEnd(() => drainedEnd(this.source));
      this.drainHeld = false;
    }
    await this.graph.closeNode(this.filter);
    await this.rewriteBackingNames(moved);
    await this.graph.unref(this.source);
    await this.graph.unref(this.target);
    if (backingFailure) throw backingFailure;
  }

  /** drive-mirror's target gets its backing image (MirrorOptions.targetBacking); a failure fails the job after the exit. */
  private async attachTargetBacking(): Promise<void> {
    const image = this.target.skipFilters();
    if (this.opts.targetBacking === 'open') {
      await openStoredBacking(this.graph, image);
    } else if (this.opts.targetBacking === 'source') {
      await setBackingNode(this.graph, image, this.opts.sync === 'none' ? this.source : backingChainNext(this.source));
    }
  }

  /** The pivot (on complete), then the filter's users onto its child; returns the edges moved. */
  private async pivotAndRemoveFilter(pivot: boolean): Promise<BdrvChild[]> {
    let moved: BdrvChild[] = [];
    if (pivot) {
      const replaced = this.opts.replaces ?? this.source;
      // The target takes the replaced node's read-only state; a failure is ignored, as QEMU's.
      if (replaced.readOnly !== this.target.readOnly) await reopenSetReadOnly(this.target, replaced.readOnly).catch(() => undefined);
      await drainedBegin(this.target);
      try {
        moved = moveParents(replaced, this.target, this.edges?.all ?? []);
      } finally {
        drainedEnd(this.target);
      }
    }
    // block_job_remove_all_bdrv, and the job's BlockBackend lets go, before the filter goes.
    this.edges?.removeAll();
    if (this.jobEdge) detachChild(this.jobEdge);
    this.jobEdge = null;
    return moved.concat(moveParents(this.filter, mirrorTopChild(this.filter).node));
  }

  /** Active commit: overlays now backed by the base name it in their header. */
  private async rewriteBackingNames(moved: BdrvChild[]): Promise<void> {
    if (this.kind.type !== 'commit') return;
    const name = this.kind.backingFile ?? this.target.filename;
    for (const edge of moved) {
      const parent = edge.parent;
      if (edge.node !== this.target || !(parent instanceof BlockNode) || parent.cowChild !== edge) continue;
      await changeBackingFile(parent, name, this.target.driver.name, false);
    }
  }
}

/** bdrv_can_write_zeroes_with_unmap: no backing, opened with discard=unmap, and the driver says so. */
function canWriteZeroesWithUnmap(node: BlockNode): boolean {
  if (node.cowChild || !node.openFlags.unmap) return false;
  return node.driver.getInfo(node)?.canWriteZeroesWithUnmap === true;
}

/** A failure on the source side (on-source-error applies). */
class SourceFailure extends Error {
  constructor(readonly error: BlockError) {
    super(error.message);
  }
}

async function readSide<T>(fn: () => Promise<T>): Promise<T> {
  try {
    return await fn();
  } catch (e) {
    throw new SourceFailure(toBlockError(e));
  }
}

/** Set-up common to mirror and active commit: job, filter, start. */
export async function startMirrorJob(ctx: MirrorCtx, opts: MirrorOptions, kind: MirrorKind): Promise<Job> {
  const { source, target } = opts;
  const granularity = checkMirrorSizes(target, opts.granularity, opts.bufSize);
  if (source === target) throw new JobError("Can't mirror node into itself");
  ctx.jobs.checkNewId(opts.jobId);
  checkNodesFree([source, target]);
  const mirror = new Mirror(ctx.graph, source, target, opts, granularity, kind);
  const job = ctx.jobs.create(mirror, {
    id: opts.jobId,
    speed: opts.speed,
    autoFinalize: opts.autoFinalize,
    autoDismiss: opts.autoDismiss,
  });
  claimNodes(job, [source, target]);
  try {
    await mirror.setUp(job);
  } catch (e) {
    job.earlyFail();
    throw e;
  }
  // The filter is the job's main node in QEMU (block_job_create on mirror_top).
  job.holdNode(mirror.filter);
  job.start();
  return job;
}

/** blockdev-mirror / drive-mirror (see the note at the top). */
export function startMirror(ctx: MirrorCtx, opts: MirrorOptions): Promise<Job> {
  if (opts.speed !== undefined && opts.speed < 0) throw new JobError("Parameter 'speed' expects a non-negative value");
  const dirtyMode: DirtyInitMode = opts.sync === 'none' ? 'none' : opts.sync === 'top' ? 'top' : 'full';
  return startMirrorJob(ctx, opts, { type: 'mirror', dirtyMode, targetShared: Perm.WRITE_UNCHANGED });
}

export { startActiveCommit, type ActiveCommitOptions } from './mirror-commit.js';
