/*
 * What block jobs hold on the nodes they work on, beside
 * qemu-storage-daemon 7.2: the same QMP script runs on both daemons
 * (test/helpers/qsd-compare.ts) and every command gives the same return
 * value or the same error text.
 *
 * The chain base ← mid ← top (qcow2 over named file nodes, every layer
 * writable, 4 MiB of data in base and 2 MiB in mid, so a job limited to
 * 1 byte/s is still running when the users arrive):
 *   - block-stream of the whole chain, and down to base: an 'intermediate
 *     node' edge shares only consistent read and write unchanged, so a
 *     writable export of mid (or of base when it is streamed too) is refused
 *     with "... unshared by stream job 'j' (uses node 'mid' as
 *     'intermediate node' child)"; a read-only one is fine, and so is a
 *     writable export of top; a base left in place refuses writers through
 *     mid's backing edge, as QEMU derives it;
 *   - intermediate block-commit of mid into base: mid shares no consistent
 *     read (exports of it are refused), the job's BlockBackend on base
 *     shares no write (a writable export of base is refused, a read-only
 *     one is fine: base is as long as mid, so the job takes no resize); an
 *     export of mid made before the commit moves onto its commit_top
 *     filter and keeps serving;
 *   - intermediate block-commit holds the device named (its main node):
 *     another commit or a drive-mirror of it gets "Need a root block
 *     node", a blockdev-del that it is busy (and one of its file node
 *     that the block device is in use);
 *   - active block-commit: the same on mid, and a writable export of top
 *     is refused one level down (top's backing edge wants consistent read
 *     of mid);
 *   - a mirror completed with a writable export on the source: once the
 *     filter has let go (QEMU's `stop`) and moved the export onto the
 *     target, the old source takes any user and the target refuses a node
 *     that does not share write with the export.
 * Reopens of other drivers:
 *   - block-stream into a read-only qcow2 whose dirty bit is set (lazy
 *     refcounts): QEMU reopens it read-write without a word, streams, and
 *     marks it clean when it goes read-only again;
 *   - block-stream into a read-only qcow2 whose file is an NBD export:
 *     read-only export → "Can't reopen read-only NBD mount as read/write";
 *     writable export → the reopen passes (the stream's copy then fails,
 *     "Invalid argument", on both daemons alike);
 *   - block-stream whose device is a read-only blkdebug filter over a
 *     writable image: QEMU reopens the node named (the filter), not the
 *     image below it, and makes it read-only again at the end.
 * Build first (npm run build).
 */
import fs from 'node:fs';
import { afterEach, describe, expect, it } from 'vitest';
import { missingPeers } from '../helpers/peers.js';
import { startQemuNbd, stopAllPeers } from '../helpers/nbd-peers.js';
import { pairRunner } from '../helpers/qsd-compare.js';
import { createImage, imageFacts, must, qemuIo, QsdSession, stopAllSessions } from '../helpers/qsd-script.js';
import { scratchDir } from '../helpers/tmp.js';

const root = scratchDir('qbt-qsd-job-perms-');
afterEach(async () => {
  await stopAllSessions();
  await stopAllPeers();
});
const both = pairRunner(root);

/** A job limited to this rate is still running for the whole script. */
const CRAWL_BYTES_PER_SECOND = 1;
/** Byte of the qcow2 header holding the low bits of incompatible_features (big-endian u64 at 72). */
const INCOMPAT_LOW_BYTE = 79;
const INCOMPAT_DIRTY = 0x1;

/** base (data) ← mid (data) ← top, all writable, over named file nodes; an NBD server. */
async function setUp(s: QsdSession): Promise<void> {
  await createImage(s.dir, 'base.qcow2', '4M');
  await qemuIo(s.dir, 'base.qcow2', 'write -P 1 0 4M');
  await createImage(s.dir, 'mid.qcow2', '4M', { backing: 'base.qcow2' });
  await qemuIo(s.dir, 'mid.qcow2', 'write -P 2 1M 2M');
  await createImage(s.dir, 'top.qcow2', '4M', { backing: 'mid.qcow2' });
  await s.ok('blockdev-add', { driver: 'qcow2', 'node-name': 'base', file: { ...s.fileRef('base.qcow2'), 'node-name': 'basef' } });
  await s.ok('blockdev-add', { driver: 'qcow2', 'node-name': 'mid', backing: 'base', file: { ...s.fileRef('mid.qcow2'), 'node-name': 'midf' } });
  await s.ok('blockdev-add', { driver: 'qcow2', 'node-name': 'top', backing: 'mid', file: { ...s.fileRef('top.qcow2'), 'node-name': 'topf' } });
  await s.ok('nbd-server-start', { addr: { type: 'unix', data: { path: s.f('nbd.sock') } } });
}

