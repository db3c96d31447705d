/*
 * qemu:dirty-bitmap:NAME from qemu-nbd-ts -B beside qemu-nbd 7.2 -B, on
 * images made by qemu-img and qemu-io:
 *
 *   1. the same chain (bitmaps on the overlay and on its backing file, 4 KiB
 *      and 1 MiB granularity, a disabled one with contents, an empty one, a
 *      size that ends inside a granule) exported read-only with seven -B:
 *      nbdinfo (contexts in qemu-nbd's order, --map and --map --json for
 *      each bitmap) and libnbd's python binding (LIST_META_CONTEXT queries,
 *      block status on every context, REQ_ONE, unaligned ranges) see the
 *      same; so they do on a 12 GiB bitmap with runs longer than 4 GiB;
 *   2. refusals: same message and exit status (not found, searched down the
 *      chain but not through -o's raw window, inconsistent, enabled bitmap
 *      of a writable node behind -r); a failed writable start leaves no
 *      bitmap in use;
 *   3. the incremental backup: bitmap added by qemu-img-ts, full copy with
 *      nbdcopy, writes through our writable export (recording; qemu-nbd
 *      does the same to a twin image and the dirty maps agree), stop,
 *      export read-only with -B (qemu-nbd reads the bitmap we stored the
 *      same), copy only the dirty extents (python nbd, and our NbdClient)
 *      into the full copy, and `qemu-img compare` says identical.
 *
 * Servers run as child processes on unix sockets in a scratch directory and
 * are stopped by PID after each test.
 */
import { execFileSync, spawn, type ChildProcess } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { afterEach, beforeAll, describe, expect, it } from 'vitest';
import { NbdClient } from '../../nbd/client.js';
import { STATE_DIRTY } from '../../nbd/protocol.js';
import { markInUse } from '../helpers/bitmap-images.js';
import { missingPeers } from '../helpers/peers.js';
import { oursCommand, run, runOurs } from '../helpers/run.js';
import { waitForNbd } from '../helpers/nbd-server.js';
import { scratchDir } from '../helpers/tmp.js';

const PYTHON = '/usr/bin/python3';
const STOP_MS = 10_000;
const KiB = 1024;
const MiB = 1024 * KiB;
/** 4 MiB and 15 sectors: the last 64 KiB granule is partial. */
const CHAIN_BYTES = 4 * MiB + 7680;
const CHAIN_BITMAPS = ['bb', 'b0', 'g4k', 'g1m', 'frozen', 'off', 'empty'];

type Side = 'ours' | 'qemu';
const children = new Set<ChildProcess>();
let serial = 0;

afterEach(async () => {
  await Promise.all([...children].map(stopChild));
});

/** SIGTERM, wait for the exit (SIGKILL after STOP_MS). */
async function stopChild(child: ChildProcess): Promise<void> {
  children.delete(child);
  if (child.exitCode !== null || child.signalCode !== null) return;
  const exited = new Promise<void>((resolve) => child.once('exit', () => resolve()));
  child.kill('SIGTERM');
  const timer = setTimeout(() => child.kill('SIGKILL'), STOP_MS);
  await exited;
  clearTimeout(timer);
}

function nbdCommand(side: Side): [string, string[]] {
  if (side === 'qemu') return ['qemu-nbd', []];
  const [node, bin] = oursCommand('qemu-nbd-ts');
  return [node, [bin]];
}

interface Served {
  uri: string;
  socket: string;
  stop(): Promise<void>;
}

/** `qemu-nbd[-ts] -t -k SOCKET ARGS` in `dir`, once it answers. */
async function serve(dir: string, side: Side, args: string[]): Promise<Served> {
  const socket = path.join(dir, `${side}-${++serial}.sock`);
  const [cmd, pre] = nbdCommand(side);
  const child = spawn(cmd, [...pre, '-t', '-k', socket, ...args], { cwd: dir, stdio: ['ignore', 'ignore', 'pipe'] });
  children.add(child);
  let err = '';
  child.stderr!.on('data', (d: Buffer) => (err += d.toString()));
  const uri = `nbd+unix:///?socket=${socket}`;
  await waitForNbd(uri, () => child.exitCode !== null).catch((e: Error) => {
    throw new Error(`${e.message}: ${err}`);
  });
  return { uri, socket, stop: () => stopChild(child) };
}

