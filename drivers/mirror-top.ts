/*
 * `mirror_top`: the filter a mirror (or active commit) job inserts above its
 * source (QEMU's bdrv_mirror_top in block/mirror.c).
 *
 * Every parent of the source is moved onto the filter when the job starts,
 * so every guest write of the source passes here. Reads, flushes and block
 * status pass through to the `backing` child (the source). Writes,
 * write-zeroes and discards are handed to the job's hooks (`MirrorTopHooks`),
 * which write the source and, by copy mode, either mark the job's dirty
 * bitmap (background) or also write the target before the guest write
 * completes (write-blocking). Without hooks (before the job attached, after
 * it let go) the filter passes everything through.
 *
 * The node is not user-creatable in QEMU and is not here either: the
 * driver is in no driver list (blockdev-add and `qemu-img --help` do not
 * know it); `insertMirrorTop` builds the node directly, attaches the
 * source and registers it in the graph under `filter-node-name` or an
 * automatic `#blockNNN`; the caller then moves the parents. Resizing
 * through the filter is refused (ENOTSUP), as a mirror blocks resize of
 * its source.
 *
 * Permissions (bdrv_mirror_top_child_perm): the source takes and shares
 * what the filter's users do (QEMU's filter default); for an active
 * commit — the job's target is in the source's backing chain — it takes
 * no consistent read (unshared above the base in QEMU) and shares write,
 * so the job can write the base below. Once the job exits (`stopMirrorTop`,
 * QEMU's `stop` in mirror_exit_common, and on a failed set-up) the filter
 * takes nothing and shares everything: the job no longer reads the source,
 * and the source (or, after a pivot, the target) must not keep permissions
 * for users about to move off it — a source that becomes the backing image
 * of the target must hold no write. The caller keeps the filter drained
 * from then until it is gone, so no request passes it without them.
 */
import { z } from 'zod';
import { BlockError } from '../block/errors.js';
import { Perm, Req, Status } from '../block/flags.js';
import { flush, pdiscard, preadv, pwriteZeroes, pwritev, refreshLength } from '../block/io.js';
import { attachChild, BlockNode, ChildRole, refreshPermsBelow, type BdrvChild } from '../block/node.js';
import { filterDefaultPerms, type PermPair } from '../block/perms.js';
import { normaliseDriver, type BlockDriver } from '../block/driver.js';
import type { BlockGraph } from '../block/graph.js';
import { invalidNodeName } from '../block/options.js';

export const MIRROR_TOP_DRIVER = 'mirror_top';

/** One guest write as the job sees it: where, and how to issue it to the source or to another edge. */
export interface GuestWrite {
  offsetBytes: number;
  bytes: number;
  /** A discard: a hint that may leave any content, so the job copies the range afterwards rather than repeating it. */
  discard: boolean;
  /** Issues the request to the source (the filter's child). */
  toSource(): Promise<void>;
  /** Issues the same request through `edge` (the job's target edge). */
  toEdge(edge: BdrvChild): Promise<void>;
}

/** What the job supplies to the filter. */
export interface MirrorTopHooks {
  write(req: GuestWrite): Promise<void>;
  /** The job's target: in the source's backing chain for an active commit. */
  readonly target?: BlockNode;
}

interface MirrorTopState {
  child: BdrvChild | null;
  hooks: MirrorTopHooks | null;
  /** QEMU's is_commit: set once a job whose target is in the source's chain attaches. */
  isCommit: boolean;
  /** QEMU's stop: the job has exited; nothing is passed on any more. */
  stopped: boolean;
}

const state = (node: BlockNode) => node.opaque as MirrorTopState;

function child(node: BlockNode): BdrvChild {
  const c = state(node).child;
  if (!c) throw new BlockError('ENOMEDIUM');
  return c;
}

/** Runs a guest write through the hooks, or straight to the source. */
function guestWrite(
  node: BlockNode,
  offsetBytes: number,
  bytes: number,
  issue: (edge: BdrvChild) => Promise<void>,
  discard = false,
) {
  const s = state(node);
  const req: GuestWrite = { offsetBytes, bytes, discard, toSource: () => issue(child(node)), toEdge: issue };
  return s.hooks ? s.hooks.write(req) : req.toSource();
}

/** bdrv_mirror_top_child_perm (see the note at the top). */
function childPerms(node: BlockNode, _role: number, users: PermPair): PermPair {
  if (state(node)?.stopped) return { perm: 0, shared: Perm.ALL };
  const { perm, shared } = filterDefaultPerms(users);
  if (!state(node)?.isCommit) return { perm, shared };
  return { perm: perm & ~Perm.CONSISTENT_READ, shared: shared | Perm.WRITE };
}

