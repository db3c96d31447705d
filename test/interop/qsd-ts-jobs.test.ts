/*
 * Block jobs over QMP: the same script run against qemu-storage-daemon 7.2
 * and qemu-storage-daemon-ts, on identical fresh images (qemu-img,
 * qemu-io) in separate directories, gives the same observable results:
 *
 *   - mirror (blockdev-mirror) sync full to a blockdev-add'ed qcow2, sync
 *     top to an overlay sharing the source's backing node, and to a raw
 *     file: every command's outcome, the job's events (statuses, READY and
 *     COMPLETED with their data), query-jobs and query-block-jobs while
 *     READY, nbdinfo --map (base:allocation, qemu:allocation-depth) of
 *     the target exported afterwards; after quit, qemu-img compare
 *     (source vs target), check, info --backing-chain and map of the
 *     target;
 *   - block-stream, block-commit of an intermediate layer and active
 *     block-commit (READY, job-complete) on a three-layer chain: events,
 *     then the chain as qemu-img info/map/compare see it;
 *   - blockdev-backup sync full, and a transaction (bitmap add + full
 *     backup) followed by writes through an NBD export and an incremental
 *     sync=bitmap backup: events, bitmap hashes, and the backups'
 *     content and maps; a backup of a node exported writable over NBD.
 *
 * Where ours differs from QEMU the case asserts what matches and an
 * `it.fails` case beside it names the difference (so it turns red, to be
 * promoted, once ours matches).
 * Paths are replaced by $DIR. Daemons listen on unix sockets in scratch
 * directories and are stopped by PID after each test. Build first
 * (npm run build): the tests run dist/.
 */
import path from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { missingPeers } from '../helpers/peers.js';
import { expectSame, IDENTICAL, pairRunner, stableJobs, zeroAllocation } from '../helpers/qsd-compare.js';
import { compareImages, createImage, imageFacts, must, qemuIo, QsdSession, stopAllSessions, tool } from '../helpers/qsd-script.js';
import { scratchDir } from '../helpers/tmp.js';

const root = scratchDir('qbt-qsd-jobs-');
afterEach(stopAllSessions);
const both = pairRunner(root);

/** base.qcow2 (4 MiB, data at 0..1M) <- top.qcow2 (data at 512k+128k and 3M+64k). */
async function sourceChain(dir: string): Promise<void> {
  await createImage(dir, 'base.qcow2', '4M');
  await qemuIo(dir, 'base.qcow2', 'write -P 0xab 0 1M');
  await createImage(dir, 'top.qcow2', '4M', { backing: 'base.qcow2' });
  await qemuIo(dir, 'top.qcow2', 'write -P 0xef 512k 128k', 'write -P 0x5a 3M 64k');
}

async function openSource(s: QsdSession): Promise<void> {
  await s.ok('blockdev-add', { driver: 'qcow2', 'node-name': 'base', file: s.fileRef('base.qcow2') });
  await s.ok('blockdev-add', { driver: 'qcow2', 'node-name': 'top', backing: 'base', file: s.fileRef('top.qcow2') });
}

type Target = 'full' | 'top' | 'raw';

