/*
 * Switching an open qcow2 node between read-only and read-write in place
 * (QEMU's qcow2_reopen_prepare and qcow2_reopen_commit_post for the
 * read-only flag). block/reopen.ts calls it with the node drained. The
 * state stays as it is — header, L1, refcount table, both caches, the
 * allocator's hints — nothing is read from disk again.
 *
 * Going read-only (the file still takes writes), under the image lock:
 *   1. the persistent bitmaps are stored and stay loaded, read-only
 *      (qcow2_reopen_bitmaps_ro; a failure refuses the reopen);
 *   2. the caches are written back (bdrv_flush's qcow2_write_caches);
 *   3. the dirty bit of lazy refcounts is cleared, both caches written
 *      first (qcow2_mark_clean), and the file is flushed;
 * then every writer sees `s.writable` false. An image made unusable by a
 * corruption writes nothing.
 *
 * Going read-write (the file is writable already): an image a read-write
 * open would refuse stays read-only — the corrupt bit ("qcow2: Image is
 * corrupt; cannot be opened read/write", EACCES, as the open). A dirty
 * image (lazy refcounts, not closed cleanly) is reopened as it is, as
 * QEMU's qcow2_reopen_prepare does: only a read-write open repairs its
 * refcounts, so writes after the reopen trust refcounts that may be stale
 * (QEMU's behaviour, kept: going read-only again clears the dirty bit, and
 * `qemu-img check -r` is the way to repair). Then, as a read-write open does, unknown autoclear bits
 * are cleared and a stale bitmaps extension dropped, and the loaded
 * persistent bitmaps are marked in use on disk and become writable
 * (qcow2_reopen_bitmaps_rw). QEMU only reports a failure of that last step
 * and leaves the bitmaps read-only, so that every write then fails; here
 * the reopen fails instead (the file is switched back by the caller).
 */
import { BlockError, strerror } from '../../block/errors.js';
import { findDirtyBitmap, type DirtyBitmap } from '../../block/dirty-bitmap.js';
import type { BlockNode } from '../../block/node.js';
import { BmeFlag, readDirectory, rewriteDirectoryInPlace } from './bitmap-dir.js';
import { storeQcow2Bitmaps } from './bitmap-store.js';
import { AUTOCLEAR_KNOWN_MASK } from './format.js';
import { checkUsable, flushFile, markClean, needAccurateRefcounts, updateHeader } from './header-io.js';
import { stateOf, type Qcow2State } from './state.js';
import { invalidForWriting, reasonToError } from './validate.js';

/** BlockDriver.reopen for qcow2 (see the note at the top). */
export async function reopenQcow2(node: BlockNode, readOnly: boolean): Promise<void> {
  const s = stateOf(node);
  if (readOnly === !s.writable) return;
  if (readOnly) await becomeReadOnly(s);
  else await becomeWritable(s);
}

async function becomeReadOnly(s: Qcow2State): Promise<void> {
  if (s.usable) {
    await s.lock.run(async () => {
      await storeQcow2Bitmaps(s, false);
      await s.l2Cache.writeDirty();
      if (needAccurateRefcounts(s)) await s.refcountCache.writeDirty();
      await markClean(s);
      await flushFile(s);
    });
  }
  for (const bm of s.node.dirtyBitmaps) if (bm.persistent) bm.readOnly = true;
  s.writable = false;
}

async function becomeWritable(s: Qcow2State): Promise<void> {
  checkUsable(s);
  const h = s.image.header;
  const refusal = invalidForWriting(h);
  if (refusal) throw reasonToError(refusal);
  await s.lock.run(async () => {
    s.writable = true;
    try {
      await fixHeaderForWriting(s);
      for (const bm of await bitmapsInUse(s)) bm.readOnly = false;
    } catch (e) {
      s.writable = false;
      throw e;
    }
  });
}

/** What a read-write open fixes in the header: unknown autoclear bits, a stale bitmaps extension. */
async function fixHeaderForWriting(s: Qcow2State): Promise<void> {
  const h = s.image.header;
  const ext = s.image.extensions;
  if (!(h.autoclearFeatures & ~AUTOCLEAR_KNOWN_MASK) && !ext.staleBitmaps) return;
  h.autoclearFeatures &= AUTOCLEAR_KNOWN_MASK;
  ext.staleBitmaps = false;
  await updateHeader(s);
}

/**
 * qcow2_reopen_bitmaps_rw (lock held): the directory entries of the loaded
 * bitmaps get their in-use flag (rewritten in place when one changed);
 * returns the bitmaps to make writable.
 */
async function bitmapsInUse(s: Qcow2State): Promise<DirtyBitmap[]> {
  if (s.image.extensions.bitmaps === null) return [];
  const list = await readDirectory(s);
  const loaded: DirtyBitmap[] = [];
  let changed = false;
  for (const entry of list) {
    const bm = findDirtyBitmap(s.node, entry.name);
    if (!bm) continue;
    if (!bm.readOnly) {
      throw new BlockError('EINVAL', `Bitmap ${entry.name} was loaded prior to rw-reopen, but was not marked as readonly. This is a bug, something went wrong. All of the bitmaps may be corrupted`);
    }
    if (!(entry.flags & BmeFlag.IN_USE)) {
      entry.flags |= BmeFlag.IN_USE;
      changed = true;
    }
    loaded.push(bm);
  }
  if (changed) {
    try {
      await rewriteDirectoryInPlace(s, list);
    } catch (e) {
      const code = e instanceof BlockError ? e.code : 'EIO';
      throw new BlockError(code, `${s.node.nodeName}: Failed to make dirty bitmaps writable: Can't update bitmap directory: ${strerror(code)}`, { cause: e });
    }
  }
  return loaded;
}
