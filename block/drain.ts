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
 * Block jobs holding a node (`holders`, QEMU's child_job) are reached like
 * parents: the drain pauses them (job_pause), and a job counts as busy until
 * it reaches a pause point (child_job_drained_poll), so the drained section
 * begins with every such job paused — the JOB_STATUS_CHANGE paused/running
 * pair QEMU emits around each drained section of a job's node.
 *
 * Drains nest (counters), and `drained(node, fn)` runs `fn` in a drained
 * section. Waiting is bounded by the requests in flight: each wait resolves
 * when one of them completes, and no new ones can start from above; a job
 * stops being busy at its next pause point. `drainAllBegin`/`drainAllEnd`
 * are bdrv_drain_all_begin/end: every node of the graph, in creation order.
 */
import type { BlockNode, EdgeParent } from './node.js';

/** The nodes and all their ancestors (nodes, backends, the jobs holding them), each once. */
function ancestors(nodes: readonly BlockNode[]): EdgeParent[] {
  const seen = new Set<EdgeParent>(nodes);
  const queue: EdgeParent[] = [...nodes];
  const visit = (p: EdgeParent): void => {
    if (seen.has(p)) return;
    seen.add(p);
    queue.push(p);
  };
  for (let i = 0; i < queue.length; i++) {
    const p = queue[i]!;
    if (!('parents' in p)) continue;
    const node = p as BlockNode;
    for (const edge of node.parents) visit(edge.parent);
    for (const holder of node.holders) visit(holder);
  }
  return queue;
}

/** Waits until nothing on or above `nodes` is in flight (bdrv_drain_poll). */
async function pollIdle(nodes: readonly BlockNode[]): Promise<void> {
  for (;;) {
    const busy = ancestors(nodes).find((p) => p.inFlight > 0);
    if (!busy) return;
    await busy.waitIdle();
  }
}

export async function drainedBegin(node: BlockNode): Promise<void> {
  node.drainedBegin();
  await pollIdle([node]);
}

/** bdrv_drain_all_begin: every node quiesced (creation order), then nothing in flight anywhere. */
export async function drainAllBegin(nodes: readonly BlockNode[]): Promise<void> {
  for (const node of nodes) node.drainedBegin();
  await pollIdle(nodes);
}

/** bdrv_drain_all_end, for the same nodes in the same order. */
export function drainAllEnd(nodes: readonly BlockNode[]): void {
  for (const node of nodes) node.drainedEnd();
}

/** bdrv_drain_all: a drained section of the whole graph, begun and ended at once. */
export async function drainAll(nodes: readonly BlockNode[]): Promise<void> {
  await drainAllBegin(nodes);
  drainAllEnd(nodes);
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
