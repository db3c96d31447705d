// Side-by-side benchmark helpers: run each case of a row (ours, the peer)
// once per round, rounds interleaved so both see the same machine state;
// report the median wall time, min–max, the per-round ratio's median and
// each side's peak RSS (GNU time's %M). Nothing here asserts a speed: the
// numbers are printed and written into the README by hand.
import { spawnSync } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

export const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');
export const OURS = {
  'qemu-img': [process.execPath, path.join(ROOT, 'dist/bin/qemu-img-ts.mjs')],
  'qemu-io': [process.execPath, path.join(ROOT, 'dist/bin/qemu-io-ts.mjs')],
};
const GNU_TIME = '/usr/bin/time';

/** Runs argv once under GNU time; returns wall seconds, peak RSS in MiB and stdout. */
export function measure(argv, { input, cwd } = {}) {
  const t0 = process.hrtime.bigint();
  const r = spawnSync(GNU_TIME, ['-f', '%M', ...argv], { input, cwd, maxBuffer: 1 << 26 });
  const seconds = Number(process.hrtime.bigint() - t0) / 1e9;
  if (r.status !== 0) {
    throw new Error(`${argv.join(' ')} exited ${r.status}: ${r.stderr.toString().slice(-2000)}`);
  }
  const lines = r.stderr.toString().trim().split('\n');
  const rssMiB = Number(lines[lines.length - 1]) / 1024;
  return { seconds, rssMiB, stdout: r.stdout.toString() };
}

export function median(values) {
  const v = [...values].sort((a, b) => a - b);
  const m = v.length >> 1;
  return v.length % 2 ? v[m] : (v[m - 1] + v[m]) / 2;
}

/**
 * rows: [{ name, setup?(round), ours: () => argv|{argv,input}, peer: () => argv|{argv,input} }]
 * Returns [{ name, ours: {median,min,max,rss}, peer: {...}, ratio }] where
 * ratio is the median of per-round ours/peer time ratios (< 1: we are faster).
 */
export function runRows(rows, rounds) {
  const samples = rows.map(() => ({ ours: [], peer: [], oursRss: [], peerRss: [], ratios: [] }));
  for (let round = 0; round < rounds; round++) {
    rows.forEach((row, i) => {
      const times = {};
      for (const side of round % 2 ? ['peer', 'ours'] : ['ours', 'peer']) {
        row.setup?.(side, round);
        const spec = row[side]();
        settleWriteback();
        warmFreePages();
        const { argv, input } = Array.isArray(spec) ? { argv: spec } : spec;
        const m = measure(argv, { input });
        samples[i][side].push(m.seconds);
        samples[i][`${side}Rss`].push(m.rssMiB);
        times[side] = m.seconds;
        row.check?.(side, round);
      }
      samples[i].ratios.push(times.ours / times.peer);
    });
  }
  return rows.map((row, i) => {
    const s = samples[i];
    const side = (t, rss) => ({ median: median(t), min: Math.min(...t), max: Math.max(...t), rss: Math.max(...rss) });
    return { name: row.name, ours: side(s.ours, s.oursRss), peer: side(s.peer, s.peerRss), ratio: median(s.ratios) };
  });
}

/** Prints a Markdown table of runRows' results. */
export function printTable(title, results, { rounds, unit = 's' } = {}) {
  const f = (x) => x.toFixed(3);
  console.log(`\n### ${title}${rounds ? ` (${rounds} interleaved runs each)` : ''}\n`);
  console.log('| case | ours median (min–max) | peer median (min–max) | ratio ours/peer | peak RSS ours / peer |');
  console.log('|---|---|---|---|---|');
  for (const r of results) {
    console.log(
      `| ${r.name} | ${f(r.ours.median)} ${unit} (${f(r.ours.min)}–${f(r.ours.max)}) | ${f(r.peer.median)} ${unit} (${f(r.peer.min)}–${f(r.peer.max)}) | ${r.ratio.toFixed(2)} | ${r.ours.rss.toFixed(0)} / ${r.peer.rss.toFixed(0)} MiB |`,
    );
  }
}

