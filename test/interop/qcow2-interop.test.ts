/*
 * The qcow2 driver against qemu-img and qemu-io 7.2.
 *
 *   reading: images QEMU writes (every cluster size, refcount width, compat
 *     level, lazy refcounts, zero and compressed clusters, overlays over raw
 *     and qcow2, a 3-deep chain) read back exactly as `qemu-img convert -O
 *     raw` says, and our map (block/map.ts) equals `qemu-img map`;
 *   writing: the same qemu-io-style script run by QEMU on one copy and by us
 *     on another leaves images QEMU checks clean, compares identical and
 *     maps identically (offsets included: allocation follows QEMU's);
 *   create: byte-identical files for every option set, QEMU's errors;
 *   growth and pressure: refcount table growth, tiny caches, many
 *   overlapping requests in flight;
 *   robustness: corrupt and dirty bits, overlap checks, hostile compressed
 *   clusters, backing loops, autoclear bits, info.
 */
import { execFileSync, spawnSync } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { describe, expect, it } from 'vitest';
import { BlockBackend } from '../../block/backend.js';
import { createImage } from '../../block/create.js';
import { isBlockError } from '../../block/errors.js';
import { Req } from '../../block/flags.js';
import type { BlockGraph } from '../../block/graph.js';
import { queryImageInfo } from '../../block/info.js';
import type { OptionTree } from '../../block/keyval.js';
import { mapImage, type MapEntry } from '../../block/map.js';
import type { BlockNode } from '../../block/node.js';
import { testGraph } from '../helpers/graphs.js';
import { pattern } from '../helpers/mem-driver.js';
import { missingPeers } from '../helpers/peers.js';
import { scratchDir } from '../helpers/tmp.js';

const KiB = 1024;
const MiB = 1024 * KiB;

