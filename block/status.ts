/*
 * Block status (QEMU's bdrv_co_block_status and _above): what a range of a
 * node holds, and through which layer of a backing chain.
 *
 * `blockStatus(node, …)` answers for one node, adding what the driver cannot
 * know alone:
 *   - beyond the end: EOF with pnum 0;
 *   - drivers without block status: DATA|ALLOCATED (protocols: at the same
 *     offset in themselves);
 *   - RAW answers (formats and filters that are a window on their child) are
 *     resolved by asking the child at `map`;
 *   - DATA or ZERO means ALLOCATED; an unallocated range of a format that
 *     supports backing reads as ZERO when it has no backing, or (wantZero)
 *     lies past the backing's end;
 *   - with wantZero and RECURSE, DATA at a host offset is checked against
 *     the host node, which may know it is a hole (ZERO).
 * Requests are widened to the node's request alignment before the driver
 * sees them and the answer is narrowed back to the caller's range first, so
 * RAW resolution and the generic bits work at the caller's offset (as in
 * QEMU). Offsets and pnum are in bytes.
 *
 * `blockStatusAbove(node, base, …)` walks the chain from `node` down to (not
 * including) `base`, stopping at the first layer that allocates the range;
 * `depth` is 1 for `node`, 2 for its backing, … and 0 when no layer above
 * `base` allocates it. A backing file shorter than its overlay reads as
 * zeroes allocated at that layer.
 */
import { BlockError } from './errors.js';
import { Status, alignDown, alignUp } from './flags.js';
import type { BlockStatusResult } from './driver.js';
import type { BlockNode } from './node.js';
import { checkRange } from './io.js';

export interface ChainStatusResult extends BlockStatusResult {
  /** 0: no layer above base allocates; 1: the top node; 2: its backing; … */
  depth: number;
}

/** Block status of one node for [offset, offset + bytes). */
export async function blockStatus(
  node: BlockNode,
  offsetBytes: number,
  bytes: number,
  wantZero = true,
): Promise<BlockStatusResult> {
  if (node.closed) throw new BlockError('ENOMEDIUM');
  checkRange(offsetBytes, bytes);
  const total = node.totalBytes;
  if (offsetBytes >= total) return { status: Status.EOF, pnum: 0 };
  bytes = Math.min(bytes, total - offsetBytes);
  if (bytes === 0) return { status: 0, pnum: 0 };
  node.incInFlight();
  try {
    const result = node.driver.has.blockStatus || node.driver.isFilter
      ? await statusFromDriver(node, offsetBytes, bytes, wantZero)
      : withoutDriverStatus(node, offsetBytes, bytes);
    if (offsetBytes + result.pnum === total) result.status |= Status.EOF;
    return result;
  } finally {
    node.decInFlight();
  }
}

function withoutDriverStatus(node: BlockNode, offsetBytes: number, bytes: number): BlockStatusResult {
  if (node.driver.protocolName !== undefined) {
    return { status: Status.DATA | Status.ALLOCATED | Status.OFFSET_VALID, pnum: bytes, map: offsetBytes, file: node };
  }
  return { status: Status.DATA | Status.ALLOCATED, pnum: bytes };
}

async function statusFromDriver(
  node: BlockNode,
  offsetBytes: number,
  bytes: number,
  wantZero: boolean,
): Promise<BlockStatusResult> {
  const align = node.limits.requestAlignment;
  const alignedOffset = alignDown(offsetBytes, align);
  const alignedBytes = alignUp(offsetBytes + bytes, align) - alignedOffset;
  const answer = await node.driver.coBlockStatus(node, wantZero, alignedOffset, alignedBytes);
  const skew = offsetBytes - alignedOffset;
  if (!(answer.pnum > skew && answer.pnum <= alignedBytes)) {
    throw new BlockError('EIO', `Driver '${node.driver.name}' returned an invalid block status length ${answer.pnum}`);
  }
  // Narrow the answer to the caller's range before anything else looks at it
  // (QEMU does the same): a RAW answer must be resolved at the caller's
  // offset, not at the aligned one, whose first bytes the caller never asked about.
  const narrowed: BlockStatusResult = { ...answer, pnum: Math.min(answer.pnum - skew, bytes) };
  if (narrowed.map !== undefined && narrowed.status & (Status.OFFSET_VALID | Status.RAW)) narrowed.map += skew;
  const result = answer.status & Status.RAW
    ? await resolveRaw(narrowed, wantZero)
    : await addGenericBits(node, narrowed, offsetBytes, wantZero);
  result.status &= ~(Status.RAW | Status.RECURSE | Status.EOF);
  return result;
}

