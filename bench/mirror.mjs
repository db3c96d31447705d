#!/usr/bin/env node
// Mirror side by side: qemu-storage-daemon-ts (ours) and qemu-storage-daemon
// 7.2 mirror the same 1 GiB qcow2 (first half random data, second half
// never written) to a new qcow2 on /dev/shm, driven over QMP, in one run:
//   - idle: nobody writes the source while the job runs;
//   - writer: a client writes 64 KiB of random data at random offsets
//     through an NBD export of the source at a steady rate
//     (--writer-mib-s, default 32 MiB/s) from before the job starts until
//     it has completed; the copy must catch up with those writes to become
//     READY, and the pivot must carry them over.
// Timed: from `blockdev-mirror` to BLOCK_JOB_COMPLETED (READY, then
// job-complete at once). Printed: medians with min–max, the median
// per-round ratio ours/qemu (≤ 1: we are at least as fast) and the daemons'
// peak RSS (VmHWM). Each daemon starts on freshly freed memory (lib.mjs
// warmFreePages). Every target is checked with `qemu-img compare` against
// the source after the daemon quit (the writer's data included).
//
//   node bench/mirror.mjs [--runs 3] [--size-mib 1024] [--writer-mib-s 32] [--sides ours,qemu]
//
// Needs `npm run build`, qemu-img and qemu-storage-daemon. For profiling:
//   MIRROR_BENCH_PHASES=1   prints each run's time to READY, READY → COMPLETED
//                           and the daemon's CPU seconds in the window (main
//                           thread, other threads);
//   MIRROR_BENCH_NODE_ARGS  extra node flags for our daemon (e.g.
//                           "--cpu-prof --cpu-prof-dir=DIR");
//   MIRROR_BENCH_WRAP       a prefix for each daemon's command (e.g. a script
//                           running `perf record … --`; RSS and CPU are then
//                           the wrapper's);
//   MIRROR_BENCH_BASE_BIN   with --sides ours,base: an earlier build's
//                           dist/bin/qemu-storage-daemon-ts.mjs, for A/B runs
//                           (ratios are then against the base build).
import { execFileSync, spawn } from 'node:child_process';
import { randomBytes, randomInt } from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { parseArgs } from 'node:util';
import { connectQmp } from '../scripts/qmp.mjs';
import { ROOT, runSides, scratch, warmFreePages } from './lib.mjs';

const { values } = parseArgs({
  options: {
    runs: { type: 'string', default: '3' },
    'size-mib': { type: 'string', default: '1024' },
    'writer-mib-s': { type: 'string', default: '32' },
    sides: { type: 'string', default: 'ours,qemu' },
  },
});
const runs = Number(values.runs);
const MiB = 1 << 20;
const sizeBytes = Number(values['size-mib']) * MiB;
const writerBytesPerSecond = Number(values['writer-mib-s']) * MiB;
const WRITE_BYTES = 64 * 1024;
const SIDES = values.sides.split(',');
const QMP_TIMEOUT_MS = 30_000;
const JOB_TIMEOUT_MS = 600_000;
const STOP_TIMEOUT_MS = 10_000;

const dir = scratch();
const pristine = path.join(dir, 'pristine.qcow2');

const DAEMONS = {
  ours: [
    process.execPath,
    ...(process.env.MIRROR_BENCH_NODE_ARGS ?? '').split(' ').filter(Boolean),
    path.join(ROOT, 'dist/bin/qemu-storage-daemon-ts.mjs'),
  ],
  qemu: ['qemu-storage-daemon'],
  base: [process.execPath, process.env.MIRROR_BENCH_BASE_BIN ?? ''],
};

// ---------------------------------------------------------------- images

function makePristine() {
  execFileSync('qemu-img', ['create', '-q', '-f', 'qcow2', pristine, String(sizeBytes)]);
  const raw = path.join(dir, 'half.raw');
  const fd = fs.openSync(raw, 'w');
  const chunk = Buffer.alloc(8 * MiB);
  for (let at = 0; at < sizeBytes / 2; at += chunk.length) fs.writeSync(fd, randomBytes(chunk.length), 0, chunk.length, at);
  fs.ftruncateSync(fd, sizeBytes);
  fs.closeSync(fd);
  execFileSync('qemu-img', ['convert', '-n', '-f', 'raw', '-O', 'qcow2', raw, pristine]);
  fs.rmSync(raw);
}

