/*
 * The state a qcow2 check works on: what QEMU's BDRVQcow2State holds when
 * an image is opened for `qemu-img check` (BDRV_O_CHECK), read straight
 * from the image file (check-load.ts):
 *   - the header cluster, validated in check mode;
 *   - the active L1 table and the refcount table, as QEMU loads them at open
 *     (bounded: QEMU's limits are 32 MiB and 8 MiB);
 *   - the snapshot list and the bitmaps extension, filled in by the check;
 *   - the refcounts on disk (`OnDiskRefcounts`), read and updated through
 *     a small write-back cache of refcount blocks when a check repairs,
 *     and where the allocator (check-alloc.ts) looks for free clusters;
 *   - the corruption flags: qcow2_signal_corruption prints one line the
 *     first time; on a writable image it is fatal, sets the corrupt bit and
 *     makes the node unusable (a later check fails with ENOMEDIUM, as
 *     QEMU's bs->drv = NULL does).
 *
 * The state lives as long as the open image: a repairing check and the
 * check qemu-img runs after it share it, as they share QEMU's BDS.
 *
 * The metadata overlap check before every write is QEMU's default
 * "cached" template (everything but the inactive L2 tables; bits from
 * overlap.ts), tested in QEMU's order against this state; it also tells
 * where the structure it hit ends, so the allocator can look past it.
 */
import { BlockError } from '../../block/errors.js';
import { readAt, type CheckFile, type CheckReport } from './check-io.js';
import { hex } from './cursor.js';
import { Autoclear, EntryMask, Incompat, L1_ENTRY_BYTES, Qcow2Geometry, REFTABLE_ENTRY_BYTES } from './format.js';
import { encodeHeaderCluster, type Qcow2Header, type Qcow2HeaderCluster } from './header.js';
import { OverlapCheck } from './overlap.js';
import type { Qcow2Snapshot } from './snapshot-table.js';
import { readTableEntry, setRefcount } from './tables.js';

/**
 * One internal snapshot, as the check reads it (QCowSnapshot): the entry
 * as snapshot-table.ts encodes it, with its id and name decoded for the
 * messages. `extraDataBytes` is the size after a repair truncated it.
 */
export interface CheckSnapshot extends Qcow2Snapshot {
  idStr: string;
  name: string;
}

/** The first metadata structure a range overlaps: its name in QEMU's messages, and where it ends. */
export interface OverlapHit {
  name: string;
  endBytes: number;
}

/** Whether the range under test overlaps structure `name` at [at, at + length). */
type HitTest = (name: string, at: number, length: number) => OverlapHit | null;

/** Refcount blocks cached (QEMU's default: MIN_REFCOUNT_CACHE_SIZE). */
const REFBLOCK_CACHE_ENTRIES = 4;

export class CheckState {
  readonly geometry: Qcow2Geometry;
  /** Active L1 table, raw, as loaded at open. */
  readonly l1: Uint8Array;
  /** Refcount table, raw; replaced by a rebuild. */
  reftable: Uint8Array;
  snapshots: CheckSnapshot[] = [];
  /** Bytes of the snapshot table as read (QEMU's snapshots_size). */
  snapshotsBytes = 0;
  /** A fatal corruption was signalled (QEMU: bs->drv = NULL). */
  unusable = false;
  /** Where the allocator (check-alloc.ts) looks for free clusters first (QEMU's free_cluster_index). */
  freeClusterIndex = 0;
  private signalled = false;
  readonly refcounts: OnDiskRefcounts;

  constructor(
    readonly file: CheckFile,
    readonly image: Qcow2HeaderCluster,
    l1: Uint8Array,
    reftable: Uint8Array,
    readonly report: CheckReport,
  ) {
    this.geometry = new Qcow2Geometry(image.header.clusterBits, image.header.refcountOrder);
    this.l1 = l1;
    this.reftable = reftable;
    this.refcounts = new OnDiskRefcounts(this);
  }

  get header(): Qcow2Header {
    return this.image.header;
  }

  get reftableEntries(): number {
    return this.reftable.length / REFTABLE_ENTRY_BYTES;
  }

  /** Entry of the refcount table (raw). */
  reftableEntry(index: number): bigint {
    return readTableEntry(this.reftable, index);
  }

