/*
 * Internal snapshots through the block layer (QEMU 7.2's block/snapshot.c,
 * plus bdrv_query_snapshot_info_list and bdrv_snapshot_dump of
 * block/qapi.c), so that commands never need to know which format keeps
 * the snapshots.
 *
 * A format offers the optional driver members `snapshotCreate`,
 * `snapshotGoto`, `snapshotDelete` and `snapshotList` (block/driver.ts;
 * `snapshotLoadTmp`, for `-l` of convert and measure, has its wrapper in
 * block/snapshot-tmp.ts); these wrappers are the one place that decides
 * what happens without them, as QEMU's generic layer does:
 *   - list, create, goto and delete fall back to the node's primary child
 *     when it is the only child holding data (raw over its file; filters),
 *     else fail with ENOTSUP ("Block driver does not support snapshots" for
 *     goto, "Block format 'raw' used by device '' does not support internal
 *     snapshot deletion" for delete);
 *   - goto on a node with dirty bitmaps is refused (EBUSY), and any error of
 *     the driver becomes "Failed to load snapshot: <strerror>"; what the
 *     driver had to say first (error_report in QEMU) goes to `report`.
 * Create, goto and delete run with the node drained. QEMU's goto fallback
 * closes the node and opens it again around the child's goto; here the
 * node stays open (no driver reachable through a fallback has snapshots,
 * so only a probed raw image's open-time warning, printed twice by QEMU,
 * shows the difference).
 *
 * Device names: qemu-img's BlockBackends are anonymous, so QEMU's messages
 * name device ''.
 *
 * Listing: `SnapshotInfo` is QEMUSnapshotInfo (64-bit fields as BigInt;
 * `icount` null where QEMU stores -1); `snapshotInfoQapi` is QAPI's
 * SnapshotInfo for `qemu-img info --output=json`, and `formatSnapshotList`
 * the "Snapshot list:" table that `qemu-img snapshot -l` and `qemu-img
 * info` print: printf field widths count bytes, dates are local time.
 */
import { drained } from './drain.js';
import { BlockError, strerror } from './errors.js';
import { ChildRole, type BdrvChild, type BlockNode } from './node.js';
import { sizeToStr } from './units.js';

/** One internal snapshot (QEMUSnapshotInfo). */
export interface SnapshotInfo {
  id: string;
  name: string;
  vmStateBytes: bigint;
  dateSec: number;
  dateNsec: number;
  vmClockNsec: bigint;
  /** Instruction count at the snapshot; null when none was recorded. */
  icount: bigint | null;
}

/** What a new snapshot records (the ID is chosen by the format). */
export interface SnapshotCreateRequest {
  name: string;
  dateSec: number;
  dateNsec: number;
  vmClockNsec?: bigint;
  icount?: bigint | null;
}

/** Receives what a driver reports before failing (QEMU's error_report). */
export type SnapshotReport = (message: string) => void;

/** QEMU's device name for qemu-img's anonymous BlockBackends. */
const DEVICE_NAME = '';

/** bdrv_snapshot_fallback_child: the primary child, when no other child holds data. */
function fallbackChild(node: BlockNode): BdrvChild | null {
  const fallback = node.primaryChild;
  if (!fallback) return null;
  const dataRoles = ChildRole.DATA | ChildRole.METADATA | ChildRole.FILTERED;
  return node.children.some((c) => c !== fallback && c.role & dataRoles) ? null : fallback;
}

function checkOpen(node: BlockNode): void {
  if (node.closed) throw new BlockError('ENOMEDIUM', `Device '${DEVICE_NAME}' has no medium`);
}

/** bdrv_snapshot_list: the node's snapshots, in table order. */
export async function snapshotList(node: BlockNode): Promise<SnapshotInfo[]> {
  checkOpen(node);
  if (node.driver.snapshotList) return node.driver.snapshotList(node);
  const fallback = fallbackChild(node);
  if (fallback) return snapshotList(fallback.node);
  throw new BlockError('ENOTSUP');
}

