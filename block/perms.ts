/*
 * How permissions flow down the graph (QEMU's bdrv_child_perm,
 * bdrv_default_perms and bdrv_refresh_perms in block.c).
 *
 * An edge whose parent is a BlockBackend, an export or a job says itself
 * what it takes (`perm`) and what it lets others do (`shared`). An edge
 * whose parent is a node never does: the node's driver derives it from the
 * node's cumulative parent permissions (every parent's `perm` or'ed, every
 * parent's `shared` and'ed) by the child's role — BlockDriver.childPerms,
 * QEMU's default rule when the driver has none:
 *
 *   filtered child    passes its parents' permissions and sharing on;
 *   storage (DATA and/or METADATA, a format's file)
 *                     passes them on, and with METADATA adds consistent
 *                     read and, on a writable node, write and resize (the
 *                     format rewrites its metadata whatever its users do),
 *                     and shares neither write nor resize; DATA alone
 *                     shares no resize and widens write-unchanged to write
 *                     and write to resize;
 *   COW (backing)     takes consistent read if the parents do, shares
 *                     consistent read and write-unchanged, and write and
 *                     resize only when the parents share write;
 *   none of these     takes nothing and shares everything (QEMU asserts).
 *
 * A child opened with force-share shares everything whatever the rule says.
 * Here every permission is passed through (QEMU's GRAPH_MOD, the one it
 * does not pass, does not exist).
 *
 * Refresh (bdrv_refresh_perms): after any edge joins, leaves, moves or
 * changes, the nodes below are visited parents before children (QEMU's
 * topological order); at each the parents must allow each other
 * (bdrv_parent_perms_conflict: every pair, newest parent first), a node
 * that will be read-only may have no parent taking write or
 * write-unchanged, and then the node's child edges are derived again. The
 * first refusal puts back every edge changed so far and is thrown (EPERM)
 * in QEMU's words. `readOnlyAfter` gives the read-only state nodes are
 * about to take (QEMU's reopen queue), for a reopen that checks before it
 * switches.
 *
 * Drivers see their node's new cumulative permissions as QEMU's
 * bdrv_drv_set_perm does (the file driver locks host bytes for them):
 * checkPerm at each node as it is visited, after the conflict checks and
 * before its children are derived; a refusal (or any later refusal) calls
 * abortPerm on every node checked so far, newest first; once all passed,
 * setPerm commits each. The undo a refresh returns commits the restored
 * permissions again.
 *
 * Left out: QEMU's check that an image whose length is not a multiple of
 * the request alignment gets write only with resize, and BDRV_O_INACTIVE.
 */
import { BlockError } from './errors.js';
import { Perm, permNames } from './flags.js';
import { ChildRole, type BdrvChild, type BlockNode, type ChildRoleFlags, type EdgeParent } from './node.js';

/** What an edge takes and what it lets others take. */
export interface PermPair {
  perm: number;
  shared: number;
}

/** A node's parents as its rule sees them: cumulative permissions, and whether the node is (or will be) writable. */
export interface ParentPerms extends PermPair {
  writable: boolean;
}

/** What a filter passes on of its parents' permissions (DEFAULT_PERM_PASSTHROUGH: every bit here). */
export const PERM_PASSTHROUGH = Perm.CONSISTENT_READ | Perm.WRITE | Perm.WRITE_UNCHANGED | Perm.RESIZE;
/** What a filter always shares (DEFAULT_PERM_UNCHANGED: GRAPH_MOD in QEMU, nothing here). */
export const PERM_UNCHANGED = Perm.ALL & ~PERM_PASSTHROUGH;

/** bdrv_filter_default_perms. */
export function filterDefaultPerms(parents: PermPair): PermPair {
  return { perm: parents.perm & PERM_PASSTHROUGH, shared: (parents.shared & PERM_PASSTHROUGH) | PERM_UNCHANGED };
}

/** bdrv_default_perms_for_cow. */
function cowDefaultPerms(parents: PermPair): PermPair {
  const shared = parents.shared & Perm.WRITE ? Perm.WRITE | Perm.RESIZE : 0;
  return { perm: parents.perm & Perm.CONSISTENT_READ, shared: shared | Perm.CONSISTENT_READ | Perm.WRITE_UNCHANGED };
}

/** bdrv_default_perms_for_storage. */
function storageDefaultPerms(role: ChildRoleFlags, parents: ParentPerms): PermPair {
  let { perm, shared } = filterDefaultPerms(parents);
  if (role & ChildRole.METADATA) {
    if (parents.writable) perm |= Perm.WRITE | Perm.RESIZE;
    perm |= Perm.CONSISTENT_READ;
    shared &= ~(Perm.WRITE | Perm.RESIZE);
  }
  if (role & ChildRole.DATA) {
    shared &= ~Perm.RESIZE;
    if (perm & Perm.WRITE_UNCHANGED) perm |= Perm.WRITE;
    if (perm & Perm.WRITE) perm |= Perm.RESIZE;
  }
  return { perm, shared };
}

/** bdrv_default_perms: the rule of drivers without their own (see the note at the top). */
export function defaultChildPerms(_node: BlockNode, role: ChildRoleFlags, parents: ParentPerms): PermPair {
  if (role & ChildRole.FILTERED) return filterDefaultPerms(parents);
  if (role & ChildRole.COW) return cowDefaultPerms(parents);
  if (role & (ChildRole.DATA | ChildRole.METADATA)) return storageDefaultPerms(role, parents);
  return { perm: 0, shared: Perm.ALL };
}

/** The read-only state `node` has, or will have once the reopen described by `readOnlyAfter` is done. */
function readOnlyAfterReopen(node: BlockNode, opts: RefreshOptions): boolean {
  return opts.readOnlyAfter?.get(node) ?? node.readOnly;
}

