/*
 * blockdev-create and object-add/object-del: qemu-storage-daemon-ts beside
 * qemu-storage-daemon 7.2. One QMP script runs on each daemon, in separate
 * scratch directories, and must give the same:
 *   - command outcomes (return, or error class and text, paths as $DIR);
 *   - per create job: its query-jobs entry once concluded (error text
 *     included) and its JOB_STATUS_CHANGE sequence; no BLOCK_JOB_* event;
 *   - the images: qemu-img info JSON (without actual-size), the same bytes,
 *     and a clean qemu-img check.
 * How events interleave with command answers is timing and not compared
 * (QEMU's failing create job concludes before its command answers).
 * query-jobs is read while one job exists at a time.
 *
 * block_set_io_throttle is our extension (qemu-storage-daemon 7.2 has no
 * such command; see qmp/commands-throttle.ts): an export throttled to N
 * bytes/s serves sequential reads at N within 10%, measured by an NBD
 * client between two requests after the initial burst allowance.
 *
 * Build first (npm run build): the tests run dist/.
 */
import { spawn } from 'node:child_process';
import crypto from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { waitForNbd } from '../helpers/nbd-server.js';
import { missingPeers } from '../helpers/peers.js';
import { QmpError, startStorageDaemon, type StorageDaemon } from '../helpers/qmp-client.js';
import { run } from '../helpers/run.js';
import { scratchDir } from '../helpers/tmp.js';

const MiB = 1024 * 1024;
const PYTHON = '/usr/bin/python3';
/** Longest wait for a create job to conclude. */
const JOB_WAIT_MS = 10_000;
const POLL_MS = 20;
const daemons = new Set<StorageDaemon>();

afterEach(async () => {
  await Promise.all([...daemons].map((d) => d.stop()));
  daemons.clear();
});

type Outcome = { return: unknown } | { error: { class: string; desc: string } };

/** Runs commands on one daemon, recording outcomes with the directory replaced by $DIR. */
function recorder(d: StorageDaemon, dir: string) {
  const outcomes: Array<[string, unknown]> = [];
  const scrub = (v: unknown) => JSON.parse(JSON.stringify(v).split(dir).join('$DIR')) as unknown;
  const exec = async (command: string, args?: Record<string, unknown>): Promise<Outcome> => {
    let outcome: Outcome;
    try {
      outcome = { return: await d.qmp.execute(command, args) };
    } catch (e) {
      if (!(e instanceof QmpError)) throw e;
      outcome = { error: { class: e.errorClass, desc: e.message } };
    }
    outcomes.push([`${command} ${JSON.stringify(scrub(args ?? {}))}`, scrub(outcome)]);
    return outcome;
  };
  return { outcomes, exec, scrub };
}

async function waitConcluded(d: StorageDaemon, id: string): Promise<Record<string, unknown>> {
  const deadline = Date.now() + JOB_WAIT_MS;
  while (Date.now() < deadline) {
    const jobs = await d.qmp.execute<Array<Record<string, unknown>>>('query-jobs');
    const job = jobs.find((j) => j.id === id);
    if (job?.status === 'concluded') return job;
    await new Promise((r) => setTimeout(r, POLL_MS));
  }
  throw new Error(`job ${id} did not conclude within ${JOB_WAIT_MS} ms`);
}

/** Images the script makes, by file name. */
const IMAGES = ['a.qcow2', 'b.qcow2', 'c.qcow2', 'd.qcow2', 'e.qcow2', 'f.raw', 'g.raw'];

