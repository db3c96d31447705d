#!/usr/bin/env node
// NBD servers side by side: qemu-nbd-ts (ours), qemu-nbd 7.2 and nbdkit's
// file plugin export the same 1 GiB raw file on /dev/shm, over a unix
// socket and over TCP (127.0.0.1, a free port), in one run:
//   - nbdcopy sequential read of the export into null: and write of a local
//     1 GiB file into it (with --flush), with 1 and 4 connections;
//   - fio's nbd engine, random reads of 4 KiB and 64 KiB at iodepth 16.
// Every measurement starts its server, waits until it answers, runs the
// client, reads the server's peak RSS (VmHWM) and stops it by PID (on
// freshly freed memory: lib.mjs warmFreePages); rows are
// measured once per side per round, rounds interleaved with the side order
// rotated. Printed: throughput medians (MiB/s) with min–max, the median
// per-round ratio ours/qemu-nbd (≥ 1: we are at least as fast), ours/nbdkit
// (of the medians), and the servers' peak RSS.
//
// qemu-nbd and ours serve with -t (persistent) and -e 8: several
// connections need shared > 1, and nbdcopy only opens more than one when
// the server advertises multi-conn. The written file is compared with its
// source once per server.
//
//   node bench/nbd.mjs [--runs 3] [--size-mib 1024] [--fio-seconds 5]
//                      [--only nbdcopy|fio] [--transports unix,tcp]
//
// Needs `npm run build`, qemu-nbd, nbdkit, nbdcopy, nbdinfo and fio.
import { execFileSync, spawn, spawnSync } from 'node:child_process';
import { randomFillSync } from 'node:crypto';
import fs from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import { parseArgs } from 'node:util';
import { ROOT, measure, runSides, scratch, warmFreePages } from './lib.mjs';

const { values } = parseArgs({
  options: {
    runs: { type: 'string', default: '3' },
    'size-mib': { type: 'string', default: '1024' },
    'fio-seconds': { type: 'string', default: '5' },
    only: { type: 'string' },
    transports: { type: 'string', default: 'unix,tcp' },
  },
});
const runs = Number(values.runs);
const MiB = 1 << 20;
const sizeBytes = Number(values['size-mib']) * MiB;
const fioSeconds = Number(values['fio-seconds']);
const transports = values.transports.split(',');
const SIDES = ['ours', 'qemu-nbd', 'nbdkit'];
/** Clients a server accepts at once (qemu-nbd's -e): room for 4 nbdcopy connections and a probe. */
const SHARED = 8;
const START_TIMEOUT_MS = 15_000;
const STOP_TIMEOUT_MS = 10_000;

const dir = scratch();
const disk = path.join(dir, 'disk.raw');
const source = path.join(dir, 'source.raw');

// ---------------------------------------------------------------- files

function checkRoom() {
  const st = fs.statfsSync(dir);
  const free = st.bavail * st.bsize;
  const need = 2 * sizeBytes + 256 * MiB;
  if (free < need) throw new Error(`${dir}: ${(free / MiB).toFixed(0)} MiB free, the bench needs ${(need / MiB).toFixed(0)} MiB`);
}

function randomFile(file) {
  const fd = fs.openSync(file, 'w');
  const chunk = Buffer.alloc(8 * MiB);
  for (let at = 0; at < sizeBytes; at += chunk.length) fs.writeSync(fd, randomFillSync(chunk), 0, chunk.length, at);
  fs.closeSync(fd);
}

// ---------------------------------------------------------------- servers

const live = new Set();
process.on('exit', () => {
  for (const child of live) child.kill('SIGKILL');
});

function freePort() {
  return new Promise((resolve, reject) => {
    const s = net.createServer();
    s.once('error', reject);
    s.listen(0, '127.0.0.1', () => {
      const { port } = s.address();
      s.close(() => resolve(port));
    });
  });
}

/** argv of a server exporting `disk` at `addr` ({ socket } or { port }). */
function serverArgv(side, addr) {
  const listen = addr.socket ? ['-k', addr.socket] : ['-b', '127.0.0.1', '-p', String(addr.port)];
  switch (side) {
    case 'ours':
      return [process.execPath, path.join(ROOT, 'dist/bin/qemu-nbd-ts.mjs'), '-f', 'raw', '-t', '-e', String(SHARED), ...listen, disk];
    case 'qemu-nbd':
      return ['qemu-nbd', '-f', 'raw', '-t', '-e', String(SHARED), ...listen, disk];
    case 'nbdkit': {
      const where = addr.socket ? ['-U', addr.socket] : ['-i', '127.0.0.1', '-p', String(addr.port)];
      return ['nbdkit', '-f', '--exit-with-parent', ...where, 'file', `file=${disk}`];
    }
  }
  throw new Error(`unknown side ${side}`);
}

const uriOf = (addr) => (addr.socket ? `nbd+unix:///?socket=${addr.socket}` : `nbd://127.0.0.1:${addr.port}/`);

