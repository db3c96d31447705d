/*
 * Persistent bitmaps in qcow2, both ways, against QEMU 7.2:
 *
 *   - bitmaps made by `qemu-img bitmap` and filled by qemu-io writes,
 *     write-zeroes and discards load here with the dirty extents qemu-nbd
 *     exports for them (nbdinfo --map=qemu:dirty-bitmap:NAME), for several
 *     granularities and cluster sizes, including bitmaps whose data spans
 *     many clusters and table entries that say "all ones" without a
 *     cluster; `qemu-img-ts info` prints what qemu-img info prints;
 *   - bitmaps we add and fill (qemu-img-ts bitmap, qemu-io-ts) load in
 *     QEMU with our dirty extents, `qemu-img info` lists them, and
 *     `qemu-img check` is clean;
 *   - an image closed uncleanly by either side (SIGKILL while open for
 *     writing) has its bitmaps in use on disk and loads as inconsistent on
 *     the other side;
 *   - a 4 TiB image with a few dirty extents costs little to load and store.
 *
 * Build first (npm run build): the tests run dist/.
 */
import { execFileSync, spawn, spawnSync, type ChildProcess } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { describe, expect, it } from 'vitest';
import { findDirtyBitmap } from '../../block/dirty-bitmap.js';
import { BlockGraph } from '../../block/graph.js';
import { builtinDrivers } from '../../drivers/index.js';
import { markInUse, setTableEntry } from '../helpers/bitmap-images.js';
import { missingPeers } from '../helpers/peers.js';
import { ROOT } from '../helpers/run.js';
import { scratchDir } from '../helpers/tmp.js';

const IMG_BIN = path.join(ROOT, 'dist/bin/qemu-img-ts.mjs');
const IO_BIN = path.join(ROOT, 'dist/bin/qemu-io-ts.mjs');
/** How long to wait for a server socket or a process to get going, in 50 ms polls. */
const WAIT_POLLS = 200;
const POLL_MS = 50;

const sleep = (ms: number) => new Promise((resolve) => setTimeout(resolve, ms));

/** Merges touching runs: servers may split a run where we do not. */
function merged(runs: Array<[number, number]>): string[] {
  const out: Array<[number, number]> = [];
  for (const [offset, bytes] of runs) {
    const last = out[out.length - 1];
    if (last && last[0] + last[1] === offset) last[1] += bytes;
    else out.push([offset, bytes]);
  }
  return out.map(([o, b]) => `${o}+${b}`);
}

