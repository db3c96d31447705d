/*
 * The qcow2 driver's parts and behaviour, without peer tools: the metadata
 * cache (LRU, writeback, dependencies), the image lock, refcount codecs of
 * every width, option resolution, create options, inflation of compressed
 * clusters, overlap checks, and the driver end to end on images made by our
 * own create (QEMU's zero/discard rules seen through block status, partial
 * clusters, v2 images, lazy refcounts and the dirty bit, concurrent writes,
 * backing loops). The same behaviours against qemu-img/qemu-io are in
 * test/interop/qcow2-interop.test.ts.
 */
import fs from 'node:fs';
import path from 'node:path';
import zlib from 'node:zlib';
import { describe, expect, it } from 'vitest';
import { BlockBackend } from '../../block/backend.js';
import { createImage } from '../../block/create.js';
import { Req, Status } from '../../block/flags.js';
import { blockStatus } from '../../block/status.js';
import { MetadataCache, type CacheEntry } from '../../drivers/qcow2/cache.js';
import { inflateCluster } from '../../drivers/qcow2/cow.js';
import { initialImage, parseCreateSpec } from '../../drivers/qcow2/create.js';
import { Incompat, QCOW2_MAGIC } from '../../drivers/qcow2/format.js';
import { decodeHeaderCluster } from '../../drivers/qcow2/header.js';
import { ImageLock } from '../../drivers/qcow2/lock.js';
import { resolveOptions, optionsSchema } from '../../drivers/qcow2/options.js';
import { OverlapCheck, metadataOverlap } from '../../drivers/qcow2/overlap.js';
import { refcountCodec } from '../../drivers/qcow2/refcount.js';
import { refcountMetadataSize } from '../../drivers/qcow2/refcount-grow.js';
import { stateOf } from '../../drivers/qcow2/state.js';
import { getRefcount, setRefcount } from '../../drivers/qcow2/tables.js';
import { testGraph } from '../helpers/graphs.js';
import { pattern } from '../helpers/mem-driver.js';
import { scratchDir } from '../helpers/tmp.js';

const KiB = 1024;
const MiB = 1024 * KiB;

describe('MetadataCache', () => {
  function cache(capacity: number, log: string[], name = 'c') {
    return new MetadataCache(name, capacity, 8, {
      read: async (offset, buf) => {
        log.push(`${name} read ${offset}`);
        buf.fill(offset & 0xff);
      },
      write: async (entry: CacheEntry) => void log.push(`${name} write ${entry.offset}`),
      flushFile: async () => void log.push(`${name} flush`),
    });
  }

  it('is an LRU of bounded size: hits touch, misses evict the least recently used, dirty entries are written first', async () => {
    const log: string[] = [];
    const c = cache(2, log);
    for (const offset of [8, 16]) c.release(await c.get(offset));
    const e8 = await c.get(8);
    c.markDirty(e8);
    c.release(e8);
    c.release(await c.get(24));
    expect(c.size).toBe(2);
    expect(c.peek(16)).toBeUndefined();
    c.release(await c.get(32));
    expect(log).toEqual(['c read 8', 'c read 16', 'c read 24', 'c write 8', 'c read 32']);
  });

  it('never evicts a pinned entry; discard drops a table without writing it', async () => {
    const log: string[] = [];
    const c = cache(1, log);
    const pinned = await c.get(8);
    c.markDirty(pinned);
    const other = await c.get(16);
    expect(c.size).toBe(2);
    c.release(pinned);
    c.release(other);
    c.discard(8);
    await c.flush();
    expect(log).toEqual(['c read 8', 'c read 16', 'c flush']);
  });

  it('flushes its dependency (and the file) before writing, and the file first when dependsOnFlush', async () => {
    const log: string[] = [];
    const l2 = cache(4, log, 'l2');
    const refcount = cache(4, log, 'rc');
    const r = await refcount.get(8);
    refcount.markDirty(r);
    refcount.release(r);
    const t = await l2.get(64);
    l2.markDirty(t);
    l2.release(t);
    await l2.setDependency(refcount);
    await l2.writeDirty();
    expect(log.slice(2)).toEqual(['rc write 8', 'rc flush', 'l2 write 64']);
    log.length = 0;
    l2.markDirty(t);
    l2.dependsOnFlush = true;
    await l2.writeDirty();
    expect(log).toEqual(['l2 flush', 'l2 write 64']);
  });

  it('breaks dependency chains as qcow2_cache_set_dependency does', async () => {
    const log: string[] = [];
    const l2 = cache(4, log, 'l2');
    const refcount = cache(4, log, 'rc');
    await l2.setDependency(refcount);
    await refcount.setDependency(l2);
    expect(log).toEqual(['rc flush']);
  });
});

