/*
 * Writing the header: the whole first cluster (QEMU's qcow2_update_header)
 * and the single fields QEMU updates in place, each followed by a flush
 * where QEMU syncs (bdrv_pwrite_sync):
 *   - incompatible features when the dirty bit is set (lazy refcounts set
 *     it before the first unordered L2 update, `markDirty`);
 *   - l1_size + l1_table_offset when the L1 table moves (l2.ts);
 *   - refcount_table_offset + refcount_table_clusters when the refcount
 *     table moves (refcount-grow.ts), one 12-byte write so the switch is
 *     atomic;
 *   - size, after a resize.
 * Single fields change in memory (`s.image.header`) only once written; a
 * full rewrite writes whatever the in-memory header says (QEMU's order:
 * change the state, then qcow2_update_header).
 *
 * Corruption (QEMU's qcow2_signal_corruption): a fatal event on a writable
 * image prints "qcow2: Marking image as corrupt: …", sets the corrupt bit
 * and makes the node unusable (later requests fail with ENOMEDIUM, as with
 * QEMU's bs->drv = NULL); on a read-only image, or for a non-fatal event,
 * it prints "qcow2: Image is corrupt: …" once and the request fails alone.
 */
import { BlockError } from '../../block/errors.js';
import { flush, pwritev } from '../../block/io.js';
import { ByteWriter } from './cursor.js';
import { Incompat } from './format.js';
import { encodeHeaderCluster } from './header.js';
import type { Qcow2State } from './state.js';

/** Byte offsets of header fields updated in place. */
const FIELD = { SIZE: 24, L1: 36, REFTABLE: 48, INCOMPATIBLE: 72 } as const;

export async function flushFile(s: Qcow2State): Promise<void> {
  await flush(s.file.node);
}

/** Writes `data` at `offset` of the image file. */
export async function writeFile(s: Qcow2State, offsetBytes: number, data: Uint8Array): Promise<void> {
  await pwritev(s.file, offsetBytes, data);
}

/** Writes `data` at `offset` of the file, then flushes it (bdrv_pwrite_sync). */
export async function pwriteSync(s: Qcow2State, offsetBytes: number, data: Uint8Array): Promise<void> {
  await writeFile(s, offsetBytes, data);
  await flushFile(s);
}

/** Rewrites the first cluster from `s.image` (qcow2_update_header). */
export async function updateHeader(s: Qcow2State): Promise<void> {
  const cluster = encodeHeaderCluster(s.image);
  if (typeof cluster === 'string') throw new BlockError('ENOSPC', cluster);
  await writeFile(s, 0, cluster);
}

/** Writes header fields at `at` (synced): `bytes` bytes filled by `fill`. */
async function writeFields(s: Qcow2State, at: number, bytes: number, fill: (w: ByteWriter) => void): Promise<void> {
  const buf = new Uint8Array(bytes);
  fill(new ByteWriter(buf));
  await pwriteSync(s, at, buf);
}

/** Sets the dirty bit on disk, synced, before refcounts may fall behind (v3 only). */
export async function markDirty(s: Qcow2State): Promise<void> {
  const header = s.image.header;
  if (header.incompatibleFeatures & Incompat.DIRTY) return;
  const value = header.incompatibleFeatures | Incompat.DIRTY;
  await writeFields(s, FIELD.INCOMPATIBLE, 8, (w) => w.u64(value));
  header.incompatibleFeatures = value;
}

/** Writes back both caches, then clears the dirty bit (qcow2_mark_clean). */
export async function markClean(s: Qcow2State): Promise<void> {
  const header = s.image.header;
  if (!(header.incompatibleFeatures & Incompat.DIRTY)) return;
  await s.l2Cache.flush();
  await s.refcountCache.flush();
  header.incompatibleFeatures &= ~Incompat.DIRTY;
  await updateHeader(s);
}

/** Refcounts must be exact on disk (no dirty bit): qcow2_need_accurate_refcounts. */
export function needAccurateRefcounts(s: Qcow2State): boolean {
  return !(s.image.header.incompatibleFeatures & Incompat.DIRTY);
}

export async function writeL1Location(s: Qcow2State, l1Offset: number, l1Entries: number): Promise<void> {
  await writeFields(s, FIELD.L1, 12, (w) => w.u32(l1Entries).u64(l1Offset));
  Object.assign(s.image.header, { l1Entries, l1TableOffset: l1Offset });
}

export async function writeReftableLocation(s: Qcow2State, tableOffset: number, tableClusters: number): Promise<void> {
  await writeFields(s, FIELD.REFTABLE, 12, (w) => w.u64(tableOffset).u32(tableClusters));
  Object.assign(s.image.header, { refcountTableOffset: tableOffset, refcountTableClusters: tableClusters });
}

export async function writeVirtualSize(s: Qcow2State, virtualBytes: number): Promise<void> {
  await writeFields(s, FIELD.SIZE, 8, (w) => w.u64(virtualBytes));
  s.image.header.virtualBytes = virtualBytes;
}

/**
 * Reports a corruption (qcow2_signal_corruption) and returns the error the
 * failing request ends with: EIO.
 */
export async function signalCorruption(s: Qcow2State, fatal: boolean, message: string): Promise<BlockError> {
  const isFatal = fatal && s.writable && s.usable;
  const header = s.image.header;
  const suppressed = s.corruptionSignalled && (!isFatal || (header.incompatibleFeatures & Incompat.CORRUPT) !== 0n);
  if (!suppressed) {
    s.warn(
      isFatal
        ? `qcow2: Marking image as corrupt: ${message}; further corruption events will be suppressed\n`
        : `qcow2: Image is corrupt: ${message}; further non-fatal corruption events will be suppressed\n`,
      true,
    );
    s.corruptionSignalled = true;
    if (isFatal) {
      header.incompatibleFeatures |= Incompat.CORRUPT;
      s.usable = false;
      await updateHeader(s).catch(() => undefined);
    }
  }
  return new BlockError('EIO', message);
}

/** Refuses requests once the node was made unusable. */
export function checkUsable(s: Qcow2State): void {
  if (!s.usable) throw new BlockError('ENOMEDIUM');
}
