/*
 * The file driver's lane for large buffered writes (drivers/file/direct-io.ts):
 * at most SERIAL_WRITES_IN_FLIGHT run at once, the rest start in arrival
 * order as earlier ones end, a failing write frees its place, and small
 * writes or O_DIRECT files never queue.
 */
import fs from 'node:fs';
import path from 'node:path';
import { describe, expect, it } from 'vitest';
import { pwriteHost, SERIAL_WRITE_MIN_BYTES, SERIAL_WRITES_IN_FLIGHT, WriteLane } from '../../drivers/file/direct-io.js';
import { scratchDir } from '../helpers/tmp.js';

const root = scratchDir('qbt-write-lane-');

function deferred(): { promise: Promise<void>; resolve: () => void; reject: (e: Error) => void } {
  let resolve!: () => void;
  let reject!: (e: Error) => void;
  const promise = new Promise<void>((res, rej) => ((resolve = res), (reject = rej)));
  return { promise, resolve, reject };
}

describe('WriteLane', () => {
  it('runs at most SERIAL_WRITES_IN_FLIGHT bodies at once, the rest in arrival order', async () => {
    const lane = new WriteLane();
    const gates = Array.from({ length: 6 }, deferred);
    const started: number[] = [];
    let running = 0;
    let most = 0;
    const all = gates.map((gate, i) =>
      lane.run(async () => {
        started.push(i);
        most = Math.max(most, ++running);
        await gate.promise;
        running--;
        return i;
      }),
    );
    const tick = () => new Promise((r) => setImmediate(r));
    await tick();
    const first = Array.from({ length: SERIAL_WRITES_IN_FLIGHT }, (_, i) => i);
    expect(started).toEqual(first);
    gates[0]!.resolve();
    await tick();
    expect(started).toEqual([...first, SERIAL_WRITES_IN_FLIGHT]);
    for (const gate of gates) gate.resolve();
    expect(await Promise.all(all)).toEqual([0, 1, 2, 3, 4, 5]);
    expect(started).toEqual([0, 1, 2, 3, 4, 5]);
    expect(most).toBe(SERIAL_WRITES_IN_FLIGHT);
  });

  it('a failing body rejects its caller and frees its place', async () => {
    const lane = new WriteLane();
    const results = await Promise.allSettled(
      Array.from({ length: 5 }, (_, i) => lane.run(async () => {
        if (i % 2 === 0) throw new Error(`boom ${i}`);
        return i;
      })),
    );
    expect(results.map((r) => r.status)).toEqual(['rejected', 'fulfilled', 'rejected', 'fulfilled', 'rejected']);
    expect(await lane.run(async () => 'after')).toBe('after');
  });

  it('large writes through the lane land where they were asked to', async () => {
    const file = path.join(root, 'lane.bin');
    const fh = await fs.promises.open(file, 'w+');
    try {
      const host = { fh, direct: null, syncIo: false, writeLane: new WriteLane() };
      const pieces = Array.from({ length: 8 }, (_, i) => Buffer.alloc(SERIAL_WRITE_MIN_BYTES, i + 1));
      await Promise.all(pieces.map((p, i) => pwriteHost(host, (7 - i) * p.length, p)));
      const back = await fs.promises.readFile(file);
      for (let i = 0; i < 8; i++) expect(back[(7 - i) * SERIAL_WRITE_MIN_BYTES + 17]).toBe(i + 1);
    } finally {
      await fh.close();
    }
  });
});
