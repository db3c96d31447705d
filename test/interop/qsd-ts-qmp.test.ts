/*
 * qemu-storage-daemon-ts beside qemu-storage-daemon 7.2: one QMP script
 * run against each, on identical images in separate directories, must
 * give the same observable results:
 *
 *   - every command's outcome: the `return` value or the error's class and
 *     text (paths replaced by $DIR), for good commands and for schema
 *     violations, unknown commands and refusals (node in use, export name
 *     taken, server not running, bitmap incompatible with a read-only
 *     export, …);
 *   - the export as clients see it after qemu-io wrote through it:
 *     nbdinfo --map of base:allocation, qemu:allocation-depth and
 *     qemu:dirty-bitmap:b0, and x-debug-block-dirty-bitmap-sha256;
 *   - query-named-block-nodes (flat) with volatile fields filtered
 *     (auto node names, actual-size), query-block-exports, and the
 *     BLOCK_EXPORT_DELETED event;
 *   - after `quit`: the persistent bitmap stored in the image, as
 *     qemu-img info reports it, and a clean qemu-img check.
 * The command lines are compared too: the same bad options give the same
 * message and exit status, and a daemon configured entirely by options
 * (--blockdev, --nbd-server, --export) serves the same export.
 *
 * Daemons listen on unix sockets in scratch directories and are stopped by
 * PID after each test. Build first (npm run build): the tests run dist/.
 */
import fs from 'node:fs';
import path from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { missingPeers } from '../helpers/peers.js';
import { QmpError, startStorageDaemon, type StorageDaemon } from '../helpers/qmp-client.js';
import { run, runOurs } from '../helpers/run.js';
import { scratchDir } from '../helpers/tmp.js';

const MiB = 1024 * 1024;
const daemons = new Set<StorageDaemon>();

afterEach(async () => {
  await Promise.all([...daemons].map((d) => d.stop()));
  daemons.clear();
});

type Outcome = { return: unknown } | { error: { class: string; desc: string } };

async function prepareImages(dir: string): Promise<void> {
  fs.mkdirSync(dir, { recursive: true });
  const img = (args: string[]) => run('qemu-img', args, { cwd: dir });
  const io = (file: string, cmd: string) => run('qemu-io', ['-f', 'qcow2', '-c', cmd, file], { cwd: dir });
  await img(['create', '-q', '-f', 'qcow2', 'base.qcow2', '4M']);
  await io('base.qcow2', 'write -P 0xab 0 1M');
  await img(['create', '-q', '-f', 'qcow2', '-b', 'base.qcow2', '-F', 'qcow2', 'top.qcow2']);
  await io('top.qcow2', 'write -P 0xef 512k 128k');
}

/** The script's results on one daemon: outcomes in order, maps, nodes, events. */
interface ScriptResult {
  outcomes: Array<[string, Outcome]>;
  maps: Record<string, string>;
  nodes: unknown;
  events: unknown[];
}

