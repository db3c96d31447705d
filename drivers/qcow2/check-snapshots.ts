/*
 * The snapshot table as `qemu-img check` reads it (QEMU 7.2's
 * qcow2_check_read_snapshot_table, qcow2_do_read_snapshots and
 * qcow2_check_fix_snapshot_table). An image opened for a check skips the
 * snapshot table at open, so a broken one can be checked; the check reads
 * it first, from the header fields on disk:
 *   - more than QCOW_MAX_SNAPSHOTS entries: with -r all the excess is
 *     dropped (nb_snapshots rewritten), otherwise the check fails;
 *   - the table must pass qcow2_validate_table ("snapshot table too
 *     large", "… offset invalid"), else the check fails;
 *   - each entry: its fixed header, the known extra data (24 bytes), any
 *     unknown extra data (at most QCOW_MAX_SNAPSHOT_EXTRA_DATA), id, name;
 *     too much extra data, or a table beyond QCOW_MAX_SNAPSHOTS_SIZE, fail
 *     the check unless -r all, which truncates or drops them;
 *   - in v3 images every entry needs 16 bytes of extra data ("snapshot
 *     table entry N is incomplete").
 * Reading past the end of the file yields zeros, as in QEMU, so a table
 * past the end reads as empty, incomplete entries. The counts of dropped
 * snapshots wrap as QEMU's C ints do (corruptions_fixed can go negative
 * when nb_snapshots was near 2^32).
 *
 * Rewriting (qcow2_check_fix_snapshot_table, after the refcounts were
 * checked and repaired): when the read found corruptions and -r all is
 * given, the table is written anew as qcow2_write_snapshots writes it
 * (snapshot-table.ts's encoder: every entry with at least the 24 bytes of
 * extra data QEMU 7.2 knows, a missing disk size taken from the image's
 * size now, the 32-bit VM state size widened, unknown extra data kept up
 * to the limit, dropped entries gone) into clusters allocated on the
 * repaired refcounts (check-alloc.ts), after an overlap check; flushed;
 * then nb_snapshots and snapshots_offset are switched in one synced
 * header write and the old table's clusters freed (a failure to free
 * them is printed and leaks them, as in QEMU). A failed rewrite is an
 * internal error that ends the check ("ERROR failed to update snapshot
 * table: …").
 *
 * One deliberate difference: QEMU's allocator may choose clusters the old
 * table still covers in memory when that table reaches past the end of
 * the file (so its refcounts could not be counted); its overlap check then
 * refuses the write and marks the image corrupt. The allocator here skips
 * such clusters and the rewrite succeeds (see check-alloc.ts).
 */
import { BlockError, strerror } from '../../block/errors.js';
import { allocClusters, flushRefcounts, freeClusters } from './check-alloc.js';
import { CheckAbort, errnoOf, readAt, type CheckFix, type CheckResult } from './check-io.js';
import type { CheckSnapshot, CheckState } from './check-state.js';
import { ByteReader, decodeCString } from './cursor.js';
import { Limits, Qcow2Version, SNAPSHOT_HEADER_BYTES } from './format.js';
import {
  ChunkedReader,
  decodeSnapshotEntryHeader,
  encodeSnapshotTable,
  KNOWN_EXTRA_DATA_BYTES,
  MAX_SNAPSHOT_EXTRA_DATA_BYTES,
  MAX_SNAPSHOTS_TABLE_BYTES,
  snapshotFromParts,
} from './snapshot-table.js';

/** v3 entries need vm_state_size_large and disk_size. */
const V3_MIN_EXTRA_DATA_BYTES = 16;
/** Header offset of nb_snapshots (followed by snapshots_offset). */
const NB_SNAPSHOTS_FIELD = 60;
const INT_MAX = 0x7fffffff;
/** Guest sizes are whole sectors (QEMU's bs->total_sectors). */
const SECTOR_BYTES = 512;

