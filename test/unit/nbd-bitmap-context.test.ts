/*
 * qemu:dirty-bitmap:NAME (nbd/bitmap-context.ts):
 *
 *   1. bitmapExtents against a model (one boolean per granule, the range
 *      cut into maximal runs, each run split at maxExtentBytes, the first
 *      maxExtents of them), with random bitmaps, unaligned ranges and
 *      limits from REQ_ONE to QEMU's 2^17 extents;
 *   2. QEMU's INT32_MAX dirty areas and 32-bit merging on a 10 GiB bitmap;
 *   3. resolving -B names as QEMU 7.2 does (node, then backing/filter
 *      chain; not found, inconsistent, busy, enabled on a writable node
 *      behind a read-only export), busy while exported and released when
 *      the export closes; and a served bitmap read back by our client.
 *
 * Runs: PROPERTY_RUNS (default below), PROPERTY_SEED to replay.
 */
import path from 'node:path';
import fc from 'fast-check';
import { describe, expect, it } from 'vitest';
import { DirtyBitmap, createDirtyBitmap } from '../../block/dirty-bitmap.js';
import { bitmapClear, bitmapRemove } from '../../block/dirty-bitmap-ops.js';
import { createImage } from '../../block/create.js';
import { DIRTY_AREA_MAX_BYTES, bitmapExtents, exportDirtyBitmaps } from '../../nbd/bitmap-context.js';
import { NbdClient } from '../../nbd/client.js';
import { NbdServer } from '../../nbd/server.js';
import { MAX_BLOCK_STATUS_EXTENTS, STATE_DIRTY } from '../../nbd/protocol.js';
import type { Extent } from '../../nbd/wire-transmission.js';
import { propertyRuns } from '../helpers/block-model.js';
import { testGraph } from '../helpers/graphs.js';
import { scratchDir } from '../helpers/tmp.js';

const KiB = 1024;
const MiB = 1024 * KiB;
const GiB = 1024 * MiB;
const COMPACT = { maxExtents: MAX_BLOCK_STATUS_EXTENTS, maxExtentBytes: 2 ** 32 - 1 };
const PROPERTY = propertyRuns('nbd bitmap extents', 300);

/** The extents the model expects for [offset, offset + bytes). */
function modelExtents(granules: boolean[], g: number, offset: number, bytes: number, maxExtents: number, maxExtentBytes: number): Extent[] {
  const runs: Extent[] = [];
  for (let at = offset; at < offset + bytes; ) {
    const dirty = granules[Math.floor(at / g)] ?? false;
    let stop = at;
    while (stop < offset + bytes && (granules[Math.floor(stop / g)] ?? false) === dirty) stop = (Math.floor(stop / g) + 1) * g;
    stop = Math.min(stop, offset + bytes);
    for (let left = stop - at; left > 0; left -= Math.min(left, maxExtentBytes)) {
      runs.push({ length: Math.min(left, maxExtentBytes), flags: dirty ? STATE_DIRTY : 0 });
    }
    at = stop;
  }
  return runs.slice(0, maxExtents);
}

const caseArb = fc
  .record({
    g: fc.constantFrom(512, 4096, 65536),
    granules: fc.integer({ min: 1, max: 200 }),
  })
  .chain(({ g, granules }) =>
    fc.record({
      g: fc.constant(g),
      sizeBytes: fc.constant(granules * g),
      dirty: fc.array(fc.tuple(fc.nat(granules * g), fc.integer({ min: 1, max: 8 * g })), { maxLength: 12 }),
      offset: fc.nat(granules * g - 1),
      bytes: fc.integer({ min: 1, max: granules * g }),
      maxExtents: fc.constantFrom(1, 2, 3, 5, MAX_BLOCK_STATUS_EXTENTS),
      maxExtentBytes: fc.constantFrom(2 ** 32 - 1, g, 3 * g + 512, 1000),
    }),
  );