  /** Switches to a rebuilt refcount table (the header is already written). */
  replaceReftable(offset: number, table: Uint8Array): void {
    this.reftable = table;
    this.header.refcountTableOffset = offset;
    this.header.refcountTableClusters = this.geometry.clustersFor(table.length);
    this.refcounts.forget();
  }

  /**
   * qcow2_signal_corruption: one line the first time (and again for a fatal
   * event until the corrupt bit is set); fatal only on a writable image.
   */
  async signalCorruption(message: string): Promise<void> {
    const fatal = this.file.writable;
    if (this.signalled && (!fatal || this.header.incompatibleFeatures & Incompat.CORRUPT)) return;
    this.report(
      fatal
        ? `qcow2: Marking image as corrupt: ${message}; further corruption events will be suppressed`
        : `qcow2: Image is corrupt: ${message}; further non-fatal corruption events will be suppressed`,
    );
    if (fatal) {
      this.header.incompatibleFeatures |= Incompat.CORRUPT;
      await this.updateHeader().catch(() => undefined);
      this.unusable = true;
    }
    this.signalled = true;
  }

  /** qcow2_update_header: rewrites cluster 0 from the in-memory header. */
  async updateHeader(): Promise<void> {
    const cluster = encodeHeaderCluster(this.image);
    if (typeof cluster === 'string') throw new BlockError('ENOSPC', cluster);
    await this.file.write(0, cluster);
  }

  /** Clears an incompatible feature bit (qcow2_mark_clean / qcow2_mark_consistent). */
  async clearIncompatible(bit: bigint): Promise<void> {
    if (!(this.header.incompatibleFeatures & bit)) return;
    await this.refcounts.flush();
    await this.file.flush();
    this.header.incompatibleFeatures &= ~bit;
    await this.updateHeader();
  }

  /**
   * qcow2_pre_write_overlap_check: EIO (after signalling corruption) when
   * [offset, offset + bytes) would overwrite metadata not ignored by `ignore`.
   */
  async preWriteOverlapCheck(ignore: number, offset: number, bytes: number): Promise<void> {
    const hit = this.metadataOverlap(ignore, offset, bytes);
    if (hit === null) return;
    await this.signalCorruption(`Preventing invalid write on metadata (overlaps with ${hit})`);
    throw new BlockError('EIO');
  }

  /** qcow2_check_metadata_overlap with the "cached" template: the name of the first overlapping structure, or null. */
  metadataOverlap(ignore: number, offset: number, bytes: number): string | null {
    return this.firstOverlap(ignore, offset, bytes)?.name ?? null;
  }

  /** The first structure (in QEMU's order) [offset, offset + bytes) overlaps, with where it ends; null if none. */
  firstOverlap(ignore: number, offset: number, bytes: number): OverlapHit | null {
    if (bytes === 0) return null;
    const cs = this.geometry.clusterBytes;
    const chk = ~ignore;
    if (chk & OverlapCheck.MAIN_HEADER && offset < cs) return { name: 'qcow2_header', endBytes: cs };
    const start = Math.floor(offset / cs) * cs;
    const size = Math.ceil((offset - start + bytes) / cs) * cs;
    const hit: HitTest = (name, at, length) => (rangesOverlap(start, size, at, length) ? { name, endBytes: at + length } : null);
    const h = this.header;
    return (
      (chk & OverlapCheck.ACTIVE_L1 && h.l1Entries ? hit('active L1 table', h.l1TableOffset, h.l1Entries * L1_ENTRY_BYTES) : null) ??
      (chk & OverlapCheck.REFCOUNT_TABLE && this.reftable.length ? hit('refcount table', h.refcountTableOffset, this.reftable.length) : null) ??
      (chk & OverlapCheck.SNAPSHOT_TABLE && this.snapshotsBytes ? hit('snapshot table', h.snapshotsOffset, this.snapshotsBytes) : null) ??
      (chk & OverlapCheck.INACTIVE_L1 ? this.inactiveL1Hit(hit) : null) ??
      (chk & OverlapCheck.ACTIVE_L2 ? this.tableEntryHit(this.l1, EntryMask.L1_OFFSET, (at) => hit('active L2 table', at, cs)) : null) ??
      (chk & OverlapCheck.REFCOUNT_BLOCK ? this.tableEntryHit(this.reftable, EntryMask.REFT_OFFSET, (at) => hit('refcount block', at, cs)) : null) ??
      (chk & OverlapCheck.BITMAP_DIRECTORY ? this.bitmapDirectoryHit(hit) : null)
    );
  }

