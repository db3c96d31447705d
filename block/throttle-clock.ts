/*
 * Time for throttling: the interface the throttle groups use, the real
 * clock (performance.now and setTimeout, QEMU_CLOCK_REALTIME), and a
 * manual clock for deterministic tests (QEMU's tests run throttling on
 * QEMU_CLOCK_VIRTUAL the same way).
 *
 * ManualThrottleClock only moves when told: `advance(ms)` fires the due
 * timers in time order (ties in the order they were set), letting the
 * requests they release run before the next timer fires; with `auto` set,
 * every timer fires on the next event-loop turn and moves the clock to its
 * due time, so code that sleeps on the clock runs at full speed.
 */
import { setImmediate as nextTurn } from 'node:timers/promises';

/** Time and timers for throttling; times in ms (fractional). */
export interface ThrottleClock {
  nowMs(): number;
  setTimer(callback: () => void, delayMs: number): unknown;
  clearTimer(handle: unknown): void;
}

export const realThrottleClock: ThrottleClock = {
  nowMs: () => performance.now(),
  setTimer: (callback, delayMs) => setTimeout(callback, Math.max(0, delayMs)),
  clearTimer: (handle) => clearTimeout(handle as ReturnType<typeof setTimeout>),
};

/** Event-loop turns `advance` gives released requests to run after each timer. */
const SETTLE_TURNS = 3;

interface ManualTimer {
  dueMs: number;
  seq: number;
  callback: () => void;
}

export class ManualThrottleClock implements ThrottleClock {
  private now = 0;
  private seq = 0;
  private readonly timers = new Set<ManualTimer>();

  /** `auto`: timers fire on the next event-loop turn, jumping the clock to their due time. */
  constructor(private readonly auto = false) {}

  nowMs(): number {
    return this.now;
  }

  setTimer(callback: () => void, delayMs: number): unknown {
    const timer: ManualTimer = { dueMs: this.now + Math.max(0, delayMs), seq: this.seq++, callback };
    this.timers.add(timer);
    if (this.auto) setImmediate(() => this.fire(timer));
    return timer;
  }

  clearTimer(handle: unknown): void {
    this.timers.delete(handle as ManualTimer);
  }

  /** Timers set and not yet fired. */
  get pendingTimers(): number {
    return this.timers.size;
  }

  /** Moves the clock by `ms`, firing due timers in order and letting what they release run. */
  async advance(ms: number): Promise<void> {
    const endMs = this.now + ms;
    await settle();
    for (;;) {
      const next = this.earliest();
      if (!next || next.dueMs > endMs) break;
      this.fire(next);
      await settle();
    }
    this.now = endMs;
    await settle();
  }

  private earliest(): ManualTimer | undefined {
    let best: ManualTimer | undefined;
    for (const t of this.timers) if (!best || t.dueMs < best.dueMs || (t.dueMs === best.dueMs && t.seq < best.seq)) best = t;
    return best;
  }

  private fire(timer: ManualTimer): void {
    if (!this.timers.delete(timer)) return;
    this.now = Math.max(this.now, timer.dueMs);
    timer.callback();
  }
}

async function settle(): Promise<void> {
  for (let i = 0; i < SETTLE_TURNS; i++) await nextTurn();
}
