/*
 * A speed-limited blockdev-backup of a mostly empty source, beside
 * qemu-storage-daemon 7.2. QEMU's block-copy charges every task to the
 * rate limit, zero runs included (chunked like data: 1 MiB or the
 * cluster), so the job takes about its length at that speed, not just its
 * data's. Compared: the job's elapsed time (start to completion) and its
 * progress a while after the start, each within a tolerance of qemu's,
 * and the backup itself (qemu-img compare). Build first (npm run build).
 */
import path from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { missingPeers } from '../helpers/peers.js';
import { IDENTICAL, pairRunner } from '../helpers/qsd-compare.js';
import { compareImages, createImage, qemuIo, stopAllSessions, type QsdSession } from '../helpers/qsd-script.js';
import { scratchDir } from '../helpers/tmp.js';

const root = scratchDir('qbt-qsd-backup-pacing-');
afterEach(stopAllSessions);
const both = pairRunner(root);

const MiB = 1024 * 1024;
/** Source length: 2 MiB of data at the start, the rest unallocated (reads as zeroes). */
const SOURCE_MIB = 24;
const SPEED_BPS = 8 * MiB;
/** When progress is sampled after the start. */
const SAMPLE_MS = 1500;
/** Allowed relative difference from qemu's elapsed time and sampled progress. */
const TOLERANCE = 0.25;

/** What one daemon's run shows: start to completion, progress at SAMPLE_MS, length, qemu-img compare. */
type Pacing = { elapsedMs: number; sampledOffset: number; len: number; compare: { code: number | null; out: string } };

async function backupPacing(s: QsdSession): Promise<Pacing> {
  await createImage(s.dir, 'src.qcow2', `${SOURCE_MIB}M`);
  await qemuIo(s.dir, 'src.qcow2', 'write -P 0x5a 0 2M');
  await createImage(s.dir, 'tgt.qcow2', `${SOURCE_MIB}M`);
  await s.ok('blockdev-add', { driver: 'qcow2', 'node-name': 'src', file: s.fileRef('src.qcow2') });
  await s.ok('blockdev-add', { driver: 'qcow2', 'node-name': 'tgt', file: s.fileRef('tgt.qcow2') });
  const start = performance.now();
  await s.ok('blockdev-backup', { 'job-id': 'b', device: 'src', target: 'tgt', sync: 'full', speed: SPEED_BPS });
  await new Promise((r) => setTimeout(r, SAMPLE_MS));
  const jobs = await s.daemon.qmp.execute<Array<{ device: string; offset: number; len: number }>>('query-block-jobs');
  const job = jobs.find((j) => j.device === 'b');
  await s.waitEvent('BLOCK_JOB_COMPLETED', (d) => d.device === 'b');
  const elapsedMs = performance.now() - start;
  expect(await s.quit()).toBe(0);
  return { elapsedMs, sampledOffset: job?.offset ?? -1, len: job?.len ?? -1, compare: await compareImages(s.dir, 'src.qcow2', 'qcow2', 'tgt.qcow2', 'qcow2') };
}

describe.skipIf(missingPeers('qemu-storage-daemon', 'qemu-img', 'qemu-io'))('backup speed limit over zero areas beside qemu-storage-daemon 7.2', () => {
  it('a mostly empty source takes its length at the speed, with the same progress', async () => {
    const [theirs, ours] = await both('pacing', backupPacing);
    console.log(`backup of ${SOURCE_MIB} MiB at ${SPEED_BPS / MiB} MiB/s: qemu ${theirs.elapsedMs.toFixed(0)} ms (offset ${theirs.sampledOffset} at ${SAMPLE_MS} ms), ours ${ours.elapsedMs.toFixed(0)} ms (offset ${ours.sampledOffset})`);
    expect(theirs.compare).toEqual(IDENTICAL);
    expect(ours.compare).toEqual(IDENTICAL);
    expect(ours.len).toBe(theirs.len);
    expect(Math.abs(ours.elapsedMs / theirs.elapsedMs - 1)).toBeLessThanOrEqual(TOLERANCE);
    expect(Math.abs(ours.sampledOffset / theirs.sampledOffset - 1)).toBeLessThanOrEqual(TOLERANCE);
  }, 60_000);
});
