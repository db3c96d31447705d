/*
 * `copy-on-read`: a filter whose reads copy into its child what the child
 * does not allocate itself (QEMU 7.2's block/copy-on-read.c):
 * {driver: copy-on-read, file: child, bottom?: node-name}.
 *
 * Reads go to `file` with Req.COPY_ON_READ added; the gate of the child
 * does the copy (block/copy-on-read-io.ts). With `bottom` (QEMU 6.0+; the
 * stream job sets it to the lowest image it streams from), only data that
 * the chain from the child's backing image down to and including `bottom`
 * allocates is copied: the filter walks the read by block status — a
 * stretch the child allocates is read plainly, one that a layer down to
 * `bottom` allocates is read with COPY_ON_READ, anything else (data of the
 * images below `bottom`, or zeroes) plainly. A Req.PREFETCH read (the
 * stream job's) skips the stretches that need no copy altogether.
 *
 * Writes, write-zeroes and discards pass through unchanged; flush,
 * truncate, length and block status are the child's (the gate and the
 * normalised driver do that for filters).
 *
 * The edge onto `file` (cor_child_perm) passes on what the filter's users
 * take and share of consistent read, write and resize, and always takes
 * and shares WRITE_UNCHANGED for its copies (so a read-only child is
 * refused: "Block node is read-only"). `bottom` must name an existing non-filter node in
 * the chain below the child (QEMU 7.2 hangs on a node outside the chain;
 * we refuse it).
 *
 * `insertCopyOnRead` / `dropCopyOnRead` put the filter above a node in use
 * and take it out again (bdrv_insert_node, bdrv_cor_filter_drop), for the
 * stream job; without a node name the filter gets an automatic `#blockNNN`
 * one, as QEMU's implicit filter does.
 */
import { z } from 'zod';
import { BlockError } from '../block/errors.js';
import { Perm, Req } from '../block/flags.js';
import { backingChainNext } from '../block/chain.js';
import type { BlockDriver } from '../block/driver.js';
import type { BlockGraph } from '../block/graph.js';
import { pdiscard, preadv, pwriteZeroes, pwritev } from '../block/io.js';
import { ChildRole, type BdrvChild, type BlockNode } from '../block/node.js';
import type { PermPair } from '../block/perms.js';
import { zBlockdevRef } from '../block/options.js';
import { replaceNode } from '../block/replace.js';
import { blockStatusAbove, isAllocated } from '../block/status.js';

export const COPY_ON_READ_DRIVER = 'copy-on-read';

interface CorState {
  file: BdrvChild;
  /** Lowest image whose data is copied; null: every layer's. */
  bottom: BlockNode | null;
}

const state = (node: BlockNode) => node.opaque as CorState;

const optionsSchema = z.object({ file: zBlockdevRef.optional(), bottom: z.string().optional() });

/** What cor_child_perm passes on of its users' permissions (its PERM_PASSTHROUGH; WRITE_UNCHANGED is its own). */
const COR_PASSTHROUGH = Perm.CONSISTENT_READ | Perm.WRITE | Perm.RESIZE;

/** cor_child_perm (see the note at the top). */
function childPerms(_node: BlockNode, _role: number, users: PermPair): PermPair {
  return {
    perm: (users.perm & COR_PASSTHROUGH) | Perm.WRITE_UNCHANGED,
    shared: (users.shared & COR_PASSTHROUGH) | (Perm.ALL & ~COR_PASSTHROUGH),
  };
}

/** The layers of the chain below `top` (filters looked through), top excluded. */
function chainBelow(top: BlockNode): BlockNode[] {
  const out: BlockNode[] = [];
  for (let n = backingChainNext(top); n; n = backingChainNext(n)) out.push(n);
  return out;
}

function resolveBottom(graph: BlockGraph, file: BlockNode, name: string): BlockNode {
  const bottom = graph.nodes.get(name);
  if (!bottom) throw new BlockError('EINVAL', `Bottom node '${name}' not found`);
  if (bottom.driver.isFilter) throw new BlockError('EINVAL', `Bottom node '${name}' is a filter`);
  if (bottom !== file.skipFilters() && !chainBelow(file).includes(bottom)) {
    throw new BlockError('EINVAL', `Bottom node '${name}' is not in the backing chain of '${file.nodeName}'`);
  }
  return bottom;
}

/** Whether the child allocates the stretch; a failed query counts as "no" (the read will tell). */
async function ownAllocation(node: BlockNode, offsetBytes: number, bytes: number): Promise<{ allocated: boolean; pnum: number }> {
  try {
    return await isAllocated(node, offsetBytes, bytes);
  } catch {
    return { allocated: false, pnum: bytes };
  }
}

/**
 * Flags for the stretch at `offset` (at most `bytes`) and its length: COPY_ON_READ added when
 * a layer from the child's backing down to `bottom` allocates it (or block status failed).
 */
