/*
 * What a qcow2 image must read back after the crash writer's op sequence
 * (crash-ops.mjs) ran up to some point: each byte's value, or a slack where
 * two or any values are right (discards, requests in flight at a kill).
 */
import { crashOps, CRASH_IMAGE_BYTES, type CrashOp } from './crash-ops.mjs';

export interface Journal {
  /** Index of the last op issued, and of the last op covered by a completed flush (-1: none). */
  lastStarted: number;
  lastFlushed: number;
}

/** What each byte must hold: the value, or one of two values, or anything. */
export class Expectation {
  readonly value = new Uint8Array(CRASH_IMAGE_BYTES);
  /** 1: old or zero (discarded); 2: anything (a request in flight at the kill). */
  readonly slack = new Uint8Array(CRASH_IMAGE_BYTES);

  apply(op: CrashOp): void {
    const end = op.offset + op.length;
    if (op.kind === 'write') this.value.set(op.data, op.offset);
    else if (op.kind === 'zero') this.value.fill(0, op.offset, end);
    this.slack.fill(op.kind === 'discard' ? 1 : 0, op.offset, end);
  }

  unknown(op: CrashOp): void {
    this.slack.fill(2, op.offset, op.offset + op.length);
  }

  /** Offset of the first byte `actual` gets wrong, or -1. */
  firstMismatch(actual: Uint8Array): number {
    for (let i = 0; i < CRASH_IMAGE_BYTES; i++) {
      const want = this.value[i]!;
      const got = actual[i]!;
      if (got === want || this.slack[i] === 2 || (this.slack[i] === 1 && got === 0)) continue;
      return i;
    }
    return -1;
  }
}

export function expectationAfter(seed: number, j: Journal): Expectation {
  const ops = crashOps(seed);
  const e = new Expectation();
  for (let i = 0; i <= j.lastFlushed; i++) e.apply(ops[i]!);
  for (let i = j.lastFlushed + 1; i <= j.lastStarted && i < ops.length; i++) e.unknown(ops[i]!);
  return e;
}

