/*
 * Two identical test image sets, one for the real qemu-img and one for
 * ours, for the interop tests of commands that change images (resize,
 * amend): the same setup script runs in both directories, or, when it
 * writes times (snapshots), once and its result is copied (see
 * PairSetup). After the command (runBoth in side-by-side.ts), `imageFacts`
 * describes each result the way a user sees it: `qemu-img info
 * --output=json` without the volatile `actual-size`,
 * `qemu-img map --output=json`, `qemu-img check` (text and status), and
 * `qemu-img compare` of the two results.
 */
import { execFileSync, spawnSync } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { loadHostIo } from '../../drivers/file/host-io.js';

export interface PairDirs {
  theirs: string;
  ours: string;
}

let pairNumber = 0;
const host = loadHostIo();
/** Bytes copied per read. */
const COPY_CHUNK_BYTES = 1 << 20;

/**
 * Copies a file with its holes where they are, and only there: fs.cpSync
 * allocates holes, cp(1) may punch runs of zeroes; either changes what
 * `qemu-img map` reports for raw files.
 */
function copyKeepingAllocation(from: string, to: string): void {
  const src = fs.openSync(from, 'r');
  const dst = fs.openSync(to, 'w');
  try {
    fs.ftruncateSync(dst, fs.fstatSync(src).size);
    const buf = Buffer.alloc(COPY_CHUNK_BYTES);
    forEachDataExtent(src, (offsetBytes, bytes) => {
      const n = fs.readSync(src, buf, 0, bytes, offsetBytes);
      fs.writeSync(dst, buf, 0, n, offsetBytes);
      return true;
    });
  } finally {
    fs.closeSync(src);
    fs.closeSync(dst);
  }
}

export interface PairSetup {
  /** bash (`set -eu`), run in the directory. */
  setup: string;
  /** Edits bash cannot easily make, run after the setup. */
  after?: (dir: string) => void;
  /**
   * Run the setup once and copy the result. Needed when two runs give
   * different bytes: snapshots record times, compressed writes differ from
   * run to run; that is the default for setups that make them (`snapshot`,
   * `write -c`). Otherwise the setup runs in each directory: copies keep
   * holes, but file systems know more than data and holes (ext4's
   * unwritten extents count in st_blocks, which QEMU's preallocation
   * heuristic reads).
   */
  copy?: boolean;
}

/** Whether two runs of `setup` would give different bytes (see PairSetup.copy). */
function runsDiffer(setup: string): boolean {
  return setup.includes('snapshot') || setup.includes('write -c');
}

/** Two directories prepared by `s` under a fresh directory of `root`. */
export function preparePair(root: string, s: PairSetup): PairDirs {
  const base = path.join(root, String(++pairNumber));
  const dirs = { theirs: path.join(base, 'theirs'), ours: path.join(base, 'ours') };
  const copy = s.copy ?? runsDiffer(s.setup);
  for (const dir of copy ? [dirs.theirs] : [dirs.theirs, dirs.ours]) {
    fs.mkdirSync(dir, { recursive: true });
    execFileSync('bash', ['-euc', s.setup], { cwd: dir, stdio: 'pipe' });
    s.after?.(dir);
  }
  if (copy) {
    fs.mkdirSync(dirs.ours);
    for (const name of fs.readdirSync(dirs.theirs)) copyKeepingAllocation(path.join(dirs.theirs, name), path.join(dirs.ours, name));
  }
  return dirs;
}

/** What qemu-img printed, and its status. */
export interface QemuImgRun {
  stdout: string;
  stderr: string;
  code: number;
}

function qemuImg(args: string[], cwd: string): QemuImgRun {
  const r = spawnSync('qemu-img', args, { cwd, encoding: 'utf8' });
  return { stdout: r.stdout, stderr: r.stderr, code: r.status ?? 128 };
}

export interface ImageFacts {
  /** The info JSON without actual-size (the run itself when info fails). */
  info: unknown;
  /** Warnings info printed. */
  infoStderr: string;
  map: QemuImgRun;
  check: QemuImgRun;
}

/** What qemu-img says about `file` in `dir` (see the note at the top). */
export function imageFacts(dir: string, file: string): ImageFacts {
  const info = qemuImg(['info', '--output=json', file], dir);
  let parsed: unknown = info;
  if (info.code === 0) {
    const { ['actual-size']: _volatile, ...rest } = JSON.parse(info.stdout) as Record<string, unknown>;
    parsed = rest;
  }
  return { info: parsed, infoStderr: info.stderr, map: qemuImg(['map', '--output=json', file], dir), check: qemuImg(['check', file], dir) };
}

/** `qemu-img compare` of the two results of `file`. */
export function compareResults(dirs: PairDirs, file: string): QemuImgRun {
  return qemuImg(['compare', path.join(dirs.theirs, file), path.join(dirs.ours, file)], dirs.theirs);
}

/** Calls `each(offset, bytes)` for the data extents of an open file (holes skipped). */
function forEachDataExtent(fd: number, each: (offsetBytes: number, bytes: number) => boolean): boolean {
  const sizeBytes = fs.fstatSync(fd).size;
  for (let at = host.seekData(fd, 0); at !== null && at < sizeBytes; ) {
    const end = host.seekHole(fd, at) ?? sizeBytes;
    for (; at < end; at += COPY_CHUNK_BYTES) if (!each(at, Math.min(COPY_CHUNK_BYTES, end - at))) return false;
    at = host.seekData(fd, end);
  }
  return true;
}

/** Whether both results of `file` hold the same bytes (compared where either has data, so sparse files are cheap). */
export function sameBytes(dirs: PairDirs, file: string): boolean {
  const a = fs.openSync(path.join(dirs.theirs, file), 'r');
  const b = fs.openSync(path.join(dirs.ours, file), 'r');
  try {
    if (fs.fstatSync(a).size !== fs.fstatSync(b).size) return false;
    const [bufA, bufB] = [Buffer.alloc(COPY_CHUNK_BYTES), Buffer.alloc(COPY_CHUNK_BYTES)];
    const same = (offsetBytes: number, bytes: number) => {
      fs.readSync(a, bufA, 0, bytes, offsetBytes);
      fs.readSync(b, bufB, 0, bytes, offsetBytes);
      return bufA.compare(bufB, 0, bytes, 0, bytes) === 0;
    };
    return forEachDataExtent(a, same) && forEachDataExtent(b, same);
  } finally {
    fs.closeSync(a);
    fs.closeSync(b);
  }
}
