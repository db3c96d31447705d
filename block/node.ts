/*
 * BlockNode (QEMU's BlockDriverState) and BdrvChild, the edge between a
 * parent (a node or a BlockBackend) and a child node.
 *
 * A node owns: its driver and the driver's state (`opaque`), its children
 * (edges with a name such as `file` or `backing` and role bits), the edges
 * of its parents, its cached length, its limits and supported request flags
 * (computed once at open, refreshed when children change), its open flags
 * (discard=unmap, detect-zeroes, cache modes), in-flight accounting for
 * drain, the tracked requests used to serialise read-modify-write, and
 * write/flush generations so a flush with nothing new to flush is free.
 *
 * Permissions: every edge says what its parent does with the child (`perm`)
 * and what it lets others do (`shared`). Attaching an edge whose needs clash
 * with another parent's sharing fails with EPERM, and a read-only node
 * refuses WRITE/RESIZE edges; the refusal is QEMU's "Permission conflict on
 * node ..." text naming both users. Most edges keep the permissions they
 * were attached with; a node with a `childPermRule` (copy-before-write)
 * re-derives its child edges from its parents when a parent joins or
 * leaves it directly (not on a re-pointed edge: the caller refreshes once
 * the move is over, as QEMU's bdrv_replace_node). Requests are issued
 * through edges; the gate refuses writes through an edge that lacks WRITE.
 *
 * Drain counts travel along edges: a parent attached to (or detached from)
 * a drained node is quiesced (released) as many times as the node is, so
 * drains stay balanced across graph changes such as a mirror pivot.
 *
 * Invariants: `totalBytes` is the node's length as last read from the driver
 * or grown by a write through an edge with RESIZE; `inFlight` counts
 * requests between gate entry and completion; `closed` nodes refuse requests
 * with ENOMEDIUM.
 */
import { BlockError } from './errors.js';
import { Perm, permNames } from './flags.js';
import type { NormalisedDriver } from './driver.js';
import type { TrackedRequest } from './tracked.js';
import type { DirtyBitmap } from './dirty-bitmap.js';

/** Child role bits (BdrvChildRole). */
export const ChildRole = {
  DATA: 0x1,
  METADATA: 0x2,
  FILTERED: 0x4,
  COW: 0x8,
  PRIMARY: 0x10,
} as const;
export type ChildRoleFlags = number;

/** I/O limits (BlockLimits); 0 means "no limit" for the max fields. */
export interface BlockLimits {
  /** Every request must be a multiple of this (bytes, power of two). */
  requestAlignment: number;
  /** Largest read/write the driver takes in one call (bytes, 0 = unlimited). */
  maxTransfer: number;
  /** Preferred transfer size (bytes, 0 = none). */
  optTransfer: number;
  pwriteZeroesAlignment: number;
  maxPwriteZeroes: number;
  pdiscardAlignment: number;
  maxPdiscard: number;
}

export function defaultLimits(): BlockLimits {
  return {
    requestAlignment: 1,
    maxTransfer: 0,
    optTransfer: 0,
    pwriteZeroesAlignment: 0,
    maxPwriteZeroes: 0,
    pdiscardAlignment: 0,
    maxPdiscard: 0,
  };
}

export type DetectZeroes = 'off' | 'on' | 'unmap';

/** Open-time behaviour flags (BDRV_O_*). */
export interface OpenFlags {
  /** discard=unmap: discard requests and MAY_UNMAP reach the driver. */
  unmap: boolean;
  detectZeroes: DetectZeroes;
  /** cache.direct: bypass the host page cache. */
  direct: boolean;
  /** cache.no-flush: flushes stop at the OS (cache=unsafe). */
  noFlush: boolean;
  /**
   * Host I/O runs synchronously on the calling thread instead of Node's
   * thread pool. For tools that issue one request at a time (qemu-io-ts,
   * qemu-img-ts) this saves a thread hand-off per request, which costs more
   * than the syscall on a page-cache hit. Never for servers: a slow disk
   * would stall every client. Not a QEMU option; set by the caller.
   */
  syncIo: boolean;
}

