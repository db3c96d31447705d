/*
 * Internal snapshots of a qcow2 node (QEMU 7.2's qcow2_snapshot_create,
 * _goto, _delete, _list and _load_tmp), the driver side of block/snapshot.ts
 * and block/snapshot-tmp.ts. Each runs under the image lock; the callers
 * drain the node first, so no guest request is in flight.
 *
 * Create: the active L1 table is copied to new clusters, every L2 table and
 * cluster it reaches gains a reference (COPIED cleared where a refcount
 * becomes 2, so later writes copy first), everything is flushed, then the
 * snapshot table is rewritten with the new entry (snapshots.ts: new
 * clusters, one header write, old table freed). The ID is one more than the
 * largest ID read as a number (find_new_snapshot_id); names need not be
 * unique. The name is cut to 255 bytes (QEMUSnapshotInfo's name field).
 * VM state is never saved here, so its size is 0 and nothing is discarded
 * after it.
 *
 * Goto (by ID, else by name): a snapshot with another disk size resizes
 * the node first (through the request gate, outside the lock, as QEMU does
 * with a BlockBackend); the active L1 table grows to hold the snapshot's;
 * the snapshot's references are counted once more; its L1 table,
 * zero-padded, overwrites the active one (synced); the old active
 * references are dropped; COPIED is rebuilt. A crash leaves either L1
 * table in place with, at worst, refcounts too high (leaks).
 *
 * Delete (by ID and/or name): the entry leaves the table first (rewritten),
 * then the snapshot's references are dropped, its L1 table freed, and the
 * active COPIED flags rebuilt: a crash after the table write only leaks.
 *
 * List: the entries in table order, ID and name cut to 127 and 255 bytes
 * as QEMU's fixed-size QEMUSnapshotInfo fields cut them.
 *
 * Load tmp (qemu-img convert -l): a read-only node switches its in-memory
 * L1 table to the snapshot's; nothing is written.
 *
 * Errors are QEMU's errno values and texts; a snapshot L1 table that fails
 * qcow2_validate_table is refused before anything changes. On a failed
 * create the new L1 copy is freed and, when the table write failed, the
 * added references are dropped again (QEMU leaks both).
 */
import { BlockError, strerror } from '../../block/errors.js';
import { Perm } from '../../block/flags.js';
import { preadv, truncate } from '../../block/io.js';
import { TransientParent, attachChild, detachChild, type BlockNode } from '../../block/node.js';
import type { SnapshotCreateRequest, SnapshotInfo, SnapshotReport } from '../../block/snapshot.js';
import { decodeCString, encodeUtf8 } from './cursor.js';
import { Autoclear, L1_ENTRY_BYTES, Limits } from './format.js';
import { checkUsable, pwriteSync, writeFile } from './header-io.js';
import { entryOffset, growL1 } from './l2.js';
import { OverlapCheck, overlapCheck } from './overlap.js';
import { allocClusters, freeClusters } from './refcount.js';
import { KNOWN_EXTRA_DATA_BYTES, snapshotL1Offset, type Qcow2Snapshot } from './snapshot-table.js';
import { activeL1, updateSnapshotRefcount, type L1Location } from './snapshot-refcount.js';
import { inactiveL2Tables, writeSnapshotTable } from './snapshots.js';
import { DiscardType, stateOf, type Qcow2State } from './state.js';
import { invalidTable } from './validate.js';

/** QEMUSnapshotInfo's id_str and name fields, NUL included: longer strings are cut. */
const ID_FIELD_BYTES = 128;
const NAME_FIELD_BYTES = 256;
/** strtoul's result range (unsigned long on Linux x86-64). */
const ULONG_MODULUS = 1n << 64n;

function bytesEqual(a: Uint8Array, b: Uint8Array): boolean {
  return a.length === b.length && a.every((v, i) => v === b[i]);
}

/** A C string's bytes cut to a field of `fieldBytes` (NUL included), as pstrcpy copies it. */
function fieldBytes(text: string, fieldBytes: number): Uint8Array {
  const bytes = encodeUtf8(text);
  const nul = bytes.indexOf(0);
  return bytes.subarray(0, Math.min(nul < 0 ? bytes.length : nul, fieldBytes - 1));
}