  private inactiveL1Hit(hit: HitTest): OverlapHit | null {
    for (const sn of this.snapshots) {
      const found = sn.l1Entries ? hit('inactive L1 table', Number(sn.l1TableOffset), sn.l1Entries * L1_ENTRY_BYTES) : null;
      if (found !== null) return found;
    }
    return null;
  }

  /** QEMU tests the directory whenever the autoclear bit is set: without the extension it is [0, 0), which overlaps everything. */
  private bitmapDirectoryHit(hit: HitTest): OverlapHit | null {
    if (!(this.header.autoclearFeatures & Autoclear.BITMAPS)) return null;
    const bitmaps = this.image.extensions.bitmaps ?? { directoryOffset: 0, directoryBytes: 0 };
    return hit('bitmap directory', bitmaps.directoryOffset, bitmaps.directoryBytes);
  }

  private tableEntryHit(table: Uint8Array, mask: bigint, hitAt: (at: number) => OverlapHit | null): OverlapHit | null {
    for (let i = 0; i < table.length / L1_ENTRY_BYTES; i++) {
      const at = readTableEntry(table, i) & mask;
      const found = at ? hitAt(Number(at)) : null;
      if (found !== null) return found;
    }
    return null;
  }
}

/**
 * QEMU's ranges_overlap, including how it reads an empty range: [f, f - 1]
 * in uint64, so an empty range at 0 covers everything.
 */
function rangesOverlap(first1: number, length1: number, first2: number, length2: number): boolean {
  const last = (first: number, length: number) => (length === 0 && first === 0 ? Infinity : first + length - 1);
  return !(last(first2, length2) < first1 || last(first1, length1) < first2);
}

/**
 * The refcounts on disk (qcow2_get_refcount, and update_refcount's access
 * to the blocks), through a write-back cache of refcount blocks the size
 * and policy of QEMU's default refcount cache (4 blocks, least recently
 * used evicted, written back when evicted, flushed or emptied, each write
 * after the overlap check QEMU's cache makes: refcount blocks aside, it
 * must not hit metadata). Write-back matters: when a fatal corruption
 * makes QEMU's node unusable, the blocks still in its cache are never
 * written, and the file shows it. Reads fail with EIO (after signalling
 * corruption) for an unaligned refcount block offset.
 */
export class OnDiskRefcounts {
  /** Blocks by file offset, least recently used first. */
  private readonly cache = new Map<number, { block: Uint8Array; dirty: boolean }>();

  constructor(private readonly s: CheckState) {}

  /** qcow2_cache_flush without the file flush: writes the dirty blocks back. */
  async flush(): Promise<void> {
    for (const [offset, entry] of this.cache) {
      if (!entry.dirty) continue;
      await this.writeBack(offset, entry.block);
      entry.dirty = false;
    }
  }

  /** qcow2_cache_empty: flush, then forget every block (a failed flush is ignored, as the rebuild does). */
  async empty(): Promise<void> {
    await this.flush().catch(() => undefined);
    this.cache.clear();
  }

  /** Forgets the cached blocks without writing them (the refcount table was replaced). */
  forget(): void {
    this.cache.clear();
  }

  /**
   * The refcount block holding `cluster`'s refcount and the index in it;
   * null when the cluster has no refcount block (refcount 0).
   */
  async locate(cluster: number): Promise<{ block: Uint8Array; index: number; offset: number } | null> {
    const g = this.s.geometry;
    const reftableIndex = g.reftableIndex(cluster);
    if (reftableIndex >= this.s.reftableEntries) return null;
    const offset = this.s.reftableEntry(reftableIndex) & EntryMask.REFT_OFFSET;
    if (offset === 0n) return null;
    if (offset % BigInt(g.clusterBytes) !== 0n) {
      await this.s.signalCorruption(`Refblock offset ${hex(offset)} unaligned (reftable index: ${hex(reftableIndex)})`);
      throw new BlockError('EIO');
    }
    const at = Number(offset);
    return { block: await this.block(at), index: g.refblockIndex(cluster), offset: at };
  }

