/*
 * Model test of the throttle filter: random write, write-zeroes, discard,
 * read and flush sequences through a backend on `throttle` over test-mem,
 * against a plain Uint8Array (test/helpers/block-model.ts). The group's
 * limits are tight (bps-total 64 KiB/s with a 2 s burst of 256 KiB/s,
 * iops-total 50, iops-size 4 KiB) so requests really queue; the clock is a
 * manual one that jumps to each timer, so the test runs at full speed.
 * Requests run two at a time on disjoint ranges, so the order they leave
 * the queues in cannot change the result.
 *
 * PROPERTY_RUNS / PROPERTY_SEED / PROPERTY_PATH as in model.test.ts; the
 * seed is printed up front.
 */
import fc from 'fast-check';
import { describe, it } from 'vitest';
import { BlockBackend } from '../../block/backend.js';
import { ManualThrottleClock } from '../../block/throttle-clock.js';
import { throttleGroupsOf } from '../../block/throttle-group.js';
import { Model, applyOp, checkRead, opArb, propertyRuns, type ModelDevice, type Op } from '../helpers/block-model.js';
import { memGraph } from '../helpers/mem-driver.js';

const PROPERTY = propertyRuns('throttle-model.test', 60);
const MAX_OPS = 30;
const SIZE_BYTES = 256 * 1024;
const TIMEOUT_MS = Math.max(60_000, PROPERTY.runs * 500);

async function openDevice(): Promise<{ device: ModelDevice; clock: ManualThrottleClock }> {
  const graph = memGraph();
  const clock = new ManualThrottleClock(true);
  throttleGroupsOf(graph, clock).createObject('tg', {
    limits: { 'bps-total': 65536, 'bps-total-max': 262144, 'bps-total-max-length': 2, 'iops-total': 50, 'iops-size': 4096 },
  });
  const node = await graph.openNode({
    driver: 'throttle', 'throttle-group': 'tg', discard: 'unmap',
    file: { driver: 'test-mem', size: SIZE_BYTES },
  });
  const blk = new BlockBackend(graph, node, { writable: true });
  const device: ModelDevice = {
    backend: () => blk,
    reopen: async () => undefined,
    sizeBytes: SIZE_BYTES,
  };
  return { device, clock };
}

/** Two ops whose ranges do not overlap can run concurrently. */
function overlaps(a: Op, b: Op): boolean {
  if (!('offset' in a) || !('offset' in b)) return true;
  return a.offset < b.offset + b.bytes && b.offset < a.offset + a.bytes;
}

describe('throttle filter against a model', () => {
  it('reads back what was written', { timeout: TIMEOUT_MS }, async () => {
    const ops = fc.array(opArb(SIZE_BYTES).filter((op) => op.kind !== 'reopen'), { minLength: 1, maxLength: MAX_OPS });
    await fc.assert(
      fc.asyncProperty(ops, async (list) => {
        const { device } = await openDevice();
        const model = new Model(new Uint8Array(SIZE_BYTES));
        for (let i = 0; i < list.length; i++) {
          const op = list[i]!;
          const next = list[i + 1];
          if (next && !overlaps(op, next)) {
            await Promise.all([applyOp(device, model, op, `op ${i}`), applyOp(device, model, next, `op ${i + 1}`)]);
            i++;
          } else {
            await applyOp(device, model, op, `op ${i}`);
          }
        }
        await checkRead(device, model, 0, SIZE_BYTES, 'end');
        await device.backend().close();
      }),
      PROPERTY.parameters,
    );
  });
});