async function startServer(side, transport) {
  const addr = transport === 'unix' ? { socket: path.join(dir, `${side}.sock`) } : { port: await freePort() };
  if (addr.socket) fs.rmSync(addr.socket, { force: true });
  const [cmd, ...args] = serverArgv(side, addr);
  const child = spawn(cmd, args, { stdio: ['ignore', 'ignore', 'inherit'] });
  live.add(child);
  const exited = new Promise((resolve) => child.once('exit', resolve));
  const uri = uriOf(addr);
  const deadline = Date.now() + START_TIMEOUT_MS;
  while (spawnSync('nbdinfo', ['--size', uri], { stdio: 'ignore' }).status !== 0) {
    if (child.exitCode !== null || Date.now() > deadline) throw new Error(`${side} did not start on ${uri}`);
    await new Promise((r) => setTimeout(r, 50));
  }
  return { child, uri, exited };
}

/** Peak RSS (VmHWM) of a running process in MiB. */
function peakRssMiB(pid) {
  const m = /VmHWM:\s+(\d+) kB/.exec(fs.readFileSync(`/proc/${pid}/status`, 'utf8'));
  return m ? Number(m[1]) / 1024 : NaN;
}

async function stopServer(server) {
  const rss = peakRssMiB(server.child.pid);
  server.child.kill('SIGTERM');
  const timer = setTimeout(() => server.child.kill('SIGKILL'), STOP_TIMEOUT_MS);
  await server.exited;
  clearTimeout(timer);
  live.delete(server.child);
  return rss;
}

// ---------------------------------------------------------------- clients

const nbdcopyRead = (uri, conns) => ['nbdcopy', `--connections=${conns}`, uri, 'null:'];
const nbdcopyWrite = (uri, conns) => ['nbdcopy', '--flush', `--connections=${conns}`, source, uri];
const fioRandRead = (uri, bs) => [
  'fio', '--name=randread', '--ioengine=nbd', `--uri=${uri}`, '--rw=randread', `--bs=${bs}`, '--iodepth=16',
  `--size=${sizeBytes}`, '--time_based', `--runtime=${fioSeconds}`, '--output-format=json',
];

/** A row: start the side's server, run the client, return its throughput in MiB/s and the server's peak RSS. */
function row(name, transport, client, throughput, check) {
  return {
    name,
    async run(side, round) {
      warmFreePages();
      const server = await startServer(side, transport);
      let m;
      try {
        m = measure(client(server.uri));
      } finally {
        server.rss = await stopServer(server);
      }
      if (round === 0) check?.(side);
      return { value: throughput(m), rssMiB: server.rss };
    },
  };
}

const copied = (m) => sizeBytes / MiB / m.seconds;
// fio's nbd engine prints a line before the JSON document.
const fioBw = (m) => JSON.parse(m.stdout.slice(m.stdout.indexOf('{'))).jobs[0].read.bw_bytes / MiB;

function checkWritten(side) {
  if (spawnSync('cmp', ['-s', disk, source]).status !== 0) throw new Error(`${side}: the export does not hold what nbdcopy wrote`);
}

function rowsFor(transport) {
  const gib = sizeBytes % (1 << 30) ? `${sizeBytes / MiB} MiB` : `${sizeBytes / (1 << 30)} GiB`;
  const rows = [];
  if (values.only !== 'fio') {
    for (const conns of [1, 4]) rows.push(row(`${transport}: nbdcopy read ${gib}, ${conns} conn`, transport, (u) => nbdcopyRead(u, conns), copied));
    for (const conns of [1, 4]) {
      rows.push(row(`${transport}: nbdcopy write ${gib}, ${conns} conn`, transport, (u) => nbdcopyWrite(u, conns), copied, checkWritten));
    }
  }
  if (values.only !== 'nbdcopy') {
    for (const bs of ['4k', '64k']) rows.push(row(`${transport}: fio randread ${bs.toUpperCase().replace('K', ' KiB')}, QD16`, transport, (u) => fioRandRead(u, bs), fioBw));
  }
  return rows;
}

// ---------------------------------------------------------------- report

function printResults(results) {
  const f = (x) => x.toFixed(0);
  const cell = (s) => `${f(s.median)} (${f(s.min)}–${f(s.max)})`;
  console.log(`\n### NBD servers, MiB/s (${runs} interleaved runs each; ${(sizeBytes / MiB).toFixed(0)} MiB file on /dev/shm)\n`);
  console.log('| case | ours | qemu-nbd | nbdkit | ours/qemu-nbd | ours/nbdkit | server peak RSS ours / qemu-nbd / nbdkit |');
  console.log('|---|---|---|---|---|---|---|');
  for (const r of results) {
    const s = r.sides;
    const rss = SIDES.map((side) => f(s[side].rss)).join(' / ');
    const ratioNbdkit = s.ours.median / s.nbdkit.median;
    console.log(`| ${r.name} | ${cell(s.ours)} | ${cell(s['qemu-nbd'])} | ${cell(s.nbdkit)} | ${r.ratios.ours.toFixed(2)} | ${ratioNbdkit.toFixed(2)} | ${rss} MiB |`);
  }
  const spreads = results.flatMap((r) => SIDES.map((side) => (r.sides[side].max - r.sides[side].min) / r.sides[side].median));
  console.log(`\nNoise: the spread (max − min) / median of a cell is ${(100 * Math.max(...spreads)).toFixed(0)}% at most, ${(100 * spreads.sort((a, b) => a - b)[spreads.length >> 1]).toFixed(0)}% typically.`);
}

checkRoom();
execFileSync('qemu-nbd', ['--version'], { stdio: 'ignore' });
randomFile(disk);
randomFile(source);
const rows = transports.flatMap(rowsFor);
printResults(await runSides(rows, SIDES, runs, 'qemu-nbd'));
