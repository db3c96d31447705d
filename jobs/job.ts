/*
 * The generic job: QEMU's job state machine (job.c, blockjob.c) driving a
 * kind's hook table (JobDriver).
 *
 * Life of a job, as QEMU's:
 *   created ──start──▶ running ⇄ paused            (pause points)
 *                      running ──▶ ready ⇄ standby (mirror-like jobs)
 *   run() returns ──▶ waiting ──▶ pending ──(auto-finalize or job-finalize)──▶
 *     prepare ──▶ commit | abort ──▶ clean ──▶ event ──▶ concluded
 *     ──(auto-dismiss or job-dismiss)──▶ null (gone from the registry).
 *   run() throws, a hard cancel, or prepare fails ──▶ aborting ──▶ abort ──▶
 *     clean ──▶ event ──▶ concluded ──▶ null.
 * Every visible transition emits JOB_STATUS_CHANGE {id, status}; block jobs
 * (commit, stream, mirror, backup) also emit BLOCK_JOB_READY, _PENDING
 * (only without auto-finalize), _COMPLETED (with `error` when it failed),
 * _CANCELLED and _ERROR, with `device` = the job id.
 *
 * Pausing is cooperative, as QEMU's job_pause/job_resume: a pause only
 * counts (pauseCount) and wakes the job if it sleeps (job_enter); the job's
 * own loop notices at its next pause point (`pausePoint`, also after
 * `rateLimit` sleeps) and waits there in paused/standby until the count is
 * back at 0 (or a cancel enters it). The count has two sources: the user's
 * pause (job-pause, an error with policy stop) and drains — the job holds
 * its nodes (`holdNode`, QEMU's child_job edges) and a drained section of
 * any of them or of a node below pauses it for as long as it lasts
 * (child_job_drained_begin/end); the drain waits until the job is not busy
 * (child_job_drained_poll). So every drained section of a node a running
 * job uses shows as a paused/running (standby/ready) pair, as in QEMU. A
 * drain the job itself holds (mirror's completion) never stops it. Cancel is a flag
 * the loop polls: `isCancelled()` is a hard cancel (stop now, abort);
 * `cancelRequested()` also sees a soft cancel — a mirror cancelled after
 * READY without `force` finishes cleanly without pivoting, and the job
 * reports COMPLETED, as QEMU 6.2+ does. Single jobs behave as one-job
 * transactions; `transaction` groups are not modelled yet.
 *
 * Kinds never touch the status: they run, report progress, call
 * `transitionToReady`, `rateLimit`, `pausePoint` and `errorAction`.
 */
import { Bucket, ThrottleState, WRITE, emptyThrottleConfig } from '../block/throttle.js';
import { BlockError, toBlockError } from '../block/errors.js';
import type { BlockNode, EdgeParent } from '../block/node.js';
import { canTransition, verbAllowed, type JobStatus, type JobType, type JobVerb } from './job-tables.js';

/** A user error of a job verb or of job creation (QMP GenericError). */
export class JobError extends Error {}

/** BlockdevOnError: what a job does when a request fails. */
export type OnErrorPolicy = 'report' | 'ignore' | 'enospc' | 'stop' | 'auto';
/** What the job does about one failed request (BlockErrorAction). */
export type ErrorAction = 'report' | 'ignore' | 'stop';
export type IoStatus = 'ok' | 'failed' | 'nospace';

/** Sink of QMP events (name, data); the daemon timestamps and sends them. */
export type JobEventSink = (event: string, data: Record<string, unknown>) => void;

