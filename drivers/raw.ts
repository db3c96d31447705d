/*
 * The `raw` format: the image is its file, optionally a window of it
 * (`offset`, `size`), as QEMU's raw-format.
 *
 * Everything passes through to the `file` child, shifted by the window's
 * offset; block status answers RAW so the gate asks the child. FUA, MAY_UNMAP
 * and NO_FALLBACK are passed down when the child honours them.
 *
 * A probed raw image (no format given) may not have its first sector
 * rewritten into something that probes as another format: such a write
 * fails with EPERM, so a guest cannot turn its disk into, say, a qcow2 that
 * points at host files. Writes reaching the first sector are then widened
 * to whole sectors (request alignment 512) so the check sees a full sector.
 *
 * Permissions (raw_child_perm): QEMU's default rule for the file's role (a
 * filtered child, or data storage for a window), but write and resize on
 * the file only when the raw node's own users take them, so an unused raw
 * node holds nothing that could conflict.
 */
import { z } from 'zod';
import { BlockError } from '../block/errors.js';
import { Perm, Req, Status, isAligned, type Prealloc } from '../block/flags.js';
import { pdiscard, preadv, preadvToHost, pwriteZeroes, pwritev, truncate, SECTOR_BYTES } from '../block/io.js';
import { ChildRole, type BdrvChild, type BlockNode } from '../block/node.js';
import { defaultChildPerms, type ParentPerms, type PermPair } from '../block/perms.js';
import { debugEvent } from '../block/debug-event.js';
import { zBlockdevRef, zSize } from '../block/options.js';
import type { BlockDriver, CreateOptDesc } from '../block/driver.js';
import type { BlockGraph } from '../block/graph.js';
import { optUint, roundUpBig, type MeasureInfo, type MeasureRequest } from '../block/measure.js';

/** Bytes at the start of a probed raw image guarded against format changes. */
export const PROBE_GUARD_BYTES = 512;

interface RawState {
  file: BdrvChild;
  offsetBytes: number;
  /** Fixed window size, or null: the file's length minus the offset. */
  sizeBytes: number | null;
  graph: BlockGraph;
}

const state = (node: BlockNode) => node.opaque as RawState;

const optionsSchema = z.object({
  file: zBlockdevRef.optional(),
  offset: zSize('offset').optional(),
  size: zSize('size').optional(),
});

export const RAW_CREATE_OPTS: readonly CreateOptDesc[] = [{ name: 'size', type: 'size', help: 'Virtual disk size' }];

async function open(node: BlockNode, options: Record<string, unknown>, ctx: Parameters<BlockDriver['open']>[2]) {
  const opts = options as z.output<typeof optionsSchema>;
  const windowed = opts.offset !== undefined || opts.size !== undefined;
  const role = (windowed ? ChildRole.DATA : ChildRole.FILTERED) | ChildRole.PRIMARY;
  const file = (await ctx.openChild('file', role))!;
  const offsetBytes = opts.offset ?? 0;
  const sizeBytes = opts.size ?? null;
  const fileBytes = file.node.totalBytes;
  if (sizeBytes !== null && !isAligned(sizeBytes, SECTOR_BYTES)) {
    throw new BlockError('EINVAL', `Specified size is not multiple of ${SECTOR_BYTES}`);
  }
  if (offsetBytes > fileBytes) {
    throw new BlockError('EINVAL', `Offset (${offsetBytes}) cannot be greater than size of the containing file (${fileBytes})`);
  }
  if (sizeBytes !== null && offsetBytes + sizeBytes > fileBytes) {
    throw new BlockError(
      'EINVAL',
      `The sum of offset (${offsetBytes}) and size (${sizeBytes}) has to be smaller or equal to the actual size of the containing file (${fileBytes})`,
    );
  }
  node.opaque = { file, offsetBytes, sizeBytes, graph: ctx.graph } satisfies RawState;
  node.supportedWriteFlags = Req.FUA & file.node.supportedWriteFlags;
  node.supportedZeroFlags = (Req.FUA | Req.MAY_UNMAP | Req.NO_FALLBACK) & file.node.supportedZeroFlags;
  if (node.probed) node.limits.requestAlignment = PROBE_GUARD_BYTES;
  if (node.probed && !node.readOnly) ctx.graph.onWarning(probeWarning(file.node.filename), { verbatim: true });
}

