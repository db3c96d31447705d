/*
 * The refcount half of `qemu-img check` (QEMU 7.2's check_refblocks,
 * compare_refcounts, alloc_clusters_imrt, rebuild_refcounts_write_refblocks
 * and rebuild_refcount_structure).
 *
 * check_refblocks: every refcount table entry must be free of reserved
 * bits, cluster aligned and inside the file, and its refcount block must
 * end up referenced exactly once; otherwise the structure needs a rebuild.
 * With -r all a refcount block past the end of the file is kept by growing
 * the file to cover it.
 *
 * compare_refcounts: for every cluster of the file, the refcount on disk
 * against the one counted: higher is a leak, lower a corruption, 0 on disk
 * for a referenced cluster a reason to rebuild. -r leaks / -r all write the
 * counted value into the existing refcount block.
 *
 * Rebuild (-r all): new refcount blocks are allocated in clusters the
 * in-memory table says are free, each written as the slice of that table
 * it describes; then a refcount table is allocated the same way, which
 * may dirty already written blocks or need more table, so the two steps
 * repeat until the table stops growing; finally the table is written and
 * the header switched to it in one 12-byte write. The old structure is left
 * behind as leaks, which the caller repairs in a second pass.
 */
import { BlockError, strerror } from '../../block/errors.js';
import { CheckAbort, errnoOf, type CheckFix, type CheckResult } from './check-io.js';
import { incRefcounts, type Counting, type RefcountArray } from './check-imrt.js';
import { refcountAt, type CheckState } from './check-state.js';
import { EntryMask, REFTABLE_ENTRY_BYTES } from './format.js';
import { writeTableEntry } from './tables.js';

/** Header offset of refcount_table_offset (u64), followed by refcount_table_clusters (u32). */
const REFTABLE_FIELDS = 48;
const INT64_MAX = (1n << 63n) - 1n;

/** Whether the refcount structure needs a rebuild; set by the steps below. */
export interface RebuildFlag {
  rebuild: boolean;
}

/** check_refblocks: the refcount table's own entries, and the references to the refcount blocks. */
export async function checkRefblocks(c: Counting, fix: CheckFix, flag: RebuildFlag): Promise<void> {
  const { s, res, imrt } = c;
  const cs = s.geometry.clusterBytes;
  for (let i = 0; i < s.reftableEntries; i++) {
    const raw = s.reftableEntry(i);
    const offset = raw & EntryMask.REFT_OFFSET;
    const cluster = offset >> BigInt(s.geometry.clusterBits);
    if (raw & EntryMask.REFT_RESERVED) {
      s.report(`ERROR refcount table entry ${i} has reserved bits set`);
      res.corruptions++;
      flag.rebuild = true;
      continue;
    }
    if (offset % BigInt(cs) !== 0n) {
      s.report(`ERROR refcount block ${i} is not cluster aligned; refcount table entry corrupted`);
      res.corruptions++;
      flag.rebuild = true;
      continue;
    }
    if (cluster >= BigInt(imrt.entries)) {
      res.corruptions++;
      s.report(`${fix.errors ? 'Repairing' : 'ERROR'} refcount block ${i} is outside image`);
      if (fix.errors) await growOverRefblock(c, offset, flag);
      continue;
    }
    if (offset !== 0n) {
      incRefcounts(c, offset, cs);
      const counted = imrt.get(Number(cluster));
      if (counted !== 1) {
        s.report(`ERROR refcount block ${i} refcount=${counted}`);
        res.corruptions++;
        flag.rebuild = true;
      }
    }
  }
}

/** -r all for a refcount block past the end of the file: grow the file over it. */
async function growOverRefblock(c: Counting, offset: bigint, flag: RebuildFlag): Promise<void> {
  const { s, res, imrt } = c;
  const cs = s.geometry.clusterBytes;
  let failure: BlockError;
  if (offset > INT64_MAX - BigInt(cs)) {
    failure = new BlockError('EINVAL');
  } else {
    try {
      await s.file.grow(Number(offset) + cs);
      try {
        imrt.resize(s.geometry.clustersFor(s.file.lengthBytes));
      } catch (e) {
        res.checkErrors++;
        throw e;
      }
      if (offset >> BigInt(s.geometry.clusterBits) < BigInt(imrt.entries)) {
        res.corruptions--;
        res.corruptionsFixed++;
        incRefcounts(c, offset, cs);
        return;
      }
      failure = new BlockError('EINVAL');
    } catch (e) {
      if (!(e instanceof BlockError)) throw e;
      s.report(e.message, 'error');
      failure = e;
    }
  }
  flag.rebuild = true;
  s.report(`ERROR could not resize image: ${strerror(failure.code)}`);
}

