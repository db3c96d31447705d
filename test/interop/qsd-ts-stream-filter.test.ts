/*
 * The filters stream and intermediate commit insert, and the copy-on-read
 * filter on its own, beside qemu-storage-daemon 7.2: one QMP script per
 * case, run on both daemons (test/helpers/qsd-compare.ts), compared on
 *   - the graph while the job runs (held by speed 1, released later with
 *     block-job-set-speed 0): query-named-block-nodes as node name
 *     (automatic ones as '#auto'), driver, read-only, backing depth,
 *     backing file and file name (QEMU's json: names reduced to the file
 *     inside, a known difference of filename descriptions), and the image
 *     chain's formats; query-block-exports (exports move onto the filter);
 *   - reads through NBD exports while the filter is there (qemu-io), whose
 *     copies show in the final `qemu-img map`: a stream's filter copies the
 *     streamed layer's data but not the base's;
 *   - job events by type and status, and the graph after the job ended,
 *     was cancelled or refused (duplicate / invalid filter-node-name);
 *   - after quit: qemu-img compare with a raw reference of the top, check,
 *     info --backing-chain, map.
 * Build first (npm run build): the tests run dist/.
 */
import { afterEach, describe, expect, it } from 'vitest';
import { missingPeers } from '../helpers/peers.js';
import { expectSame, IDENTICAL, pairRunner } from '../helpers/qsd-compare.js';
import { compareImages, createImage, imageFacts, must, qemuIo, QsdSession, stopAllSessions } from '../helpers/qsd-script.js';
import { scratchDir } from '../helpers/tmp.js';

const root = scratchDir('qbt-qsd-stream-filter-');
afterEach(stopAllSessions);
const both = pairRunner(root);

/** base (0x01 at 0..1M, 0x0a at 3M) ← mid (0x02 at 1M..2M, zeroes at 3M) ← top (0x03 at 2M, 64k). */
async function threeLayers(dir: string): Promise<void> {
  await createImage(dir, 'base.qcow2', '4M');
  await qemuIo(dir, 'base.qcow2', 'write -P 1 0 1M', 'write -P 10 3M 64k');
  await createImage(dir, 'mid.qcow2', '4M', { backing: 'base.qcow2' });
  await qemuIo(dir, 'mid.qcow2', 'write -P 2 1M 1M', 'write -z 3M 64k');
  await createImage(dir, 'top.qcow2', '4M', { backing: 'mid.qcow2' });
  await qemuIo(dir, 'top.qcow2', 'write -P 3 2M 64k');
  await must(dir, 'qemu-img', ['convert', '-f', 'qcow2', '-O', 'raw', 'top.qcow2', 'ref.raw']);
}

async function openThree(s: QsdSession): Promise<void> {
  await s.ok('blockdev-add', { driver: 'qcow2', 'node-name': 'base', file: s.fileRef('base.qcow2') });
  await s.ok('blockdev-add', { driver: 'qcow2', 'node-name': 'mid', backing: 'base', file: s.fileRef('mid.qcow2') });
  await s.ok('blockdev-add', { driver: 'qcow2', 'node-name': 'top', backing: 'mid', file: s.fileRef('top.qcow2') });
}

/** A file name as a path: QEMU's json:{…} description reduced to the innermost `filename`. */
function plainName(f: unknown): unknown {
  if (typeof f !== 'string' || !f.startsWith('json:')) return f;
  let o = JSON.parse(f.slice(5)) as Record<string, unknown>;
  while (typeof o.file === 'object' && o.file !== null) o = o.file as Record<string, unknown>;
  return o.filename;
}

type ImageChain = { format: string; filename: string; 'backing-image'?: ImageChain };

/** query-named-block-nodes (not flat) reduced to what the graph looks like (see the note at the top). */
function graphView(list: unknown): unknown {
  return (list as Array<Record<string, unknown>>)
    .map((n) => {
      const formats: unknown[] = [];
      for (let i: ImageChain | undefined = n.image as ImageChain; i; i = i['backing-image']) formats.push([i.format, plainName(i.filename)]);
      const name = String(n['node-name']);
      return { name: name.startsWith('#') ? '#auto' : name, drv: n.drv, ro: n.ro, depth: n.backing_file_depth, backing: plainName(n.backing_file), file: plainName(n.file), formats };
    })
    .filter((n) => n.drv !== 'file')
    .sort((a, b) => JSON.stringify(a).localeCompare(JSON.stringify(b)));
}