describe('ImageLock', () => {
  it('serves holders one at a time in arrival order and releases on exceptions', async () => {
    const lock = new ImageLock();
    const order: string[] = [];
    const hold = (name: string, fail = false) =>
      lock.run(async () => {
        order.push(`${name} in`);
        await new Promise((r) => setTimeout(r, 5));
        order.push(`${name} out`);
        if (fail) throw new Error(name);
      });
    const results = await Promise.allSettled([hold('a'), hold('b', true), hold('c')]);
    expect(order).toEqual(['a in', 'a out', 'b in', 'b out', 'c in', 'c out']);
    expect(results.map((r) => r.status)).toEqual(['fulfilled', 'rejected', 'fulfilled']);
    expect(lock.locked).toBe(false);
  });
});

describe('refcount codecs', () => {
  it.each([0, 1, 2, 3, 4, 5, 6])('order %i reads and writes like tables.ts, entries independent', (order) => {
    const codec = refcountCodec(order);
    const block = new Uint8Array(64);
    const view = new DataView(block.buffer);
    const entries = (64 * 8) / 2 ** order;
    const value = (i: number) => (i * 2654435761) % (codec.max + 1);
    for (let i = 0; i < entries; i++) codec.set(view, i, value(i));
    for (let i = 0; i < entries; i++) expect(getRefcount(block, i, order)).toBe(value(i));
    setRefcount(block, entries - 1, order, codec.max);
    expect(codec.get(view, entries - 1)).toBe(codec.max);
    expect(codec.get(view, entries - 2)).toBe(value(entries - 2));
  });

  it('computes refcount metadata as qcow2_refcount_metadata_size', () => {
    expect(refcountMetadataSize(22, 65536, 4, false)).toEqual({ bytes: 2 * 65536, blocks: 1 });
    expect(refcountMetadataSize(32768, 65536, 4, false)).toEqual({ bytes: 3 * 65536, blocks: 2 });
    const { bytes, blocks } = refcountMetadataSize(1000, 512, 6, false);
    const table = bytes / 512 - blocks;
    expect(blocks * 64).toBeGreaterThanOrEqual(1000 + blocks + table);
    expect(refcountMetadataSize(1000, 512, 6, true).bytes).toBeGreaterThanOrEqual(bytes);
  });
});

describe('options', () => {
  const header = { virtualBytes: 1024 * MiB, compatibleFeatures: 0n, version: 3 } as Parameters<typeof resolveOptions>[1];
  const resolve = (o: Record<string, unknown>, h = header, c = 65536) => resolveOptions(optionsSchema.parse(o), h, c);

  it('defaults: an L2 cache mapping the whole disk (at most 32 MiB), 4 refcount blocks, cached overlap checks', () => {
    expect(resolve({})).toMatchObject({ l2CacheEntries: 2, refcountCacheEntries: 4, lazyRefcounts: false, overlapMask: 0x1ff & ~0x80 });
    expect(resolve({}, { ...header, virtualBytes: 1024 ** 4 }).l2CacheEntries).toBe(512);
    expect(resolve({ 'l2-cache-size': 1, 'refcount-cache-size': 1 })).toMatchObject({ l2CacheEntries: 2, refcountCacheEntries: 4 });
    expect(resolve({ 'cache-size': '1M' }, { ...header, virtualBytes: 1024 ** 4 })).toMatchObject({ l2CacheEntries: 12, refcountCacheEntries: 4 });
  });

  it('overlap-check templates and single keys; QEMU\'s messages for bad values', () => {
    expect(resolve({ 'overlap-check': 'none' }).overlapMask).toBe(0);
    expect(resolve({ 'overlap-check': { template: 'all', 'main-header': 'off' } }).overlapMask).toBe(0x1ff & ~OverlapCheck.MAIN_HEADER);
    expect(() => resolve({ 'overlap-check': 'some' })).toThrow(
      "Unsupported value 'some' for qcow2 option 'overlap-check'. Allowed are any of the following: none, constant, cached, all",
    );
    expect(() => resolve({ 'cache-size': 1, 'l2-cache-size': 1, 'refcount-cache-size': 1 })).toThrow('may not be set at the same time');
    expect(() => resolve({ 'l2-cache-entry-size': 1000 })).toThrow('L2 cache entry size must be a power of two between 512 and the cluster size (65536)');
    expect(() => resolve({ 'lazy-refcounts': true }, { ...header, version: 2 })).toThrow('Lazy refcounts require a qcow2 image with at least qemu 1.1 compatibility level');
  });
});