describe.skipIf(missingPeers('qemu-img', 'qemu-io'))('qcow2 driver against qemu-img/qemu-io 7.2', () => {
  const dir = scratchDir('qbt-qcow2-');
  const file = (name: string) => path.join(dir, name);
  const run = (cmd: string, args: string[]) => spawnSync(cmd, args, { cwd: dir, encoding: 'utf8' });
  const qemuImg = (...args: string[]) => execFileSync('qemu-img', args, { cwd: dir, encoding: 'utf8', stdio: ['ignore', 'pipe', 'pipe'] });
  const qemuIo = (name: string, commands: string[], fmt = 'qcow2') => {
    const r = run('qemu-io', ['-f', fmt, ...commands.flatMap((c) => ['-c', c]), name]);
    if (r.status !== 0 || /failed/.test(r.stdout + r.stderr)) throw new Error(`qemu-io ${commands.join('; ')}: ${r.stdout}${r.stderr}`);
    return r.stdout;
  };
  const checkClean = (name: string) => {
    const r = run('qemu-img', ['check', '-f', 'qcow2', name]);
    expect(`${r.status} ${r.stdout}${r.stderr}`).toMatch(/^0 No errors were found on the image/);
  };

  /** Opens an image with our driver; `options` go into the top node's options. */
  async function open(name: string, opts: { readOnly?: boolean; options?: OptionTree; graph?: BlockGraph } = {}) {
    const graph = opts.graph ?? testGraph();
    const node = await graph.openImage(file(name), { format: 'qcow2', readOnly: opts.readOnly, options: { discard: 'unmap', ...opts.options } });
    const blk = new BlockBackend(graph, node, { writable: !opts.readOnly });
    return { graph, node, blk };
  }

  async function readAll(name: string, options?: OptionTree): Promise<Buffer> {
    const { blk, node } = await open(name, { readOnly: true, options });
    const buf = Buffer.alloc(node.totalBytes);
    await blk.pread(0, buf);
    await blk.close();
    return buf;
  }

  function qemuRaw(name: string): Buffer {
    qemuImg('convert', '-O', 'raw', name, `${name}.raw`);
    return fs.readFileSync(file(`${name}.raw`));
  }

  type PlainMapEntry = Omit<MapEntry, 'filename'>;
  const plain = (e: PlainMapEntry, withOffset: boolean): PlainMapEntry => {
    const { start, length, depth, present, zero, data, offset } = e;
    return withOffset && offset !== undefined ? { start, length, depth, present, zero, data, offset } : { start, length, depth, present, zero, data };
  };

  async function ourMap(node: BlockNode, withOffset = true): Promise<PlainMapEntry[]> {
    const out: PlainMapEntry[] = [];
    for await (const e of mapImage(node, { mode: 'json' })) out.push(plain(e, withOffset));
    return out;
  }

  const qemuMap = (name: string, withOffset = true): PlainMapEntry[] =>
    (JSON.parse(qemuImg('map', '--output=json', '-f', 'qcow2', name)) as PlainMapEntry[]).map((e) => plain(e, withOffset));

  /** A qemu-io script and the same operations through our BlockBackend. */
  type Cmd = ['write', number, number, number] | ['zero', number, number, boolean] | ['discard', number, number];
  const ioCommand = (c: Cmd) => {
    if (c[0] === 'write') return `write -P ${c[3]} ${c[1]} ${c[2]}`;
    if (c[0] === 'zero') return `write -z${c[3] ? ' -u' : ''} ${c[1]} ${c[2]}`;
    return `discard ${c[1]} ${c[2]}`;
  };
  async function applyOurs(blk: BlockBackend, script: Cmd[]) {
    for (const c of script) {
      if (c[0] === 'write') await blk.pwrite(c[1], Buffer.alloc(c[2], c[3]));
      else if (c[0] === 'zero') await blk.pwriteZeroes(c[1], c[2], c[3] ? Req.MAY_UNMAP : 0);
      else await blk.pdiscard(c[1], c[2]);
    }
  }

  const SCRIPT: Cmd[] = [
    ['write', 0, MiB, 0xab],
    ['zero', MiB, 512 * KiB, false],
    ['write', 2 * MiB, 192 * KiB, 0xcd],
    ['zero', 2 * MiB, 64 * KiB, false],
    ['zero', 2 * MiB, 64 * KiB, true],
    ['discard', 2 * MiB + 64 * KiB, 64 * KiB],
    ['write', 3_000_000, 100_000, 7],
    ['write', 1000, 5000, 9],
    ['zero', 0, 128 * KiB, true],
    ['zero', 3 * MiB + 100, 300, false],
    ['write', 4 * MiB - 700, 700, 3],
  ];

  const CONFIGS: Array<[string, string[]]> = [
    ['64k', []],
    ['4k', ['-o', 'cluster_size=4096']],
    ['512', ['-o', 'cluster_size=512']],
    ['refcount1', ['-o', 'refcount_bits=1']],
    ['refcount64', ['-o', 'refcount_bits=64']],
    ['v2', ['-o', 'compat=0.10']],
    ['lazy', ['-o', 'lazy_refcounts=on']],
    ['2M', ['-o', 'cluster_size=2M']],
  ];

  describe('reads what QEMU writes', () => {
    it.each(CONFIGS)('%s: content equals qemu-img convert -O raw, map equals qemu-img map', async (label, options) => {
      const name = `read-${label}.qcow2`;
      qemuImg('create', '-f', 'qcow2', ...options, name, '4M');
      qemuIo(name, SCRIPT.map(ioCommand));
      expect((await readAll(name)).equals(qemuRaw(name))).toBe(true);
      const { node } = await open(name, { readOnly: true });
      expect(await ourMap(node)).toEqual(qemuMap(name));
    });

    it('compressed clusters (qemu-img convert -c), 64 KiB and 4 KiB clusters', async () => {
      const source = Buffer.concat([pattern(300 * KiB, 5), Buffer.alloc(100 * KiB), Buffer.alloc(112 * KiB, 0x42)]);
      fs.writeFileSync(file('c.raw'), source);
      for (const cluster of ['65536', '4096']) {
        const name = `compressed-${cluster}.qcow2`;
        qemuImg('convert', '-c', '-O', 'qcow2', '-o', `cluster_size=${cluster}`, 'c.raw', name);
        expect((await readAll(name)).equals(source)).toBe(true);
        const { node } = await open(name, { readOnly: true });
        expect(await ourMap(node)).toEqual(qemuMap(name));
      }
    });

    it('overlays over raw and qcow2 backings, a 3-deep chain, a backing shorter than its overlay', async () => {
      fs.writeFileSync(file('chain-raw.raw'), pattern(2 * MiB, 1));
      qemuImg('create', '-f', 'qcow2', '-b', 'chain-raw.raw', '-F', 'raw', 'chain1.qcow2', '3M');
      qemuIo('chain1.qcow2', ['write -P 0x11 100k 200k', 'write -z 1M 64k', 'discard 1600k 64k']);
      qemuImg('create', '-f', 'qcow2', '-b', 'chain1.qcow2', '-F', 'qcow2', '-o', 'cluster_size=4096', 'chain2.qcow2', '4M');
      qemuIo('chain2.qcow2', ['write -P 0x22 150k 5k', 'write -z -u 500k 8k', 'write -P 0x23 2900k 300k']);
      qemuImg('create', '-f', 'qcow2', '-b', 'chain2.qcow2', '-F', 'qcow2', 'chain3.qcow2');
      qemuIo('chain3.qcow2', ['write -P 0x33 0 10k', 'discard 3M 64k']);
      for (const name of ['chain1.qcow2', 'chain2.qcow2', 'chain3.qcow2']) {
        expect((await readAll(name)).equals(qemuRaw(name)), name).toBe(true);
        const { node } = await open(name, { readOnly: true });
        expect(await ourMap(node), name).toEqual(qemuMap(name));
      }
    });

    it('opens an overlay without its backing file when asked (backing: null)', async () => {
      qemuImg('create', '-f', 'qcow2', '-u', '-b', 'missing.qcow2', '-F', 'qcow2', 'orphan.qcow2', '1M');
      await expect(open('orphan.qcow2', { readOnly: true })).rejects.toThrow(
        `Could not open backing file: Could not open '${file('missing.qcow2')}': No such file or directory`,
      );
      const { node, blk } = await open('orphan.qcow2', { readOnly: true, options: { backing: null } });
      const buf = Buffer.alloc(4096, 1);
      await blk.pread(0, buf);
      expect(buf.equals(Buffer.alloc(4096))).toBe(true);
      expect(node.driver.getInfo(node)).toMatchObject({ backingFile: 'missing.qcow2', backingFormat: 'qcow2' });
    });
  });

  describe('QEMU reads what we write', () => {
    it.each(CONFIGS)('%s: same script on a QEMU copy and ours: check clean, identical content and map', async (label, options) => {
      const ours = `write-${label}-ours.qcow2`;
      const theirs = `write-${label}-theirs.qcow2`;
      qemuImg('create', '-f', 'qcow2', ...options, theirs, '4M');
      fs.copyFileSync(file(theirs), file(ours));
      qemuIo(theirs, SCRIPT.map(ioCommand));
      const { blk } = await open(ours);
      await applyOurs(blk, SCRIPT);
      await blk.close();
      checkClean(ours);
      expect(run('qemu-img', ['compare', ours, theirs]).stdout).toBe('Images are identical.\n');
      expect(qemuMap(ours)).toEqual(qemuMap(theirs));
    });

    it('writes through overlays: copy-on-write from raw and qcow2 backings, zero clusters hide backing data', async () => {
      fs.writeFileSync(file('wb.raw'), pattern(MiB, 2));
      qemuImg('create', '-f', 'qcow2', '-b', 'wb.raw', '-F', 'raw', '-o', 'cluster_size=4096', 'wb1.qcow2', '2M');
      qemuImg('create', '-f', 'qcow2', '-b', 'wb1.qcow2', '-F', 'qcow2', 'wb2.qcow2');
      fs.copyFileSync(file('wb2.qcow2'), file('wb2-theirs.qcow2'));
      const script: Cmd[] = [['write', 5000, 3000, 0x61], ['write', 70 * KiB, 200 * KiB, 0x62], ['zero', 512 * KiB, 64 * KiB, false], ['discard', 640 * KiB, 64 * KiB], ['write', MiB - 100, 200, 0x63]];
      qemuIo('wb2-theirs.qcow2', script.map(ioCommand));
      const { blk } = await open('wb2.qcow2');
      await applyOurs(blk, script);
      await blk.close();
      checkClean('wb2.qcow2');
      expect(run('qemu-img', ['compare', 'wb2.qcow2', 'wb2-theirs.qcow2']).stdout).toBe('Images are identical.\n');
      expect(qemuMap('wb2.qcow2')).toEqual(qemuMap('wb2-theirs.qcow2'));
      const verify = run('qemu-io', ['-r', '-c', 'read -P 0x61 5000 3000', '-c', 'read -P 0x63 1048476 200', 'wb2.qcow2']);
      expect(verify.stdout).not.toMatch(/fail|mismatch/);
    });

    it('keeps internal snapshots intact: shared L2 tables and clusters are copied before writing', async () => {
      qemuImg('create', '-f', 'qcow2', 'snap.qcow2', '4M');
      qemuIo('snap.qcow2', ['write -P 1 0 1M', 'write -c -P 2 2M 128k']);
      qemuImg('snapshot', '-c', 's1', 'snap.qcow2');
      const { blk } = await open('snap.qcow2');
      await applyOurs(blk, [['write', 100, 5000, 3], ['write', MiB, 64 * KiB, 4], ['zero', 2 * MiB, 64 * KiB, true], ['discard', 0, 64 * KiB]]);
      await blk.close();
      checkClean('snap.qcow2');
      qemuImg('convert', '-l', 's1', '-O', 'raw', 'snap.qcow2', 'snap-s1.raw');
      const before = Buffer.alloc(4 * MiB);
      before.fill(1, 0, MiB);
      before.fill(2, 2 * MiB, 2 * MiB + 128 * KiB);
      expect(fs.readFileSync(file('snap-s1.raw')).equals(before)).toBe(true);
      const after = Buffer.from(before);
      after.fill(0, 0, 64 * KiB);
      after.fill(4, MiB, MiB + 64 * KiB);
      after.fill(0, 2 * MiB, 2 * MiB + 64 * KiB);
      expect(qemuRaw('snap.qcow2').equals(after)).toBe(true);
    });

    it('overwrites compressed clusters (copy-on-write from the decompressed cluster)', async () => {
      const source = pattern(256 * KiB, 8);
      fs.writeFileSync(file('cw.raw'), source);
      qemuImg('convert', '-c', '-O', 'qcow2', 'cw.raw', 'cw.qcow2');
      const { blk } = await open('cw.qcow2');
      await blk.pwrite(70 * KiB, Buffer.alloc(1000, 0x77));
      await blk.pwriteZeroes(128 * KiB, 64 * KiB, 0);
      await blk.close();
      checkClean('cw.qcow2');
      source.fill(0x77, 70 * KiB, 70 * KiB + 1000);
      source.fill(0, 128 * KiB, 192 * KiB);
      expect(qemuRaw('cw.qcow2').equals(Buffer.from(source))).toBe(true);
    });
  });

  describe('create', () => {
    const CREATE_CASES: string[][] = [
      [],
      ['-o', 'cluster_size=512'],
      ['-o', 'cluster_size=4096,refcount_bits=1'],
      ['-o', 'cluster_size=2M'],
      ['-o', 'refcount_bits=64,lazy_refcounts=on'],
      ['-o', 'compat=0.10'],
      ['-o', 'compat=v2'],
      ['-o', 'preallocation=metadata'],
      ['-o', 'preallocation=falloc'],
      ['-o', 'preallocation=full,cluster_size=4096'],
      ['-o', 'preallocation=metadata,cluster_size=512'],
      ['-u', '-b', 'base.qcow2', '-F', 'qcow2'],
      ['-u', '-b', 'base.qcow2', '-F', 'qcow2', '-o', 'compat=0.10'],
      ['-o', 'nocow=on,extent_size_hint=0'],
    ];

    it.each(CREATE_CASES.map((c) => [c.join(' '), c] as const))('[%s] byte-identical to qemu-img create, same Formatting line', async (_label, args) => {
      const sizes = args.some((a) => a.includes('preallocation')) ? ['0', '1000', '3M'] : ['0', '1000', '3M', '1G'];
      for (const size of sizes) {
        const theirs = run('qemu-img', ['create', '-f', 'qcow2', ...args, 'ct.qcow2', size]);
        const line: string[] = [];
        const graph = testGraph();
        const opts = args.includes('-o') ? args[args.indexOf('-o') + 1]!.split(',').map((kv) => kv.split('=') as [string, string]) : [];
        await createImage(graph, {
          format: 'qcow2', filename: file('co.qcow2'), sizeBytes: Number(size.replace('3M', String(3 * MiB)).replace('1G', String(1024 * MiB))),
          options: opts, backingFile: args.includes('-b') ? 'base.qcow2' : undefined, backingFormat: args.includes('-F') ? 'qcow2' : undefined,
          unsafe: true, onFormatting: (l) => line.push(l),
        });
        expect(theirs.status).toBe(0);
        expect(`${line[0]}\n`, size).toBe(theirs.stdout.replaceAll('ct.qcow2', file('co.qcow2')));
        expect(fs.readFileSync(file('co.qcow2')).equals(fs.readFileSync(file('ct.qcow2'))), `${args.join(' ')} size ${size}`).toBe(true);
      }
    });

    const ERROR_CASES = [
      'compat=0.9', 'cluster_size=1000', 'cluster_size=256', 'cluster_size=4M', 'refcount_bits=3', 'refcount_bits=128', 'refcount_bits=0',
      'compat=0.10,refcount_bits=8', 'compat=0.10,lazy_refcounts=on', 'preallocation=foo', 'compression_type=foo',
      'data_file_raw=on', 'backing_fmt=qcow2', 'compat=0.10,extended_l2=on', 'compat=0.10,compression_type=zstd',
      'preallocation=metadata,backing_file=b.qcow2,backing_fmt=qcow2', 'backing_file=b.qcow2,backing_fmt=foo',
    ];
    it.each(ERROR_CASES)('-o %s: QEMU\'s error, no file left', async (options) => {
      const theirs = run('qemu-img', ['create', '-f', 'qcow2', '-u', '-o', options, 'et.qcow2', '1M']);
      expect(theirs.status).toBe(1);
      const graph = testGraph();
      const create = createImage(graph, {
        format: 'qcow2', filename: file('eo.qcow2'), sizeBytes: MiB, unsafe: true,
        options: options.split(',').map((kv) => kv.split('=') as [string, string]),
      });
      await expect(create).rejects.toThrow(theirs.stderr.trim().replace(/^qemu-img: et\.qcow2: /, ''));
      expect(fs.existsSync(file('eo.qcow2'))).toBe(false);
    });

    it('refuses what this driver does not implement, with a clear error', async () => {
      for (const options of ['extended_l2=on', 'compression_type=zstd', 'data_file=d.raw', 'encryption=on', 'encrypt.format=luks']) {
        const create = createImage(testGraph(), { format: 'qcow2', filename: file('un.qcow2'), sizeBytes: MiB, options: [options.split('=') as [string, string]] });
        await expect(create, options).rejects.toThrow(/not supported by this qcow2 driver/);
      }
    });

    it('a size too large for the L1 table is EFBIG, as qemu-img says it', async () => {
      const r = run('qemu-img', ['create', '-f', 'qcow2', '-o', 'cluster_size=512', 'big.qcow2', '1T']);
      const create = createImage(testGraph(), { format: 'qcow2', filename: file('big2.qcow2'), sizeBytes: 2 ** 40, options: [['cluster_size', '512']] });
      await expect(create).rejects.toThrow(r.stderr.trim().replace(/^qemu-img: big\.qcow2: /, ''));
    });
  });

  describe('growth, caches and concurrency', () => {
    it('grows the refcount table (512-byte clusters, 64-bit refcounts) and stays check-clean', async () => {
      const name = 'grow.qcow2';
      await createImage(testGraph(), { format: 'qcow2', filename: file(name), sizeBytes: 8 * MiB, options: [['cluster_size', '512'], ['refcount_bits', '64']] });
      const before = JSON.parse(qemuImg('check', '--output=json', name))['image-end-offset'];
      const expected = Buffer.alloc(8 * MiB);
      const { blk } = await open(name);
      for (let i = 0; i < 6; i++) {
        const data = pattern(MiB - 1000, i + 1);
        await blk.pwrite(i * MiB + 500, data);
        expected.set(data, i * MiB + 500);
      }
      await blk.close();
      checkClean(name);
      const header = fs.readFileSync(file(name)).subarray(0, 64);
      expect(header.readUInt32BE(56), 'refcount table clusters').toBeGreaterThan(1);
      expect(JSON.parse(qemuImg('check', '--output=json', name))['image-end-offset']).toBeGreaterThan(before);
      expect(qemuRaw(name).equals(expected)).toBe(true);
      expect((await readAll(name)).equals(expected)).toBe(true);
    });

    it('works with the smallest caches (l2-cache-size and refcount-cache-size of 1 byte)', async () => {
      const name = 'tiny-cache.qcow2';
      await createImage(testGraph(), { format: 'qcow2', filename: file(name), sizeBytes: 4 * MiB, options: [['cluster_size', '512']] });
      const options = { 'l2-cache-size': 1, 'refcount-cache-size': 1 };
      const { blk } = await open(name, { options });
      const expected = Buffer.alloc(4 * MiB);
      for (let i = 0; i < 200; i++) {
        const offset = (i * 104729) % (4 * MiB - 3000);
        const data = pattern(3000, i);
        await blk.pwrite(offset, data);
        expected.set(data, offset);
        if (i % 50 === 49) await blk.pdiscard(Math.floor(offset / 512) * 512, 4096);
        if (i % 50 === 49) expected.fill(0, Math.floor(offset / 512) * 512, Math.floor(offset / 512) * 512 + 4096);
      }
      await blk.close();
      checkClean(name);
      expect((await readAll(name, options)).equals(expected)).toBe(true);
      expect(qemuRaw(name).equals(expected)).toBe(true);
    });

    it('many overlapping requests in flight (shared clusters being allocated) against a model', async () => {
      for (const [cluster, backing] of [['65536', false], ['4096', true], ['512', false]] as const) {
        const name = `conc-${cluster}.qcow2`;
        const expected = Buffer.alloc(2 * MiB);
        if (backing) {
          fs.writeFileSync(file('conc.raw'), pattern(2 * MiB, 99));
          expected.set(pattern(2 * MiB, 99));
        }
        await createImage(testGraph(), {
          format: 'qcow2', filename: file(name), sizeBytes: 2 * MiB, options: [['cluster_size', cluster]],
          backingFile: backing ? 'conc.raw' : undefined, backingFormat: backing ? 'raw' : undefined,
        });
        const { blk } = await open(name);
        const requests: Promise<void>[] = [];
        for (let i = 0; i < 400; i++) {
          const offset = i * 5000 + ((i * 37) % 300);
          const data = pattern(4700, i);
          expected.set(data, offset);
          requests.push(blk.pwrite(offset, data));
        }
        await Promise.all(requests);
        await blk.close();
        checkClean(name);
        expect((await readAll(name)).equals(expected), cluster).toBe(true);
        expect(qemuRaw(name).equals(expected), cluster).toBe(true);
      }
    });
  });

  describe('robustness', () => {
    it('a corrupt image opens read-only only, as QEMU 7.2', async () => {
      qemuImg('create', '-f', 'qcow2', 'corrupt.qcow2', '1M');
      qemuIo('corrupt.qcow2', ['write -P 5 0 4k']);
      const fd = fs.openSync(file('corrupt.qcow2'), 'r+');
      fs.writeSync(fd, Buffer.from([0, 0, 0, 0, 0, 0, 0, 2]), 0, 8, 72);
      fs.closeSync(fd);
      const theirs = run('qemu-io', ['-c', 'read 0 1', 'corrupt.qcow2']);
      expect(theirs.stderr).toContain('qcow2: Image is corrupt; cannot be opened read/write');
      await expect(open('corrupt.qcow2')).rejects.toMatchObject({ code: 'EACCES', message: 'qcow2: Image is corrupt; cannot be opened read/write' });
      expect((await readAll('corrupt.qcow2')).subarray(0, 4096).equals(Buffer.alloc(4096, 5))).toBe(true);
    });

    it('a write that would hit metadata is refused: EIO, corrupt bit set, QEMU\'s message, node unusable', async () => {
      qemuImg('create', '-f', 'qcow2', 'overlap.qcow2', '1M');
      qemuIo('overlap.qcow2', ['write -P 5 0 64k']);
      const image = fs.readFileSync(file('overlap.qcow2'));
      const l1 = Number(image.readBigUInt64BE(40));
      const l2 = Number(image.readBigUInt64BE(l1) & 0x00fffffffffffe00n);
      image.writeBigUInt64BE(BigInt(l1) | (1n << 63n), l2);
      fs.writeFileSync(file('overlap.qcow2'), image);
      fs.writeFileSync(file('overlap-qemu.qcow2'), image);
      const theirs = run('qemu-io', ['-c', 'write 0 512', 'overlap-qemu.qcow2']);
      const warnings: string[] = [];
      const graph = testGraph();
      graph.onWarning = (m) => warnings.push(m);
      const { blk } = await open('overlap.qcow2', { graph });
      const failure = await blk.pwrite(0, Buffer.alloc(512)).catch((e: unknown) => e);
      expect(isBlockError(failure, 'EIO')).toBe(true);
      expect(warnings.join('')).toBe(theirs.stderr.replace(/^qemu-io: /m, '').split('\n').filter((l) => l.startsWith('qcow2:')).join('\n') + '\n');
      await expect(blk.pread(0, Buffer.alloc(512))).rejects.toMatchObject({ code: 'ENOMEDIUM' });
      await blk.close();
      for (const name of ['overlap.qcow2', 'overlap-qemu.qcow2']) {
        expect(JSON.parse(qemuImg('info', '--output=json', name))['format-specific'].data.corrupt, name).toBe(true);
      }
    });

    it('an unaligned L2 entry is a corruption: EIO and QEMU\'s message (read-only: the image stays as it is)', async () => {
      qemuImg('create', '-f', 'qcow2', 'unaligned.qcow2', '1M');
      qemuIo('unaligned.qcow2', ['write -P 5 0 64k']);
      const image = fs.readFileSync(file('unaligned.qcow2'));
      const l2 = Number(image.readBigUInt64BE(Number(image.readBigUInt64BE(40))) & 0x00fffffffffffe00n);
      image.writeBigUInt64BE(image.readBigUInt64BE(l2) + 512n, l2);
      fs.writeFileSync(file('unaligned.qcow2'), image);
      const theirs = run('qemu-io', ['-r', '-c', 'read 0 512', 'unaligned.qcow2']);
      const warnings: string[] = [];
      const graph = testGraph();
      graph.onWarning = (m) => warnings.push(m);
      const { blk } = await open('unaligned.qcow2', { readOnly: true, graph });
      await expect(blk.pread(0, Buffer.alloc(512))).rejects.toMatchObject({ code: 'EIO' });
      expect(theirs.stderr).toContain(warnings[0]!.trim());
      expect(fs.readFileSync(file('unaligned.qcow2')).equals(image)).toBe(true);
    });

    it('hostile compressed clusters read as EIO, never crash', async () => {
      fs.writeFileSync(file('h.raw'), pattern(128 * KiB, 4));
      qemuImg('convert', '-c', '-O', 'qcow2', 'h.raw', 'hostile.qcow2');
      const image = fs.readFileSync(file('hostile.qcow2'));
      const l2 = Number(image.readBigUInt64BE(Number(image.readBigUInt64BE(40))) & 0x00fffffffffffe00n);
      const entry = image.readBigUInt64BE(l2);
      const offset = Number(entry & ((1n << 54n) - 1n));
      image.fill(0xff, offset, offset + 64);
      image.writeBigUInt64BE((1n << 62n) | (255n << 54n) | BigInt(image.length - 100), l2 + 8);
      fs.writeFileSync(file('hostile.qcow2'), image);
      const { blk } = await open('hostile.qcow2', { readOnly: true });
      await expect(blk.pread(0, Buffer.alloc(4096))).rejects.toMatchObject({ code: 'EIO' });
      await expect(blk.pread(64 * KiB, Buffer.alloc(4096))).rejects.toMatchObject({ code: 'EIO' });
    });

    it('refuses backing loops', async () => {
      qemuImg('create', '-f', 'qcow2', 'loop-a.qcow2', '1M');
      qemuImg('create', '-f', 'qcow2', '-b', 'loop-a.qcow2', '-F', 'qcow2', 'loop-b.qcow2');
      qemuImg('rebase', '-u', '-b', 'loop-b.qcow2', '-F', 'qcow2', 'loop-a.qcow2');
      await expect(open('loop-b.qcow2', { readOnly: true })).rejects.toThrow(
        "Could not open backing file: Could not open backing file: Backing file 'loop-b.qcow2' creates an infinite loop.",
      );
      qemuImg('rebase', '-u', '-b', 'loop-a.qcow2', '-F', 'qcow2', 'loop-a.qcow2');
      await expect(open('loop-a.qcow2', { readOnly: true })).rejects.toMatchObject({ code: 'ELOOP' });
    });

    it('repairs a dirty image (lazy refcounts, crash before close) at a writable open', async () => {
      const name = 'dirty.qcow2';
      qemuImg('create', '-f', 'qcow2', '-o', 'lazy_refcounts=on', name, '4M');
      const { blk } = await open(name);
      await blk.pwrite(0, Buffer.alloc(300 * KiB, 0x31));
      await blk.pwrite(2 * MiB, Buffer.alloc(70 * KiB, 0x32));
      await blk.flush();
      fs.copyFileSync(file(name), file('crashed.qcow2'));
      await blk.close();
      const broken = run('qemu-img', ['check', 'crashed.qcow2']);
      expect(broken.status).toBe(2);
      expect(JSON.parse(qemuImg('info', '--output=json', 'crashed.qcow2'))['dirty-flag']).toBe(true);
      const { blk: again } = await open('crashed.qcow2');
      await again.close();
      checkClean('crashed.qcow2');
      expect(JSON.parse(qemuImg('info', '--output=json', 'crashed.qcow2'))['dirty-flag']).toBe(false);
      expect(qemuRaw('crashed.qcow2').equals(qemuRaw(name))).toBe(true);
    });

    it('clears unknown autoclear bits at a writable open; persistent bitmaps stay consistent through writes', async () => {
      qemuImg('create', '-f', 'qcow2', 'ac.qcow2', '1M');
      qemuImg('bitmap', '--add', 'ac.qcow2', 'b0');
      const autoclear = () => fs.readFileSync(file('ac.qcow2')).readBigUInt64BE(88);
      const fd = fs.openSync(file('ac.qcow2'), 'r+');
      fs.writeSync(fd, Buffer.from([0, 0, 0, 0, 0, 0, 0x02, 0x01]), 0, 8, 88);
      fs.closeSync(fd);
      const first = await open('ac.qcow2');
      await first.blk.close();
      expect(autoclear()).toBe(1n);
      const second = await open('ac.qcow2');
      await second.blk.pwrite(0, Buffer.alloc(512, 1));
      await second.blk.close();
      // Bitmaps are kept up to date (block/dirty-bitmap.ts), so the bitmaps bit stays set.
      expect(autoclear()).toBe(1n);
      const info = run('qemu-img', ['info', '--output=json', 'ac.qcow2']);
      expect(info.stderr).toBe('');
      expect(JSON.parse(info.stdout)['format-specific'].data.bitmaps).toEqual([{ flags: ['auto'], name: 'b0', granularity: 65536 }]);
    });

    it('info and format-specific info equal qemu-img info', async () => {
      qemuImg('create', '-f', 'qcow2', '-o', 'compat=0.10', 'i2.qcow2', '1M');
      qemuImg('create', '-f', 'qcow2', '-o', 'lazy_refcounts=on,refcount_bits=8', 'i3.qcow2', '3M');
      qemuImg('create', '-f', 'qcow2', '-b', 'i3.qcow2', '-F', 'qcow2', 'i4.qcow2');
      for (const name of ['i2.qcow2', 'i3.qcow2', 'i4.qcow2']) {
        const theirs = JSON.parse(qemuImg('info', '--output=json', name));
        const { node } = await open(name, { readOnly: true });
        const ours = await queryImageInfo(node);
        expect({ ...ours, filename: name, 'full-backing-filename': theirs['full-backing-filename'] }).toEqual(theirs);
        expect(Object.keys(ours['format-specific']!.data)).toEqual(Object.keys(theirs['format-specific'].data));
      }
    });

    it('grows and shrinks an image (resize) as qemu-img resize does', async () => {
      qemuImg('create', '-f', 'qcow2', '-o', 'cluster_size=4096', 'rs-theirs.qcow2', '1M');
      qemuIo('rs-theirs.qcow2', ['write -P 1 0 100k']);
      fs.copyFileSync(file('rs-theirs.qcow2'), file('rs-ours.qcow2'));
      qemuImg('resize', 'rs-theirs.qcow2', '300M');
      const resize = async (bytes: number) => {
        const { graph, node, blk } = await open('rs-ours.qcow2');
        const resizer = new BlockBackend(graph, node, { resizable: true });
        try {
          await resizer.truncate(bytes);
        } finally {
          await resizer.close();
          await blk.close();
        }
      };
      await resize(300 * MiB);
      checkClean('rs-ours.qcow2');
      expect(fs.readFileSync(file('rs-ours.qcow2')).equals(fs.readFileSync(file('rs-theirs.qcow2')))).toBe(true);
      qemuImg('resize', '-q', '--shrink', 'rs-theirs.qcow2', '64k');
      await resize(64 * 1024);
      checkClean('rs-ours.qcow2');
      expect(qemuImg('compare', 'rs-ours.qcow2', 'rs-theirs.qcow2')).toBe('Images are identical.\n');
      expect(qemuImg('info', '--output=json', 'rs-ours.qcow2').replace(/"(filename|actual-size)": [^,]+,/g, '')).toBe(
        qemuImg('info', '--output=json', 'rs-theirs.qcow2').replace(/"(filename|actual-size)": [^,]+,/g, ''),
      );
    });
  });
});
