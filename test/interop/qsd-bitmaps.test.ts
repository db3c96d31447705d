/*
 * Persistent dirty bitmaps between qemu-storage-daemon 7.2 and us, both ways:
 *
 *   1. the daemon opens an 8 GiB qcow2 image, adds persistent bitmaps over
 *      QMP (block-dirty-bitmap-add; one disabled later with
 *      block-dirty-bitmap-disable, one added late, one left empty) while
 *      qemu-io writes, write-zeroes and discards through its NBD export at
 *      unaligned places on both sides of 4 GiB; before `quit` stores them,
 *      a second export serves the live bitmaps and query-named-block-nodes
 *      gives their counts. Afterwards the image loads here with the same
 *      contents: qemu-nbd -B and qemu-nbd-ts -B serve the same maps as the
 *      live daemon did (nbdinfo --map and --map --json), `qemu-img-ts info`
 *      prints what qemu-img info prints, our in-process load has the
 *      daemon's counts, and `qemu-img check` is clean. A write by qemu-io-ts
 *      then dirties the recording bitmaps (whole granules) and not the
 *      disabled one, as both servers show;
 *   2. an image whose bitmaps we made (qemu-img-ts bitmap, qemu-io-ts)
 *      opened by the daemon: query-named-block-nodes lists them with our
 *      name, granularity, recording state and count, and its export with
 *      bitmaps.N=NAME (the 7.2 keyval spelling of the `bitmaps` list) maps
 *      them as qemu-nbd-ts -B does; opened writable and written through
 *      NBD, the daemon stores them back in a form we load as qemu-nbd does.
 *
 * The daemon and the NBD servers listen on unix sockets in a scratch
 * directory and are stopped by PID after each test. Build first
 * (npm run build): the tests run dist/.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import path from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { findDirtyBitmap } from '../../block/dirty-bitmap.js';
import { BlockGraph } from '../../block/graph.js';
import { builtinDrivers } from '../../drivers/index.js';
import { waitForNbd } from '../helpers/nbd-server.js';
import { missingPeers } from '../helpers/peers.js';
import { startStorageDaemon, type StorageDaemon } from '../helpers/qmp-client.js';
import { oursCommand, run, runOurs } from '../helpers/run.js';
import { scratchDir } from '../helpers/tmp.js';

const KiB = 1024;
const MiB = 1024 * KiB;
const GiB = 1024 * MiB;
const IMAGE_BYTES = 8 * GiB;
/** Longest wait for a qemu-nbd[-ts] to exit after SIGTERM before SIGKILL. */
const STOP_MS = 10_000;

/** One bitmap as query-named-block-nodes reports it (dirty-bitmaps of a node). */
interface QmpBitmap {
  name: string;
  granularity: number;
  recording: boolean;
  count: number;
  persistent: boolean;
  busy: boolean;
  inconsistent?: boolean;
}

/** What both sides agree on for one bitmap. */
interface BitmapView {
  name: string;
  granularity: number;
  recording: boolean;
  count: number;
}

type Runs = Array<[number, number]>;

const daemons = new Set<StorageDaemon>();
const servers = new Set<ChildProcess>();

afterEach(async () => {
  await Promise.all([...daemons].map((d) => d.stop()));
  await Promise.all([...servers].map(stopServer));
  daemons.clear();
});

async function stopServer(child: ChildProcess): Promise<void> {
  servers.delete(child);
  if (child.exitCode !== null || child.signalCode !== null) return;
  const exited = new Promise<void>((resolve) => child.once('exit', () => resolve()));
  process.kill(child.pid!, 'SIGTERM');
  const timer = setTimeout(() => child.exitCode === null && process.kill(child.pid!, 'SIGKILL'), STOP_MS);
  await exited;
  clearTimeout(timer);
}

