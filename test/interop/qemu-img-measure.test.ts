/*
 * qemu-img-ts measure against qemu-img 7.2 on the same inputs: stdout,
 * stderr and exit status must be equal, for `--size` and for sources of
 * every kind (sparse and full raw files, qcow2 images with data, zero and
 * compressed clusters, backing chains, preallocated metadata, v2,
 * persistent bitmaps, internal snapshots (-l), a 4 TiB sparse image),
 * measured as raw and as qcow2 with the cluster sizes, refcount widths,
 * preallocation modes and compat levels that change the numbers — and for
 * the error cases, in qemu-img's order.
 *
 * A bad option makes measure (alone among the commands) print glibc's
 * message and then the help, with status 0: the help texts differ by design,
 * so those cases compare stderr and status only.
 */
import { execFileSync } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { beforeAll, describe, expect, it } from 'vitest';
import { missingPeers } from '../helpers/peers.js';
import { runBoth } from '../helpers/side-by-side.js';
import { scratchDir } from '../helpers/tmp.js';

const MiB = 1 << 20;

describe.skipIf(missingPeers('qemu-img', 'qemu-io'))('qemu-img-ts measure against qemu-img 7.2', () => {
  const dir = scratchDir('qbt-measure-');
  const qemuImg = (...args: string[]) => execFileSync('qemu-img', args, { cwd: dir, encoding: 'utf8' });
  const qemuIo = (fmt: string, name: string, ...commands: string[]) =>
    execFileSync('qemu-io', ['-f', fmt, ...commands.flatMap((c) => ['-c', c]), name], { cwd: dir, encoding: 'utf8' });

  beforeAll(() => {
    const full = Buffer.alloc(3 * MiB + 1000);
    for (let i = 0; i < full.length; i++) full[i] = (i * 13 + 5) & 0xff;
    fs.writeFileSync(path.join(dir, 'full.raw'), full);
    qemuImg('create', '-q', '-f', 'raw', 'sparse.raw', '64M');
    qemuIo('raw', 'sparse.raw', 'write -P 1 3M 100k', 'write -P 2 40M 1M', 'write -P 3 63M 4k');
    qemuImg('create', '-q', '-f', 'raw', 'big.raw', '4T');
    qemuIo('raw', 'big.raw', 'write -P 1 1G 64k', 'write -P 2 3T 1M');
    qemuImg('create', '-q', '-f', 'qcow2', 'big.qcow2', '4T');
    qemuIo('qcow2', 'big.qcow2', 'write -P 1 1G 64k', 'write -P 2 3T 1M', 'write -P 3 100k 1k');
    qemuImg('create', '-q', '-f', 'qcow2', '-o', 'cluster_size=4k', 'c4.qcow2', '100M');
    qemuIo('qcow2', 'c4.qcow2', 'write -P 1 1000 5000', 'write -z 1M 1M', 'write -P 2 10M 3M');
    qemuImg('create', '-q', '-f', 'qcow2', '-b', 'c4.qcow2', '-F', 'qcow2', 'overlay.qcow2');
    qemuIo('qcow2', 'overlay.qcow2', 'write -P 4 50M 64k');
    qemuImg('convert', '-c', '-O', 'qcow2', 'c4.qcow2', 'compressed.qcow2');
    qemuImg('create', '-q', '-f', 'qcow2', '-o', 'preallocation=metadata', 'prealloc.qcow2', '10M');
    qemuImg('create', '-q', '-f', 'qcow2', '-o', 'compat=0.10', 'v2.qcow2', '10M');
    qemuIo('qcow2', 'v2.qcow2', 'write -P 1 0 1M');
    qemuImg('create', '-q', '-f', 'qcow2', 'bitmaps.qcow2', '100M');
    qemuImg('bitmap', '--add', 'bitmaps.qcow2', 'b0');
    qemuImg('bitmap', '--add', '-g', '512', 'bitmaps.qcow2', 'a-rather-long-bitmap-name-of-forty-bytes');
    qemuImg('create', '-q', '-f', 'qcow2', 'snapshots.qcow2', '10M');
    qemuIo('qcow2', 'snapshots.qcow2', 'write -P 1 0 1M');
    qemuImg('snapshot', '-c', 's1', 'snapshots.qcow2');
    qemuIo('qcow2', 'snapshots.qcow2', 'write -P 2 2M 3M');
    qemuImg('snapshot', '-c', 's2', 'snapshots.qcow2');
    qemuIo('qcow2', 'snapshots.qcow2', 'discard 0 1M');
  });

  const expectSame = async (args: string[]) => {
    const { theirs, ours } = await runBoth(args, dir);
    expect(ours).toEqual(theirs);
  };

  const SOURCES = ['full.raw', 'sparse.raw', 'big.raw', 'big.qcow2', 'c4.qcow2', 'overlay.qcow2', 'compressed.qcow2', 'prealloc.qcow2', 'v2.qcow2', 'bitmaps.qcow2'];
  const TARGETS: string[][] = [
    [],
    ['-O', 'qcow2'],
    ['-O', 'qcow2', '-o', 'cluster_size=512', '--output=json'],
    ['-O', 'qcow2', '-o', 'cluster_size=2M,refcount_bits=1'],
    ['-O', 'qcow2', '-o', 'refcount_bits=64,preallocation=falloc'],
    ['-O', 'qcow2', '-o', 'compat=0.10,backing_file=x'],
    ['-O', 'qcow2', '-o', 'extended_l2=on,cluster_size=16k', '--output=json'],
  ];
  for (const source of SOURCES) {
    for (const target of TARGETS) {
      it(`measure ${target.join(' ')} ${source}`, () => expectSame(['measure', ...target, source]));
    }
  }

  const SIZE_CASES: string[][] = [
    ['--size', '1G'],
    ['--size', '1000', '--output=json'],
    ['--size', '1G', '-O', 'qcow2'],
    ['--size', '1G', '-O', 'qcow2', '--output=json'],
    ['--size', '4P', '-O', 'qcow2'],
    ['--size', '2000P', '-O', 'qcow2', '-o', 'cluster_size=2M'],
    ['--size', '9223372036854775807', '-O', 'raw'],
    ['--size', '9223372036854775807', '-O', 'raw', '--output=json'],
    ['--size', '1G', '-O', 'qcow2', '-o', 'size=5M'],
    ['--size', '1G', '-O', 'qcow2', '-o', 'preallocation=metadata'],
    ['--size', '1G', '-O', 'qcow2', '-o', 'preallocation=full', '--output', 'json'],
    ['--size', '1G', '-O', 'qcow2', '-o', 'extended_l2=on'],
    ['--size', '1G', '-O', 'qcow2', '-o', 'encrypt.format=aes'],
    ['--size', '1G', '-O', 'raw', '-o', 'preallocation=full'],
    ['--size', '100M', '-O', 'file'],
    ['--size', '0x10', '-O', 'raw'],
  ];
  for (const args of SIZE_CASES) it(`measure ${args.join(' ')}`, () => expectSame(['measure', ...args]));

  const ERROR_CASES: string[][] = [
    [],
    ['a', 'b'],
    ['full.raw', '--size', '1G'],
    ['-f', 'raw'],
    ['-l', 'x'],
    ['--image-opts'],
    ['-O', 'qcow2', '-o', 'size=5M'],
    ['--output=xx', '--size', '1'],
    ['--size', '1x'],
    ['--size', '-1'],
    ['--size', '8E', '-O', 'qcow2'],
    ['nonexistent.img'],
    ['--size', '1G', '-O', 'raw', '-o', 'cluster_size=64k'],
    ['--size', '1G', '-O', 'qcow2', '-o', 'foo=bar'],
    ['--size', '1G', '-O', 'qcow2', '-o', ''],
    ['--size', '1G', '-O', 'qcow2', '-o', 'help'],
    ['--size', '1G', '-O', 'qcow2', '-o', 'cluster_size=abc'],
    ['--size', '1G', '-O', 'qcow2', '-o', 'cluster_size=3k'],
    ['--size', '1G', '-O', 'qcow2', '-o', 'lazy_refcounts=maybe'],
    ['--size', '1G', '-O', 'qcow2', '-o', 'refcount_bits=x'],
    ['--size', '1G', '-O', 'qcow2', '-o', 'refcount_bits=3'],
    ['--size', '1G', '-O', 'qcow2', '-o', 'compat=0.10,refcount_bits=8'],
    ['--size', '1G', '-O', 'qcow2', '-o', 'compat=v3'],
    ['--size', '1G', '-O', 'qcow2', '-o', 'preallocation=xx'],
    ['--size', '1G', '-O', 'qcow2', '-o', 'extended_l2=on,cluster_size=4k'],
    ['--size', '1G', '-O', 'qcow2', '-o', 'encrypt.format=luks'],
    ['--size', '1G', '-O', 'null-co'],
    ['--size', '1G', '-O', 'nonsense'],
    ['-l', 'snap', 'full.raw'],
    ['-l', 'snapshot.foo=x', 'c4.qcow2'],
    ['-l', 'snapshot.name=none', 'c4.qcow2'],
    ['-l', 'none', 'c4.qcow2'],
    ['--object', 'secret,id=s', '--size', '1G'],
    ['-f', 'qcow2', 'full.raw'],
    ['--image-opts', '-f', 'raw', 'full.raw'],
  ];
  for (const args of ERROR_CASES) it(`measure ${args.join(' ')} (error)`, () => expectSame(['measure', ...args]));

  const SNAPSHOT_CASES: string[][] = [
    ['snapshots.qcow2'],
    ['-l', 's1', 'snapshots.qcow2'],
    ['-l', '2', 'snapshots.qcow2'],
    ['-l', 'snapshot.id=1', 'snapshots.qcow2'],
    ['-l', 'snapshot.name=s2', 'snapshots.qcow2'],
    ['-l', 'snapshot.name=s2,snapshot.id=1', 'snapshots.qcow2'],
    ['-l', 'snapshot.name=s2,snapshot.id=2', 'snapshots.qcow2'],
    ['-l', 's3', 'snapshots.qcow2'],
    ['-l', 's1', '--image-opts', 'driver=qcow2,file.filename=snapshots.qcow2'],
  ];
  for (const args of SNAPSHOT_CASES) it(`measure -O qcow2 ${args.join(' ')}`, () => expectSame(['measure', '-O', 'qcow2', ...args]));

  it('takes --image-opts and -U', async () => {
    await expectSame(['measure', '-U', '--image-opts', 'driver=qcow2,file.filename=c4.qcow2', '-O', 'qcow2']);
  });

  for (const args of [['-X'], ['--size'], ['--foo'], ['--size', '1G', '-o'], ['--siz=1G', '-Z']]) {
    it(`measure ${args.join(' ')}: glibc's message, the help, status 0`, async () => {
      const { theirs, ours } = await runBoth(['measure', ...args], dir);
      expect({ stderr: ours.stderr, code: ours.code }).toEqual({ stderr: theirs.stderr, code: theirs.code });
      expect(ours.stdout).toContain('measure [--output=ofmt]');
    });
  }
});
