/*
 * The cluster-mapping part of `qemu-img check` (QEMU 7.2's
 * check_refcounts_l1, check_refcounts_l2, fix_l2_entry_by_zero and
 * check_oflag_copied).
 *
 * Counting: an L1 table counts itself, each L2 table it points to, and
 * each cluster those map — a whole cluster for standard entries, the
 * 512-byte sectors a compressed descriptor covers — into the in-memory
 * refcount table; the active L1 also feeds the allocation statistics.
 * Findings on the way are corruptions: reserved bits in L1 and standard L2
 * entries, COPIED on a compressed descriptor, tables or data clusters not
 * cluster aligned. With -r all an unaligned zero cluster that keeps a
 * preallocated offset becomes a plain zero cluster.
 *
 * COPIED: after the refcounts are settled, every active L1 entry and every
 * allocated standard L2 entry must carry COPIED exactly when the cluster's
 * refcount on disk is 1. -r all rewrites the flags; -r leaks only when the
 * check found nothing else wrong.
 *
 * Tables are read through bounded buffers (the L1 table in chunks, one L2
 * table at a time); an L2 table wholly past the end of the file reads as
 * zeros and is not read at all.
 */
import { BlockError, strerror } from '../../block/errors.js';
import { CheckAbort, MAX_REQUEST_END_BYTES, errnoOf, hex64, readAt, type CheckFix } from './check-io.js';
import { incRefcounts, type Counting } from './check-imrt.js';
import { RefcountScanner, type CheckState } from './check-state.js';
import { OverlapCheck } from './overlap.js';
import { EntryMask, L1_ENTRY_BYTES } from './format.js';
import { l1EntryReservedReason, l2EntryReservedReason, writeTableEntry } from './tables.js';

/** L1 entries read at a time. */
const L1_CHUNK_ENTRIES = 0x20000;

/** What one L1 walk is for. */
export interface L1Walk {
  offset: bigint;
  entries: number;
  /** The active L1 table (statistics, and which overlap check an entry fix ignores). */
  active: boolean;
  fix: CheckFix;
}

/** A table entry, or 0n, read without BigInt work for the (common) empty entries. */
function entryAt(view: DataView, index: number): bigint {
  const at = index * 8;
  return view.getUint32(at) === 0 && view.getUint32(at + 4) === 0 ? 0n : view.getBigUint64(at);
}

/** check_refcounts_l1: counts an L1 table, its L2 tables and their clusters. */
export async function checkRefcountsL1(c: Counting, walk: L1Walk): Promise<void> {
  const { s, res } = c;
  if (!walk.entries) return;
  const tableBytes = walk.entries * L1_ENTRY_BYTES;
  incRefcounts(c, walk.offset, tableBytes);
  const start = Number(walk.offset);
  if (start + tableBytes > MAX_REQUEST_END_BYTES) failRead(c, 'ERROR: I/O error in check_refcounts_l1', new BlockError('EIO'));
  const chunk = new Uint8Array(Math.min(walk.entries, L1_CHUNK_ENTRIES) * L1_ENTRY_BYTES);
  for (let first = 0; first < walk.entries; first += L1_CHUNK_ENTRIES) {
    const count = Math.min(L1_CHUNK_ENTRIES, walk.entries - first);
    const view = new DataView(chunk.buffer, 0, count * L1_ENTRY_BYTES);
    try {
      await readAt(s.file, start + first * L1_ENTRY_BYTES, chunk.subarray(0, count * L1_ENTRY_BYTES));
    } catch (e) {
      failRead(c, 'ERROR: I/O error in check_refcounts_l1', e);
    }
    for (let i = 0; i < count; i++) {
      const entry = entryAt(view, i);
      if (entry === 0n) continue;
      const reserved = l1EntryReservedReason(entry);
      if (reserved !== null) {
        s.report(`ERROR ${reserved}`);
        res.corruptions++;
      }
      const l2Offset = entry & EntryMask.L1_OFFSET;
      incRefcounts(c, l2Offset, s.geometry.clusterBytes);
      if (l2Offset % BigInt(s.geometry.clusterBytes) !== 0n) {
        s.report(`ERROR l2_offset=${hex64(l2Offset)}: Table is not cluster aligned; L1 entry corrupted`);
        res.corruptions++;
      }
      await checkRefcountsL2(c, Number(l2Offset), walk);
    }
  }
}

function failRead(c: Counting, message: string, e: unknown): never {
  c.res.checkErrors++;
  c.s.report(message);
  throw new CheckAbort(errnoOf(e));
}