/** The hooks a job kind supplies (QEMU's JobDriver / BlockJobDriver). */
export interface JobDriver {
  readonly type: JobType;
  /** The work; returns when done, throws a BlockError on failure. */
  run(job: Job): Promise<void>;
  /** job-complete (mirror, active commit); absent: the verb is refused. */
  complete?(job: Job): void;
  /** A cancel request: returns whether it is a hard one (QEMU's .cancel); default: always hard. */
  cancel?(job: Job, force: boolean): boolean;
  /** block-job-change / job-change arguments. */
  change?(job: Job, args: Record<string, unknown>): void;
  /** Before commit; a failure aborts the job. */
  prepare?(job: Job): Promise<void>;
  commit?(job: Job): Promise<void> | void;
  abort?(job: Job): Promise<void> | void;
  clean?(job: Job): Promise<void> | void;
  /** Extra BlockJobInfo members (mirror's `actively-synced`). */
  blockInfo?(job: Job): Record<string, unknown>;
  /** A pause wants the loop at its next pause point: end the kind's own idle wait (a sleeping job's job_enter). */
  kick?(job: Job): void;
}

export interface JobOptions {
  id: string;
  autoFinalize?: boolean;
  autoDismiss?: boolean;
  /** Bytes per second; 0 = unlimited. */
  speed?: number;
}

/**
 * A job's speed limit (bytes per second, 0 = none) on the throttle's leaky
 * bucket (block/throttle.ts, bps-total = speed), so job speeds and I/O
 * limits share one limiter. The job accounts what it just copied and
 * sleeps as long as the bucket is over its 100 ms burst.
 */
export class SpeedLimit {
  private readonly state: ThrottleState;

  constructor(
    bytesPerSecond: number,
    private readonly nowMs: () => number = () => performance.now(),
  ) {
    this.state = new ThrottleState(nowMs());
    this.setSpeed(bytesPerSecond);
  }

  setSpeed(bytesPerSecond: number): void {
    const cfg = emptyThrottleConfig();
    cfg.buckets[Bucket.BPS_TOTAL]!.avg = bytesPerSecond;
    this.state.configure(cfg, this.nowMs());
  }

  /** Accounts `bytes` just copied; returns the ms to wait before copying more. */
  delayFor(bytes: number): number {
    if (!this.state.enabled) return 0;
    this.state.account(WRITE, bytes);
    return this.state.waitMs(WRITE, this.nowMs());
  }
}

/** Job types reported as block jobs (query-block-jobs, BLOCK_JOB_* events). */
const BLOCK_JOB_TYPES: readonly JobType[] = ['commit', 'stream', 'mirror', 'backup'];

export class Job implements EdgeParent {
  readonly id: string;
  readonly type: JobType;
  status: JobStatus = 'undefined';
  readonly autoFinalize: boolean;
  readonly autoDismiss: boolean;
  speed: number;
  readonly limit: SpeedLimit;
  /** Progress in bytes (current-progress / total-progress). */
  currentProgress = 0;
  totalProgress = 0;
  pauseCount = 1;
  userPaused = false;
  busy = false;
  /** Waiting at a pause point (QEMU's job->paused). */
  private paused = false;
  /** Asleep with a timer (job_sleep_ns; QEMU's sleep_timer pending). */
  private sleeping = false;
  /** Drains the job itself holds (mirror's completion drain): no pause point stops it meanwhile. */
  private ownDrains = 0;
  /** Resolve when the job stops being busy (a drain waiting for it). */
  private idleWaiters: Array<() => void> = [];
  ioStatus: IoStatus = 'ok';
  /** The failure, once the job has one (QEMU's job->err). */
  error: string | undefined;
  private cancelFlag = false;
  private forceCancel = false;
  private started = false;
  /** Cancelled before start: QEMU emits no end event and dismisses it at once. */
  private cancelledUnstarted = false;
  private finished = false;
  /**
   * Finalizing or aborting has begun. QEMU does either in one step, so no
   * verb can arrive in between; ours awaits the kind's hooks, and a cancel
   * or finalize arriving then is ignored (the outcome is already decided).
   */
  private ending = false;
  /** Ends the job's current yield (sleep or pause point); set only while it yields. */
  private wake: (() => void) | null = null;
  /** Resolves when the job reaches null (or concluded without auto-dismiss). */
  private settledWaiters: Array<() => void> = [];
  /** Run once when the job concludes or fails early (lift op blockers). */
  private cleanups: Array<() => void> = [];