/** bdrv_snapshot_create: returns the new snapshot (with its ID). */
export async function snapshotCreate(node: BlockNode, request: SnapshotCreateRequest): Promise<SnapshotInfo> {
  checkOpen(node);
  const create = node.driver.snapshotCreate;
  if (create) return drained(node, () => create(node, request));
  const fallback = fallbackChild(node);
  if (fallback) return snapshotCreate(fallback.node, request);
  throw new BlockError('ENOTSUP');
}

/** bdrv_snapshot_goto: the node's content becomes the snapshot's (by ID, else by name). */
export async function snapshotGoto(node: BlockNode, idOrName: string, report: SnapshotReport): Promise<void> {
  if (node.closed) throw new BlockError('ENOMEDIUM', 'Block driver is closed');
  if (node.driver.hasDirtyBitmaps?.(node)) throw new BlockError('EBUSY', 'Device has active dirty bitmaps');
  const goto = node.driver.snapshotGoto;
  if (goto) {
    try {
      await drained(node, () => goto(node, idOrName, report));
    } catch (e) {
      if (!(e instanceof BlockError)) throw e;
      throw new BlockError(e.code, `Failed to load snapshot: ${strerror(e.code)}`, { cause: e });
    }
    return;
  }
  const fallback = fallbackChild(node);
  if (fallback) return snapshotGoto(fallback.node, idOrName, report);
  throw new BlockError('ENOTSUP', 'Block driver does not support snapshots');
}

/** bdrv_snapshot_delete: the snapshot matching `id` and `name` (either may be null, not both). */
export async function snapshotDelete(node: BlockNode, id: string | null, name: string | null): Promise<void> {
  checkOpen(node);
  if (id === null && name === null) throw new BlockError('EINVAL', 'snapshot_id and name are both NULL');
  const remove = node.driver.snapshotDelete;
  if (remove) return drained(node, () => remove(node, id, name));
  const fallback = fallbackChild(node);
  if (fallback) return snapshotDelete(fallback.node, id, name);
  throw new BlockError(
    'ENOTSUP',
    `Block format '${node.driver.name}' used by device '${DEVICE_NAME}' does not support internal snapshot deletion`,
  );
}

/** bdrv_snapshot_find (QEMU 7.2): the first snapshot named `name`; null when none or no snapshots. */
export async function snapshotFind(node: BlockNode, name: string): Promise<SnapshotInfo | null> {
  let list: SnapshotInfo[];
  try {
    list = await snapshotList(node);
  } catch (e) {
    if (e instanceof BlockError) return null;
    throw e;
  }
  return list.find((sn) => sn.name === name) ?? null;
}

// ------------------------------------------------------------ QAPI and text

/** QAPI SnapshotInfo, members in schema order (qjson.ts orders them as QEMU prints). */
export interface SnapshotInfoQapi {
  [key: string]: string | number | bigint | undefined;
  id: string;
  name: string;
  'vm-state-size': number | bigint;
  'date-sec': number;
  'date-nsec': number;
  'vm-clock-sec': number | bigint;
  'vm-clock-nsec': number;
  icount?: number | bigint;
}

const NSEC_PER_SEC = 1_000_000_000n;

/** An int64 QAPI value: a number when exact, else a BigInt. */
function int64(value: bigint): number | bigint {
  const signed = BigInt.asIntN(64, value);
  return signed >= BigInt(Number.MIN_SAFE_INTEGER) && signed <= BigInt(Number.MAX_SAFE_INTEGER) ? Number(signed) : signed;
}

/** The QAPI form of one snapshot (bdrv_query_snapshot_info_list). */
export function snapshotInfoQapi(sn: SnapshotInfo): SnapshotInfoQapi {
  return {
    id: sn.id,
    name: sn.name,
    'vm-state-size': int64(sn.vmStateBytes),
    'date-sec': sn.dateSec,
    'date-nsec': sn.dateNsec,
    'vm-clock-sec': int64(sn.vmClockNsec / NSEC_PER_SEC),
    'vm-clock-nsec': Number(sn.vmClockNsec % NSEC_PER_SEC),
    icount: sn.icount === null ? undefined : int64(sn.icount),
  };
}

