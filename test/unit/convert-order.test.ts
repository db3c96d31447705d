/*
 * The copy loop's in-order writes (block/convert.ts): without -W, runs
 * reach the target in the order they were claimed. For a target without
 * clusters, or a format when each run is one data write of whole clusters,
 * the next run's write may start while the previous one is still going;
 * otherwise (qemu-img's rule) one write at a time; zeroes always wait for the
 * writes before them. Either way the target ends up holding the source.
 */
import { describe, expect, it } from 'vitest';
import { ConvertError, convertCopy, type ConvertPlan } from '../../block/convert.js';
import { BlockError } from '../../block/errors.js';
import { SECTOR_BYTES } from '../../block/zero-scan.js';
import { memOf, openMem, pattern } from '../helpers/mem-driver.js';

const KiB = 1024;
const CHUNK_BYTES = 64 * KiB;
const CHUNKS = 8;
const SIZE_BYTES = CHUNK_BYTES * CHUNKS;
/** How long each target write is held, so that overlapping ones would meet. */
const WRITE_HOLD_MS = 3;

interface HeldWrites {
  /** Milliseconds after which the target's write at this offset fails, or null: it succeeds. */
  failAt?: (offsetBytes: number) => number | null;
  /** Chunks of the source that are zeroes (and the target is not known to be zero). */
  zeroChunks?: number[];
}

async function convertWithHeldWrites(clusterSectors: number, { failAt, zeroChunks = [] }: HeldWrites = {}) {
  const src = await openMem({ size: SIZE_BYTES });
  const content = pattern(SIZE_BYTES, 5);
  for (const chunk of zeroChunks) content.fill(0, chunk * CHUNK_BYTES, (chunk + 1) * CHUNK_BYTES);
  await src.blk.pwrite(0, content);
  const dst = await openMem({ size: SIZE_BYTES });
  const starts: number[] = [];
  const zeroed: number[] = [];
  let writing = 0;
  let mostAtOnce = 0;
  memOf(dst.node).beforeCall = async (call) => {
    if (call.op === 'write-zeroes') zeroed.push(call.offset);
    if (call.op !== 'write') return;
    starts.push(call.offset);
    mostAtOnce = Math.max(mostAtOnce, ++writing);
    const failAfterMs = failAt?.(call.offset) ?? null;
    await new Promise((resolve) => setTimeout(resolve, failAfterMs ?? WRITE_HOLD_MS));
    writing--;
    if (failAfterMs !== null) throw new BlockError('ENOSPC', 'No space left on device');
  };
  const sectors = SIZE_BYTES / SECTOR_BYTES;
  const plan: ConvertPlan = {
    sources: [{ child: src.blk.root, base: null, sectors, alignmentSectors: 1 }],
    target: dst.blk.root,
    minSparseSectors: 8,
    alignmentSectors: 8,
    hasZeroInit: zeroChunks.length === 0,
    targetHasBacking: false,
    targetBackingSectors: -1,
    compressed: false,
    clusterSectors,
    bufSectors: CHUNK_BYTES / SECTOR_BYTES,
    parallel: 4,
    outOfOrder: false,
    rateLimitBytesPerSec: 0,
  };
  const failure = await convertCopy(plan).then(
    () => null,
    (e: unknown) => e,
  );
  const held = Buffer.from(memOf(dst.node).data.subarray(0, SIZE_BYTES));
  return { starts, zeroed, mostAtOnce, failure, same: held.equals(Buffer.from(content)) };
}

describe('convertCopy: in-order writes', () => {
  const inOrder = Array.from({ length: CHUNKS }, (_, i) => i * CHUNK_BYTES);

  it('lets the next run write once this one is issued on a target without clusters, still in order', async () => {
    const r = await convertWithHeldWrites(0);
    expect(r.starts).toEqual(inOrder);
    expect(r.mostAtOnce).toBeGreaterThan(1);
    expect(r.same).toBe(true);
  });

  it('lets a format\'s runs of whole clusters overlap, still in order', async () => {
    const r = await convertWithHeldWrites(CHUNK_BYTES / SECTOR_BYTES);
    expect(r.starts).toEqual(inOrder);
    expect(r.mostAtOnce).toBeGreaterThan(1);
    expect(r.same).toBe(true);
  });

  it('waits for each write to finish (qemu-img) when runs end inside a cluster of the format', async () => {
    const r = await convertWithHeldWrites((48 * KiB) / SECTOR_BYTES);
    expect(r.starts).toEqual(inOrder);
    expect(r.mostAtOnce).toBe(1);
    expect(r.same).toBe(true);
  });

  it('reports the earliest of overlapping failed writes, the one qemu-img would have met', async () => {
    // The first run's write fails last, the second's at once: the copy fails at byte 0.
    const failAt = (offsetBytes: number) => (offsetBytes === 0 ? 4 * WRITE_HOLD_MS : offsetBytes === CHUNK_BYTES ? 0 : null);
    const { failure } = await convertWithHeldWrites(0, { failAt });
    expect(failure).toBeInstanceOf(ConvertError);
    expect({ phase: (failure as ConvertError).phase, offsetBytes: (failure as ConvertError).offsetBytes }).toEqual({ phase: 'write', offsetBytes: 0 });
  });

  it('zeroes wait for the overlapping writes before them: after a failed write they never happen', async () => {
    // Run 0 (data) fails late; run 1 (data) overlaps it; run 2 is zeroes and would only touch metadata.
    const failAt = (offsetBytes: number) => (offsetBytes === 0 ? 4 * WRITE_HOLD_MS : null);
    const r = await convertWithHeldWrites(CHUNK_BYTES / SECTOR_BYTES, { failAt, zeroChunks: [2] });
    expect((r.failure as ConvertError).offsetBytes).toBe(0);
    expect(r.zeroed).toEqual([]);
    const ok = await convertWithHeldWrites(CHUNK_BYTES / SECTOR_BYTES, { zeroChunks: [2] });
    expect({ failure: ok.failure, zeroed: ok.zeroed, same: ok.same }).toEqual({ failure: null, zeroed: [2 * CHUNK_BYTES], same: true });
  });
});
