/*
 * Compressed writes of the qcow2 driver (drivers/qcow2/compress-write.ts)
 * and the gate's WRITE_COMPRESSED path, without peer tools: round trips,
 * packing of consecutive compressed clusters into shared host clusters
 * (refcount = clusters inside), spills into the next host cluster, the
 * fallback to a normal cluster for incompressible data, QEMU's refusals
 * (EINVAL, EIO, ENOTSUP), the partial last cluster, the end-of-stream
 * padding, freeing, refcount limits, requests across L2 tables and
 * refcount block growth, write ordering on the file, concurrency. Every
 * image is checked with our qcow2 check afterwards. The same against
 * qemu-img/qemu-io is test/interop/qcow2-compress.test.ts.
 */
import crypto from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import zlib from 'node:zlib';
import { describe, expect, it } from 'vitest';
import { BlockError } from '../../block/errors.js';
import { BlockBackend } from '../../block/backend.js';
import { Req } from '../../block/flags.js';
import { builtinDrivers } from '../../drivers/index.js';
import { checkImage } from '../../drivers/qcow2/check.js';
import type { CheckFile } from '../../drivers/qcow2/check-io.js';
import { allocBytes, deflateCluster } from '../../drivers/qcow2/compress-write.js';
import { Qcow2Geometry } from '../../drivers/qcow2/format.js';
import { getRefcount } from '../../drivers/qcow2/refcount.js';
import { stateOf } from '../../drivers/qcow2/state.js';
import { createImage, openImage, type Image } from '../../image.js';
import { testGraph } from '../helpers/graphs.js';
import { traceFilter, type TraceEntry } from '../helpers/trace-filter.js';
import { scratchDir } from '../helpers/tmp.js';

const KiB = 1024;
const MiB = 1024 * KiB;
const C64 = 64 * KiB;

/** A cluster that deflates to a few hundred bytes (different per seed). */
function compressible(bytes: number, seed: number): Buffer {
  const b = Buffer.alloc(bytes);
  for (let i = 0; i < bytes; i++) b[i] = (seed * 7 + Math.floor(i / 97)) & 0xff;
  return b;
}

/** `randomBytes` random bytes, then zeroes: deflates to a little more than `randomBytes`. */
function partlyRandom(bytes: number, randomBytes: number): Buffer {
  const b = Buffer.alloc(bytes);
  crypto.randomFillSync(b.subarray(0, randomBytes));
  return b;
}

/** The compressed size the driver will store for `data` (padded to a cluster). */
async function deflatedBytes(data: Uint8Array, clusterBytes: number): Promise<number> {
  const input = Buffer.alloc(clusterBytes);
  input.set(data);
  return (await deflateCluster(input, false))!.length;
}

/** A read-only CheckFile over a file's current bytes. */
function fileSnapshot(filename: string): CheckFile {
  const bytes = fs.readFileSync(filename);
  const refuse = async () => {
    throw new BlockError('EPERM');
  };
  return {
    lengthBytes: Math.ceil(bytes.length / 512) * 512,
    writable: false,
    read: async (offset, buf) => {
      buf.fill(0);
      buf.set(bytes.subarray(offset, offset + buf.length));
    },
    write: refuse,
    grow: refuse,
    discard: async () => undefined,
    flush: async () => undefined,
  };
}

/** Our qcow2 check of a closed image: the counters, with the check's lines when it is not clean. */
async function check(filename: string) {
  const lines: string[] = [];
  const outcome = await checkImage(fileSnapshot(filename), {}, (l) => lines.push(l));
  if (typeof outcome === 'string') throw new Error(outcome);
  const r = outcome.result;
  return { corruptions: r.corruptions, leaks: r.leaks, checkErrors: r.checkErrors, compressed: r.bfi.compressedClusters, lines };
}

async function expectClean(filename: string, compressedClusters?: number) {
  const r = await check(filename);
  expect({ ...r, lines: r.corruptions + r.leaks + r.checkErrors ? r.lines : [] }).toMatchObject({ corruptions: 0, leaks: 0, checkErrors: 0, lines: [] });
  if (compressedClusters !== undefined) expect(r.compressed).toBe(compressedClusters);
}

