/*
 * Compressed qcow2 writes against qemu-img and qemu-io 7.2.
 *
 *   images we write compressed, cluster run by cluster run in guest order
 *     as `qemu-img convert -c` does (all-zero clusters skipped, the stream
 *     ended by a zero-length compressed write), for every cluster size,
 *     refcount widths 1, 16 and 64, v2 and v3, a partial last cluster: they
 *     read back as their source through `qemu-img convert -O raw` and
 *     `qemu-img compare`, pass `qemu-img check`, count as many compressed
 *     clusters as qemu-img's own `convert -c` output and map like it;
 *     `qemu-img info`/`map` JSON of them equals qemu-img-ts's;
 *   QEMU then writes and discards over our packed clusters and the image
 *     stays clean (our refcounts mean what QEMU's mean);
 *   `qemu-io-ts write -c` and `qemu-io -c 'write -c'` run the same script
 *     on copies of one image: same output, same exit status, images that
 *     map identically (host offsets included: packing follows QEMU's);
 *   the one place we differ on purpose: QEMU 7.2 keeps packing into a host
 *     cluster freed and reused by a normal write, which corrupts that
 *     write's data; ours starts a new host cluster.
 */
import crypto from 'node:crypto';
import { execFileSync, spawnSync } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { describe, expect, it } from 'vitest';
import { createImage, openImage } from '../../image.js';
import { missingPeers } from '../helpers/peers.js';
import { run, runOurs, type RunResult } from '../helpers/run.js';
import { scratchDir } from '../helpers/tmp.js';

const KiB = 1024;
const MiB = 1024 * KiB;
/** Clusters per compressed request, as convert's 2 MiB buffer holds them (at least one). */
const CONVERT_BUFFER_BYTES = 2 * MiB;

/** Source content in 64 KiB stripes: random, zero, text-like, half random, a constant byte. */
function mixedSource(bytes: number): Buffer {
  const b = Buffer.alloc(bytes);
  for (let at = 0, k = 0; at < bytes; at += 64 * KiB, k++) {
    const part = b.subarray(at, Math.min(at + 64 * KiB, bytes));
    switch (k % 5) {
      case 0:
        crypto.randomFillSync(part);
        break;
      case 1:
        break;
      case 2:
        for (let i = 0; i < part.length; i++) part[i] = 0x61 + ((i * 7 + (i >> 6)) % 26);
        break;
      case 3:
        crypto.randomFillSync(part.subarray(0, part.length >> 1));
        break;
      default:
        part.fill(0x5a);
    }
  }
  return b;
}

/** What convert -c does with a raw source: whole-cluster runs in order, zero clusters skipped, then the end marker. */
async function writeCompressed(target: string, source: Buffer, clusterBytes: number): Promise<void> {
  const img = await openImage(target, { format: 'qcow2' });
  const zero = Buffer.alloc(clusterBytes);
  const step = Math.max(clusterBytes, CONVERT_BUFFER_BYTES - (CONVERT_BUFFER_BYTES % clusterBytes));
  for (let at = 0; at < source.length; at += step) {
    const run = source.subarray(at, Math.min(at + step, source.length));
    for (let c = 0; c < run.length; ) {
      while (c < run.length && run.subarray(c, c + clusterBytes).equals(zero.subarray(0, Math.min(clusterBytes, run.length - c)))) c += clusterBytes;
      let end = c;
      while (end < run.length && !run.subarray(end, end + clusterBytes).equals(zero.subarray(0, Math.min(clusterBytes, run.length - end)))) end += clusterBytes;
      if (end > c) await img.write(at + c, run.subarray(c, Math.min(end, run.length)), { compressed: true });
      c = end;
    }
  }
  await img.write(0, new Uint8Array(0), { compressed: true });
  await img.close();
}

/** Timings of qemu-io statistics lines vary; the byte counts stay. */
const maskStats = (text: string) => text.replace(/^(.*, \d+ ops; ).*$/gm, '$1TIME').replace(/^(\d+,\d+),.*$/gm, '$1,TIME');
const masked = (r: RunResult) => ({ stdout: maskStats(r.stdout), stderr: maskStats(r.stderr), code: r.code });