/**
 * Freshly freed memory left for each run (lib.mjs warmFreePages). The
 * default 1 GiB was not always enough here: with our daemon's writes on a
 * thread of their own, 3–4 of 14 runs met host-discarded pages part-way
 * through (the target's copy then ran ~10× slower for the rest: 0.6–1.1 s
 * instead of ~0.23); with 3 GiB none of 42 runs (either daemon) did.
 */
const MIRROR_WARM_BYTES = 3 * 1024 * MiB;

// ---------------------------------------------------------------- writer

/**
 * Writes 64 KiB at random offsets through the export at a steady rate until
 * stopped, and the same bytes into `shadow` (a raw copy of the source): after
 * the pivot the writes land on the target only, so the shadow is what the
 * target must hold.
 */
async function startWriter(exportSocket, shadow) {
  const shadowFd = fs.openSync(shadow, 'r+');
  const { NbdClient } = await import(path.join(ROOT, 'dist/nbd/client.js'));
  const client = await NbdClient.connect({ address: { type: 'unix', path: exportSocket }, exportName: 'src' });
  const data = randomBytes(WRITE_BYTES);
  const intervalMs = (WRITE_BYTES / writerBytesPerSecond) * 1000;
  let stop = false;
  let written = 0;
  const started = performance.now();
  const loop = (async () => {
    while (!stop) {
      const slot = Math.floor(sizeBytes / WRITE_BYTES);
      const at = randomInt(slot) * WRITE_BYTES;
      await client.write(at, data);
      fs.writeSync(shadowFd, data, 0, WRITE_BYTES, at);
      written += WRITE_BYTES;
      const due = started + (written / WRITE_BYTES) * intervalMs;
      const wait = due - performance.now();
      if (wait > 0) await new Promise((r) => setTimeout(r, wait));
    }
    await client.flush();
    await client.disconnect();
    fs.closeSync(shadowFd);
  })();
  return async () => {
    stop = true;
    await loop;
    return written;
  };
}

// ---------------------------------------------------------------- one run

function peakRssMiB(pid) {
  const m = /VmHWM:\s+(\d+) kB/.exec(fs.readFileSync(`/proc/${pid}/status`, 'utf8'));
  return m ? Number(m[1]) / 1024 : NaN;
}

/** CPU seconds (user + system) so far of a process's main thread and of its other threads (I/O pool, GC, compiler). */
function cpuSeconds(pid) {
  const spent = { main: 0, others: 0 };
  for (const tid of fs.readdirSync(`/proc/${pid}/task`)) {
    const stat = fs.readFileSync(`/proc/${pid}/task/${tid}/stat`, 'utf8');
    const fields = stat.slice(stat.lastIndexOf(') ') + 2).split(' ');
    spent[tid === String(pid) ? 'main' : 'others'] += (Number(fields[11]) + Number(fields[12])) / 100;
  }
  return spent;
}

/** One run's phases and CPU for MIRROR_BENCH_PHASES. */
function phasesLine(label, readySeconds, totalSeconds, cpu0, cpu1) {
  const main = cpu1.main - cpu0.main;
  const others = cpu1.others - cpu0.others;
  const f = (x) => x.toFixed(3);
  return `${label}: READY after ${f(readySeconds)} s, COMPLETED ${f(totalSeconds - readySeconds)} s later, CPU ${f(main + others)} s (main ${f(main)}, other threads ${f(others)})`;
}