/** An NBD export of `node` (named after its id). */
function exportOf(s: QsdSession, id: string, node: string, writable = false) {
  return s.exec('block-export-add', { type: 'nbd', id, 'node-name': node, name: id, writable });
}

/** Runs `body` after `prepare` on both daemons, stops jobs, quits; expects the same outcomes, command by command. */
async function expectSameOutcomes(name: string, body: (s: QsdSession) => Promise<unknown>, prepare = setUp): Promise<void> {
  const [theirs, ours] = await both(name, async (s) => {
    await prepare(s);
    const extra = await body(s);
    await s.stopJobs();
    expect(await s.quit()).toBe(0);
    return { outcomes: s.outcomes, extra: extra ?? null };
  });
  theirs.outcomes.forEach((t, i) => expect(ours.outcomes[i], t[0]).toEqual(t));
  expect(ours).toEqual(theirs);
}

/** The graph as names, drivers, read-only flags and whether a backing image is named (automatic names as '#auto'). */
function graphView(list: unknown): unknown {
  const nodes = (list as Array<Record<string, unknown>>).map((n) => [
    String(n['node-name']).startsWith('#') ? '#auto' : n['node-name'],
    n.drv,
    n.ro,
    n.backing_file ? 'backing' : '-',
  ]);
  return nodes.sort((a, b) => JSON.stringify(a).localeCompare(JSON.stringify(b)));
}

/** Runs a block-stream of `device` to the end (bounded wait) and records the graph after it. */
async function streamToEnd(s: QsdSession, device: string): Promise<void> {
  const o = await s.exec('block-stream', { 'job-id': 'j', device });
  if ('return' in o) await s.waitEvent('JOB_STATUS_CHANGE', (d) => d.id === 'j' && d.status === 'null');
  await s.exec('query-named-block-nodes', {}, graphView);
}

/** Sets the dirty bit of a qcow2 v3 image in place (as a crash with lazy refcounts leaves it; refcounts stay right). */
function setDirtyBit(file: string): void {
  const fd = fs.openSync(file, 'r+');
  try {
    const b = Buffer.alloc(1);
    fs.readSync(fd, b, 0, 1, INCOMPAT_LOW_BYTE);
    b[0]! |= INCOMPAT_DIRTY;
    fs.writeSync(fd, b, 0, 1, INCOMPAT_LOW_BYTE);
  } finally {
    fs.closeSync(fd);
  }
}

/** qemu-img info's dirty flag of an image. */
async function dirtyFlag(dir: string, name: string): Promise<unknown> {
  return (JSON.parse(await must(dir, 'qemu-img', ['info', '-U', '--output=json', name])) as Record<string, unknown>)['dirty-flag'];
}

/** b2 (64 KiB of data) ← t2, t2 with lazy refcounts. */
async function smallChain(s: QsdSession): Promise<void> {
  await createImage(s.dir, 'b2.qcow2', '4M');
  await qemuIo(s.dir, 'b2.qcow2', 'write -P 7 0 64k');
  await must(s.dir, 'qemu-img', ['create', '-q', '-f', 'qcow2', '-o', 'lazy_refcounts=on', '-b', 'b2.qcow2', '-F', 'qcow2', 't2.qcow2']);
}