async function runScript(dir: string, ours: boolean): Promise<ScriptResult> {
  await prepareImages(dir);
  const d = await startStorageDaemon(dir, [], { ours });
  daemons.add(d);
  const f = (name: string) => path.join(dir, name);
  const outcomes: Array<[string, Outcome]> = [];
  const scrub = (v: unknown) => JSON.parse(JSON.stringify(v).split(dir).join('$DIR')) as unknown;
  const exec = async (command: string, args?: Record<string, unknown>, view: (v: unknown) => unknown = (v) => v) => {
    let outcome: Outcome;
    try {
      outcome = { return: view(await d.qmp.execute(command, args)) };
    } catch (e) {
      if (!(e instanceof QmpError)) throw e;
      outcome = { error: { class: e.errorClass, desc: e.message } };
    }
    outcomes.push([`${command} ${JSON.stringify(scrub(args ?? {}))}`, scrub(outcome) as Outcome]);
    return outcome;
  };
  const fileRef = (name: string) => ({ driver: 'file', filename: f(name) });

  await exec('query-block');
  await exec('nosuch-command');
  await exec('blockdev-add', { driver: 'qcow2', file: fileRef('base.qcow2') });
  await exec('blockdev-add', { driver: 'qcow3', 'node-name': 'x' });
  await exec('blockdev-add', { driver: 'qcow2', 'node-name': 'x', file: { ...fileRef('base.qcow2'), bar: 1 } });
  await exec('blockdev-add', { driver: 'qcow2', 'node-name': 'x', 'read-only': 'on', file: fileRef('base.qcow2') });
  await exec('blockdev-add', { driver: 'qcow2', 'node-name': 'x', file: fileRef('missing.qcow2') });
  await exec('blockdev-add', { driver: 'qcow2', 'node-name': 'base', file: fileRef('base.qcow2') });
  await exec('blockdev-add', { driver: 'qcow2', 'node-name': 'base', file: fileRef('top.qcow2') });
  await exec('blockdev-add', { driver: 'qcow2', 'node-name': 'top', backing: 'base', file: fileRef('top.qcow2') });
  await exec('block-dirty-bitmap-add', { node: 'top', name: 'b0', persistent: true, granularity: 65536 });
  await exec('block-dirty-bitmap-add', { node: 'top', name: 'b0' });
  await exec('block-dirty-bitmap-add', { node: 'nonode', name: 'b1' });
  await exec('block-dirty-bitmap-add', { node: 'top', name: 'b1', granularity: 'big' });
  await exec('block-dirty-bitmap-add', { node: 'top', name: 'b1', granularity: 1000 });
  await exec('block-dirty-bitmap-add', { node: 'top', name: 'tmp', disabled: true });
  await exec('block-dirty-bitmap-remove', { node: 'top', name: 'nob' });
  await exec('block-export-add', { type: 'nbd', id: 'exp0', 'node-name': 'top' });
  await exec('nbd-server-start', { addr: { type: 'unix', data: { path: f('nbd.sock') } } });
  await exec('nbd-server-start', { addr: { type: 'unix', data: { path: f('nbd2.sock') } } });
  await exec('block-export-add', { type: 'nbd', id: 'ro', 'node-name': 'top', bitmaps: ['b0'] });
  await exec('block-export-add', { type: 'nbd', id: 'exp0', 'node-name': 'top', name: 'top', writable: true, 'allocation-depth': true, bitmaps: ['b0'] });
  await exec('block-export-add', { type: 'nbd', id: 'exp0', 'node-name': 'base' });
  await exec('block-export-add', { type: 'nbd', id: 'exp1', 'node-name': 'base', name: 'top' });
  await exec('block-export-add', { type: 'nbd', id: 'exp1', 'node-name': 'nonode' });
  await exec('nbd-server-add', { device: 'base', name: 'old' });
  await exec('query-block-exports');
  await exec('blockdev-del', { 'node-name': 'top' });
  await exec('blockdev-del', { 'node-name': 'base' });
  await exec('blockdev-del', { 'node-name': 'nonode' });
  await exec('block-dirty-bitmap-remove', { node: 'top', name: 'b0' });
  await exec('block-dirty-bitmap-clear', { node: 'top', name: 'b0' });

  const uri = `nbd+unix:///top?socket=${f('nbd.sock')}`;
  const qio = await run('qemu-io', ['-t', 'writeback', '-f', 'raw', uri, '-c', 'write -P 0x77 1M 64k', '-c', 'write -z 0 64k', '-c', 'write -P 1 3000k 1k']);
  expect(qio.code, qio.stderr).toBe(0);
  const maps: Record<string, string> = {};
  for (const ctx of ['base:allocation', 'qemu:allocation-depth', 'qemu:dirty-bitmap:b0']) {
    const r = await run('nbdinfo', [`--map=${ctx}`, uri]);
    maps[ctx] = r.stdout + r.stderr;
  }
  await exec('x-debug-block-dirty-bitmap-sha256', { node: 'top', name: 'b0' });
  await exec('block-dirty-bitmap-merge', { node: 'top', target: 'tmp', bitmaps: ['b0', { node: 'top', name: 'nob' }] });
  await exec('block-dirty-bitmap-merge', { node: 'top', target: 'tmp', bitmaps: ['b0'] });
  await exec('x-debug-block-dirty-bitmap-sha256', { node: 'top', name: 'tmp' });
  await exec('block-dirty-bitmap-enable', { node: 'top', name: 'tmp' });
  await exec('block-dirty-bitmap-clear', { node: 'top', name: 'tmp' });
  await exec('x-debug-block-dirty-bitmap-sha256', { node: 'top', name: 'tmp' });
  await exec('block-dirty-bitmap-remove', { node: 'top', name: 'tmp' });
  const nodes = scrub(((await exec('query-named-block-nodes', { flat: true }, (list) => (list as unknown[]).map(stableNode))) as { return: unknown }).return);

  await exec('nbd-server-remove', { name: 'old' });
  await exec('block-export-del', { id: 'exp0' });
  await exec('block-export-del', { id: 'exp0' });
  await exec('nbd-server-stop');
  await exec('nbd-server-stop');
  await exec('query-block-exports');
  const events = d.qmp.events.map((e) => ({ event: e.event, data: e.data }));
  expect(await d.quit()).toBe(0);
  daemons.delete(d);
  return { outcomes, maps, nodes, events };
}