  constructor(
    readonly driver: JobDriver,
    opts: JobOptions,
    private readonly emitEvent: JobEventSink,
    private readonly onGone: (job: Job) => void,
  ) {
    this.id = opts.id;
    this.type = driver.type;
    this.autoFinalize = opts.autoFinalize ?? true;
    this.autoDismiss = opts.autoDismiss ?? true;
    this.speed = opts.speed ?? 0;
    this.limit = new SpeedLimit(this.speed);
    this.transition('created');
  }

  get isBlockJob(): boolean {
    return BLOCK_JOB_TYPES.includes(this.type);
  }

  // ------------------------------------------------------------ status

  private transition(to: JobStatus): void {
    if (!canTransition(this.status, to)) throw new Error(`job ${this.id}: ${this.status} → ${to} is not a transition`);
    this.status = to;
    this.emitEvent('JOB_STATUS_CHANGE', { id: this.id, status: to });
  }

  private checkVerb(verb: JobVerb): void {
    if (!verbAllowed(verb, this.status)) {
      throw new JobError(`Job '${this.id}' in state '${this.status}' cannot accept command verb '${verb}'`);
    }
  }

  /** A hard cancel: stop at once and abort. */
  isCancelled(): boolean {
    return this.cancelFlag && this.forceCancel;
  }

  /** Any cancel, soft ones (mirror after READY) included. */
  cancelRequested(): boolean {
    return this.cancelFlag;
  }

  isReady(): boolean {
    return this.status === 'ready' || this.status === 'standby';
  }

  /** Whether the job has reached concluded or null. */
  get isFinished(): boolean {
    return this.finished;
  }

  // ------------------------------------------------------------ running

  /** Starts the job; its run() goes on in the background. */
  start(): void {
    if (this.started) throw new Error(`job ${this.id} started twice`);
    this.started = true;
    this.pauseCount--;
    this.busy = true;
    this.transition('running');
    // Runs synchronously up to the first pause point: a job started inside a drained section pauses now, as in QEMU.
    void this.runToEnd();
  }

  /** Set-up failed before start (job_early_fail): created → null, no other event. */
  earlyFail(): void {
    if (this.started) throw new Error(`job ${this.id} already started`);
    this.finished = true;
    this.runCleanups();
    this.dismissNow();
  }

  private async runToEnd(): Promise<void> {
    let failure: BlockError | null = null;
    try {
      // The first pause point: a job paused while created waits here.
      await this.pausePoint();
      if (!this.isCancelled()) await this.driver.run(this);
    } catch (e) {
      failure = toBlockError(e);
    }
    this.setBusy(false);
    if (failure) this.error = failure.message;
    else if (this.isCancelled()) this.error = new BlockError('ECANCELED').message;
    if (this.error !== undefined) await this.abortAndConclude();
    else await this.waitThenPend();
  }

  /** Success: waiting → pending → (finalize now or wait for job-finalize). */
  private async waitThenPend(): Promise<void> {
    this.transition('waiting');
    this.transition('pending');
    if (!this.autoFinalize) {
      if (this.isBlockJob) this.emitEvent('BLOCK_JOB_PENDING', { type: this.type, id: this.id });
      return;
    }
    await this.finalizeNow();
  }

  private async finalizeNow(): Promise<void> {
    if (this.ending) return;
    this.ending = true;
    try {
      await this.driver.prepare?.(this);
    } catch (e) {
      this.error = toBlockError(e).message;
      return this.abortAndConclude();
    }
    await this.runHook(() => this.driver.commit?.(this));
    await this.runHook(() => this.driver.clean?.(this));
    this.emitEnd();
    this.conclude();
  }

  private async abortAndConclude(): Promise<void> {
    if (this.ending && this.status === 'aborting') return;
    this.ending = true;
    this.transition('aborting');
    await this.runHook(() => this.driver.abort?.(this));
    await this.runHook(() => this.driver.clean?.(this));
    this.emitEnd();
    this.conclude();
  }

  /** Commit/abort/clean failures cannot change the outcome any more; they become the error text at most. */
  private async runHook(hook: () => Promise<void> | void): Promise<void> {
    try {
      await hook();
    } catch (e) {
      this.error ??= toBlockError(e).message;
    }
  }