/** check_refcounts_l2: counts the clusters one L2 table maps. */
async function checkRefcountsL2(c: Counting, l2Offset: number, walk: L1Walk): Promise<void> {
  const { s } = c;
  if (l2Offset >= s.file.lengthBytes) return;
  const table = new Uint8Array(s.geometry.clusterBytes);
  try {
    await readAt(s.file, l2Offset, table);
  } catch (e) {
    failRead(c, 'ERROR: I/O error in check_refcounts_l2', e);
  }
  const view = new DataView(table.buffer);
  let nextContiguous = 0;
  for (let i = 0; i < s.geometry.l2Entries; i++) {
    const entry = entryAt(view, i);
    if (entry === 0n) continue;
    if (entry & EntryMask.COMPRESSED) {
      countCompressed(c, entry, walk);
      continue;
    }
    const reserved = l2EntryReservedReason(entry);
    if (reserved !== null) {
      s.report(`ERROR ${reserved}`);
      c.res.corruptions++;
    }
    const offset = entry & EntryMask.L2_OFFSET;
    if (offset === 0n) continue;
    if (offset % BigInt(s.geometry.clusterBytes) !== 0n && (await unalignedEntryFixed(c, entry, offset, { table, l2Offset, i }, walk))) {
      continue;
    }
    if (walk.active) {
      c.res.bfi.allocatedClusters++;
      if (nextContiguous && Number(offset) !== nextContiguous) c.res.bfi.fragmentedClusters++;
      nextContiguous = Number(offset) + s.geometry.clusterBytes;
    }
    incRefcounts(c, offset, s.geometry.clusterBytes);
  }
}

function countCompressed(c: Counting, entry: bigint, walk: L1Walk): void {
  const { s, res } = c;
  let descriptor = entry;
  if (entry & EntryMask.COPIED) {
    const hostOffset = entry & ((1n << BigInt(s.geometry.compressedOffsetBits)) - 1n);
    s.report(`ERROR: coffset=0x${hex64(hostOffset)}: copied flag must never be set for compressed clusters`);
    descriptor &= ~EntryMask.COPIED;
    res.corruptions++;
  }
  const extent = s.geometry.compressedExtent(descriptor);
  const hostOffset = descriptor & ((1n << BigInt(s.geometry.compressedOffsetBits)) - 1n);
  incRefcounts(c, hostOffset, extent.compressedBytes);
  if (walk.active) {
    res.bfi.allocatedClusters++;
    res.bfi.compressedClusters++;
    res.bfi.fragmentedClusters++;
  }
}

/**
 * An allocated entry whose offset is not cluster aligned: a corruption. A
 * zero cluster (no data) is made a plain zero cluster under -r all; true
 * when that worked and the cluster must not be counted.
 */
async function unalignedEntryFixed(
  c: Counting,
  entry: bigint,
  offset: bigint,
  where: { table: Uint8Array; l2Offset: number; i: number },
  walk: L1Walk,
): Promise<boolean> {
  const { s, res } = c;
  res.corruptions++;
  if (!(entry & EntryMask.ZERO)) {
    s.report(`ERROR offset=${hex64(offset)}: Data cluster is not properly aligned; L2 entry corrupted.`);
    return false;
  }
  s.report(`${walk.fix.errors ? 'Repairing' : 'ERROR'} offset=${hex64(offset)}: Preallocated cluster is not properly aligned; L2 entry corrupted.`);
  if (!walk.fix.errors) return false;
  writeTableEntry(where.table, where.i, EntryMask.ZERO);
  const entryOffset = where.l2Offset + where.i * 8;
  try {
    await s.preWriteOverlapCheck(walk.active ? OverlapCheck.ACTIVE_L2 : OverlapCheck.INACTIVE_L2, entryOffset, 8);
  } catch (e) {
    res.checkErrors++;
    s.report('ERROR: Overlap check failed');
    throw new CheckAbort(errnoOf(e));
  }
  try {
    await s.file.write(entryOffset, where.table.subarray(where.i * 8, where.i * 8 + 8));
    await s.file.flush();
  } catch (e) {
    res.checkErrors++;
    s.report(`ERROR: Failed to overwrite L2 table entry: ${strerror(errnoOf(e))}`);
    return false;
  }
  res.corruptions--;
  res.corruptionsFixed++;
  return true;
}