/** query-block-exports with automatic node names as '#auto'. */
function exportsView(list: unknown): unknown {
  return (list as Array<Record<string, unknown>>).map((e) => ({ ...e, 'node-name': String(e['node-name']).startsWith('#') ? '#auto' : e['node-name'] }));
}

async function startNbd(s: QsdSession, exports: Array<[string, string]>): Promise<void> {
  await s.ok('nbd-server-start', { addr: { type: 'unix', data: { path: s.f('nbd.sock') } } });
  for (const [id, node] of exports) await s.ok('block-export-add', { type: 'nbd', id, 'node-name': node, name: id });
}

/** qemu-io reads (with their expected pattern) through export `name`; the output without timings. */
async function nbdReads(s: QsdSession, name: string, reads: string[]): Promise<string> {
  const uri = `nbd+unix:///${name}?socket=${s.f('nbd.sock')}`;
  const out = await must(s.dir, 'qemu-io', ['-r', '-f', 'raw', ...reads.flatMap((r) => ['-c', r]), uri]);
  return out.replace(/; [\d.]+ sec \(.*\)/g, '; (timing)');
}

async function graphNow(s: QsdSession): Promise<void> {
  await s.exec('query-named-block-nodes', {}, graphView);
  await s.exec('query-block-exports', undefined, exportsView);
}

async function finish(s: QsdSession, id: string, result = 'top.qcow2') {
  await graphNow(s);
  expect(await s.quit()).toBe(0);
  return {
    outcomes: s.outcomes,
    events: s.jobEvents(id),
    compare: await compareImages(s.dir, 'ref.raw', 'raw', result, 'qcow2'),
    chain: await imageFacts(s.dir, result),
  };
}

/** Cancels the held job, or releases it (speed 0) and lets it complete; waits until no job is left. */
async function endJob(s: QsdSession, id: string, cancel: boolean): Promise<void> {
  if (cancel) {
    await s.exec('job-cancel', { id });
    await s.waitEvent('BLOCK_JOB_CANCELLED', (d) => d.device === id);
  } else {
    await s.exec('block-job-set-speed', { device: id, speed: 0 });
    await s.waitEvent('BLOCK_JOB_COMPLETED', (d) => d.device === id);
  }
  await s.waitNoJobs();
}

type StreamCase = 'named' | 'implicit' | 'cancel';

/**
 * block-stream base-node base, held by speed 1 after its first chunk; the
 * graph and exports while it runs; reads of the base's and of mid's data
 * through an export; then released (or cancelled).
 */
async function streamScript(s: QsdSession, kind: StreamCase) {
  await threeLayers(s.dir);
  await openThree(s);
  const filter = kind === 'implicit' ? {} : { 'filter-node-name': 'cor' };
  await startNbd(s, [['e0', 'top']]);
  await s.exec('block-stream', { 'job-id': 'j', device: 'top', 'base-node': 'base', speed: 1, ...filter });
  await graphNow(s);
  if (kind === 'named') await s.ok('block-export-add', { type: 'nbd', id: 'e1', 'node-name': 'cor', name: 'e1' });
  const reads = await nbdReads(s, kind === 'named' ? 'e1' : 'e0', ['read -P 1 4k 4k', 'read -P 2 1600k 4k', 'read -P 0 3M 64k']);
  await endJob(s, 'j', kind === 'cancel');
  if (kind === 'named') await s.exec('block-export-del', { id: 'e1' });
  return { ...(await finish(s, 'j')), reads };
}

/** block-commit top-node mid into base, held by speed 1; graph while it runs; released or cancelled. */
async function commitScript(s: QsdSession, kind: 'named' | 'implicit' | 'cancel') {
  await threeLayers(s.dir);
  await openThree(s);
  const filter = kind === 'implicit' ? {} : { 'filter-node-name': 'ct' };
  await startNbd(s, [['e0', 'top']]);
  await s.exec('block-commit', { 'job-id': 'c', device: 'top', 'top-node': 'mid', 'base-node': 'base', speed: 1, ...filter });
  await graphNow(s);
  const reads = await nbdReads(s, 'e0', ['read -P 1 4k 4k', 'read -P 2 1600k 4k', 'read -P 3 2M 64k']);
  await endJob(s, 'c', kind === 'cancel');
  return { ...(await finish(s, 'c')), reads };
}

