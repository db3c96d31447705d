/*
 * Reopening a node read-only or read-write in place (QEMU's
 * bdrv_reopen_set_read_only: bdrv_reopen_queue + bdrv_reopen_multiple with
 * only the read-only option changed). It is the one way a node's
 * `readOnly` changes after open; jobs use it where QEMU does (stream and
 * commit make an image writable for their run and read-only again at the
 * end, active commit makes its base writable).
 *
 * The queue: the node and, recursively, the children it opened itself —
 * those given inline in its own options, or the protocol node a probed
 * image opened under it (QEMU's inherits_from) — except backing (COW)
 * children, which stay read-only. A child referenced by node name, or
 * owned by the user, belongs to its own users and keeps its state (going
 * read-write over such a read-only child fails, as in QEMU).
 *
 * In bdrv_reopen_multiple's order:
 *   1. every queued node is drained for the whole reopen (no request in
 *      flight on or above it, none starting), so a driver can swap its
 *      file descriptor or write its clean state undisturbed;
 *   2. permissions are checked against the state after the reopen, before
 *      anything changes (block/perms.ts refreshPerms with the queue's
 *      states to come, then put back): the children's edges are derived
 *      as for the new state (a writable format takes write and resize on
 *      its file), so going read-write over a child left read-only is
 *      refused ("Block node is read-only"), and going read-only under a
 *      parent that still takes write or write-unchanged is refused
 *      ("Read-only block node 'N' cannot support read-write users"), both
 *      EPERM; a force-share node stays read-only, as at open (EINVAL);
 *   3. every queued node is flushed ("Error flushing drive: …");
 *   4. the drivers switch (BlockDriver.reopen): going read-only from the top
 *      down, so a format writes its clean state while its file still takes
 *      writes, and only then loses its write permissions; going read-write
 *      from the bottom up, so the file is writable before the format above
 *      writes (qcow2 marks its bitmaps in use). With each driver the node's
 *      flag changes and the edges below it are derived again. A driver
 *      that fails leaves its node as it was; the nodes already switched are
 *      switched back (best effort) and the failure is thrown.
 *
 * Nothing else changes: the node keeps its driver state, caches, children,
 * parents, options and name, so everything holding it (QMP names,
 * exports, jobs) sees the same node. Left out: other options
 * (blockdev-reopen), BDRV_O_ALLOW_RDWR (no tool here opens a node that must
 * never become writable), auto-read-only.
 */
import { drainedBegin, drainedEnd } from './drain.js';
import { BlockError, strerror, toBlockError } from './errors.js';
import { flush } from './io.js';
import { ChildRole, type BdrvChild, type BlockNode } from './node.js';
import { refreshPerms, refreshPermsBelow } from './perms.js';

/** Whether `edge`'s child was opened as part of its parent (QEMU's inherits_from; see the note at the top). */
function inheritsFrom(edge: BdrvChild, parent: BlockNode): boolean {
  if (edge.role & ChildRole.COW || edge.node.userOwned) return false;
  const given = parent.options[edge.name];
  return (typeof given === 'object' && given !== null) || (parent.probed && edge.name === 'file');
}

/** bdrv_reopen_queue: `node` and the children reopened with it, parents before children. */
function reopenQueue(node: BlockNode): BlockNode[] {
  const queue = [node];
  for (let i = 0; i < queue.length; i++) {
    const parent = queue[i]!;
    for (const edge of parent.children) {
      if (inheritsFrom(edge, parent) && !queue.includes(edge.node)) queue.push(edge.node);
    }
  }
  return queue;
}

/** Step 2 of the note at the top: throws QEMU's refusal, or returns with nothing changed. */
function checkPermissions(node: BlockNode, switching: readonly BlockNode[], readOnly: boolean): void {
  if (!readOnly && switching.some((n) => n.forceShare)) {
    throw new BlockError('EINVAL', 'force-share=on can only be used with read-only images');
  }
  const undo = refreshPerms([node], { readOnlyAfter: new Map(switching.map((n) => [n, readOnly])) });
  undo();
}

/** Step 3: bdrv_reopen_multiple's flush of every queued node. */
async function flushQueue(queue: readonly BlockNode[]): Promise<void> {
  for (const node of queue) {
    try {
      await flush(node);
    } catch (e) {
      const code = toBlockError(e).code;
      throw new BlockError(code, `Error flushing drive: ${strerror(code)}`, { cause: e });
    }
  }
}

/** Sets the flag and derives the edges below `node` again; returns how to put both back. */
function applyState(node: BlockNode, readOnly: boolean): () => void {
  const wasReadOnly = node.readOnly;
  node.setReadOnlyFlag(readOnly);
  try {
    const undoPerms = refreshPermsBelow(node);
    return () => {
      node.setReadOnlyFlag(wasReadOnly);
      undoPerms();
    };
  } catch (e) {
    node.setReadOnlyFlag(wasReadOnly);
    throw e;
  }
}

/** One node's switch: driver and state, in the order the direction needs (step 4). */
async function switchNode(node: BlockNode, readOnly: boolean): Promise<void> {
  if (readOnly) {
    await node.driver.reopen(node, true);
    try {
      applyState(node, true);
    } catch (e) {
      await node.driver.reopen(node, false).catch(() => undefined);
      throw e;
    }
    return;
  }
  const undo = applyState(node, false);
  try {
    await node.driver.reopen(node, false);
  } catch (e) {
    undo();
    throw e;
  }
}

/** Step 4: switches the nodes in order; on a failure switches back those done and throws. */
async function switchAll(ordered: readonly BlockNode[], readOnly: boolean): Promise<void> {
  const done: BlockNode[] = [];
  try {
    for (const node of ordered) {
      await switchNode(node, readOnly);
      done.push(node);
    }
  } catch (e) {
    for (const node of done.reverse()) await switchNode(node, !readOnly).catch(() => undefined);
    throw toBlockError(e);
  }
}

/**
 * bdrv_reopen_set_read_only: makes `node` (and the children opened with
 * it) read-only or read-write in place (see the note at the top). Throws
 * QEMU's refusal with the node unchanged.
 */
export async function reopenSetReadOnly(node: BlockNode, readOnly: boolean): Promise<void> {
  if (node.closed) throw new BlockError('ENOMEDIUM');
  const queue = reopenQueue(node);
  const switching = queue.filter((n) => n.readOnly !== readOnly);
  if (switching.length === 0) return;
  const drained: BlockNode[] = [];
  try {
    for (const n of queue) {
      drained.push(n);
      await drainedBegin(n);
    }
    checkPermissions(node, switching, readOnly);
    await flushQueue(queue);
    await switchAll(readOnly ? switching : [...switching].reverse(), readOnly);
  } finally {
    for (const n of drained.reverse()) drainedEnd(n);
  }
}
