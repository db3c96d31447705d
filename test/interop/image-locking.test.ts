/*
 * Image locking across processes: our tools and QEMU 7.2's protect an image
 * from each other with the same OFD byte locks (drivers/file/lock.ts).
 *
 * One image is held open for writing by a holder — real qemu-io or ours
 * (reading commands from a pipe that stays open), real
 * qemu-storage-daemon or ours (a writable qcow2 blockdev) — while probes
 * run beside it: qemu-img info / check / resize / create, qemu-io write and
 * read, with and without -U, and with file.locking=off. Each probe runs
 * with the real tool and with ours, in the image's directory with a
 * relative name so that messages match byte for byte; they must agree
 * (exit status, stdout, stderr), and what happens beside one of our
 * holders must be what happens beside the matching QEMU holder — so a real
 * qemu-img refuses an image our daemon writes exactly as it refuses one
 * qemu-storage-daemon writes.
 *
 * A holder is ready once its locks are visible (byte 100, "consistent
 * read" held, seen through the addon's lockConflict from this process);
 * it is stopped by closing its stdin or with `quit`, and by PID when that
 * does not end it. Every wait is bounded. Needs the native addon with OFD
 * locks (else the whole file skips).
 */
import { spawn, type ChildProcess } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { afterEach, beforeAll, describe, expect, it } from 'vitest';
import { loadHostIo } from '../../drivers/file/host-io.js';
import { LOCK_PERM_BASE_BYTE } from '../../drivers/file/lock.js';
import { missingPeers } from '../helpers/peers.js';
import { startStorageDaemon } from '../helpers/qmp-client.js';
import { oursCommand, run, runOurs, type RunResult } from '../helpers/run.js';
import { scratchDir } from '../helpers/tmp.js';

/** Longest wait for a holder to take its locks, and for one to exit. */
const HOLDER_WAIT_MS = 15_000;
const POLL_MS = 25;
const TEST_TIMEOUT_MS = 120_000;

const host = loadHostIo();
const skip = missingPeers('qemu-img', 'qemu-io', 'qemu-storage-daemon') || host.lockKind !== 'ofd';
const dir = scratchDir('image-locking-');

interface Holder {
  stop(): Promise<void>;
}
const holders: Holder[] = [];
afterEach(async () => {
  for (const h of holders.splice(0)) await h.stop();
});

/** Whether some description holds the "consistent read" byte of `name`. */
function locked(name: string): boolean {
  const fd = fs.openSync(path.join(dir, name), 'r');
  try {
    return host.lockConflict(fd, LOCK_PERM_BASE_BYTE, 1);
  } finally {
    fs.closeSync(fd);
  }
}

async function waitLocked(name: string, want: boolean, describeHolder: () => string): Promise<void> {
  const deadline = Date.now() + HOLDER_WAIT_MS;
  while (locked(name) !== want) {
    if (Date.now() > deadline) throw new Error(`${name} ${want ? 'not locked' : 'still locked'} after ${HOLDER_WAIT_MS} ms: ${describeHolder()}`);
    await sleep(POLL_MS);
  }
}

/** qemu-io (or ours) with `args`, reading commands from a pipe kept open until stop(). */
async function holdWithQemuIo(ours: boolean, name: string, args: string[]): Promise<Holder> {
  const [cmd, ...prefix] = ours ? oursCommand('qemu-io-ts') : ['qemu-io'];
  const child: ChildProcess = spawn(cmd!, [...prefix, ...args, name], { cwd: dir, stdio: ['pipe', 'ignore', 'pipe'] });
  let err = '';
  child.stderr!.on('data', (d: Buffer) => (err += d.toString()));
  const exited = new Promise<void>((resolve) => child.once('exit', () => resolve()));
  const stop = async () => {
    child.stdin!.end();
    const timer = setTimeout(() => child.exitCode === null && child.signalCode === null && process.kill(child.pid!, 'SIGKILL'), HOLDER_WAIT_MS);
    await exited;
    clearTimeout(timer);
  };
  const holder = { stop };
  holders.push(holder);
  await waitLocked(name, true, () => err);
  return holder;
}

/** A storage daemon (or ours) with `name` open as a writable qcow2 blockdev. */
async function holdWithDaemon(ours: boolean, name: string): Promise<Holder> {
  const daemon = await startStorageDaemon(dir, ['--blockdev', `driver=qcow2,node-name=disk,file.driver=file,file.filename=${name}`], { ours });
  const holder = {
    stop: async () => {
      await daemon.quit().catch(() => undefined);
      await daemon.stop();
    },
  };
  holders.push(holder);
  await waitLocked(name, true, () => daemon.stderr());
  return holder;
}

type Tool = 'qemu-img' | 'qemu-io';
/** A probe: the tool and its arguments (the image is named relative to `dir`). */
type Probe = [Tool, string[]];

/** Runs a probe with the real tool and with ours; returns both results. */
async function both([tool, args]: Probe): Promise<{ real: RunResult; ours: RunResult }> {
  const real = await run(tool, args, { cwd: dir });
  const ours = await runOurs(`${tool}-ts`, args, { cwd: dir });
  return { real, ours };
}

/** qemu-io's timing line ("512 bytes, 1 ops; 00.00 sec (… MiB/sec and … ops/sec)") differs run to run. */
const TIMING_LINE = /^(\d+ bytes, \d+ ops); .* sec \(.*\)$/gm;
const outcome = (r: RunResult) => ({ code: r.code, stdout: r.stdout.replace(TIMING_LINE, '$1; TIME'), stderr: r.stderr });

