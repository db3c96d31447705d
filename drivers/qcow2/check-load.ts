/*
 * Opening an image for a check: the part of QEMU 7.2's qcow2_do_open that
 * runs with BDRV_O_CHECK, reading the image file directly.
 *
 * The header cluster is validated as QEMU validates it in check mode:
 * QEMU's header checks (validate.ts; the snapshot table is not checked, a
 * missing refcount table is allowed), the extensions, the backing file
 * name — but none of our own layout checks (tables past the end of the
 * file or overlapping the header are what the check is there to report),
 * and with QEMU's own range limits where validate.ts is stricter (see
 * headerFieldsReason). Then the active L1 table and the refcount table are
 * read, as QEMU reads them at open (at most 32 MiB and 8 MiB), and, for a
 * standalone open, the open-time header rewrite QEMU makes on a writable
 * image is done.
 */
import { BlockError } from '../../block/errors.js';
import { readAt, type CheckFile, type CheckReport } from './check-io.js';
import { CheckState } from './check-state.js';
import { decodeCString } from './cursor.js';
import { decodeExtensions, readFeatureTable, type Qcow2Extensions } from './extensions.js';
import { AUTOCLEAR_KNOWN_MASK, Autoclear, HeaderBytes, L1_ENTRY_BYTES, Limits, Qcow2Version } from './format.js';
import { decodeHeader, headerClusterBytes, type Qcow2Header } from './header.js';
import { invalidHeaderFields } from './validate.js';

/**
 * Loads the state of an image opened for a check (the part of qcow2_do_open
 * that runs with BDRV_O_CHECK), or QEMU's reason for refusing to open it.
 * With `warn` (a standalone open), a stale bitmaps extension is warned
 * about and, on a writable file, unknown autoclear bits are cleared and
 * the extension dropped with a header rewrite, as QEMU's open does.
 */
export async function loadCheckState(file: CheckFile, report: CheckReport, warn: ((message: string) => void) | null): Promise<CheckState | string> {
  const prefix = new Uint8Array(HeaderBytes.V3);
  await readAt(file, 0, prefix);
  const cluster = new Uint8Array(headerClusterBytes(prefix));
  await readAt(file, 0, cluster);
  const header = decodeHeader(cluster);
  const fieldReason = headerFieldsReason(header, cluster);
  if (fieldReason !== null) return fieldReason;
  const l1 = new Uint8Array(header.l1Entries * L1_ENTRY_BYTES);
  if (!(await readOrFail(file, header.l1TableOffset, l1))) return 'Could not read L1 table: Input/output error';
  const reftable = new Uint8Array(header.refcountTableClusters * 2 ** header.clusterBits);
  if (!(await readOrFail(file, header.refcountTableOffset, reftable))) {
    return 'Could not initialize refcount handling: Input/output error';
  }
  const extensions = decodeExtensions(cluster, header);
  if (typeof extensions === 'string') return extensions;
  const backingName = decodeBackingName(cluster, header);
  if (backingName === undefined) return 'Backing file name too long';
  const image = { header, unknownFields: unknownFields(cluster, header), extensions, backingName };
  const state = new CheckState(file, image, l1, reftable, report);
  if (warn !== null) await openTimeHeaderUpdate(state, extensions, warn);
  return state;
}

/**
 * QEMU's virtual size checks (size_to_l1) for a size past 2^53, which
 * validate.ts refuses outright; the header keeps the size as the nearest
 * double (only the allocation statistics use it).
 */
function virtualSizeReason(header: Qcow2Header, size: bigint): string | null {
  const coverage = BigInt(2 ** header.clusterBits * (2 ** header.clusterBits / 8));
  const l1Needed = (size + coverage - 1n) / coverage;
  if (l1Needed > BigInt(Limits.MAX_L1_INDEX)) return 'Image is too big';
  if (BigInt(header.l1Entries) < l1Needed) return 'L1 table is too small';
  header.virtualBytes = Number(size);
  return null;
}

/** Header offsets of size, l1_table_offset and refcount_table_offset. */
const VIRTUAL_SIZE_FIELD = 24;
const L1_OFFSET_FIELD = 40;
const REFTABLE_OFFSET_FIELD = 48;
const INT64_MAX = (1n << 63n) - 1n;

