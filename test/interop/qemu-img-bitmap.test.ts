/*
 * qemu-img-ts bitmap against the real qemu-img 7.2 on the same images:
 *
 *   - one sequence of bitmap operations (add with and without -g, --add
 *     --disable, merges within the image and from another file, clear,
 *     enable/disable chains, remove, failing operations in the middle of a
 *     chain) and qemu-io writes, run by qemu-img on one copy of an image
 *     and by us on another: after every step stdout, stderr and the exit
 *     status are the same, and the two files are byte for byte the same;
 *   - argument errors, missing bitmaps, formats and images that cannot
 *     hold bitmaps, inconsistent bitmaps: same output and status;
 *   - `info` (human and JSON) lists the bitmaps as qemu-img does, and
 *     `qemu-img check` stays clean.
 * Node names in messages ("#block123", random in QEMU) are masked.
 *
 * Build first (npm run build): the tests run dist/.
 */
import { execFileSync, spawnSync } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { describe, expect, it } from 'vitest';
import { markInUse } from '../helpers/bitmap-images.js';
import { missingPeers } from '../helpers/peers.js';
import { ROOT } from '../helpers/run.js';
import { scratchDir } from '../helpers/tmp.js';

const OURS_BIN = path.join(ROOT, 'dist/bin/qemu-img-ts.mjs');

interface Result {
  stdout: string;
  stderr: string;
  code: number;
}