/** Dirty runs of an `nbdinfo --map` text, touching runs merged (servers may split where others do not). */
function dirtyRuns(map: string): Runs {
  const out: Runs = [];
  for (const line of map.trim().split('\n')) {
    const [offset, bytes, type] = line.trim().split(/\s+/).map(Number) as [number, number, number];
    const last = out[out.length - 1];
    if (type !== 1) continue;
    if (last && last[0] + last[1] === offset) last[1] += bytes;
    else out.push([offset, bytes]);
  }
  return out;
}

/** `runs` with [offset, offset + bytes) widened to whole granules added, merged and sorted. */
function withRange(runs: Runs, offset: number, bytes: number, granularity: number): Runs {
  const start = Math.floor(offset / granularity) * granularity;
  const end = Math.min(IMAGE_BYTES, Math.ceil((offset + bytes) / granularity) * granularity);
  const all = [...runs.map(([o, b]): [number, number] => [o, o + b]), [start, end] as [number, number]].sort((a, b) => a[0] - b[0]);
  const out: Runs = [];
  for (const [s, e] of all) {
    const last = out[out.length - 1];
    if (last && s <= last[0] + last[1]) last[1] = Math.max(last[1], e - last[0]);
    else out.push([s, e - s]);
  }
  return out;
}

const ioArgs = (commands: string[]) => commands.flatMap((c) => ['-c', c]);

