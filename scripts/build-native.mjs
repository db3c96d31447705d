#!/usr/bin/env node
/*
 * Install script: builds the optional hostio addon (native/hostio.c) with
 * node-gyp into build/Release/hostio.node.
 *
 * The addon is an optimisation, not a requirement: without it the file
 * driver reports every byte as data and emulates discard/write-zeroes with
 * plain writes (drivers/file/host-io.ts, fallbackHostIo). So this script
 * never fails the install: any failure prints a loud WARNING and exits 0.
 *
 * Finding node-gyp, first hit wins:
 *   1. $npm_config_node_gyp (npm sets it to its bundled copy during scripts),
 *   2. `node-gyp` on PATH,
 *   3. the node-gyp inside npm's own install next to this node binary,
 *   4. `npm exec --offline --yes=false node-gyp` (never touches the network).
 * Headers: when no nodedir is configured and this node's prefix has
 * include/node/node_api.h, we pass --nodedir so node-gyp does not try to
 * download headers. Left out: prebuilt binaries, Windows-specific handling.
 */
import { spawnSync } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

/** A stuck compiler must not hang `npm ci` forever. */
const BUILD_TIMEOUT_MS = 5 * 60 * 1000;

const packageRoot = path.dirname(path.dirname(fileURLToPath(import.meta.url)));
const addonPath = path.join(packageRoot, 'build', 'Release', 'hostio.node');
const isWindows = process.platform === 'win32';

/** Absolute path of an executable named `name` on PATH, or null. */
function findOnPath(name) {
  const names = isWindows ? [`${name}.cmd`, `${name}.exe`, name] : [name];
  for (const dir of (process.env.PATH ?? '').split(path.delimiter)) {
    for (const candidate of names.map((n) => path.join(dir, n))) {
      try {
        fs.accessSync(candidate, fs.constants.X_OK);
        return candidate;
      } catch {
        // not here; keep looking
      }
    }
  }
  return null;
}

/** Ways to run node-gyp, best first, as { label, command, args } (args before 'rebuild'). */
function nodeGypCandidates() {
  const candidates = [];
  const fromNpm = process.env.npm_config_node_gyp;
  if (fromNpm && fs.existsSync(fromNpm)) {
    candidates.push({ label: fromNpm, command: process.execPath, args: [fromNpm] });
  }
  const onPath = findOnPath('node-gyp');
  if (onPath) candidates.push({ label: onPath, command: onPath, args: [] });
  const bundled = path.join(
    path.dirname(process.execPath), '..', 'lib', 'node_modules', 'npm', 'node_modules', 'node-gyp', 'bin', 'node-gyp.js',
  );
  if (fs.existsSync(bundled)) {
    candidates.push({ label: bundled, command: process.execPath, args: [bundled] });
  }
  candidates.push({ label: 'npm exec node-gyp', command: isWindows ? 'npm.cmd' : 'npm', args: ['exec', '--offline', '--yes=false', 'node-gyp', '--'] });
  return candidates;
}

/** `--nodedir=<prefix>` when headers sit next to this node and none is configured. */
function nodedirArgs() {
  if (process.env.npm_config_nodedir) return [];
  const prefix = path.resolve(path.dirname(process.execPath), '..');
  return fs.existsSync(path.join(prefix, 'include', 'node', 'node_api.h')) ? [`--nodedir=${prefix}`] : [];
}

/** Runs one candidate; returns null on success or a one-line reason. */
function tryBuild({ label, command, args }) {
  console.error(`build-native: ${label} rebuild`);
  const result = spawnSync(command, [...args, 'rebuild', ...nodedirArgs()], {
    cwd: packageRoot,
    stdio: 'inherit',
    timeout: BUILD_TIMEOUT_MS,
    shell: isWindows,
  });
  if (result.error) return `${label}: ${result.error.message}`;
  if (result.status !== 0) return `${label}: exit status ${result.status ?? result.signal}`;
  if (!fs.existsSync(addonPath)) return `${label}: succeeded but ${addonPath} is missing`;
  return null;
}

function warn(reasons) {
  const bar = '!'.repeat(78);
  console.error([
    bar,
    'WARNING: qemu-block-ts could not build its native addon (build/Release/hostio.node).',
    '',
    'The package still works, but host-file operations fall back to plain I/O:',
    '  - hole detection (SEEK_DATA/SEEK_HOLE) is off: every file reads as fully allocated,',
    '    so block-status / map output shows no holes and copies are not sparse;',
    '  - hole punching and zero ranges (fallocate) are off: discard does nothing and',
    '    write-zeroes writes zero buffers; preallocation is unavailable.',
    '',
    'To fix: install a C toolchain (gcc/clang, make, python3) and Node headers, then',
    'run `node scripts/build-native.mjs` in the package directory.',
    '',
    'Attempts:',
    ...reasons.map((r) => `  - ${r}`),
    bar,
  ].join('\n'));
}

function main() {
  const reasons = [];
  for (const candidate of nodeGypCandidates()) {
    const reason = tryBuild(candidate);
    if (reason === null) {
      console.error(`build-native: built ${path.relative(packageRoot, addonPath)}`);
      return;
    }
    reasons.push(reason);
  }
  warn(reasons);
}

try {
  main();
} catch (e) {
  warn([`unexpected: ${e instanceof Error ? e.message : String(e)}`]);
}
process.exitCode = 0;
