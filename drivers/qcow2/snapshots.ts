/*
 * The snapshot table in memory (QEMU's s->snapshots, s->snapshots_offset,
 * s->snapshots_size): read at open, replaced as a whole each time a
 * snapshot operation rewrites the table (snapshot-ops.ts).
 *
 * Besides the entries it keeps where the table and each snapshot's L1
 * table lie, so that overlap checks protect them (overlap.ts) and the
 * "all" checks know the snapshots' L2 tables. The clusters snapshots share
 * with the active image have refcounts above 1 and lack COPIED, so writes
 * copy them first (alloc.ts, l2.ts), which keeps every snapshot intact.
 *
 * Rewriting the table (qcow2_write_snapshots; lock held) never changes it
 * in place: the new table goes to newly allocated clusters (refcounts
 * raised, then everything flushed), is written and flushed, then the
 * header's nb_snapshots and snapshots_offset switch in one synced 12-byte
 * write, and only then is the old table freed. A crash leaves the old
 * table or the new one, at worst with leaked clusters. On failure the new
 * clusters are freed and the table in memory stays the old one.
 *
 * Entry layout and the read/write codecs: snapshot-table.ts.
 */
import { BlockError } from '../../block/errors.js';
import { ByteWriter } from './cursor.js';
import { pwriteSync, writeFile } from './header-io.js';
import { entryOffset } from './l2.js';
import { overlapCheck } from './overlap.js';
import { allocClusters, freeClusters } from './refcount.js';
import { encodeSnapshotTable, readSnapshotTable, snapshotL1Offset, type FileReader, type Qcow2Snapshot } from './snapshot-table.js';
import { flushLocked } from './snapshot-refcount.js';
import { DiscardType, type Qcow2State } from './state.js';

/** Header offset of nb_snapshots, followed by snapshots_offset (12 bytes in all). */
const NB_SNAPSHOTS_FIELD = 60;
const TABLE_POINTER_BYTES = 12;

export type { FileReader } from './snapshot-table.js';

export interface SnapshotExtents {
  tableOffset: number;
  /** 0 without snapshots. */
  tableBytes: number;
  /** Each snapshot's L1 table, in table order (offset Infinity when beyond 2^53). */
  l1Tables: Array<{ offset: number; entries: number }>;
  /** The entries, in table order. */
  list: readonly Qcow2Snapshot[];
}

export const NO_SNAPSHOTS: SnapshotExtents = { tableOffset: 0, tableBytes: 0, l1Tables: [], list: [] };

/** The in-memory table for `list` written at `tableOffset`. */
export function snapshotExtents(tableOffset: number, tableBytes: number, list: readonly Qcow2Snapshot[]): SnapshotExtents {
  return { tableOffset, tableBytes, list, l1Tables: list.map((sn) => ({ offset: snapshotL1Offset(sn), entries: sn.l1Entries })) };
}

/** The `count` snapshots at `tableOffset`, or QEMU's reason for refusing the table. */
export async function readSnapshotExtents(read: FileReader, tableOffset: number, count: number): Promise<SnapshotExtents | string> {
  const table = await readSnapshotTable(read, tableOffset, count);
  if (typeof table === 'string') return table;
  return snapshotExtents(tableOffset, table.tableBytes, table.list);
}

/** The L2 tables the snapshots' L1 tables point at (for the "all" overlap checks). */
export async function inactiveL2Tables(s: Qcow2State, read: FileReader): Promise<Set<number>> {
  const tables = new Set<number>();
  for (const l1 of s.snapshots.l1Tables) {
    if (!Number.isSafeInteger(l1.offset)) continue;
    const bytes = await read(l1.offset, l1.entries * 8);
    const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
    for (let i = 0; i < l1.entries; i++) {
      const offset = entryOffset(view.getUint32(i * 8), view.getUint32(i * 8 + 4));
      if (offset !== 0) tables.add(offset);
    }
  }
  return tables;
}

/** Switches the header to the table at `tableOffset` with `count` entries (synced). */
async function writeTablePointer(s: Qcow2State, count: number, tableOffset: number): Promise<void> {
  const buf = new Uint8Array(TABLE_POINTER_BYTES);
  new ByteWriter(buf).u32(count).u64(tableOffset);
  await pwriteSync(s, NB_SNAPSHOTS_FIELD, buf);
  Object.assign(s.image.header, { snapshotCount: count, snapshotsOffset: tableOffset });
}

/** qcow2_write_snapshots: `list` becomes the snapshot table (see the note at the top). Lock held. */
export async function writeSnapshotTable(s: Qcow2State, list: readonly Qcow2Snapshot[]): Promise<void> {
  const table = encodeSnapshotTable(list, s.node.totalBytes);
  if (table === null) throw new BlockError('EFBIG');
  const tableOffset = await allocClusters(s, s.geometry.clustersFor(table.length));
  try {
    await flushLocked(s);
    await overlapCheck(s, 0, tableOffset, table.length);
    if (table.length > 0) await writeFile(s, tableOffset, table);
    await flushLocked(s);
    await writeTablePointer(s, list.length, tableOffset);
  } catch (e) {
    await freeClusters(s, tableOffset, table.length, DiscardType.ALWAYS);
    throw e;
  }
  const old = s.snapshots;
  s.snapshots = snapshotExtents(tableOffset, table.length, list);
  await freeClusters(s, old.tableOffset, old.tableBytes, DiscardType.SNAPSHOT);
}