/**
 * Writes back every dirty page (sync(1)) before a timed run, so that the
 * kernel's writeback of the previous run's output (the disk rows: up to
 * 1 GiB on ext4) does not land in the next run's time, whichever side that is.
 */
export function settleWriteback() {
  spawnSync('sync');
}

/** What warmFreePages writes by default: more than any row here allocates in one run. */
export const WARM_BYTES = 1 << 30;
const WARM_CHUNK_BYTES = 8 << 20;

/**
 * Makes the next run's new pages ones the host still backs. This VM's
 * guest reports freed memory to its host (free page reporting,
 * page_reporting_order=11 on its kernel command line), which discards it;
 * the first touch of such a page afterwards costs a host fault. Writing
 * 512 MiB into a new tmpfs file took 0.17–0.23 s on pages freed a moment
 * before and 0.4–1.6 s on pages freed seconds before (a C loop of 2 MiB
 * pwrites), and which of the two a timed run met was luck that dwarfed the
 * tools' own differences. Called right before each timed run of either
 * side: it writes and deletes a file of `bytes` on /dev/shm, leaving that
 * much freshly freed memory for the run (reporting waits ~2 s) — the state
 * of a machine without reporting. BENCH_WARM_PAGES=0 turns it off.
 */
export function warmFreePages(bytes = WARM_BYTES) {
  if (process.env.BENCH_WARM_PAGES === '0') return;
  const file = path.join('/dev/shm', `qbt-bench-warm-${process.pid}`);
  const chunk = Buffer.alloc(WARM_CHUNK_BYTES, 0x5a);
  const fd = fs.openSync(file, 'w');
  try {
    for (let at = 0; at < bytes; at += chunk.length) fs.writeSync(fd, chunk, 0, chunk.length, at);
  } finally {
    fs.closeSync(fd);
    fs.rmSync(file, { force: true });
  }
}

/** A scratch directory under `base` (default /dev/shm), removed on exit. */
export function scratch(base = process.env.BENCH_DIR ?? '/dev/shm', prefix = 'qbt-bench-') {
  const dir = fs.mkdtempSync(path.join(base, prefix));
  process.on('exit', () => fs.rmSync(dir, { recursive: true, force: true }));
  // A bench stopped with Ctrl-C or kill must not leave gigabytes on a tmpfs.
  for (const signal of ['SIGINT', 'SIGTERM', 'SIGHUP']) process.once(signal, () => process.exit(130));
  return dir;
}

/**
 * Rows measured on several sides (servers, tools), one sample per side per
 * round, rounds interleaved and the side order rotated every round so no
 * side always runs first. rows: [{ name, run: async (side, round) =>
 * { value, rssMiB } }] where value is a throughput (higher is better).
 * Returns [{ name, sides: { [side]: { median, min, max, rss } }, ratios:
 * { [side]: median of the per-round side/reference ratios } }].
 */
export async function runSides(rows, sides, rounds, reference) {
  const samples = rows.map(() => Object.fromEntries(sides.map((s) => [s, { values: [], rss: [] }])));
  const ratios = rows.map(() => Object.fromEntries(sides.map((s) => [s, []])));
  for (let round = 0; round < rounds; round++) {
    const order = sides.map((_, i) => sides[(i + round) % sides.length]);
    for (const [i, row] of rows.entries()) {
      const got = {};
      for (const side of order) {
        const { value, rssMiB } = await row.run(side, round);
        samples[i][side].values.push(value);
        samples[i][side].rss.push(rssMiB);
        got[side] = value;
      }
      for (const side of sides) ratios[i][side].push(got[side] / got[reference]);
    }
  }
  return rows.map((row, i) => ({
    name: row.name,
    sides: Object.fromEntries(
      sides.map((s) => {
        const { values, rss } = samples[i][s];
        return [s, { median: median(values), min: Math.min(...values), max: Math.max(...values), rss: Math.max(...rss) }];
      }),
    ),
    ratios: Object.fromEntries(sides.map((s) => [s, median(ratios[i][s])])),
  }));
}
