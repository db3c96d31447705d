/*
 * Allocating and freeing clusters while `qemu-img check -r all` repairs an
 * image (QEMU 7.2's qcow2_alloc_clusters, alloc_clusters_noref,
 * update_refcount, alloc_refcount_block, qcow2_refcount_area and
 * qcow2_free_clusters, as they run on the node a check has just repaired).
 * The user is the snapshot table rewrite (check-snapshots.ts), which runs
 * after the refcounts were checked and repaired, so they can be trusted.
 *
 * Why not the driver's allocator (refcount.ts, refcount-grow.ts): it works
 * on a Qcow2State — an open qcow2 node with its L2 and refcount caches on
 * a BdrvChild — while a check works on the bare image file (CheckFile)
 * with the refcount blocks in OnDiskRefcounts, so that it can repair
 * images the driver refuses to open. The decisions are the same (QEMU's),
 * and so is the sizing of a new refcount structure (refcountMetadataSize).
 *
 * Allocation scans from `s.freeClusterIndex` for a run of clusters with
 * refcount 0, then raises their refcounts. One deliberate difference: a
 * free run that overlaps metadata the overlap check protects (metadata
 * without refcounts, e.g. a snapshot table reaching past the end of the
 * file, which the check could not count) is skipped, the scan going on
 * after that structure. QEMU allocates it, then fails the overlap check
 * before writing and marks the image corrupt. Where QEMU succeeds, both
 * choose the same clusters.
 *
 * Refcount updates go cluster by cluster. A cluster without a refcount
 * block gets one first, even when its refcount is to drop (as in QEMU:
 * freeing a table where no block exists creates the block, then fails
 * with EAGAIN); the update then fails with EAGAIN and an allocation scans
 * again, since the new block may sit where the run was. On any failure
 * the clusters already updated are restored. Clusters whose refcount
 * reaches 0 are discarded in the file when the whole update succeeded and
 * the reason allows it (QEMU's pass-discard defaults: yes for snapshots
 * and undone allocations, no for an old refcount table).
 *
 * A new refcount block goes to the first free cluster. If it lies in the
 * range it covers it describes itself, else its refcount is raised in the
 * block covering it; it is written and flushed, then its refcount table
 * entry is written and flushed. When the table is too small, a new table
 * 1.5 times the size needed and the blocks to cover it are laid out past
 * everything the current blocks could cover, written and flushed, the
 * header switched to them in one synced write, and the old table freed.
 * A crash at any point leaves the old or the new structure, at worst with
 * leaked clusters.
 *
 * Limits: host offsets stay below 2^53 (exact numbers; QEMU allows 2^56),
 * and refcounts above 2^53 - 1 (64-bit refcounts) cannot be changed.
 */
import { BlockError, strerror } from '../../block/errors.js';
import { refcountAt, type CheckState } from './check-state.js';
import { EntryMask, Limits, REFTABLE_ENTRY_BYTES } from './format.js';
import { OverlapCheck } from './overlap.js';
import { refcountMetadataSize } from './refcount-grow.js';
import { readTableEntry, setRefcount, writeTableEntry } from './tables.js';

/** Largest host offset a cluster may start at: QEMU's 2^56, and offsets must stay exact numbers. */
const HOST_OFFSET_MAX = Math.min(Limits.HOST_OFFSET_LIMIT, Number.MAX_SAFE_INTEGER + 1);
/** QEMU's QCOW_MAX_REFTABLE_SIZE in entries. */
const MAX_REFTABLE_ENTRIES = Limits.MAX_REFTABLE_BYTES / REFTABLE_ENTRY_BYTES;
/** Header offset of refcount_table_offset (u64), followed by refcount_table_clusters (u32). */
const REFTABLE_FIELDS = 48;

/** qcow2_alloc_clusters: `bytes` worth of contiguous clusters with refcount 1; returns the offset of the first. */
export async function allocClusters(s: CheckState, bytes: number): Promise<number> {
  const count = s.geometry.clustersFor(bytes);
  for (;;) {
    const offset = (await allocClustersNoref(s, count)) * s.geometry.clusterBytes;
    try {
      await updateRefcount(s, offset, bytes, false, false);
      return offset;
    } catch (e) {
      if (!(e instanceof BlockError && e.code === 'EAGAIN')) throw e;
    }
  }
}

/**
 * qcow2_free_clusters: drops one reference from each cluster of [offset,
 * offset + bytes). A failure is printed, not thrown (the clusters leak).
 */
export async function freeClusters(s: CheckState, offsetBytes: number, bytes: number, discard: boolean): Promise<void> {
  try {
    await updateRefcount(s, offsetBytes, bytes, true, discard);
  } catch (e) {
    if (!(e instanceof BlockError)) throw e;
    s.report(`qcow2_free_clusters failed: ${strerror(e.code)}`);
  }
}

/** qcow2_cache_flush of the refcount cache: the dirty blocks, then the file. */
export async function flushRefcounts(s: CheckState): Promise<void> {
  await s.refcounts.flush();
  await s.file.flush();
}