async function mirrorOnce(side, withWriter, round) {
  const src = path.join(dir, `src-${side}-${round}.qcow2`);
  const tgt = path.join(dir, `tgt-${side}-${round}.qcow2`);
  const shadow = path.join(dir, `shadow-${side}-${round}.raw`);
  const qmpSock = path.join(dir, `qmp-${side}.sock`);
  const nbdSock = path.join(dir, `nbd-${side}.sock`);
  fs.copyFileSync(pristine, src);
  execFileSync('qemu-img', ['convert', '-f', 'qcow2', '-O', 'raw', pristine, shadow]);
  execFileSync('qemu-img', ['create', '-q', '-f', 'qcow2', tgt, String(sizeBytes)]);
  for (const f of [qmpSock, nbdSock]) fs.rmSync(f, { force: true });
  warmFreePages(MIRROR_WARM_BYTES);
  const [cmd, ...args] = [...(process.env.MIRROR_BENCH_WRAP ?? '').split(' ').filter(Boolean), ...DAEMONS[side]];
  const child = spawn(cmd, [...args, '--chardev', `socket,path=${qmpSock},server=on,wait=off,id=m0`, '--monitor', 'chardev=m0'], {
    stdio: ['ignore', 'ignore', 'inherit'],
  });
  const exited = new Promise((resolve) => child.once('exit', resolve));
  try {
    const qmp = await connectQmp(qmpSock, { timeoutMs: QMP_TIMEOUT_MS });
    await qmp.execute('blockdev-add', { driver: 'qcow2', 'node-name': 'src', file: { driver: 'file', filename: src } });
    await qmp.execute('blockdev-add', { driver: 'qcow2', 'node-name': 'tgt', file: { driver: 'file', filename: tgt } });
    let stopWriter = null;
    if (withWriter) {
      await qmp.execute('nbd-server-start', { addr: { type: 'unix', data: { path: nbdSock } } });
      await qmp.execute('block-export-add', { type: 'nbd', id: 'e0', 'node-name': 'src', name: 'src', writable: true });
      stopWriter = await startWriter(nbdSock, shadow);
    }
    const cpu0 = cpuSeconds(child.pid);
    const t0 = performance.now();
    await qmp.execute('blockdev-mirror', { 'job-id': 'm', device: 'src', target: 'tgt', sync: 'full' });
    if (!(await qmp.event('BLOCK_JOB_READY', JOB_TIMEOUT_MS))) throw new Error(`${side}: no BLOCK_JOB_READY`);
    const tReady = performance.now();
    await qmp.execute('job-complete', { id: 'm' });
    const done = await qmp.event('BLOCK_JOB_COMPLETED', JOB_TIMEOUT_MS);
    if (!done) throw new Error(`${side}: no BLOCK_JOB_COMPLETED`);
    const seconds = (performance.now() - t0) / 1000;
    if (process.env.MIRROR_BENCH_PHASES) {
      console.error(phasesLine(`${side}${withWriter ? ' writer' : ''}`, (tReady - t0) / 1000, seconds, cpu0, cpuSeconds(child.pid)));
    }
    if (done.data.error) throw new Error(`${side}: mirror failed: ${done.data.error}`);
    if (stopWriter) await stopWriter();
    const rssMiB = peakRssMiB(child.pid);
    await qmp.execute('quit').catch(() => undefined);
    return { seconds, rssMiB, src, tgt, shadow };
  } finally {
    const timer = setTimeout(() => child.kill('SIGKILL'), STOP_TIMEOUT_MS);
    await exited;
    clearTimeout(timer);
  }
}

function row(name, withWriter) {
  return {
    name,
    async run(side, round) {
      const r = await mirrorOnce(side, withWriter, round);
      // The target holds the source as it was plus every write, before and after the pivot.
      execFileSync('qemu-img', ['compare', '-q', '-f', 'raw', '-F', 'qcow2', r.shadow, r.tgt]);
      for (const f of [r.src, r.tgt, r.shadow]) fs.rmSync(f);
      return { value: r.seconds, rssMiB: r.rssMiB };
    },
  };
}

const SIDE_TITLES = { ours: 'ours', qemu: 'qemu-storage-daemon', base: 'base build' };
/** The side ratios are taken against: qemu when it ran, else the second side (an A/B run). */
const REFERENCE = SIDES.includes('qemu') ? 'qemu' : SIDES[SIDES.length - 1];

function printResults(results) {
  const f = (x) => x.toFixed(3);
  const cell = (s) => `${f(s.median)} s (${f(s.min)}–${f(s.max)})`;
  const others = SIDES.filter((s) => s !== REFERENCE);
  console.log(`\n### mirror ${(sizeBytes / MiB).toFixed(0)} MiB qcow2 (½ data) → new qcow2 on /dev/shm (${runs} interleaved runs each)\n`);
  const ratioTitles = others.map((s) => `ratio ${s}/${REFERENCE}`);
  console.log(`| case | ${SIDES.map((s) => SIDE_TITLES[s]).join(' | ')} | ${ratioTitles.join(' | ')} | daemon peak RSS ${SIDES.join(' / ')} |`);
  console.log(`|---|${SIDES.map(() => '---|').join('')}${others.map(() => '---|').join('')}---|`);
  for (const r of results) {
    const cells = SIDES.map((s) => cell(r.sides[s]));
    const ratios = others.map((s) => r.ratios[s].toFixed(2));
    const rss = SIDES.map((s) => r.sides[s].rss.toFixed(0)).join(' / ');
    console.log(`| ${r.name} | ${cells.join(' | ')} | ${ratios.join(' | ')} | ${rss} MiB |`);
  }
}

execFileSync('qemu-storage-daemon', ['--version'], { stdio: 'ignore' });
makePristine();
const rows = [row('no writes during the job', false), row(`steady writer, ${values['writer-mib-s']} MiB/s of 64 KiB writes`, true)];
printResults(await runSides(rows, SIDES, runs, REFERENCE));