/**
 * compare_refcounts: on-disk refcounts against counted ones, cluster by
 * cluster; repairs what `fix` allows. Returns the highest cluster with a
 * non-zero refcount on either side.
 */
export async function compareRefcounts(c: Counting, fix: CheckFix, flag: RebuildFlag): Promise<number> {
  const { s, imrt } = c;
  let highest = 0;
  const perBlock = s.geometry.refcountBlockEntries;
  for (let first = 0; first < imrt.entries; first += perBlock) {
    const end = Math.min(first + perBlock, imrt.entries);
    let located: Awaited<ReturnType<typeof s.refcounts.locate>>;
    try {
      located = await s.refcounts.locate(first);
    } catch (e) {
      for (let i = first; i < end; i++) {
        s.report(`Can't get refcount for cluster ${i}: ${strerror(errnoOf(e))}`);
        c.res.checkErrors++;
      }
      continue;
    }
    for (let i = first; i < end; i++) {
      const onDisk = located === null ? 0n : refcountAt(located.block, i - first, s.geometry.refcountOrder);
      const counted = BigInt(imrt.get(i));
      if (onDisk > 0n || counted > 0n) highest = i;
      if (onDisk !== counted) await mismatch(c, i, onDisk, counted, fix, flag);
    }
  }
  return highest;
}

async function mismatch(c: Counting, i: number, onDisk: bigint, counted: bigint, fix: CheckFix, flag: RebuildFlag): Promise<void> {
  const { s, res } = c;
  let fixed: 'leaksFixed' | 'corruptionsFixed' | null = null;
  if (onDisk === 0n) flag.rebuild = true;
  else if (onDisk > counted && fix.leaks) fixed = 'leaksFixed';
  else if (onDisk < counted && fix.errors) fixed = 'corruptionsFixed';
  const verdict = fixed !== null ? 'Repairing' : onDisk < counted ? 'ERROR' : 'Leaked';
  s.report(`${verdict} cluster ${i} refcount=${onDisk} reference=${counted}`);
  if (fixed !== null && (await setOnDisk(s, i, Number(counted)))) {
    res[fixed]++;
    // update_refcount frees the cluster with QCOW2_DISCARD_ALWAYS; a failed discard is ignored.
    if (counted === 0n) await s.file.discard(i * s.geometry.clusterBytes, s.geometry.clusterBytes).catch(() => undefined);
    return;
  }
  if (onDisk < counted) res.corruptions++;
  else res.leaks++;
}

/** update_refcount for one cluster whose refcount block exists; false when the write failed. */
async function setOnDisk(s: CheckState, cluster: number, value: number): Promise<boolean> {
  try {
    return await s.refcounts.set(cluster, value);
  } catch (e) {
    if (e instanceof BlockError) return false;
    throw e;
  }
}

/**
 * alloc_clusters_imrt: `count` contiguous clusters free in the in-memory
 * table, from `cursor.firstFree` on (growing the table past the end of the
 * image when needed), marked used; returns the byte offset of the first.
 */
function allocClustersImrt(s: CheckState, imrt: RefcountArray, count: number, cursor: { firstFree: number }): number {
  let cluster = cursor.firstFree;
  let contiguous = 0;
  let firstGap = true;
  for (; cluster < imrt.entries && contiguous < count; cluster++) {
    if (!imrt.get(cluster)) {
      contiguous++;
      if (firstGap) {
        cursor.firstFree = cluster;
        firstGap = false;
      }
    } else {
      contiguous = 0;
    }
  }
  if (contiguous < count) imrt.resize(cluster + count - contiguous);
  cluster -= contiguous;
  for (let i = 0; i < count; i++) imrt.set(cluster + i, 1);
  return cluster * s.geometry.clusterBytes;
}

/** The new refcount table being built (entries as numbers; grows in whole clusters). */
interface NewReftable {
  entries: number[];
}

/** A failure of the rebuild: QEMU's Error text; the caller prints it with error_report. */
class RebuildError extends Error {
  constructor(
    message: string,
    readonly code: BlockError['code'],
  ) {
    super(message);
  }
}

