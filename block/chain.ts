/*
 * Backing chains: walking them, finding an image in one by name, and
 * changing the backing file an image names (what qemu-img commit and
 * rebase and the commit and stream jobs need from block.c).
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
 * `updateBackingName` is what an overlay does when the image below it
 * changes (bdrv_child_cb_update_filename): a read-only overlay is reopened
 * read-write around the header rewrite.
 *
 * `setBackingNode` is bdrv_set_backing_hd and `openStoredBacking`
 * bdrv_open_backing_file, for an image opened without its backing
 * (BDRV_O_NO_BACKING) that gets one later (drive-mirror's target): they
 * change the graph only, never the header.
 */
import fs from 'node:fs';
import { BlockError, toBlockError } from './errors.js';
import { flush } from './io.js';
import { fullBackingFilename, hasProtocol } from './create.js';
import type { BlockGraph } from './graph.js';
import type { DriverBackingInfo } from './info.js';
import { attachChild, ChildRole, detachChild, replaceChildNode, type BlockNode } from './node.js';
import { reopenSetReadOnly } from './reopen.js';

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

/**
 * bdrv_child_cb_update_filename: `overlay` names its new backing image
 * (`name`, `format`) in its header; a read-only overlay is made writable
 * for that and read-only again after (block/reopen.ts; a failure to
 * restore is ignored, as QEMU ignores it).
 */
export async function updateBackingName(overlay: BlockNode, name: string | null, format: string | null): Promise<void> {
  const wasReadOnly = overlay.readOnly;
  if (wasReadOnly) await reopenSetReadOnly(overlay, false);
  try {
    await changeBackingFile(overlay, name, format, false);
  } finally {
    if (wasReadOnly) await reopenSetReadOnly(overlay, true).catch(() => undefined);
  }
}

/** bdrv_set_backing_hd (see the note at the top): `backing` becomes `node`'s backing image; one it had is let go. */
export async function setBackingNode(graph: BlockGraph, node: BlockNode, backing: BlockNode | null): Promise<void> {
  const old = node.cowChild;
  if (old?.node === backing) return;
  if (old && backing) replaceChildNode(old, backing);
  else if (old) detachChild(old);
  else if (backing) attachChild(node, 'backing', ChildRole.COW, backing);
  if (old) await graph.unref(old.node);
}

/** bdrv_open_backing_file (see the note at the top): opens, read-only, the backing file `node` names and attaches it. */
export async function openStoredBacking(graph: BlockGraph, node: BlockNode): Promise<void> {
  const info = node.driver.getInfo(node) as DriverBackingInfo | null;
  if (!info?.backingFile) return;
  const filename = fullBackingFilename(node.file?.node.filename ?? node.filename, info.backingFile);
  let backing: BlockNode;
  try {
    backing = await graph.openImage(filename, { format: info.backingFormat, readOnly: true });
  } catch (e) {
    throw toBlockError(e, 'Could not open backing file');
  }
  try {
    await setBackingNode(graph, node, backing);
  } catch (e) {
    await graph.unref(backing);
    throw e;
  }
}