describe.skipIf(missingPeers('qemu-img', 'qemu-io', 'qemu-nbd', 'nbdinfo'))('qcow2 persistent bitmaps against QEMU 7.2', () => {
  const dir = scratchDir('qbt-qcow2-bitmaps-');
  const file = (name: string) => path.join(dir, name);
  const qemu = (cmd: string, ...args: string[]) => execFileSync(cmd, args, { cwd: dir, encoding: 'utf8' });
  const ours = (bin: string, ...args: string[]) => execFileSync(process.execPath, [bin, ...args], { cwd: dir, encoding: 'utf8' });
  const io = (run: (...args: string[]) => string, name: string, ...commands: string[]) => run('-f', 'qcow2', ...commands.flatMap((c) => ['-c', c]), name);
  const qemuIo = (...args: string[]) => qemu('qemu-io', ...args);
  const oursIo = (...args: string[]) => ours(IO_BIN, ...args);
  const checkClean = (name: string) => {
    const r = spawnSync('qemu-img', ['check', '-f', 'qcow2', name], { cwd: dir, encoding: 'utf8' });
    expect(`${r.status} ${r.stdout}${r.stderr}`).toMatch(/^0 No errors were found on the image/);
  };

  /** Dirty runs of each bitmap as qemu-nbd exports them. */
  async function qemuDirty(name: string, bitmaps: string[]): Promise<Record<string, string[]>> {
    const sock = file(`nbd-${process.pid}-${Date.now()}.sock`);
    const server = spawn('qemu-nbd', ['-t', '-r', '-f', 'qcow2', '-k', sock, ...bitmaps.flatMap((b) => ['-B', b]), file(name)], { stdio: 'ignore' });
    try {
      await waitFor(() => fs.existsSync(sock), server);
      const out: Record<string, string[]> = {};
      for (const b of bitmaps) {
        const map = qemu('nbdinfo', `--map=qemu:dirty-bitmap:${b}`, `nbd+unix:///?socket=${sock}`);
        const runs = map
          .trim()
          .split('\n')
          .map((line) => line.trim().split(/\s+/))
          .filter((f) => f[2] === '1')
          .map((f): [number, number] => [Number(f[0]), Number(f[1])]);
        out[b] = merged(runs);
      }
      return out;
    } finally {
      await stop(server);
    }
  }

  /** Dirty runs of each bitmap as our driver loads them (read-only open). */
  async function oursDirty(name: string, bitmaps: string[]): Promise<Record<string, string[]>> {
    const graph = new BlockGraph(builtinDrivers);
    try {
      const node = await graph.openImage(file(name), { format: 'qcow2', readOnly: true });
      const out: Record<string, string[]> = {};
      for (const b of bitmaps) out[b] = merged([...findDirtyBitmap(node, b)!.dirtyExtents()].map((e): [number, number] => [e.offset, e.bytes]));
      return out;
    } finally {
      await graph.closeAll();
    }
  }

  /** The state of a bitmap as our driver loads it (read-only open). */
  async function oursState(name: string, bitmap: string) {
    const graph = new BlockGraph(builtinDrivers);
    try {
      const node = await graph.openImage(file(name), { format: 'qcow2', readOnly: true });
      const bm = findDirtyBitmap(node, bitmap)!;
      return { inconsistent: bm.inconsistent, recording: bm.recording, dirtyBytes: bm.dirtyBytes };
    } finally {
      await graph.closeAll();
    }
  }

  const infoJson = (run: (...args: string[]) => string, name: string) => run('info', '--output=json', name);

  it('bitmaps qemu-img made and qemu-io filled load here with the extents qemu-nbd exports', async () => {
    qemu('qemu-img', 'create', '-q', '-f', 'qcow2', '-o', 'cluster_size=4096', 'q.qcow2', '64M');
    qemu('qemu-img', 'bitmap', '--add', 'q.qcow2', 'b0');
    qemu('qemu-img', 'bitmap', '--add', '-g', '512', 'q.qcow2', 'fine');
    qemu('qemu-img', 'bitmap', '--add', '-g', '1M', 'q.qcow2', 'coarse');
    qemu('qemu-img', 'bitmap', '--add', '--disable', 'q.qcow2', 'off');
    // 64 MiB at 512 B granules: 16 KiB of bits, 4 clusters of 4 KiB; writes land in each.
    io(qemuIo, 'q.qcow2', 'write -P 1 0 1', 'write 5M 4097', 'write -z 17M 100k', 'discard 33M 64k', 'write 50M 1M', `write ${64 * 1024 * 1024 - 512} 512`);
    const names = ['b0', 'fine', 'coarse', 'off'];
    const theirs = await qemuDirty('q.qcow2', names);
    expect(theirs.fine!.length).toBe(6);
    expect(await oursDirty('q.qcow2', names)).toEqual(theirs);
    expect(ours(IMG_BIN, 'info', 'q.qcow2')).toBe(qemu('qemu-img', 'info', 'q.qcow2'));
    expect(infoJson((...a) => ours(IMG_BIN, ...a), 'q.qcow2')).toBe(infoJson((...a) => qemu('qemu-img', ...a), 'q.qcow2'));
  });

  it('table entries meaning "all ones" without a cluster load as dirty on both sides', async () => {
    qemu('qemu-img', 'create', '-q', '-f', 'qcow2', '-o', 'cluster_size=512', 'ones.qcow2', '16M');
    qemu('qemu-img', 'bitmap', '--add', '-g', '512', 'ones.qcow2', 'b');
    io(qemuIo, 'ones.qcow2', 'write 9M 512');
    // A 512-byte cluster of bits covers 2 MiB at 512 B granules: entry 1 is [2 MiB, 4 MiB).
    setTableEntry(file('ones.qcow2'), 'b', 1, 1n);
    const theirs = await qemuDirty('ones.qcow2', ['b']);
    expect(theirs.b).toEqual(['2097152+2097152', '9437184+512']);
    expect(await oursDirty('ones.qcow2', ['b'])).toEqual(theirs);
  });

  it('bitmaps we add and fill load in QEMU with our extents; info and check agree', async () => {
    qemu('qemu-img', 'create', '-q', '-f', 'qcow2', 'o.qcow2', '32M');
    ours(IMG_BIN, 'bitmap', '--add', 'o.qcow2', 'b0');
    ours(IMG_BIN, 'bitmap', '--add', '-g', '4k', 'o.qcow2', 'g4k');
    ours(IMG_BIN, 'bitmap', '--add', '--disable', 'o.qcow2', 'off');
    io(oursIo, 'o.qcow2', 'write -P 7 3 5000', 'write -z 8M 200k', 'discard 16M 64k', 'write 31M 1M');
    ours(IMG_BIN, 'bitmap', '--merge', 'g4k', 'o.qcow2', 'off');
    checkClean('o.qcow2');
    const names = ['b0', 'g4k', 'off'];
    const theirs = await qemuDirty('o.qcow2', names);
    expect(theirs.b0).toEqual(['0+65536', '8388608+262144', '16777216+65536', '32505856+1048576']);
    expect(await oursDirty('o.qcow2', names)).toEqual(theirs);
    const json = JSON.parse(qemu('qemu-img', 'info', '--output=json', 'o.qcow2')) as { 'format-specific': { data: { bitmaps: unknown } } };
    expect(json['format-specific'].data.bitmaps).toEqual([
      { flags: ['auto'], name: 'b0', granularity: 65536 },
      { flags: ['auto'], name: 'g4k', granularity: 4096 },
      { flags: [], name: 'off', granularity: 65536 },
    ]);
    expect(infoJson((...a) => ours(IMG_BIN, ...a), 'o.qcow2')).toBe(infoJson((...a) => qemu('qemu-img', ...a), 'o.qcow2'));
  });

  it('a writer killed while the image is open leaves in-use bitmaps that the other side loads as inconsistent', async () => {
    for (const [who, name] of [['ours', 'k-ours.qcow2'], ['qemu', 'k-qemu.qcow2']] as const) {
      qemu('qemu-img', 'create', '-q', '-f', 'qcow2', name, '4M');
      qemu('qemu-img', 'bitmap', '--add', name, 'b0');
      const args = ['-f', 'qcow2', '-c', 'write 0 64k', '-c', 'sleep 30000', name];
      const writer = who === 'ours' ? spawn(process.execPath, [IO_BIN, ...args], { cwd: dir, stdio: 'ignore' }) : spawn('qemu-io', args, { cwd: dir, stdio: 'ignore' });
      const shown = () => (JSON.parse(qemu('qemu-img', 'info', '-U', '--output=json', name)) as { 'format-specific': { data: { bitmaps: unknown } } })['format-specific'].data.bitmaps;
      try {
        // The writer marks the bitmap in use on disk as soon as it has opened the image.
        const inUse = () => {
          try {
            return String(JSON.stringify(shown())).includes('in-use');
          } catch {
            return false; // caught between two header writes of the writer's open
          }
        };
        await waitFor(inUse, writer);
        expect(shown()).toEqual([{ flags: ['in-use', 'auto'], name: 'b0', granularity: 65536 }]);
        await sleep(500);
      } finally {
        writer.kill('SIGKILL');
        await stop(writer);
      }
    }
    // Ours crashed: QEMU refuses to use the bitmap, removes it, check stays clean.
    const refused = spawnSync('qemu-img', ['bitmap', '--enable', 'k-ours.qcow2', 'b0'], { cwd: dir, encoding: 'utf8' });
    expect(refused.stderr).toBe(
      "qemu-img: Operation enable on bitmap b0 failed: Bitmap 'b0' is inconsistent and cannot be used\nTry block-dirty-bitmap-remove to delete this bitmap from disk\n",
    );
    qemu('qemu-img', 'bitmap', '--remove', 'k-ours.qcow2', 'b0');
    checkClean('k-ours.qcow2');
    // QEMU crashed: we load it inconsistent and disabled, remove it, check stays clean.
    expect(await oursState('k-qemu.qcow2', 'b0')).toEqual({ inconsistent: true, recording: false, dirtyBytes: 0 });
    ours(IMG_BIN, 'bitmap', '--remove', 'k-qemu.qcow2', 'b0');
    checkClean('k-qemu.qcow2');
    // Marked by hand, the same.
    qemu('qemu-img', 'create', '-q', '-f', 'qcow2', 'k-hand.qcow2', '4M');
    qemu('qemu-img', 'bitmap', '--add', 'k-hand.qcow2', 'b0');
    markInUse(file('k-hand.qcow2'), 'b0');
    expect((await oursState('k-hand.qcow2', 'b0')).inconsistent).toBe(true);
  });

  it('a 4 TiB image with a few dirty extents is cheap to load and store', async () => {
    qemu('qemu-img', 'create', '-q', '-f', 'qcow2', 'big.qcow2', '4T');
    const t0 = performance.now();
    ours(IMG_BIN, 'bitmap', '--add', 'big.qcow2', 'b');
    io(oursIo, 'big.qcow2', 'write 1T 4k', 'write 3T 1M', `write ${4 * 2 ** 40 - 512} 512`);
    ours(IMG_BIN, 'bitmap', '--add', '-g', '1M', 'big.qcow2', 'c');
    ours(IMG_BIN, 'bitmap', '--merge', 'b', 'big.qcow2', 'c');
    expect(performance.now() - t0).toBeLessThan(20_000);
    checkClean('big.qcow2');
    const theirs = await qemuDirty('big.qcow2', ['b', 'c']);
    expect(theirs.b).toEqual(['1099511627776+65536', '3298534883328+1048576', '4398046445568+65536']);
    expect(await oursDirty('big.qcow2', ['b', 'c'])).toEqual(theirs);
    // 4 TiB at 64 KiB granules: 8 MiB of bits, but only the clusters holding dirty bits are stored.
    expect(fs.statSync(file('big.qcow2')).size).toBeLessThan(8 * 1024 * 1024);
  });
});

/** Polls `ready` until true, failing if `proc` exits first or time runs out. */
async function waitFor(ready: () => boolean, proc: ChildProcess): Promise<void> {
  for (let i = 0; i < WAIT_POLLS; i++) {
    if (ready()) return;
    if (proc.exitCode !== null) throw new Error(`process exited early with ${proc.exitCode}`);
    await sleep(POLL_MS);
  }
  throw new Error('timed out waiting for the process');
}

/** Stops a child by its PID and waits for it to exit. */
async function stop(proc: ChildProcess): Promise<void> {
  if (proc.exitCode !== null || proc.signalCode !== null) return;
  const exited = new Promise((resolve) => proc.once('exit', resolve));
  proc.kill('SIGTERM');
  await exited;
}