/** A compressed L2 entry decoded from the file (guest cluster `index` of the first L2 table). */
interface RawEntry {
  compressed: boolean;
  copied: boolean;
  hostOffset: number;
  /** Compressed: additional sectors. */
  extraSectors: number;
}

function l2Entry(filename: string, guestOffset: number): RawEntry {
  const f = fs.readFileSync(filename);
  const clusterBits = f.readUInt32BE(20);
  const g = new Qcow2Geometry(clusterBits, f.readUInt32BE(96));
  const l1 = Number(f.readBigUInt64BE(40));
  const l2 = Number(f.readBigUInt64BE(l1 + g.l1Index(guestOffset) * 8) & 0x00fffffffffffe00n);
  if (l2 === 0) return { compressed: false, copied: false, hostOffset: 0, extraSectors: 0 };
  const e = f.readBigUInt64BE(l2 + g.l2Index(guestOffset) * 8);
  const compressed = (e & (1n << 62n)) !== 0n;
  if (!compressed) return { compressed, copied: (e >> 63n) === 1n, hostOffset: Number(e & 0x00fffffffffffe00n), extraSectors: 0 };
  const extent = g.compressedExtent(e & ((1n << 62n) - 1n));
  return { compressed, copied: false, hostOffset: extent.hostOffset, extraSectors: extent.sectors - 1 };
}