/** find_snapshot_by_id_and_name: the index of the first match of the given parts; -1 if none. */
function findByIdAndName(list: readonly Qcow2Snapshot[], id: string | null, name: string | null): number {
  if (id === null && name === null) return -1;
  const idBytes = id === null ? null : encodeUtf8(id);
  const nameBytes = name === null ? null : encodeUtf8(name);
  return list.findIndex((sn) => (idBytes === null || bytesEqual(sn.idBytes, idBytes)) && (nameBytes === null || bytesEqual(sn.nameBytes, nameBytes)));
}

/** find_snapshot_by_id_or_name: by ID first, then by name. */
function findByIdOrName(list: readonly Qcow2Snapshot[], idOrName: string): number {
  const byId = findByIdAndName(list, idOrName, null);
  return byId >= 0 ? byId : findByIdAndName(list, null, idOrName);
}

/** strtoul(text, NULL, 10): leading blanks, a sign, digits; saturates at ULONG_MAX; '-' negates modulo 2^64. */
function strtoul(text: string): bigint {
  const m = /^[\t\n\v\f\r ]*([+-]?)([0-9]+)/.exec(text);
  if (!m) return 0n;
  const value = BigInt(m[2]!);
  if (value >= ULONG_MODULUS) return ULONG_MODULUS - 1n;
  return m[1] === '-' ? (ULONG_MODULUS - value) % ULONG_MODULUS : value;
}

/** find_new_snapshot_id: one more than the largest ID (as strtoul reads it). */
function nextSnapshotId(list: readonly Qcow2Snapshot[]): string {
  let max = 0n;
  for (const sn of list) {
    const id = strtoul(decodeCString(sn.idBytes));
    if (id > max) max = id;
  }
  return ((max + 1n) % ULONG_MODULUS).toString();
}

/** The entry as qcow2_snapshot_list reports it (pstrcpy into QEMUSnapshotInfo). */
function snapshotInfoOf(sn: Qcow2Snapshot): SnapshotInfo {
  return {
    id: decodeCString(sn.idBytes.subarray(0, ID_FIELD_BYTES - 1)),
    name: decodeCString(sn.nameBytes.subarray(0, NAME_FIELD_BYTES - 1)),
    vmStateBytes: sn.vmStateBytes,
    dateSec: sn.dateSec,
    dateNsec: sn.dateNsec,
    vmClockNsec: sn.vmClockNsec,
    icount: sn.icount,
  };
}

const l1Of = (sn: Qcow2Snapshot): L1Location => ({ offset: snapshotL1Offset(sn), entries: sn.l1Entries });

/** qcow2_validate_table for the snapshot's L1 table: QEMU's error, or null. */
function snapshotL1Error(s: Qcow2State, sn: Qcow2Snapshot): BlockError | null {
  const reason = invalidTable(s.image.header, snapshotL1Offset(sn), sn.l1Entries, L1_ENTRY_BYTES, Limits.MAX_L1_BYTES, 'Snapshot L1 table');
  return reason === null ? null : new BlockError(reason.endsWith('too large') ? 'EFBIG' : 'EINVAL', reason);
}

function writableState(node: BlockNode): Qcow2State {
  const s = stateOf(node);
  checkUsable(s);
  if (!s.writable) throw new BlockError('EPERM', 'qcow2: the image is read-only');
  return s;
}

/** Makes `table` the active L1 table in memory, in one synchronous step (lock held). */
function installActiveL1(s: Qcow2State, table: Uint8Array, location?: L1Location): void {
  if (location) Object.assign(s.image.header, { l1TableOffset: location.offset, l1Entries: location.entries });
  s.l1 = table;
  s.l1View = new DataView(table.buffer, table.byteOffset, table.byteLength);
  s.l2Tables.clear();
  for (let i = 0; i < s.image.header.l1Entries; i++) {
    const offset = entryOffset(s.l1View.getUint32(i * 8), s.l1View.getUint32(i * 8 + 4));
    if (offset !== 0) s.l2Tables.add(offset);
  }
  s.compressedCache = null;
  s.metadataPreallocation = null;
}

/** Re-reads the snapshots' L2 tables when the "all" overlap checks keep them. */
async function refreshInactiveL2(s: Qcow2State): Promise<void> {
  if (!s.inactiveL2Tables) return;
  s.inactiveL2Tables = await inactiveL2Tables(s, async (offsetBytes, bytes) => {
    const buf = new Uint8Array(bytes);
    await preadv(s.file, offsetBytes, buf);
    return buf;
  });
}

// ------------------------------------------------------------ create

