/*
 * Crash safety of the qcow2 driver: a writer process (test/helpers/
 * crash-writer.mjs) replays a seeded sequence of writes, zero-writes and
 * discards, eight requests in flight at a time, flushing every few batches,
 * and is killed with SIGKILL at a random moment. Then, with QEMU's tools:
 *   - `qemu-img check` finds no corruption (leaks are allowed: exit 0 or 3);
 *     with lazy refcounts the image is dirty, so it is first opened once
 *     read-write here, which repairs it, and must then check clean;
 *   - every request that completed before the last completed flush reads
 *     back (through `qemu-img convert -O raw`): bytes touched by requests
 *     after it may hold old or new data, discarded bytes old data or zeroes.
 * CRASH_RUNS sets the number of kills per configuration (bounded; default 4).
 */
import { execFileSync, spawn } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { describe, expect, it } from 'vitest';
import { expectationAfter, type Journal } from '../helpers/crash-expect.js';
import { CRASH_IMAGE_BYTES } from '../helpers/crash-ops.mjs';
import { missingPeers } from '../helpers/peers.js';
import { ROOT, run } from '../helpers/run.js';
import { scratchDir } from '../helpers/tmp.js';

const RUNS = Number(process.env.CRASH_RUNS ?? 4);
/** Kills land this long after the writer is ready (a whole run takes 1–2 s). */
const KILL_MAX_MS = 1200;
const dir = scratchDir('qbt-crash-');
const WRITER = path.join(ROOT, 'test', 'helpers', 'crash-writer.mjs');
const QEMU_IMG_TS = path.join(ROOT, 'dist', 'bin', 'qemu-img-ts.mjs');

function readJournal(file: string): Journal {
  const j = { lastStarted: -1, lastFlushed: -1 };
  for (const line of fs.readFileSync(file, 'utf8').split('\n')) {
    const [word, n] = line.split(' ');
    if (word === 'start') j.lastStarted = Math.max(j.lastStarted, Number(n));
    if (word === 'flushed') j.lastFlushed = Math.max(j.lastFlushed, Number(n));
  }
  return j;
}

/** Runs the writer and kills it `killAfterMs` after it is ready (unless it finished first). */
function runAndKill(image: string, journal: string, seed: number, killAfterMs: number): Promise<void> {
  return new Promise((resolve, reject) => {
    const child = spawn(process.execPath, [WRITER, image, journal, String(seed)], { stdio: ['ignore', 'pipe', 'pipe'] });
    let stderr = '';
    let timer: NodeJS.Timeout | undefined;
    child.stderr.on('data', (d: Buffer) => (stderr += d.toString()));
    child.stdout.once('data', () => (timer = setTimeout(() => child.kill('SIGKILL'), killAfterMs)));
    child.on('error', reject);
    child.on('close', (code, signal) => {
      clearTimeout(timer);
      if (code !== 0 && signal !== 'SIGKILL') reject(new Error(`writer failed (${code}): ${stderr}`));
      else resolve();
    });
  });
}

const CONFIGS = [
  { name: '64 KiB clusters', opts: 'cluster_size=65536' },
  { name: '4 KiB clusters, 1-bit refcounts', opts: 'cluster_size=4096,refcount_bits=1' },
  { name: 'lazy refcounts', opts: 'lazy_refcounts=on' },
];

describe.skipIf(missingPeers('qemu-img'))('qcow2 survives SIGKILL at any moment', () => {
  for (const [c, config] of CONFIGS.entries()) {
    for (let r = 0; r < RUNS; r++) {
      const seed = 1000 * (c + 1) + r;
      const killAfterMs = (seed * 7919) % KILL_MAX_MS;
      it(`${config.name}: seed ${seed}, killed after ${killAfterMs} ms`, async () => {
        const image = path.join(dir, `crash-${seed}.qcow2`);
        const journal = path.join(dir, `crash-${seed}.log`);
        const raw = path.join(dir, `crash-${seed}.raw`);
        execFileSync(process.execPath, [QEMU_IMG_TS, 'create', '-q', '-f', 'qcow2', '-o', config.opts, image, String(CRASH_IMAGE_BYTES)]);
        await runAndKill(image, journal, seed, killAfterMs);
        if (config.opts.includes('lazy_refcounts=on')) {
          // A dirty image is repaired by its next read-write open.
          const repaired = await run(process.execPath, [path.join(ROOT, 'dist', 'bin', 'qemu-io-ts.mjs'), '-f', 'qcow2', '-c', 'flush', image]);
          expect(repaired.code, repaired.stderr).toBe(0);
        }
        const check = await run('qemu-img', ['check', '-f', 'qcow2', image]);
        expect([0, 3], `qemu-img check exit ${check.code}:\n${check.stdout}${check.stderr}`).toContain(check.code);
        expect(check.stderr).not.toMatch(/ERROR/);
        execFileSync('qemu-img', ['convert', '-f', 'qcow2', '-O', 'raw', image, raw]);
        const mismatch = expectationAfter(seed, readJournal(journal)).firstMismatch(new Uint8Array(fs.readFileSync(raw)));
        expect(mismatch, `first wrong byte at ${mismatch} (seed ${seed})`).toBe(-1);
      });
    }
  }
});