  private emitEnd(): void {
    if (!this.isBlockJob || this.cancelledUnstarted) return;
    const data: Record<string, unknown> = { type: this.type, device: this.id, ...this.lenOffsetSpeed() };
    if (this.isCancelled()) {
      this.emitEvent('BLOCK_JOB_CANCELLED', data);
      return;
    }
    if (this.error !== undefined) data.error = this.error;
    this.emitEvent('BLOCK_JOB_COMPLETED', data);
  }

  private conclude(): void {
    this.transition('concluded');
    this.finished = true;
    this.runCleanups();
    if (this.autoDismiss || this.cancelledUnstarted) this.dismissNow();
    else this.settle();
  }

  /** Registers `fn` to run when the job concludes (or fails before it starts). */
  addCleanup(fn: () => void): void {
    this.cleanups.push(fn);
  }

  private runCleanups(): void {
    for (const fn of this.cleanups.splice(0)) fn();
  }

  private dismissNow(): void {
    this.transition('null');
    this.onGone(this);
    this.settle();
  }

  private settle(): void {
    const waiters = this.settledWaiters;
    this.settledWaiters = [];
    for (const w of waiters) w();
  }

  /** Resolves once the job is concluded (or gone). */
  whenFinished(): Promise<void> {
    if (this.finished) return Promise.resolve();
    return new Promise((resolve) => this.settledWaiters.push(resolve));
  }

  // ------------------------------------------------------------ helpers for kinds

  lenOffsetSpeed(): { len: number; offset: number; speed: number } {
    return { len: this.totalProgress, offset: this.currentProgress, speed: this.speed };
  }

  /** Marks the job in sync (mirror): ready, BLOCK_JOB_READY. */
  transitionToReady(): void {
    this.transition('ready');
    this.emitEvent('BLOCK_JOB_READY', { type: this.type, device: this.id, ...this.lenOffsetSpeed() });
  }

  /** Whether a pause point should stop the job now (job_should_pause, and not inside its own drain). */
  private shouldPause(): boolean {
    return this.pauseCount > 0 && this.ownDrains === 0;
  }

  /**
   * job_pause_point: when a pause is pending, waits in paused (standby when
   * ready) until entered (resumed to 0, or cancelled), then returns to the
   * status it had; returns at once otherwise.
   */
  async pausePoint(): Promise<void> {
    if (!this.shouldPause() || this.isCancelled()) return;
    const back = this.status;
    this.transition(this.isReady() ? 'standby' : 'paused');
    this.paused = true;
    // The status comes back in enter() itself, as QEMU's coroutine runs on at once.
    await this.yieldUntilEntered(null, () => {
      this.paused = false;
      this.transition(back);
    });
  }

  /** Accounts `bytes` just copied against the speed limit; sleeps as long as it says, then a pause point. */
  async rateLimit(bytes: number): Promise<void> {
    const delayMs = this.limit.delayFor(bytes);
    if (delayMs > 0) await this.sleep(delayMs);
    await this.pausePoint();
  }

  /** Sleeps `ms` unless cancelled; a verb (pause, resume, cancel, set-speed) wakes it early. */
  async sleep(ms: number): Promise<void> {
    // A pending pause skips the sleep, as QEMU's job_sleep_ns: the caller's pause point comes next.
    if (this.isCancelled() || this.shouldPause()) return;
    await this.yieldUntilEntered(ms);
  }

  /** job_do_yield: not busy until entered (by a verb, a resume, or the timer after `ms`). */
  private yieldUntilEntered(ms: number | null, onEnter?: () => void): Promise<void> {
    this.setBusy(false);
    return new Promise<void>((resolve) => {
      const timer = ms === null ? null : setTimeout(() => this.enter(), ms);
      this.sleeping = timer !== null;
      this.wake = () => {
        if (timer) clearTimeout(timer);
        this.wake = null;
        this.sleeping = false;
        onEnter?.();
        resolve();
      };
    });
  }

