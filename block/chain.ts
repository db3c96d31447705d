/*
 * Backing chains: walking them, finding an image in one by name, changing
 * the backing file an image names, and making a backing image writable
 * (what qemu-img commit and rebase, and later the commit and stream jobs,
 * need from block.c).
 *
 * `findBackingImage` is QEMU's bdrv_find_backing_image: for each image of
 * the chain that has a backing file, the name asked for is compared with
 * the backing file that image stores. Plain paths are compared as
 * canonical absolute paths (realpath), both taken relative to the image
 * naming them, so `-b base.qcow2` finds the base next to its overlay
 * whatever the current directory; names with a protocol prefix are
 * compared as strings (as stored, and resolved); a backing given by options
 * rather than by the stored name matches only the backing node's filename.
 * A name that does not exist on disk matches nothing.
 *
 * `changeBackingFile` is bdrv_change_backing_file: a format given without
 * a backing file is EINVAL, and so is a backing file without a format when
 * the caller requires one (qemu-img since 6.1 refuses to write backing
 * names without formats). Everything written to the node before is flushed
 * first; the driver then rewrites its header durably. The graph does not
 * change.
 *
 * `reopenReadWrite` stands in for bdrv_reopen_set_read_only(node, false),
 * which the graph has no general form of yet: it opens a writable twin of
 * a read-only node from the options the node was opened with (children
 * named by node name are described by their own options), moves every
 * parent edge onto the twin, and closes the old node. Formats are as
 * opened, never probed again, so a probed raw image loses its first-sector
 * guard.
 */
import fs from 'node:fs';
import { BlockError } from './errors.js';
import { flush } from './io.js';
import { fullBackingFilename, hasProtocol } from './create.js';
import type { BlockGraph, Inherited } from './graph.js';
import type { DriverBackingInfo } from './info.js';
import type { OptionTree, OptionValue } from './keyval.js';
import { ChildRole, replaceChildNode, type BlockNode } from './node.js';

/** The image below `node`, filters skipped on both sides (bdrv_backing_chain_next). */
export function backingChainNext(node: BlockNode): BlockNode | null {
  return node.skipFilters().cowChild?.node.skipFilters() ?? null;
}

/** The backing file name `node` stores (null: none or unknown). */
export function storedBackingName(node: BlockNode): string | null {
  const info = node.driver.getInfo(node) as DriverBackingInfo | null;
  return info?.backingFile || null;
}

function realpathOrNull(file: string): string | null {
  try {
    return fs.realpathSync(file);
  } catch {
    return null;
  }
}

/** Whether `name` is the backing file `curr` names (one step of bdrv_find_backing_image). */
function namesBacking(curr: BlockNode, below: BlockNode, name: string): boolean {
  if (curr.options.backing !== undefined) return name === below.filename;
  const stored = storedBackingName(curr) ?? '';
  const storedFull = fullBackingFilename(curr.filename, stored);
  if (hasProtocol(name) || hasProtocol(stored)) return name === stored || name === storedFull;
  const wanted = realpathOrNull(fullBackingFilename(curr.filename, name));
  return wanted !== null && wanted === realpathOrNull(storedFull);
}

/** The image of `top`'s backing chain (not `top` itself) that `name` names, or null. */
export function findBackingImage(top: BlockNode, name: string): BlockNode | null {
  for (let curr: BlockNode | null = top.skipFilters(); curr?.cowChild; curr = backingChainNext(curr)) {
    const below = backingChainNext(curr);
    if (below && namesBacking(curr, below, name)) return below;
  }
  return null;
}

/** bdrv_change_backing_file (see the note at the top). */
export async function changeBackingFile(
  node: BlockNode,
  backingFile: string | null,
  backingFormat: string | null,
  requireFormat: boolean,
): Promise<void> {
  if (backingFormat !== null && backingFile === null) {
    throw new BlockError('EINVAL', 'A backing format needs a backing file');
  }
  if (requireFormat && backingFile !== null && backingFormat === null) {
    throw new BlockError('EINVAL', 'backing format must be specified');
  }
  await flush(node);
  await node.driver.changeBackingFile(node, backingFile, backingFormat);
}

/** Keys of a node's options that the twin must not copy: it gets its own name and flags. */
const NOT_REOPENED = new Set(['node-name', 'read-only', 'force-share']);

/** Options that open `node` again as it is (see the note at the top). */
function reopenOptions(node: BlockNode): OptionTree {
  const spec: OptionTree = {};
  for (const [key, value] of Object.entries(node.options)) {
    if (!NOT_REOPENED.has(key)) spec[key] = value as OptionValue;
  }
  spec.driver = node.driver.name;
  for (const child of node.children) {
    if (!(child.role & ChildRole.COW) && typeof spec[child.name] === 'string') spec[child.name] = reopenOptions(child.node);
  }
  return spec;
}

/** Makes `node` writable by replacing it with a writable twin (see the note at the top); returns the twin. */
export async function reopenReadWrite(
  graph: BlockGraph,
  node: BlockNode,
  flags: Pick<Inherited, 'direct' | 'noFlush' | 'unmap'> = {},
): Promise<BlockNode> {
  if (!node.readOnly) return node;
  const inherit: Inherited = { syncIo: node.openFlags.syncIo, ...flags, readOnly: false };
  const twin = await graph.openNode(reopenOptions(node), inherit);
  const moved = [];
  try {
    for (const edge of [...node.parents]) {
      replaceChildNode(edge, twin);
      moved.push(edge);
    }
  } catch (e) {
    for (const edge of moved) replaceChildNode(edge, node);
    await graph.unref(twin);
    throw e;
  }
  await graph.unref(node);
  return twin;
}