async function createScript(dir: string, ours: boolean) {
  fs.mkdirSync(dir, { recursive: true });
  await run('qemu-img', ['create', '-q', '-f', 'raw', path.join(dir, 'base.raw'), '8M']);
  const d = await startStorageDaemon(dir, [], { ours });
  daemons.add(d);
  const f = (name: string) => path.join(dir, name);
  const { outcomes, exec, scrub } = recorder(d, dir);
  const jobs: Array<[string, unknown]> = [];
  let serial = 0;
  const create = async (options: Record<string, unknown>) => {
    const id = `job${++serial}`;
    const outcome = await exec('blockdev-create', { 'job-id': id, options });
    if (!('return' in outcome)) return;
    jobs.push([id, scrub(await waitConcluded(d, id))]);
    await exec('job-dismiss', { id });
  };
  const fileNode = async (name: string, node: string) => {
    await create({ driver: 'file', filename: f(name), size: 0 });
    await exec('blockdev-add', { driver: 'file', filename: f(name), 'node-name': node });
  };

  await fileNode('a.qcow2', 'fa');
  await create({ driver: 'qcow2', file: 'fa', size: 64 * MiB });
  // A file in use: its image locks refuse re-creating it.
  await exec('blockdev-add', { driver: 'qcow2', file: 'fa', 'node-name': 'qa' });
  await create({ driver: 'file', filename: f('a.qcow2'), size: 0 });
  await exec('blockdev-del', { 'node-name': 'qa' });
  await fileNode('b.qcow2', 'fb');
  await create({
    driver: 'qcow2', file: 'fb', size: 8 * MiB, 'cluster-size': 4096, 'refcount-bits': 8, 'lazy-refcounts': true,
    'backing-file': 'base.raw', 'backing-fmt': 'raw',
  });
  await fileNode('c.qcow2', 'fc');
  await create({ driver: 'qcow2', file: 'fc', size: 16 * MiB, version: 'v2', 'cluster-size': 2 * MiB });
  await fileNode('d.qcow2', 'fd');
  await create({ driver: 'qcow2', file: 'fd', size: 32 * MiB, preallocation: 'metadata' });
  await create({ driver: 'file', filename: f('e.qcow2'), size: 0 });
  await create({ driver: 'qcow2', file: { driver: 'file', filename: f('e.qcow2') }, size: 4 * MiB, preallocation: 'falloc' });
  await create({ driver: 'file', filename: f('f.raw'), size: 3 * MiB, preallocation: 'full' });
  await create({ driver: 'file', filename: f('g.raw'), size: MiB, nocow: true });

  // Failures of the job, each on a fresh file node.
  await fileNode('x.qcow2', 'fx');
  const bad = (extra: Record<string, unknown>) => create({ driver: 'qcow2', file: 'fx', size: MiB, ...extra });
  await bad({ 'cluster-size': 1000 });
  await bad({ size: MiB + 1 });
  await bad({ file: 'nothere' });
  await bad({ version: 'v2', 'lazy-refcounts': true });
  await bad({ 'refcount-bits': 3 });
  await bad({ 'backing-fmt': 'raw' });
  await bad({ 'backing-file': 'b', preallocation: 'metadata' });
  await bad({ version: 'v2', 'compression-type': 'zstd' });
  await create({ driver: 'file', filename: f('no/such/dir'), size: 0 });

  // Refusals of the command.
  await exec('blockdev-create', { 'job-id': 'r', options: { driver: 'raw' } });
  await exec('blockdev-create', { 'job-id': 'r', options: { driver: 'raw', size: MiB } });
  await exec('blockdev-create', { 'job-id': 'r', options: { driver: 'nope' } });
  await exec('blockdev-create', { 'job-id': 'r', options: { driver: 'qcow2', file: 'fx' } });
  await exec('blockdev-create', { 'job-id': 'r', options: { driver: 'file', filename: f('y'), size: 0, bogus: 1 } });
  await exec('blockdev-create', { options: { driver: 'file', filename: f('y'), size: 0 } });
  await exec('blockdev-create', { 'job-id': 'dup', options: { driver: 'file', filename: f('y'), size: 0 } });
  await exec('blockdev-create', { 'job-id': 'dup', options: { driver: 'file', filename: f('y'), size: 0 } });
  await waitConcluded(d, 'dup');
  await exec('job-dismiss', { id: 'dup' });
  for (const node of ['fa', 'fb', 'fc', 'fd', 'fx']) await exec('blockdev-del', { 'node-name': node });
  await d.quit();

  const statuses = new Map<string, string[]>();
  for (const e of d.qmp.events) {
    const data = e.data as { id: string; status: string } | undefined;
    if (e.event === 'JOB_STATUS_CHANGE') statuses.set(data!.id, [...(statuses.get(data!.id) ?? []), data!.status]);
  }
  const otherEvents = d.qmp.events.filter((e) => e.event !== 'JOB_STATUS_CHANGE').map((e) => e.event);
  return { outcomes, jobs, statuses: Object.fromEntries(statuses), otherEvents };
}

/** qemu-img info JSON (paths as $DIR, volatile actual-size dropped), the file's hash, and whether qemu-img check is clean. */
async function describeImage(dir: string, name: string) {
  const file = path.join(dir, name);
  const infoText = (await run('qemu-img', ['info', '--output=json', file])).stdout;
  const info = JSON.parse(infoText.split(dir).join('$DIR')) as Record<string, unknown>;
  delete info['actual-size'];
  const check = name.endsWith('.qcow2') ? (await run('qemu-img', ['check', file])).code : 0;
  const sha256 = crypto.createHash('sha256').update(fs.readFileSync(file)).digest('hex');
  return { info, check, sha256 };
}