/** Something that can hold an edge to a node: a node or a BlockBackend. */
export interface EdgeParent {
  /** For messages: "node 'x'", "block device 'y'" or "an unnamed block device". */
  describe(): string;
  /** Requests this parent has started and not finished. */
  readonly inFlight: number;
  /** Resolves when `inFlight` is 0. */
  waitIdle(): Promise<void>;
  /** Drain of a child began/ended: stop/resume issuing new requests. */
  drainedBegin(): void;
  drainedEnd(): void;
}

/** A parent for short-lived internal edges (format probing, one-off reads). */
export class TransientParent implements EdgeParent {
  inFlight = 0;
  constructor(private readonly what: string) {}
  describe(): string {
    return this.what;
  }
  async waitIdle(): Promise<void> {}
  drainedBegin(): void {}
  drainedEnd(): void {}
}

export class BdrvChild {
  constructor(
    readonly name: string,
    readonly role: ChildRoleFlags,
    readonly parent: EdgeParent,
    public node: BlockNode,
    public perm: number,
    public shared: number,
  ) {}

  describe(): string {
    return `${this.parent.describe()} as '${this.name}'`;
  }
}

export class BlockNode implements EdgeParent {
  readonly driver: NormalisedDriver;
  nodeName: string;
  readonly autoNamed: boolean;
  /** Driver state; each driver casts it to its own type. */
  opaque: unknown = undefined;
  readonly children: BdrvChild[] = [];
  readonly parents: BdrvChild[] = [];
  totalBytes = 0;
  readOnly: boolean;
  openFlags: OpenFlags;
  limits: BlockLimits = defaultLimits();
  /** Flags coPwritev honours natively (FUA); others are emulated or dropped. */
  supportedWriteFlags = 0;
  /** Flags coPwriteZeroes honours natively (FUA, MAY_UNMAP, NO_FALLBACK). */
  supportedZeroFlags = 0;
  /** Name shown by qemu-img (`filename`): the file name or a json: description. */
  filename = '';
  /** The blockdev options this node was opened with (validated). */
  options: Record<string, unknown> = {};
  closed = false;
  /** Added by the user by name (blockdev-add): stays open with no parents. */
  userOwned = false;
  /** force-share: other users may write and resize what this node reads. */
  forceShare = false;
  /** The format was probed rather than given. */
  probed = false;
  /** Opened without its backing file unless options name one (BDRV_O_NO_BACKING). */
  noBacking = false;

  inFlight = 0;
  quiesceCounter = 0;
  /**
   * Block jobs holding this node (QEMU's child_job edges, block_job_add_bdrv):
   * drains of the node reach them as they reach parents (a job pauses), but
   * they take no permissions and never move with the node's parents.
   */
  readonly holders: EdgeParent[] = [];
  readonly tracked = new Set<TrackedRequest>();
  /** How many tracked requests are serialising (0 lets requests skip the overlap scan). */
  serialisingInFlight = 0;
  /** Increments on every completed write; compared with flushedGen. */
  writeGen = 0;
  flushedGen = 0;
  /** The flush in progress, which later flushes of the same generation join. */
  activeFlush: Promise<void> | null = null;
  /**
   * What this node takes and shares on a child edge given its own parents
   * (QEMU's bdrv_child_perm), for nodes whose child permissions follow their
   * parents; applied by refreshChildPerms. Null: the edges keep what they
   * were attached with.
   */
  childPermRule: ((edge: BdrvChild) => { perm: number; shared: number }) | null = null;
  /** Dirty bitmaps on this node, newest first (block/dirty-bitmap.ts); the gate marks the recording ones. */
  readonly dirtyBitmaps: DirtyBitmap[] = [];
  private idleWaiters: Array<() => void> = [];