/** qcow2_check_read_snapshot_table: fills `s.snapshots`; throws CheckAbort when the check must stop. */
export async function checkReadSnapshotTable(s: CheckState, res: CheckResult, fix: CheckFix): Promise<void> {
  const pointer = new Uint8Array(12);
  try {
    await readAt(s.file, NB_SNAPSHOTS_FIELD, pointer);
  } catch (e) {
    res.checkErrors++;
    s.report(`ERROR failed to read the snapshot table pointer from the image header: ${strerror(errnoOf(e))}`);
    throw new CheckAbort(errnoOf(e));
  }
  const r = new ByteReader(pointer);
  let count = r.u32();
  const offset = r.u64();
  // QEMU counts the dropped snapshots in a C int: past INT_MAX the count wraps, and so does corruptions_fixed.
  let reduced = 0;
  if (count > Limits.MAX_SNAPSHOTS && fix.errors) {
    s.report(`Discarding ${count - Limits.MAX_SNAPSHOTS} overhanging snapshots`);
    reduced = (reduced + count - Limits.MAX_SNAPSHOTS) | 0;
    count = Limits.MAX_SNAPSHOTS;
  }
  const invalid = invalidSnapshotTable(offset, count, s.geometry.clusterBytes);
  if (invalid !== null) {
    res.checkErrors++;
    s.report(`ERROR ${invalid.reason}`, 'error');
    if (count > Limits.MAX_SNAPSHOTS) {
      s.report(`You can force-remove all ${count - Limits.MAX_SNAPSHOTS} overhanging snapshots with qemu-img check -r all`);
    }
    setTable(s, 0, [], 0);
    throw new CheckAbort(invalid.code);
  }
  const read = await readSnapshots(s, Number(offset), count, fix.errors);
  if (typeof read === 'string' || read instanceof BlockError) {
    res.checkErrors++;
    const [message, hint] = typeof read === 'string' ? read.split('\n') : [`Failed to read snapshot table: ${read.message}`];
    s.report(`ERROR failed to read the snapshot table: ${message}`, 'error');
    if (hint) s.report(hint);
    setTable(s, 0, [], 0);
    throw new CheckAbort(read instanceof BlockError ? read.code : 'EFBIG');
  }
  setTable(s, Number(offset), read.snapshots, read.bytes);
  reduced = (reduced + read.dropped) | 0;
  res.corruptions = (res.corruptions + reduced + read.extraDropped) | 0;
  if (reduced) await writeSnapshotCount(s, res, read.snapshots.length, reduced);
  if (s.header.version >= Qcow2Version.V3) {
    read.snapshots.forEach((sn, i) => {
      if (sn.extraDataBytes >= V3_MIN_EXTRA_DATA_BYTES) return;
      res.corruptions++;
      s.report(`${fix.errors ? 'Repairing' : 'ERROR'} snapshot table entry ${i} is incomplete`);
    });
  }
}

/**
 * qcow2_check_fix_snapshot_table: with -r all, a table the read found
 * corruptions in is written anew (entries completed, dropped ones gone).
 */
export async function checkFixSnapshotTable(s: CheckState, res: CheckResult, fix: CheckFix): Promise<void> {
  if (!res.corruptions || !fix.errors) return;
  try {
    await writeSnapshots(s);
  } catch (e) {
    res.checkErrors++;
    s.report(`ERROR failed to update snapshot table: ${strerror(errnoOf(e))}`);
    throw new CheckAbort(errnoOf(e));
  }
  res.corruptionsFixed += res.corruptions;
  res.corruptions = 0;
}

/**
 * qcow2_write_snapshots: the table goes to newly allocated clusters, is
 * flushed with its refcounts, then the header's nb_snapshots and
 * snapshots_offset switch to it in one synced write, and the old table's
 * clusters are freed. Until the switch the old table stays intact, so a
 * crash leaves one table or the other (and at worst leaked clusters).
 */
async function writeSnapshots(s: CheckState): Promise<void> {
  const diskBytes = Math.floor(s.header.virtualBytes / SECTOR_BYTES) * SECTOR_BYTES;
  const table = encodeSnapshotTable(s.snapshots, diskBytes);
  if (table === null) throw new BlockError('EFBIG');
  const offset = await allocClusters(s, table.length);
  try {
    await flushRefcounts(s);
    // The header does not point here yet, so these clusters must be free of metadata.
    await s.preWriteOverlapCheck(0, offset, table.length);
    if (table.length) await s.file.write(offset, table);
    await flushRefcounts(s);
    const pointer = new Uint8Array(12);
    new DataView(pointer.buffer).setUint32(0, s.snapshots.length);
    new DataView(pointer.buffer).setBigUint64(4, BigInt(offset));
    await s.file.write(NB_SNAPSHOTS_FIELD, pointer);
    await s.file.flush();
  } catch (e) {
    if (offset > 0) await freeClusters(s, offset, table.length, true);
    throw e;
  }
  await freeClusters(s, s.header.snapshotsOffset, s.snapshotsBytes, true);
  setTable(s, offset, s.snapshots, table.length);
}

function setTable(s: CheckState, offset: number, snapshots: CheckSnapshot[], bytes: number): void {
  s.header.snapshotsOffset = offset;
  s.header.snapshotCount = snapshots.length;
  s.snapshots = snapshots;
  s.snapshotsBytes = bytes;
}

/** qcow2_validate_table for the snapshot table, with QEMU's lower-case name. */
function invalidSnapshotTable(offset: bigint, count: number, clusterBytes: number) {
  const entryBytes = SNAPSHOT_HEADER_BYTES;
  if (count > Limits.MAX_SNAPSHOTS) return { reason: 'snapshot table too large', code: 'EFBIG' as const };
  if ((1n << 63n) - 1n - BigInt(count * entryBytes) < offset || offset % BigInt(clusterBytes) !== 0n) {
    return { reason: 'snapshot table offset invalid', code: 'EINVAL' as const };
  }
  return null;
}