/** bdrv_child_perm: what `node` takes and shares on a child `child` in `role`, from its parents now. */
export function deriveChildPerms(node: BlockNode, role: ChildRoleFlags, child: BlockNode, opts: RefreshOptions = {}): PermPair {
  const parents: ParentPerms = { ...node.parentPerms(), writable: !readOnlyAfterReopen(node, opts) };
  const next = node.driver.childPerms(node, role, parents);
  return child.forceShare ? { perm: next.perm, shared: Perm.ALL } : next;
}

// ---------------------------------------------------------------- conflicts

/** One user of a node, as the permission check sees it. */
interface PermUser {
  parent: EdgeParent;
  name: string;
  perm: number;
  shared: number;
}

/** QEMU's bdrv_a_allow_b: null when `a` shares all that `b` needs, else QEMU's refusal. */
function refusal(node: BlockNode, a: PermUser, b: PermUser): string | null {
  const missing = b.perm & ~a.shared;
  if (!missing) return null;
  const at = `node '${node.nodeName}'`;
  return (
    `Permission conflict on ${at}: permissions '${permNames(missing)}' are both required by ` +
    `${b.parent.describe()} (uses ${at} as '${b.name}' child) and unshared by ${a.parent.describe()} (uses ${at} as '${a.name}' child).`
  );
}

/**
 * bdrv_parent_perms_conflict: the first pair of the node's parents that do
 * not allow each other, in QEMU's list order (newest first; ours keeps
 * them oldest first), or null.
 */
function parentsConflict(node: BlockNode): string | null {
  const users: readonly PermUser[] = [...node.parents].reverse();
  for (const a of users) {
    for (const b of users) {
      const reason = a === b ? null : refusal(node, a, b);
      if (reason) return reason;
    }
  }
  return null;
}

/** bdrv_node_refresh_perm's read-only check (see the note at the top). */
function readOnlyConflict(node: BlockNode, opts: RefreshOptions): string | null {
  if (!(node.parentPerms().perm & (Perm.WRITE | Perm.WRITE_UNCHANGED))) return null;
  if (!readOnlyAfterReopen(node, opts)) return null;
  return node.readOnly ? 'Block node is read-only' : `Read-only block node '${node.nodeName}' cannot support read-write users`;
}

// ---------------------------------------------------------------- refresh

export interface RefreshOptions {
  /** Read-only states nodes are about to take (a reopen checking first); other nodes keep theirs. */
  readOnlyAfter?: ReadonlyMap<BlockNode, boolean>;
}

/** Puts back what a refresh changed. */
export type PermUndo = () => void;

/** bdrv_topological_dfs over several roots: every node of their subtrees, parents before children. */
function topologicalOrder(roots: readonly BlockNode[]): BlockNode[] {
  const seen = new Set<BlockNode>();
  const postOrder: BlockNode[] = [];
  for (const root of roots) {
    if (seen.has(root)) continue;
    seen.add(root);
    const stack: Array<{ node: BlockNode; next: number }> = [{ node: root, next: 0 }];
    while (stack.length > 0) {
      const top = stack[stack.length - 1]!;
      const edge = top.node.children[top.next++];
      if (!edge) {
        postOrder.push(top.node);
        stack.pop();
      } else if (!seen.has(edge.node)) {
        seen.add(edge.node);
        stack.push({ node: edge.node, next: 0 });
      }
    }
  }
  return postOrder.reverse();
}

/** Derives `node`'s child edges again, logging the old values of those that change. */
function rederiveChildren(node: BlockNode, opts: RefreshOptions, log: Array<[BdrvChild, number, number]>): void {
  for (const edge of node.children) {
    const next = deriveChildPerms(node, edge.role, edge.node, opts);
    if (next.perm === edge.perm && next.shared === edge.shared) continue;
    log.push([edge, edge.perm, edge.shared]);
    edge.perm = next.perm;
    edge.shared = next.shared;
  }
}

/**
 * bdrv_list_refresh_perms: checks and derives the subtrees of `roots` (see
 * the note at the top). Throws the first refusal with every edge as it
 * was; otherwise returns how to put the edges back (a caller whose later
 * step fails).
 */
export function refreshPerms(roots: readonly BlockNode[], opts: RefreshOptions = {}): PermUndo {
  const log: Array<[BdrvChild, number, number]> = [];
  const undo = () => {
    for (const [edge, perm, shared] of log.reverse()) [edge.perm, edge.shared] = [perm, shared];
    log.length = 0;
  };
  const checked: BlockNode[] = [];
  try {
    for (const node of topologicalOrder(roots)) {
      const reason = parentsConflict(node) ?? readOnlyConflict(node, opts);
      if (reason) throw new BlockError('EPERM', reason);
      const { perm, shared } = node.parentPerms();
      node.driver.checkPerm(node, perm, shared);
      checked.push(node);
      rederiveChildren(node, opts, log);
    }
  } catch (e) {
    for (const node of checked.reverse()) node.driver.abortPerm(node);
    undo();
    throw e;
  }
  commitPerms(checked);
  return () => {
    undo();
    commitPerms(checked);
  };
}

/** bdrv_drv_set_perm's commit: each node's driver takes its cumulative permissions as they are now. */
function commitPerms(nodes: readonly BlockNode[]): void {
  for (const node of nodes) {
    const { perm, shared } = node.parentPerms();
    node.driver.setPerm(node, perm, shared);
  }
}

/** bdrv_refresh_perms(node): for callers that changed what `node` or its parents hold (a reopen, a filter's state). */
export function refreshPermsBelow(node: BlockNode, opts: RefreshOptions = {}): PermUndo {
  return refreshPerms([node], opts);
}
