/*
 * A byte rate limit for block jobs and commands that copy (QEMU's
 * include/qemu/ratelimit.h, as block jobs use it for their `speed`).
 *
 * Time is cut into slices (100 ms, QEMU's SLICE_TIME). Each slice allows
 * speed × slice bytes (at least 1). The caller dispatches a request, then
 * asks `delayFor(bytes)` how long to wait before the next one: nothing
 * while the slice's quota lasts; once it is used up, the slice is stretched
 * to the time the dispatched bytes are worth at the given speed, and the
 * wait is what is left of it. A request larger than the quota therefore
 * goes out at once and is paid for afterwards, so the long-run rate is the
 * speed whatever the request size. Speed 0 means no limit.
 */

/** Accounting slice in ms (QEMU's SLICE_TIME, 100 ms). */
export const RATE_SLICE_MS = 100;

export class RateLimit {
  private quotaBytes = 0;
  private sliceStartMs = 0;
  private sliceEndMs = -Infinity;
  private dispatchedBytes = 0;

  constructor(
    bytesPerSecond = 0,
    private readonly sliceMs = RATE_SLICE_MS,
    private readonly nowMs: () => number = () => performance.now(),
  ) {
    this.setSpeed(bytesPerSecond);
  }

  /** Changes the speed (bytes per second; 0: unlimited), as block-job-set-speed does. */
  setSpeed(bytesPerSecond: number): void {
    this.quotaBytes = bytesPerSecond > 0 ? Math.max(1, (bytesPerSecond * this.sliceMs) / 1000) : 0;
  }

  /** Accounts `bytes` just dispatched; returns the ms to wait before dispatching more (0: go on). */
  delayFor(bytes: number): number {
    if (this.quotaBytes === 0) return 0;
    const now = this.nowMs();
    if (this.sliceEndMs < now) {
      this.sliceStartMs = now;
      this.sliceEndMs = now + this.sliceMs;
      this.dispatchedBytes = 0;
    }
    this.dispatchedBytes += bytes;
    if (this.dispatchedBytes < this.quotaBytes) return 0;
    this.sliceEndMs = this.sliceStartMs + (this.dispatchedBytes / this.quotaBytes) * this.sliceMs;
    return this.sliceEndMs - now;
  }
}
