/*
 * `-p` progress, as QEMU's util/qemu-progress.c prints it: "    (12.34/100%)"
 * followed by a carriage return, rewritten whenever the value moves by at
 * least the step (convert, compare, rebase and commit use 1 %; the first
 * and the final 100 % are always printed), a newline at the end.
 *
 * Unlike QEMU, the percentage is printed only when stdout is a terminal: in
 * a pipe or file the carriage-return updates would be garbage, so there
 * nothing is printed. SIGUSR1 prints the current value once (QEMU's
 * qemu_progress_print with a signal handler), on a terminal or not, to
 * stderr when stdout is not a terminal.
 *
 * Work is reported in units the command chooses (bytes, usually): `total`
 * units make 100 %, `add(n)` advances. A command with phases (qemu-img
 * convert counts sectors, then copies them) may `reset(total)`.
 */

/** Percentage points between two updates (qemu-img's progress_init step). */
export const PROGRESS_STEP_PERCENT = 1;

export interface ProgressSink {
  /** Whether live updates are shown (stdout is a terminal). */
  readonly live: boolean;
  write(text: string): void;
  /** Where a SIGUSR1 report goes. */
  report(text: string): void;
}

/** The sink of a real process: stdout when it is a TTY, stderr for SIGUSR1 otherwise. */
export function processProgressSink(): ProgressSink {
  const live = process.stdout.isTTY === true;
  return {
    live,
    write: (text) => process.stdout.write(text),
    report: (text) => (live ? process.stdout : process.stderr).write(text),
  };
}

export class Progress {
  private done = 0;
  private total: number;
  private lastPrinted = -Infinity;
  private readonly onSignal = () => this.sink.report(Progress.format(this.percent()));

  constructor(
    private readonly sink: ProgressSink,
    totalUnits: number,
    private readonly stepPercent = PROGRESS_STEP_PERCENT,
  ) {
    this.total = totalUnits;
    process.on('SIGUSR1', this.onSignal);
    this.show(true);
  }

  /** "    (12.34/100%)\r": printf's "    (%3.2f/100%%)\r". */
  static format(percent: number): string {
    return `    (${percent.toFixed(2)}/100%)\r`;
  }

  percent(): number {
    if (this.total <= 0) return 100;
    return Math.min(100, (this.done / this.total) * 100);
  }

  /** Starts counting again towards a new total (the work was re-measured). */
  reset(totalUnits: number): void {
    this.total = totalUnits;
    this.done = 0;
  }

  add(units: number): void {
    this.done += units;
    this.show(false);
  }

  /**
   * Ends the progress line and stops listening for SIGUSR1; `complete`
   * (default) first shows 100 %, as the commands do when they succeed.
   */
  finish(complete = true): void {
    if (complete) this.done = Math.max(this.done, this.total);
    if (complete && this.lastPrinted < 100) this.show(true);
    if (this.sink.live) this.sink.write('\n');
    process.off('SIGUSR1', this.onSignal);
  }

  private show(always: boolean): void {
    if (!this.sink.live) return;
    const p = this.percent();
    if (!always && p - this.lastPrinted < this.stepPercent) return;
    this.lastPrinted = p;
    this.sink.write(Progress.format(p));
  }
}

/** A progress that prints nothing (no `-p`). */
export const NO_PROGRESS = {
  add(_units: number): void {},
  reset(_totalUnits: number): void {},
  finish(_complete?: boolean): void {},
};

export type ProgressLike = Pick<Progress, 'add' | 'reset' | 'finish'>;

/** The progress for a command: live when `-p` was given, silent otherwise. */
export function startProgress(enabled: boolean, totalUnits: number, sink: ProgressSink = processProgressSink()): ProgressLike {
  return enabled ? new Progress(sink, totalUnits) : NO_PROGRESS;
}
