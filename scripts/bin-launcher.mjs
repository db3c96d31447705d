// Runs a CommonJS tool bundle with a V8 code cache, so that later runs skip
// parsing and compiling it (copied into dist/bin/ by scripts/bundle.mjs).
//
// The cache sits beside the bundle, one file per Node version. It is
// written when missing or rejected (another Node, another build), at exit,
// so it holds every function the run compiled. Writing goes through a
// temporary file and a rename, so concurrent runs never read half a cache;
// a read-only install simply runs without one.
//
// V8's tier-up budget is raised (TIER_UP_V8_FLAGS): these tools run for
// seconds, and with V8's default budget its optimising compiler spends more
// CPU compiling the glue between I/O requests than the compiled code saves.
// Measured in a 1 GiB mirror on 2 cores: ~0.28 CPU-s of the run's ~1.1 s on
// compiler threads, competing with the I/O threads; with a 32× budget the
// mirror took 0.60–0.88× the time of the same build with the default (three
// interleaved A/B runs of 5 rounds). Hot loops (scans over tables, bitmaps,
// buffers) still cross the larger budget within their first calls, so they
// are optimised as before: a sparse 1 TiB convert with optimisation capped
// at the baseline tier (--max-opt=1) was 3–4× slower, with the budget
// unchanged. QEMU_BLOCK_TS_V8_FLAGS, when set, replaces these flags.
import fs from 'node:fs';
import { createRequire } from 'node:module';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import v8 from 'node:v8';
import vm from 'node:vm';

const WRAPPER_HEAD = '(function (exports, require, module, __filename, __dirname) {';
const WRAPPER_TAIL = '\n})';

/** 32× V8's default --interrupt-budget (67584 in Node 20's V8). */
const TIER_UP_V8_FLAGS = '--interrupt-budget=2162688';

export function launch(bundleUrl) {
  v8.setFlagsFromString(process.env.QEMU_BLOCK_TS_V8_FLAGS ?? TIER_UP_V8_FLAGS);
  const file = fileURLToPath(bundleUrl);
  const cacheFile = `${file}.${process.version}.v8cache`;
  let cachedData;
  try {
    cachedData = fs.readFileSync(cacheFile);
  } catch {
    cachedData = undefined;
  }
  // The bundle keeps its entry's #! line, which is no JavaScript inside a function.
  const source = WRAPPER_HEAD + fs.readFileSync(file, 'utf8').replace(/^#!.*/, '') + WRAPPER_TAIL;
  const script = new vm.Script(source, { filename: file, cachedData });
  if (cachedData === undefined || script.cachedDataRejected) process.once('exit', () => saveCache(script, cacheFile));
  const module = { exports: {} };
  script.runInThisContext()(module.exports, createRequire(file), module, file, path.dirname(file));
}

function saveCache(script, cacheFile) {
  const tmp = `${cacheFile}.${process.pid}.tmp`;
  try {
    fs.writeFileSync(tmp, script.createCachedData());
    fs.renameSync(tmp, cacheFile);
  } catch {
    fs.rmSync(tmp, { force: true });
  }
}