/** Mirror `top` to a fresh target, READY, job-complete; results after quit. */
async function mirrorScript(s: QsdSession, kind: Target) {
  await sourceChain(s.dir);
  const tgt = kind === 'raw' ? 'tgt.raw' : 'tgt.qcow2';
  await createImage(s.dir, tgt, '4M', kind === 'raw' ? { fmt: 'raw' } : kind === 'top' ? { backing: 'base.qcow2' } : {});
  await openSource(s);
  const driver = kind === 'raw' ? 'raw' : 'qcow2';
  await s.ok('blockdev-add', { driver, 'node-name': 'tgt', ...(kind === 'top' ? { backing: 'base' } : {}), file: s.fileRef(tgt) });
  await s.exec('blockdev-mirror', { 'job-id': 'm0', device: 'top', target: 'tgt', sync: kind === 'top' ? 'top' : 'full' });
  await s.waitEvent('BLOCK_JOB_READY', (d) => d.device === 'm0');
  await s.exec('query-jobs', undefined, stableJobs);
  await s.exec('query-block-jobs', undefined, stableJobs);
  await s.exec('job-complete', { id: 'm0' });
  await s.waitEvent('BLOCK_JOB_COMPLETED', (d) => d.device === 'm0');
  await s.waitNoJobs();
  await s.exec('query-block-jobs');
  const maps = await exportMaps(s, 'tgt');
  expect(await s.quit()).toBe(0);
  return {
    outcomes: s.outcomes,
    events: s.jobEvents('m0'),
    maps,
    compare: await compareImages(s.dir, 'top.qcow2', 'qcow2', tgt, driver),
    target: await imageFacts(s.dir, tgt, driver),
  };
}

/** The node exported read-only over NBD: nbdinfo --map of base:allocation and qemu:allocation-depth. */
async function exportMaps(s: QsdSession, node: string): Promise<Record<string, unknown>> {
  await s.ok('nbd-server-start', { addr: { type: 'unix', data: { path: s.f('nbd.sock') } } });
  await s.ok('block-export-add', { type: 'nbd', id: 'e', 'node-name': node, 'allocation-depth': true });
  const uri = `nbd+unix:///${node}?socket=${s.f('nbd.sock')}`;
  const maps: Record<string, unknown> = {};
  for (const ctx of ['base:allocation', 'qemu:allocation-depth']) maps[ctx] = await tool(s.dir, 'nbdinfo', [`--map=${ctx}`, uri]);
  await delExportWhenIdle(s, 'e');
  await s.ok('nbd-server-stop');
  return maps;
}

/** Bound on block-export-del retries while the last client's connection is being released (× 20 ms). */
const DEL_RETRIES = 50;

/**
 * block-export-del once the export has no client: nbdinfo has exited, but
 * our daemon may not yet have released its connection and answer "export
 * 'e' still in use" (QEMU has, by the time the next command is read).
 */
async function delExportWhenIdle(s: QsdSession, id: string): Promise<void> {
  for (let i = 0; ; i++) {
    try {
      await s.daemon.qmp.execute('block-export-del', { id });
      break;
    } catch (e) {
      if (i >= DEL_RETRIES || !String(e).includes('still in use')) throw e;
      await new Promise((r) => setTimeout(r, 20));
    }
  }
  await s.waitEvent('BLOCK_EXPORT_DELETED');
}

/** sbase (data 0..1M) <- smid (1M..2M) <- stop (2M..+64k), 4 MiB each. */
async function threeLayers(dir: string): Promise<void> {
  await createImage(dir, 'base.qcow2', '4M');
  await qemuIo(dir, 'base.qcow2', 'write -P 1 0 1M', 'write -P 7 3M 512k');
  await createImage(dir, 'mid.qcow2', '4M', { backing: 'base.qcow2' });
  await qemuIo(dir, 'mid.qcow2', 'write -P 2 1M 1M', 'write -z 3M 64k');
  await createImage(dir, 'top.qcow2', '4M', { backing: 'mid.qcow2' });
  await qemuIo(dir, 'top.qcow2', 'write -P 3 2M 64k', 'write -P 4 1M 4k');
  await must(dir, 'qemu-img', ['convert', '-f', 'qcow2', '-O', 'raw', 'top.qcow2', 'ref.raw']);
}

async function openThree(s: QsdSession): Promise<void> {
  await s.ok('blockdev-add', { driver: 'qcow2', 'node-name': 'base', file: s.fileRef('base.qcow2') });
  await s.ok('blockdev-add', { driver: 'qcow2', 'node-name': 'mid', backing: 'base', file: s.fileRef('mid.qcow2') });
  await s.ok('blockdev-add', { driver: 'qcow2', 'node-name': 'top', backing: 'mid', file: s.fileRef('top.qcow2') });
}

