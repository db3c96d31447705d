// Writes made by jobs go through the request gate, so the enabled dirty
// bitmaps of the node written record them (issue 6 item 2): a mirror marks
// its target's bitmap exactly where it copied data, a second job on a busy
// node is refused with QEMU's text, and the claim ends with the job.
import { describe, expect, it } from 'vitest';
import { BlockBackend } from '../../block/backend.js';
import { createDirtyBitmap } from '../../block/dirty-bitmap.js';
import { startMirror } from '../../jobs/mirror.js';
import { pattern } from '../helpers/mem-driver.js';
import { finished, jobWorld } from '../helpers/mirror-setup.js';

const KiB = 1024;
const MiB = 1024 * KiB;

describe('jobs and dirty bitmaps', () => {
  it("a mirror's copies are recorded by the target's bitmap, and only they", async () => {
    const w = jobWorld();
    const src = await w.mem('src', 4 * MiB);
    const tgt = await w.mem('tgt', 4 * MiB);
    const blk = new BlockBackend(w.graph, src, { name: 'guest', writable: true });
    await blk.pwrite(0, pattern(MiB, 1));
    await blk.pwrite(3 * MiB, pattern(64 * KiB, 2));
    const bm = createDirtyBitmap(tgt, 64 * KiB, 'b0');
    const job = await startMirror(w, { jobId: 'm', source: src, target: tgt, sync: 'full' });
    await w.waitEvent('BLOCK_JOB_READY');
    job.complete();
    await finished(job);
    const dirty = [...bm.extents(0, 4 * MiB)].filter((e) => e.dirty).map((e) => [e.offset, e.bytes]);
    expect(dirty).toEqual([
      [0, MiB],
      [3 * MiB, 64 * KiB],
    ]);
  });

  it('a node busy with one job refuses another until the first ends', async () => {
    const w = jobWorld();
    const src = await w.mem('src', 4 * MiB);
    const tgt = await w.mem('tgt', 4 * MiB);
    const tgt2 = await w.mem('tgt2', 4 * MiB);
    const job = await startMirror(w, { jobId: 'm', source: src, target: tgt, sync: 'full' });
    await expect(startMirror(w, { jobId: 'm2', source: src, target: tgt2, sync: 'full' })).rejects.toThrow(
      "Node 'src' is busy: block device is in use by block job: mirror",
    );
    await w.waitEvent('BLOCK_JOB_READY');
    job.cancel(true);
    await finished(job);
    const again = await startMirror(w, { jobId: 'm3', source: src, target: tgt2, sync: 'full' });
    await w.waitEvent('BLOCK_JOB_READY');
    again.cancel(true);
    await finished(again);
  });
});
