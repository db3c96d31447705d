/*
 * The requests a mirror has in flight on its target, and the waits that
 * keep them ordered (QEMU's MirrorOp list, in_flight_bitmap and
 * mirror_wait_on_conflicts).
 *
 * An op claims the granules its range touches. Background copy ops and
 * active (write-blocking) guest writes must never overlap in time on the
 * same granule: otherwise an older copy could land on the target after a
 * newer write and leave stale data. Before claiming, a caller waits until
 * no op holds any of its granules (`waitConflicts`), re-checking after
 * every wake-up, and claims in the same synchronous step as its last
 * check (`claim`; another waiter may claim between two awaits).
 *
 * Bytes are counted separately for copy ops (`copyBytes`) and active
 * writes (`activeBytes`), as QEMU's progress uses both; `bufferBytes` is
 * what copy ops reserve of the job's buf-size (ops over zero runs reserve
 * none, as QEMU's zero and discard ops take no buffer). `onEnd` wakes the
 * job loop whenever an op ends.
 *
 * CopyBuffers keeps the copy ops' buffers for reuse (see below).
 */
import { alignDown, alignUp } from '../block/flags.js';
import { invariant } from '../block/errors.js';

export interface MirrorOp {
  readonly offsetBytes: number;
  readonly bytes: number;
  readonly active: boolean;
  /** Copy buffer bytes the op reserves (0: active writes, zero runs). */
  readonly bufferBytes: number;
  readonly done: Promise<void>;
  finish(): void;
}

export class InFlightOps {
  private readonly ops = new Set<MirrorOp>();
  copyBytes = 0;
  activeBytes = 0;
  copyCount = 0;
  bufferBytes = 0;

  constructor(
    private readonly granularityBytes: number,
    /** Called whenever an op ends (wakes the job loop). */
    private readonly onEnd: () => void,
  ) {}

  get count(): number {
    return this.ops.size;
  }

  /** An op holding a granule of [offset, offset + bytes), or null. */
  conflicting(offsetBytes: number, bytes: number): MirrorOp | null {
    const start = alignDown(offsetBytes, this.granularityBytes);
    const end = alignUp(offsetBytes + bytes, this.granularityBytes);
    for (const op of this.ops) {
      const opStart = alignDown(op.offsetBytes, this.granularityBytes);
      const opEnd = alignUp(op.offsetBytes + op.bytes, this.granularityBytes);
      if (opStart < end && start < opEnd) return op;
    }
    return null;
  }

  /** Where the first granule held by an op after the granule of `offsetBytes` starts (Infinity: none). */
  nextClaimedAfter(offsetBytes: number): number {
    const from = alignDown(offsetBytes, this.granularityBytes) + this.granularityBytes;
    let next = Infinity;
    for (const op of this.ops) {
      const opStart = alignDown(op.offsetBytes, this.granularityBytes);
      const opEnd = alignUp(op.offsetBytes + op.bytes, this.granularityBytes);
      if (opEnd > from) next = Math.min(next, Math.max(opStart, from));
    }
    return next;
  }

  /** Waits until no op holds a granule of the range. */
  async waitConflicts(offsetBytes: number, bytes: number): Promise<void> {
    for (let op = this.conflicting(offsetBytes, bytes); op; op = this.conflicting(offsetBytes, bytes)) await op.done;
  }

  /** Claims the range; the caller has just seen no conflict. Copy ops reserve `bufferBytes` (default: all their bytes). */
  begin(offsetBytes: number, bytes: number, active: boolean, bufferBytes = active ? 0 : bytes): MirrorOp {
    invariant(!this.conflicting(offsetBytes, bytes), 'mirror op claimed an occupied range');
    let finish!: () => void;
    const done = new Promise<void>((resolve) => (finish = resolve));
    const op: MirrorOp = { offsetBytes, bytes, active, bufferBytes, done, finish };
    this.ops.add(op);
    if (active) this.activeBytes += bytes;
    else {
      this.copyBytes += bytes;
      this.copyCount++;
    }
    this.bufferBytes += bufferBytes;
    return op;
  }

  /** Waits for conflicts, then claims in the same step as the last check (active writes). */
  async claim(offsetBytes: number, bytes: number, active: boolean): Promise<MirrorOp> {
    for (;;) {
      const op = this.conflicting(offsetBytes, bytes);
      if (!op) return this.begin(offsetBytes, bytes, active);
      await op.done;
    }
  }

  end(op: MirrorOp): void {
    if (!this.ops.delete(op)) return;
    if (op.active) this.activeBytes -= op.bytes;
    else {
      this.copyBytes -= op.bytes;
      this.copyCount--;
    }
    this.bufferBytes -= op.bufferBytes;
    op.finish();
    this.onEnd();
  }

  /** Resolves when every op now in flight has ended (new ones may have started). */
  async waitAll(): Promise<void> {
    while (this.ops.size > 0) await Promise.all([...this.ops].map((op) => op.done));
  }
}

/**
 * Copy buffers of one capacity (the largest op), kept for reuse: at most
 * `keepMax` idle ones (the ops in flight at once), so they never hold
 * more than keepMax × capacity (16 MiB with the mirror's defaults). A
 * taken buffer is the first `bytes` of one; it goes back when its op has
 * ended (no request holds it any more).
 */
export class CopyBuffers {
  private readonly idle: Uint8Array[] = [];

  constructor(
    readonly capacityBytes: number,
    private readonly keepMax: number,
  ) {}

  take(bytes: number): Uint8Array {
    if (bytes > this.capacityBytes) return new Uint8Array(bytes);
    const buf = this.idle.pop() ?? new Uint8Array(this.capacityBytes);
    return buf.subarray(0, bytes);
  }

  give(buf: Uint8Array): void {
    if (buf.buffer.byteLength !== this.capacityBytes || buf.byteOffset !== 0) return;
    if (this.idle.length < this.keepMax) this.idle.push(new Uint8Array(buf.buffer));
  }
}