/**
 * QEMU's header checks for an open in check mode. validate.ts keeps the
 * L1 and refcount tables below 2^56 and refuses sizes and offsets past
 * 2^53 (they decode as Infinity); QEMU only asks that tables end below
 * INT64_MAX and that the L1 table covers the virtual size, and a check
 * must look at what QEMU opens. So what is refused only for that is
 * accepted here, with the value taken from the raw field (exact for
 * cluster-aligned offsets below 2^62), and the checks go on.
 */
function headerFieldsReason(header: Qcow2Header, cluster: Uint8Array): string | null {
  const options = { check: true, featureTable: () => readFeatureTable(cluster, header) };
  const fields = new DataView(cluster.buffer, cluster.byteOffset, cluster.byteLength);
  const relaxable: Array<[string, 'l1TableOffset' | 'refcountTableOffset', number, number]> = [
    ['Reference count table offset invalid', 'refcountTableOffset', REFTABLE_OFFSET_FIELD, header.refcountTableClusters * 2 ** header.clusterBits],
    ['Active L1 table offset invalid', 'l1TableOffset', L1_OFFSET_FIELD, header.l1Entries * L1_ENTRY_BYTES],
  ];
  const relaxed = { ...header };
  for (;;) {
    const reason = invalidHeaderFields(relaxed, options);
    if (reason === 'Image is too big' && relaxed.virtualBytes === Infinity) {
      const sizeReason = virtualSizeReason(header, fields.getBigUint64(VIRTUAL_SIZE_FIELD));
      if (sizeReason !== null) return sizeReason;
      relaxed.virtualBytes = 0;
      continue;
    }
    const hit = relaxable.find(([text, key]) => text === reason && relaxed[key] === header[key]);
    if (hit === undefined) return reason;
    const [, key, field, bytes] = hit;
    const raw = fields.getBigUint64(field);
    if (raw % BigInt(2 ** header.clusterBits) !== 0n || raw > INT64_MAX - BigInt(bytes)) return reason;
    header[key] = Number(raw);
    relaxed[key] = 0;
  }
}

async function readOrFail(file: CheckFile, offset: number, buf: Uint8Array): Promise<boolean> {
  try {
    await readAt(file, offset, buf);
    return true;
  } catch (e) {
    if (e instanceof BlockError) return false;
    throw e;
  }
}

/** QEMU's backing file name checks at open; undefined: "Backing file name too long". */
function decodeBackingName(cluster: Uint8Array, header: Qcow2Header): string | null | undefined {
  if (header.backingFileOffset === 0) return null;
  const limit = Math.min(Limits.MAX_BACKING_NAME_BYTES, 2 ** header.clusterBits - header.backingFileOffset);
  if (header.backingFileBytes > limit) return undefined;
  return decodeCString(cluster.subarray(header.backingFileOffset, header.backingFileOffset + header.backingFileBytes));
}

function unknownFields(cluster: Uint8Array, header: Qcow2Header): Uint8Array {
  if (header.version === Qcow2Version.V2 || header.headerBytes <= HeaderBytes.V3) return new Uint8Array(0);
  return cluster.slice(HeaderBytes.V3, header.headerBytes);
}

/** The stale-bitmaps warning, and the header rewrite a writable open makes. */
async function openTimeHeaderUpdate(s: CheckState, extensions: Qcow2Extensions, warn: (message: string) => void): Promise<void> {
  let update = false;
  if (extensions.staleBitmaps) {
    warn(
      s.header.version < Qcow2Version.V3
        ? 'This qcow2 v2 image contains bitmaps, but they may have been modified by a program without persistent bitmap support; so now they must all be considered inconsistent'
        : 'a program lacking bitmap support modified this file, so all bitmaps are now considered inconsistent',
    );
    s.report("Some clusters may be leaked, run 'qemu-img check -r' on the image file to fix.", 'unterminated');
    update = true;
  }
  if (s.header.autoclearFeatures & ~AUTOCLEAR_KNOWN_MASK) update = true;
  if (!update || !s.file.writable) return;
  s.header.autoclearFeatures &= AUTOCLEAR_KNOWN_MASK;
  if (extensions.staleBitmaps) s.header.autoclearFeatures &= ~Autoclear.BITMAPS;
  await s.updateHeader();
}
