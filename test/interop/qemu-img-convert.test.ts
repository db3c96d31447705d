/*
 * qemu-img-ts convert against qemu-img convert 7.2 on the same inputs.
 *
 * Every case runs the same command line through both tools, each writing
 * its own target, and requires: the same exit status, stdout and stderr;
 * targets that `qemu-img compare` finds identical to the source; the same
 * `qemu-img map --output=json` of both targets (so ours is exactly as
 * sparse, and for qcow2 laid out the same); and `qemu-img check` clean.
 * Error cases compare the messages and statuses alone.
 */
import { execFileSync, spawnSync } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { beforeAll, describe, expect, it } from 'vitest';
import { missingPeers } from '../helpers/peers.js';
import { ROOT, run, runOurs } from '../helpers/run.js';
import { markInUse } from '../helpers/bitmap-images.js';
import { scratchDir } from '../helpers/tmp.js';

const MiB = 1 << 20;

describe.skipIf(missingPeers('qemu-img', 'qemu-io'))('qemu-img-ts convert against qemu-img 7.2', () => {
  const dir = scratchDir('qbt-convert-');
  const file = (name: string) => path.join(dir, name);
  const qemuImg = (...args: string[]) => execFileSync('qemu-img', args, { cwd: dir, encoding: 'utf8' });
  const qemuIo = (fmt: string, name: string, ...commands: string[]) =>
    execFileSync('qemu-io', ['-f', fmt, ...commands.flatMap((c) => ['-c', c]), name], { cwd: dir, encoding: 'utf8' });
  const map = (fmt: string, name: string) => qemuImg('map', '--output=json', '-f', fmt, name);

  beforeAll(() => {
    // A raw image with data, written zeroes, a hole, short zero runs inside data and an odd tail.
    const raw = Buffer.alloc(12 * MiB);
    for (let i = 0; i < 2 * MiB; i++) raw[i] = (i * 7 + 3) & 0xff;
    raw.fill(0x5a, 6 * MiB, 6 * MiB + 3000);
    raw.fill(0, 6 * MiB + 512, 6 * MiB + 1024);
    raw.fill(0x33, 11 * MiB + 4096, 12 * MiB);
    fs.writeFileSync(file('src.raw'), raw);
    fs.truncateSync(file('src.raw'), 16 * MiB);
    fs.writeFileSync(file('odd.raw'), Buffer.alloc(1000, 0x77));
    // A qcow2 chain: base (raw) ← mid (qcow2) ← top (qcow2), with zero clusters and discards.
    qemuImg('create', '-q', '-f', 'raw', 'base.raw', '32M');
    qemuIo('raw', 'base.raw', 'write -P 0x11 0 8M', 'write -P 0x12 20M 1M');
    qemuImg('create', '-q', '-f', 'qcow2', '-b', 'base.raw', '-F', 'raw', 'mid.qcow2');
    qemuIo('qcow2', 'mid.qcow2', 'write -P 0x21 1M 1M', 'write -z 4M 2M', 'write -P 0x22 30M 64k');
    qemuImg('create', '-q', '-f', 'qcow2', '-o', 'cluster_size=4096', '-b', 'mid.qcow2', '-F', 'qcow2', 'top.qcow2');
    qemuIo('qcow2', 'top.qcow2', 'write -P 0x31 2M 8k', 'write -z -u 20M 512k', 'discard 0 64k');
    qemuImg('convert', '-c', '-O', 'qcow2', 'src.raw', 'compressed.qcow2');
    // Internal snapshots: 'first' holds 0x41 at 0, the active image 0x42 there and more data.
    qemuImg('create', '-q', '-f', 'qcow2', 'snap.qcow2', '16M');
    qemuIo('qcow2', 'snap.qcow2', 'write -P 0x41 0 1M');
    qemuImg('snapshot', '-c', 'first', 'snap.qcow2');
    qemuIo('qcow2', 'snap.qcow2', 'write -P 0x42 0 512k', 'write -P 0x43 8M 1M');
    // Persistent bitmaps: b0 recording (64k), b1 disabled (4k), written to in between; bad.qcow2's b0 is in use (inconsistent).
    qemuImg('create', '-q', '-f', 'qcow2', 'bm.qcow2', '16M');
    qemuIo('qcow2', 'bm.qcow2', 'write -P 0x51 0 1M');
    qemuImg('bitmap', '--add', 'bm.qcow2', 'b0');
    qemuImg('bitmap', '--add', '-g', '4k', 'bm.qcow2', 'b1');
    qemuIo('qcow2', 'bm.qcow2', 'write -P 0x52 3M 100k', 'write -z 9M 64k');
    qemuImg('bitmap', '--disable', 'bm.qcow2', 'b1');
    qemuIo('qcow2', 'bm.qcow2', 'write -P 0x53 12M 8k');
    fs.copyFileSync(file('bm.qcow2'), file('bad.qcow2'));
    markInUse(file('bad.qcow2'), 'b0');
  });

  interface Case {
    name: string;
    /** Arguments before the sources; `{out}` is replaced by the target name. */
    args: string[];
    sources: string[];
    srcFmt: string;
    outFmt: string;
    /** Created for both sides before the run (for -n). */
    prepare?: (target: string) => void;
    /** The target need not read as the source (a backing file that differs from the source's). */
    differsFromSource?: boolean;
    /** Our target must be byte for byte qemu-img's (bitmaps included). */
    sameBytes?: boolean;
  }

  const cases: Case[] = [
    { name: 'raw → qcow2', args: ['-f', 'raw', '-O', 'qcow2'], sources: ['src.raw'], srcFmt: 'raw', outFmt: 'qcow2' },
    { name: 'raw → raw', args: ['-f', 'raw', '-O', 'raw'], sources: ['src.raw'], srcFmt: 'raw', outFmt: 'raw' },
    { name: 'raw → qcow2, -S 0', args: ['-S', '0', '-f', 'raw', '-O', 'qcow2'], sources: ['src.raw'], srcFmt: 'raw', outFmt: 'qcow2' },
    { name: 'raw → raw, -S 0', args: ['-S', '0', '-O', 'raw'], sources: ['src.raw'], srcFmt: 'raw', outFmt: 'raw' },
    { name: 'raw → qcow2, -S 64k', args: ['-S', '64k', '-O', 'qcow2'], sources: ['src.raw'], srcFmt: 'raw', outFmt: 'qcow2' },
    { name: 'raw → qcow2 with 512-byte clusters, -S 512', args: ['-S', '512', '-O', 'qcow2', '-o', 'cluster_size=512'], sources: ['src.raw'], srcFmt: 'raw', outFmt: 'qcow2' },
    { name: 'odd-sized raw → raw', args: ['-O', 'raw'], sources: ['odd.raw'], srcFmt: 'raw', outFmt: 'raw' },
    { name: 'qcow2 chain → raw', args: ['-O', 'raw'], sources: ['top.qcow2'], srcFmt: 'qcow2', outFmt: 'raw' },
    { name: 'qcow2 chain → qcow2 (v2, lazy refcounts)', args: ['-O', 'qcow2', '-o', 'compat=0.10'], sources: ['top.qcow2'], srcFmt: 'qcow2', outFmt: 'qcow2' },
    { name: 'compressed qcow2 → qcow2', args: ['-O', 'qcow2'], sources: ['compressed.qcow2'], srcFmt: 'qcow2', outFmt: 'qcow2' },
    { name: 'qcow2 → qcow2, -m 1', args: ['-m', '1', '-O', 'qcow2'], sources: ['top.qcow2'], srcFmt: 'qcow2', outFmt: 'qcow2' },
    { name: 'qcow2 → qcow2, -m 16', args: ['-m', '16', '-O', 'qcow2'], sources: ['top.qcow2'], srcFmt: 'qcow2', outFmt: 'qcow2' },
    { name: 'three sources concatenated', args: ['-O', 'qcow2'], sources: ['src.raw', 'odd.raw', 'top.qcow2'], srcFmt: '', outFmt: 'qcow2' },
    { name: 'raw → compressed qcow2 (-c)', args: ['-c', '-O', 'qcow2'], sources: ['src.raw'], srcFmt: 'raw', outFmt: 'qcow2' },
    { name: 'qcow2 chain → compressed qcow2 with 4k clusters, -W -m 16', args: ['-c', '-W', '-m', '16', '-O', 'qcow2', '-o', 'cluster_size=4k'], sources: ['top.qcow2'], srcFmt: 'qcow2', outFmt: 'qcow2' },
    { name: '-l by name', args: ['-l', 'first', '-O', 'qcow2'], sources: ['snap.qcow2'], srcFmt: 'qcow2', outFmt: 'qcow2', differsFromSource: true },
    { name: '-l snapshot.id=1', args: ['-l', 'snapshot.id=1', '-O', 'raw'], sources: ['snap.qcow2'], srcFmt: 'qcow2', outFmt: 'raw', differsFromSource: true },
    { name: '--bitmaps from a qcow2 with a recording and a disabled bitmap', args: ['--bitmaps', '-O', 'qcow2'], sources: ['bm.qcow2'], srcFmt: 'qcow2', outFmt: 'qcow2', sameBytes: true },
    { name: '--bitmaps --skip-broken-bitmaps past an inconsistent bitmap', args: ['--bitmaps', '--skip-broken-bitmaps', '-O', 'qcow2'], sources: ['bad.qcow2'], srcFmt: 'qcow2', outFmt: 'qcow2', sameBytes: true },
    { name: '--bitmaps from a qcow2 without bitmaps', args: ['--bitmaps', '-O', 'qcow2'], sources: ['top.qcow2'], srcFmt: 'qcow2', outFmt: 'qcow2' },
    { name: 'preallocated qcow2 target', args: ['-O', 'qcow2', '-o', 'preallocation=metadata'], sources: ['src.raw'], srcFmt: 'raw', outFmt: 'qcow2' },
    {
      name: '-n onto an existing raw file',
      args: ['-n', '-O', 'raw'],
      sources: ['top.qcow2'],
      srcFmt: 'qcow2',
      outFmt: 'raw',
      prepare: (t) => fs.writeFileSync(t, Buffer.alloc(32 * MiB, 0xee)),
    },
    {
      name: '-n --target-is-zero onto a zeroed qcow2',
      args: ['-n', '--target-is-zero', '-O', 'qcow2'],
      sources: ['top.qcow2'],
      srcFmt: 'qcow2',
      outFmt: 'qcow2',
      prepare: (t) => qemuImg('create', '-q', '-f', 'qcow2', t, '32M'),
    },
    { name: '-B overlay of the source\'s own base', args: ['-O', 'qcow2', '-B', 'mid.qcow2', '-F', 'qcow2'], sources: ['top.qcow2'], srcFmt: 'qcow2', outFmt: 'qcow2' },
    { name: '-o backing_file onto another base', args: ['-O', 'qcow2', '-o', 'backing_file=base.raw,backing_fmt=raw'], sources: ['top.qcow2'], srcFmt: 'qcow2', outFmt: 'qcow2', differsFromSource: true },
  ];

  const target = (side: string, c: Case) => `${side}-${c.name.replace(/[^a-z0-9]+/gi, '_')}.${c.outFmt}`;
  const argv = (c: Case, out: string) => ['convert', ...c.args, ...c.sources, out];

  for (const c of cases) {
    it(c.name, async () => {
      const ours = target('ours', c);
      const peer = target('peer', c);
      c.prepare?.(file(ours));
      c.prepare?.(file(peer));
      const want = await run('qemu-img', argv(c, peer), { cwd: dir });
      const got = await runOurs('qemu-img-ts', argv(c, ours), { cwd: dir });
      expect(want.code, want.stderr).toBe(0);
      expect({ code: got.code, stdout: got.stdout, stderr: got.stderr }).toEqual({ code: 0, stdout: want.stdout, stderr: want.stderr });
      if (c.sources.length === 1 && !c.differsFromSource) expect(qemuImg('compare', '-f', c.srcFmt, '-F', c.outFmt, c.sources[0]!, ours)).toBe('Images are identical.\n');
      expect(qemuImg('compare', '-F', c.outFmt, '-f', c.outFmt, peer, ours)).toBe('Images are identical.\n');
      expect(map(c.outFmt, ours)).toBe(map(c.outFmt, peer));
      if (c.outFmt === 'qcow2') expect(spawnSync('qemu-img', ['check', '-q', ours], { cwd: dir }).status).toBe(0);
      if (c.sameBytes) expect(fs.readFileSync(file(ours)).equals(fs.readFileSync(file(peer)))).toBe(true);
    });
  }

  const errors: Array<[string, string[]]> = [
    ['no file names', ['convert']],
    ['one file name', ['convert', 'src.raw']],
    ['bad -S', ['convert', '-S', '1000', 'src.raw', 'x.raw']],
    ['-S too large', ['convert', '-S', '32M', 'src.raw', 'x.raw']],
    ['bad -m', ['convert', '-m', '17', 'src.raw', 'x.raw']],
    ['-m zero', ['convert', '-m', '0', 'src.raw', 'x.raw']],
    ['--target-is-zero without -n', ['convert', '--target-is-zero', 'src.raw', 'x.raw']],
    ['--target-image-opts without -n', ['convert', '--target-image-opts', 'src.raw', 'x.raw']],
    ['-n with -o', ['convert', '-n', '-o', 'cluster_size=4k', 'src.raw', 'x.raw']],
    ['--skip-broken-bitmaps alone', ['convert', '--skip-broken-bitmaps', 'src.raw', 'x.raw']],
    ['-C with -c', ['convert', '-C', '-c', 'src.raw', 'x.raw']],
    ['unknown format', ['convert', '-O', 'foo', 'src.raw', 'x.raw']],
    ['missing source', ['convert', 'nonexistent.raw', 'x.raw']],
    ['raw cannot compress', ['convert', '-c', '-O', 'raw', 'src.raw', 'x.raw']],
    ['compression and preallocation', ['convert', '-c', '-O', 'qcow2', '-o', 'preallocation=full', 'src.raw', 'x.qcow2']],
    ['-B on raw', ['convert', '-B', 'base.raw', 'src.raw', 'x.raw']],
    ['-B without -F', ['convert', '-O', 'qcow2', '-B', 'base.raw', 'src.raw', 'x.qcow2']],
    ['backing with several sources', ['convert', '-O', 'qcow2', '-B', 'base.raw', '-F', 'raw', 'src.raw', 'odd.raw', 'x.qcow2']],
    ['bad cluster size', ['convert', '-O', 'qcow2', '-o', 'cluster_size=3', 'src.raw', 'x.qcow2']],
    ['unknown -o option', ['convert', '-O', 'qcow2', '-o', 'bogus=1', 'src.raw', 'x.qcow2']],
    ['bad target cache', ['convert', '-t', 'foo', 'src.raw', 'x.raw']],
    ['bad source cache', ['convert', '-T', 'foo', 'src.raw', 'x.raw']],
    ['-n onto a smaller file', ['convert', '-n', 'top.qcow2', 'odd.raw']],
    ['-n onto a missing file', ['convert', '-n', 'src.raw', 'missing.raw']],
    ['snapshots of several sources', ['convert', '-l', 'snap', 'src.raw', 'odd.raw', 'x.raw']],
    ['unknown option', ['convert', '--bogus', 'src.raw', 'x.raw']],
    ['-l of a missing snapshot', ['convert', '-l', 'nosuch', 'snap.qcow2', 'x.raw']],
    ['-l with a bad key', ['convert', '-l', 'snapshot.bogus=1', 'snap.qcow2', 'x.raw']],
    ['-l on raw', ['convert', '-l', 'first', 'src.raw', 'x.raw']],
    ['--bitmaps onto raw', ['convert', '--bitmaps', '-O', 'raw', 'top.qcow2', 'x.raw']],
    ['--bitmaps from raw', ['convert', '--bitmaps', '-O', 'qcow2', 'src.raw', 'x.qcow2']],
    ['--bitmaps from an inconsistent bitmap', ['convert', '--bitmaps', '-O', 'qcow2', 'bad.qcow2', 'x.qcow2']],
    ['--bitmaps with two sources', ['convert', '--bitmaps', '-O', 'qcow2', 'top.qcow2', 'mid.qcow2', 'x.qcow2']],
  ];
  for (const [name, args] of errors) {
    it(`error: ${name}`, async () => {
      const want = await run('qemu-img', args, { cwd: dir });
      const got = await runOurs('qemu-img-ts', args, { cwd: dir });
      expect({ code: got.code, stdout: got.stdout, stderr: got.stderr }).toEqual({ code: want.code, stdout: want.stdout, stderr: want.stderr });
    });
  }

  it('-p prints nothing into a pipe, and live percentages on a terminal', async () => {
    const piped = await runOurs('qemu-img-ts', ['convert', '-p', '-O', 'raw', 'top.qcow2', 'p1.raw'], { cwd: dir });
    expect(piped).toMatchObject({ code: 0, stdout: '', stderr: '' });
    // `script` gives the command a pseudo-terminal.
    const tty = await run('script', ['-qec', `node ${path.join(ROOT, 'dist/bin/qemu-img-ts.mjs')} convert -p -O raw top.qcow2 p2.raw`, '/dev/null'], { cwd: dir });
    expect(tty.code).toBe(0);
    const updates = tty.stdout.split('\r').map((s) => s.trim()).filter(Boolean);
    expect(updates[0]).toBe('(0.00/100%)');
    expect(updates[updates.length - 1]).toBe('(100.00/100%)');
    const values = updates.map((u) => Number(/\(([\d.]+)\/100%\)/.exec(u)?.[1]));
    expect(values.every((v, i) => i === 0 || v >= values[i - 1]!)).toBe(true);
  });

  it('a sparse 4 TiB qcow2 with scattered data converts, as sparse as qemu-img makes it', { timeout: 120_000 }, async () => {
    qemuImg('create', '-q', '-f', 'qcow2', 'huge.qcow2', '4T');
    qemuIo('qcow2', 'huge.qcow2', 'write -P 1 0 1M', 'write -P 2 1T 1M', 'write -P 3 3T 64k', 'write -z 2T 1G');
    for (const fmt of ['qcow2', 'raw']) {
      const got = await runOurs('qemu-img-ts', ['convert', '-O', fmt, 'huge.qcow2', `huge-ours.${fmt}`], { cwd: dir, timeoutMs: 90_000 });
      expect(got.code, got.stderr).toBe(0);
      qemuImg('convert', '-O', fmt, 'huge.qcow2', `huge-peer.${fmt}`);
      expect(map(fmt, `huge-ours.${fmt}`)).toBe(map(fmt, `huge-peer.${fmt}`));
      expect(fs.statSync(file(`huge-ours.${fmt}`)).blocks).toBeLessThanOrEqual(fs.statSync(file(`huge-peer.${fmt}`)).blocks);
    }
  });

  it('--salvage turns an unreadable compressed cluster into zeroes, warning as qemu-img does; without it the copy fails alike', async () => {
    const generator = path.join(ROOT, 'test/fixtures/qcow2-hostile/make-hostile.mjs');
    const manifest = JSON.parse(execFileSync(process.execPath, [generator, file('hostile'), '--json', 'compressed-past-eof'], { encoding: 'utf8' })) as Array<{ name: string; file: string }>;
    const hostile = manifest.find((h) => h.name === 'compressed-past-eof')!;
    for (const extra of [['--salvage'], ['--salvage', '-q'], []]) {
      const args = (out: string) => ['convert', ...extra, '-O', 'raw', hostile.file, out];
      const want = await run('qemu-img', args('salvage-peer.raw'), { cwd: dir });
      const got = await runOurs('qemu-img-ts', args('salvage-ours.raw'), { cwd: dir });
      expect({ code: got.code, stdout: got.stdout, stderr: got.stderr }).toEqual({ code: want.code, stdout: want.stdout, stderr: want.stderr });
      if (want.code === 0) expect(fs.readFileSync(file('salvage-ours.raw')).equals(fs.readFileSync(file('salvage-peer.raw')))).toBe(true);
    }
  });

  it('a target that fails its writes: the copy error first, then what its close could not write, as qemu-img', async () => {
    // blkdebug on the target's file: every request after the first data write fails (ENOSPC), or only that write (EIO, once).
    const rules = [
      ['file.inject-error.0.errno=28', 'file.inject-error.0.immediately=on'],
      ['file.inject-error.0.errno=5', 'file.inject-error.0.once=on', 'file.inject-error.0.immediately=on'],
    ];
    for (const rule of rules) {
      const target = (name: string) =>
        ['driver=qcow2', 'file.driver=blkdebug', `file.image.filename=${name}`, 'file.inject-error.0.event=write_aio', ...rule].join(',');
      const args = (name: string) => ['convert', '-n', '-f', 'raw', '--target-image-opts', 'src.raw', target(name)];
      for (const name of ['fail-peer.qcow2', 'fail-ours.qcow2']) qemuImg('create', '-q', '-f', 'qcow2', name, '16M');
      const want = await run('qemu-img', args('fail-peer.qcow2'), { cwd: dir });
      const got = await runOurs('qemu-img-ts', args('fail-ours.qcow2'), { cwd: dir });
      expect(want.code).toBe(1);
      expect({ code: got.code, stdout: got.stdout, stderr: got.stderr }).toEqual({ code: want.code, stdout: want.stdout, stderr: want.stderr });
    }
  });

  it('-r limits the write bandwidth (3 MiB of data at 2 MiB/s take over a second)', async () => {
    const started = performance.now();
    const got = await runOurs('qemu-img-ts', ['convert', '-r', '2M', '-O', 'raw', 'src.raw', 'rate-ours.raw'], { cwd: dir });
    const elapsedMs = performance.now() - started;
    expect(got.code, got.stderr).toBe(0);
    expect(elapsedMs).toBeGreaterThan(1000);
    expect(qemuImg('compare', '-f', 'raw', '-F', 'raw', 'src.raw', 'rate-ours.raw')).toBe('Images are identical.\n');
  });

  it('reads a null-co source given as --image-opts', async () => {
    const args = ['convert', '--image-opts', 'driver=null-co,size=8M,read-zeroes=on', '-O', 'qcow2'];
    const got = await runOurs('qemu-img-ts', [...args, 'null-ours.qcow2'], { cwd: dir });
    expect(got.code, got.stderr).toBe(0);
    qemuImg(...args, 'null-peer.qcow2');
    expect(map('qcow2', 'null-ours.qcow2')).toBe(map('qcow2', 'null-peer.qcow2'));
  });
});
