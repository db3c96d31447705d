/*
 * Resize (QEMU's qcow2_co_truncate), growing and shrinking, with QEMU's
 * checks and error texts in its order: a size that is not a multiple of 512
 * bytes; a v2 image with internal snapshots (their sizes were optional in
 * v2); preallocation while shrinking.
 *
 * Growing: the L1 table grows to exactly the entries the new size needs
 * (moved as a whole, see l2.ts), the new space is preallocated as asked
 * (prealloc.ts). When the gate asks for zeroes (Req.ZERO_WRITE: a backing
 * file longer than the old size would otherwise show through), the new
 * whole clusters become zero clusters (v3 only, "Operation not supported"
 * on v2, as QEMU) and the rest of the old last cluster gets a zero write;
 * falloc/full preallocation already reads as zeroes. The lock is released
 * around that write, which goes through the normal write path. Metadata
 * caches are written when anything was preallocated, and the size field is
 * written last (synced), so a crash leaves the old size with, at worst,
 * leaked clusters.
 *
 * Shrinking: shrink.ts, then the size field.
 *
 * The first guest-visible change clears the bitmaps autoclear bit (see
 * header-io.ts); persistent bitmaps are not resized here.
 */
import { BlockError } from '../../block/errors.js';
import { Req, type Prealloc } from '../../block/flags.js';
import type { BlockNode } from '../../block/node.js';
import { Qcow2Version } from './format.js';
import { checkUsable, needAccurateRefcounts, writeVirtualSize } from './header-io.js';
import { truncateBitmapsCheck } from './bitmap-load.js';
import { coPwritev, readGuest } from './io.js';
import { growL1 } from './l2.js';
import { preallocateData, preallocateMetadata } from './prealloc.js';
import { cutFileTail, discardCropped, dropL2Tables, shrinkReftable } from './shrink.js';
import { errnoError } from './failure-words.js';
import { stateOf, type Qcow2State } from './state.js';
import { zeroClusters } from './zero.js';

const SECTOR_BYTES = 512;

export async function coTruncate(node: BlockNode, offsetBytes: number, _exact: boolean, prealloc: Prealloc, flags = 0): Promise<void> {
  const s = stateOf(node);
  checkUsable(s);
  if (offsetBytes % SECTOR_BYTES !== 0) throw new BlockError('EINVAL', `The new size must be a multiple of ${SECTOR_BYTES}`);
  const oldBytes = s.image.header.virtualBytes;
  if (offsetBytes < oldBytes) await shrink(s, oldBytes, offsetBytes, prealloc);
  else await grow(s, node, oldBytes, offsetBytes, prealloc, (flags & Req.ZERO_WRITE) !== 0);
}

/** The checks every resize starts with (lock held). */
function checkResizable(s: Qcow2State): void {
  if (s.image.header.snapshotCount > 0 && s.image.header.version < Qcow2Version.V3) {
    throw new BlockError('ENOTSUP', "Can't resize a v2 image which has snapshots");
  }
}

async function grow(s: Qcow2State, node: BlockNode, oldBytes: number, newBytes: number, prealloc: Prealloc, zeroWrite: boolean) {
  await s.lock.run(async () => {
    checkResizable(s);
    await truncateBitmapsCheck(s);
    try {
      await growL1(s, s.geometry.l1EntriesFor(newBytes), true);
    } catch (e) {
      throw errnoError(e, 'Failed to grow the L1 table');
    }
    if (prealloc === 'metadata') await preallocateMetadata(s, oldBytes, newBytes, prealloc);
    if (prealloc === 'falloc' || prealloc === 'full') {
      await preallocateData(s, oldBytes, newBytes, prealloc, (offset, buf) => readGuest(s, offset, buf, true));
      zeroWrite = false;
    }
  });
  if (zeroWrite && newBytes > oldBytes) await zeroNewArea(s, node, oldBytes, newBytes);
  await s.lock.run(async () => {
    if (prealloc !== 'off') {
      try {
        await s.l2Cache.writeDirty();
        if (needAccurateRefcounts(s)) await s.refcountCache.writeDirty();
      } catch (e) {
        throw errnoError(e, 'Failed to flush the preallocated area to disk');
      }
    }
    await writeSize(s, newBytes);
  });
}

/** Makes guest bytes [oldBytes, newBytes) read as zeroes (the ZERO_WRITE part of qcow2_co_truncate). */
async function zeroNewArea(s: Qcow2State, node: BlockNode, oldBytes: number, newBytes: number): Promise<void> {
  const zeroStart = Math.ceil(oldBytes / s.clusterBytes) * s.clusterBytes;
  if (newBytes > zeroStart) {
    try {
      if (s.image.header.version < Qcow2Version.V3) throw new BlockError('ENOTSUP');
      await zeroClusters(s, zeroStart, newBytes - zeroStart, false);
    } catch (e) {
      throw errnoError(e, 'Failed to zero out new clusters');
    }
  }
  if (zeroStart > oldBytes) {
    try {
      await coPwritev(node, oldBytes, new Uint8Array(Math.min(zeroStart, newBytes) - oldBytes));
    } catch (e) {
      throw errnoError(e, 'Failed to zero out the new area');
    }
  }
}

async function shrink(s: Qcow2State, oldBytes: number, newBytes: number, prealloc: Prealloc) {
  await s.lock.run(async () => {
    checkResizable(s);
    await truncateBitmapsCheck(s);
    if (prealloc !== 'off') throw new BlockError('EINVAL', "Preallocation can't be used for shrinking an image");
  });
  await discardCropped(s, newBytes, oldBytes);
  await s.lock.run(async () => {
    await dropL2Tables(s, s.geometry.l1EntriesFor(newBytes));
    await shrinkReftable(s);
    await cutFileTail(s);
    await writeSize(s, newBytes);
  });
}

async function writeSize(s: Qcow2State, virtualBytes: number): Promise<void> {
  try {
    await writeVirtualSize(s, virtualBytes);
  } catch (e) {
    throw errnoError(e, 'Failed to update the image size');
  }
}
