/*
 * Jobs on read-only nodes beside qemu-storage-daemon 7.2: QEMU reopens the
 * node the job writes read-write in place (bdrv_reopen_set_read_only) and
 * read-only again when the job ends, so the monitor's node names keep
 * naming the same nodes and no extra node appears. One QMP script per case,
 * run on both daemons (test/helpers/qsd-compare.ts); the chain base ← mid ←
 * top is added with blockdev-add, every layer `read-only: true` (qcow2 over
 * an inline file node), and compared on:
 *   - query-named-block-nodes while the job runs (held by speed 1, then
 *     released with block-job-set-speed 0 or cancelled) and after it:
 *     every node (file nodes included) as name (automatic ones as '#auto'),
 *     driver, ro, backing file and file name (QEMU's json: names reduced to
 *     the file inside);
 *   - job events by type and status; after quit, qemu-img compare with a
 *     raw reference of the top (of the base after an active commit),
 *     check, info --backing-chain and map.
 * Cases: block-stream of the whole chain (completed, cancelled);
 * intermediate block-commit of mid into base (completed: top's header is
 * rewritten although top is read-only, as QEMU reopens it around the
 * rewrite; cancelled); active block-commit of top into base with
 * job-complete (a read-only top leaves the base read-only, a writable top
 * leaves it writable) and cancelled after READY (QEMU 7.2 leaves the base
 * writable); and a stream refused because top's file node was added by
 * name, read-only ("Block node is read-only").
 * Build first (npm run build): the tests run dist/.
 */
import { afterEach, describe, expect, it } from 'vitest';
import { missingPeers } from '../helpers/peers.js';
import { expectSame, IDENTICAL, pairRunner } from '../helpers/qsd-compare.js';
import { compareImages, createImage, imageFacts, must, qemuIo, QsdSession, stopAllSessions } from '../helpers/qsd-script.js';
import { scratchDir } from '../helpers/tmp.js';

const root = scratchDir('qbt-qsd-reopen-');
afterEach(stopAllSessions);
const both = pairRunner(root);

/** base (0x01 at 0..1M) ← mid (0x02 at 1M..2M) ← top (0x03 at 2M, 64k); raw references of top and of mid's view. */
async function threeLayers(dir: string): Promise<void> {
  await createImage(dir, 'base.qcow2', '4M');
  await qemuIo(dir, 'base.qcow2', 'write -P 1 0 1M');
  await createImage(dir, 'mid.qcow2', '4M', { backing: 'base.qcow2' });
  await qemuIo(dir, 'mid.qcow2', 'write -P 2 1M 1M');
  await createImage(dir, 'top.qcow2', '4M', { backing: 'mid.qcow2' });
  await qemuIo(dir, 'top.qcow2', 'write -P 3 2M 64k');
  await must(dir, 'qemu-img', ['convert', '-f', 'qcow2', '-O', 'raw', 'top.qcow2', 'ref.raw']);
}

/** The chain by blockdev-add; `topReadOnly` false leaves only the top writable. */
async function addChain(s: QsdSession, topReadOnly = true): Promise<void> {
  await s.ok('blockdev-add', { driver: 'qcow2', 'node-name': 'base', 'read-only': true, file: s.fileRef('base.qcow2') });
  await s.ok('blockdev-add', { driver: 'qcow2', 'node-name': 'mid', 'read-only': true, backing: 'base', file: s.fileRef('mid.qcow2') });
  await s.ok('blockdev-add', { driver: 'qcow2', 'node-name': 'top', 'read-only': topReadOnly, backing: 'mid', file: s.fileRef('top.qcow2') });
}

/** The file a json:{…} name describes (its innermost `file`), or the name as it is. */
function fileOf(name: unknown): unknown {
  if (typeof name !== 'string' || !name.startsWith('json:')) return name;
  let o = JSON.parse(name.slice('json:'.length)) as Record<string, unknown>;
  while (o.file !== null && typeof o.file === 'object') o = o.file as Record<string, unknown>;
  return o.filename;
}

/** The drivers whose `ro` a view leaves out (a known difference, asserted apart). */
type Masked = readonly string[];

/** query-named-block-nodes as the graph's shape (see the note at the top), sorted. */
function nodesView(list: unknown, masked: Masked = []): unknown {
  const nodes = (list as Array<Record<string, unknown>>).map((n) => ({
    name: String(n['node-name']).startsWith('#') ? '#auto' : n['node-name'],
    drv: n.drv,
    ro: masked.includes(String(n.drv)) ? '<masked>' : n.ro,
    backing: fileOf(n.backing_file),
    file: fileOf(n.file),
  }));
  return nodes.sort((a, b) => JSON.stringify(a).localeCompare(JSON.stringify(b)));
}

const queryNodes = (s: QsdSession, masked: Masked = []) => s.exec('query-named-block-nodes', {}, (v) => nodesView(v, masked));

/** `ro` of the mirror_top filter now (not recorded among the outcomes). */
async function mirrorTopReadOnly(s: QsdSession): Promise<unknown> {
  const nodes = await s.daemon.qmp.execute<Array<Record<string, unknown>>>('query-named-block-nodes');
  return nodes.find((n) => n.drv === 'mirror_top')?.ro;
}

/** Releases the held job (speed 0) until `event`, or cancels it; then waits until no job is left. */
async function endJob(s: QsdSession, cancel: boolean, event = 'BLOCK_JOB_COMPLETED'): Promise<void> {
  if (cancel) {
    await s.exec('job-cancel', { id: 'j' });
    await s.waitEvent('BLOCK_JOB_CANCELLED', (d) => d.device === 'j');
  } else {
    await s.exec('block-job-set-speed', { device: 'j', speed: 0 });
    await s.waitEvent(event, (d) => d.device === 'j');
  }
  await s.waitNoJobs();
}

