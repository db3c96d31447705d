/*
 * block_resize beside qemu-storage-daemon 7.2: the same QMP script runs on
 * both daemons (test/helpers/qsd-compare.ts) and every command gives the
 * same return value or error text; the images left behind are the same
 * (qemu-img info, map, check).
 *
 * Covered: lookups (node-name only: the daemon has no named devices),
 * a negative size, growing a qcow2 and a raw image, a size qcow2 refuses
 * (not a multiple of 512), shrinking a qcow2 whose tail holds no data, an
 * NBD export on the node (it shares no resize: the permission conflict),
 * a node a running job holds ("Device '(null)' is in use"), and the new
 * size as the export's clients see it after a resize done before it
 * exported. Build first (npm run build).
 */
import { afterEach, describe, expect, it } from 'vitest';
import { missingPeers } from '../helpers/peers.js';
import { pairRunner } from '../helpers/qsd-compare.js';
import { createImage, imageFacts, must, qemuIo, QsdSession, stopAllSessions } from '../helpers/qsd-script.js';
import { scratchDir } from '../helpers/tmp.js';

const root = scratchDir('qbt-qsd-resize-');
afterEach(stopAllSessions);
const both = pairRunner(root);

const MiB = 1 << 20;
/** A job limited to this rate is still running when the resize comes. */
const CRAWL_BYTES_PER_SECOND = 1;

/** The size query-named-block-nodes reports for `node`. */
function virtualSize(node: string) {
  return (list: unknown) => (list as Array<{ 'node-name': string; image: { 'virtual-size': number } }>).find((n) => n['node-name'] === node)?.image['virtual-size'];
}

async function script(s: QsdSession) {
  await createImage(s.dir, 'a.qcow2', '4M');
  await createImage(s.dir, 'r.raw', '1M', { fmt: 'raw' });
  await createImage(s.dir, 'b.qcow2', '4M');
  await qemuIo(s.dir, 'b.qcow2', 'write -P 3 0 4M');
  await createImage(s.dir, 'c.qcow2', '4M', { backing: 'b.qcow2' });
  await s.ok('blockdev-add', { driver: 'qcow2', 'node-name': 'a', file: s.fileRef('a.qcow2') });
  await s.ok('blockdev-add', { driver: 'raw', 'node-name': 'r', file: s.fileRef('r.raw') });
  await s.exec('block_resize', { 'node-name': 'nope', size: MiB });
  await s.exec('block_resize', { device: 'nope', size: MiB });
  await s.exec('block_resize', { size: MiB });
  await s.exec('block_resize', { device: 'x', 'node-name': 'a', size: 6 * MiB });
  await s.exec('block_resize', { 'node-name': 'a', size: -1 });
  await s.exec('block_resize', { 'node-name': 'a', size: 8 * MiB });
  await s.exec('block_resize', { 'node-name': 'a', size: MiB - 1 });
  await s.exec('block_resize', { 'node-name': 'a', size: 2 * MiB });
  await s.exec('block_resize', { 'node-name': 'r', size: 3 * MiB + 512 });
  await s.exec('query-named-block-nodes', { flat: true }, virtualSize('a'));
  await s.ok('nbd-server-start', { addr: { type: 'unix', data: { path: s.f('nbd.sock') } } });
  await s.exec('block-export-add', { type: 'nbd', id: 'e', 'node-name': 'a' });
  const exportSize = (await must(s.dir, 'nbdinfo', ['--size', `nbd+unix:///a?socket=${s.f('nbd.sock')}`])).trim();
  await s.exec('block_resize', { 'node-name': 'a', size: 4 * MiB });
  await s.ok('blockdev-add', { driver: 'qcow2', 'node-name': 'c', file: s.fileRef('c.qcow2') });
  await s.exec('block-stream', { 'job-id': 's', device: 'c', speed: CRAWL_BYTES_PER_SECOND });
  await s.exec('block_resize', { 'node-name': 'c', size: 8 * MiB });
  await s.stopJobs();
  expect(await s.quit()).toBe(0);
  return {
    outcomes: s.outcomes,
    exportSize,
    a: await imageFacts(s.dir, 'a.qcow2'),
    r: await imageFacts(s.dir, 'r.raw', 'raw'),
  };
}

describe.skipIf(missingPeers('qemu-storage-daemon', 'qemu-img', 'qemu-io', 'nbdinfo'))('block_resize beside qemu-storage-daemon', () => {
  it('gives the same answers and leaves the same images', async () => {
    const [theirs, ours] = await both('resize', script);
    theirs.outcomes.forEach((t, i) => expect(ours.outcomes[i], t[0]).toEqual(t));
    expect(ours).toEqual(theirs);
  });
});
