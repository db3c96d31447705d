#!/usr/bin/env node
// A writer to be killed: replays a seeded sequence of writes, zero-writes
// and discards against a qcow2 image through the library (dist/), several
// requests in flight at a time, with a flush every few batches. Before a
// batch is issued it appends `start <last op index>` to a journal, and after
// a flush completes `flushed <last op index>`; each journal line is written
// with writeSync, so it survives a SIGKILL (the page cache does). The test
// replays the same sequence to know what must read back. It prints `ready`
// once the image is open, and the test's kill timer starts then.
//
//   node crash-writer.mjs IMAGE JOURNAL SEED
import fs from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { crashOps, CRASH_BATCH_OPS, CRASH_FLUSH_EVERY_BATCHES } from './crash-ops.mjs';

const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../..');
const { openImage } = await import(path.join(root, 'dist', 'index.js'));
const [image, journal, seedText] = process.argv.slice(2);
const ops = crashOps(Number(seedText));
const log = fs.openSync(journal, 'a');
const note = (line) => fs.writeSync(log, `${line}\n`);

const img = await openImage(image, { format: 'qcow2', discard: 'unmap' });
fs.writeSync(1, 'ready\n');
for (let first = 0, batch = 0; first < ops.length; first += CRASH_BATCH_OPS, batch++) {
  const slice = ops.slice(first, first + CRASH_BATCH_OPS);
  note(`start ${first + slice.length - 1}`);
  await Promise.all(
    slice.map((op) => {
      if (op.kind === 'write') return img.write(op.offset, op.data);
      if (op.kind === 'zero') return img.writeZeroes(op.offset, op.length, { unmap: op.unmap });
      return img.discard(op.offset, op.length);
    }),
  );
  if ((batch + 1) % CRASH_FLUSH_EVERY_BATCHES === 0) {
    await img.flush();
    note(`flushed ${first + slice.length - 1}`);
  }
}
await img.close();
note('done');