/** The graph now, quit, and what qemu-img says about `result` (compared with the raw reference). */
async function finish(s: QsdSession, result: string) {
  await queryNodes(s);
  expect(await s.quit()).toBe(0);
  return {
    outcomes: s.outcomes,
    events: s.jobEvents('j'),
    compare: await compareImages(s.dir, 'ref.raw', 'raw', result, 'qcow2'),
    facts: await imageFacts(s.dir, result),
  };
}

/** block-stream of the whole chain into the read-only top, held, then completed or cancelled. */
async function streamScript(s: QsdSession, cancel: boolean) {
  await threeLayers(s.dir);
  await addChain(s);
  await s.ok('block-stream', { 'job-id': 'j', device: 'top', speed: 1 });
  await queryNodes(s);
  await endJob(s, cancel);
  return finish(s, 'top.qcow2');
}

/** block-commit of mid into base (both read-only, top too), held, then completed or cancelled. */
async function commitScript(s: QsdSession, cancel: boolean) {
  await threeLayers(s.dir);
  await addChain(s);
  await s.ok('block-commit', { 'job-id': 'j', device: 'top', 'top-node': 'mid', 'base-node': 'base', speed: 1 });
  await queryNodes(s);
  await endJob(s, cancel);
  return finish(s, 'top.qcow2');
}

type ActiveCase = 'complete' | 'cancel' | 'writable-top';

/** Active block-commit of top into base: READY, then job-complete (or a cancel). */
async function activeScript(s: QsdSession, kind: ActiveCase) {
  await threeLayers(s.dir);
  await addChain(s, kind !== 'writable-top');
  await s.ok('block-commit', { 'job-id': 'j', device: 'top', 'base-node': 'base' });
  await s.waitEvent('BLOCK_JOB_READY', (d) => d.device === 'j');
  await queryNodes(s, ['mirror_top']);
  const filterReadOnly = await mirrorTopReadOnly(s);
  if (kind === 'cancel') {
    await s.exec('job-cancel', { id: 'j' });
    await s.waitEvent('BLOCK_JOB_CANCELLED', (d) => d.device === 'j');
  } else {
    await s.exec('job-complete', { id: 'j' });
    await s.waitEvent('BLOCK_JOB_COMPLETED', (d) => d.device === 'j');
  }
  await s.waitNoJobs();
  return { ...(await finish(s, kind === 'cancel' ? 'top.qcow2' : 'base.qcow2')), filterReadOnly };
}

/** top over a file node added by name, read-only: streaming cannot make it writable. */
async function refusedScript(s: QsdSession) {
  await threeLayers(s.dir);
  await s.ok('blockdev-add', { driver: 'qcow2', 'node-name': 'base', 'read-only': true, file: s.fileRef('base.qcow2') });
  await s.ok('blockdev-add', { driver: 'qcow2', 'node-name': 'mid', 'read-only': true, backing: 'base', file: s.fileRef('mid.qcow2') });
  await s.ok('blockdev-add', { driver: 'file', 'node-name': 'top-file', 'read-only': true, filename: s.f('top.qcow2') });
  await s.ok('blockdev-add', { driver: 'qcow2', 'node-name': 'top', 'read-only': true, backing: 'mid', file: 'top-file' });
  await s.exec('block-stream', { 'job-id': 'j', device: 'top' });
  return finish(s, 'top.qcow2');
}

describe.skipIf(missingPeers('qemu-storage-daemon', 'qemu-img', 'qemu-io'))('jobs on read-only nodes beside qemu-storage-daemon 7.2', () => {
  for (const cancel of [false, true]) {
    it(`block-stream into a read-only top (${cancel ? 'cancelled' : 'completed'}): top writable while it runs, read-only after, no extra node`, async () => {
      const [theirs, ours] = await both(`stream-${cancel ? 'cancel' : 'done'}`, (s) => streamScript(s, cancel));
      expect(theirs.compare).toEqual(IDENTICAL);
      expectSame(theirs, ours, { progress: !cancel });
    });
  }

  for (const cancel of [false, true]) {
    it(`block-commit of mid into a read-only base (${cancel ? 'cancelled' : 'completed'}): base read-only again, top's header rewritten`, async () => {
      const [theirs, ours] = await both(`commit-${cancel ? 'cancel' : 'done'}`, (s) => commitScript(s, cancel));
      expect(theirs.compare).toEqual(IDENTICAL);
      expectSame(theirs, ours, { progress: !cancel });
    });
  }

  for (const kind of ['complete', 'cancel', 'writable-top'] as const) {
    it(`active block-commit into a read-only base (${kind}): the base ends as qsd leaves it`, async () => {
      const [{ filterReadOnly: _t, ...theirs }, { filterReadOnly: _o, ...ours }] = await both(`active-${kind}`, (s) => activeScript(s, kind));
      expect(theirs.compare).toEqual(IDENTICAL);
      expectSame(theirs, ours);
    });
  }

  it('active block-commit of a read-only top: mirror_top is read-write as in QEMU', async () => {
    const [theirs, ours] = await both('active-complete', (s) => activeScript(s, 'complete'));
    expect(ours.filterReadOnly).toEqual(theirs.filterReadOnly);
  });

  it('block-stream refused when top sits on a read-only file node added by name', async () => {
    const [theirs, ours] = await both('refused', refusedScript);
    expect(theirs.compare).toEqual(IDENTICAL);
    expectSame(theirs, ours);
  });
});
