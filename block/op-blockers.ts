/*
 * Op blockers (QEMU's bdrv_op_block_all / bdrv_op_is_blocked): a block job
 * marks the nodes it works on as busy, with a reason ("block device is in
 * use by block job: stream"), and commands that would start another job
 * on such a node refuse with "Node 'x' is busy: <reason>". QEMU blocks
 * operations by type; every job blocks all of them, which is the only way
 * QEMU's jobs use it, so one list of reasons per node is enough here.
 */
import { BlockError } from './errors.js';
import type { BlockNode } from './node.js';

const reasons = new WeakMap<BlockNode, string[]>();

/** Blocks every operation on `node` for `reason`; returns the function that lifts it. */
export function blockAllOps(node: BlockNode, reason: string): () => void {
  const list = reasons.get(node) ?? [];
  list.push(reason);
  reasons.set(node, list);
  let lifted = false;
  return () => {
    if (lifted) return;
    lifted = true;
    const i = list.indexOf(reason);
    if (i >= 0) list.splice(i, 1);
  };
}

/** QEMU's refusal when `node` is blocked, or null. */
export function opBlockedError(node: BlockNode): BlockError | null {
  const reason = reasons.get(node)?.[0];
  return reason === undefined ? null : new BlockError('EBUSY', `Node '${node.nodeName}' is busy: ${reason}`);
}
