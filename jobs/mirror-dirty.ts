/*
 * A mirror's initial dirty bitmap (QEMU's mirror_dirty_init), by mode:
 *   none         nothing: only writes made from now on are copied;
 *   top          what the source itself allocates (the target keeps the
 *                source's backing, which holds the rest);
 *   full         what the whole chain allocates (zero clusters included),
 *                as QEMU's sync=full: after the target was zeroed
 *                (zero_target, see jobs/mirror.ts), or when the caller
 *                says the target reads as zeroes already (zero_target
 *                false: drive-mirror's fresh image);
 *   all          the whole length (zero_target on a target that cannot
 *                write zeroes with unmap: everything is copied);
 *   full-sparse  the library's default for sync=full when the caller did
 *                not say (zeroTarget undefined): data is dirty; areas
 *                that read as zeroes are dirty only where the target does
 *                not already read zeroes there, so the target ends equal
 *                to the source whatever it held, and stays sparse;
 *   above-target active commit: what the layers above the target (the
 *                base) allocate.
 * Walks are by block status, so a sparse multi-TiB source costs its
 * extents, not its size. The walk yields to pause points every
 * YIELD_EVERY_EXTENTS extents and stops when the job is cancelled.
 */
import { Status } from '../block/flags.js';
import { blockStatusAbove } from '../block/status.js';
import { backingChainNext } from '../block/chain.js';
import type { BlockNode } from '../block/node.js';
import type { DirtyBitmap } from '../block/dirty-bitmap.js';
import type { Job } from './job.js';

export type DirtyInitMode = 'none' | 'top' | 'full' | 'all' | 'full-sparse' | 'above-target';

/** Extents walked between two pause points. */
const YIELD_EVERY_EXTENTS = 64;

export interface DirtyInitSubject {
  readonly job: Job;
  readonly source: BlockNode;
  readonly target: BlockNode;
  readonly bitmap: DirtyBitmap;
}

export async function dirtyInit(m: DirtyInitSubject, mode: DirtyInitMode): Promise<void> {
  if (mode === 'none') return;
  if (mode === 'all') {
    m.bitmap.setDirty(0, m.source.totalBytes);
    return;
  }
  const base = mode === 'top' ? backingChainNext(m.source) : mode === 'above-target' ? m.target : null;
  let extents = 0;
  for (let at = 0; at < m.source.totalBytes; ) {
    const st = await blockStatusAbove(m.source, base, at, m.source.totalBytes - at);
    const n = Math.max(1, st.pnum);
    if (mode !== 'full-sparse') {
      if (st.depth > 0) m.bitmap.setDirty(at, n);
    } else {
      const readsZero = (st.status & Status.ZERO) !== 0 || (st.depth === 0 && !(st.status & Status.DATA));
      if (!readsZero) m.bitmap.setDirty(at, n);
      else await dirtyWhereTargetNotZero(m, at, n);
    }
    at += n;
    if (++extents % YIELD_EVERY_EXTENTS === 0) {
      await m.job.pausePoint();
      if (m.job.isCancelled()) return;
    }
  }
}

/** Marks the parts of [offset, offset + bytes) that the target does not read as zeroes. */
async function dirtyWhereTargetNotZero(m: DirtyInitSubject, offsetBytes: number, bytes: number): Promise<void> {
  const end = offsetBytes + bytes;
  for (let at = offsetBytes; at < end; ) {
    const st = await blockStatusAbove(m.target, null, at, end - at);
    if (st.pnum === 0) {
      m.bitmap.setDirty(at, end - at);
      return;
    }
    const n = Math.min(st.pnum, end - at);
    if (!(st.status & Status.ZERO)) m.bitmap.setDirty(at, n);
    at += n;
  }
}