describe.skipIf(missingPeers('qemu-img', 'qemu-io'))('qemu-img bitmap against qemu-img 7.2', () => {
  const dir = scratchDir('qbt-img-bitmap-');
  const file = (name: string) => path.join(dir, name);
  const runTool = (cmd: string, args: string[]): Result => {
    const r = spawnSync(cmd, args, { cwd: dir, encoding: 'utf8' });
    const mask = (text: string) => text.replaceAll(/#block\d+/g, '#blockN').replaceAll(/\b(ours|theirs)\b/g, 'X');
    return { stdout: mask(r.stdout), stderr: mask(r.stderr), code: r.status ?? -1 };
  };
  /** Runs `args` with X replaced by `ours`/`theirs` (file stems), by us and by qemu-img; both results. */
  const both = (...args: string[]) => {
    const sub = (who: string) => args.map((a) => a.replaceAll('X', who));
    return { ours: runTool(process.execPath, [OURS_BIN, ...sub('ours')]), theirs: runTool('qemu-img', sub('theirs')) };
  };
  const same = (...args: string[]) => {
    const r = both(...args);
    expect(r.ours, args.join(' ')).toEqual(r.theirs);
    return r.theirs;
  };
  const sameFiles = (stem: string, when: string) => {
    expect(fs.readFileSync(file(`ours${stem}`)).equals(fs.readFileSync(file(`theirs${stem}`))), `files differ after ${when}`).toBe(true);
  };
  const create = (name: string, size = '4M', ...options: string[]) => {
    execFileSync('qemu-img', ['create', '-q', '-f', 'qcow2', ...options.flatMap((o) => ['-o', o]), name, size], { cwd: dir });
  };
  const qemuIo = (name: string, ...commands: string[]) => {
    const r = spawnSync('qemu-io', ['-f', 'qcow2', ...commands.flatMap((c) => ['-c', c]), name], { cwd: dir, encoding: 'utf8' });
    if (r.status !== 0 || /failed|error/i.test(r.stdout + r.stderr)) throw new Error(`qemu-io ${commands.join('; ')}: ${r.stdout}${r.stderr}`);
  };
  const checkClean = (name: string) => {
    const r = runTool('qemu-img', ['check', '-f', 'qcow2', name]);
    expect(`${r.code} ${r.stdout}${r.stderr}`).toMatch(/^0 No errors were found on the image/);
  };

  it('a sequence of operations and writes leaves the same output and the same file', () => {
    for (const who of ['ours', 'theirs']) {
      create(`${who}.qcow2`);
      create(`${who}-src.qcow2`);
    }
    const steps: string[][] = [
      ['bitmap', '--add', 'X.qcow2', 'b0'],
      ['bitmap', '--add', '-g', '2M', 'X.qcow2', 'big'],
      ['bitmap', '--add', '--disable', 'X.qcow2', 'dis'],
      ['bitmap', '--add', '--granularity=512', 'X.qcow2', 'small'],
      ['io', 'write -P 1 0 100k', 'write -P 2 1M 4k', 'write 3M 512', 'write -z 2560k 64k', 'discard 2M 64k'],
      ['bitmap', '--merge', 'big', 'X.qcow2', 'dis'],
      ['bitmap', '--merge', 'small', 'X.qcow2', 'big'],
      ['bitmap', '--clear', 'X.qcow2', 'b0'],
      ['bitmap', '--enable', '--disable', '--enable', 'X.qcow2', 'dis'],
      ['io', 'write 64k 64k'],
      ['bitmap', '--remove', 'X.qcow2', 'big'],
      ['bitmap', '--add', '--add', 'X.qcow2', 'x1'],
      ['bitmap', '--remove', '--remove', 'X.qcow2', 'small'],
      ['bitmap', '--add', '-g', '4294967808', 'X.qcow2', 'wrapped'],
      ['bitmap', '--add', '-g', '0', 'X.qcow2', 'dflt'],
      ['src', 'bitmap', '--add', 'X-src.qcow2', 'sb'],
      ['src-io', 'write 2M 1M'],
      ['bitmap', '--merge', 'sb', '-b', 'X-src.qcow2', '-F', 'qcow2', 'X.qcow2', 'b0'],
      ['bitmap', '--merge', 'sb', '--source-file=X-src.qcow2', 'X.qcow2', 'x1'],
      ['bitmap', '--merge', 'nope', '-b', 'X-src.qcow2', 'X.qcow2', 'x1'],
      ['bitmap', '--merge', 'sb', '-b', 'X-src.qcow2', '-F', 'raw', 'X.qcow2', 'x1'],
      ['bitmap', '--disable', '--merge', 'b0', '--clear', '--enable', 'X.qcow2', 'x1'],
      ['info', 'X.qcow2'],
      ['info', '--output=json', 'X.qcow2'],
    ];
    for (const step of steps) {
      const [kind, ...rest] = step;
      if (kind === 'io') for (const who of ['ours', 'theirs']) qemuIo(`${who}.qcow2`, ...rest);
      else if (kind === 'src-io') for (const who of ['ours', 'theirs']) qemuIo(`${who}-src.qcow2`, ...rest);
      else if (kind === 'src') same(...rest);
      else same(...step);
      sameFiles('.qcow2', step.join(' '));
      sameFiles('-src.qcow2', step.join(' '));
    }
    checkClean('ours.qcow2');
    const info = runTool('qemu-img', ['info', '--output=json', 'ours.qcow2']);
    const bitmaps = (JSON.parse(info.stdout) as { 'format-specific': { data: { bitmaps: unknown } } })['format-specific'].data.bitmaps;
    expect(bitmaps).toEqual([
      { flags: ['auto'], name: 'b0', granularity: 65536 },
      { flags: ['auto'], name: 'dis', granularity: 65536 },
      { flags: ['auto'], name: 'x1', granularity: 65536 },
      { flags: ['auto'], name: 'wrapped', granularity: 512 },
      { flags: ['auto'], name: 'dflt', granularity: 65536 },
    ]);
  });

  it('errors: arguments, missing bitmaps, images that cannot hold bitmaps, inconsistent bitmaps', () => {
    for (const who of ['ours', 'theirs']) {
      create(`${who}-e.qcow2`);
      create(`${who}-v2.qcow2`, '4M', 'compat=0.10');
      create(`${who}-8m.qcow2`, '8M');
      create(`${who}-zero.qcow2`, '0');
      execFileSync('qemu-img', ['create', '-q', '-f', 'raw', file(`${who}.raw`), '4M']);
      execFileSync('qemu-img', ['bitmap', '--add', file(`${who}-8m.qcow2`), 'b8']);
    }
    const cases: string[][] = [
      ['bitmap', 'X-e.qcow2', 'b0'],
      ['bitmap', '--add', 'X-e.qcow2'],
      ['bitmap', '--add', 'X-e.qcow2', 'b0', 'extra'],
      ['bitmap', '--add', '-g', '1000', 'X-e.qcow2', 'b0'],
      ['bitmap', '--add', '-g', '256', 'X-e.qcow2', 'b0'],
      ['bitmap', '--add', '-g', '4G', 'X-e.qcow2', 'b0'],
      ['bitmap', '--add', '-g', '1.5k', 'X-e.qcow2', 'b0'],
      ['bitmap', '--add', '-g', 'abc', 'X-e.qcow2', 'b0'],
      ['bitmap', '--add', '-g', '-5', 'X-e.qcow2', 'b0'],
      ['bitmap', '--add', '-g', '8E', 'X-e.qcow2', 'b0'],
      ['bitmap', '--remove', '-g', '64k', 'X-e.qcow2', 'b0'],
      ['bitmap', '--remove', '-F', 'qcow2', 'X-e.qcow2', 'b0'],
      ['bitmap', '--remove', '-b', 'y', 'X-e.qcow2', 'b0'],
      ['bitmap', '--remove', 'X-e.qcow2', 'b0'],
      ['bitmap', '--clear', 'X-e.qcow2', 'b0'],
      ['bitmap', '--enable', 'X-e.qcow2', 'b0'],
      ['bitmap', '--disable', 'X-e.qcow2', 'b0'],
      ['bitmap', '--merge', 'x', 'X-e.qcow2', 'b0'],
      ['bitmap', '--add', 'X-e.qcow2', ''],
      ['bitmap', '--add', 'X-e.qcow2', 'x'.repeat(1024)],
      ['bitmap', '--foo', 'X-e.qcow2', 'q'],
      ['bitmap', '--merge'],
      ['bitmap', '-q', '--add', 'X-e.qcow2', 'b'],
      ['bitmap', '--format', 'qcow2', '--add', 'X-e.qcow2', 'g2'],
      ['bitmap', '--disabled', '--add', 'X-e.qcow2', 'g2'],
      ['bitmap', '--image-opts', '-f', 'qcow2', '--add', 'X-e.qcow2', 'e'],
      ['bitmap', '-U', '--add', 'X-e.qcow2', 'e'],
      ['bitmap', '--add', 'nonexist.qcow2', 'b0'],
      ['bitmap', '--add', 'X.raw', 'b'],
      ['bitmap', '--add', '-f', 'raw', 'X.raw', 'b'],
      ['bitmap', '--add', '-f', 'qcow2', 'X.raw', 'b0'],
      ['bitmap', '--add', 'X-v2.qcow2', 'b'],
      ['bitmap', '--add', 'X-e.qcow2', 'b0'],
      ['bitmap', '--merge', 'b8', '-b', 'X-8m.qcow2', 'X-e.qcow2', 'b0'],
      ['bitmap', '--merge', 'b8', '-b', 'nonexist.qcow2', 'X-e.qcow2', 'b0'],
      ['bitmap', '--add', '--d', '--e', 'X-e.qcow2', 'abbrev'],
      ['bitmap', '--image-opts', '--add', 'driver=qcow2,file.filename=X-e.qcow2', 'opts'],
      ['bitmap', '--add', '--object', 'secret,id=s0,data=x', 'X-e.qcow2', 'obj'],
      ['bitmap', '--add', '--object', 'foo,id=x', 'X-e.qcow2', 'obj2'],
      // An empty image cannot store a bitmap: the close fails ("No memory"), the status stays 0.
      ['bitmap', '--add', 'X-zero.qcow2', 'b'],
    ];
    for (const c of cases) {
      same(...c);
      sameFiles('-e.qcow2', c.join(' '));
    }
    sameFiles('-zero.qcow2', 'adding to an empty image');
    checkClean('ours-e.qcow2');
  });

  it('an inconsistent bitmap can only be removed; a resize is refused while it exists', () => {
    for (const who of ['ours', 'theirs']) {
      create(`${who}-i.qcow2`);
      execFileSync('qemu-img', ['bitmap', '--add', file(`${who}-i.qcow2`), 'bad']);
      execFileSync('qemu-img', ['bitmap', '--add', file(`${who}-i.qcow2`), 'good']);
      markInUse(file(`${who}-i.qcow2`), 'bad');
    }
    for (const c of [
      ['info', 'X-i.qcow2'],
      ['bitmap', '--enable', 'X-i.qcow2', 'bad'],
      ['bitmap', '--clear', 'X-i.qcow2', 'bad'],
      ['bitmap', '--merge', 'bad', 'X-i.qcow2', 'good'],
      ['bitmap', '--merge', 'good', 'X-i.qcow2', 'bad'],
      ['resize', 'X-i.qcow2', '8M'],
      ['bitmap', '--remove', 'X-i.qcow2', 'bad'],
      ['resize', 'X-i.qcow2', '8M'],
      ['info', '--output=json', 'X-i.qcow2'],
    ]) {
      same(...c);
      sameFiles('-i.qcow2', c.join(' '));
    }
    checkClean('ours-i.qcow2');
  });
});
