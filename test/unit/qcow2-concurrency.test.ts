/*
 * Concurrent requests on one qcow2 image: the crash writer's op sequences
 * (eight non-overlapping writes, zero-writes and discards in flight at a
 * time) run to the end in this process and the image must read back as the
 * sequence says. These seeds once hung: a request that found an allocation
 * in flight, released the lock and then registered to wait for it missed
 * the wake-up when the allocation completed in between.
 */
import path from 'node:path';
import { describe, expect, it } from 'vitest';
import { createImage, openImage } from '../../index.js';
import { expectationAfter } from '../helpers/crash-expect.js';
import { crashOps, CRASH_BATCH_OPS, CRASH_IMAGE_BYTES } from '../helpers/crash-ops.mjs';
import { scratchDir } from '../helpers/tmp.js';

const dir = scratchDir();
const CASES: Array<{ seed: number; options: Record<string, number | boolean> }> = [
  { seed: 1000, options: { cluster_size: 65536 } },
  { seed: 1002, options: { cluster_size: 65536 } },
  { seed: 2000, options: { cluster_size: 4096, refcount_bits: 1 } },
  { seed: 3001, options: { lazy_refcounts: true } },
];

describe('qcow2 with requests in flight together', () => {
  for (const { seed, options } of CASES) {
    it(`replays seed ${seed} (${JSON.stringify(options)}) to the end`, { timeout: 20_000 }, async () => {
      const file = path.join(dir, `concurrent-${seed}.qcow2`);
      await createImage(file, { format: 'qcow2', sizeBytes: CRASH_IMAGE_BYTES, options });
      const img = await openImage(file, { format: 'qcow2', discard: 'unmap' });
      const ops = crashOps(seed);
      for (let first = 0; first < ops.length; first += CRASH_BATCH_OPS) {
        await Promise.all(
          ops.slice(first, first + CRASH_BATCH_OPS).map((op) => {
            if (op.kind === 'write') return img.write(op.offset, op.data);
            if (op.kind === 'zero') return img.writeZeroes(op.offset, op.length, { unmap: op.unmap });
            return img.discard(op.offset, op.length);
          }),
        );
      }
      const actual = await img.read(0, CRASH_IMAGE_BYTES);
      await img.close();
      const last = ops.length - 1;
      expect(expectationAfter(seed, { lastStarted: last, lastFlushed: last }).firstMismatch(actual), `seed ${seed}`).toBe(-1);
    });
  }
});
