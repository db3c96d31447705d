/*
 * Changing the backing file a qcow2 image names (QEMU's
 * qcow2_change_backing_file): the name after the header extensions in
 * cluster 0 and the backing-format extension, rewritten with the rest of
 * cluster 0 (qcow2_update_header), or both removed.
 *
 * Order, so that a crash never shows the guest other content than before
 * the change or after it (qemu-img rebase copies whatever differs between
 * the old and the new backing file into the image first):
 *   1. the metadata caches are written back and the file flushed, so every
 *      write made before the change is on disk;
 *   2. cluster 0 is written in one write and the file flushed.
 * Step 1 is stricter than QEMU, whose header write does not wait for the
 * caches. Step 2 is QEMU's: the name, the extension area and the fields
 * locating them share one write of cluster 0, which a crash could tear.
 *
 * Refusals, with QEMU's errno: a name longer than 1023 bytes (EINVAL); a
 * header, extensions and name that no longer fit in cluster 0 (ENOSPC,
 * "No space left in the file header" in qemu-img's words); a format name of
 * 16 bytes or more, which QEMU would refuse to read back (EINVAL). A refusal
 * changes nothing, in memory or on disk.
 *
 * Only the stored name changes: the backing child opened with the image
 * stays attached (as with QEMU's bdrv_change_backing_file); info and a
 * later open see the new name.
 */
import { BlockError } from '../../block/errors.js';
import type { BlockNode } from '../../block/node.js';
import { Limits } from './format.js';
import { checkUsable, flushFile, needAccurateRefcounts, updateHeader } from './header-io.js';
import { encodeHeaderCluster } from './header.js';
import { stateOf } from './state.js';

export async function changeBackingFile(node: BlockNode, backingFile: string | null, backingFormat: string | null): Promise<void> {
  const s = stateOf(node);
  checkUsable(s);
  if (!s.writable) throw new BlockError('EPERM', 'qcow2: the image is read-only');
  if (backingFile !== null && Buffer.byteLength(backingFile) > Limits.MAX_BACKING_NAME_BYTES) {
    throw new BlockError('EINVAL', `Backing file name longer than ${Limits.MAX_BACKING_NAME_BYTES} bytes`);
  }
  await s.lock.run(async () => {
    const image = s.image;
    const before = { name: image.backingName, format: image.extensions.backingFormat };
    image.backingName = backingFile;
    image.extensions.backingFormat = backingFile === null ? null : backingFormat;
    const refusal = encodeHeaderCluster(image);
    if (typeof refusal === 'string') {
      image.backingName = before.name;
      image.extensions.backingFormat = before.format;
      throw new BlockError(refusal.includes('does not fit') ? 'ENOSPC' : 'EINVAL', refusal);
    }
    await s.l2Cache.writeDirty();
    if (needAccurateRefcounts(s)) await s.refcountCache.writeDirty();
    await flushFile(s);
    await updateHeader(s);
    await flushFile(s);
  });
}
