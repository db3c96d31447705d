/*
 * Replacing a node in the graph (QEMU's bdrv_replace_node): every parent
 * edge of `from` — nodes and BlockBackends (exports, users) alike — is
 * re-pointed at `to`, except the edges the caller keeps (a job's own) and
 * edges whose parent is `to` itself (that would make a loop, e.g. a filter
 * being removed from above its own child).
 *
 * Both nodes are drained around the move, so no request is in flight on
 * either while edges change; backends waiting on the drain resume on `to`.
 * Drain counts follow the edges (block/node.ts), so the balance holds.
 * Permissions are checked edge by edge; when one is refused, the edges
 * already moved go back and the error is thrown.
 */
import { drainedBegin, drainedEnd } from './drain.js';
import { replaceChildNode, type BdrvChild, type BlockNode } from './node.js';

/** Moves the parents of `from` onto `to` (see the note at the top); returns the moved edges. */
export async function replaceNode(from: BlockNode, to: BlockNode, keep: readonly BdrvChild[] = []): Promise<BdrvChild[]> {
  await drainedBegin(from);
  await drainedBegin(to);
  try {
    return moveParents(from, to, keep);
  } finally {
    drainedEnd(to);
    drainedEnd(from);
  }
}

/** The move itself, without draining (callers that hold a drain already). */
export function moveParents(from: BlockNode, to: BlockNode, keep: readonly BdrvChild[] = []): BdrvChild[] {
  const moved: BdrvChild[] = [];
  try {
    for (const edge of [...from.parents]) {
      if (keep.includes(edge) || edge.parent === to) continue;
      replaceChildNode(edge, to);
      moved.push(edge);
    }
  } catch (e) {
    for (const edge of moved.reverse()) replaceChildNode(edge, from);
    throw e;
  }
  return moved;
}