/**
 * alloc_clusters_noref: the index of the first of `count` contiguous
 * clusters with refcount 0 from `s.freeClusterIndex` on, which moves past
 * them; runs overlapping unrefcounted metadata are skipped (see above).
 */
async function allocClustersNoref(s: CheckState, count: number): Promise<number> {
  const cs = s.geometry.clusterBytes;
  const limit = Math.floor(HOST_OFFSET_MAX / cs);
  for (;;) {
    let run = 0;
    while (run < count) {
      const index = s.freeClusterIndex++;
      if (index >= limit) throw new BlockError('EFBIG');
      run = (await s.refcounts.get(index)) === 0n ? run + 1 : 0;
    }
    const first = s.freeClusterIndex - count;
    const hit = s.firstOverlap(0, first * cs, count * cs);
    // A structure ending before the run cannot be skipped (QEMU's empty bitmap directory at 0 "covers" everything): the write will fail.
    if (hit === null || !(hit.endBytes > first * cs)) return first;
    s.freeClusterIndex = Math.ceil(hit.endBytes / cs);
  }
}

/**
 * update_refcount with an addend of 1: raises (or lowers) the refcount of
 * every cluster [offset, offset + bytes) touches; see the note above for
 * EAGAIN and the undo.
 */
async function updateRefcount(s: CheckState, offsetBytes: number, bytes: number, decrease: boolean, discard: boolean): Promise<void> {
  if (bytes <= 0) return;
  const cs = s.geometry.clusterBytes;
  const first = Math.floor(offsetBytes / cs);
  const last = Math.floor((offsetBytes + bytes - 1) / cs);
  const freed: Array<{ offset: number; bytes: number }> = [];
  let cluster = first;
  try {
    for (; cluster <= last; cluster++) {
      const value = await adjustRefcount(s, cluster, decrease);
      if (value !== 0) continue;
      s.freeClusterIndex = Math.min(s.freeClusterIndex, cluster);
      if (discard) addRange(freed, cluster * cs, cs);
    }
  } catch (e) {
    if (!(e instanceof BlockError)) throw e;
    if (e.code === 'EAGAIN') s.freeClusterIndex = Math.min(s.freeClusterIndex, first);
    await updateRefcount(s, offsetBytes, cluster * cs - offsetBytes, !decrease, false).catch(() => undefined);
    throw e;
  }
  // Discards are hints: a failure is ignored (qcow2_process_discards).
  for (const range of freed) await s.file.discard(range.offset, range.bytes).catch(() => undefined);
}

/** Appends [offset, offset + bytes) to `ranges`, merging it with the last range when they touch. */
function addRange(ranges: Array<{ offset: number; bytes: number }>, offset: number, bytes: number): void {
  const lastRange = ranges[ranges.length - 1];
  if (lastRange !== undefined && lastRange.offset + lastRange.bytes === offset) lastRange.bytes += bytes;
  else ranges.push({ offset, bytes });
}

/** One cluster's refcount up or down by one, its refcount block created first if missing; returns the new value. */
async function adjustRefcount(s: CheckState, cluster: number, decrease: boolean): Promise<number> {
  const at = await s.refcounts.locate(cluster);
  if (at === null) {
    await allocRefcountBlock(s, cluster);
    throw new BlockError('EAGAIN');
  }
  const order = s.geometry.refcountOrder;
  const value = refcountAt(at.block, at.index, order);
  const next = decrease ? value - 1n : value + 1n;
  if (next < 0n || next > BigInt(s.geometry.refcountMax)) throw new BlockError('EINVAL');
  setRefcount(at.block, at.index, order, Number(next));
  s.refcounts.markDirty(at.offset);
  return Number(next);
}

/**
 * alloc_refcount_block for a cluster whose refcount table entry is empty
 * (or beyond the table): a new refcount block, written and hooked into
 * the table, which grows if needed.
 */
async function allocRefcountBlock(s: CheckState, cluster: number): Promise<void> {
  const g = s.geometry;
  const tableIndex = g.reftableIndex(cluster);
  const newBlock = await allocClustersNoref(s, 1);
  if (newBlock === 0) {
    await s.signalCorruption('Preventing invalid allocation of refcount block at offset 0');
    throw new BlockError('EIO');
  }
  const newOffset = newBlock * g.clusterBytes;
  if (g.reftableIndex(newBlock) === tableIndex) {
    const block = await s.refcounts.create(newOffset);
    setRefcount(block, g.refblockIndex(newBlock), g.refcountOrder, 1);
  } else {
    // Counted by another block, which may be missing too: then this throws EAGAIN after creating that one.
    await updateRefcount(s, newOffset, g.clusterBytes, false, false);
    await flushRefcounts(s);
    await s.refcounts.create(newOffset);
  }
  await flushRefcounts(s);
  if (tableIndex < s.reftableEntries) {
    const entry = new Uint8Array(REFTABLE_ENTRY_BYTES);
    writeTableEntry(entry, 0, BigInt(newOffset));
    const at = s.header.refcountTableOffset + tableIndex * REFTABLE_ENTRY_BYTES;
    await s.preWriteOverlapCheck(OverlapCheck.REFCOUNT_TABLE, at, entry.length);
    await writeSync(s, at, entry);
    writeTableEntry(s.reftable, tableIndex, BigInt(newOffset));
    return;
  }
  const blocksUsed = Math.ceil(Math.max(cluster + 1, newBlock + 1) / g.refcountBlockEntries);
  await refcountArea(s, blocksUsed * g.refcountBlockEntries * g.clusterBytes, tableIndex, newOffset);
}