describe('compressed writes to qcow2', () => {
  const dir = scratchDir('qbt-qcow2-compress-');
  let n = 0;

  async function fresh(sizeBytes = 4 * MiB, options: Record<string, string> = {}): Promise<string> {
    const filename = path.join(dir, `c-${n++}.qcow2`);
    await createImage(filename, { format: 'qcow2', sizeBytes, options });
    return filename;
  }

  async function refcountOf(img: Image, hostOffset: number): Promise<number> {
    const s = stateOf(img.node);
    return s.lock.run(() => getRefcount(s, Math.floor(hostOffset / s.clusterBytes)));
  }

  it('round trip: clusters written compressed read back, also after reopen; block status says data without an offset', async () => {
    const filename = await fresh();
    const data = Buffer.concat([compressible(C64, 1), compressible(C64, 2), compressible(C64, 3)]);
    let img = await openImage(filename, { format: 'qcow2' });
    await img.write(2 * C64, data, { compressed: true });
    expect(Buffer.from(await img.read(2 * C64, data.length)).equals(data)).toBe(true);
    for (const i of [2, 3, 4]) {
      const status = await img.status(i * C64, data.length);
      expect(status).toMatchObject({ data: true, zero: false, allocated: true, length: C64 });
      expect(status.hostOffset).toBeUndefined();
    }
    await img.close();
    img = await openImage(filename, { format: 'qcow2' });
    expect(Buffer.from(await img.read(0, 6 * C64)).equals(Buffer.concat([Buffer.alloc(2 * C64), data, Buffer.alloc(C64)]))).toBe(true);
    await img.close();
    for (const i of [2, 3, 4]) expect(l2Entry(filename, i * C64).compressed).toBe(true);
    await expectClean(filename, 3);
  });

  it('packs consecutive compressed clusters into one host cluster, whose refcount is the number of clusters in it', async () => {
    const filename = await fresh();
    const img = await openImage(filename, { format: 'qcow2' });
    const clusters = Array.from({ length: 8 }, (_, i) => compressible(C64, 10 + i));
    for (const [i, d] of clusters.entries()) await img.write(i * C64, d, { compressed: true });
    await img.flush();
    const first = l2Entry(filename, 0).hostOffset;
    let expected = first;
    for (const [i, d] of clusters.entries()) {
      const e = l2Entry(filename, i * C64);
      expect(e).toMatchObject({ compressed: true, hostOffset: expected });
      const bytes = await deflatedBytes(d, C64);
      expect(e.extraSectors).toBe(Math.floor((expected + bytes - 1) / 512) - Math.floor(expected / 512));
      expected += bytes;
    }
    expect(Math.floor((expected - 1) / C64)).toBe(Math.floor(first / C64));
    expect(await refcountOf(img, first)).toBe(8);
    await img.close();
    expect(fs.statSync(filename).size).toBe(expected);
    await expectClean(filename, 8);
  });

  it('a chunk that does not fit spills into the next host cluster when that one is free and contiguous', async () => {
    const filename = await fresh();
    const img = await openImage(filename, { format: 'qcow2' });
    const parts = [partlyRandom(C64, 40 * KiB), partlyRandom(C64, 40 * KiB), partlyRandom(C64, 20 * KiB)];
    for (const [i, d] of parts.entries()) await img.write(i * C64, d, { compressed: true });
    await img.flush();
    const [a, b, c] = [0, 1, 2].map((i) => l2Entry(filename, i * C64).hostOffset);
    const aBytes = await deflatedBytes(parts[0]!, C64);
    const bBytes = await deflatedBytes(parts[1]!, C64);
    expect(b).toBe(a! + aBytes);
    expect(c).toBe(b! + bBytes);
    const host = Math.floor(a! / C64) * C64;
    expect(Math.floor((b! + bBytes - 1) / C64) * C64).toBe(host + C64);
    expect([await refcountOf(img, host), await refcountOf(img, host + C64)]).toEqual([2, 2]);
    for (const [i, d] of parts.entries()) expect(Buffer.from(await img.read(i * C64, C64)).equals(d)).toBe(true);
    await img.close();
    await expectClean(filename, 3);
  });

  it('incompressible data is written as a normal cluster (QEMU: output must be smaller than a cluster)', async () => {
    const filename = await fresh();
    const img = await openImage(filename, { format: 'qcow2' });
    const data = crypto.randomBytes(2 * C64);
    await img.write(0, data, { compressed: true });
    expect(Buffer.from(await img.read(0, data.length)).equals(data)).toBe(true);
    const status = await img.status(0, C64);
    expect(status.hostOffset).toBeDefined();
    await img.close();
    expect(l2Entry(filename, 0)).toMatchObject({ compressed: false, copied: true });
    await expectClean(filename, 0);
  });

  it('refuses what QEMU refuses: EINVAL unaligned or partial, EIO over an allocated cluster, ENOTSUP on raw', async () => {
    const filename = await fresh(MiB);
    const img = await openImage(filename, { format: 'qcow2' });
    const d = compressible(C64, 1);
    await expect(img.write(512, d, { compressed: true })).rejects.toMatchObject({ code: 'EINVAL' });
    await expect(img.write(0, d.subarray(0, 4096), { compressed: true })).rejects.toMatchObject({ code: 'EINVAL' });
    await expect(img.write(MiB - C64, Buffer.alloc(2 * C64), { compressed: true })).rejects.toMatchObject({ code: 'EIO' });
    await img.write(0, d, { compressed: true });
    await expect(img.write(0, d, { compressed: true })).rejects.toMatchObject({ code: 'EIO' });
    await img.write(C64, d);
    await expect(img.write(C64, d, { compressed: true })).rejects.toMatchObject({ code: 'EIO' });
    await img.writeZeroes(2 * C64, C64);
    await img.write(2 * C64, d, { compressed: true });
    await img.close();
    expect(l2Entry(filename, 2 * C64).compressed).toBe(true);
    await expectClean(filename, 2);
    const raw = path.join(dir, 'r.raw');
    await createImage(raw, { format: 'raw', sizeBytes: MiB });
    const r = await openImage(raw, { format: 'raw' });
    await expect(r.write(0, d, { compressed: true })).rejects.toMatchObject({ code: 'ENOTSUP' });
    await expect(r.write(0, new Uint8Array(0), { compressed: true })).rejects.toMatchObject({ code: 'ENOTSUP' });
    await r.close();
  });

  it('the last cluster of an image may be partial: it is compressed padded with zeroes', async () => {
    const filename = await fresh(100 * KiB);
    const img = await openImage(filename, { format: 'qcow2' });
    const tail = compressible(36 * KiB, 5);
    await img.write(C64, tail, { compressed: true });
    expect(Buffer.from(await img.read(C64, tail.length)).equals(tail)).toBe(true);
    await img.close();
    expect(l2Entry(filename, C64).compressed).toBe(true);
    await expectClean(filename, 1);
  });

  it('a zero-length compressed write pads the file to whole sectors (the end of a convert -c)', async () => {
    const filename = await fresh();
    const img = await openImage(filename, { format: 'qcow2' });
    await img.write(0, compressible(C64, 1), { compressed: true });
    await img.flush();
    const before = fs.statSync(filename).size;
    expect(before % 512).not.toBe(0);
    await img.write(0, new Uint8Array(0), { compressed: true });
    expect(fs.statSync(filename).size).toBe(Math.ceil(before / 512) * 512);
    await img.close();
    await expectClean(filename, 1);
  });

  it('overwrite and discard drop the references; a freed host cluster is never packed again while reused', async () => {
    const filename = await fresh();
    const img = await openImage(filename, { format: 'qcow2', discard: 'unmap' });
    await img.write(0, compressible(C64, 1), { compressed: true });
    await img.write(C64, compressible(C64, 2), { compressed: true });
    const host = Math.floor(stateOf(img.node).freeByteOffset / C64) * C64;
    expect(await refcountOf(img, host)).toBe(2);
    await img.discard(0, C64);
    expect(await refcountOf(img, host)).toBe(1);
    const normal = crypto.randomBytes(C64);
    await img.write(C64, normal);
    expect(await refcountOf(img, host)).toBe(0);
    const other = crypto.randomBytes(C64);
    await img.write(2 * C64, other);
    await img.write(3 * C64, compressible(C64, 3), { compressed: true });
    expect(Buffer.from(await img.read(C64, 2 * C64)).equals(Buffer.concat([normal, other]))).toBe(true);
    await img.close();
    await expectClean(filename, 1);
  });

  it('refcount_bits=1: a host cluster at the refcount maximum is not packed further', async () => {
    const filename = await fresh(MiB, { refcount_bits: '1' });
    const img = await openImage(filename, { format: 'qcow2' });
    for (const i of [0, 1, 2]) await img.write(i * C64, compressible(C64, i), { compressed: true });
    await img.close();
    const hosts = [0, 1, 2].map((i) => Math.floor(l2Entry(filename, i * C64).hostOffset / C64));
    expect(new Set(hosts).size).toBe(3);
    await expectClean(filename, 3);
  });

  it('512-byte clusters: one request across many L2 tables and new refcount blocks', async () => {
    const filename = await fresh(2 * MiB, { cluster_size: '512' });
    const img = await openImage(filename, { format: 'qcow2' });
    const data = Buffer.alloc(MiB);
    for (let i = 0; i < data.length; i += 512) data.set(i % 3072 === 0 ? crypto.randomBytes(512) : partlyRandom(512, 200), i);
    const refblocksBefore = stateOf(img.node).refblocks.size;
    await img.write(512 * KiB, data, { compressed: true });
    expect(stateOf(img.node).refblocks.size).toBeGreaterThan(refblocksBefore + 2);
    expect(Buffer.from(await img.read(512 * KiB, data.length)).equals(data)).toBe(true);
    await img.close();
    const reopened = await openImage(filename, { format: 'qcow2', readOnly: true });
    expect(Buffer.from(await reopened.read(512 * KiB, data.length)).equals(data)).toBe(true);
    await reopened.close();
    await expectClean(filename);
  });

  it('lazy refcounts: the dirty bit is set before the first compressed L2 entry', async () => {
    const filename = await fresh(MiB, { lazy_refcounts: 'on' });
    const img = await openImage(filename, { format: 'qcow2' });
    await img.write(0, compressible(C64, 1), { compressed: true });
    expect(fs.readFileSync(filename).readBigUInt64BE(72) & 1n).toBe(1n);
    await img.close();
    await expectClean(filename, 1);
  });

  it('crash ordering: data and refcount block reach the file, and a flush, before the L2 table', async () => {
    const filename = await fresh(MiB);
    const log: TraceEntry[] = [];
    const graph = testGraph([...builtinDrivers, traceFilter(log)]);
    const node = await graph.openOptions({ driver: 'qcow2', file: { driver: 'trace', label: 'file', file: { driver: 'file', filename } } });
    const s = stateOf(node);
    const blk = new BlockBackend(graph, node, { writable: true });
    await blk.pwrite(10 * C64, Buffer.alloc(C64, 1));
    await blk.flush();
    log.length = 0;
    await blk.pwrite(0, compressible(C64, 1), Req.WRITE_COMPRESSED);
    await blk.flush();
    const l2Offset = [...s.l2Tables][0]!;
    const host = l2Entry(filename, 0).hostOffset;
    const refblock = s.reftable[0]!;
    const writes = (offset: number) => log.flatMap((e, i) => (e.phase === 'enter' && e.op === 'write' && e.offset === offset ? [i] : []));
    const [data] = writes(host);
    const l2 = writes(l2Offset);
    expect(l2).toHaveLength(1);
    expect(l2[0]).toBeGreaterThan(data!);
    expect(writes(refblock).filter((i) => i > data! && i < l2[0]!)).toHaveLength(1);
    expect(log.slice(data, l2[0]).some((e) => e.op === 'flush')).toBe(true);
    await blk.close();
  });

  it('concurrent compressed writes, reads and a normal write to the same cluster leave a consistent image', async () => {
    const filename = await fresh();
    const img = await openImage(filename, { format: 'qcow2' });
    const clusters = Array.from({ length: 32 }, (_, i) => compressible(C64, i));
    const normal = crypto.randomBytes(C64);
    const results = await Promise.allSettled([
      ...clusters.map((d, i) => img.write(i * C64, d, { compressed: true })),
      img.write(5 * C64, normal),
      img.read(0, 32 * C64),
    ]);
    const fiveCompressed = results[5]!.status === 'fulfilled';
    expect(results.filter((r) => r.status === 'rejected').map((r) => (r as PromiseRejectedResult).reason.code)).toEqual(fiveCompressed ? [] : ['EIO']);
    for (const [i, d] of clusters.entries()) {
      expect(Buffer.from(await img.read(i * C64, C64)).equals(i === 5 ? normal : d), `cluster ${i}`).toBe(true);
    }
    await img.close();
    await expectClean(filename, 31);
  });

  it('detect-zeroes turns an all-zero compressed write into write-zeroes, as QEMU does', async () => {
    const filename = await fresh();
    const img = await openImage(filename, { format: 'qcow2', detectZeroes: 'on' });
    await img.write(0, Buffer.alloc(C64), { compressed: true });
    expect(await img.status(0, C64)).toMatchObject({ zero: true, data: false });
    await img.close();
    await expectClean(filename, 0);
  });

  it('allocBytes packs byte ranges and starts a new host cluster when one is full', async () => {
    const filename = await fresh();
    const img = await openImage(filename, { format: 'qcow2' });
    const s = stateOf(img.node);
    const [a, b] = await s.lock.run(async () => [await allocBytes(s, 1000), await allocBytes(s, 3000)]);
    expect(b).toBe(a! + 1000);
    expect(s.freeByteOffset).toBe(a! + 4000);
    await img.close();
  });
});