/** Runs `args(uri)` against both servers; outputs with the socket path masked. */
async function both(ours: Served, theirs: Served, cmd: string, args: (uri: string) => string[]) {
  const once = async (s: Served) => {
    const r = await run(cmd, args(s.uri));
    const m = (t: string) => t.replaceAll(s.socket, '@SOCK@');
    return { stdout: m(r.stdout), stderr: m(r.stderr), code: r.code };
  };
  const [a, b] = await Promise.all([once(ours), once(theirs)]);
  return { ours: a, theirs: b };
}

describe.skipIf(missingPeers('qemu-img', 'qemu-io', 'qemu-nbd', 'nbdinfo', 'nbdcopy'))('qemu:dirty-bitmap from qemu-nbd-ts beside qemu-nbd 7.2', () => {
  const dir = scratchDir('qbt-nbd-bitmap-');
  const sh = (cmd: string, ...args: string[]) => execFileSync(cmd, args, { cwd: dir, encoding: 'utf8' });
  const io = (image: string, ...cmds: string[]) => sh('qemu-io', '-f', 'qcow2', ...cmds.flatMap((c) => ['-c', c]), image);
  const bitmapsInUse = (image: string) => sh('qemu-img', 'info', '-U', '--output=json', image).includes('in-use');

  beforeAll(() => {
    sh('qemu-img', 'create', '-q', '-f', 'qcow2', 'base.qcow2', String(CHAIN_BYTES));
    sh('qemu-img', 'bitmap', '--add', 'base.qcow2', 'bb');
    io('base.qcow2', 'write -P 0xab 0 1M', 'write -z 1M 512k');
    sh('qemu-img', 'create', '-q', '-f', 'qcow2', '-b', 'base.qcow2', '-F', 'qcow2', 'top.qcow2');
    for (const add of [['b0'], ['-g', '4k', 'g4k'], ['-g', '1M', 'g1m'], ['frozen'], ['--disable', 'off']]) {
      sh('qemu-img', 'bitmap', '--add', ...add.slice(0, -1), 'top.qcow2', add[add.length - 1]!);
    }
    io('top.qcow2', 'write -P 0xef 512k 128k', 'write -z 3M 64k', 'write -P 1 1001k 3k', 'discard 2M 64k', `write -P 2 ${4 * MiB} 7680`);
    sh('qemu-img', 'bitmap', '--disable', 'top.qcow2', 'frozen');
    io('top.qcow2', 'write -P 3 2560k 64k');
    sh('qemu-img', 'bitmap', '--add', 'top.qcow2', 'empty');
    fs.copyFileSync(path.join(dir, 'top.qcow2'), path.join(dir, 'inc.qcow2'));
    markInUse(path.join(dir, 'inc.qcow2'), 'b0');
  });

  it('nbdinfo: the same contexts, in the same order, and the same map of every bitmap', async () => {
    const args = ['-r', '-f', 'qcow2', ...CHAIN_BITMAPS.flatMap((b) => ['-B', b]), 'top.qcow2'];
    const [ours, theirs] = await Promise.all([serve(dir, 'ours', args), serve(dir, 'qemu', args)]);
    const info = await both(ours, theirs, 'nbdinfo', (u) => ['--json', u]);
    expect(info.ours).toEqual(info.theirs);
    const contexts = (JSON.parse(info.ours.stdout) as { exports: Array<{ contexts: string[] }> }).exports[0]!.contexts;
    expect(contexts).toEqual(['base:allocation', ...[...CHAIN_BITMAPS].reverse().map((b) => `qemu:dirty-bitmap:${b}`)]);
    const maps: Record<string, string> = {};
    for (const name of CHAIN_BITMAPS) {
      for (const json of [[], ['--json']]) {
        const r = await both(ours, theirs, 'nbdinfo', (u) => [`--map=qemu:dirty-bitmap:${name}`, ...json, u]);
        expect(r.ours, `${name} ${json.join('')}`).toEqual(r.theirs);
        if (json.length === 0) maps[name] = r.ours.stdout;
      }
    }
    expect(maps.b0).toBe(
      '         0      524288    0  clean\n    524288      131072    1  dirty\n    655360      327680    0  clean\n' +
        '    983040       65536    1  dirty\n   1048576     1048576    0  clean\n   2097152       65536    1  dirty\n' +
        '   2162688      458752    0  clean\n   2621440       65536    1  dirty\n   2686976      458752    0  clean\n' +
        '   3145728       65536    1  dirty\n   3211264      983040    0  clean\n   4194304        7680    1  dirty\n',
    );
    expect(maps.bb).toBe('         0     1572864    1  dirty\n   1572864     2629120    0  clean\n');
    expect(maps.empty).toBe('         0     4201984    0  clean\n');
  });

  it('python nbd: list and block status with the bitmap contexts are the same', async () => {
    const args = ['-r', '-f', 'qcow2', '-B', 'b0', '-B', 'g4k', '-B', 'off', '-A', 'top.qcow2'];
    const [ours, theirs] = await Promise.all([serve(dir, 'ours', args), serve(dir, 'qemu', args)]);
    const [a, b] = [await run(PYTHON, ['-c', PY_STATUS, ours.uri]), await run(PYTHON, ['-c', PY_STATUS, theirs.uri])];
    expect(a.stderr).toBe('');
    expect(a.stdout).toBe(b.stdout);
    const out = JSON.parse(a.stdout) as Record<string, unknown>;
    expect(out.list).toEqual({
      all: ['base:allocation', 'qemu:allocation-depth', 'qemu:dirty-bitmap:off', 'qemu:dirty-bitmap:g4k', 'qemu:dirty-bitmap:b0'],
      'qemu:dirty-bitmap:': ['qemu:dirty-bitmap:off', 'qemu:dirty-bitmap:g4k', 'qemu:dirty-bitmap:b0'],
      'qemu:dirty-bitmap:g4k': ['qemu:dirty-bitmap:g4k'],
      'qemu:dirty-bitmap:nosuch': [],
    });
    const status = out.status as Record<string, Record<string, number[][]>>;
    expect(status['0+1048576']!['qemu:dirty-bitmap:g4k']).toEqual([[524288, 0], [131072, 1], [368640, 0], [4096, 1], [20480, 0]]);
    expect(status['512000+70000']!['qemu:dirty-bitmap:b0']).toEqual([[12288, 0], [57712, 1]]);
    expect(status['512000+70000 req_one']!['qemu:dirty-bitmap:b0']).toEqual([[12288, 0]]);
    expect(status['4194304+7680']!['qemu:dirty-bitmap:b0']).toEqual([[7680, 1]]);
  });

  it('a 12 GiB bitmap with runs longer than 4 GiB reads the same', async () => {
    sh('qemu-img', 'create', '-q', '-f', 'qcow2', 'big.qcow2', '12G');
    sh('qemu-img', 'bitmap', '--add', 'big.qcow2', 'b');
    io('big.qcow2', ...[0, 1, 2, 3, 4, 7, 8, 9, 10, 11].map((g) => `write -z ${g}G 1G`));
    const args = ['-r', '-f', 'qcow2', '-B', 'b', 'big.qcow2'];
    const [ours, theirs] = await Promise.all([serve(dir, 'ours', args), serve(dir, 'qemu', args)]);
    const map = await both(ours, theirs, 'nbdinfo', (u) => ['--map=qemu:dirty-bitmap:b', u]);
    expect(map.ours).toEqual(map.theirs);
    expect(map.ours.stdout).toBe('         0  5368709120    1  dirty\n5368709120  2147483648    0  clean\n7516192768  5368709120    1  dirty\n');
    const [a, b] = [await run(PYTHON, ['-c', PY_BIG, ours.uri]), await run(PYTHON, ['-c', PY_BIG, theirs.uri])];
    expect(a.stderr).toBe('');
    expect(a.stdout).toBe(b.stdout);
  });

  it('refusals print what qemu-nbd prints, with its exit status', async () => {
    const cases: string[][] = [
      ['-f', 'qcow2', '-B', 'nosuch', 'top.qcow2'],
      ['-r', '-f', 'qcow2', '-B', 'nosuch', '-B', 'b0', 'top.qcow2'],
      ['-r', '-f', 'qcow2', '-B', 'x1', '-B', 'x2', 'top.qcow2'],
      ['-r', '-f', 'qcow2', '-o', '512', '-B', 'b0', 'top.qcow2'],
      ['-r', '-f', 'qcow2', '-B', 'b0', 'inc.qcow2'],
      ['-f', 'qcow2', '-B', 'b0', 'inc.qcow2'],
      ['-r', '--image-opts', 'driver=qcow2,read-only=off,file.filename=top.qcow2', '-B', 'b0'],
    ];
    for (const args of cases) {
      const [cmdOurs, preOurs] = nbdCommand('ours');
      const ours = await run(cmdOurs, [...preOurs, '-k', path.join(dir, 'r-ours.sock'), ...args], { cwd: dir });
      const theirs = await run('qemu-nbd', ['-k', path.join(dir, 'r-qemu.sock'), ...args], { cwd: dir });
      expect({ stderr: ours.stderr, code: ours.code }, args.join(' ')).toEqual({ stderr: theirs.stderr, code: theirs.code });
      expect(ours.code).toBe(1);
    }
    // A writable start that failed closed the image: its bitmaps are not left in use.
    expect(bitmapsInUse('top.qcow2')).toBe(false);
  });
});

