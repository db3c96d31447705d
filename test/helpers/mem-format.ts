/*
 * `test-fmt`: the smallest format with a backing file, for tests of
 * allocation through backing chains (blockStatusAbove, allocation depth).
 *
 * Guest offset N lives at offset N of the `file` child once its cluster is
 * allocated; which clusters are allocated is kept in memory only (a reopen
 * forgets it). Unallocated clusters read from the `backing` child, zeroes
 * past the backing's end, or zeroes when there is no backing. Writes
 * allocate. The node's request alignment is the cluster size, so the gate
 * turns partial-cluster writes into read-modify-write of whole clusters —
 * which is the copy-on-write from the backing file for free.
 *
 * Options: `file` (required), `backing` (optional node or options),
 * `size` (virtual size, default: the file's length), `cluster-size`
 * (default 512, a power of two). Block status: DATA|OFFSET_VALID at the
 * same offset in `file` for allocated clusters, nothing for unallocated
 * ones, so the generic layer adds ZERO where QEMU would.
 */
import { z } from 'zod';
import { Status, alignUp } from '../../block/flags.js';
import { preadv, pwritev } from '../../block/io.js';
import { ChildRole, type BdrvChild, type BlockNode } from '../../block/node.js';
import { zBlockdevRef, zInt, zSize } from '../../block/options.js';
import type { BlockDriver } from '../../block/driver.js';

interface FmtState {
  file: BdrvChild;
  backing: BdrvChild | null;
  sizeBytes: number;
  clusterBytes: number;
  /** 1 per allocated cluster. */
  allocated: Uint8Array;
}

const state = (node: BlockNode) => node.opaque as FmtState;

const optionsSchema = z.object({
  file: zBlockdevRef,
  backing: zBlockdevRef.nullable().optional(),
  size: zSize('size').optional(),
  'cluster-size': zInt('cluster-size', { min: 512, max: 1 << 20 }).optional(),
});

/** Length of the run of clusters with the same allocation as the one at `offset`, capped at `bytes`. */
function allocationRun(s: FmtState, offset: number, bytes: number): { allocated: boolean; pnum: number } {
  const first = Math.floor(offset / s.clusterBytes);
  const allocated = s.allocated[first] === 1;
  let end = (first + 1) * s.clusterBytes;
  while (end < offset + bytes && (s.allocated[end / s.clusterBytes] === 1) === allocated) end += s.clusterBytes;
  return { allocated, pnum: Math.min(end, offset + bytes) - offset };
}

export const memFormatDriver: BlockDriver = {
  name: 'test-fmt',
  isFormat: true,
  supportsBacking: true,
  optionsSchema,

  async open(node, options, ctx) {
    const o = options as z.output<typeof optionsSchema>;
    const file = (await ctx.openChild('file', ChildRole.DATA | ChildRole.METADATA | ChildRole.PRIMARY))!;
    const backing = await ctx.openChild('backing', ChildRole.COW, { optional: true });
    const clusterBytes = o['cluster-size'] ?? 512;
    const sizeBytes = o.size ?? file.node.totalBytes;
    node.opaque = {
      file,
      backing,
      sizeBytes,
      clusterBytes,
      allocated: new Uint8Array(alignUp(sizeBytes, clusterBytes) / clusterBytes),
    } satisfies FmtState;
    node.limits.requestAlignment = clusterBytes;
  },

  getLength: async (node) => state(node).sizeBytes,

  async coPreadv(node, offset, buf) {
    const s = state(node);
    for (let done = 0; done < buf.length; ) {
      const { allocated, pnum } = allocationRun(s, offset + done, buf.length - done);
      const part = buf.subarray(done, done + pnum);
      if (allocated) await preadv(s.file, offset + done, part);
      else await readUnallocated(s, offset + done, part);
      done += pnum;
    }
  },

  async coPwritev(node, offset, buf, flags) {
    const s = state(node);
    await pwritev(s.file, offset, buf, flags);
    s.allocated.fill(1, offset / s.clusterBytes, (offset + buf.length) / s.clusterBytes);
  },

  async coBlockStatus(node, _wantZero, offset, bytes) {
    const s = state(node);
    const { allocated, pnum } = allocationRun(s, offset, bytes);
    if (!allocated) return { status: 0, pnum };
    return { status: Status.DATA | Status.OFFSET_VALID, pnum, map: offset, file: s.file.node };
  },
};

/** An unallocated range: the backing file's bytes, zeroes past its end or without one. */
async function readUnallocated(s: FmtState, offset: number, buf: Uint8Array): Promise<void> {
  const backingBytes = s.backing ? s.backing.node.totalBytes : 0;
  const fromBacking = Math.max(0, Math.min(buf.length, backingBytes - offset));
  if (fromBacking > 0) await preadv(s.backing!, offset, buf.subarray(0, fromBacking));
  buf.fill(0, fromBacking);
}