/** check_oflag_copied: COPIED must say "refcount 1" on the active L1 and L2 entries. */
export async function checkOflagCopied(s: CheckState, res: Counting['res'], fix: CheckFix): Promise<void> {
  const repair = fix.errors || (fix.leaks && !res.checkErrors && !res.corruptions && !res.leaks);
  const l1Entries = s.l1.length / L1_ENTRY_BYTES;
  const l1View = new DataView(s.l1.buffer, s.l1.byteOffset, s.l1.byteLength);
  const refcounts = new RefcountScanner(s);
  for (let i = 0; i < l1Entries; i++) {
    const l1Entry = entryAt(l1View, i);
    const l2Offset = l1Entry & EntryMask.L1_OFFSET;
    if (!l2Offset) continue;
    const refcount = await refcounts.get(Number(l2Offset >> BigInt(s.geometry.clusterBits)));
    if (typeof refcount === 'bigint' && (refcount === 1n) !== ((l1Entry & EntryMask.COPIED) !== 0n)) {
      res.corruptions++;
      s.report(`${repair ? 'Repairing' : 'ERROR'} OFLAG_COPIED L2 cluster: l1_index=${i} l1_entry=${hex64(l1Entry)} refcount=${refcount}`);
      if (repair) {
        await writeL1Entry(s, res, i, refcount === 1n ? l1Entry | EntryMask.COPIED : l1Entry & ~EntryMask.COPIED);
        res.corruptions--;
        res.corruptionsFixed++;
      }
    }
    await checkL2Copied(s, res, Number(l2Offset), repair, refcounts);
  }
}

async function checkL2Copied(s: CheckState, res: Counting['res'], l2Offset: number, repair: boolean, refcounts: RefcountScanner): Promise<void> {
  if (l2Offset >= s.file.lengthBytes) return; // reads as zeros: no entry to look at
  const table = new Uint8Array(s.geometry.clusterBytes);
  try {
    await readAt(s.file, l2Offset, table);
  } catch (e) {
    res.checkErrors++;
    s.report(`ERROR: Could not read L2 table: ${strerror(errnoOf(e))}`);
    throw new CheckAbort(errnoOf(e));
  }
  const view = new DataView(table.buffer);
  let dirty = 0;
  for (let j = 0; j < s.geometry.l2Entries; j++) {
    const entry = entryAt(view, j);
    const dataOffset = entry & EntryMask.L2_OFFSET;
    if (entry & EntryMask.COMPRESSED || !dataOffset) continue;
    const refcount = await refcounts.get(Number(dataOffset >> BigInt(s.geometry.clusterBits)));
    if (typeof refcount !== 'bigint' || (refcount === 1n) === ((entry & EntryMask.COPIED) !== 0n)) continue;
    res.corruptions++;
    s.report(`${repair ? 'Repairing' : 'ERROR'} OFLAG_COPIED data cluster: l2_entry=${hex64(entry)} refcount=${refcount}`);
    if (repair) {
      writeTableEntry(table, j, refcount === 1n ? entry | EntryMask.COPIED : entry & ~EntryMask.COPIED);
      dirty++;
    }
  }
  if (dirty === 0) return;
  await writeOrAbort(s, res, 'ERROR: Could not write L2 table; metadata overlap check failed', () =>
    s.preWriteOverlapCheck(OverlapCheck.ACTIVE_L2, l2Offset, s.geometry.clusterBytes),
  );
  await writeOrAbort(s, res, 'ERROR: Could not write L2 table', () => s.file.write(l2Offset, table));
  res.corruptions -= dirty;
  res.corruptionsFixed += dirty;
}

async function writeOrAbort(s: CheckState, res: Counting['res'], message: string, op: () => Promise<void>): Promise<void> {
  try {
    await op();
  } catch (e) {
    res.checkErrors++;
    s.report(`${message}: ${strerror(errnoOf(e))}`);
    throw new CheckAbort(errnoOf(e));
  }
}

/** qcow2_write_l1_entry: one active L1 entry, in memory and on disk (synced). */
async function writeL1Entry(s: CheckState, res: Counting['res'], index: number, value: bigint): Promise<void> {
  writeTableEntry(s.l1, index, value);
  const at = s.header.l1TableOffset + index * L1_ENTRY_BYTES;
  try {
    await s.preWriteOverlapCheck(OverlapCheck.ACTIVE_L1, at, L1_ENTRY_BYTES);
    await s.file.write(at, s.l1.subarray(index * L1_ENTRY_BYTES, (index + 1) * L1_ENTRY_BYTES));
    await s.file.flush();
  } catch (e) {
    res.checkErrors++;
    throw new CheckAbort(errnoOf(e));
  }
}