async function writeSync(s: CheckState, offsetBytes: number, data: Uint8Array): Promise<void> {
  await s.file.write(offsetBytes, data);
  await s.file.flush();
}

/**
 * qcow2_refcount_area (no additional clusters, generous size): from
 * `startOffset` on, the refcount blocks still missing and a new refcount
 * table, all counted by themselves; `newBlockOffset` enters the table at
 * `newBlockIndex`. Then the header is switched and the old table freed.
 */
async function refcountArea(s: CheckState, startOffset: number, newBlockIndex: number, newBlockOffset: number): Promise<void> {
  const g = s.geometry;
  const cs = g.clusterBytes;
  const { blocks } = refcountMetadataSize(startOffset / cs, cs, g.refcountOrder, true);
  const table = newReftable(s, blocks);
  writeTableEntry(table, newBlockIndex, BigInt(newBlockOffset));
  const areaIndex = Math.floor(startOffset / cs / g.refcountBlockEntries);
  let missing = 0;
  for (let i = areaIndex; i < blocks; i++) if (readTableEntry(table, i) === 0n) missing++;
  const tableOffset = startOffset + missing * cs;
  const endOffset = tableOffset + table.length;
  await fillAreaBlocks(s, table, { areaIndex, blocks, startOffset, endOffset });
  await flushRefcounts(s);
  await s.preWriteOverlapCheck(0, tableOffset, table.length);
  await writeSync(s, tableOffset, table);
  const fields = new Uint8Array(12);
  new DataView(fields.buffer).setBigUint64(0, BigInt(tableOffset));
  new DataView(fields.buffer).setUint32(8, table.length / cs);
  await writeSync(s, REFTABLE_FIELDS, fields);
  const old = { offset: s.header.refcountTableOffset, bytes: s.reftable.length };
  s.reftable = table;
  s.header.refcountTableOffset = tableOffset;
  s.header.refcountTableClusters = table.length / cs;
  await freeClusters(s, old.offset, old.bytes, false);
}

/** The table qcow2_refcount_area builds for `blocks` refcount blocks: 50 % spare, whole clusters, the used entries copied. */
function newReftable(s: CheckState, blocks: number): Uint8Array {
  const perCluster = s.geometry.clusterBytes / REFTABLE_ENTRY_BYTES;
  const entries = Math.ceil((blocks + Math.ceil(blocks / 2)) / perCluster) * perCluster;
  if (blocks > MAX_REFTABLE_ENTRIES || entries > MAX_REFTABLE_ENTRIES) throw new BlockError('EFBIG');
  const table = new Uint8Array(entries * REFTABLE_ENTRY_BYTES);
  let maxUsed = s.reftableEntries - 1;
  while (maxUsed > 0 && (s.reftableEntry(maxUsed) & EntryMask.REFT_OFFSET) === 0n) maxUsed--;
  const keep = entries > maxUsed ? maxUsed + 1 : entries;
  table.set(s.reftable.subarray(0, Math.min(keep, s.reftableEntries) * REFTABLE_ENTRY_BYTES));
  return table;
}

interface RefcountAreaLayout {
  /** First refcount table index covering the area, and the number of blocks the new table holds. */
  areaIndex: number;
  blocks: number;
  /** The area: new blocks from startOffset, then the table, up to endOffset. */
  startOffset: number;
  endOffset: number;
}

/** Loads or creates blocks areaIndex..blocks-1 and gives every cluster of the area refcount 1. */
async function fillAreaBlocks(s: CheckState, table: Uint8Array, area: RefcountAreaLayout): Promise<void> {
  const g = s.geometry;
  const cs = g.clusterBytes;
  let blockOffset = area.startOffset;
  for (let i = area.areaIndex; i < area.blocks; i++) {
    const existing = Number(readTableEntry(table, i));
    const at = existing || blockOffset;
    const block = existing ? await s.refcounts.block(at) : await s.refcounts.create(at);
    if (!existing) {
      writeTableEntry(table, i, BigInt(at));
      blockOffset += cs;
    }
    const firstCovered = i * g.refcountBlockEntries * cs;
    if (firstCovered >= area.endOffset) continue;
    const from = firstCovered < area.startOffset ? (area.startOffset - firstCovered) / cs : 0;
    const to = Math.min((area.endOffset - firstCovered) / cs, g.refcountBlockEntries);
    for (let j = from; j < to; j++) setRefcount(block, j, g.refcountOrder, 1);
    s.refcounts.markDirty(at);
  }
}