describe.skipIf(missingPeers('qemu-img', 'qemu-io', 'qemu-nbd', 'nbdinfo', 'nbdcopy'))('incremental backup over NBD with qemu-nbd-ts -B', () => {
  const dir = scratchDir('qbt-nbd-backup-');
  const sh = (cmd: string, ...args: string[]) => execFileSync(cmd, args, { cwd: dir, encoding: 'utf8' });
  const file = (name: string) => path.join(dir, name);
  /** What is written through the writable exports after the full copy. */
  const WRITES = ['write -P 0x11 100k 8k', 'write -z 2M 192k', 'write -z -u 3M 64k', 'discard 5M 128k', `write -P 0x22 ${8 * MiB - 4 * KiB} 4k`, 'write -P 0x33 6000k 1k'];

  it('full copy, writes through a writable export, then only the dirty extents over NBD: the copy equals the source', async () => {
    sh('qemu-img', 'create', '-q', '-f', 'qcow2', 'disk.qcow2', '8M');
    sh('qemu-io', '-f', 'qcow2', '-c', 'write -P 0xa1 0 3M', '-c', 'write -P 0xa2 5M 2M', 'disk.qcow2');
    expect((await runOurs('qemu-img-ts', ['bitmap', '--add', 'disk.qcow2', 'inc'], { cwd: dir })).code).toBe(0);
    fs.copyFileSync(file('disk.qcow2'), file('twin.qcow2'));

    // Full copy from a read-only export.
    const full = await serve(dir, 'ours', ['-r', '-f', 'qcow2', 'disk.qcow2']);
    expect((await run('nbdcopy', [full.uri, file('full.raw')])).code).toBe(0);
    await full.stop();

    // Writes through writable exports; the bitmap records them (ours on disk.qcow2, qemu-nbd on its twin).
    const rwArgs = (image: string) => ['-f', 'qcow2', '--discard=unmap', '-B', 'inc', image];
    const [rw, twin] = await Promise.all([serve(dir, 'ours', rwArgs('disk.qcow2')), serve(dir, 'qemu', rwArgs('twin.qcow2'))]);
    const writes = await both(rw, twin, 'qemu-io', (u) => ['-f', 'raw', ...WRITES.flatMap((c) => ['-c', c]), u]);
    expect(writes.ours.code).toBe(0);
    expect(writes.ours.stdout.replace(/^.* ops; .*\n/gm, '')).toBe(writes.theirs.stdout.replace(/^.* ops; .*\n/gm, ''));
    const recorded = await both(rw, twin, 'nbdinfo', (u) => ['--map=qemu:dirty-bitmap:inc', u]);
    expect(recorded.ours).toEqual(recorded.theirs);
    await Promise.all([rw.stop(), twin.stop()]);
    expect(sh('qemu-img', 'check', '-f', 'qcow2', 'disk.qcow2')).toContain('No errors were found on the image.');
    expect((await run('qemu-img', ['compare', '-f', 'raw', '-F', 'qcow2', 'full.raw', 'disk.qcow2'], { cwd: dir })).stdout).toContain('Content mismatch');

    // Read-only exports with -B: qemu-nbd reads the bitmap we stored as we do.
    const roArgs = ['-r', '-f', 'qcow2', '-B', 'inc', 'disk.qcow2'];
    const [ro, qemuRo] = await Promise.all([serve(dir, 'ours', roArgs), serve(dir, 'qemu', roArgs)]);
    const stored = await both(ro, qemuRo, 'nbdinfo', (u) => ['--map=qemu:dirty-bitmap:inc', '--json', u]);
    expect(stored.ours).toEqual(stored.theirs);
    await qemuRo.stop();

    // Copy only the dirty extents: with python nbd into one copy, with our client into another.
    fs.copyFileSync(file('full.raw'), file('full2.raw'));
    const py = await run(PYTHON, ['-c', PY_INCREMENTAL, ro.uri, file('full.raw')]);
    expect(py.stderr).toBe('');
    const copiedPy = Number(py.stdout);
    const copiedOurs = await copyDirty(ro.socket, file('full2.raw'));
    await ro.stop();
    expect(copiedOurs).toBe(copiedPy);
    expect(copiedPy).toBe(576 * KiB);
    for (const copy of ['full.raw', 'full2.raw']) {
      expect(sh('qemu-img', 'compare', '-f', 'raw', '-F', 'qcow2', copy, 'disk.qcow2')).toBe('Images are identical.\n');
    }
  });
});

