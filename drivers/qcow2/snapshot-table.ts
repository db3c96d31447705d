/*
 * The internal snapshot table: its entries, decoded and encoded (QEMU 7.2's
 * qcow2_do_read_snapshots and the encoding half of qcow2_write_snapshots).
 *
 * Entry byte map (big-endian; every entry starts 8-aligned, the padding
 * between entries is zero and the table ends right after the last name):
 *     0  u64  l1_table_offset
 *     8  u32  l1_size                  entries
 *    12  u16  id_str_size
 *    14  u16  name_size
 *    16  u32  date_sec
 *    20  u32  date_nsec
 *    24  u64  vm_clock_nsec
 *    32  u32  vm_state_size            0 when the size needs 64 bits
 *    36  u32  extra_data_size
 *    40  extra data:
 *          +0   u64  vm_state_size_large   (present when extra_data_size ≥ 8)
 *          +8   u64  disk_size             (≥ 16; v3 entries must have it)
 *          +16  u64  icount                (≥ 24; -1: not recorded)
 *          +24  data newer than QEMU 7.2, kept as it is on rewrite
 *         id_str, then name (no NUL; a C string, so bytes after a NUL are lost)
 *
 * Reading is QEMU's non-repairing read, with its limits and texts: more
 * than 1 KiB of extra data in an entry, or a table beyond 64 MiB, refuse
 * the table (open fails). A short entry reads what it has: no 64-bit VM
 * state size, no disk size (QEMU then takes the image's current size), no
 * icount. The table is read through one buffer of `READ_CHUNK_BYTES`.
 *
 * Writing lays out every entry with at least the 24 bytes of extra data
 * QEMU 7.2 knows (more when the entry carried unknown extra data), so a
 * rewrite completes entries older writers left short, as QEMU's does.
 */
import { ByteReader, ByteWriter, u64ToNumber } from './cursor.js';
import { Limits, SNAPSHOT_HEADER_BYTES } from './format.js';

/** QCOW_MAX_SNAPSHOT_EXTRA_DATA. */
export const MAX_SNAPSHOT_EXTRA_DATA_BYTES = 1024;
/** QCOW_MAX_SNAPSHOTS_SIZE: 1 KiB per snapshot. */
export const MAX_SNAPSHOTS_TABLE_BYTES = 1024 * Limits.MAX_SNAPSHOTS;
/** sizeof(QCowSnapshotExtraData) in QEMU 7.2: vm_state_size_large, disk_size, icount. */
export const KNOWN_EXTRA_DATA_BYTES = 24;
/** Where each known extra-data field ends: an entry has the field when its extra data reaches that far. */
const EXTRA_END = { VM_STATE_SIZE: 8, DISK_SIZE: 16, ICOUNT: 24 } as const;
/** Table offsets stay below INT_MAX bytes from the table start (QEMU's int snapshots_size). */
const TABLE_SPAN_MAX_BYTES = 0x7fffffff;
/** The 32-bit vm_state_size field holds sizes up to this. */
const U32_MAX = 0xffffffff;
/** icount when none was recorded (-1 as a u64). */
const ICOUNT_NONE = (1n << 64n) - 1n;
/** The table is read through a buffer of this size. */
const READ_CHUNK_BYTES = 0x10000;
const ENTRY_ALIGN_BYTES = 8;

/** One snapshot table entry (QEMU's QCowSnapshot). 64-bit fields stay BigInt, as stored. */
export interface Qcow2Snapshot {
  l1TableOffset: bigint;
  l1Entries: number;
  /** id_str and name as stored, up to the first NUL. */
  idBytes: Uint8Array;
  nameBytes: Uint8Array;
  dateSec: number;
  dateNsec: number;
  vmClockNsec: bigint;
  vmStateBytes: bigint;
  /** disk_size; null when the entry is too short to have one. */
  diskBytes: bigint | null;
  /** null when none was recorded (stored as -1, or the entry is too short). */
  icount: bigint | null;
  /** extra_data_size as read (24 for entries we create). */
  extraDataBytes: number;
  /** Extra data beyond the 24 bytes QEMU 7.2 knows. */
  unknownExtra: Uint8Array;
}

