/*
 * Permission conflicts beside qemu-storage-daemon 7.2: the same QMP
 * scripts run against both daemons (pairRunner) and every command gives the
 * same return value or the same error text ("Permission conflict on node
 * 'x': permissions '...' are both required by ... and unshared by ...").
 *
 *   - a mirror's target: NBD exports of it (writable and read-only) are
 *     refused by the mirror's own backend; the source stays exportable;
 *   - a node under a format node: a writable export of the file node, a
 *     read-only one (the format node resizes), a second format node;
 *   - a backup's copy-before-write filter (QEMU's cbw_child_perm): once the
 *     filter sits on the source, a writable export of the source is refused
 *     (read-only is fine); an export made before the backup moves onto the
 *     filter and the backup starts; the target stays exportable, writable
 *     too (the filter shares writes on it).
 *   - permissions derived from a node's users (block/perms.ts): a mirror
 *     target's file node refuses a writable export for 'consistent read,
 *     write' (the format node passes on what the mirror leaves unshared);
 *     a raw node without users takes nothing on its file, so it can sit
 *     beside a format node; a read-only node refuses a writable format, a
 *     copy-on-read filter and a writable export above it; blkdebug's
 *     take-child-perms / unshare-child-perms add to and take from its
 *     image edge (QEMU 7.2 refuses 'graph-mod').
 *
 * Automatic node names (#blockNNN) are numbered differently and are
 * compared as #block. Build first (npm run build).
 */
import { afterEach, describe, expect, it } from 'vitest';
import { missingPeers } from '../helpers/peers.js';
import { pairRunner } from '../helpers/qsd-compare.js';
import { createImage, qemuIo, QsdSession, stopAllSessions } from '../helpers/qsd-script.js';
import { scratchDir } from '../helpers/tmp.js';

const root = scratchDir('qbt-qsd-perm-');
afterEach(stopAllSessions);
const both = pairRunner(root);

/** A backup limited to this rate stays running for the whole script (4 MiB of data to copy). */
const CRAWL_BYTES_PER_SECOND = 1;

/** src (4 MiB of data) and t1 (empty), qcow2 over named file nodes srcf/t1f, and an NBD server. */
async function setUp(s: QsdSession): Promise<void> {
  await createImage(s.dir, 'src.qcow2', '4M');
  await createImage(s.dir, 't1.qcow2', '4M');
  await qemuIo(s.dir, 'src.qcow2', 'write -P 0xab 0 4M');
  await s.ok('blockdev-add', { driver: 'qcow2', 'node-name': 'src', file: { ...s.fileRef('src.qcow2'), 'node-name': 'srcf' } });
  await s.ok('blockdev-add', { driver: 'qcow2', 'node-name': 't1', file: { ...s.fileRef('t1.qcow2'), 'node-name': 't1f' } });
  await s.ok('nbd-server-start', { addr: { type: 'unix', data: { path: s.f('nbd.sock') } } });
}

/** An NBD export of `node` (named after its id). */
function exportOf(s: QsdSession, id: string, node: string, writable = false) {
  return s.exec('block-export-add', { type: 'nbd', id, 'node-name': node, name: id, writable });
}

function backup(s: QsdSession, extra: Record<string, unknown> = {}) {
  return s.exec('blockdev-backup', { 'job-id': 'b', device: 'src', target: 't1', sync: 'full', speed: CRAWL_BYTES_PER_SECOND, ...extra });
}