/** The NBD case: t2.qcow2 served by qemu-nbd (read-only or not) as t2's file, then streamed into. */
async function nbdFileStream(s: QsdSession, readOnlyExport: boolean) {
  await smallChain(s);
  const server = await startQemuNbd({ unix: s.dir, name: 'qemu-nbd' }, { image: s.f('t2.qcow2'), format: 'raw', readOnly: readOnlyExport });
  await s.ok('blockdev-add', { driver: 'qcow2', 'node-name': 'b2', 'read-only': true, file: s.fileRef('b2.qcow2') });
  const nbdFile = { driver: 'nbd', server: { type: 'unix', path: server.socket }, export: 'exp' };
  await s.ok('blockdev-add', { driver: 'qcow2', 'node-name': 't2', 'read-only': true, backing: 'b2', file: nbdFile });
  await streamToEnd(s, 't2');
  await s.exec('blockdev-del', { 'node-name': 't2' });
  await server.stop();
  return { events: s.jobEvents('j'), map: await must(s.dir, 'qemu-img', ['map', '--output=json', 't2.qcow2']) };
}

describe.skipIf(missingPeers('qemu-storage-daemon', 'qemu-img', 'qemu-io'))('job permissions beside qemu-storage-daemon', () => {
  it("block-stream of the whole chain: mid and base refuse writers, the device does not", async () => {
    await expectSameOutcomes('stream-all', async (s) => {
      await s.exec('block-stream', { 'job-id': 'j', device: 'top', speed: CRAWL_BYTES_PER_SECOND });
      await exportOf(s, 'e1', 'mid', true);
      await exportOf(s, 'e2', 'mid');
      await exportOf(s, 'e3', 'top', true);
      await exportOf(s, 'e4', 'base', true);
      await s.exec('blockdev-add', { driver: 'raw', 'node-name': 'r', file: 'mid' });
      await s.exec('blockdev-add', { driver: 'blkdebug', 'node-name': 'bd', image: 'top', 'take-child-perms': ['resize'] });
    });
  });

  it('block-stream down to base: mid refuses writers, and base through mid', async () => {
    await expectSameOutcomes('stream-base', async (s) => {
      await s.exec('block-stream', { 'job-id': 'j', device: 'top', 'base-node': 'base', speed: CRAWL_BYTES_PER_SECOND });
      await exportOf(s, 'e1', 'mid', true);
      await exportOf(s, 'e2', 'base', true);
      await exportOf(s, 'e3', 'base');
      await s.exec('block-stream', { 'job-id': 'j2', device: 'mid' });
    });
  });

  it('intermediate block-commit: mid shares no consistent read, base no write', async () => {
    await expectSameOutcomes('commit', async (s) => {
      await s.exec('block-commit', { 'job-id': 'c', device: 'top', 'top-node': 'mid', 'base-node': 'base', speed: CRAWL_BYTES_PER_SECOND });
      await exportOf(s, 'e1', 'mid', true);
      await exportOf(s, 'e2', 'mid');
      await exportOf(s, 'e3', 'base', true);
      await exportOf(s, 'e4', 'base');
      await exportOf(s, 'e5', 'top', true);
    });
  });

  it('intermediate block-commit holds its device: a second commit, a mirror and a delete of it are refused', async () => {
    await expectSameOutcomes('commit-device', async (s) => {
      await s.exec('block-commit', { 'job-id': 'c', device: 'top', 'top-node': 'mid', 'base-node': 'base', speed: CRAWL_BYTES_PER_SECOND });
      await s.exec('block-commit', { 'job-id': 'c2', device: 'top', 'top-node': 'mid', 'base-node': 'base' });
      await s.exec('block-commit', { 'job-id': 'c3', device: 'top' });
      await s.exec('drive-mirror', { 'job-id': 'm', device: 'top', target: s.f('copy.qcow2'), sync: 'full' });
      await s.exec('blockdev-del', { 'node-name': 'top' });
      await s.exec('blockdev-del', { 'node-name': 'topf' });
    });
  });

  it('active block-commit: mid refuses readers, and a writable export of top through its backing edge', async () => {
    await expectSameOutcomes('active-commit', async (s) => {
      await s.exec('block-commit', { 'job-id': 'c', device: 'top', 'base-node': 'base', speed: CRAWL_BYTES_PER_SECOND });
      await exportOf(s, 'e1', 'mid', true);
      await exportOf(s, 'e2', 'mid');
      await exportOf(s, 'e3', 'base', true);
      await exportOf(s, 'e4', 'top', true);
    });
  });

  it('an export of mid made before an intermediate commit moves onto the filter; a new one is refused', async () => {
    await expectSameOutcomes('commit-export-first', async (s) => {
      await exportOf(s, 'e1', 'mid');
      await s.exec('block-commit', { 'job-id': 'c', device: 'top', 'top-node': 'mid', 'base-node': 'base', speed: CRAWL_BYTES_PER_SECOND });
      await exportOf(s, 'e2', 'mid');
      await s.exec('block-stream', { 'job-id': 'j', device: 'mid' });
      await s.exec('query-named-block-nodes', {}, graphView);
    });
  });

  it('a completed mirror: the filter lets go, the export moves onto the target', async () => {
    await expectSameOutcomes('mirror-pivot', async (s) => {
      await createImage(s.dir, 't.qcow2', '4M');
      await s.ok('blockdev-add', { driver: 'qcow2', 'node-name': 't', file: { ...s.fileRef('t.qcow2'), 'node-name': 'tf' } });
      await exportOf(s, 'e1', 'top', true);
      await s.exec('blockdev-mirror', { 'job-id': 'm', device: 'top', target: 't', sync: 'full' });
      await exportOf(s, 'e2', 'top', true);
      await s.waitEvent('BLOCK_JOB_READY', (d) => d.device === 'm');
      await s.exec('job-complete', { id: 'm' });
      await s.waitEvent('JOB_STATUS_CHANGE', (d) => d.id === 'm' && d.status === 'null');
      await exportOf(s, 'e3', 'top', true);
      await s.exec('blockdev-add', { driver: 'blkdebug', 'node-name': 'bd', image: 't', 'unshare-child-perms': ['write'] });
      await s.exec('blockdev-add', { driver: 'blkdebug', 'node-name': 'bd2', image: 'top', 'unshare-child-perms': ['write'] });
      await s.exec('query-named-block-nodes', {}, graphView);
      return s.jobEvents('m');
    });
  });

  it('a read-only qcow2 with its dirty bit set is reopened read-write for a stream, and marked clean after', async () => {
    await expectSameOutcomes(
      'dirty-reopen',
      async (s) => {
        setDirtyBit(s.f('t2.qcow2'));
        const before = await dirtyFlag(s.dir, 't2.qcow2');
        await s.ok('blockdev-add', { driver: 'qcow2', 'node-name': 'b2', 'read-only': true, file: s.fileRef('b2.qcow2') });
        await s.ok('blockdev-add', { driver: 'qcow2', 'node-name': 't2', 'read-only': true, backing: 'b2', file: s.fileRef('t2.qcow2') });
        await streamToEnd(s, 't2');
        await s.exec('blockdev-del', { 'node-name': 't2' });
        return { before, after: await dirtyFlag(s.dir, 't2.qcow2'), events: s.jobEvents('j'), facts: await imageFacts(s.dir, 't2.qcow2') };
      },
      smallChain,
    );
  });

  it("a stream into a qcow2 over a read-only NBD export: QEMU's reopen refusal", async () => {
    await expectSameOutcomes('nbd-read-only', (s) => nbdFileStream(s, true), async () => undefined);
  });

  it('a stream into a qcow2 over a writable NBD export reopens it', async () => {
    await expectSameOutcomes('nbd-writable', (s) => nbdFileStream(s, false), async () => undefined);
  });

  it('block-stream of a read-only filter over a writable image reopens the filter, as QEMU', async () => {
    await expectSameOutcomes(
      'filter-device',
      async (s) => {
        await s.ok('blockdev-add', { driver: 'qcow2', 'node-name': 'b2', 'read-only': true, file: s.fileRef('b2.qcow2') });
        await s.ok('blockdev-add', { driver: 'qcow2', 'node-name': 't2', backing: 'b2', file: s.fileRef('t2.qcow2') });
        await s.ok('blockdev-add', { driver: 'blkdebug', 'node-name': 'f', 'read-only': true, image: 't2' });
        await s.exec('query-named-block-nodes', {}, graphView);
        await streamToEnd(s, 'f');
        return s.jobEvents('j');
      },
      smallChain,
    );
  });
});