async function stretchFlags(s: CorState, offsetBytes: number, bytes: number, flags: number): Promise<{ flags: number; bytes: number }> {
  const top = s.file.node;
  const own = await ownAllocation(top, offsetBytes, bytes);
  if (own.allocated) return { flags, bytes: own.pnum };
  const below = backingChainNext(top);
  if (!below || top.skipFilters() === s.bottom) return { flags, bytes: own.pnum };
  try {
    const st = await blockStatusAbove(below, s.bottom!.skipFilters().cowChild?.node ?? null, offsetBytes, own.pnum, false);
    // pnum 0: past the end of the backing chain; reads there are the child's zeroes.
    if (st.pnum === 0) return { flags, bytes: own.pnum };
    return { flags: st.depth > 0 ? flags | Req.COPY_ON_READ : flags, bytes: st.pnum };
  } catch {
    return { flags: flags | Req.COPY_ON_READ, bytes: own.pnum };
  }
}

/** cor_co_preadv_part with a bottom node: stretch by stretch (see the note at the top). */
async function readAboveBottom(s: CorState, offsetBytes: number, buf: Uint8Array, flags: number): Promise<void> {
  for (let done = 0; done < buf.length; ) {
    const step = await stretchFlags(s, offsetBytes + done, buf.length - done, flags);
    const needed = (step.flags & (Req.PREFETCH | Req.COPY_ON_READ)) !== Req.PREFETCH;
    if (needed) await preadv(s.file, offsetBytes + done, buf.subarray(done, done + step.bytes), step.flags);
    done += step.bytes;
  }
}

export const copyOnReadDriver: BlockDriver = {
  name: COPY_ON_READ_DRIVER,
  isFilter: true,
  optionsSchema,
  async open(node, options, ctx) {
    const o = options as z.output<typeof optionsSchema>;
    // Required in QAPI's schema (BlockdevOptionsGenericFormat): QAPI's text.
    if (o.file === undefined) throw new BlockError('EINVAL', "Parameter 'file' is missing");
    const file = (await ctx.openChild('file', ChildRole.FILTERED | ChildRole.PRIMARY))!;
    const bottom = o.bottom === undefined ? null : resolveBottom(ctx.graph, file.node, o.bottom);
    node.opaque = { file, bottom } satisfies CorState;
    node.supportedWriteFlags = Req.WRITE_UNCHANGED | (Req.FUA & file.node.supportedWriteFlags);
    node.supportedZeroFlags = Req.WRITE_UNCHANGED | ((Req.FUA | Req.MAY_UNMAP | Req.NO_FALLBACK) & file.node.supportedZeroFlags);
  },
  childPerms,
  getLength: async (node) => state(node).file.node.totalBytes,
  coPreadv(node, offsetBytes, buf, flags) {
    const s = state(node);
    if (!s.bottom) return preadv(s.file, offsetBytes, buf, flags | Req.COPY_ON_READ);
    return readAboveBottom(s, offsetBytes, buf, flags);
  },
  coPwritev: (node, offsetBytes, buf, flags) => pwritev(state(node).file, offsetBytes, buf, flags),
  coPwriteZeroes: (node, offsetBytes, bytes, flags) => pwriteZeroes(state(node).file, offsetBytes, bytes, flags),
  coPdiscard: (node, offsetBytes, bytes) => pdiscard(state(node).file, offsetBytes, bytes),
};

/**
 * Opens a copy-on-read filter above `above` (copying data down to `bottom`)
 * and moves every parent of `above` onto it (bdrv_insert_node).
 * `nodeName` undefined: an automatic name.
 */
export async function insertCopyOnRead(graph: BlockGraph, above: BlockNode, bottom: BlockNode, nodeName?: string): Promise<BlockNode> {
  const options: Record<string, unknown> = { driver: COPY_ON_READ_DRIVER, file: above.nodeName, bottom: bottom.nodeName };
  if (nodeName !== undefined) options['node-name'] = nodeName;
  const filter = await withPrefix('Could not create node: ', () => graph.openNode(options as Parameters<BlockGraph['openNode']>[0]));
  try {
    await withPrefix('Could not replace node: ', () => replaceNode(above, filter, [state(filter).file]));
  } catch (e) {
    await graph.closeNode(filter);
    throw e;
  }
  return filter;
}

/** Runs `body`, prefixing the text of a BlockError it throws (QEMU's error_prepend). */
async function withPrefix<T>(prefix: string, body: () => Promise<T>): Promise<T> {
  try {
    return await body();
  } catch (e) {
    if (e instanceof BlockError) throw new BlockError(e.code, prefix + e.message, { cause: e });
    throw e;
  }
}

/** Takes the filter out: its parents go back onto its child, then it closes (bdrv_cor_filter_drop). */
export async function dropCopyOnRead(graph: BlockGraph, filter: BlockNode): Promise<void> {
  if (filter.closed) return;
  await replaceNode(filter, state(filter).file.node);
  await graph.closeNode(filter);
}