async function writeSnapshotCount(s: CheckState, res: CheckResult, count: number, reduced: number): Promise<void> {
  const buf = new Uint8Array(4);
  new DataView(buf.buffer).setUint32(0, count);
  try {
    await s.file.write(NB_SNAPSHOTS_FIELD, buf);
    await s.file.flush();
  } catch (e) {
    res.checkErrors++;
    s.report(`ERROR failed to update the snapshot count in the image header: ${strerror(errnoOf(e))}`);
    throw new CheckAbort(errnoOf(e));
  }
  res.corruptionsFixed += reduced;
  res.corruptions -= reduced;
}

interface SnapshotsRead {
  snapshots: CheckSnapshot[];
  bytes: number;
  /** Snapshots dropped because the table was too big (repair only). */
  dropped: number;
  /** Entries whose extra data was truncated (repair only). */
  extraDropped: number;
}

/**
 * qcow2_do_read_snapshots: the entries, or QEMU's message (with its hint on
 * a second line), or the I/O error.
 */
async function readSnapshots(s: CheckState, tableOffset: number, count: number, repair: boolean): Promise<SnapshotsRead | string | BlockError> {
  const input = new ChunkedReader(async (offsetBytes, bytes) => {
    const buf = new Uint8Array(bytes);
    await readAt(s.file, offsetBytes, buf);
    return buf;
  }, tableOffset);
  const out: SnapshotsRead = { snapshots: [], bytes: 0, dropped: 0, extraDropped: 0 };
  let tableBytes = 0;
  try {
    for (let i = 0; i < count; i++) {
      const entryStart = input.offset;
      tableBytes = Math.ceil(tableBytes / 8) * 8;
      input.offset = Math.ceil(input.offset / 8) * 8;
      const sn = await readEntry(s, input, i, repair, out);
      if (typeof sn === 'string') return sn;
      tableBytes += SNAPSHOT_HEADER_BYTES + sn.extraDataBytes + sn.idBytes + sn.nameBytes;
      if (tableBytes > MAX_SNAPSHOTS_TABLE_BYTES || input.offset - tableOffset > INT_MAX) {
        if (!repair) return `Snapshot table is too big\nYou can force-remove all ${count - i} overhanging snapshots with qemu-img check -r all`;
        s.report(`Discarding ${count - i} overhanging snapshots (snapshot table is too big)`);
        out.dropped += count - i;
        input.offset = entryStart;
        break;
      }
      out.snapshots.push(sn.snapshot);
    }
  } catch (e) {
    if (e instanceof BlockError) return e;
    throw e;
  }
  out.bytes = input.offset - tableOffset;
  return out;
}

async function readEntry(s: CheckState, input: ChunkedReader, i: number, repair: boolean, out: SnapshotsRead) {
  const h = decodeSnapshotEntryHeader(await input.take(SNAPSHOT_HEADER_BYTES));
  let extraDataBytes = h.extraDataBytes;
  let truncate = false;
  if (extraDataBytes > MAX_SNAPSHOT_EXTRA_DATA_BYTES) {
    if (!repair) return `Too much extra metadata in snapshot table entry ${i}\nYou can force-remove this extra metadata with qemu-img check -r all`;
    s.report(`Discarding too much extra metadata in snapshot table entry ${i} (${extraDataBytes} > ${MAX_SNAPSHOT_EXTRA_DATA_BYTES})`);
    out.extraDropped++;
    truncate = true;
  }
  const known = await input.take(Math.min(KNOWN_EXTRA_DATA_BYTES, extraDataBytes));
  let unknownExtra: Uint8Array = new Uint8Array(0);
  if (extraDataBytes > KNOWN_EXTRA_DATA_BYTES) {
    const end = input.offset + extraDataBytes - KNOWN_EXTRA_DATA_BYTES;
    if (truncate) extraDataBytes = MAX_SNAPSHOT_EXTRA_DATA_BYTES;
    unknownExtra = await input.take(extraDataBytes - KNOWN_EXTRA_DATA_BYTES);
    input.offset = end;
  }
  const id = await input.take(h.idSize);
  const name = await input.take(h.nameSize);
  const entry = snapshotFromParts(h, { known, extraDataBytes, unknownExtra, id, name });
  const snapshot: CheckSnapshot = { ...entry, idStr: decodeCString(entry.idBytes), name: decodeCString(entry.nameBytes) };
  return { snapshot, extraDataBytes, idBytes: h.idSize, nameBytes: h.nameSize };
}