describe.skipIf(missingPeers('qemu-storage-daemon', 'qemu-nbd', 'nbdinfo', 'qemu-io', 'qemu-img'))('dirty bitmaps between qemu-storage-daemon 7.2 and us', () => {
  const dir = scratchDir('qbt-qsd-bitmaps-');
  const file = (name: string) => path.join(dir, name);
  let serial = 0;

  /** Runs a command in the scratch directory; its stdout, or a thrown error with stderr. */
  async function sh(cmd: string, ...args: string[]): Promise<string> {
    const r = await run(cmd, args, { cwd: dir });
    if (r.code !== 0) throw new Error(`${cmd} ${args.join(' ')}: exit ${r.code}: ${r.stderr}`);
    return r.stdout;
  }
  async function ours(tool: string, ...args: string[]): Promise<string> {
    const r = await runOurs(tool, args, { cwd: dir });
    if (r.code !== 0) throw new Error(`${tool} ${args.join(' ')}: exit ${r.code}: ${r.stderr}`);
    return r.stdout;
  }

  /** The daemon on `image`: file0 → disk0 (qcow2, discard=unmap), an NBD server on a unix socket, `exportOpts` for export e0. */
  async function daemon(image: string, readOnly: boolean, exportOpts: string): Promise<{ qsd: StorageDaemon; uri: (name: string) => string }> {
    const nbdSocket = file(`qsd-nbd-${++serial}.sock`);
    const ro = readOnly ? ',read-only=on' : '';
    const qsd = await startStorageDaemon(dir, [
      '--blockdev', `driver=file,filename=${file(image)},node-name=file0${ro}`,
      '--blockdev', `driver=qcow2,file=file0,node-name=disk0,discard=unmap${ro}`,
      '--nbd-server', `addr.type=unix,addr.path=${nbdSocket}`,
      '--export', `type=nbd,id=e0,node-name=disk0,name=exp,${exportOpts}`,
    ]);
    daemons.add(qsd);
    const uri = (name: string) => `nbd+unix:///${name}?socket=${nbdSocket}`;
    await waitForNbd(uri('exp'));
    return { qsd, uri };
  }

  /** qemu-nbd or qemu-nbd-ts serving `image` read-only with `-B` for each bitmap; its URI once it answers. */
  async function serveNbd(side: 'ours' | 'qemu', image: string, bitmaps: string[]): Promise<string> {
    const socket = file(`${side}-${++serial}.sock`);
    const [cmd, ...pre] = side === 'qemu' ? ['qemu-nbd'] : oursCommand('qemu-nbd-ts');
    const args = [...pre, '-t', '-r', '-f', 'qcow2', '-k', socket, ...bitmaps.flatMap((b) => ['-B', b]), image];
    const child = spawn(cmd, args, { cwd: dir, stdio: ['ignore', 'ignore', 'pipe'] });
    servers.add(child);
    let err = '';
    child.stderr!.on('data', (d: Buffer) => (err += d.toString()));
    const uri = `nbd+unix:///?socket=${socket}`;
    await waitForNbd(uri, () => child.exitCode !== null).catch((e: Error) => {
      throw new Error(`${side}: ${e.message}: ${err}`);
    });
    return uri;
  }

  /** `nbdinfo --map=qemu:dirty-bitmap:NAME` (text and --json) of each bitmap. */
  async function maps(uri: string, bitmaps: string[]): Promise<Record<string, { text: string; json: string }>> {
    const out: Record<string, { text: string; json: string }> = {};
    for (const b of bitmaps) {
      const map = `--map=qemu:dirty-bitmap:${b}`;
      out[b] = { text: await sh('nbdinfo', map, uri), json: await sh('nbdinfo', map, '--json', uri) };
    }
    return out;
  }

  /** The maps qemu-nbd and qemu-nbd-ts serve for `image`: asserted equal (also the export's contexts), returned once. */
  async function loadedMaps(image: string, bitmaps: string[]) {
    const [ourUri, qemuUri] = await Promise.all([serveNbd('ours', image, bitmaps), serveNbd('qemu', image, bitmaps)]);
    const [ourInfo, qemuInfo] = await Promise.all([sh('nbdinfo', '--json', ourUri), sh('nbdinfo', '--json', qemuUri)]);
    const contexts = (info: string) => (JSON.parse(info) as { exports: Array<{ contexts: string[] }> }).exports[0]!.contexts;
    expect(contexts(ourInfo)).toEqual(contexts(qemuInfo));
    const [ourMaps, qemuMaps] = [await maps(ourUri, bitmaps), await maps(qemuUri, bitmaps)];
    expect(ourMaps).toEqual(qemuMaps);
    await Promise.all([...servers].map(stopServer));
    return ourMaps;
  }

  /** Bitmaps of `image` as we load them (read-only open), with qemu-img-ts info's recording flag. */
  async function ourView(image: string): Promise<BitmapView[]> {
    const info = JSON.parse(await ours('qemu-img-ts', 'info', '--output=json', image)) as {
      'format-specific': { data: { bitmaps?: Array<{ name: string; granularity: number; flags: string[] }> } };
    };
    const graph = new BlockGraph(builtinDrivers);
    try {
      const node = await graph.openImage(file(image), { format: 'qcow2', readOnly: true });
      return (info['format-specific'].data.bitmaps ?? []).map((b) => ({
        name: b.name,
        granularity: b.granularity,
        recording: b.flags.includes('auto'),
        count: findDirtyBitmap(node, b.name)!.dirtyBytes,
      }));
    } finally {
      await graph.closeAll();
    }
  }

  /** disk0's bitmaps as the daemon reports them, sorted by name. */
  async function daemonBitmaps(qsd: StorageDaemon): Promise<QmpBitmap[]> {
    const nodes = await qsd.qmp.execute<Array<{ 'node-name': string; 'dirty-bitmaps'?: QmpBitmap[] }>>('query-named-block-nodes', { flat: true });
    const disk = nodes.find((n) => n['node-name'] === 'disk0')!;
    return [...(disk['dirty-bitmaps'] ?? [])].sort((a, b) => a.name.localeCompare(b.name));
  }
  const view = (b: QmpBitmap): BitmapView => ({ name: b.name, granularity: b.granularity, recording: b.recording, count: b.count });
  const byName = (a: BitmapView[]) => [...a].sort((x, y) => x.name.localeCompare(y.name));

  async function expectCheckClean(image: string): Promise<void> {
    const r = await run('qemu-img', ['check', '-f', 'qcow2', image], { cwd: dir });
    expect(`${r.code} ${r.stdout}${r.stderr}`).toMatch(/^0 No errors were found on the image/);
  }
  async function expectInfoSame(image: string): Promise<void> {
    for (const args of [['info', image], ['info', '--output=json', image]]) {
      expect(await ours('qemu-img-ts', ...args)).toBe(await sh('qemu-img', ...args));
    }
  }

  const QSD_BITMAPS = ['empty', 'g4k', 'late', 'off', 'rec'];

  it('bitmaps the daemon records and stores load here with the contents it served', async () => {
    await sh('qemu-img', 'create', '-q', '-f', 'qcow2', 'qsd.qcow2', String(IMAGE_BYTES));
    const { qsd, uri } = await daemon('qsd.qcow2', false, 'writable=on');
    const add = (name: string, granularity?: number) =>
      qsd.qmp.execute('block-dirty-bitmap-add', { node: 'disk0', name, persistent: true, ...(granularity ? { granularity } : {}) });
    const guestWrites = async (commands: string[]) => {
      const r = await run('qemu-io', ['-f', 'raw', ...ioArgs(commands), uri('exp')]);
      expect({ code: r.code, stderr: r.stderr }).toEqual({ code: 0, stderr: '' });
    };

    await add('rec', 64 * KiB);
    await add('g4k', 4 * KiB);
    await add('off', MiB);
    await guestWrites(['write -P 0x5a 1000 5000', `write -z ${3 * MiB + 100} 100000`, `discard ${6 * MiB + 512} ${130 * KiB}`, `write -P 0x11 ${2 * GiB - 1} 3`]);
    await qsd.qmp.execute('block-dirty-bitmap-disable', { node: 'disk0', name: 'off' });
    await add('late');
    await guestWrites([
      `write -P 0x6b ${4 * GiB - 3000} 7000`,
      `write -z ${5 * GiB + 777} 70000`,
      `discard ${7 * GiB} ${MiB}`,
      `write -P 0x22 ${6 * MiB + 4096} 4096`,
      `write -P 0x01 ${IMAGE_BYTES - 512} 512`,
    ]);
    await add('empty', 512);

    // The live bitmaps, served by the daemon itself and counted by it.
    await qsd.qmp.execute('block-export-add', { type: 'nbd', id: 'e1', 'node-name': 'disk0', name: 'bm', writable: true, bitmaps: QSD_BITMAPS });
    const live = await maps(uri('bm'), QSD_BITMAPS);
    const counted = await daemonBitmaps(qsd);
    expect(await qsd.qmp.execute('query-block')).toEqual([]); // the daemon has no named BlockBackend: nodes are where bitmaps show
    expect(counted.map((b) => [b.name, b.recording, b.persistent])).toEqual([
      ['empty', true, true], ['g4k', true, true], ['late', true, true], ['off', false, true], ['rec', true, true],
    ]);
    expect(counted.find((b) => b.name === 'late')!.granularity).toBe(64 * KiB);
    expect(await qsd.quit()).toBe(0);
    expect(qsd.stderr()).toBe('');

    await expectCheckClean('qsd.qcow2');
    await expectInfoSame('qsd.qcow2');
    expect(await loadedMaps('qsd.qcow2', QSD_BITMAPS)).toEqual(live);
    expect(byName(await ourView('qsd.qcow2'))).toEqual(counted.map(view));
    expect(dirtyRuns(live.rec!.text)).toEqual([
      [0, 64 * KiB], [3 * MiB, 128 * KiB], [6 * MiB, 192 * KiB], [2 * GiB - 64 * KiB, 128 * KiB],
      [4 * GiB - 64 * KiB, 128 * KiB], [5 * GiB, 128 * KiB], [7 * GiB, MiB], [IMAGE_BYTES - 64 * KiB, 64 * KiB],
    ]);
    expect(dirtyRuns(live.empty!.text)).toEqual([]);
  });

  it('after qemu-io-ts wrote to the daemon-made image, recording bitmaps gained the range and the disabled one did not', async () => {
    const before = await loadedMaps('qsd.qcow2', QSD_BITMAPS);
    const [at, bytes] = [6 * GiB + 12345, 100_000];
    await ours('qemu-io-ts', '-f', 'qcow2', '-c', `write -P 9 ${at} ${bytes}`, 'qsd.qcow2');
    await expectCheckClean('qsd.qcow2');
    await expectInfoSame('qsd.qcow2');
    const after = await loadedMaps('qsd.qcow2', QSD_BITMAPS);
    const granularity: Record<string, number> = { empty: 512, g4k: 4 * KiB, late: 64 * KiB, rec: 64 * KiB };
    for (const [name, g] of Object.entries(granularity)) {
      expect(dirtyRuns(after[name]!.text), name).toEqual(withRange(dirtyRuns(before[name]!.text), at, bytes, g));
    }
    expect(after.off).toEqual(before.off);
  });

  it('bitmaps we made load in the daemon with our names, granularities, states and counts, and its export maps them as ours', async () => {
    const img = (...args: string[]) => ours('qemu-img-ts', ...args);
    const io = (...commands: string[]) => ours('qemu-io-ts', '-f', 'qcow2', ...ioArgs(commands), 'ours.qcow2');
    await img('create', '-q', '-f', 'qcow2', 'ours.qcow2', String(IMAGE_BYTES));
    await img('bitmap', '--add', 'ours.qcow2', 'a');
    await img('bitmap', '--add', '-g', '4k', 'ours.qcow2', 'g4k');
    await img('bitmap', '--add', '-g', '1M', 'ours.qcow2', 'frozen');
    await img('bitmap', '--add', '--disable', 'ours.qcow2', 'off');
    await io('write -P 3 777 9000', `write -z ${4 * GiB - 5000} 10000`, `discard ${5 * GiB} ${2 * MiB}`);
    await img('bitmap', '--disable', 'ours.qcow2', 'frozen');
    await io(`write -P 4 ${7 * GiB + 3} 65536`, `write -P 5 ${IMAGE_BYTES - 1} 1`);
    await img('bitmap', '--add', 'ours.qcow2', 'empty');
    await img('bitmap', '--merge', 'g4k', 'ours.qcow2', 'off');
    await expectCheckClean('ours.qcow2');
    const names = ['a', 'empty', 'frozen', 'g4k', 'off'];
    const exportBitmaps = names.map((b, i) => `bitmaps.${i}=${b}`).join(',');
    const mine = byName(await ourView('ours.qcow2'));
    const served = await loadedMaps('ours.qcow2', names);

    // Read-only: the daemon sees our bitmaps and serves what qemu-nbd-ts serves.
    const ro = await daemon('ours.qcow2', true, exportBitmaps);
    const seen = await daemonBitmaps(ro.qsd);
    expect(seen.map(view)).toEqual(mine);
    expect(seen.every((b) => b.persistent && b.busy && !b.inconsistent)).toBe(true);
    expect(await maps(ro.uri('exp'), names)).toEqual(served);
    expect(await ro.qsd.quit()).toBe(0);
    await expectInfoSame('ours.qcow2');

    // Writable: the daemon records a write into our bitmaps and stores them back.
    const rw = await daemon('ours.qcow2', false, 'writable=on');
    const [at, bytes] = [3 * GiB + 4097, 5000];
    expect(await sh('qemu-io', '-f', 'raw', '-c', `write -P 6 ${at} ${bytes}`, rw.uri('exp'))).toContain('wrote');
    const recorded = await daemonBitmaps(rw.qsd);
    expect(await rw.qsd.quit()).toBe(0);
    await expectCheckClean('ours.qcow2');
    await expectInfoSame('ours.qcow2');
    expect(byName(await ourView('ours.qcow2'))).toEqual(recorded.map(view));
    const after = await loadedMaps('ours.qcow2', names);
    expect(dirtyRuns(after.a!.text)).toEqual(withRange(dirtyRuns(served.a!.text), at, bytes, 64 * KiB));
    expect(after.frozen).toEqual(served.frozen);
    expect(after.off).toEqual(served.off);
  });
});
