// Runs a CommonJS tool bundle with a V8 code cache, so that later runs skip
// parsing and compiling it (copied into dist/bin/ by scripts/bundle.mjs).
//
// The cache sits beside the bundle, one file per Node version. It is
// written when missing or rejected (another Node, another build), at exit,
// so it holds every function the run compiled. Writing goes through a
// temporary file and a rename, so concurrent runs never read half a cache;
// a read-only install simply runs without one.
import fs from 'node:fs';
import { createRequire } from 'node:module';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import vm from 'node:vm';

const WRAPPER_HEAD = '(function (exports, require, module, __filename, __dirname) {';
const WRAPPER_TAIL = '\n})';

export function launch(bundleUrl) {
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
