/*
 * Internal snapshots, as far as this driver needs them: where the snapshot
 * table and each snapshot's L1 table lie, so that overlap checks protect
 * them and the refcount repair counts what they reference. Snapshots are
 * neither created, applied nor deleted here; the clusters they share with
 * the active image have refcounts above 1 and lack COPIED, so writes copy
 * them first (cluster.ts), which keeps every snapshot intact.
 *
 * Snapshot table entry byte map (big-endian; each entry starts 8-aligned):
 *     0  u64  l1_table_offset
 *     8  u32  l1_size                  entries
 *    12  u16  id_str_size
 *    14  u16  name_size
 *    16  u32  date_sec
 *    20  u32  date_nsec
 *    24  u64  vm_clock_nsec
 *    32  u32  vm_state_size
 *    36  u32  extra_data_size
 *    40  extra data, id string, name (no NUL)
 * The table ends after the last name (QEMU's snapshots_size).
 */
import { ByteReader, u64ToNumber } from './cursor.js';
import { SNAPSHOT_HEADER_BYTES } from './format.js';

/** QEMU's QCOW_MAX_SNAPSHOT_EXTRA_DATA. */
export const MAX_SNAPSHOT_EXTRA_DATA_BYTES = 1024;
/** QEMU's QCOW_MAX_SNAPSHOTS_SIZE: 1 KiB per snapshot. */
export const MAX_SNAPSHOTS_TABLE_BYTES = 1024 * 0x10000;

export interface SnapshotExtents {
  tableOffset: number;
  /** 0 without snapshots. */
  tableBytes: number;
  l1Tables: Array<{ offset: number; entries: number }>;
}

export const NO_SNAPSHOTS: SnapshotExtents = { tableOffset: 0, tableBytes: 0, l1Tables: [] };

/** Reads `bytes` at `offset` of the image file. */
export type FileReader = (offsetBytes: number, bytes: number) => Promise<Uint8Array>;

/** The extents of `count` snapshots at `tableOffset`, or QEMU's reason for refusing the table. */
export async function readSnapshotExtents(read: FileReader, tableOffset: number, count: number): Promise<SnapshotExtents | string> {
  const l1Tables: SnapshotExtents['l1Tables'] = [];
  let offset = tableOffset;
  for (let i = 0; i < count; i++) {
    offset = Math.ceil(offset / 8) * 8;
    const r = new ByteReader(await read(offset, SNAPSHOT_HEADER_BYTES));
    const l1Offset = u64ToNumber(r.u64());
    const l1Entries = r.u32();
    const idBytes = r.u16();
    const nameBytes = r.u16();
    r.skip(20);
    const extraBytes = r.u32();
    if (extraBytes > MAX_SNAPSHOT_EXTRA_DATA_BYTES) return `Too much extra metadata in snapshot table entry ${i}`;
    offset += SNAPSHOT_HEADER_BYTES + extraBytes + idBytes + nameBytes;
    if (offset - tableOffset > MAX_SNAPSHOTS_TABLE_BYTES) return 'Snapshot table is too big';
    l1Tables.push({ offset: l1Offset, entries: l1Entries });
  }
  return { tableOffset, tableBytes: offset - tableOffset, l1Tables };
}