describe('create options', () => {
  const spec = (opts: Record<string, string>) => parseCreateSpec(new Map(Object.entries(opts)));

  it('defaults and aliases', () => {
    expect(spec({ size: '1000' })).toMatchObject({ sizeBytes: 1024, version: 3, clusterBytes: 65536, refcountBits: 16, prealloc: 'off', lazyRefcounts: false });
    expect(spec({ compat: 'v2' }).version).toBe(2);
    expect(spec({ compat: '1.1' }).version).toBe(3);
  });

  it('checks in qcow2_co_create\'s order', () => {
    expect(() => spec({ compat: '0.10', refcount_bits: '8', lazy_refcounts: 'on' })).toThrow('Lazy refcounts only supported');
    expect(() => spec({ cluster_size: '1000', refcount_bits: '3' })).toThrow('Cluster size must be a power of two between 512 and 2048k');
    expect(() => spec({ backing_fmt: 'raw' })).toThrow('Backing format cannot be used without backing file');
  });

  it('the initial image decodes, counts clusters 0–2, and names the backing file', () => {
    const image = initialImage(spec({ cluster_size: '4096', backing_file: 'b.qcow2', backing_fmt: 'qcow2' }));
    expect(image.length).toBe(3 * 4096);
    const decoded = decodeHeaderCluster(image, image.length);
    if (typeof decoded === 'string') throw new Error(decoded);
    expect(decoded.header).toMatchObject({ magic: QCOW2_MAGIC, refcountTableOffset: 4096, l1Entries: 0, virtualBytes: 0 });
    expect(decoded.backingName).toBe('b.qcow2');
    expect([0, 1, 2, 3].map((i) => getRefcount(image.subarray(8192), i, 4))).toEqual([1, 1, 1, 0]);
  });
});

describe('compressed clusters', () => {
  const cluster = Buffer.alloc(65536, 7);
  const stream = zlib.deflateRawSync(cluster);

  it('inflates exactly one cluster; trailing bytes and a stream cut after the cluster are fine', () => {
    expect(Buffer.from(inflateCluster(stream, 65536)).equals(cluster)).toBe(true);
    expect(Buffer.from(inflateCluster(Buffer.concat([stream, Buffer.alloc(300, 0xaa)]), 65536)).equals(cluster)).toBe(true);
  });

  it('is EIO for garbage, short output and oversized output', () => {
    expect(() => inflateCluster(Buffer.alloc(100, 0xff), 65536)).toThrow(expect.objectContaining({ code: 'EIO' }));
    expect(() => inflateCluster(zlib.deflateRawSync(Buffer.alloc(100)), 65536)).toThrow(expect.objectContaining({ code: 'EIO' }));
    expect(() => inflateCluster(zlib.deflateRawSync(Buffer.alloc(2 * 65536)), 65536)).toThrow(expect.objectContaining({ code: 'EIO' }));
  });
});

