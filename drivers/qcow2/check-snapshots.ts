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
 * past the end reads as empty, incomplete entries.
 *
 * Not implemented: rewriting the snapshot table, which -r all needs to fix
 * incomplete entries or dropped extra data (QEMU's qcow2_write_snapshots).
 * Such a repair fails with "ERROR failed to update snapshot table:
 * Operation not supported" and the check counts an internal error.
 */
import { BlockError, strerror } from '../../block/errors.js';
import { CheckAbort, errnoOf, readAt, type CheckFix, type CheckResult } from './check-io.js';
import type { CheckSnapshot, CheckState } from './check-state.js';
import { ByteReader, decodeCString } from './cursor.js';
import { Limits, Qcow2Version, SNAPSHOT_HEADER_BYTES } from './format.js';
import { ChunkedReader } from './snapshot-table.js';

/** QCOW_MAX_SNAPSHOT_EXTRA_DATA. */
const MAX_EXTRA_DATA_BYTES = 1024;
/** QCOW_MAX_SNAPSHOTS_SIZE: 1 KiB per snapshot. */
const MAX_TABLE_BYTES = 1024 * Limits.MAX_SNAPSHOTS;
/** sizeof(QCowSnapshotExtraData): vm_state_size_large, disk_size, icount. */
const KNOWN_EXTRA_DATA_BYTES = 24;
/** v3 entries need vm_state_size_large and disk_size. */
const V3_MIN_EXTRA_DATA_BYTES = 16;
/** Header offset of nb_snapshots (followed by snapshots_offset). */
const NB_SNAPSHOTS_FIELD = 60;
const INT_MAX = 0x7fffffff;

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
  let reduced = 0;
  if (count > Limits.MAX_SNAPSHOTS && fix.errors) {
    s.report(`Discarding ${count - Limits.MAX_SNAPSHOTS} overhanging snapshots`);
    reduced += count - Limits.MAX_SNAPSHOTS;
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
  reduced += read.dropped;
  res.corruptions += reduced + read.extraDropped;
  if (reduced) await writeSnapshotCount(s, res, read.snapshots.length, reduced);
  if (s.header.version >= Qcow2Version.V3) {
    read.snapshots.forEach((sn, i) => {
      if (sn.extraDataBytes >= V3_MIN_EXTRA_DATA_BYTES) return;
      res.corruptions++;
      s.report(`${fix.errors ? 'Repairing' : 'ERROR'} snapshot table entry ${i} is incomplete`);
    });
  }
}

/** qcow2_check_fix_snapshot_table: a table with corruptions must be rewritten under -r all (not implemented). */
export function checkFixSnapshotTable(s: CheckState, res: CheckResult, fix: CheckFix): void {
  if (!res.corruptions || !fix.errors) return;
  res.checkErrors++;
  s.report(`ERROR failed to update snapshot table: ${strerror('ENOTSUP')}`);
  throw new CheckAbort('ENOTSUP');
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
      if (tableBytes > MAX_TABLE_BYTES || input.offset - tableOffset > INT_MAX) {
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
  const h = new ByteReader(await input.take(SNAPSHOT_HEADER_BYTES));
  const l1TableOffset = h.u64();
  const l1Entries = h.u32();
  const idBytes = h.u16();
  const nameBytes = h.u16();
  h.skip(4 + 4 + 8 + 4); // date_sec, date_nsec, vm_clock_nsec, vm_state_size
  let extraDataBytes = h.u32();
  let truncate = false;
  if (extraDataBytes > MAX_EXTRA_DATA_BYTES) {
    if (!repair) return `Too much extra metadata in snapshot table entry ${i}\nYou can force-remove this extra metadata with qemu-img check -r all`;
    s.report(`Discarding too much extra metadata in snapshot table entry ${i} (${extraDataBytes} > ${MAX_EXTRA_DATA_BYTES})`);
    out.extraDropped++;
    truncate = true;
  }
  await input.take(Math.min(KNOWN_EXTRA_DATA_BYTES, extraDataBytes));
  if (extraDataBytes > KNOWN_EXTRA_DATA_BYTES) {
    const end = input.offset + extraDataBytes - KNOWN_EXTRA_DATA_BYTES;
    if (truncate) extraDataBytes = MAX_EXTRA_DATA_BYTES;
    await input.take(extraDataBytes - KNOWN_EXTRA_DATA_BYTES);
    input.offset = end;
  }
  const idStr = decodeCString(await input.take(idBytes));
  const name = decodeCString(await input.take(nameBytes));
  return { snapshot: { l1TableOffset, l1Entries, idStr, name, extraDataBytes }, extraDataBytes, idBytes, nameBytes };
}