/** filter-node-name refusals: a name in use, an invalid name; the graph is left as it was. */
async function refusalScript(s: QsdSession) {
  await threeLayers(s.dir);
  await openThree(s);
  await s.exec('block-stream', { 'job-id': 'j', device: 'top', 'filter-node-name': 'mid' });
  await s.exec('block-stream', { 'job-id': 'j', device: 'top', 'filter-node-name': '#x' });
  await s.exec('block-stream', { device: 'top', 'filter-node-name': 'ok' });
  await s.exec('block-commit', { 'job-id': 'c', device: 'top', 'top-node': 'mid', 'filter-node-name': 'base' });
  await s.exec('block-commit', { 'job-id': 'c', device: 'top', 'top-node': 'mid', 'filter-node-name': '#x' });
  await s.exec('block-commit', { 'job-id': 'c', device: 'top', 'top-node': 'mid', speed: -1, 'filter-node-name': 'ok' });
  await s.exec('block-stream', { 'job-id': 'j', device: 'top', speed: -1, 'filter-node-name': 'ok' });
  return { ...(await finish(s, 'j')), commitEvents: s.jobEvents('c') };
}

/** blockdev-add copy-on-read (with and without bottom) above top, reads through exports, blockdev-del. */
async function standaloneScript(s: QsdSession) {
  await threeLayers(s.dir);
  await openThree(s);
  await s.exec('blockdev-add', { driver: 'copy-on-read', 'node-name': 'all', file: 'top' });
  await s.exec('blockdev-add', { driver: 'copy-on-read', 'node-name': 'above-mid', file: 'top', bottom: 'mid' });
  await s.exec('blockdev-add', { driver: 'copy-on-read', 'node-name': 'x1', file: 'top', bottom: 'nosuch' });
  await s.exec('blockdev-add', { driver: 'copy-on-read', 'node-name': 'x2', file: 'top', bottom: 'all' });
  await s.exec('blockdev-add', { driver: 'copy-on-read', 'node-name': 'x3' });
  await s.exec('blockdev-add', { driver: 'copy-on-read', 'node-name': 'x4', file: 'top', bottom: 5 });
  await graphNow(s);
  await startNbd(s, [['all', 'all'], ['above-mid', 'above-mid']]);
  // Through `above-mid`: mid's data and zeroes are copied, base's are not.
  const readsMid = await nbdReads(s, 'above-mid', ['read -P 1 0 64k', 'read -P 2 1M 128k', 'read -P 0 3M 4k']);
  // Through `all`: base's data too, and a range no layer allocates (as zeroes).
  const readsAll = await nbdReads(s, 'all', ['read -P 1 512k 4k', 'read -P 0 3200k 64k']);
  for (const id of ['all', 'above-mid']) await s.exec('block-export-del', { id });
  await s.waitEvent('BLOCK_EXPORT_DELETED', (d) => d.id === 'above-mid');
  await s.exec('blockdev-del', { 'node-name': 'all' });
  await s.exec('blockdev-del', { 'node-name': 'above-mid' });
  return { ...(await finish(s, 'none')), readsMid, readsAll };
}

describe.skipIf(missingPeers('qemu-storage-daemon', 'qemu-img', 'qemu-io'))('stream and commit filters beside qemu-storage-daemon 7.2', () => {
  for (const kind of ['named', 'implicit', 'cancel'] as const) {
    it(`block-stream (${kind} copy-on-read filter): same graph while running, reads, events and image`, async () => {
      const [theirs, ours] = await both(`stream-${kind}`, (s) => streamScript(s, kind));
      expect(theirs.compare).toEqual(IDENTICAL);
      expectSame(theirs, ours, { progress: kind !== 'cancel' });
    });
  }

  for (const kind of ['named', 'implicit', 'cancel'] as const) {
    it(`block-commit of mid (${kind} commit_top filter): same graph while running, events and images`, async () => {
      const [theirs, ours] = await both(`commit-${kind}`, (s) => commitScript(s, kind));
      expect(theirs.compare).toEqual(IDENTICAL);
      expectSame(theirs, ours, { progress: kind !== 'cancel' });
    });
  }

  it('filter-node-name refusals: same errors, no job, graph unchanged', async () => {
    const [theirs, ours] = await both('refusals', refusalScript);
    expectSame(theirs, ours);
  });

  it('blockdev-add copy-on-read: reads through exports allocate the same clusters in top', async () => {
    const [theirs, ours] = await both('standalone', standaloneScript);
    expect(theirs.compare).toEqual(IDENTICAL);
    expectSame(theirs, ours);
  });
});