/**
 * query-named-block-nodes as [node name, backing depth, backing file]:
 * automatic names as '#auto', and a backing file QEMU describes as json:
 * (the backing was given by node name: bdrv_refresh_filename) by the file
 * name inside, as ours prints it — a known difference of the filename
 * description, also filtered in qsd-ts-qmp.test.ts.
 */
function nodeChain(list: unknown): unknown {
  const plain = (f: unknown) => (typeof f === 'string' && f.startsWith('json:') ? (JSON.parse(f.slice(5)) as { file: { filename: string } }).file.filename : f);
  return (list as Array<Record<string, unknown>>).map((n) => {
    const name = String(n['node-name']);
    return [name.startsWith('#') ? '#auto' : name, n.backing_file_depth, plain(n.backing_file)];
  });
}

type ChainJob = 'stream' | 'stream-all' | 'commit-mid' | 'commit-active';

async function chainScript(s: QsdSession, job: ChainJob) {
  await threeLayers(s.dir);
  await openThree(s);
  const id = 'j0';
  if (job === 'stream') await s.exec('block-stream', { 'job-id': id, device: 'top', 'base-node': 'base' });
  if (job === 'stream-all') await s.exec('block-stream', { 'job-id': id, device: 'top' });
  if (job === 'commit-mid') await s.exec('block-commit', { 'job-id': id, device: 'top', 'top-node': 'mid', 'base-node': 'base' });
  if (job === 'commit-active') {
    await s.exec('block-commit', { 'job-id': id, device: 'top' });
    await s.waitEvent('BLOCK_JOB_READY', (d) => d.device === id);
    await s.exec('query-block-jobs', undefined, stableJobs);
    await s.exec('job-complete', { id });
  }
  await s.waitEvent('BLOCK_JOB_COMPLETED', (d) => d.device === id);
  await s.waitNoJobs();
  await s.exec('query-named-block-nodes', { flat: true }, nodeChain);
  expect(await s.quit()).toBe(0);
  const result = job === 'commit-active' ? 'base.qcow2' : 'top.qcow2';
  return {
    outcomes: s.outcomes,
    events: s.jobEvents(id),
    compare: await compareImages(s.dir, 'ref.raw', 'raw', result, 'qcow2'),
    chain: await imageFacts(s.dir, result),
  };
}