/** The outcomes with automatic node names made alike. */
function stable(outcomes: unknown): unknown {
  return JSON.parse(JSON.stringify(outcomes).replace(/#block\d+/g, '#block'));
}

/** Runs `body` after setUp on both daemons, stops jobs, quits; expects the same outcomes, command by command. */
async function expectSameOutcomes(name: string, body: (s: QsdSession) => Promise<void>): Promise<void> {
  const [theirs, ours] = await both(name, async (s) => {
    await setUp(s);
    await body(s);
    await s.stopJobs();
    expect(await s.quit()).toBe(0);
    return stable(s.outcomes) as Array<[string, unknown]>;
  });
  theirs.forEach((t, i) => expect(ours[i], t[0]).toEqual(t));
  expect(ours).toHaveLength(theirs.length);
}

describe.skipIf(missingPeers('qemu-storage-daemon', 'qemu-img', 'qemu-io'))('permission conflicts beside qemu-storage-daemon', () => {
  it("a mirror's target refuses exports; the source and its users stay as they were", async () => {
    await expectSameOutcomes('mirror', async (s) => {
      await s.exec('blockdev-mirror', { 'job-id': 'm', device: 'src', target: 't1', sync: 'full' });
      await exportOf(s, 'e1', 't1', true);
      await exportOf(s, 'e2', 't1');
      await exportOf(s, 'e3', 'src', true);
      await exportOf(s, 'e4', 'srcf');
    });
  });

  it('a file node under a format node: exports and a second format node are refused', async () => {
    await expectSameOutcomes('file-node', async (s) => {
      await exportOf(s, 'e1', 'srcf', true);
      await exportOf(s, 'e2', 'srcf');
      await s.exec('blockdev-add', { driver: 'qcow2', 'node-name': 'q2', file: 'srcf' });
      await exportOf(s, 'e3', 'src', true);
      await exportOf(s, 'e4', 'src', true);
    });
  });

  it("backup, then exports: the source refuses writers under the filter, the target takes them", async () => {
    await expectSameOutcomes('backup-first', async (s) => {
      await backup(s, { 'filter-node-name': 'cbw' });
      await exportOf(s, 'e1', 'src', true);
      await exportOf(s, 'e2', 'src');
      await exportOf(s, 'e3', 't1', true);
      await exportOf(s, 'e4', 't1');
      await exportOf(s, 'e5', 'cbw', true);
      await exportOf(s, 'e6', 'srcf', true);
    });
  });

  it('a writable export, then backup: the export moves onto the filter and both go on', async () => {
    await expectSameOutcomes('export-first', async (s) => {
      await exportOf(s, 'e1', 'src', true);
      await backup(s);
      await exportOf(s, 'e2', 'src', true);
      await exportOf(s, 'e3', 't1', true);
      await s.exec('blockdev-backup', { 'job-id': 'b2', device: 't1', target: 'src', sync: 'full' });
    });
  });

  it("a mirror target's file refuses consistent reads too (QEMU derives a node's sharing from its users)", async () => {
    await expectSameOutcomes('mirror-file', async (s) => {
      await s.exec('blockdev-mirror', { 'job-id': 'm', device: 'src', target: 't1', sync: 'full' });
      await exportOf(s, 'e1', 't1f', true);
    });
  });

  it('a read-only node refuses what would write it from above: a writable format, a copy-on-read filter, a writable export', async () => {
    await expectSameOutcomes('read-only-below', async (s) => {
      await createImage(s.dir, 'ro.qcow2', '4M');
      await s.exec('blockdev-add', { ...s.fileRef('ro.qcow2'), 'node-name': 'rof', 'read-only': true });
      await s.exec('blockdev-add', { driver: 'qcow2', 'node-name': 'q2', file: 'rof' });
      await s.exec('blockdev-add', { driver: 'copy-on-read', 'node-name': 'c2', file: 'rof' });
      await s.exec('blockdev-add', { driver: 'qcow2', 'node-name': 'q3', 'read-only': true, file: 'rof' });
      await exportOf(s, 'e1', 'q3', true);
      await exportOf(s, 'e2', 'q3');
    });
  });

  it("blkdebug's take-child-perms and unshare-child-perms change what it holds on its image", async () => {
    await expectSameOutcomes('blkdebug-perms', async (s) => {
      await s.exec('blockdev-add', { driver: 'blkdebug', 'node-name': 'b1', image: 'srcf', 'unshare-child-perms': ['consistent-read'] });
      await s.exec('blockdev-add', { driver: 'blkdebug', 'node-name': 'b2', image: 't1f', 'take-child-perms': ['write'] });
      await s.exec('blockdev-add', { driver: 'blkdebug', 'node-name': 'b3', image: 't1f', 'take-child-perms': ['consistent-read', 'graph-mod'] });
      await s.exec('blockdev-add', { driver: 'blkdebug', 'node-name': 'b4', image: 't1', 'unshare-child-perms': ['write'] });
      await exportOf(s, 'e1', 't1', true);
      await exportOf(s, 'e2', 'b4', true);
    });
  });

  it('a raw node without users takes nothing on its file', async () => {
    await expectSameOutcomes('raw-unused', async (s) => {
      await s.exec('blockdev-add', { driver: 'raw', 'node-name': 'r2', file: 'srcf' });
      await s.exec('blockdev-add', { driver: 'raw', 'node-name': 'r3', file: 'src' });
    });
  });
});