/**
 * The snapshots qemu-img info reports (bdrv_query_image_info): undefined
 * when there are none or the node cannot have any; other failures are
 * "Can't list snapshots of device '': <strerror>".
 */
export async function querySnapshotInfoList(node: BlockNode): Promise<SnapshotInfoQapi[] | undefined> {
  let list: SnapshotInfo[];
  try {
    list = await snapshotList(node);
  } catch (e) {
    if (e instanceof BlockError && (e.code === 'ENOTSUP' || e.code === 'ENOMEDIUM')) return undefined;
    if (e instanceof BlockError) throw new BlockError(e.code, `Can't list snapshots of device '${DEVICE_NAME}': ${strerror(e.code)}`, { cause: e });
    throw e;
  }
  return list.length > 0 ? list.map(snapshotInfoQapi) : undefined;
}

const byteLength = (text: string) => Buffer.byteLength(text, 'utf8');
/** printf's %-Ns: pads to N bytes. */
const leftAligned = (text: string, width: number) => text + ' '.repeat(Math.max(0, width - byteLength(text)));
/** printf's %Ns. */
const rightAligned = (text: string, width: number) => ' '.repeat(Math.max(0, width - byteLength(text))) + text;

/** printf's %0Nd for a C int (the value already cast). */
function zeroPadded(value: number, width: number): string {
  const digits = Math.abs(value).toString();
  const sign = value < 0 ? '-' : '';
  return sign + digits.padStart(width - sign.length, '0');
}

/** (int) cast of a 64-bit quotient, as C truncates it. */
const cInt = (value: bigint) => Number(BigInt.asIntN(32, value));

/** The VM CLOCK column: hours:minutes:seconds.milliseconds. */
function vmClockText(vmClockNsec: bigint): string {
  const secs = vmClockNsec / NSEC_PER_SEC;
  return (
    `${zeroPadded(cInt(secs / 3600n), 2)}:${zeroPadded(cInt((secs / 60n) % 60n), 2)}:` +
    `${zeroPadded(cInt(secs % 60n), 2)}.${zeroPadded(cInt((vmClockNsec / 1_000_000n) % 1000n), 3)}`
  );
}

/** %Y-%m-%d %H:%M:%S in local time (g_date_time_new_from_unix_local). */
function localDateText(dateSec: number): string {
  const d = new Date(dateSec * 1000);
  const two = (n: number) => n.toString().padStart(2, '0');
  return `${d.getFullYear()}-${two(d.getMonth() + 1)}-${two(d.getDate())} ${two(d.getHours())}:${two(d.getMinutes())}:${two(d.getSeconds())}`;
}

/** One line of bdrv_snapshot_dump (without the newline). */
function snapshotDumpLine(sn: SnapshotInfoQapi): string {
  const vmClockNsec = BigInt.asUintN(64, BigInt(sn['vm-clock-sec']) * NSEC_PER_SEC + BigInt(sn['vm-clock-nsec']));
  const vmStateBytes = BigInt.asUintN(64, BigInt(sn['vm-state-size']));
  return (
    `${leftAligned(sn.id, 9)} ${leftAligned(sn.name, 16)} ` +
    rightAligned(sizeToStr(Number(vmStateBytes)), 8) +
    rightAligned(localDateText(sn['date-sec']), 20) +
    rightAligned(vmClockText(vmClockNsec), 13) +
    rightAligned(sn.icount === undefined ? '' : sn.icount.toString(), 11)
  );
}

/** "Snapshot list:", the column titles and one line per snapshot, as qemu-img prints them. */
export function formatSnapshotList(list: readonly SnapshotInfoQapi[]): string {
  const header = leftAligned('ID', 10) + leftAligned('TAG', 17) + rightAligned('VM SIZE', 8) + rightAligned('DATE', 20) + rightAligned('VM CLOCK', 13) + rightAligned('ICOUNT', 11);
  return `Snapshot list:\n${header}\n${list.map((sn) => `${snapshotDumpLine(sn)}\n`).join('')}`;
}