/** Probes beside a holder of a writable qcow2 image `img` (create last: it would destroy the image if let through). */
function qcow2Probes(img: string): Probe[] {
  return [
    ['qemu-img', ['info', img]],
    ['qemu-img', ['info', '-U', '--output=json', img]],
    ['qemu-img', ['check', img]],
    ['qemu-img', ['check', '-U', '--output=json', img]],
    ['qemu-img', ['info', '--output=json', '--image-opts', `driver=qcow2,file.driver=file,file.filename=${img},file.locking=off`]],
    ['qemu-img', ['resize', img, '2M']],
    ['qemu-io', ['-c', 'write 0 512', img]],
    ['qemu-io', ['-r', '-c', 'read 0 512', img]],
    ['qemu-io', ['-r', '-U', '-c', 'read 0 512', img]],
    ['qemu-img', ['create', '-f', 'qcow2', img, '1M']],
  ];
}

/** Runs every probe beside a fresh holder of a fresh image; returns the outcomes (real and ours must agree). */
async function probeBeside(makeHolder: (name: string) => Promise<Holder>, tag: string): Promise<unknown[]> {
  const img = `${tag}.qcow2`;
  expect((await run('qemu-img', ['create', '-q', '-f', 'qcow2', img, '1M'], { cwd: dir })).code).toBe(0);
  const holder = await makeHolder(img);
  const outcomes: unknown[] = [];
  for (const probe of qcow2Probes(img)) {
    const { real, ours } = await both(probe);
    expect({ probe, ...outcome(ours) }).toEqual({ probe, ...outcome(real) });
    const seen = outcome(real);
    outcomes.push({ probe: probe[1].join(' ').replaceAll(img, 'IMG'), ...seen, stdout: seen.stdout.replaceAll(img, 'IMG'), stderr: seen.stderr.replaceAll(img, 'IMG') });
  }
  await holder.stop();
  await waitLocked(img, false, () => 'holder stopped');
  return outcomes;
}

describe.skipIf(skip)('image locking between our tools and QEMU 7.2', () => {
  let besideRealIo: unknown[];
  let besideRealDaemon: unknown[];

  beforeAll(async () => {
    besideRealIo = await probeBeside((name) => holdWithQemuIo(false, name, []), 'real-io');
    besideRealDaemon = await probeBeside((name) => holdWithDaemon(false, name), 'real-qsd');
  }, TEST_TIMEOUT_MS);

  it('beside a real qemu-io writer, our tools refuse and accept exactly as QEMU does', () => {
    const byProbe = new Map(besideRealIo.map((o) => [(o as { probe: string }).probe, o as RunResult]));
    expect(byProbe.get('info IMG')).toMatchObject({
      code: 1,
      stderr: "qemu-img: Could not open 'IMG': Failed to get shared \"write\" lock\nIs another process using the image [IMG]?\n",
    });
    expect(byProbe.get('-c write 0 512 IMG')).toMatchObject({
      code: 1,
      stderr: "qemu-io: can't open device IMG: Failed to get \"write\" lock\nIs another process using the image [IMG]?\n",
    });
    expect(byProbe.get('-r -U -c read 0 512 IMG')).toMatchObject({ code: 0 });
    expect(byProbe.get('info -U --output=json IMG')).toMatchObject({ code: 0 });
  });

  it('beside our qemu-io-ts writer, QEMU and our tools behave as beside a real qemu-io', async () => {
    expect(await probeBeside((name) => holdWithQemuIo(true, name, []), 'our-io')).toEqual(besideRealIo);
  }, TEST_TIMEOUT_MS);

  it('beside our qemu-storage-daemon-ts, QEMU and our tools behave as beside a real qemu-storage-daemon', async () => {
    expect(besideRealDaemon).toEqual(besideRealIo);
    expect(await probeBeside((name) => holdWithDaemon(true, name), 'our-qsd')).toEqual(besideRealDaemon);
  }, TEST_TIMEOUT_MS);

  it('a raw image written by one side can be inspected but not converted by the other', async () => {
    const img = 'raw-writer.raw';
    fs.writeFileSync(path.join(dir, img), Buffer.alloc(1 << 20));
    const probes: Probe[] = [
      ['qemu-img', ['info', '-f', 'raw', img]],
      ['qemu-img', ['convert', '-f', 'raw', '-O', 'raw', img, 'raw-copy.raw']],
      ['qemu-img', ['convert', '-U', '-f', 'raw', '-O', 'raw', img, 'raw-copy-u.raw']],
      ['qemu-io', ['-f', 'raw', '-c', 'write 0 512', img]],
    ];
    const results: unknown[][] = [];
    for (const ours of [false, true]) {
      const holder = await holdWithQemuIo(ours, img, ['-f', 'raw']);
      const outcomes: unknown[] = [];
      for (const probe of probes) {
        const r = await both(probe);
        expect({ probe, ...outcome(r.ours) }).toEqual({ probe, ...outcome(r.real) });
        outcomes.push(outcome(r.real));
      }
      results.push(outcomes);
      await holder.stop();
    }
    expect(results[1]).toEqual(results[0]);
    expect(results[0]!.map((o) => (o as RunResult).code)).toEqual([0, 1, 0, 0]);
    expect((results[0]![1] as RunResult).stderr).toBe(
      `qemu-img: Could not open '${img}': Failed to get shared "write" lock\nIs another process using the image [${img}]?\n`,
    );
  }, TEST_TIMEOUT_MS);
});
