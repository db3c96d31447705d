#!/usr/bin/env node
// qcow2 I/O through qemu-io-ts and qemu-io on the same machine in one run:
// 1 GiB sequential write (1 MiB requests) then read, and 4 KiB random
// writes (1M by default, about 30 s for qemu-io here) into a fresh image
// (each first touch allocates a cluster, later ones overwrite in place), both
// tools with -t writeback and a final flush, commands fed on stdin.
//
//   node bench/qcow2-io.mjs [--runs 5] [--random-writes N] [--dir /dev/shm]
//
// Prints medians, min–max, the median per-run ratio (ours/qemu-io; < 1 is
// faster) and peak RSS. Needs `npm run build` and qemu-img/qemu-io.
import { execFileSync } from 'node:child_process';
import path from 'node:path';
import { parseArgs } from 'node:util';
import { OURS, printTable, runRows, scratch } from './lib.mjs';

const { values } = parseArgs({
  options: {
    runs: { type: 'string', default: '5' },
    'random-writes': { type: 'string', default: '1000000' },
    'size-mib': { type: 'string', default: '1024' },
    dir: { type: 'string' },
  },
});
const runs = Number(values.runs);
const sizeMiB = Number(values['size-mib']);
const randomWrites = Number(values['random-writes']);
const dir = scratch(values.dir);
const image = (side) => path.join(dir, `${side}.qcow2`);

function script(lines) {
  return `${lines.join('\n')}\nflush\nquit\n`;
}
const seqWrite = script(Array.from({ length: sizeMiB }, (_, i) => `write -q -P 0xab ${i}M 1M`));
const seqRead = script(Array.from({ length: sizeMiB }, (_, i) => `read -q ${i}M 1M`));
let seed = 12345;
const random = () => (seed = (Math.imul(seed, 1103515245) + 12345) >>> 0);
const randomBlocks = (sizeMiB * 1024 * 1024) / 4096;
const randWrite = script(Array.from({ length: randomWrites }, () => `write -q -P 0x5a ${(random() % randomBlocks) * 4096} 4k`));

const create = (side) => execFileSync('qemu-img', ['create', '-q', '-f', 'qcow2', image(side), `${sizeMiB}M`]);
const qemuIo = (side) => (side === 'ours' ? OURS['qemu-io'] : ['qemu-io']);
const io = (side, input) => ({ argv: [...qemuIo(side), '-f', 'qcow2', '-t', 'writeback', image(side)], input });
const check = (side) => execFileSync('qemu-img', ['check', '-q', '-f', 'qcow2', image(side)]);

const rows = [
  { name: `sequential write ${sizeMiB} MiB (1 MiB requests)`, setup: create, ours: () => io('ours', seqWrite), peer: () => io('peer', seqWrite), check },
  { name: `sequential read ${sizeMiB} MiB (1 MiB requests)`, ours: () => io('ours', seqRead), peer: () => io('peer', seqRead) },
  { name: `random 4 KiB writes ×${randomWrites} (fresh image)`, setup: create, ours: () => io('ours', randWrite), peer: () => io('peer', randWrite), check },
];

printTable(`qcow2 through qemu-io-ts vs qemu-io, ${values.dir ?? process.env.BENCH_DIR ?? '/dev/shm'}`, runRows(rows, runs), { rounds: runs });