  /**
   * job_enter_cond: wakes the job if it yields (asleep or at a pause point)
   * and `only` agrees; a busy job, one not started or one whose run is over
   * is left alone.
   */
  private enter(only: (sleeping: boolean) => boolean = () => true): void {
    if (!this.wake || this.busy || !only(this.sleeping)) return;
    this.busy = true;
    this.wake();
  }

  private setBusy(busy: boolean): void {
    this.busy = busy;
    if (busy || this.idleWaiters.length === 0) return;
    for (const w of this.idleWaiters.splice(0)) w();
  }

  /** job_pause: one more reason to pause; a job not at a pause point is woken to reach one. */
  private pauseOnce(): void {
    this.pauseCount++;
    if (this.paused) return;
    this.enter();
    this.driver.kick?.(this);
  }

  /** job_resume: one reason fewer; at 0 a paused job goes on (a sleeping one keeps its timer). */
  private resumeOnce(): void {
    if (this.pauseCount <= 0) throw new Error(`job ${this.id}: resumed more often than paused`);
    if (--this.pauseCount === 0) this.enter((sleeping) => !sleeping);
  }

  // ------------------------------------------------------------ nodes held (QEMU's child_job edges)

  describe(): string {
    return `${this.type} job '${this.id}'`;
  }

  /** child_job_drained_poll: busy (running between pause points) counts as a request in flight. */
  get inFlight(): number {
    return this.busy && this.ownDrains === 0 && !this.finished ? 1 : 0;
  }

  waitIdle(): Promise<void> {
    if (this.inFlight === 0) return Promise.resolve();
    return new Promise((resolve) => this.idleWaiters.push(resolve));
  }

  /** A drain reached a node the job holds (child_job_drained_begin). */
  drainedBegin(): void {
    this.pauseOnce();
  }

  /** child_job_drained_end. */
  drainedEnd(): void {
    this.resumeOnce();
  }

  /**
   * Holds `node` until the job concludes (block_job_add_bdrv's edge): drains
   * of it pause the job; a node drained already pauses it at once, and
   * letting go ends what it still carries.
   */
  holdNode(node: BlockNode): void {
    if (node.holders.includes(this)) return;
    node.holders.push(this);
    for (let i = 0; i < node.quiesceCounter; i++) this.pauseOnce();
    this.addCleanup(() => {
      const at = node.holders.indexOf(this);
      if (at < 0) return;
      node.holders.splice(at, 1);
      for (let i = 0; i < node.quiesceCounter; i++) this.resumeOnce();
    });
  }

  /**
   * Runs `drain` (a drainedBegin or drainedEnd the job issues itself, on a
   * node it may hold) without waiting for itself and without ever stopping
   * at a pause point while the drain is held, as QEMU's mirror (in_drain).
   */
  async ownDrainBegin(drain: () => Promise<void>): Promise<void> {
    this.ownDrains++;
    try {
      await drain();
    } catch (e) {
      this.ownDrains--;
      throw e;
    }
  }

  ownDrainEnd(drainEnd: () => void): void {
    drainEnd();
    this.ownDrains--;
  }

  /**
   * Decides what a failed request means under `policy` (block_job_error_action):
   * emits BLOCK_JOB_ERROR, and on `stop` pauses the job as if the user had,
   * so the caller's next pause point waits for job-resume before it retries.
   */
  errorAction(err: BlockError, isRead: boolean, policy: OnErrorPolicy): ErrorAction {
    let action: ErrorAction;
    if (policy === 'enospc' || policy === 'auto') action = err.code === 'ENOSPC' ? 'stop' : 'report';
    else action = policy;
    this.emitEvent('BLOCK_JOB_ERROR', { device: this.id, operation: isRead ? 'read' : 'write', action });
    if (action === 'stop') {
      if (!this.userPaused) {
        this.pauseCount++;
        this.userPaused = true;
      }
      this.ioStatus = err.code === 'ENOSPC' ? 'nospace' : 'failed';
    }
    return action;
  }

  // ------------------------------------------------------------ progress

  progressUpdate(doneBytes: number): void {
    this.currentProgress += doneBytes;
  }