describe.skipIf(missingPeers('qemu-storage-daemon', 'qemu-img'))('blockdev-create beside qemu-storage-daemon', () => {
  it('gives the same outcomes, jobs, events and images', async () => {
    const root = scratchDir('qsd-create-');
    const theirs = await createScript(path.join(root, 'qemu'), false);
    const ours = await createScript(path.join(root, 'ours'), true);
    expect(ours.outcomes).toEqual(theirs.outcomes);
    expect(ours.jobs).toEqual(theirs.jobs);
    expect(ours.statuses).toEqual(theirs.statuses);
    expect(theirs.otherEvents.filter((e) => e.startsWith('BLOCK_JOB'))).toEqual([]);
    expect(ours.otherEvents).toEqual(theirs.otherEvents);
    for (const name of IMAGES) {
      const want = await describeImage(path.join(root, 'qemu'), name);
      expect(want.check).toBe(0);
      expect({ name, ...(await describeImage(path.join(root, 'ours'), name)) }).toEqual({ name, ...want });
    }
  }, 60_000);
});

async function objectScript(dir: string, ours: boolean) {
  fs.mkdirSync(dir, { recursive: true });
  await run('qemu-img', ['create', '-q', '-f', 'raw', path.join(dir, 'd.raw'), '1M']);
  const d = await startStorageDaemon(dir, ['--object', 'throttle-group,id=cli0,x-bps-total=1000000'], { ours });
  daemons.add(d);
  const { outcomes, exec } = recorder(d, dir);
  const add = (args: Record<string, unknown>) => exec('object-add', args);
  const throttleNode = (node: string, group: string) =>
    exec('blockdev-add', { driver: 'throttle', 'node-name': node, 'throttle-group': group, file: { driver: 'file', filename: path.join(dir, 'd.raw') } });
  await add({ 'qom-type': 'throttle-group', id: 'tg0', limits: { 'bps-total': MiB } });
  await add({ 'qom-type': 'throttle-group', id: 'tg0' });
  await add({ 'qom-type': 'throttle-group', id: 'cli0' });
  await add({ 'qom-type': 'throttle-group', id: 'tg1', 'x-bps-total': 1000 });
  await add({ 'qom-type': 'throttle-group', id: 'tg2', limits: { 'bps-total': -1 } });
  await add({ 'qom-type': 'throttle-group', id: 'tg2', limits: { 'bps-total': 'x' } });
  await add({ 'qom-type': 'throttle-group', id: 'tg2', limits: { 'bps-total': 100, 'bps-total-max': 50 } });
  await add({ 'qom-type': 'throttle-group', id: 'tg2', limits: { 'iops-total-max': 10 } });
  await add({ 'qom-type': 'throttle-group', id: 'tg2', bogus: 1 });
  await add({ 'qom-type': 'throttle-group', id: 'tg0', 'x-bps-total': -5 });
  await add({ 'qom-type': 'nope', id: 'x' });
  await add({ 'qom-type': 'authz-list-file', id: 'x' });
  await add({ 'qom-type': 'throttle-group' });
  await add({ id: 'x' });
  await add({ 'qom-type': 'throttle-group', id: '1bad' });
  await add({ 'qom-type': 'memory-backend-ram', id: 'm1', size: MiB });
  await add({ 'qom-type': 'secret', id: 's0', data: 'abc' });
  await add({ 'qom-type': 'secret', id: 's1' });
  await add({ 'qom-type': 'secret', id: 's1', data: 'x', bogus: 'y' });
  await add({ 'qom-type': 'authz-simple', id: 'az0', identity: 'alice' });
  await add({ 'qom-type': 'authz-simple', id: '1x' });
  await add({ 'qom-type': 'authz-simple', id: 's0', identity: 'x' });
  await add({ 'qom-type': 'authz-list', id: 'al0', policy: 'deny', rules: [{ match: 'bob', policy: 'allow' }] });
  await add({ 'qom-type': 'authz-listfile', id: 'alf0' });
  await add({ 'qom-type': 'authz-listfile', id: 'alf0', filename: '/nonexistent.json' });
  await add({ 'qom-type': 'tls-creds-anon', id: 'anon0', endpoint: 'server' });
  await add({ 'qom-type': 'tls-creds-anon', id: 'anon0', endpoint: 'server' });
  await add({ 'qom-type': 'tls-creds-x509', id: 'x0', dir: '/nonexistent', endpoint: 'server' });
  await add({ 'qom-type': 'tls-creds-psk', id: 'p0', dir: '/nonexistent', endpoint: 'server' });
  for (const group of ['tg0', 'cli0']) {
    await throttleNode(`t-${group}`, group);
    await exec('object-del', { id: group });
    await exec('blockdev-del', { 'node-name': `t-${group}` });
    await exec('object-del', { id: group });
    await throttleNode(`t-${group}`, group);
  }
  await exec('object-del', { id: 'nothere' });
  await exec('object-del', {});
  for (const id of ['tg1', 'tg1', 's0', 'az0', 'al0', 'anon0']) await exec('object-del', { id });
  await add({ 'qom-type': 'authz-simple', id: 's0', identity: 'x' });
  await d.quit();
  return outcomes;
}

