/*
 * The limit in real time: a throttle filter over null-co, bps-total 4 MiB/s,
 * four concurrent readers of 64 KiB for ~1.6 s. The rate measured between
 * 0.3 s and 1.5 s (after the initial 100 ms allowance is spent) must be
 * within 10% of the limit. This tests the limit, not our speed: null-co is
 * far faster than 4 MiB/s. Bounded: the readers stop at a fixed deadline.
 */
import { describe, expect, it } from 'vitest';
import { BlockBackend } from '../../block/backend.js';
import { throttleGroupsOf } from '../../block/throttle-group.js';
import { testGraph } from '../helpers/graphs.js';

const LIMIT_BPS = 4 << 20;
const REQUEST_BYTES = 64 << 10;
const READERS = 4;
const WINDOW_START_MS = 300;
const WINDOW_END_MS = 1500;
const RUN_MS = 1600;
const TOLERANCE = 0.1;

describe('throttle filter in real time', () => {
  it(`keeps reads within 10% of ${LIMIT_BPS} B/s`, async () => {
    const graph = testGraph();
    throttleGroupsOf(graph).createObject('tg', { limits: { 'bps-total': LIMIT_BPS } });
    const node = await graph.openNode({ driver: 'throttle', 'throttle-group': 'tg', file: { driver: 'null-co', size: 1 << 30 } });
    const blk = new BlockBackend(graph, node);
    const t0 = performance.now();
    const completions: number[] = [];
    const reader = async (id: number) => {
      const buf = new Uint8Array(REQUEST_BYTES);
      for (let i = 0; performance.now() - t0 < RUN_MS; i++) {
        await blk.pread(((id * 1000 + i) * REQUEST_BYTES) % (1 << 30), buf);
        completions.push(performance.now() - t0);
      }
    };
    await Promise.all(Array.from({ length: READERS }, (_, id) => reader(id)));
    const inWindow = completions.filter((t) => t >= WINDOW_START_MS && t < WINDOW_END_MS).length;
    const rate = (inWindow * REQUEST_BYTES) / ((WINDOW_END_MS - WINDOW_START_MS) / 1000);
    expect(Math.abs(rate - LIMIT_BPS) / LIMIT_BPS).toBeLessThan(TOLERANCE);
    await blk.close();
  });
});