describe('deflateCluster', () => {
  it('uses QEMU parameters (raw deflate, 4 KiB window) and gives the same bytes on and off the thread pool', async () => {
    const input = compressible(C64, 9);
    const sync = await deflateCluster(input, false);
    const threaded = await deflateCluster(input, true);
    expect(Buffer.from(threaded!).equals(Buffer.from(sync!))).toBe(true);
    expect(Buffer.from(zlib.inflateRawSync(sync!, { windowBits: 12 })).equals(input)).toBe(true);
    expect(Buffer.from(sync!).equals(zlib.deflateRawSync(input, { windowBits: 12, memLevel: 9, level: 6 }))).toBe(true);
  });

  it('is null when the output would not be smaller than the cluster', async () => {
    expect(await deflateCluster(crypto.randomBytes(C64), false)).toBeNull();
    expect(await deflateCluster(crypto.randomBytes(C64), true)).toBeNull();
  });
});

describe('the gate and WRITE_COMPRESSED', () => {
  it('a zero-length compressed write reaches the driver; a driver without compression says ENOTSUP', async () => {
    const graph = testGraph();
    const node = await graph.openOptions({ driver: 'null-co', size: MiB });
    const blk = new BlockBackend(graph, node, { writable: true });
    expect(node.driver.has.pwritevCompressed).toBe(false);
    await expect(blk.pwrite(0, Buffer.alloc(C64), Req.WRITE_COMPRESSED)).rejects.toMatchObject({ code: 'ENOTSUP' });
    await expect(blk.pwrite(0, Buffer.alloc(0), Req.WRITE_COMPRESSED)).rejects.toMatchObject({ code: 'ENOTSUP' });
    await blk.pwrite(0, Buffer.alloc(0));
    await blk.close();
  });

  it('qcow2 says it compresses', () => {
    expect(testGraph().driver('qcow2').has.pwritevCompressed).toBe(true);
  });
});