describe.skipIf(missingPeers('qemu-storage-daemon', 'qemu-img'))('object-add / object-del beside qemu-storage-daemon', () => {
  it('gives the same outcomes', async () => {
    const root = scratchDir('qsd-object-');
    const theirs = await objectScript(path.join(root, 'qemu'), false);
    const ours = await objectScript(path.join(root, 'ours'), true);
    expect(ours).toEqual(theirs);
  }, 30_000);
});

// ------------------------------------------------------------ block_set_io_throttle (ours only)

const RATE_BYTES_PER_S = 2 * MiB;
const REQUEST_BYTES = 64 * 1024;
const READ_BYTES = 4 * MiB;
/** QEMU lets a bucket run ahead by a tenth of its rate (throttle_fix_bucket); skip that many requests and one more. */
const BURST_REQUESTS = Math.ceil(RATE_BYTES_PER_S / 10 / REQUEST_BYTES) + 1;

/** Sequential reads through libnbd; the completion time (s) of each. */
async function readTimes(uri: string): Promise<number[]> {
  const script = [
    'import nbd, sys, time, json',
    'h = nbd.NBD(); h.connect_uri(sys.argv[1])',
    'out = []',
    `for i in range(${READ_BYTES / REQUEST_BYTES}):`,
    `    h.pread(${REQUEST_BYTES}, i * ${REQUEST_BYTES}); out.append(time.monotonic())`,
    'print(json.dumps(out))',
  ].join('\n');
  const child = spawn(PYTHON, ['-c', script, uri], { stdio: ['ignore', 'pipe', 'pipe'] });
  let out = '';
  let err = '';
  child.stdout.on('data', (b: Buffer) => (out += b.toString()));
  child.stderr.on('data', (b: Buffer) => (err += b.toString()));
  const code = await new Promise<number | null>((resolve) => child.once('exit', resolve));
  if (code !== 0) throw new Error(`nbd reader failed: ${err}`);
  return JSON.parse(out) as number[];
}

describe.skipIf(missingPeers('qemu-img', 'nbdinfo') || !fs.existsSync(PYTHON))('block_set_io_throttle (our extension)', () => {
  it('serves an export at the rate it was throttled to, within 10%', async () => {
    const dir = scratchDir('qsd-throttle-');
    const image = path.join(dir, 'd.raw');
    // Data, not holes: structured reads of holes answer from block status without reading.
    fs.writeFileSync(image, crypto.randomBytes(READ_BYTES));
    const socket = path.join(dir, 'nbd.sock');
    const d = await startStorageDaemon(dir, [
      '--blockdev', `driver=file,filename=${image},node-name=f0`,
      '--nbd-server', `addr.type=unix,addr.path=${socket}`,
      '--export', 'type=nbd,id=e0,node-name=f0,name=exp',
    ], { ours: true });
    daemons.add(d);
    const uri = `nbd+unix:///exp?socket=${socket}`;
    await waitForNbd(uri);
    const zero = { bps_rd: 0, bps_wr: 0, iops: 0, iops_rd: 0, iops_wr: 0 };
    await d.qmp.execute('block_set_io_throttle', { id: 'e0', bps: RATE_BYTES_PER_S, ...zero });
    const times = await readTimes(uri);
    const steady = times.slice(BURST_REQUESTS - 1);
    const rate = ((steady.length - 1) * REQUEST_BYTES) / (steady.at(-1)! - steady[0]!);
    expect(Math.abs(rate / RATE_BYTES_PER_S - 1)).toBeLessThan(0.1);
    // All limits zero lifts the throttle: the same reads take a fraction of the time.
    await d.qmp.execute('block_set_io_throttle', { id: 'e0', bps: 0, ...zero });
    const free = await readTimes(uri);
    expect(free.at(-1)! - free[0]!).toBeLessThan((READ_BYTES / RATE_BYTES_PER_S) / 4);
  }, 30_000);
});