/** Reads `bytes` at `offset` of the image file (zeros past its end). */
export type FileReader = (offsetBytes: number, bytes: number) => Promise<Uint8Array>;

export interface SnapshotTableRead {
  list: Qcow2Snapshot[];
  /** QEMU's snapshots_size: from the table start to the end of the last name. */
  tableBytes: number;
}

/** Sequential reads of a table through one buffer of `READ_CHUNK_BYTES` (also used by check-snapshots.ts). */
export class ChunkedReader {
  private buf: Uint8Array = new Uint8Array(0);
  private bufAt = 0;

  constructor(
    private readonly read: FileReader,
    public offset: number,
  ) {}

  async take(bytes: number): Promise<Uint8Array> {
    const at = this.offset;
    this.offset += bytes;
    const inBuf = at - this.bufAt;
    if (inBuf >= 0 && inBuf + bytes <= this.buf.length) return this.buf.subarray(inBuf, inBuf + bytes);
    this.buf = await this.read(at, Math.max(bytes, READ_CHUNK_BYTES));
    this.bufAt = at;
    return this.buf.subarray(0, bytes);
  }
}

/** The bytes of a C string field: up to the first NUL. */
function cStringBytes(field: Uint8Array): Uint8Array {
  const nul = field.indexOf(0);
  return (nul < 0 ? field : field.subarray(0, nul)).slice();
}

/** An entry's fixed part (bytes 0-39 of the byte map). */
export interface SnapshotEntryHeader {
  l1TableOffset: bigint;
  l1Entries: number;
  idSize: number;
  nameSize: number;
  dateSec: number;
  dateNsec: number;
  vmClockNsec: bigint;
  vmStateSize32: number;
  extraDataBytes: number;
}

export function decodeSnapshotEntryHeader(bytes: Uint8Array): SnapshotEntryHeader {
  const h = new ByteReader(bytes);
  return {
    l1TableOffset: h.u64(),
    l1Entries: h.u32(),
    idSize: h.u16(),
    nameSize: h.u16(),
    dateSec: h.u32(),
    dateNsec: h.u32(),
    vmClockNsec: h.u64(),
    vmStateSize32: h.u32(),
    extraDataBytes: h.u32(),
  };
}

/** What follows an entry's fixed part, as read; `extraDataBytes` is the size kept (a repair may have cut it). */
export interface SnapshotEntryParts {
  /** The first bytes of the extra data, up to KNOWN_EXTRA_DATA_BYTES. */
  known: Uint8Array;
  extraDataBytes: number;
  unknownExtra: Uint8Array;
  /** The id and name fields as stored. */
  id: Uint8Array;
  name: Uint8Array;
}

/** The entry from its parts: fields the extra data is too short for take QEMU's defaults. */
export function snapshotFromParts(h: SnapshotEntryHeader, parts: SnapshotEntryParts): Qcow2Snapshot {
  const { extraDataBytes } = parts;
  const known = new ByteReader(parts.known);
  const vmStateLarge = known.u64();
  const diskSize = known.u64();
  const icount = known.u64();
  return {
    l1TableOffset: h.l1TableOffset,
    l1Entries: h.l1Entries,
    idBytes: cStringBytes(parts.id),
    nameBytes: cStringBytes(parts.name),
    dateSec: h.dateSec,
    dateNsec: h.dateNsec,
    vmClockNsec: h.vmClockNsec,
    vmStateBytes: extraDataBytes >= EXTRA_END.VM_STATE_SIZE ? vmStateLarge : BigInt(h.vmStateSize32),
    diskBytes: extraDataBytes >= EXTRA_END.DISK_SIZE ? diskSize : null,
    icount: extraDataBytes >= EXTRA_END.ICOUNT && icount !== ICOUNT_NONE ? icount : null,
    extraDataBytes,
    unknownExtra: parts.unknownExtra.slice(),
  };
}

