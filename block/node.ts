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
 * and what it lets others do (`shared`). A user's edge (backend, export,
 * job) carries what the user asked for; a node's edges onto its children
 * are derived from the node's own parents by its driver's rule, and every
 * attach, detach, move or change below re-derives and checks the graph
 * beneath (block/perms.ts, QEMU's bdrv_refresh_perms). A refusal (QEMU's
 * "Permission conflict on node ..." naming both users, or "Block node is
 * read-only") leaves the graph as it was and throws EPERM. A batch of
 * edges moved together (replaceChildNodes, QEMU's bdrv_replace_node) is
 * checked once, after the whole move. Read-only changes after open only
 * through an in-place reopen (block/reopen.ts). Requests are issued
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
import { Perm } from './flags.js';
import type { NormalisedDriver } from './driver.js';
import { deriveChildPerms, refreshPerms } from './perms.js';
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
  /** A job's hold on a node (QEMU's child_job edge): neither a node nor a BlockBackend. */
  readonly isJob?: boolean;
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
  /** Writers refused (see readOnly); changed through setReadOnlyFlag only. */
  private readOnlyFlag: boolean;
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
  /** Dirty bitmaps on this node, newest first (block/dirty-bitmap.ts); the gate marks the recording ones. */
  readonly dirtyBitmaps: DirtyBitmap[] = [];
  private idleWaiters: Array<() => void> = [];

  constructor(driver: NormalisedDriver, nodeName: string, autoNamed: boolean, readOnly: boolean, openFlags: OpenFlags) {
    this.driver = driver;
    this.nodeName = nodeName;
    this.autoNamed = autoNamed;
    this.readOnlyFlag = readOnly;
    this.openFlags = openFlags;
  }

  /** The node refuses writers (no parent taking WRITE or WRITE_UNCHANGED, no writes through the gate). */
  get readOnly(): boolean {
    return this.readOnlyFlag;
  }

  /**
   * For block/reopen.ts (reopenSetReadOnly, QEMU's
   * bdrv_reopen_set_read_only) once the driver has switched — the one place
   * a node's read-only state changes after open — and for a driver's open
   * that falls back to read-only (nbd's auto-read-only).
   */
  setReadOnlyFlag(readOnly: boolean): void {
    this.readOnlyFlag = readOnly;
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
  /** The next node of its chain: a filter's child, else the backing image (bdrv_filter_or_cow_bs). */
  get filterOrCowNode(): BlockNode | null {
    return (this.driver.isFilter ? this.filteredChild : this.cowChild)?.node ?? null;
  }

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

export { refreshPermsBelow } from './perms.js';

/**
 * Changes what a user's edge takes and shares (bdrv_child_try_set_perm). A
 * refusal below puts it back and is thrown, unless the change only
 * loosened (then it is not expected, and ignored as QEMU does).
 */
export function setEdgePerms(edge: BdrvChild, perm: number, shared: number): void {
  const [oldPerm, oldShared] = [edge.perm, edge.shared];
  edge.perm = perm;
  edge.shared = shared;
  try {
    refreshPerms([edge.node]);
  } catch (e) {
    [edge.perm, edge.shared] = [oldPerm, oldShared];
    const tightens = perm & ~oldPerm || oldShared & ~shared;
    if (tightens) throw e;
  }
}

/** Passes a drained child's quiesce count on to a parent joining (+1) or leaving (-1) it. */
function carryQuiesce(parent: EdgeParent, node: BlockNode, direction: 1 | -1): void {
  for (let i = 0; i < node.quiesceCounter; i++) {
    if (direction > 0) parent.drainedBegin();
    else parent.drainedEnd();
  }
}

/** Takes `edge` out of its node's parents and its parent node's children. */
function unlink(edge: BdrvChild): void {
  const i = edge.node.parents.indexOf(edge);
  if (i >= 0) edge.node.parents.splice(i, 1);
  const p = edge.parent;
  if (p instanceof BlockNode) {
    const j = p.children.indexOf(edge);
    if (j >= 0) p.children.splice(j, 1);
  }
}

/**
 * Attaches a new edge parent -> node and refreshes the permissions below
 * (a refusal leaves nothing attached). `perm` and `shared` are what a
 * user asks for; a node parent's edge takes what its driver derives.
 */
export function attachChild(
  parent: EdgeParent,
  name: string,
  role: ChildRoleFlags,
  node: BlockNode,
  perm = 0,
  shared: number = Perm.ALL,
): BdrvChild {
  const taken = parent instanceof BlockNode ? deriveChildPerms(parent, role, node) : { perm, shared };
  const edge = new BdrvChild(name, role, parent, node, taken.perm, taken.shared);
  node.parents.push(edge);
  if (parent instanceof BlockNode) parent.children.push(edge);
  try {
    refreshPerms([node]);
  } catch (e) {
    unlink(edge);
    throw e;
  }
  carryQuiesce(parent, node, 1);
  return edge;
}

/**
 * Removes an edge from both ends. What the node takes below can only
 * shrink, so a refusal of the refresh is not expected; it would leave the
 * old permissions in place (QEMU ignores it too).
 */
export function detachChild(edge: BdrvChild): void {
  if (!edge.node.parents.includes(edge)) return;
  unlink(edge);
  try {
    refreshPerms([edge.node]);
  } catch {
    // The edges below keep their old permissions.
  }
  carryQuiesce(edge.parent, edge.node, -1);
}

/** Re-points one edge at `node`, drain counts following it; no permission work. */
function relink(edge: BdrvChild, node: BlockNode): void {
  const i = edge.node.parents.indexOf(edge);
  if (i >= 0) edge.node.parents.splice(i, 1);
  carryQuiesce(edge.parent, edge.node, -1);
  edge.node = node;
  node.parents.push(edge);
  carryQuiesce(edge.parent, node, 1);
}

/**
 * Re-points `edges` (listed oldest first, as node.parents lists them) at
 * `to`, then refreshes `to` and the nodes they left, once (QEMU's
 * bdrv_replace_node: a filter's child permissions may only fit once all
 * its parents have moved). They join `to` in QEMU's order. A refusal moves
 * them all back and is thrown.
 */
export function replaceChildNodes(edges: readonly BdrvChild[], to: BlockNode): void {
  const moving = edges.filter((edge) => edge.node !== to);
  const from = moving.map((edge) => edge.node);
  const lists = new Map([to, ...from].map((node) => [node, [...node.parents]] as const));
  for (let i = moving.length - 1; i >= 0; i--) relink(moving[i]!, to);
  try {
    refreshPerms([to, ...new Set(from)]);
  } catch (e) {
    moving.forEach((edge, i) => relink(edge, from[i]!));
    for (const [node, parents] of lists) node.parents.splice(0, node.parents.length, ...parents);
    throw e;
  }
}

/** Re-points an edge at another node (mirror pivot, backing changes). */
export function replaceChildNode(edge: BdrvChild, node: BlockNode): void {
  replaceChildNodes([edge], node);
}