/** bdrv_chain_contains: `node` is `top` or below it through filtered and backing children. */
function chainContains(top: BlockNode, node: BlockNode): boolean {
  for (let n: BlockNode | undefined = top; n; n = (n.filteredChild ?? n.cowChild)?.node) if (n === node) return true;
  return false;
}

export const mirrorTopDriver: BlockDriver = {
  name: MIRROR_TOP_DRIVER,
  isFilter: true,
  optionsSchema: z.object({}),
  async open() {
    throw new BlockError('EINVAL', "Unknown driver 'mirror_top'");
  },
  childPerms,
  getLength: async (node) => state(node).child?.node.totalBytes ?? 0,
  coPreadv: (node, offsetBytes, buf, flags) => preadv(child(node), offsetBytes, buf, flags),
  coPwritev: (node, offsetBytes, buf, flags) =>
    guestWrite(node, offsetBytes, buf.length, (edge) => pwritev(edge, offsetBytes, buf, flags)),
  coPwriteZeroes: (node, offsetBytes, bytes, flags) =>
    guestWrite(node, offsetBytes, bytes, (edge) => pwriteZeroes(edge, offsetBytes, bytes, flags)),
  coPdiscard: (node, offsetBytes, bytes) =>
    guestWrite(node, offsetBytes, bytes, (edge) => pdiscard(edge, offsetBytes, bytes), true),
  coFlushToOs: async (node) => flush(child(node).node),
  coBlockStatus: async (node, _wantZero, offsetBytes, bytes) => ({
    status: Status.RAW | Status.OFFSET_VALID,
    pnum: bytes,
    map: offsetBytes,
    file: child(node).node,
  }),
};

/** The normalised driver, built once (the filter is not in the graph's driver list). */
const normalisedMirrorTop = normaliseDriver(mirrorTopDriver);

/**
 * The node name of a job's filter: the user's `nodeName`, checked as
 * QEMU checks it and refused when taken, or (null) the graph's next
 * implicit `#blockNNN`, as QEMU names an unnamed filter.
 */
export function jobFilterName(graph: BlockGraph, nodeName: string | null): string {
  if (nodeName === null) return graph.implicitNodeName();
  const reason = invalidNodeName(nodeName);
  if (reason) throw new BlockError('EINVAL', reason);
  if (graph.nodes.has(nodeName)) throw new BlockError('EEXIST', `Duplicate nodes with node-name='${nodeName}'`);
  return nodeName;
}

/**
 * Builds a mirror_top node above `source` and registers it in the graph;
 * moves nothing yet: the caller moves the parents (block/replace.ts) once
 * the job is set up. `nodeName` null gives an automatic name.
 */
export async function insertMirrorTop(graph: BlockGraph, source: BlockNode, nodeName: string | null): Promise<BlockNode> {
  const name = jobFilterName(graph, nodeName);
  // Read-write whatever the source is, as QEMU opens it (BDRV_O_RDWR): its permissions come from its users.
  const filter = new BlockNode(normalisedMirrorTop, name, nodeName === null, false, {
    ...source.openFlags,
    detectZeroes: 'off',
  });
  filter.opaque = { child: null, hooks: null, isCommit: false, stopped: false } satisfies MirrorTopState;
  const edge = attachChild(filter, 'backing', ChildRole.FILTERED | ChildRole.PRIMARY, source);
  state(filter).child = edge;
  filter.supportedWriteFlags = Req.FUA & source.supportedWriteFlags;
  filter.supportedZeroFlags = (Req.FUA | Req.MAY_UNMAP | Req.NO_FALLBACK) & source.supportedZeroFlags;
  filter.limits = { ...source.limits };
  filter.filename = source.filename;
  filter.options = { driver: MIRROR_TOP_DRIVER, 'node-name': name, backing: source.nodeName };
  await refreshLength(filter);
  graph.nodes.set(name, filter);
  return filter;
}

/** The filter's edge onto its child (the source, or the target after a pivot). */
export function mirrorTopChild(filter: BlockNode): BdrvChild {
  return child(filter);
}

/** Attaches (or with null detaches) the job's hooks; an active commit's job makes the filter a commit filter. */
export function setMirrorTopHooks(filter: BlockNode, hooks: MirrorTopHooks | null): void {
  const s = state(filter);
  s.hooks = hooks;
  if (s.isCommit || !hooks?.target || !s.child || !chainContains(s.child.node, hooks.target)) return;
  s.isCommit = true;
  refreshPermsBelow(filter);
}

/** The job exits (QEMU's `stop`): the filter's edge takes nothing and shares everything from now on. */
export function stopMirrorTop(filter: BlockNode): void {
  state(filter).stopped = true;
  refreshPermsBelow(filter);
}
