#!/usr/bin/env node
// qemu-img-ts convert against qemu-img convert, same inputs, one run:
//   - a 1 GiB raw image, first half random data, second half written zeroes
//     (allocated: found only by scanning), to qcow2 and that qcow2 back to
//     raw, on a tmpfs (/dev/shm) and on disk (--disk-dir, default /var/tmp);
//   - a 1 TiB qcow2 with 256 MiB of data in 1 MiB pieces scattered over it,
//     to raw and to qcow2 (cost must follow the data, not the 1 TiB).
// Each row runs both tools once per round, interleaved, and prints medians,
// min–max, the median per-round ratio (ours/peer; < 1 is faster) and peak
// RSS. Each timed run starts after a sync and on freshly freed memory
// (lib.mjs settleWriteback, warmFreePages). Outputs are checked once per side against the input with
// `qemu-img compare`.
//
//   node bench/convert.mjs [--runs 5] [--disk-dir /var/tmp] [--only tmpfs|disk|sparse]
//
// Needs `npm run build`, qemu-img and qemu-io.
import { execFileSync } from 'node:child_process';
import { randomFillSync } from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { parseArgs } from 'node:util';
import { OURS, printTable, runRows, scratch } from './lib.mjs';

const { values } = parseArgs({
  options: {
    runs: { type: 'string', default: '5' },
    'disk-dir': { type: 'string', default: '/var/tmp' },
    only: { type: 'string' },
  },
});
const runs = Number(values.runs);
const MiB = 1 << 20;
const HALF_GIB = 512 * MiB;
const SPARSE_PIECES = 256;

const tool = (side) => (side === 'ours' ? OURS['qemu-img'] : ['qemu-img']);
const convert = (side, args) => [...tool(side), 'convert', ...args];

/** 1 GiB raw: 512 MiB of random bytes, then 512 MiB of written zeroes. */
function makeHalfRandom(file) {
  const fd = fs.openSync(file, 'w');
  const chunk = Buffer.alloc(8 * MiB);
  for (let at = 0; at < HALF_GIB; at += chunk.length) {
    randomFillSync(chunk);
    fs.writeSync(fd, chunk, 0, chunk.length, at);
  }
  chunk.fill(0);
  for (let at = HALF_GIB; at < 2 * HALF_GIB; at += chunk.length) fs.writeSync(fd, chunk, 0, chunk.length, at);
  fs.closeSync(fd);
}

/** 1 TiB qcow2 with SPARSE_PIECES pieces of 1 MiB spread evenly, written by qemu-io. */
function makeSparse(file) {
  execFileSync('qemu-img', ['create', '-q', '-f', 'qcow2', file, '1T']);
  const stride = (1024 * 1024 * MiB) / SPARSE_PIECES;
  const lines = Array.from({ length: SPARSE_PIECES }, (_, i) => `write -q -P ${(i % 250) + 1} ${i * stride + (i % 7) * 65536} 1M`);
  execFileSync('qemu-io', ['-f', 'qcow2', file], { input: `${lines.join('\n')}\nquit\n` });
}

function compare(a, fa, b, fb) {
  execFileSync('qemu-img', ['compare', '-q', '-f', fa, '-F', fb, a, b]);
}

function dirRows(label, dir) {
  const raw = path.join(dir, 'in.raw');
  const qcow2 = path.join(dir, 'in.qcow2');
  makeHalfRandom(raw);
  execFileSync('qemu-img', ['convert', '-f', 'raw', '-O', 'qcow2', raw, qcow2]);
  const out = (side, ext) => path.join(dir, `out-${side}.${ext}`);
  const rm = (side, ext) => () => fs.rmSync(out(side, ext), { force: true });
  return [
    {
      name: `${label}: 1 GiB raw (½ random, ½ zeroes) → qcow2`,
      setup: (side) => rm(side, 'qcow2')(),
      ours: () => convert('ours', ['-f', 'raw', '-O', 'qcow2', raw, out('ours', 'qcow2')]),
      peer: () => convert('peer', ['-f', 'raw', '-O', 'qcow2', raw, out('peer', 'qcow2')]),
      check: (side, round) => round === 0 && compare(raw, 'raw', out(side, 'qcow2'), 'qcow2'),
    },
    {
      name: `${label}: that qcow2 → raw`,
      setup: (side) => rm(side, 'raw')(),
      ours: () => convert('ours', ['-f', 'qcow2', '-O', 'raw', qcow2, out('ours', 'raw')]),
      peer: () => convert('peer', ['-f', 'qcow2', '-O', 'raw', qcow2, out('peer', 'raw')]),
      check: (side, round) => round === 0 && compare(qcow2, 'qcow2', out(side, 'raw'), 'raw'),
    },
  ];
}

function sparseRows(dir) {
  const src = path.join(dir, 'sparse.qcow2');
  makeSparse(src);
  const out = (side, ext) => path.join(dir, `sparse-out-${side}.${ext}`);
  const row = (ext) => ({
    name: `1 TiB qcow2, 256 MiB scattered → ${ext}`,
    setup: (side) => fs.rmSync(out(side, ext), { force: true }),
    ours: () => convert('ours', ['-f', 'qcow2', '-O', ext, src, out('ours', ext)]),
    peer: () => convert('peer', ['-f', 'qcow2', '-O', ext, src, out('peer', ext)]),
    check: (side, round) => round === 0 && compare(src, 'qcow2', out(side, ext), ext),
  });
  return [row('raw'), row('qcow2')];
}

const sections = [
  ['tmpfs', () => dirRows('tmpfs', scratch('/dev/shm'))],
  ['disk', () => dirRows('disk', scratch(values['disk-dir']))],
  ['sparse', () => sparseRows(scratch('/dev/shm'))],
];
for (const [name, rows] of sections) {
  if (values.only && values.only !== name) continue;
  printTable(`convert, ${name}: qemu-img-ts vs qemu-img 7.2`, runRows(rows(), runs), { rounds: runs });
}