/**
 * A BlockDeviceInfo without what differs between daemons by design (auto
 * node names, actual-size) and without the filename of a node whose
 * backing was given by node name: QEMU describes it as a json: filename
 * (bdrv_refresh_filename sees the backing overridden), ours by its file
 * name — a known difference of the graph's filename description.
 */
function stableNode(n: unknown): unknown {
  const { image, 'node-name': name, file, ...rest } = n as Record<string, unknown> & { image: Record<string, unknown> };
  const { 'actual-size': _actual, filename, ...img } = image;
  const overridden = String(file).startsWith('json:') || (rest.backing_file !== undefined && !String(file).startsWith('json:'));
  const names = overridden ? {} : { file };
  return { ...rest, ...names, 'node-name': String(name).startsWith('#') ? '#auto' : name, image: { ...img, ...(overridden ? {} : { filename }) } };
}

async function bitmapsOf(file: string): Promise<unknown> {
  const r = await run('qemu-img', ['info', '-f', 'qcow2', '--output=json', file]);
  return (JSON.parse(r.stdout) as { 'format-specific': { data: { bitmaps?: unknown } } })['format-specific'].data.bitmaps;
}

describe.skipIf(missingPeers('qemu-storage-daemon', 'qemu-img', 'qemu-io', 'nbdinfo'))('qemu-storage-daemon-ts beside qemu-storage-daemon 7.2', () => {
  const dir = scratchDir('qbt-qsd-ts-');

  it('gives the same results for one QMP script', async () => {
    const theirs = await runScript(path.join(dir, 'theirs'), false);
    const ours = await runScript(path.join(dir, 'ours'), true);
    for (let i = 0; i < theirs.outcomes.length; i++) expect(ours.outcomes[i], theirs.outcomes[i]![0]).toEqual(theirs.outcomes[i]);
    expect(ours.maps).toEqual(theirs.maps);
    expect(ours.nodes).toEqual(theirs.nodes);
    expect(ours.events).toEqual(theirs.events);
    const [b1, b2] = [await bitmapsOf(path.join(dir, 'theirs', 'top.qcow2')), await bitmapsOf(path.join(dir, 'ours', 'top.qcow2'))];
    expect(b2).toEqual(b1);
    expect(b1).toEqual([{ flags: ['auto'], name: 'b0', granularity: 65536 }]);
    const check = await run('qemu-img', ['check', '-q', '-f', 'qcow2', path.join(dir, 'ours', 'top.qcow2')]);
    expect(check.code, check.stdout + check.stderr).toBe(0);
  }, 60_000);

  it('refuses the same bad command lines with the same messages', async () => {
    const sub = path.join(dir, 'cli');
    await prepareImages(sub);
    const s = (name: string) => path.join(sub, name);
    const lines: string[][] = [
      ['--foo'],
      ['--blockdev'],
      ['extra'],
      ['--blockdev', 'driver=qcow3,node-name=x'],
      ['--blockdev', `driver=file,filename=${s('nope')},node-name=x`],
      ['--blockdev', `{"driver":"file","filename":"${s('base.qcow2')}"}`],
      ['--blockdev', `driver=qcow2,node-name=a,file.driver=file,file.filename=${s('base.qcow2')},foo=bar`],
      ['--blockdev', `driver=file,node-name=a,filename=${s('base.qcow2')}`, '--blockdev', `driver=file,node-name=a,filename=${s('top.qcow2')}`],
      ['--nbd-server', 'addr.type=unix'],
      ['--nbd-server', `addr.type=unix,addr.path=${s('n1.sock')}`, '--nbd-server', `addr.type=unix,addr.path=${s('n2.sock')}`],
      ['--nbd-server', 'addr.type=inet,addr.host=127.0.0.1,addr.port=abc'],
      ['--nbd-server', 'addr.type=unix,addr.path=/nonexistent-dir/x.sock'],
      ['--export', 'type=nbd,id=e'],
      ['--export', 'type=nbd,id=e,node-name=x'],
      ['--blockdev', `driver=file,node-name=a,filename=${s('base.qcow2')}`, '--nbd-server', `addr.type=unix,addr.path=${s('n3.sock')}`, '--export', 'type=nbd,id=e,node-name=a,bitmap=b0'],
      ['--monitor', 'chardev=nope'],
      ['--object', 'foo,id=x'],
      ['--pidfile', '/nonexistent-dir/x.pid'],
    ];
    for (const args of lines) {
      const theirs = await run('qemu-storage-daemon', args, { cwd: sub });
      const ours = await runOurs('qemu-storage-daemon-ts', args, { cwd: sub });
      expect({ status: ours.code, stderr: ours.stderr }, args.join(' ')).toEqual({ status: theirs.code, stderr: theirs.stderr });
    }
  }, 60_000);

  it('serves the same export when configured by options', async () => {
    const views: string[] = [];
    for (const ours of [false, true]) {
      const sub = path.join(dir, ours ? 'opt-ours' : 'opt-theirs');
      await prepareImages(sub);
      const sock = path.join(sub, 'nbd.sock');
      const d = await startStorageDaemon(
        sub,
        [
          '--blockdev', 'driver=file,node-name=f,filename=top.qcow2',
          '--blockdev', 'driver=qcow2,node-name=top,file=f',
          '--nbd-server', `addr.type=unix,addr.path=${sock}`,
          '--export', 'type=nbd,id=e0,node-name=top,name=exp,allocation-depth=on',
        ],
        { ours },
      );
      daemons.add(d);
      expect(await d.qmp.execute('query-block-exports')).toEqual([{ 'node-name': 'top', 'shutting-down': false, type: 'nbd', id: 'e0' }]);
      const uri = `nbd+unix:///exp?socket=${sock}`;
      const depth = await run('nbdinfo', ['--map=qemu:allocation-depth', uri]);
      const size = await run('nbdinfo', ['--size', uri]);
      views.push(depth.stdout + size.stdout);
      expect(await d.quit()).toBe(0);
      daemons.delete(d);
    }
    expect(views[1]).toEqual(views[0]);
    expect(views[0]).toContain(String(4 * MiB));
  }, 60_000);
});