describe('the driver on images made by our create', () => {
  const dir = scratchDir('qbt-qcow2-unit-');
  let n = 0;

  async function fresh(options: Array<[string, string]> = [], sizeBytes = 4 * MiB, backing?: { file: string; format: string }) {
    const filename = path.join(dir, `img-${n++}.qcow2`);
    const graph = testGraph();
    await createImage(graph, { format: 'qcow2', filename, sizeBytes, options, backingFile: backing?.file, backingFormat: backing?.format });
    return filename;
  }

  async function open(filename: string, options: Record<string, unknown> = {}) {
    const graph = testGraph();
    const node = await graph.openImage(filename, { format: 'qcow2', options: { discard: 'unmap', ...options } });
    return { graph, node, blk: new BlockBackend(graph, node, { writable: true }) };
  }

  it('reads back what it wrote, across reopen, unaligned and spanning clusters', async () => {
    for (const cluster of ['512', '4096', '65536']) {
      const filename = await fresh([['cluster_size', cluster]]);
      const expected = Buffer.alloc(4 * MiB);
      let { blk } = await open(filename);
      for (const [offset, bytes, seed] of [[1, 1], [511, 2], [60000, 200000], [MiB - 3, 7], [4 * MiB - 4096, 4096]].map(([o, b], i) => [o!, b!, i])) {
        const data = pattern(bytes, seed);
        await blk.pwrite(offset, data);
        expected.set(data, offset);
      }
      await blk.close();
      ({ blk } = await open(filename));
      const buf = Buffer.alloc(4 * MiB);
      await blk.pread(0, buf);
      expect(buf.equals(expected), cluster).toBe(true);
    }
  });

  it('zero and discard follow QEMU: zero-plain, zero-alloc (keeps the offset), MAY_UNMAP frees, discard -> zero cluster', async () => {
    const { node, blk } = await open(await fresh());
    const status = async (offset: number) => (await blockStatus(node, offset, 65536)).status & ~Status.EOF;
    await blk.pwrite(0, Buffer.alloc(256 * KiB, 1));
    await blk.pwriteZeroes(0, 64 * KiB, 0);
    await blk.pwriteZeroes(64 * KiB, 64 * KiB, Req.MAY_UNMAP);
    await blk.pdiscard(128 * KiB, 64 * KiB);
    await blk.pwriteZeroes(MiB, 64 * KiB, 0);
    expect(await status(0)).toBe(Status.ZERO | Status.OFFSET_VALID | Status.ALLOCATED);
    expect(await status(64 * KiB)).toBe(Status.ZERO | Status.ALLOCATED);
    expect(await status(128 * KiB)).toBe(Status.ZERO | Status.ALLOCATED);
    expect(await status(192 * KiB)).toBe(Status.DATA | Status.OFFSET_VALID | Status.ALLOCATED);
    expect(await status(MiB)).toBe(Status.ZERO | Status.ALLOCATED);
    expect(await status(2 * MiB)).toBe(Status.ZERO);
  });

  it('partial-cluster zeroes: a zero cluster when the rest reads as zero, else written zeroes; NO_FALLBACK says ENOTSUP', async () => {
    const { node, blk } = await open(await fresh());
    await blk.pwriteZeroes(4096, 8192, 0);
    expect((await blockStatus(node, 0, 65536)).status & Status.ZERO).toBeTruthy();
    await blk.pwrite(65536, Buffer.alloc(512, 9));
    await expect(blk.pwriteZeroes(70000, 100, Req.NO_FALLBACK)).rejects.toMatchObject({ code: 'ENOTSUP' });
    await blk.pwriteZeroes(65536, 100, 0);
    const buf = Buffer.alloc(512);
    await blk.pread(65536, buf);
    expect([...buf.subarray(98, 102)]).toEqual([0, 0, 9, 9]);
  });

  it('v2 images: zeroing deallocates without a backing file, and is ENOTSUP (fallback) with one', async () => {
    const base = await fresh([['compat', '0.10']], MiB);
    const { node, blk } = await open(base);
    await blk.pwrite(0, Buffer.alloc(128 * KiB, 3));
    await blk.pwriteZeroes(0, 64 * KiB, 0);
    expect((await blockStatus(node, 0, 65536)).status & ~Status.EOF).toBe(Status.ZERO);
    await blk.close();
    const overlay = await fresh([['compat', '0.10']], MiB, { file: path.basename(base), format: 'qcow2' });
    const o = await open(overlay);
    await expect(o.blk.pwriteZeroes(64 * KiB, 64 * KiB, Req.NO_FALLBACK)).rejects.toMatchObject({ code: 'ENOTSUP' });
    await o.blk.pwriteZeroes(64 * KiB, 64 * KiB, 0);
    const buf = Buffer.alloc(64 * KiB, 1);
    await o.blk.pread(64 * KiB, buf);
    expect(buf.equals(Buffer.alloc(64 * KiB))).toBe(true);
  });

  it('lazy refcounts: the dirty bit is set before the first allocation and cleared on close', async () => {
    const filename = await fresh([['lazy_refcounts', 'on']]);
    const incompatible = () => fs.readFileSync(filename).readBigUInt64BE(72);
    const { node, blk } = await open(filename);
    await blk.pwrite(0, Buffer.alloc(4096, 1));
    expect(incompatible() & Incompat.DIRTY).toBe(Incompat.DIRTY);
    expect(node.driver.getInfo(node)).toMatchObject({ isDirty: true, clusterBytes: 65536 });
    await blk.close();
    expect(incompatible()).toBe(0n);
  });

  it('metadata overlap: header, L1, L2, refcount table and blocks are found; free space is not', async () => {
    const { node, blk } = await open(await fresh());
    await blk.pwrite(0, Buffer.alloc(512, 1));
    const s = stateOf(node);
    const all = 0x1ff;
    const h = s.image.header;
    expect(metadataOverlap(s, all, 100, 10)).toBe(OverlapCheck.MAIN_HEADER);
    expect(metadataOverlap(s, all, h.l1TableOffset, 8)).toBe(OverlapCheck.ACTIVE_L1);
    expect(metadataOverlap(s, all, [...s.l2Tables][0]! + 100, 8)).toBe(OverlapCheck.ACTIVE_L2);
    expect(metadataOverlap(s, all, h.refcountTableOffset, 8)).toBe(OverlapCheck.REFCOUNT_TABLE);
    expect(metadataOverlap(s, all, s.reftable[0]!, 8)).toBe(OverlapCheck.REFCOUNT_BLOCK);
    expect(metadataOverlap(s, all, 100 * MiB, MiB)).toBe(0);
    expect(metadataOverlap(s, 0, 100, 10)).toBe(0);
  });

  it('many writes in flight to shared, unallocated clusters land exactly once', async () => {
    const filename = await fresh([['cluster_size', '4096']], MiB);
    const { blk } = await open(filename);
    const expected = Buffer.alloc(MiB);
    const writes = Array.from({ length: 300 }, (_, i) => {
      const offset = i * 3000 + (i % 7);
      const data = pattern(2500, i);
      expected.set(data, offset);
      return blk.pwrite(offset, data);
    });
    const zeroes = Array.from({ length: 20 }, (_, i) => blk.pwriteZeroes(920 * KiB + i * 4096, 4096, i % 2 ? Req.MAY_UNMAP : 0));
    await Promise.all([...writes, ...zeroes]);
    expected.fill(0, 920 * KiB, 920 * KiB + 20 * 4096);
    const buf = Buffer.alloc(MiB);
    await blk.pread(0, buf);
    expect(buf.equals(expected)).toBe(true);
  });

  it('refuses a backing file that is the image itself', async () => {
    const filename = await fresh();
    const image = fs.readFileSync(filename);
    const cluster0 = decodeHeaderCluster(image.subarray(0, 65536), image.length);
    if (typeof cluster0 === 'string') throw new Error(cluster0);
    const graph = testGraph();
    await createImage(graph, { format: 'qcow2', filename: `${filename}.self`, sizeBytes: MiB, options: [], backingFile: path.basename(`${filename}.self`), backingFormat: 'qcow2', unsafe: true });
    await expect(open(`${filename}.self`)).rejects.toThrow(`Could not open backing file: Backing file '${path.basename(filename)}.self' creates an infinite loop.`);
  });

  it('format-specific info in qemu-img 7.2 key order; v2 has fewer keys', async () => {
    const v3 = await open(await fresh([['lazy_refcounts', 'on'], ['refcount_bits', '32']]));
    expect(v3.node.driver.getSpecificInfo(v3.node)).toEqual({
      type: 'qcow2',
      data: { compat: '1.1', 'compression-type': 'zlib', 'lazy-refcounts': true, 'refcount-bits': 32, corrupt: false, 'extended-l2': false },
    });
    const v2 = await open(await fresh([['compat', '0.10']]));
    expect(Object.keys(v2.node.driver.getSpecificInfo(v2.node)!.data)).toEqual(['compat', 'compression-type', 'refcount-bits']);
  });
});