describe('bitmapExtents', () => {
  it('agrees with a model: merged runs, split at the largest extent, cut at the extent count', () => {
    fc.assert(
      fc.property(caseArb, (c) => {
        const bm = new DirtyBitmap('b', c.g, c.sizeBytes);
        const granules = new Array<boolean>(c.sizeBytes / c.g).fill(false);
        for (const [at, n] of c.dirty) {
          bm.setDirty(at, n);
          for (let k = Math.floor(at / c.g); k * c.g < Math.min(at + n, c.sizeBytes); k++) granules[k] = true;
        }
        const bytes = Math.min(c.bytes, c.sizeBytes - c.offset);
        const limits = { maxExtents: c.maxExtents, maxExtentBytes: c.maxExtentBytes };
        const got = bitmapExtents(bm, c.offset, bytes, limits);
        expect(got).toEqual(modelExtents(granules, c.g, c.offset, bytes, c.maxExtents, c.maxExtentBytes));
        expect(got.length).toBeGreaterThan(0);
      }),
      PROPERTY.parameters,
    );
  });

  it('takes dirty areas INT32_MAX at a time and merges them while the sum fits 32 bits, as QEMU', () => {
    const bm = new DirtyBitmap('b', 64 * KiB, 10 * GiB);
    bm.setDirty(0, 10 * GiB);
    expect(bitmapExtents(bm, 0, 2 ** 32 - 1, COMPACT)).toEqual([{ length: 2 ** 32 - 1, flags: STATE_DIRTY }]);
    expect(bitmapExtents(bm, 0, 2 ** 32 - 1, { ...COMPACT, maxExtents: 1 })).toEqual([{ length: 2 ** 32 - 1, flags: STATE_DIRTY }]);
    // Extended headers: 64-bit extents, so the areas merge into one.
    expect(bitmapExtents(bm, 0, 10 * GiB, { maxExtents: 4, maxExtentBytes: Number.MAX_SAFE_INTEGER })).toEqual([{ length: 10 * GiB, flags: STATE_DIRTY }]);
    // Without room to merge past 2^32 - 2, the third area starts a new extent.
    expect(bitmapExtents(bm, 0, 5 * GiB, { maxExtents: 4, maxExtentBytes: 2 ** 32 - 1 })).toEqual([
      { length: 2 * DIRTY_AREA_MAX_BYTES, flags: STATE_DIRTY },
      { length: 5 * GiB - 2 * DIRTY_AREA_MAX_BYTES, flags: STATE_DIRTY },
    ]);
  });

  it('a clean bitmap is one clean extent; the range past the bitmap is clean', () => {
    const bm = new DirtyBitmap('b', 64 * KiB, 1 * MiB);
    expect(bitmapExtents(bm, 512, 4096, COMPACT)).toEqual([{ length: 4096, flags: 0 }]);
    bm.setDirty(MiB - 512, 512);
    expect(bitmapExtents(bm, MiB - 64 * KiB, 128 * KiB, COMPACT)).toEqual([
      { length: 64 * KiB, flags: STATE_DIRTY },
      { length: 64 * KiB, flags: 0 },
    ]);
  });
});

