/*
 * The image lock (QEMU's s->lock, a CoMutex): one holder at a time, waiters
 * served in arrival order.
 *
 * Every change to qcow2 metadata in memory or on disk happens with the lock
 * held: cache loads and evictions, refcount updates, L1/L2 updates, header
 * writes. Guest data I/O runs without it. Readers and in-place writers may
 * look at cached metadata without the lock, but only synchronously (between
 * two awaits), where no holder can be half-way through a change: holders
 * publish every change in one synchronous step.
 *
 * `run` is the only way in, so the lock is always released, also on
 * exceptions. It is not re-entrant: code running under the lock never calls
 * `run` again.
 */

export class ImageLock {
  private held = false;
  private readonly waiters: Array<() => void> = [];

  /** Whether some task holds the lock now. */
  get locked(): boolean {
    return this.held;
  }

  /** Runs `body` with the lock held. */
  async run<T>(body: () => Promise<T>): Promise<T> {
    if (this.held) await new Promise<void>((resolve) => this.waiters.push(resolve));
    this.held = true;
    try {
      return await body();
    } finally {
      const next = this.waiters.shift();
      if (next) next();
      else this.held = false;
    }
  }
}