/** blockdev-backup full, then transaction (bitmap + full backup), writes, incremental backup. */
async function backupScript(s: QsdSession) {
  await createImage(s.dir, 'src.qcow2', '8M');
  await qemuIo(s.dir, 'src.qcow2', 'write -P 0x31 0 2M', 'write -P 0x32 5M 512k');
  for (const t of ['b-full.qcow2', 'full.qcow2']) await createImage(s.dir, t, '8M');
  await createImage(s.dir, 'inc.qcow2', '8M', { backing: 'full.qcow2' });
  await s.ok('blockdev-add', { driver: 'qcow2', 'node-name': 'src', file: s.fileRef('src.qcow2') });
  await s.ok('blockdev-add', { driver: 'qcow2', 'node-name': 'bfull', file: s.fileRef('b-full.qcow2') });
  await s.ok('blockdev-add', { driver: 'qcow2', 'node-name': 'full', file: s.fileRef('full.qcow2') });
  await s.ok('blockdev-add', { driver: 'qcow2', 'node-name': 'inc', backing: null, file: s.fileRef('inc.qcow2') });
  await s.exec('blockdev-backup', { 'job-id': 'b0', device: 'src', target: 'bfull', sync: 'full' });
  await s.waitEvent('BLOCK_JOB_COMPLETED', (d) => d.device === 'b0');
  await s.waitNoJobs();
  await s.exec('transaction', {
    actions: [
      { type: 'block-dirty-bitmap-add', data: { node: 'src', name: 'bm0', granularity: 65536 } },
      { type: 'blockdev-backup', data: { 'job-id': 'b1', device: 'src', target: 'full', sync: 'full' } },
    ],
  });
  await s.waitEvent('BLOCK_JOB_COMPLETED', (d) => d.device === 'b1');
  await s.waitNoJobs();
  await s.ok('nbd-server-start', { addr: { type: 'unix', data: { path: s.f('nbd.sock') } } });
  await s.ok('block-export-add', { type: 'nbd', id: 'e0', 'node-name': 'src', name: 'src', writable: true });
  const uri = `nbd+unix:///src?socket=${s.f('nbd.sock')}`;
  await must(s.dir, 'qemu-io', ['-f', 'raw', uri, '-c', 'write -P 0x41 1M 4k', '-c', 'write -P 0x42 6M 128k', '-c', 'write -z 0 64k']);
  await s.exec('x-debug-block-dirty-bitmap-sha256', { node: 'src', name: 'bm0' });
  await s.ok('block-export-del', { id: 'e0' });
  await s.waitEvent('BLOCK_EXPORT_DELETED');
  await s.exec('blockdev-backup', { 'job-id': 'b2', device: 'src', target: 'inc', sync: 'bitmap', bitmap: 'bm0' });
  await s.exec('blockdev-backup', { 'job-id': 'b2', device: 'src', target: 'inc', sync: 'bitmap', bitmap: 'bm0', 'bitmap-mode': 'on-success' });
  await s.waitEvent('BLOCK_JOB_COMPLETED', (d) => d.device === 'b2');
  await s.waitNoJobs();
  await s.exec('x-debug-block-dirty-bitmap-sha256', { node: 'src', name: 'bm0' });
  expect(await s.quit()).toBe(0);
  return {
    outcomes: s.outcomes,
    events: ['b0', 'b1', 'b2'].map((id) => s.jobEvents(id)),
    compareFull: await compareImages(s.dir, 'b-full.qcow2', 'qcow2', 'full.qcow2', 'qcow2'),
    compareInc: await compareImages(s.dir, 'src.qcow2', 'qcow2', 'inc.qcow2', 'qcow2'),
    full: await imageFacts(s.dir, 'b-full.qcow2'),
    inc: await imageFacts(s.dir, 'inc.qcow2'),
  };
}

/** Exports `src` writable over NBD, then starts a full backup of it: the outcome. */
async function backupExportedScript(s: QsdSession, afterJob: boolean) {
  await createImage(s.dir, 'src.qcow2', '1M');
  await createImage(s.dir, 'tgt.qcow2', '1M');
  await s.ok('blockdev-add', { driver: 'qcow2', 'node-name': 'src', file: s.fileRef('src.qcow2') });
  await s.ok('blockdev-add', { driver: 'qcow2', 'node-name': 'tgt', file: s.fileRef('tgt.qcow2') });
  if (afterJob) {
    await s.exec('blockdev-backup', { 'job-id': 'b', device: 'src', target: 'tgt', sync: 'full' });
    await s.waitNoJobs();
  }
  await s.ok('nbd-server-start', { addr: { type: 'unix', data: { path: s.f('nbd.sock') } } });
  await s.ok('block-export-add', { type: 'nbd', id: 'e0', 'node-name': 'src', writable: true });
  await s.exec('blockdev-backup', { 'job-id': 'b0', device: 'src', target: 'tgt', sync: 'full' });
  await s.waitNoJobs();
  expect(await s.quit()).toBe(0);
  return { outcomes: s.outcomes };
}

