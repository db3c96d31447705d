/*
 * Metadata overlap checks (QEMU's qcow2_check_metadata_overlap and
 * qcow2_pre_write_overlap_check): before any write to the image file, the
 * range is checked against the metadata the selected checks cover; a write
 * that would land on metadata is refused with EIO and the image is marked
 * corrupt ("Preventing invalid write on metadata (overlaps with …)"),
 * rather than overwriting the metadata.
 *
 * Which checks run is the `overlap-check` option: a template (none,
 * constant, cached — the default — or all), with each kind switchable by
 * its own boolean key, as QEMU's options. QEMU's "cached" kinds walk the L1
 * table and the refcount table on every check; here the host clusters of L2
 * tables and refcount blocks are kept in sets (state.ts), so a check costs
 * one lookup per cluster written, or one per table when the write is
 * larger than the set. "all" adds the L2 tables of internal snapshots,
 * read once at open.
 *
 * Kinds are tested in QEMU's order and the first hit is reported; empty
 * tables (no L1 entries, no snapshots) cover nothing, as in QEMU.
 */
import { signalCorruption } from './header-io.js';
import type { Qcow2State } from './state.js';

/** Overlap check bits (QCOW2_OL_*). */
export const OverlapCheck = {
  MAIN_HEADER: 0x1,
  ACTIVE_L1: 0x2,
  ACTIVE_L2: 0x4,
  REFCOUNT_TABLE: 0x8,
  REFCOUNT_BLOCK: 0x10,
  SNAPSHOT_TABLE: 0x20,
  INACTIVE_L1: 0x40,
  INACTIVE_L2: 0x80,
  BITMAP_DIRECTORY: 0x100,
} as const;

const OL = OverlapCheck;
const CONSTANT = OL.MAIN_HEADER | OL.ACTIVE_L1 | OL.REFCOUNT_TABLE | OL.SNAPSHOT_TABLE | OL.BITMAP_DIRECTORY;
const CACHED = CONSTANT | OL.ACTIVE_L2 | OL.REFCOUNT_BLOCK | OL.INACTIVE_L1;

/** The `overlap-check` templates. */
export const OVERLAP_TEMPLATES = { none: 0, constant: CONSTANT, cached: CACHED, all: CACHED | OL.INACTIVE_L2 } as const;
export type OverlapTemplate = keyof typeof OVERLAP_TEMPLATES;

/** The boolean keys that switch single checks (`overlap-check.<key>` in QEMU), by bit. */
export const OVERLAP_KEYS: ReadonlyArray<readonly [string, number, string]> = [
  ['main-header', OL.MAIN_HEADER, 'qcow2_header'],
  ['active-l1', OL.ACTIVE_L1, 'active L1 table'],
  ['active-l2', OL.ACTIVE_L2, 'active L2 table'],
  ['refcount-table', OL.REFCOUNT_TABLE, 'refcount table'],
  ['refcount-block', OL.REFCOUNT_BLOCK, 'refcount block'],
  ['snapshot-table', OL.SNAPSHOT_TABLE, 'snapshot table'],
  ['inactive-l1', OL.INACTIVE_L1, 'inactive L1 table'],
  ['inactive-l2', OL.INACTIVE_L2, 'inactive L2 table'],
  ['bitmap-directory', OL.BITMAP_DIRECTORY, 'bitmap directory'],
];

const rangesOverlap = (a: number, aBytes: number, b: number, bBytes: number) => a < b + bBytes && b < a + aBytes;

/** Whether a cluster of `tables` lies in the cluster-aligned range [start, end). */
function hitsTables(tables: ReadonlySet<number>, start: number, end: number, clusterBytes: number): boolean {
  if ((end - start) / clusterBytes > tables.size) {
    for (const t of tables) if (t >= start && t < end) return true;
    return false;
  }
  for (let at = start; at < end; at += clusterBytes) if (tables.has(at)) return true;
  return false;
}

/** The first kind of metadata [offset, offset + bytes) overlaps, among `checks`; 0 if none. */
export function metadataOverlap(s: Qcow2State, checks: number, offsetBytes: number, bytes: number): number {
  if (bytes <= 0 || checks === 0) return 0;
  const c = s.clusterBytes;
  const h = s.image.header;
  if (checks & OL.MAIN_HEADER && offsetBytes < c) return OL.MAIN_HEADER;
  const start = Math.floor(offsetBytes / c) * c;
  const end = Math.ceil((offsetBytes + bytes) / c) * c;
  if (checks & OL.ACTIVE_L1 && h.l1Entries > 0 && rangesOverlap(start, end - start, h.l1TableOffset, h.l1Entries * 8)) return OL.ACTIVE_L1;
  if (checks & OL.ACTIVE_L2 && hitsTables(s.l2Tables, start, end, c)) return OL.ACTIVE_L2;
  if (checks & OL.REFCOUNT_TABLE && rangesOverlap(start, end - start, h.refcountTableOffset, h.refcountTableClusters * c)) {
    return OL.REFCOUNT_TABLE;
  }
  if (checks & OL.REFCOUNT_BLOCK && hitsTables(s.refblocks, start, end, c)) return OL.REFCOUNT_BLOCK;
  const snap = s.snapshots;
  if (checks & OL.SNAPSHOT_TABLE && snap.tableBytes > 0 && rangesOverlap(start, end - start, snap.tableOffset, snap.tableBytes)) {
    return OL.SNAPSHOT_TABLE;
  }
  if (checks & OL.INACTIVE_L1 && snap.l1Tables.some((t) => t.entries > 0 && rangesOverlap(start, end - start, t.offset, t.entries * 8))) {
    return OL.INACTIVE_L1;
  }
  if (checks & OL.INACTIVE_L2 && s.inactiveL2Tables && hitsTables(s.inactiveL2Tables, start, end, c)) return OL.INACTIVE_L2;
  const bitmaps = s.image.extensions.bitmaps;
  if (checks & OL.BITMAP_DIRECTORY && bitmaps && rangesOverlap(start, end - start, bitmaps.directoryOffset, bitmaps.directoryBytes)) {
    return OL.BITMAP_DIRECTORY;
  }
  return 0;
}

/**
 * qcow2_pre_write_overlap_check: throws EIO (after signalling a fatal
 * corruption) when the write would hit metadata other than `ignore`.
 */
export async function overlapCheck(s: Qcow2State, ignore: number, offsetBytes: number, bytes: number): Promise<void> {
  const hit = metadataOverlap(s, s.opts.overlapMask & ~ignore, offsetBytes, bytes);
  if (hit === 0) return;
  const name = OVERLAP_KEYS.find(([, bit]) => bit === hit)![2];
  throw await signalCorruption(s, true, `Preventing invalid write on metadata (overlaps with ${name})`);
}

/** The synchronous part of overlapCheck, for hot paths: true when the write is clear. */
export function overlapClear(s: Qcow2State, ignore: number, offsetBytes: number, bytes: number): boolean {
  return metadataOverlap(s, s.opts.overlapMask & ~ignore, offsetBytes, bytes) === 0;
}