/** Reads the dirty extents of `qemu:dirty-bitmap:inc` with our NbdClient and writes them into `target`; returns the bytes copied. */
async function copyDirty(socket: string, target: string): Promise<number> {
  const context = 'qemu:dirty-bitmap:inc';
  const client = await NbdClient.connect({ address: { type: 'unix', path: socket }, exportName: '', metaContexts: [context] });
  const fd = fs.openSync(target, 'r+');
  let copied = 0;
  try {
    for (let at = 0; at < client.sizeBytes; ) {
      const extents = (await client.blockStatus(at, client.sizeBytes - at)).get(context)!;
      for (const e of extents) {
        if (e.flags & STATE_DIRTY) {
          const buf = new Uint8Array(e.length);
          await client.read(at, buf);
          fs.writeSync(fd, buf, 0, e.length, at);
          copied += e.length;
        }
        at += e.length;
      }
    }
  } finally {
    fs.closeSync(fd);
    await client.disconnect();
  }
  return copied;
}

/** LIST_META_CONTEXT answers and block status of every context (argv: URI). */
const PY_STATUS = String.raw`
import json, sys, nbd
uri = sys.argv[1]
out = {'list': {}, 'status': {}}
for query in [None, 'qemu:dirty-bitmap:', 'qemu:dirty-bitmap:g4k', 'qemu:dirty-bitmap:nosuch']:
    h = nbd.NBD()
    h.set_opt_mode(True)
    h.connect_uri(uri)
    if query: h.add_meta_context(query)
    seen = []
    h.opt_list_meta_context(lambda name: seen.append(name) or 0)
    out['list'][query or 'all'] = seen
    h.opt_abort()
h = nbd.NBD()
for c in ['base:allocation', 'qemu:allocation-depth', 'qemu:dirty-bitmap:b0', 'qemu:dirty-bitmap:g4k', 'qemu:dirty-bitmap:off']:
    h.add_meta_context(c)
h.connect_uri(uri)
size = h.get_size()
def status(offset, count, flags=0):
    res = {}
    def cb(ctx, off, entries, err):
        res[ctx] = [[entries[i], entries[i + 1]] for i in range(0, len(entries), 2)]
        return 0
    h.block_status(count, offset, cb, flags)
    return res
for offset, count in [(0, size), (0, 1048576), (1000 * 512, 70000), (1025024, 3072), (size - 7680, 7680), (3000000, size - 3000000)]:
    out['status'][f'{offset}+{count}'] = status(offset, count)
    out['status'][f'{offset}+{count} req_one'] = status(offset, count, nbd.CMD_FLAG_REQ_ONE)
h.shutdown()
print(json.dumps(out, sort_keys=True))
`;