/** A RAW answer: the content is the child's at `map`. */
async function resolveRaw(answer: BlockStatusResult, wantZero: boolean): Promise<BlockStatusResult> {
  if (answer.file === undefined || answer.map === undefined) {
    throw new BlockError('EIO', 'Block status RAW answer without a file and offset');
  }
  const below = await blockStatus(answer.file, answer.map, answer.pnum, wantZero);
  if (below.pnum === 0) {
    // The window reaches past the child's end: zeroes (as QEMU's zero-fill reads).
    return { status: Status.ZERO | Status.ALLOCATED, pnum: answer.pnum };
  }
  return below;
}

async function addGenericBits(
  node: BlockNode,
  answer: BlockStatusResult,
  offsetBytes: number,
  wantZero: boolean,
): Promise<BlockStatusResult> {
  const result = { ...answer };
  if (result.status & (Status.DATA | Status.ZERO)) {
    result.status |= Status.ALLOCATED;
  } else if (node.driver.supportsBacking) {
    const cow = node.cowChild;
    if (!cow || (wantZero && offsetBytes >= cow.node.totalBytes)) result.status |= Status.ZERO;
  }
  const file = result.file;
  const recurse =
    wantZero &&
    result.status & Status.RECURSE &&
    result.status & Status.DATA &&
    !(result.status & Status.ZERO) &&
    result.status & Status.OFFSET_VALID &&
    file !== undefined &&
    file !== node &&
    result.map !== undefined;
  if (recurse) await refineFromFile(result, file!, result.map!);
  return result;
}

/**
 * RECURSE: asks the host node whether DATA is really a hole. Errors are
 * ignored, as QEMU does: this only adds information.
 */
async function refineFromFile(result: BlockStatusResult, file: BlockNode, map: number): Promise<void> {
  let below: BlockStatusResult;
  try {
    below = await blockStatus(file, map, result.pnum, true);
  } catch {
    return;
  }
  if (below.status & Status.EOF && (below.pnum === 0 || below.status & Status.ZERO)) {
    result.status |= Status.ZERO;
  } else {
    result.pnum = below.pnum;
    result.status |= below.status & Status.ZERO;
  }
}

/**
 * Block status through the backing chain from `node` down to, not
 * including, `base` (null: the whole chain). Filters are looked through.
 */
export async function blockStatusAbove(
  node: BlockNode,
  base: BlockNode | null,
  offsetBytes: number,
  bytes: number,
  wantZero = true,
): Promise<ChainStatusResult> {
  let layer: BlockNode | null = node;
  let depth = 0;
  let result: BlockStatusResult = { status: 0, pnum: bytes };
  let eofAt = Infinity;
  while (layer && layer !== base) {
    depth++;
    result = await blockStatus(layer, offsetBytes, bytes, wantZero);
    if (depth === 1) {
      if (result.pnum === 0) return { ...result, depth: 0 };
      if (result.status & Status.EOF) eofAt = offsetBytes + result.pnum;
    } else if (result.pnum === 0) {
      // Past the end of a shorter backing layer: zeroes allocated at this layer.
      result = { status: Status.ZERO | Status.ALLOCATED, pnum: bytes, file: layer };
    }
    if (result.status & Status.ALLOCATED) {
      result.status &= ~Status.EOF;
      if (offsetBytes + result.pnum === eofAt) result.status |= Status.EOF;
      return { ...result, depth };
    }
    bytes = result.pnum;
    layer = layer.filterOrCowNode;
  }
  result.status &= ~Status.EOF;
  if (offsetBytes + result.pnum === eofAt) result.status |= Status.EOF;
  return { ...result, depth: 0 };
}

/** Whether [offset, offset + pnum) is allocated in `node` itself. */
export async function isAllocated(
  node: BlockNode,
  offsetBytes: number,
  bytes: number,
): Promise<{ allocated: boolean; pnum: number }> {
  const r = await blockStatus(node, offsetBytes, bytes, false);
  return { allocated: (r.status & Status.ALLOCATED) !== 0, pnum: r.pnum };
}
