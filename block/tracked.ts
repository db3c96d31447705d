/*
 * Tracked requests: the gate records every request in flight on a node so
 * that read-modify-write cycles can be serialised against overlapping I/O.
 *
 * A serialising request (an unaligned write doing RMW, or a caller passing
 * Req.SERIALISING) widens its overlap range to the alignment it works at.
 * Before touching the driver, a request waits for every *earlier* tracked
 * request that overlaps it when either side is serialising. Waiting only on
 * earlier requests keeps the wait graph acyclic, so there is no deadlock:
 * the earliest request never waits. A Set keeps insertion order, which is
 * the order of arrival.
 *
 * Cost: when no serialising request is in flight (the common case) nothing
 * is scanned; otherwise a scan over the node's in-flight requests, which the
 * callers above bound (e.g. 16 per NBD client).
 */
import { alignDown, alignUp } from './flags.js';
import type { BlockNode } from './node.js';

export interface TrackedRequest {
  readonly offsetBytes: number;
  readonly bytes: number;
  overlapOffsetBytes: number;
  overlapBytes: number;
  serialising: boolean;
  /** Requests waiting for this one to end; created only when someone waits. */
  waiters: Array<() => void> | null;
}

/** Registers a request on the node; call `endTracked` when it completes. */
export function beginTracked(node: BlockNode, offsetBytes: number, bytes: number): TrackedRequest {
  const req: TrackedRequest = {
    offsetBytes,
    bytes,
    overlapOffsetBytes: offsetBytes,
    overlapBytes: bytes,
    serialising: false,
    waiters: null,
  };
  node.tracked.add(req);
  return req;
}

/** Marks the request serialising, widening its overlap range to `alignBytes`. */
export function markSerialising(node: BlockNode, req: TrackedRequest, alignBytes: number): void {
  if (!req.serialising) {
    req.serialising = true;
    node.serialisingInFlight++;
  }
  const start = alignDown(req.offsetBytes, alignBytes);
  const end = alignUp(req.offsetBytes + req.bytes, alignBytes);
  const oldEnd = req.overlapOffsetBytes + req.overlapBytes;
  req.overlapOffsetBytes = Math.min(req.overlapOffsetBytes, start);
  req.overlapBytes = Math.max(oldEnd, end) - req.overlapOffsetBytes;
}

function overlaps(a: TrackedRequest, b: TrackedRequest): boolean {
  return (
    a.overlapOffsetBytes < b.overlapOffsetBytes + b.overlapBytes &&
    b.overlapOffsetBytes < a.overlapOffsetBytes + a.overlapBytes
  );
}

/** The first earlier request `req` must wait for, or null. */
function firstConflict(node: BlockNode, req: TrackedRequest): TrackedRequest | null {
  for (const other of node.tracked) {
    if (other === req) return null;
    if ((req.serialising || other.serialising) && overlaps(req, other)) return other;
  }
  return null;
}

/** Waits until no earlier overlapping request conflicts with `req`. */
export async function waitSerialising(node: BlockNode, req: TrackedRequest): Promise<void> {
  if (node.serialisingInFlight === 0) return;
  for (let other = firstConflict(node, req); other; other = firstConflict(node, req)) {
    await new Promise<void>((resolve) => (other.waiters ??= []).push(resolve));
  }
}

export function endTracked(node: BlockNode, req: TrackedRequest): void {
  node.tracked.delete(req);
  if (req.serialising) node.serialisingInFlight--;
  if (req.waiters) for (const wake of req.waiters) wake();
}
