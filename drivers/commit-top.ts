/*
 * `commit_top`: the filter an intermediate commit job puts above its top
 * image (QEMU 7.2's bdrv_commit_top in block/commit.c), so the overlays of
 * top read through a node the job owns until the committed images drop
 * out of the chain.
 *
 * Reads pass to the `backing` child (top); block status and length are the
 * child's. The node is read-only (QEMU opens it with no flags) and its
 * edge onto top needs nothing and shares everything (bdrv_commit_top's
 * child_perm). Like mirror_top it is in no driver list (blockdev-add does
 * not know it): `insertCommitTop` builds the node, registers it under
 * `filter-node-name` or an automatic `#blockNNN`, and moves every parent
 * of top onto it; `removeCommitTop` moves them back (a failed or cancelled
 * commit) and closes it. After a successful commit the job moves the
 * filter's overlays onto the base itself (bdrv_drop_intermediate), so the
 * filter has no parents left when it closes.
 */
import { z } from 'zod';
import { BlockError } from '../block/errors.js';
import { Perm } from '../block/flags.js';
import { preadv, refreshLength } from '../block/io.js';
import { attachChild, BlockNode, ChildRole, type BdrvChild } from '../block/node.js';
import { normaliseDriver, type BlockDriver } from '../block/driver.js';
import type { BlockGraph } from '../block/graph.js';
import { jobFilterName } from './mirror-top.js';
import { replaceNode } from '../block/replace.js';

export const COMMIT_TOP_DRIVER = 'commit_top';

const child = (node: BlockNode) => node.opaque as BdrvChild;

export const commitTopDriver: BlockDriver = {
  name: COMMIT_TOP_DRIVER,
  isFilter: true,
  optionsSchema: z.object({}),
  async open() {
    throw new BlockError('EINVAL', `Unknown driver '${COMMIT_TOP_DRIVER}'`);
  },
  // bdrv_commit_top_child_perm: the filter needs nothing of top and shares everything.
  childPerms: () => ({ perm: 0, shared: Perm.ALL }),
  getLength: async (node) => child(node).node.totalBytes,
  coPreadv: (node, offsetBytes, buf, flags) => preadv(child(node), offsetBytes, buf, flags),
};

/** The normalised driver, built once (the filter is not in the graph's driver list). */
const normalisedCommitTop = normaliseDriver(commitTopDriver);

/** Builds a commit_top node above `top` and moves top's parents onto it (bdrv_append). */
export async function insertCommitTop(graph: BlockGraph, top: BlockNode, nodeName: string | undefined): Promise<BlockNode> {
  const name = jobFilterName(graph, nodeName ?? null);
  const filter = new BlockNode(normalisedCommitTop, name, nodeName === undefined, true, { ...top.openFlags, detectZeroes: 'off' });
  filter.opaque = attachChild(filter, 'backing', ChildRole.FILTERED | ChildRole.PRIMARY, top);
  filter.limits = { ...top.limits };
  filter.filename = top.filename;
  filter.options = { driver: COMMIT_TOP_DRIVER, 'node-name': name, backing: top.nodeName };
  await refreshLength(filter);
  graph.nodes.set(name, filter);
  try {
    await replaceNode(top, filter);
  } catch (e) {
    await graph.closeNode(filter);
    throw e;
  }
  return filter;
}

/** Moves the filter's parents back onto its child and closes it. */
export async function removeCommitTop(graph: BlockGraph, filter: BlockNode): Promise<void> {
  if (filter.closed) return;
  await replaceNode(filter, child(filter).node);
  await graph.closeNode(filter);
}