describe('exportDirtyBitmaps', () => {
  const dir = scratchDir('qbt-nbd-bitmap-unit-');

  /** base.qcow2 <- top.qcow2, opened writable (the backing read-only), with bitmaps on both. */
  async function chain() {
    const graph = testGraph();
    graph.syncIo = false;
    const base = path.join(dir, 'base.qcow2');
    await createImage(graph, { format: 'qcow2', filename: base, sizeBytes: 4 * MiB, options: [], quiet: true });
    await createImage(graph, { format: 'qcow2', filename: path.join(dir, 'top.qcow2'), sizeBytes: 4 * MiB, options: [], backingFile: base, backingFormat: 'qcow2', quiet: true });
    const top = await graph.openImage(path.join(dir, 'top.qcow2'), { format: 'qcow2' });
    const onTop = createDirtyBitmap(top, 64 * KiB, 'b0');
    const onBase = createDirtyBitmap(top.backing!.node, 64 * KiB, 'bb');
    const off = createDirtyBitmap(top, 64 * KiB, 'off');
    off.disabled = true;
    return { graph, top, onTop, onBase, off };
  }

  it('finds names on the node, then down the backing chain, in the order given', async () => {
    const { graph, top, onTop, onBase } = await chain();
    const exported = exportDirtyBitmaps(top, ['bb', 'b0'], { readOnly: false });
    expect(exported.bitmapContexts.map((c) => c.name)).toEqual(['qemu:dirty-bitmap:bb', 'qemu:dirty-bitmap:b0']);
    expect([onTop.busy, onBase.busy]).toEqual([true, true]);
    exported.onClose();
    exported.onClose();
    expect([onTop.busy, onBase.busy]).toEqual([false, false]);
    await graph.closeAll();
  });

  it("refuses with QEMU's messages, in QEMU's order, and marks nothing then", async () => {
    const { graph, top, onTop, off } = await chain();
    const refusal = (names: string[], readOnly: boolean) => {
      try {
        exportDirtyBitmaps(top, names, { readOnly });
        return null;
      } catch (e) {
        return (e as Error).message;
      }
    };
    expect(refusal(['b0', 'nosuch'], false)).toBe("Bitmap 'nosuch' is not found");
    expect(onTop.busy).toBe(false);
    // An enabled bitmap of a writable node cannot back a read-only export; a disabled one can, and so can one on the read-only backing node.
    expect(refusal(['b0'], true)).toBe("Enabled bitmap 'b0' incompatible with readonly export");
    const readOnlyExport = exportDirtyBitmaps(top, ['off', 'bb'], { readOnly: true });
    expect(readOnlyExport.bitmapContexts.map((c) => c.name)).toEqual(['qemu:dirty-bitmap:off', 'qemu:dirty-bitmap:bb']);
    readOnlyExport.onClose();
    expect(off.busy).toBe(false);
    onTop.inconsistent = true;
    expect(refusal(['b0'], false)).toBe("Bitmap 'b0' is inconsistent and cannot be used\nTry block-dirty-bitmap-remove to delete this bitmap from disk");
    onTop.inconsistent = false;
    exportDirtyBitmaps(top, ['b0'], { readOnly: false });
    expect(refusal(['b0'], false)).toBe("Bitmap 'b0' is currently in use by another operation and cannot be used");
    await graph.closeAll();
  });

  it('an exported bitmap is busy until the export closes, records writes, and our client reads it', async () => {
    const { graph, top } = await chain();
    const server = new NbdServer({ log: () => undefined });
    server.createExport(graph, top, { name: 'e', writable: true, ...exportDirtyBitmaps(top, ['b0'], { readOnly: false }) });
    const socket = path.join(dir, 'unit.sock');
    await server.listen({ type: 'unix', path: socket });
    const client = await NbdClient.connect({ address: { type: 'unix', path: socket }, exportName: 'e', metaContexts: ['qemu:dirty-bitmap:b0'] });
    try {
      await client.write(MiB + 100, new Uint8Array(1000));
      const status = await client.blockStatus(0, 4 * MiB);
      expect(status.get('qemu:dirty-bitmap:b0')).toEqual([
        { length: MiB, flags: 0 },
        { length: 64 * KiB, flags: STATE_DIRTY },
        { length: 3 * MiB - 64 * KiB, flags: 0 },
      ]);
      expect(() => bitmapClear(top, 'b0')).toThrow("Bitmap 'b0' is currently in use by another operation and cannot be used");
      await expect(bitmapRemove(top, 'b0')).rejects.toThrow('currently in use');
    } finally {
      await client.disconnect();
      await server.close();
    }
    bitmapClear(top, 'b0');
    await bitmapRemove(top, 'b0');
    await graph.closeAll();
  });
});
