/*
 * qemu-img-ts compare against qemu-img 7.2 on the same pairs of images:
 * stdout, stderr and exit status must be equal — identical images, content
 * mismatches (in data, against unallocated or zero ranges, in the tail of
 * the longer image), strict mode's size and block-status mismatches,
 * backing chains, raw against qcow2 — and the error cases (usage 1, open
 * failures and bad -T 2). `-p` progress, printed by qemu-img into a pipe
 * and by ours only on a terminal, is filtered out of qemu-img's output.
 *
 * Cost: two sparse 4 TiB qcow2 images with a few MiB of data compare in
 * well under a second of CPU time (block status skips what is not there).
 */
import { execFileSync } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { beforeAll, describe, expect, it } from 'vitest';
import { missingPeers } from '../helpers/peers.js';
import { ROOT, run } from '../helpers/run.js';
import { runBoth, withoutProgress } from '../helpers/side-by-side.js';
import { scratchDir } from '../helpers/tmp.js';

/** CPU seconds (user + system, Node's start included) ours may spend comparing two sparse 4 TiB images. */
const SPARSE_COMPARE_CPU_SECONDS = 1;
const OURS_BIN = path.join(ROOT, 'dist/bin/qemu-img-ts.mjs');

describe.skipIf(missingPeers('qemu-img', 'qemu-io'))('qemu-img-ts compare against qemu-img 7.2', () => {
  const dir = scratchDir('qbt-compare-');
  const qemuImg = (...args: string[]) => execFileSync('qemu-img', args, { cwd: dir, encoding: 'utf8' });
  const qemuIo = (fmt: string, name: string, ...commands: string[]) =>
    execFileSync('qemu-io', ['-f', fmt, ...commands.flatMap((c) => ['-c', c]), name], { cwd: dir, encoding: 'utf8' });
  const qcow2 = (name: string, size: string, ...writes: string[]) => {
    qemuImg('create', '-q', '-f', 'qcow2', name, size);
    if (writes.length) qemuIo('qcow2', name, ...writes);
  };

  beforeAll(() => {
    qcow2('a.qcow2', '1M', 'write -P 1 64k 4k');
    qcow2('a-same.qcow2', '1M', 'write -P 1 64k 4k');
    qcow2('a-later.qcow2', '1M', 'write -P 1 64k 4k', 'write -P 1 900k 1k');
    qcow2('a-sector.qcow2', '1M', 'write -P 1 64k 4k', 'write -P 2 66k 512');
    qcow2('empty-1m.qcow2', '1M');
    qcow2('empty-2m.qcow2', '2M');
    qcow2('tail-data.qcow2', '2M', 'write -P 3 1536k 4k');
    qcow2('tail-zero.qcow2', '2M', 'write -z 1536k 64k');
    qcow2('zeroes.qcow2', '1M', 'write -z 0 512k');
    qcow2('allocated-zeroes.qcow2', '1M', 'write -P 0 0 512k');
    qemuImg('create', '-q', '-f', 'raw', 'empty.raw', '1M');
    qemuImg('create', '-q', '-f', 'raw', 'holes.raw', '1M');
    qemuIo('raw', 'holes.raw', 'write -z 0 1M');
    fs.copyFileSync(path.join(dir, 'empty.raw'), path.join(dir, 'zero-data.raw'));
    qemuIo('raw', 'zero-data.raw', 'write -P 0 512k 64k');
    qemuImg('create', '-q', '-f', 'qcow2', '-b', 'a.qcow2', '-F', 'qcow2', 'overlay.qcow2');
    qemuIo('qcow2', 'overlay.qcow2', 'write -P 2 0 512');
    qemuImg('create', '-q', '-f', 'qcow2', '-b', 'a.qcow2', '-F', 'qcow2', 'overlay-2m.qcow2', '2M');
    qemuImg('convert', '-O', 'raw', 'a.qcow2', 'a.raw');
    qcow2('sparse-4t-a.qcow2', '4T', 'write -P 1 1G 64k', 'write -P 2 3T 1M', 'write -P 3 100k 1k');
    qcow2('sparse-4t-b.qcow2', '4T', 'write -P 3 100k 1k', 'write -P 2 3T 1M', 'write -P 1 1G 64k');
    qcow2('sparse-4t-c.qcow2', '4T', 'write -P 3 100k 1k', 'write -P 2 3T 1M', 'write -P 1 1G 64k', 'write -P 9 3T 512');
  });

  const expectSame = async (args: string[]) => {
    const { theirs, ours } = await runBoth(args, dir);
    expect(ours).toEqual(theirs);
  };

  const CASES: string[][] = [
    ['a.qcow2', 'a-same.qcow2'],
    ['-s', 'a.qcow2', 'a-same.qcow2'],
    ['a.qcow2', 'a.raw'],
    ['-s', 'a.qcow2', 'a.raw'],
    ['a.qcow2', 'a-later.qcow2'],
    ['a-later.qcow2', 'a.qcow2'],
    ['a.qcow2', 'a-sector.qcow2'],
    ['a.qcow2', 'empty.raw'],
    ['empty.raw', 'a.qcow2'],
    ['-s', 'a.qcow2', 'empty-2m.qcow2'],
    ['a.qcow2', 'empty-2m.qcow2'],
    ['empty.raw', 'empty-2m.qcow2'],
    ['empty-2m.qcow2', 'empty.raw'],
    ['-s', 'empty.raw', 'empty-2m.qcow2'],
    ['empty.raw', 'tail-data.qcow2'],
    ['tail-data.qcow2', 'empty-1m.qcow2'],
    ['empty.raw', 'tail-zero.qcow2'],
    ['-s', 'empty.raw', 'empty.raw'],
    ['-s', 'holes.raw', 'empty.raw'],
    ['holes.raw', 'empty.raw'],
    ['-s', 'empty.raw', 'zero-data.raw'],
    ['empty.raw', 'zero-data.raw'],
    ['zeroes.qcow2', 'empty.raw'],
    ['-s', 'zeroes.qcow2', 'empty.raw'],
    ['-s', 'zeroes.qcow2', 'empty-1m.qcow2'],
    ['zeroes.qcow2', 'allocated-zeroes.qcow2'],
    ['-s', 'zeroes.qcow2', 'allocated-zeroes.qcow2'],
    ['allocated-zeroes.qcow2', 'empty-1m.qcow2'],
    ['overlay.qcow2', 'a.qcow2'],
    ['-s', 'overlay.qcow2', 'a.qcow2'],
    ['overlay-2m.qcow2', 'a.qcow2'],
    ['-s', 'overlay-2m.qcow2', 'a.qcow2'],
    ['a.qcow2', 'overlay-2m.qcow2'],
    ['-q', 'a.qcow2', 'a-later.qcow2'],
    ['-q', 'a.qcow2', 'a-same.qcow2'],
    ['-f', 'raw', '-F', 'raw', 'a.qcow2', 'a.qcow2'],
    ['-F', 'raw', 'a.raw', 'a.qcow2'],
    ['-U', '-T', 'none', 'a.qcow2', 'a.raw'],
    ['--image-opts', 'driver=qcow2,file.filename=a.qcow2', 'driver=raw,file.filename=a.raw'],
    ['--object', 'secret,id=s,data=x', 'a.qcow2', 'a.qcow2'],
    ['sparse-4t-a.qcow2', 'sparse-4t-b.qcow2'],
    ['-s', 'sparse-4t-a.qcow2', 'sparse-4t-b.qcow2'],
    ['sparse-4t-a.qcow2', 'sparse-4t-c.qcow2'],
  ];
  for (const args of CASES) it(`compare ${args.join(' ')}`, () => expectSame(['compare', ...args]));

  const ERROR_CASES: string[][] = [
    [],
    ['a.qcow2'],
    ['a.qcow2', 'b', 'c'],
    ['nonexistent', 'a.qcow2'],
    ['a.qcow2', 'nonexistent'],
    ['-T', 'foo', 'a.qcow2', 'a.qcow2'],
    ['-X', 'a', 'b'],
    ['-f'],
    ['-f', 'qcow2', 'a.raw', 'a.qcow2'],
    ['--image-opts', '-f', 'raw', 'a.raw', 'a.raw'],
    ['--object', 'foo,id=s', 'a.qcow2', 'a.qcow2'],
    ['--object', 'secret,id=s', 'a.qcow2'],
  ];
  for (const args of ERROR_CASES) it(`compare ${args.join(' ')} (error)`, () => expectSame(['compare', ...args]));

  for (const args of [['-p', 'empty.raw', 'empty-2m.qcow2'], ['-p', 'a.qcow2', 'a-later.qcow2'], ['-p', '-q', 'a.qcow2', 'a.raw']]) {
    it(`compare ${args.join(' ')} (progress filtered)`, async () => {
      const { theirs, ours } = await runBoth(['compare', ...args], dir);
      expect(ours).toEqual({ ...theirs, stdout: withoutProgress(theirs.stdout) });
    });
  }

  it('compares two sparse 4 TiB images in well under a second of CPU time', async () => {
    // bash's `time` reports the child's user and system CPU seconds, which a busy machine does not inflate as it does wall time.
    const r = await run('bash', ['-c', 'TIMEFORMAT="%U %S"; time "$0" "$1" compare sparse-4t-a.qcow2 sparse-4t-b.qcow2', process.execPath, OURS_BIN], { cwd: dir });
    expect(r.stdout).toBe('Images are identical.\n');
    const [user, sys] = r.stderr.trim().split(/\s+/).map(Number);
    expect(user! + sys!).toBeLessThan(SPARSE_COMPARE_CPU_SECONDS);
  });
});