/** QEMU's warning for a writable image whose format was guessed as raw. */
export function probeWarning(filename: string): string {
  return (
    `WARNING: Image format was not specified for '${filename}' and probing guessed raw.\n` +
    '         Automatically detecting the format is dangerous for raw images, write operations on block 0 will be restricted.\n' +
    "         Specify the 'raw' format explicitly to remove the restrictions.\n"
  );
}

/** What raw_child_perm keeps of the default rule only when the users take it. */
const USERS_ONLY_PERMS = Perm.WRITE | Perm.RESIZE;

/** raw_child_perm (see the note at the top). */
function childPerms(node: BlockNode, role: number, users: ParentPerms): PermPair {
  const { perm, shared } = defaultChildPerms(node, role, users);
  return { perm: (perm & ~USERS_ONLY_PERMS) | (users.perm & USERS_ONLY_PERMS), shared };
}

async function getLength(node: BlockNode): Promise<number> {
  const s = state(node);
  return s.sizeBytes ?? Math.max(0, s.file.node.totalBytes - s.offsetBytes);
}

/** EPERM when a probed image's first sector would stop probing as raw. */
function guardProbedWrite(node: BlockNode, offsetBytes: number, buf: Uint8Array): void {
  if (!node.probed || offsetBytes >= PROBE_GUARD_BYTES) return;
  const s = state(node);
  if (s.graph.bestProbe(buf.subarray(0, PROBE_GUARD_BYTES), node.filename) !== 'raw') {
    throw new BlockError('EPERM');
  }
}

/** raw_measure: the file is the image: the source's length, else `size` in whole sectors, allocated or not. */
async function measure({ opts, source }: MeasureRequest): Promise<MeasureInfo> {
  const bytes = source ? BigInt(source.totalBytes) : roundUpBig(optUint(opts, 'size', 0n), BigInt(SECTOR_BYTES));
  return { required: bytes, fullyAllocated: bytes };
}

export const rawDriver: BlockDriver = {
  name: 'raw',
  isFormat: true,
  optionsSchema,
  createOpts: RAW_CREATE_OPTS,
  strongOptions: ['offset', 'size'],
  open,
  childPerms,
  getLength,
  coPreadv: (node, offsetBytes, buf, flags) => {
    debugEvent(state(node).file, 'read_aio');
    return preadv(state(node).file, offsetBytes + state(node).offsetBytes, buf, flags);
  },
  coPreadToHost: async (node, offsetBytes, bytes, sink) => {
    const s = state(node);
    // The event only for a range really handed out: blkdebug counts them.
    const handled = await preadvToHost(s.file, offsetBytes + s.offsetBytes, bytes, sink);
    if (handled) debugEvent(s.file, 'read_aio');
    return handled;
  },
  coPwritev: async (node, offsetBytes, buf, flags) => {
    guardProbedWrite(node, offsetBytes, buf);
    debugEvent(state(node).file, 'write_aio');
    await pwritev(state(node).file, offsetBytes + state(node).offsetBytes, buf, flags);
  },
  coPwriteZeroes: (node, offsetBytes, bytes, flags) =>
    pwriteZeroes(state(node).file, offsetBytes + state(node).offsetBytes, bytes, flags),
  coPdiscard: (node, offsetBytes, bytes) => pdiscard(state(node).file, offsetBytes + state(node).offsetBytes, bytes),
  coBlockStatus: async (node, _wantZero, offsetBytes, bytes) => ({
    status: Status.RAW | Status.OFFSET_VALID,
    pnum: bytes,
    map: offsetBytes + state(node).offsetBytes,
    file: state(node).file.node,
  }),
  coTruncate: async (node, offsetBytes: number, exact: boolean, prealloc: Prealloc, flags: number) => {
    const s = state(node);
    if (s.sizeBytes !== null) throw new BlockError('ENOTSUP', 'Cannot resize fixed-size raw disks');
    await truncate(s.file, offsetBytes + s.offsetBytes, exact, prealloc, flags);
  },
  coCreate: (ctx, request) => ctx.graph.createFile(request.filename, request.opts),
  probe: () => 1,
  getInfo: (node) => state(node).file.node.driver.getInfo(state(node).file.node),
  hasZeroInit: (node) => state(node).file.node.driver.hasZeroInit(state(node).file.node),
  measure,
};