  constructor(driver: NormalisedDriver, nodeName: string, autoNamed: boolean, readOnly: boolean, openFlags: OpenFlags) {
    this.driver = driver;
    this.nodeName = nodeName;
    this.autoNamed = autoNamed;
    this.readOnly = readOnly;
    this.openFlags = openFlags;
  }

  describe(): string {
    return `node '${this.nodeName}'`;
  }

  child(name: string): BdrvChild | null {
    return this.children.find((c) => c.name === name) ?? null;
  }

  get file(): BdrvChild | null {
    return this.child('file');
  }

  get backing(): BdrvChild | null {
    return this.child('backing');
  }

  /** The child a filter passes requests to (QEMU's bdrv_filter_child). */
  get filteredChild(): BdrvChild | null {
    return this.children.find((c) => c.role & ChildRole.FILTERED) ?? null;
  }

  /** The backing (COW) child, if the node has one. */
  get cowChild(): BdrvChild | null {
    return this.children.find((c) => c.role & ChildRole.COW) ?? null;
  }

  /** The primary child (storage of a format, or the filtered child). */
  get primaryChild(): BdrvChild | null {
    return this.children.find((c) => c.role & ChildRole.PRIMARY) ?? null;
  }

  /** Skips filters downwards: the first non-filter node (bdrv_skip_filters). */
  skipFilters(): BlockNode {
    let n: BlockNode = this;
    while (n.driver.isFilter && n.filteredChild) n = n.filteredChild.node;
    return n;
  }

  /** Parent nodes (not backends) of this node. */
  parentNodes(): BlockNode[] {
    const out: BlockNode[] = [];
    for (const edge of this.parents) {
      const p = edge.parent;
      if (p instanceof BlockNode && !out.includes(p)) out.push(p);
    }
    return out;
  }

  incInFlight(): void {
    this.inFlight++;
  }

  decInFlight(): void {
    this.inFlight--;
    if (this.inFlight === 0 && this.idleWaiters.length > 0) {
      const waiters = this.idleWaiters;
      this.idleWaiters = [];
      for (const w of waiters) w();
    }
  }

  /** A node parent quiesces by passing the drain on to its own parents. */
  drainedBegin(): void {
    if (this.quiesceCounter++ === 0) this.driver.drainBegin(this);
    for (const edge of this.parents) edge.parent.drainedBegin();
    for (const holder of this.holders) holder.drainedBegin();
  }

  drainedEnd(): void {
    if (--this.quiesceCounter === 0) this.driver.drainEnd(this);
    for (const edge of this.parents) edge.parent.drainedEnd();
    for (const holder of this.holders) holder.drainedEnd();
  }

  /** Resolves when no request is in flight on this node. */
  waitIdle(): Promise<void> {
    if (this.inFlight === 0) return Promise.resolve();
    return new Promise((resolve) => this.idleWaiters.push(resolve));
  }

  /** Permissions all parents but `except` require, and share, combined. */
  parentPerms(except?: BdrvChild): { perm: number; shared: number } {
    let perm = 0;
    let shared = Perm.ALL;
    for (const edge of this.parents) {
      if (edge === except) continue;
      perm |= edge.perm;
      shared &= edge.shared;
    }
    return { perm, shared };
  }
}

/** One user of a node, as the permission check sees it (an edge, or an edge about to be). */
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
 * Checks that `candidate` (a new or changed edge) can sit beside the node's
 * other parents (`except` is the edge being updated, if any). Returns a
 * reason for refusal, or null. Pairs are tried in QEMU's order
 * (bdrv_parent_perms_conflict): its parent list is newest first and the
 * candidate joins at the head, so the candidate's sharing is tried first.
 */