describe.skipIf(missingPeers('qemu-img', 'qemu-io'))('qcow2 compressed writes against qemu-img/qemu-io 7.2', () => {
  const dir = scratchDir('qbt-qcow2-compress-interop-');
  const file = (name: string) => path.join(dir, name);
  const qemuImg = (...args: string[]) => execFileSync('qemu-img', args, { cwd: dir, encoding: 'utf8', stdio: ['ignore', 'pipe', 'pipe'] });
  const checkOf = (name: string) => {
    const r = spawnSync('qemu-img', ['check', '-f', 'qcow2', name], { cwd: dir, encoding: 'utf8' });
    return `${r.status} ${r.stdout}${r.stderr}`;
  };
  const expectClean = (name: string) => expect(checkOf(name)).toMatch(/^0 No errors were found on the image/);
  const compressedLine = (name: string) => /, [\d.]+% compressed clusters/.exec(checkOf(name))?.[0];
  type MapEntry = Record<string, unknown>;
  const mapOf = (name: string, withOffsets: boolean): MapEntry[] =>
    (JSON.parse(qemuImg('map', '--output=json', '-f', 'qcow2', name)) as MapEntry[]).map(({ offset, ...e }) => (withOffsets && offset !== undefined ? { ...e, offset } : e));
  const qemuIo = (name: string, commands: string[], cwd = dir) => run('qemu-io', ['-f', 'qcow2', ...commands.flatMap((c) => ['-c', c]), name], { cwd });

  const cases: Array<{ name: string; sizeBytes: number; options: Record<string, string> }> = [
    { name: 'c512', sizeBytes: MiB + 1536, options: { cluster_size: '512' } },
    { name: 'c4k', sizeBytes: 2 * MiB + 512, options: { cluster_size: '4096' } },
    { name: 'c64k', sizeBytes: 5 * MiB + 32 * KiB, options: {} },
    { name: 'c64k-v2', sizeBytes: 3 * MiB, options: { compat: '0.10' } },
    { name: 'c64k-rc1', sizeBytes: 3 * MiB, options: { refcount_bits: '1' } },
    { name: 'c64k-rc64', sizeBytes: 3 * MiB, options: { refcount_bits: '64' } },
    { name: 'c2m', sizeBytes: 5 * MiB + 4096, options: { cluster_size: '2097152' } },
  ];

  it.each(cases)('$name: reads back as its source, checks clean, compresses and maps like qemu-img convert -c', async ({ name, sizeBytes, options }) => {
    const source = mixedSource(sizeBytes);
    fs.writeFileSync(file(`${name}.raw`), source);
    const clusterBytes = Number(options.cluster_size ?? 65536);
    await createImage(file(`${name}.qcow2`), { format: 'qcow2', sizeBytes, options });
    await writeCompressed(file(`${name}.qcow2`), source, clusterBytes);
    expect(fs.statSync(file(`${name}.qcow2`)).size % 512).toBe(0);
    expectClean(`${name}.qcow2`);
    qemuImg('convert', '-f', 'qcow2', '-O', 'raw', `${name}.qcow2`, `${name}.back.raw`);
    expect(fs.readFileSync(file(`${name}.back.raw`)).equals(source)).toBe(true);
    expect(qemuImg('compare', '-f', 'raw', '-F', 'qcow2', `${name}.raw`, `${name}.qcow2`)).toBe('Images are identical.\n');
    const createOpts = Object.entries(options).map(([k, v]) => `${k}=${v}`).join(',');
    qemuImg('convert', '-c', '-f', 'raw', '-O', 'qcow2', ...(createOpts ? ['-o', createOpts] : []), `${name}.raw`, `${name}.qemu.qcow2`);
    const theirs = compressedLine(`${name}.qemu.qcow2`);
    expect(theirs).toBeDefined();
    expect(compressedLine(`${name}.qcow2`)).toBe(theirs);
    expect(mapOf(`${name}.qcow2`, false)).toEqual(mapOf(`${name}.qemu.qcow2`, false));
  });

  it('qemu-img info and map JSON of a compressed image equal qemu-img-ts info and map', async () => {
    const source = mixedSource(MiB + 32 * KiB);
    await createImage(file('im.qcow2'), { format: 'qcow2', sizeBytes: source.length });
    await writeCompressed(file('im.qcow2'), source, 64 * KiB);
    for (const args of [['info', '--output=json', '-f', 'qcow2', 'im.qcow2'], ['map', '--output=json', '-f', 'qcow2', 'im.qcow2']]) {
      const ours = await runOurs('qemu-img-ts', args, { cwd: dir });
      const theirs = await run('qemu-img', args, { cwd: dir });
      expect({ ...ours, stdout: ours.stdout.replace(/"actual-size": \d+/, '') }).toEqual({ ...theirs, stdout: theirs.stdout.replace(/"actual-size": \d+/, '') });
    }
  });

  it('QEMU writes and discards over our packed clusters and the image stays clean', async () => {
    const source = mixedSource(2 * MiB);
    await createImage(file('over.qcow2'), { format: 'qcow2', sizeBytes: source.length });
    await writeCompressed(file('over.qcow2'), source, 64 * KiB);
    const r = await qemuIo('over.qcow2', ['write -P 0x77 128k 64k', 'discard 256k 128k', 'write -P 0x78 640k 4k', 'read -P 0x77 128k 64k']);
    expect(r.stdout).not.toMatch(/failed/);
    expectClean('over.qcow2');
    source.fill(0x77, 128 * KiB, 192 * KiB);
    source.fill(0, 256 * KiB, 384 * KiB);
    source.fill(0x78, 640 * KiB, 644 * KiB);
    fs.writeFileSync(file('over.raw'), source);
    expect(qemuImg('compare', '-f', 'raw', '-F', 'qcow2', 'over.raw', 'over.qcow2')).toBe('Images are identical.\n');
  });

  it("qemu-io-ts write -c behaves as qemu-io's: output, exit status, resulting image", async () => {
    const script = [
      'write -c -P 0x11 0 64k',
      'write -c 0 64k',
      'write -c 64k 512',
      'write -c 512 64k',
      'write -c -P 0 128k 64k',
      'write -c -P 0x22 192k 128k',
      'write -c -s pattern.bin 320k 64k',
      'write -c 1M 64k',
      'write -c -P 0x33 1M 32k',
      'write -c 1056k 64k',
      'write -c 512k 0',
      'write -c -P 0x44 448k 64k',
      'write -c -q -P 0x45 512k 128k',
      'write -c -C 640k 64k',
      'read -P 0x22 192k 128k',
    ];
    const results: Record<string, RunResult> = {};
    for (const who of ['qemu', 'ours'] as const) {
      const d = path.join(dir, `io-${who}`);
      fs.mkdirSync(d);
      fs.writeFileSync(path.join(d, 'pattern.bin'), 'qcow2 compressed write\n');
      qemuImg('create', '-q', '-f', 'qcow2', path.join(d, 'x.qcow2'), `${MiB + 32 * KiB}`);
      const args = ['-f', 'qcow2', ...script.flatMap((c) => ['-c', c]), 'x.qcow2'];
      results[who] = who === 'qemu' ? await run('qemu-io', args, { cwd: d }) : await runOurs('qemu-io-ts', args, { cwd: d });
    }
    expect(masked(results.ours!)).toEqual(masked(results.qemu!));
    expect(results.ours!.stdout).toMatch(/write failed: Input\/output error\nwrite failed: Invalid argument\nwrite failed: Invalid argument/);
    expectClean('io-ours/x.qcow2');
    expect(mapOf('io-ours/x.qcow2', true)).toEqual(mapOf('io-qemu/x.qcow2', true));
    expect(qemuImg('compare', '-f', 'qcow2', '-F', 'qcow2', 'io-ours/x.qcow2', 'io-qemu/x.qcow2')).toBe('Images are identical.\n');
    expect(fs.statSync(file('io-ours/x.qcow2')).size).toBe(fs.statSync(file('io-qemu/x.qcow2')).size);
  });

  it('write -c on raw is ENOTSUP in both tools, also with length 0', async () => {
    const results: RunResult[] = [];
    for (const who of ['qemu', 'ours'] as const) {
      const d = path.join(dir, `raw-${who}`);
      fs.mkdirSync(d);
      fs.writeFileSync(path.join(d, 'x.raw'), Buffer.alloc(MiB));
      const args = ['-f', 'raw', '-c', 'write -c 0 64k', '-c', 'write -c 0 0', 'x.raw'];
      results.push(who === 'qemu' ? await run('qemu-io', args, { cwd: d }) : await runOurs('qemu-io-ts', args, { cwd: d }));
    }
    expect(masked(results[1]!)).toEqual(masked(results[0]!));
    expect(results[1]!.stdout).toBe('write failed: Operation not supported\nwrite failed: Operation not supported\n');
  });

  it('where QEMU 7.2 packs into a freed and reused host cluster (corrupting it), ours starts a new one', async () => {
    qemuImg('create', '-q', '-f', 'qcow2', file('reuse.qcow2'), '4M');
    const script = ['write -c -P 1 0 64k', 'write -c -P 2 64k 64k', 'discard 0 64k', 'write -P 0x55 64k 64k', 'write -P 0x66 128k 64k', 'write -c -P 3 192k 64k'];
    const verify = ['read -P 0x55 64k 64k', 'read -P 0x66 128k 64k', 'read -P 3 192k 64k'];
    const r = await runOurs('qemu-io-ts', ['-f', 'qcow2', ...[...script, ...verify].flatMap((c) => ['-c', c]), 'reuse.qcow2'], { cwd: dir });
    expect(`${r.code} ${r.stdout}${r.stderr}`).not.toMatch(/failed/);
    expect(r.code).toBe(0);
    expectClean('reuse.qcow2');
    expect((await qemuIo('reuse.qcow2', verify)).stdout).not.toMatch(/failed/);
  });
});