function newSnapshot(s: Qcow2State, request: SnapshotCreateRequest, l1Offset: number): Qcow2Snapshot {
  return {
    l1TableOffset: BigInt(l1Offset),
    l1Entries: s.image.header.l1Entries,
    idBytes: encodeUtf8(nextSnapshotId(s.snapshots.list)),
    nameBytes: fieldBytes(request.name, NAME_FIELD_BYTES),
    dateSec: request.dateSec,
    dateNsec: request.dateNsec,
    vmClockNsec: request.vmClockNsec ?? 0n,
    vmStateBytes: 0n,
    diskBytes: BigInt(s.node.totalBytes),
    icount: request.icount ?? null,
    extraDataBytes: KNOWN_EXTRA_DATA_BYTES,
    unknownExtra: new Uint8Array(0),
  };
}

/** Drops the references a failed create added to the active tables; a failure here only leaks. */
async function undoReferences(s: Qcow2State): Promise<void> {
  try {
    await updateSnapshotRefcount(s, activeL1(s), -1);
    await updateSnapshotRefcount(s, activeL1(s), 0);
  } catch {
    // The refcounts stay raised: leaked clusters, as QEMU leaves them.
  }
}

/** qcow2_snapshot_create (see the note at the top). */
export async function qcow2SnapshotCreate(node: BlockNode, request: SnapshotCreateRequest): Promise<SnapshotInfo> {
  const s = writableState(node);
  return s.lock.run(async () => {
    if (s.snapshots.list.length >= Limits.MAX_SNAPSHOTS) throw new BlockError('EFBIG');
    const l1Bytes = s.image.header.l1Entries * L1_ENTRY_BYTES;
    const l1Offset = await allocClusters(s, s.geometry.clustersFor(l1Bytes));
    const sn = newSnapshot(s, request, l1Offset);
    let referenced = false;
    try {
      await overlapCheck(s, 0, l1Offset, l1Bytes);
      if (l1Bytes > 0) await writeFile(s, l1Offset, s.l1.slice(0, l1Bytes));
      await updateSnapshotRefcount(s, activeL1(s), 1);
      referenced = true;
      await writeSnapshotTable(s, [...s.snapshots.list, sn]);
    } catch (e) {
      if (referenced) await undoReferences(s);
      await freeClusters(s, l1Offset, l1Bytes, DiscardType.ALWAYS);
      throw e;
    }
    await refreshInactiveL2(s);
    return snapshotInfoOf(sn);
  });
}

// ------------------------------------------------------------ goto

/** The snapshot goto loads, checked; its L1 table problems are reported as QEMU's error_report does. */
function loadTarget(s: Qcow2State, idOrName: string, report: SnapshotReport): Qcow2Snapshot {
  const index = findByIdOrName(s.snapshots.list, idOrName);
  if (index < 0) throw new BlockError('ENOENT');
  const sn = s.snapshots.list[index]!;
  const invalid = snapshotL1Error(s, sn);
  if (invalid) {
    report(invalid.message);
    throw invalid;
  }
  return sn;
}

/** Resizes the node to the snapshot's disk size through the gate (a resize-only edge, as QEMU's BlockBackend). */
async function resizeForSnapshot(s: Qcow2State, bytes: number, report: SnapshotReport): Promise<void> {
  let edge;
  try {
    edge = attachChild(new TransientParent('qcow2 snapshot goto'), 'root', 0, s.node, Perm.RESIZE, Perm.ALL);
  } catch (e) {
    if (e instanceof BlockError) report(e.message);
    throw new BlockError('ENOTSUP', undefined, { cause: e });
  }
  try {
    await truncate(edge, bytes, true, 'off');
  } catch (e) {
    if (e instanceof BlockError) report(e.message);
    throw e;
  } finally {
    detachChild(edge);
  }
}

/** The snapshot's L1 table, read and zero-padded to the active table's size. */
async function readPaddedL1(s: Qcow2State, sn: Qcow2Snapshot): Promise<Uint8Array> {
  const table = new Uint8Array(s.image.header.l1Entries * L1_ENTRY_BYTES);
  if (sn.l1Entries > 0) await preadv(s.file, snapshotL1Offset(sn), table.subarray(0, sn.l1Entries * L1_ENTRY_BYTES));
  return table;
}

