/*
 * block/measure.ts with the raw and qcow2 measures, and block/compare.ts,
 * without the CLI: the numbers (pinned to what qemu-img 7.2 prints for the
 * same inputs), the order of measure's errors, and that compare reads only
 * what is allocated — two sparse 4 TiB images cost a few block-status
 * answers and reads of their data, not of their virtual size.
 */
import path from 'node:path';
import { describe, expect, it, vi } from 'vitest';
import { BlockBackend } from '../../block/backend.js';
import { compareImages, type CompareSide } from '../../block/compare.js';
import { createImage } from '../../block/create.js';
import type { BlockGraph } from '../../block/graph.js';
import { MeasureOptionsError, measureImage } from '../../block/measure.js';
import { fullyAllocatedBytes } from '../../drivers/qcow2/measure.js';
import { testGraph } from '../helpers/graphs.js';
import { scratchDir } from '../helpers/tmp.js';

const KiB = 1024;
const MiB = 1024 * KiB;
const GiB = 1024 * MiB;
const TiB = 1024 * GiB;
const dir = scratchDir('qbt-measure-compare-');

describe('qcow2 fully allocated size (qcow2_calc_prealloc_size)', () => {
  it.each([
    // [virtual bytes, cluster bytes, refcount order, extended L2, qemu-img measure's "fully allocated size"]
    [1n << 30n, 65536n, 4, false, 1074135040n],
    [10n << 20n, 65536n, 4, false, 10813440n],
    [1n << 30n, 65536n, 4, true, 1074266112n],
    [2000n << 50n, 2n << 20n, 4, false, 2251810551158013952n],
  ])('%s bytes, %s-byte clusters, order %s, extended L2 %s: %s', (size, cluster, order, extl2, expected) => {
    expect(fullyAllocatedBytes(size, cluster, order, extl2)).toBe(expected);
  });
});

describe('measureImage', () => {
  const measure = (graph: BlockGraph, format: string, options: Array<[string, string]>, sizeBytes?: bigint) =>
    measureImage(graph, { format, options, sizeBytes, source: null });

  it('measures --size for raw (whole sectors) and qcow2 (as qemu-img 7.2)', async () => {
    const graph = testGraph();
    expect(await measure(graph, 'raw', [], 1000n)).toEqual({ required: 1024n, fullyAllocated: 1024n });
    expect(await measure(graph, 'qcow2', [], 1n << 30n)).toEqual({ required: 393216n, fullyAllocated: 1074135040n });
  });

  it("checks the format, then the options, then the driver's support, in qemu-img's order", async () => {
    const graph = testGraph();
    await expect(measure(graph, 'nonsense', [['foo', 'bar']], 1n)).rejects.toThrow("Unknown file format 'nonsense'");
    await expect(measure(graph, 'null-co', [], 1n)).rejects.toThrow("Format driver 'null-co' does not support image creation");
    await expect(measure(graph, 'file', [['foo', 'bar']], 1n)).rejects.toBeInstanceOf(MeasureOptionsError);
    await expect(measure(graph, 'file', [], 1n)).rejects.toThrow("Block driver 'file' does not support size measurement");
    await expect(measure(graph, 'qcow2', [['cluster_size', '3k']], 1n)).rejects.toThrow('Cluster size must be a power of two between 512 and 2048k');
    await expect(measure(graph, 'qcow2', [], 8n << 50n)).rejects.toThrow('The image size is too large (try using a larger cluster size)');
  });

  it('lets --size override -o size', async () => {
    const graph = testGraph();
    expect(await measure(graph, 'raw', [['size', '5M']], 512n)).toEqual({ required: 512n, fullyAllocated: 512n });
  });
});

describe('compareImages', () => {
  /** A qcow2 image of `sizeBytes` with `fill` bytes written at each offset. */
  async function makeImage(graph: BlockGraph, name: string, sizeBytes: number, writes: Array<[number, number, number]>): Promise<string> {
    const filename = path.join(dir, name);
    await createImage(graph, { format: 'qcow2', filename, sizeBytes, options: [], quiet: true });
    const blk = new BlockBackend(graph, await graph.openImage(filename, { format: 'qcow2' }), { writable: true });
    for (const [offset, bytes, fill] of writes) await blk.pwrite(offset, new Uint8Array(bytes).fill(fill));
    await blk.close();
    return filename;
  }

  async function side(graph: BlockGraph, filename: string): Promise<CompareSide> {
    return { blk: new BlockBackend(graph, await graph.openImage(filename, { format: 'qcow2', readOnly: true })), name: path.basename(filename) };
  }

  it('compares two sparse 4 TiB images by reading only their data', async () => {
    const graph = testGraph();
    const writes: Array<[number, number, number]> = [[GiB, 64 * KiB, 1], [3 * TiB, MiB, 2], [100 * KiB, KiB, 3]];
    const a = await side(graph, await makeImage(graph, 'a.qcow2', 4 * TiB, writes));
    const b = await side(graph, await makeImage(graph, 'b.qcow2', 4 * TiB, [...writes].reverse()));
    const reads = [vi.spyOn(a.blk, 'pread'), vi.spyOn(b.blk, 'pread')];
    expect(await compareImages(a, b)).toEqual({ kind: 'identical' });
    const bytesRead = reads.flatMap((spy) => spy.mock.calls.map(([, buf]) => buf.length)).reduce((x, y) => x + y, 0);
    expect(bytesRead).toBeLessThanOrEqual(2 * 3 * MiB);
  });

  it('reports the first differing sector of a step, and strict mode mismatches', async () => {
    const graph = testGraph();
    const a = await side(graph, await makeImage(graph, 'c.qcow2', MiB, [[64 * KiB, 4 * KiB, 1]]));
    const b = await side(graph, await makeImage(graph, 'd.qcow2', MiB, [[64 * KiB, 4 * KiB, 1], [66 * KiB + 10, 1, 2]]));
    expect(await compareImages(a, b)).toEqual({ kind: 'content-mismatch', offsetBytes: 66 * KiB });
    const empty = await side(graph, await makeImage(graph, 'e.qcow2', 2 * MiB, []));
    expect(await compareImages(a, empty, { strict: true })).toEqual({ kind: 'size-mismatch' });
    expect(await compareImages(a, empty)).toEqual({ kind: 'content-mismatch', offsetBytes: 64 * KiB });
    const zeroes = await side(graph, await makeImage(graph, 'f.qcow2', MiB, [[0, 4 * KiB, 0]]));
    const blank = await side(graph, await makeImage(graph, 'g.qcow2', MiB, []));
    expect(await compareImages(zeroes, blank)).toEqual({ kind: 'identical' });
    expect(await compareImages(zeroes, blank, { strict: true })).toEqual({ kind: 'status-mismatch', offsetBytes: 0 });
  });

  it('checks the tail of the longer image after reporting the size mismatch', async () => {
    const graph = testGraph();
    const short = await side(graph, await makeImage(graph, 'h.qcow2', MiB, []));
    const long = await side(graph, await makeImage(graph, 'i.qcow2', 2 * MiB, [[MiB + 512, 512, 7]]));
    const events: string[] = [];
    const result = await compareImages(short, long, { onSizeMismatch: () => events.push('size'), onProgress: (n) => events.push(`+${n}`) });
    expect(result).toEqual({ kind: 'content-mismatch', offsetBytes: MiB + 512 });
    const before = events.slice(0, events.indexOf('size'));
    expect(before.reduce((sum, e) => sum + Number(e.slice(1)), 0)).toBe(MiB);
  });
});
