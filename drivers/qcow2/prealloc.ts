/*
 * Preallocation (QEMU's preallocate_co and the falloc/full branch of
 * qcow2_co_truncate) and the detection of metadata-preallocated images for
 * block status (qcow2_detect_metadata_preallocation).
 *
 * metadata: every new guest cluster gets a host cluster and an L2 entry,
 * allocated exactly as writes would allocate them (L2 table first, then the
 * data clusters), but no data is written; the file is then extended to the
 * last host cluster. Such clusters read whatever the (sparse) file holds:
 * zeroes.
 * falloc/full: refcount structures are first made to cover the old used
 * area plus all new data clusters and L2 tables (refcountArea, which moves
 * the refcount table to the end as QEMU does), the data clusters are
 * allocated right after them, the file is extended with the same
 * preallocation mode, then the L2 entries are written. The resulting layout
 * is qemu-img's, byte for byte.
 *
 * Detection: an image whose clusters with a refcount outnumber the file's
 * really allocated clusters (by 10 %, or 2) was preallocated; its block
 * status then carries RECURSE, so the gate asks the file whether DATA is a
 * hole, as QEMU does.
 */
import { BlockError } from '../../block/errors.js';
import type { Prealloc } from '../../block/flags.js';
import { truncate } from '../../block/io.js';
import { allocatedFileSize } from '../../block/info.js';
import { finishAllocation, finishInplace, linkAllocation, planWrite } from './alloc.js';
import { readCow } from './cow.js';
import { signalCorruption, writeFile } from './header-io.js';
import { allocClustersAt, freeClusters, getRefcount, refcountIfCached } from './refcount.js';
import { refcountArea } from './refcount-grow.js';
import { withPrefix } from './failure-words.js';
import { DiscardType, type Allocation, type Qcow2State } from './state.js';

/** Whether the image looks metadata-preallocated (lock held); remembered in the state. */
export async function detectMetadataPreallocation(s: Qcow2State): Promise<void> {
  if (s.metadataPreallocation !== null) return;
  const real = await allocatedFileSize(s.file.node).catch(() => undefined);
  if (real === undefined) {
    s.metadataPreallocation = false;
    return;
  }
  const realClusters = Math.floor(real / s.clusterBytes);
  const threshold = Math.max(Math.floor((realClusters * 10) / 9), realClusters + 2);
  const end = Math.ceil(s.file.node.totalBytes / s.clusterBytes);
  let used = 0;
  for (let i = 0; i < end && used < threshold; i++) {
    if ((refcountIfCached(s, i) ?? (await getRefcount(s, i))) !== 0) used++;
  }
  s.metadataPreallocation = used >= threshold;
}

/** preallocate_co: metadata for guest bytes [offset, end) (lock held; no request in flight). */
export async function preallocateMetadata(s: Qcow2State, offsetBytes: number, endBytes: number, mode: Prealloc): Promise<void> {
  let hostEnd = 0;
  while (offsetBytes < endBytes) {
    const step = await planWrite(s, offsetBytes, endBytes - offsetBytes);
    if (step.kind === 'wait') throw new BlockError('EIO', 'qcow2: preallocation raced with a write');
    if (step.kind === 'inplace') {
      finishInplace(s, step.record);
    } else {
      try {
        await linkAllocation(s, step.alloc, await writeCowParts(s, step.alloc));
      } finally {
        finishAllocation(s, step.alloc);
      }
    }
    hostEnd = step.hostOffset + step.bytes;
    offsetBytes += step.bytes;
  }
  if (hostEnd > s.file.node.totalBytes) await truncate(s.file, hostEnd, false, mode === 'metadata' ? 'off' : mode);
}

/** Writes the copy-on-write parts of an allocation that gets no data (QEMU's perform_cow); true if any. */
async function writeCowParts(s: Qcow2State, alloc: Allocation): Promise<boolean> {
  const head = await readCow(s, alloc.cowStart, alloc.guestOffset, alloc.cowStartBytes);
  const tail = await readCow(s, alloc.cowEnd, alloc.guestOffset + alloc.cowEndOffset, alloc.cowEndBytes);
  if (alloc.cowStartBytes) await writeFile(s, alloc.hostOffset, head ?? new Uint8Array(alloc.cowStartBytes));
  if (alloc.cowEndBytes) await writeFile(s, alloc.hostOffset + alloc.cowEndOffset, tail ?? new Uint8Array(alloc.cowEndBytes));
  return alloc.cowStartBytes + alloc.cowEndBytes > 0;
}

/** qcow2_get_last_cluster: the last cluster with a refcount in the first `fileBytes`. */
async function lastUsedCluster(s: Qcow2State, fileBytes: number): Promise<number> {
  for (let i = Math.ceil(fileBytes / s.clusterBytes) - 1; i >= 0; i--) {
    if ((await getRefcount(s, i)) > 0) return i;
  }
  throw await signalCorruption(s, true, 'There are no references in the refcount table.');
}

/** falloc/full preallocation of guest bytes [oldBytes, newBytes) (lock held). */
export async function preallocateData(s: Qcow2State, oldBytes: number, newBytes: number, mode: Prealloc, readOld: (offset: number, buf: Uint8Array) => Promise<void>) {
  const c = s.clusterBytes;
  const oldFileBytes = (await lastUsedCluster(s, s.file.node.totalBytes) + 1) * c;
  const firstGuest = oldBytes - (oldBytes % c);
  const dataClusters = (Math.ceil(newBytes / c) * c - firstGuest) / c;
  const l2Tables = Math.ceil(dataClusters / s.geometry.l2Entries) + 1;
  const start = await refcountArea(s, oldFileBytes, dataClusters + l2Tables, true, 0, 0);
  const allocated = await allocClustersAt(s, start, dataClusters);
  if (allocated !== dataClusters) {
    await freeClusters(s, start, allocated * c, DiscardType.OTHER);
    throw new BlockError('EIO', 'Failed to allocate data clusters');
  }
  const head = new Uint8Array(oldBytes % c);
  if (head.length > 0) await readOld(firstGuest, head);
  try {
    await withPrefix('Failed to resize underlying file', () => truncate(s.file, start + dataClusters * c, false, mode));
  } catch (e) {
    // As QEMU: the data clusters go back (their refcounts would stay past the file's end, where
    // qemu-img check does not look, and a later preallocation would find them taken).
    await freeClusters(s, start, dataClusters * c, DiscardType.OTHER);
    throw e;
  }
  if (head.length > 0) await writeFile(s, start, head);
  let guest = firstGuest;
  let host = start;
  for (let left = dataClusters; left > 0; ) {
    const n = Math.min(left, s.geometry.l2Entries - s.geometry.l2Index(guest));
    const alloc: Allocation = {
      guestOffset: guest, clusters: n, hostOffset: host, keepOld: false,
      cowStartBytes: 0, cowEndOffset: n * c, cowEndBytes: 0, cowStart: { kind: 'zero' }, cowEnd: { kind: 'zero' }, waiters: null,
    };
    await linkAllocation(s, alloc, false);
    guest += n * c;
    host += n * c;
    left -= n;
  }
}
