/*
 * Metadata caches (QEMU's qcow2-cache.c): a bounded LRU cache of whole
 * clusters, one for L2 tables and one for refcount blocks.
 *
 * Entries are kept in a Map in least-recently-used order (a hit moves the
 * entry to the end), so lookup, touch and eviction are O(1). A cache never
 * holds more than `capacity` entries unless every entry is pinned (entries
 * in use by the lock holder are pinned between `get` and `release`; there
 * are at most a handful), so memory stays bounded whatever the image size.
 *
 * Writeback, never write-through: `markDirty` only flags an entry; dirty
 * entries reach the file when they are evicted, on `writeDirty` (flush to
 * the OS) and on `flush` (which also flushes the file). Ordering between the
 * caches follows QEMU:
 *   - `dependency`: before this cache writes any entry, the other cache is
 *     flushed (written and the file datasync'd). An L2 table referring to
 *     newly allocated clusters depends on the refcount cache, so refcounts
 *     are on disk before the reference; refcount blocks with decremented
 *     counts depend on the L2 cache, so a reference is gone before its
 *     cluster can be reused;
 *   - `dependsOnFlush`: before writing any entry, flush the file (guest data
 *     and copy-on-write data must be on disk before the L2 entry that points
 *     at them).
 * `setDependency` breaks chains as QEMU's qcow2_cache_set_dependency does,
 * so the two caches never wait on each other.
 *
 * All methods but `peek` must be called with the image lock held. `peek`
 * is synchronous and safe without it.
 */
import { BlockError } from '../../block/errors.js';

export interface CacheEntry {
  readonly offset: number;
  readonly data: Uint8Array;
  readonly view: DataView;
  dirty: boolean;
  /** Holders between get/getEmpty and release; pinned entries are never evicted. */
  pins: number;
}

/** What a cache needs from the image: I/O on the image file. */
export interface CacheIo {
  read(offsetBytes: number, buf: Uint8Array): Promise<void>;
  /** Writes an entry back (the caller's overlap check included). */
  write(entry: CacheEntry): Promise<void>;
  flushFile(): Promise<void>;
}

export class MetadataCache {
  private readonly entries = new Map<number, CacheEntry>();
  /** The cache that must be flushed before this one writes anything. */
  private dependency: MetadataCache | null = null;
  /** Flush the file before writing anything. */
  dependsOnFlush = false;

  constructor(
    readonly name: string,
    readonly capacity: number,
    readonly entryBytes: number,
    private readonly io: CacheIo,
  ) {
    if (!(capacity >= 1)) throw new RangeError(`MetadataCache: capacity ${capacity}`);
  }

  get size(): number {
    return this.entries.size;
  }

  /** The cached entry at `offset`, touched, or undefined (synchronous; no pin). */
  peek(offsetBytes: number): CacheEntry | undefined {
    const entry = this.entries.get(offsetBytes);
    if (entry && this.entries.size > 1) {
      this.entries.delete(offsetBytes);
      this.entries.set(offsetBytes, entry);
    }
    return entry;
  }

  /** The entry at `offset`, read from the file on a miss; pinned until `release`. */
  async get(offsetBytes: number): Promise<CacheEntry> {
    let entry = this.peek(offsetBytes);
    if (!entry) {
      await this.makeRoom();
      const data = new Uint8Array(this.entryBytes);
      await this.io.read(offsetBytes, data);
      entry = this.entries.get(offsetBytes) ?? this.insert(offsetBytes, data);
    }
    entry.pins++;
    return entry;
  }

  /** A zeroed entry for a new table at `offset`, not read from disk; pinned until `release`. */
  async getEmpty(offsetBytes: number): Promise<CacheEntry> {
    const old = this.entries.get(offsetBytes);
    if (old) {
      if (old.pins > 0) throw new BlockError('EIO', `qcow2 ${this.name} cache: table at ${offsetBytes} reused while in use`);
      this.entries.delete(offsetBytes);
    } else {
      await this.makeRoom();
    }
    const entry = this.insert(offsetBytes, new Uint8Array(this.entryBytes));
    entry.pins++;
    return entry;
  }

  release(entry: CacheEntry): void {
    entry.pins--;
  }

  markDirty(entry: CacheEntry): void {
    entry.dirty = true;
  }

  /** Forgets the table at `offset` without writing it (its cluster was freed). */
  discard(offsetBytes: number): void {
    const entry = this.entries.get(offsetBytes);
    if (entry && entry.pins === 0) this.entries.delete(offsetBytes);
    else if (entry) entry.dirty = false;
  }

  /** Whether any entry awaits writeback. */
  hasDirty(): boolean {
    for (const e of this.entries.values()) if (e.dirty) return true;
    return false;
  }

  /** Writes every dirty entry (qcow2_cache_write), in offset order. */
  async writeDirty(): Promise<void> {
    const dirty = [...this.entries.values()].filter((e) => e.dirty).sort((a, b) => a.offset - b.offset);
    for (const entry of dirty) await this.writeEntry(entry);
  }

  /** Writes every dirty entry, then flushes the file (qcow2_cache_flush). */
  async flush(): Promise<void> {
    await this.writeDirty();
    await this.io.flushFile();
  }

  /** Drops every entry; dirty ones are written first. */
  async empty(): Promise<void> {
    await this.flush();
    this.entries.clear();
  }

  /** Orders this cache's writes after `dependency`'s (qcow2_cache_set_dependency). */
  async setDependency(dependency: MetadataCache): Promise<void> {
    if (dependency.dependency) await dependency.flushDependency();
    if (this.dependency && this.dependency !== dependency) await this.flushDependency();
    this.dependency = dependency;
  }

  private async flushDependency(): Promise<void> {
    const dependency = this.dependency;
    if (!dependency) return;
    await dependency.flush();
    this.dependency = null;
    this.dependsOnFlush = false;
  }

  private async writeEntry(entry: CacheEntry): Promise<void> {
    if (!entry.dirty) return;
    if (this.dependency) {
      await this.flushDependency();
    } else if (this.dependsOnFlush) {
      await this.io.flushFile();
      this.dependsOnFlush = false;
    }
    if (!entry.dirty) return;
    await this.io.write(entry);
    entry.dirty = false;
  }

  private insert(offsetBytes: number, data: Uint8Array): CacheEntry {
    const entry: CacheEntry = { offset: offsetBytes, data, view: new DataView(data.buffer, data.byteOffset, data.byteLength), dirty: false, pins: 0 };
    this.entries.set(offsetBytes, entry);
    return entry;
  }

  /** Evicts least recently used unpinned entries until one more fits (writing dirty ones back). */
  private async makeRoom(): Promise<void> {
    while (this.entries.size >= this.capacity) {
      const victim = this.leastRecentlyUsed();
      if (!victim) return;
      await this.writeEntry(victim);
      if (victim.pins === 0 && !victim.dirty && this.entries.get(victim.offset) === victim) this.entries.delete(victim.offset);
    }
  }

  private leastRecentlyUsed(): CacheEntry | undefined {
    for (const entry of this.entries.values()) if (entry.pins === 0) return entry;
    return undefined;
  }
}
