/*
 * Resize (QEMU's qcow2_co_truncate, growing only). The L1 table grows to
 * exactly the entries the new size needs (moved as a whole, see l2.ts),
 * new space is preallocated as asked (prealloc.ts), metadata caches are
 * written when anything was preallocated, and the size field is written
 * last (synced), so a crash leaves the old size with, at worst, leaked
 * clusters. Shrinking is refused with the message QEMU gave before it
 * could shrink qcow2 images.
 */
import { BlockError } from '../../block/errors.js';
import type { Prealloc } from '../../block/flags.js';
import type { BlockNode } from '../../block/node.js';
import { Qcow2Version } from './format.js';
import { checkUsable, clearBitmapsBit, needAccurateRefcounts, writeVirtualSize } from './header-io.js';
import { readGuest } from './io.js';
import { growL1 } from './l2.js';
import { preallocateData, preallocateMetadata } from './prealloc.js';
import { stateOf } from './state.js';

const SECTOR_BYTES = 512;

export async function coTruncate(node: BlockNode, offsetBytes: number, _exact: boolean, prealloc: Prealloc): Promise<void> {
  const s = stateOf(node);
  checkUsable(s);
  if (offsetBytes % SECTOR_BYTES !== 0) throw new BlockError('EINVAL', `The new size must be a multiple of ${SECTOR_BYTES}`);
  await s.lock.run(async () => {
    if (s.image.header.snapshotCount > 0 && s.image.header.version < Qcow2Version.V3) {
      throw new BlockError('ENOTSUP', "Can't resize a v2 image which has snapshots");
    }
    const oldBytes = s.image.header.virtualBytes;
    if (offsetBytes < oldBytes) throw new BlockError('ENOTSUP', "qcow2 doesn't support shrinking images yet");
    await clearBitmapsBit(s);
    await growL1(s, s.geometry.l1EntriesFor(offsetBytes), true);
    if (prealloc === 'metadata') await preallocateMetadata(s, oldBytes, offsetBytes, prealloc);
    if (prealloc === 'falloc' || prealloc === 'full') {
      await preallocateData(s, oldBytes, offsetBytes, prealloc, (offset, buf) => readGuest(s, offset, buf, true));
    }
    if (prealloc !== 'off') {
      await s.l2Cache.writeDirty();
      if (needAccurateRefcounts(s)) await s.refcountCache.writeDirty();
    }
    await writeVirtualSize(s, offsetBytes);
  });
}