  /** Sets the total so that `remainingBytes` are left (progress_set_remaining). */
  progressSetRemaining(remainingBytes: number): void {
    this.totalProgress = this.currentProgress + remainingBytes;
  }

  progressIncreaseRemaining(bytes: number): void {
    this.totalProgress += bytes;
  }

  // ------------------------------------------------------------ verbs

  pause(): void {
    this.checkVerb('pause');
    if (this.userPaused) throw new JobError('Job is already paused');
    this.userPaused = true;
    this.pauseOnce();
  }

  resume(): void {
    this.checkVerb('resume');
    if (!this.userPaused) throw new JobError("Can't resume a job that was not paused");
    this.userPaused = false;
    this.ioStatus = 'ok';
    this.resumeOnce();
  }

  setSpeed(bytesPerSecond: number): void {
    this.checkVerb('set-speed');
    if (bytesPerSecond < 0) throw new JobError("Parameter 'speed' expects a non-negative value");
    const faster = bytesPerSecond === 0 || (this.speed !== 0 && bytesPerSecond > this.speed);
    this.speed = bytesPerSecond;
    this.limit.setSpeed(bytesPerSecond);
    // Kick only a job asleep on its timer (block_job_set_speed).
    if (faster) this.enter((sleeping) => sleeping);
  }

  complete(): void {
    this.checkVerb('complete');
    // QEMU 6.1+ completes paused jobs too (standby in the verb table, no pause_count check).
    if (this.cancelFlag || !this.driver.complete) {
      throw new JobError(`The active block job '${this.id}' cannot be completed`);
    }
    this.driver.complete(this);
    if (!this.paused) this.enter();
  }

  change(args: Record<string, unknown>): void {
    this.checkVerb('change');
    if (!this.driver.change) throw new JobError(`Job type '${this.type}' does not support changing options`);
    this.driver.change(this, args);
  }

  cancel(force: boolean): void {
    this.checkVerb('cancel');
    if (this.status === 'pending') {
      if (this.ending) return;
      // Finished its work but not finalized: abort now.
      this.cancelFlag = true;
      this.forceCancel = true;
      this.error ??= new BlockError('ECANCELED').message;
      void this.abortAndConclude();
      return;
    }
    const hard = this.driver.cancel ? this.driver.cancel(this, force) : true;
    if (this.userPaused) {
      // No enter here (job_cancel_async): the one below wakes the job.
      this.userPaused = false;
      this.pauseCount--;
      this.ioStatus = 'ok';
    }
    if (!this.isCancelled()) {
      this.cancelFlag = true;
      this.forceCancel ||= hard;
    }
    if (!this.started) {
      this.started = true;
      this.cancelledUnstarted = true;
      void this.runToEnd();
      return;
    }
    this.enter();
  }

  finalize(): void {
    this.checkVerb('finalize');
    void this.finalizeNow();
  }

  dismiss(): void {
    this.checkVerb('dismiss');
    this.dismissNow();
  }

  // ------------------------------------------------------------ queries

  /** query-jobs' JobInfo. */
  info(): Record<string, unknown> {
    const out: Record<string, unknown> = {
      id: this.id,
      type: this.type,
      status: this.status,
      'current-progress': this.currentProgress,
      'total-progress': this.totalProgress,
    };
    if (this.error !== undefined) out.error = this.error;
    return out;
  }

  /** query-block-jobs' BlockJobInfo. */
  blockJobInfo(): Record<string, unknown> {
    const out: Record<string, unknown> = {
      type: this.type,
      device: this.id,
      len: this.totalProgress,
      offset: this.currentProgress,
      busy: this.busy,
      paused: this.pauseCount > 0,
      speed: this.speed,
      'io-status': this.ioStatus,
      ready: this.isReady(),
      status: this.status,
      'auto-finalize': this.autoFinalize,
      'auto-dismiss': this.autoDismiss,
      ...this.driver.blockInfo?.(this),
    };
    if (this.error !== undefined) out.error = this.error;
    return out;
  }
}