/** The active L1 table becomes a copy of the snapshot's, references moved, COPIED rebuilt (lock held). */
async function switchActiveL1(s: Qcow2State, sn: Qcow2Snapshot): Promise<void> {
  await growL1(s, sn.l1Entries, true);
  const next = await readPaddedL1(s, sn);
  await updateSnapshotRefcount(s, l1Of(sn), 1);
  const at = s.image.header.l1TableOffset;
  await overlapCheck(s, OverlapCheck.ACTIVE_L1, at, next.length);
  await pwriteSync(s, at, next);
  let dropError: unknown = null;
  try {
    await updateSnapshotRefcount(s, activeL1(s), -1);
  } catch (e) {
    dropError = e;
  }
  installActiveL1(s, next);
  if (dropError) throw dropError;
  await updateSnapshotRefcount(s, activeL1(s), 0);
}

/** qcow2_snapshot_goto (see the note at the top). */
export async function qcow2SnapshotGoto(node: BlockNode, idOrName: string, report: SnapshotReport): Promise<void> {
  const s = writableState(node);
  const sn = await s.lock.run(async () => loadTarget(s, idOrName, report));
  const diskBytes = sn.diskBytes === null ? node.totalBytes : Number(sn.diskBytes);
  if (diskBytes !== node.totalBytes) await resizeForSnapshot(s, diskBytes, report);
  await s.lock.run(async () => switchActiveL1(s, loadTarget(s, idOrName, report)));
}

// ------------------------------------------------------------ delete, list, load_tmp

/** Runs one step of a delete; its failure reads "<context>: <strerror>" (error_setg_errno). */
async function deleteStep(context: string, step: () => Promise<void>): Promise<void> {
  try {
    await step();
  } catch (e) {
    if (!(e instanceof BlockError)) throw e;
    throw new BlockError(e.code, `${context}: ${strerror(e.code)}`, { cause: e });
  }
}

/** qcow2_snapshot_delete (see the note at the top). */
export async function qcow2SnapshotDelete(node: BlockNode, id: string | null, name: string | null): Promise<void> {
  const s = writableState(node);
  await s.lock.run(async () => {
    const list = s.snapshots.list;
    const index = findByIdAndName(list, id, name);
    if (index < 0) throw new BlockError('ENOENT', "Can't find the snapshot");
    const sn = list[index]!;
    const invalid = snapshotL1Error(s, sn);
    if (invalid) throw invalid;
    await deleteStep('Failed to remove snapshot from snapshot list', () => writeSnapshotTable(s, list.filter((_, i) => i !== index)));
    await deleteStep('Failed to free the cluster and L1 table', () => updateSnapshotRefcount(s, l1Of(sn), -1));
    await freeClusters(s, snapshotL1Offset(sn), sn.l1Entries * L1_ENTRY_BYTES, DiscardType.SNAPSHOT);
    await deleteStep('Failed to update snapshot status in disk', () => updateSnapshotRefcount(s, activeL1(s), 0));
    await refreshInactiveL2(s);
  });
}

/** qcow2_snapshot_list. */
export async function qcow2SnapshotList(node: BlockNode): Promise<SnapshotInfo[]> {
  return stateOf(node).snapshots.list.map(snapshotInfoOf);
}

/** qcow2_snapshot_load_tmp (the node is read-only: block/snapshot-tmp.ts checks it). */
export async function qcow2SnapshotLoadTmp(node: BlockNode, id: string | null, name: string | null): Promise<void> {
  const s = stateOf(node);
  checkUsable(s);
  await s.lock.run(async () => {
    const index = findByIdAndName(s.snapshots.list, id, name);
    if (index < 0) throw new BlockError('ENOENT', "Can't find snapshot");
    const sn = s.snapshots.list[index]!;
    const invalid = snapshotL1Error(s, sn);
    if (invalid) throw invalid;
    const table = new Uint8Array(sn.l1Entries * L1_ENTRY_BYTES);
    try {
      if (table.length > 0) await preadv(s.file, snapshotL1Offset(sn), table);
    } catch (e) {
      if (!(e instanceof BlockError)) throw e;
      throw new BlockError(e.code, 'Failed to read l1 table for snapshot', { cause: e });
    }
    installActiveL1(s, table, l1Of(sn));
  });
}

/** QEMU loads a qcow2 image's persistent bitmaps at open; then goto is refused. */
export function qcow2HasDirtyBitmaps(node: BlockNode): boolean {
  const s = stateOf(node);
  return s.image.extensions.bitmaps !== null && (s.image.header.autoclearFeatures & Autoclear.BITMAPS) !== 0n;
}