/** Raw block status replies on a 12 GiB bitmap (argv: URI). */
const PY_BIG = String.raw`
import json, sys, nbd
h = nbd.NBD()
h.add_meta_context('qemu:dirty-bitmap:b')
h.connect_uri(sys.argv[1])
out = []
def cb(ctx, off, entries, err):
    out.append([ctx, off, list(entries)])
    return 0
for off, count, flags in [(0, 2**32 - 1, 0), (0, 2**32 - 1, nbd.CMD_FLAG_REQ_ONE), (2**32, 2**32 - 1, 0), (5 * 2**30 - 512, 2**31, 0), (6 * 2**30, 2**32 - 1, nbd.CMD_FLAG_REQ_ONE)]:
    h.block_status(count, off, cb, flags)
h.shutdown()
print(json.dumps(out))
`;

/** The incremental step with libnbd (argv: URI, target file): prints the bytes copied. */
const PY_INCREMENTAL = String.raw`
import sys, nbd
uri, target = sys.argv[1], sys.argv[2]
ctx = 'qemu:dirty-bitmap:inc'
h = nbd.NBD()
h.add_meta_context(ctx)
h.connect_uri(uri)
assert h.can_meta_context(ctx)
size = h.get_size()
copied = 0
with open(target, 'r+b') as f:
    offset = 0
    while offset < size:
        extents = []
        def cb(name, off, entries, err):
            if name == ctx:
                extents.extend(zip(entries[0::2], entries[1::2]))
            return 0
        h.block_status(min(size - offset, 2**31), offset, cb)
        for length, flags in extents:
            if flags & 1:  # NBD_STATE_DIRTY
                for at in range(offset, offset + length, 2**25):
                    f.seek(at)
                    f.write(h.pread(min(offset + length - at, 2**25), at))
                copied += length
            offset += length
h.shutdown()
print(copied)
`;