export function permissionConflict(node: BlockNode, candidate: PermUser, except?: BdrvChild): string | null {
  if (node.readOnly && candidate.perm & (Perm.WRITE | Perm.RESIZE)) {
    return `Block node '${node.nodeName}' is read-only`;
  }
  const users: PermUser[] = [candidate, ...node.parents.filter((e) => e !== except).reverse()];
  for (const a of users) {
    for (const b of users) {
      if (a === b || (a !== candidate && b !== candidate)) continue;
      const reason = refusal(node, a, b);
      if (reason) return reason;
    }
  }
  return null;
}

/** Changes what an edge takes and shares, after checking its node's other parents. */
export function setEdgePerms(edge: BdrvChild, perm: number, shared: number): void {
  const reason = permissionConflict(edge.node, { parent: edge.parent, name: edge.name, perm, shared }, edge);
  if (reason) throw new BlockError('EPERM', reason);
  edge.perm = perm;
  edge.shared = shared;
}

/**
 * Re-derives what `node` takes on its children from its parents, for nodes
 * with a rule (QEMU's bdrv_child_perm; only some filters have one here).
 * Edges changed before a refusal are put back, and the refusal is thrown.
 */
export function refreshChildPerms(node: BlockNode): void {
  const rule = node.childPermRule;
  if (!rule) return;
  const done: Array<[BdrvChild, number, number]> = [];
  try {
    for (const edge of node.children) {
      const next = rule(edge);
      if (next.perm === edge.perm && next.shared === edge.shared) continue;
      const before: [BdrvChild, number, number] = [edge, edge.perm, edge.shared];
      setEdgePerms(edge, next.perm, next.shared);
      done.push(before);
    }
  } catch (e) {
    for (const [edge, perm, shared] of done.reverse()) [edge.perm, edge.shared] = [perm, shared];
    throw e;
  }
}

/** Passes a drained child's quiesce count on to a parent joining (+1) or leaving (-1) it. */
function carryQuiesce(parent: EdgeParent, node: BlockNode, direction: 1 | -1): void {
  for (let i = 0; i < node.quiesceCounter; i++) {
    if (direction > 0) parent.drainedBegin();
    else parent.drainedEnd();
  }
}

/** Attaches a new edge parent -> node, checking permissions. */
export function attachChild(
  parent: EdgeParent,
  name: string,
  role: ChildRoleFlags,
  node: BlockNode,
  perm: number,
  shared: number,
): BdrvChild {
  const edge = new BdrvChild(name, role, parent, node, perm, shared);
  const reason = permissionConflict(node, edge);
  if (reason) throw new BlockError('EPERM', reason);
  node.parents.push(edge);
  try {
    refreshChildPerms(node);
  } catch (e) {
    node.parents.pop();
    throw e;
  }
  if (parent instanceof BlockNode) parent.children.push(edge);
  carryQuiesce(parent, node, 1);
  return edge;
}

/** A parent left: what the node takes on its children can only shrink, so a refusal is not expected (QEMU ignores it too). */
function relaxChildPerms(node: BlockNode): void {
  try {
    refreshChildPerms(node);
  } catch {
    // The edges keep their old permissions.
  }
}

/** Removes an edge from both ends. */
export function detachChild(edge: BdrvChild): void {
  const i = edge.node.parents.indexOf(edge);
  if (i < 0) return;
  edge.node.parents.splice(i, 1);
  relaxChildPerms(edge.node);
  const p = edge.parent;
  if (p instanceof BlockNode) {
    const j = p.children.indexOf(edge);
    if (j >= 0) p.children.splice(j, 1);
  }
  carryQuiesce(p, edge.node, -1);
}

/** Re-points an edge at another node (mirror pivot, backing changes). */
export function replaceChildNode(edge: BdrvChild, node: BlockNode): void {
  const reason = permissionConflict(node, edge);
  if (reason) throw new BlockError('EPERM', reason);
  const i = edge.node.parents.indexOf(edge);
  if (i >= 0) edge.node.parents.splice(i, 1);
  carryQuiesce(edge.parent, edge.node, -1);
  edge.node = node;
  node.parents.push(edge);
  carryQuiesce(edge.parent, node, 1);
}