/**
 * rebuild_refcounts_write_refblocks: writes the refcount blocks covering
 * the non-zero entries of clusters [first, end); returns whether the new
 * refcount table had to grow.
 */
async function writeRefblocks(c: Counting, first: number, end: number, table: NewReftable): Promise<boolean> {
  const { s, imrt } = c;
  const g = s.geometry;
  const cursor = { firstFree: 0 };
  let grown = false;
  for (let cluster = first; cluster < end; cluster++) {
    if (!imrt.get(cluster)) continue;
    const index = g.reftableIndex(cluster);
    const blockStart = index * g.refcountBlockEntries;
    let offset = table.entries[index] ?? 0;
    if (!offset) {
      cursor.firstFree = Math.max(cursor.firstFree, blockStart);
      offset = allocOrFail(s, imrt, 1, cursor, 'ERROR allocating refblock');
      end = Math.max(end, offset / g.clusterBytes + 1);
      if (table.entries.length <= index) {
        const perCluster = g.clusterBytes / REFTABLE_ENTRY_BYTES;
        const grownTo = Math.ceil((index + 1) / perCluster) * perCluster;
        while (table.entries.length < grownTo) table.entries.push(0);
        grown = true;
      }
      table.entries[index] = offset;
    }
    await writeOrFail('ERROR writing refblock', async () => {
      await s.preWriteOverlapCheck(0, offset, g.clusterBytes);
      await s.file.write(offset, imrt.refblock(index));
    });
    cluster = blockStart + g.refcountBlockEntries - 1;
  }
  return grown;
}

function allocOrFail(s: CheckState, imrt: RefcountArray, count: number, cursor: { firstFree: number }, message: string): number {
  try {
    return allocClustersImrt(s, imrt, count, cursor);
  } catch (e) {
    const code = errnoOf(e);
    throw new RebuildError(`${message}: ${strerror(code)}`, code);
  }
}

async function writeOrFail(message: string, op: () => Promise<void>): Promise<void> {
  try {
    await op();
  } catch (e) {
    const code = errnoOf(e);
    throw new RebuildError(`${message}: ${strerror(code)}`, code);
  }
}

/**
 * rebuild_refcount_structure: a new refcount structure from the in-memory
 * table, switched into the header. Failures print QEMU's message and end
 * the check.
 */
export async function rebuildRefcountStructure(c: Counting): Promise<void> {
  const { s, res, imrt } = c;
  await s.refcounts.empty();
  const table: NewReftable = { entries: [] };
  try {
    let grown = await counted(res, writeRefblocks(c, 0, imrt.entries, table));
    let offset = 0;
    let clusters = 0;
    while (grown) {
      clusters = s.geometry.clustersFor(table.entries.length * REFTABLE_ENTRY_BYTES);
      try {
        offset = allocOrFail(s, imrt, clusters, { firstFree: 0 }, 'ERROR allocating reftable');
      } catch (e) {
        res.checkErrors++;
        throw e;
      }
      const start = offset / s.geometry.clusterBytes;
      grown = await counted(res, writeRefblocks(c, start, start + clusters, table));
    }
    const bytes = new Uint8Array(table.entries.length * REFTABLE_ENTRY_BYTES);
    table.entries.forEach((entry, i) => writeTableEntry(bytes, i, BigInt(entry)));
    await writeOrFail('ERROR writing reftable', async () => {
      await s.preWriteOverlapCheck(0, offset, bytes.length);
      await s.file.write(offset, bytes);
    });
    const fields = new Uint8Array(12);
    new DataView(fields.buffer).setBigUint64(0, BigInt(offset));
    new DataView(fields.buffer).setUint32(8, clusters);
    await writeOrFail('ERROR setting reftable', async () => {
      await s.file.write(REFTABLE_FIELDS, fields);
      await s.file.flush();
    });
    s.replaceReftable(offset, bytes);
  } catch (e) {
    if (!(e instanceof RebuildError)) throw e;
    s.report(e.message, 'error');
    throw new CheckAbort(e.code);
  }
}

/** A step of the rebuild whose failure QEMU counts as an internal error of the check. */
async function counted<T>(res: CheckResult, step: Promise<T>): Promise<T> {
  try {
    return await step;
  } catch (e) {
    res.checkErrors++;
    throw e;
  }
}
