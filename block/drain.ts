/*
 * Drain (bdrv_drained_begin/end): quiesce a node so no request is in flight
 * on it or above it, and none starts from a user until the drain ends.
 *
 * Beginning a drain raises the quiesce counter of the node and, through the
 * parent edges, of every ancestor node and BlockBackend; backends hold new
 * requests while quiesced. Then it waits until the node and every ancestor
 * report no request in flight. Requests that drivers issue internally (a
 * format writing its metadata to its file) are not held: they belong to
 * requests already in flight and must finish for the drain to end.
 *
 * Drains nest (counters), and `drained(node, fn)` runs `fn` in a drained
 * section. Waiting is bounded by the requests in flight: each wait resolves
 * when one of them completes, and no new ones can start from above.
 */
import type { BlockNode, EdgeParent } from './node.js';

/** The node and all its ancestors (nodes and backends), each once. */
function ancestors(node: BlockNode): EdgeParent[] {
  const seen = new Set<EdgeParent>([node]);
  const queue: EdgeParent[] = [node];
  for (let i = 0; i < queue.length; i++) {
    const p = queue[i]!;
    const parents = 'parents' in p ? (p as BlockNode).parents : [];
    for (const edge of parents) {
      if (!seen.has(edge.parent)) {
        seen.add(edge.parent);
        queue.push(edge.parent);
      }
    }
  }
  return queue;
}

export async function drainedBegin(node: BlockNode): Promise<void> {
  node.drainedBegin();
  for (;;) {
    const busy = ancestors(node).find((p) => p.inFlight > 0);
    if (!busy) return;
    await busy.waitIdle();
  }
}

export function drainedEnd(node: BlockNode): void {
  node.drainedEnd();
}

/** Runs `fn` with `node` drained. */
export async function drained<T>(node: BlockNode, fn: () => Promise<T> | T): Promise<T> {
  await drainedBegin(node);
  try {
    return await fn();
  } finally {
    drainedEnd(node);
  }
}

/** Waits for every request in flight on or above `node` to finish. */
export async function drain(node: BlockNode): Promise<void> {
  await drained(node, () => undefined);
}