  /** The refcount block at file offset `at` (qcow2_cache_get). */
  async block(at: number): Promise<Uint8Array> {
    let entry = this.cache.get(at);
    if (entry !== undefined) {
      this.cache.delete(at);
    } else {
      entry = { block: new Uint8Array(this.s.geometry.clusterBytes), dirty: false };
      await this.makeRoom();
      await readAt(this.s.file, at, entry.block);
    }
    this.cache.set(at, entry);
    return entry.block;
  }

  /** A new, zeroed refcount block at file offset `at`, dirty (qcow2_cache_get_empty and a memset). */
  async create(at: number): Promise<Uint8Array> {
    if (!this.cache.delete(at)) await this.makeRoom();
    const entry = { block: new Uint8Array(this.s.geometry.clusterBytes), dirty: true };
    this.cache.set(at, entry);
    return entry.block;
  }

  markDirty(at: number): void {
    const entry = this.cache.get(at);
    if (entry !== undefined) entry.dirty = true;
  }

  /** Evicts the least recently used block when the cache is full, writing it back if dirty. */
  private async makeRoom(): Promise<void> {
    if (this.cache.size < REFBLOCK_CACHE_ENTRIES) return;
    const [oldest, victim] = this.cache.entries().next().value!;
    if (victim.dirty) await this.writeBack(oldest, victim.block);
    this.cache.delete(oldest);
  }

  private async writeBack(at: number, block: Uint8Array): Promise<void> {
    await this.s.preWriteOverlapCheck(OverlapCheck.REFCOUNT_BLOCK, at, block.length);
    await this.s.file.write(at, block);
  }

  /** The refcount of `cluster` on disk (64-bit refcounts keep every bit). */
  async get(cluster: number): Promise<bigint> {
    const at = await this.locate(cluster);
    return at === null ? 0n : refcountAt(at.block, at.index, this.s.geometry.refcountOrder);
  }

  /** Sets the refcount of `cluster` in its cached block; false when it has no refcount block. */
  async set(cluster: number, value: number): Promise<boolean> {
    const at = await this.locate(cluster);
    if (at === null) return false;
    const reason = setRefcount(at.block, at.index, this.s.geometry.refcountOrder, value);
    if (reason !== null) throw new BlockError('ERANGE', reason);
    this.markDirty(at.offset);
    return true;
  }
}

/** Refcount `index` of a refcount block of 2^order-bit entries, as a 64-bit value. */
export function refcountAt(block: Uint8Array, index: number, order: number): bigint {
  const view = new DataView(block.buffer, block.byteOffset, block.byteLength);
  if (order === 4) return BigInt(view.getUint16(index * 2));
  if (order === 5) return BigInt(view.getUint32(index * 4));
  if (order === 6) return view.getBigUint64(index * 8);
  const bits = 2 ** order;
  const perByte = 8 / bits;
  return BigInt((block[Math.floor(index / perByte)]! >> ((index % perByte) * bits)) & (2 ** bits - 1));
}

/**
 * Refcounts of clusters visited mostly in order: the refcount block is
 * looked up (and may fail) once per run of clusters it covers.
 */
export class RefcountScanner {
  private reftableIndex = -1;
  private at: { block: Uint8Array; index: number } | null | BlockError = null;

  constructor(private readonly s: CheckState) {}

  /** The refcount of `cluster` on disk, or the error reading it (after signalling corruption). */
  async get(cluster: number): Promise<bigint | BlockError> {
    const g = this.s.geometry;
    const reftableIndex = g.reftableIndex(cluster);
    if (reftableIndex !== this.reftableIndex) {
      this.reftableIndex = reftableIndex;
      try {
        this.at = await this.s.refcounts.locate(cluster);
      } catch (e) {
        if (!(e instanceof BlockError)) throw e;
        this.at = e;
      }
    }
    if (this.at instanceof BlockError) return this.at;
    return this.at === null ? 0n : refcountAt(this.at.block, g.refblockIndex(cluster), g.refcountOrder);
  }
}