/** Entry `index` at the reader's offset, or QEMU's reason for refusing it. */
async function readEntry(input: ChunkedReader, index: number): Promise<Qcow2Snapshot | string> {
  const h = decodeSnapshotEntryHeader(await input.take(SNAPSHOT_HEADER_BYTES));
  const extraDataBytes = h.extraDataBytes;
  if (extraDataBytes > MAX_SNAPSHOT_EXTRA_DATA_BYTES) return `Too much extra metadata in snapshot table entry ${index}`;
  const known = await input.take(Math.min(KNOWN_EXTRA_DATA_BYTES, extraDataBytes));
  const unknownExtra = await input.take(Math.max(0, extraDataBytes - KNOWN_EXTRA_DATA_BYTES));
  const id = await input.take(h.idSize);
  const name = await input.take(h.nameSize);
  return snapshotFromParts(h, { known, extraDataBytes, unknownExtra, id, name });
}

/** The `count` entries of the table at `tableOffset`, or QEMU's reason for refusing the table. */
export async function readSnapshotTable(read: FileReader, tableOffset: number, count: number): Promise<SnapshotTableRead | string> {
  const input = new ChunkedReader(read, tableOffset);
  const list: Qcow2Snapshot[] = [];
  for (let i = 0; i < count; i++) {
    input.offset = alignUp(input.offset, ENTRY_ALIGN_BYTES);
    const sn = await readEntry(input, i);
    if (typeof sn === 'string') return sn;
    const span = input.offset - tableOffset;
    if (span > MAX_SNAPSHOTS_TABLE_BYTES || span > TABLE_SPAN_MAX_BYTES) return 'Snapshot table is too big';
    list.push(sn);
  }
  return { list, tableBytes: input.offset - tableOffset };
}

const alignUp = (n: number, to: number) => Math.ceil(n / to) * to;

/** Bytes entry `sn` takes when written (header, extra data, id, name). */
function entryBytes(sn: Qcow2Snapshot): number {
  return SNAPSHOT_HEADER_BYTES + KNOWN_EXTRA_DATA_BYTES + sn.unknownExtra.length + sn.idBytes.length + sn.nameBytes.length;
}

/** Bytes the table of `list` takes when written, or null beyond QEMU's 64 MiB limit. */
export function snapshotTableBytes(list: readonly Qcow2Snapshot[]): number | null {
  let bytes = 0;
  for (const sn of list) {
    bytes = alignUp(bytes, ENTRY_ALIGN_BYTES) + entryBytes(sn);
    if (bytes > MAX_SNAPSHOTS_TABLE_BYTES) return null;
  }
  return bytes;
}

/**
 * The table of `list` as qcow2_write_snapshots lays it out, or null when too
 * big (EFBIG). Entries without a disk size get `diskBytes`, the image's size
 * now (QEMU fills it in when it reads the table).
 */
export function encodeSnapshotTable(list: readonly Qcow2Snapshot[], diskBytes: number): Uint8Array | null {
  const total = snapshotTableBytes(list);
  if (total === null) return null;
  const out = new Uint8Array(total);
  const w = new ByteWriter(out);
  for (const sn of list) {
    w.skip(alignUp(w.offset, ENTRY_ALIGN_BYTES) - w.offset);
    w.u64(sn.l1TableOffset)
      .u32(sn.l1Entries)
      .u16(sn.idBytes.length)
      .u16(sn.nameBytes.length)
      .u32(sn.dateSec)
      .u32(sn.dateNsec)
      .u64(sn.vmClockNsec)
      .u32(sn.vmStateBytes <= U32_MAX ? Number(sn.vmStateBytes) : 0)
      .u32(KNOWN_EXTRA_DATA_BYTES + sn.unknownExtra.length)
      .u64(sn.vmStateBytes)
      .u64(sn.diskBytes ?? BigInt(diskBytes))
      .u64(sn.icount ?? ICOUNT_NONE)
      .bytes(sn.unknownExtra)
      .bytes(sn.idBytes)
      .bytes(sn.nameBytes);
  }
  return out;
}

/** The snapshot's L1 table offset as a number (Infinity above 2^53: no table can be there). */
export function snapshotL1Offset(sn: Qcow2Snapshot): number {
  return u64ToNumber(sn.l1TableOffset);
}