describe.skipIf(missingPeers('qemu-storage-daemon', 'qemu-img', 'qemu-io', 'nbdinfo'))('block jobs over QMP beside qemu-storage-daemon 7.2', () => {
  for (const kind of ['full', 'top', 'raw'] as const) {
    it(`blockdev-mirror ${kind === 'raw' ? 'full to a raw file' : `sync=${kind}`}: same events, job listings and target`, async () => {
      const [theirs, ours] = await both(`mirror-${kind}`, (s) => mirrorScript(s, kind));
      expect(theirs.compare).toEqual(IDENTICAL);
      expect(ours.compare).toEqual(IDENTICAL);
      // sync=full: the allocation depth of zeroed ranges is the zero-target difference below.
      const view = (r: typeof theirs) => (kind === 'full' ? { ...r, maps: { ...r.maps, 'qemu:allocation-depth': 'see below' } } : r);
      expectSame(view(theirs), view(ours), { progress: kind === 'top' });
    }, 60_000);
  }

  // QEMU's blockdev-mirror sync=full sets zero-target (blockdev.c). This qcow2
  // target is opened without discard=unmap, so it cannot write zeroes with unmap:
  // the whole length is dirty and copied, progress counts the whole disk (READY/
  // COMPLETED len=offset=4194304) and the unwritten ranges become zero clusters
  // (present; an NBD export of the target maps qemu:allocation-depth
  // "0 4194304 1 local"). Ours now does the same (jobs/mirror.ts zeroTarget).
  it('blockdev-mirror sync=full: progress and target zero clusters as QEMU (zero-target)', async () => {
    const [theirs, ours] = await both('mirror-full', (s) => mirrorScript(s, 'full'));
    expect(ours.events).toEqual(theirs.events);
    expect(zeroAllocation(ours.target.map)).toEqual(zeroAllocation(theirs.target.map));
    expect(ours.maps).toEqual(theirs.maps);
  }, 60_000);

  for (const job of ['stream', 'stream-all', 'commit-mid', 'commit-active'] as const) {
    it(`${job} on a three-layer chain: same events and resulting chain`, async () => {
      const [theirs, ours] = await both(job, (s) => chainScript(s, job));
      expect(theirs.compare).toEqual(IDENTICAL);
      expect(ours.compare).toEqual(IDENTICAL);
      expectSame(theirs, ours);
    }, 60_000);
  }

  // QEMU's active commit runs mirror with unmap=true, and its write-zeroes goes
  // through a BlockBackend, which keeps MAY_UNMAP even on a base opened without
  // discard=unmap: where the committed layer reads as zeroes over data in the base
  // (mid: write -z 3M 64k over base's 0x07) the base cluster becomes a zero cluster
  // without a host offset. Ours does the same.
  it('commit-active: zeroed base clusters unmapped as QEMU does', async () => {
    const [theirs, ours] = await both('commit-active', (s) => chainScript(s, 'commit-active'));
    expect(zeroAllocation(ours.chain.map)).toEqual(zeroAllocation(theirs.chain.map));
  }, 60_000);

  it('blockdev-backup full, transaction with a bitmap, incremental backup: same events and backups', async () => {
    const [theirs, ours] = await both('backup', backupScript);
    expect(theirs.compareFull).toEqual(IDENTICAL);
    expect(theirs.compareInc).toEqual(IDENTICAL);
    expect(ours.compareInc).toEqual(IDENTICAL);
    expectSame(theirs, ours);
  }, 60_000);

  // QEMU emits JOB_STATUS_CHANGE paused then running right after running for
  // every blockdev-backup (alone or in a transaction): the job starts inside the
  // drained section of its source and pauses until the transaction's clean step
  // ends it. Ours derives the same pair from the same drain (jobs/job.ts holdNode).
  it('blockdev-backup: the drain pause after start as QEMU emits it', async () => {
    const [theirs, ours] = await both('backup', backupScript);
    expect(ours.events).toEqual(theirs.events);
  }, 60_000);

  // A writable NBD export does not share RESIZE: the copy-before-write filter must
  // still go in above the exported node (QEMU starts the job).
  for (const afterJob of [false, true]) {
    it(`blockdev-backup of a node exported writable${afterJob ? ' after an earlier backup' : ''}: same outcome`, async () => {
      const [theirs, ours] = await both(`backup-exported-${afterJob}`, (s) => backupExportedScript(s, afterJob));
      expectSame(theirs, ours);
    }, 60_000);
  }

});
