/*
 * qemu-img-ts commit against qemu-img 7.2 on the same chains: raw and qcow2
 * bases, qcow2 overlays of several cluster sizes and both compat levels,
 * two and three images deep, sparse data with zero and discarded clusters,
 * bases smaller than the top, internal snapshots, odd sizes, relative names
 * in subdirectories. Each case compares the messages and exit status, then
 * every image of the chain (map, info, check, content; see
 * test/helpers/chain-cases.ts). Error cases compare messages and status.
 * The rate limit is timed on ours alone.
 *
 * Build first (npm run build): the tests run dist/.
 */
import { execFileSync } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { describe, expect, it } from 'vitest';
import { runChainCase, type ChainCase } from '../helpers/chain-cases.js';
import { missingPeers } from '../helpers/peers.js';
import { runOurs } from '../helpers/run.js';
import { scratchDir } from '../helpers/tmp.js';

const root = scratchDir('qbt-commit-');
let caseNumber = 0;

function compare(name: string, c: ChainCase): void {
  it(name, () => runChainCase(path.join(root, String(++caseNumber)), c));
}

/** qemu-io commands on one image (`write -P n`, `write -z`, `discard`). */
const io = (file: string, fmt: string, ...cmds: string[]) => `qemu-io -f ${fmt} ${cmds.map((c) => `-c '${c}'`).join(' ')} ${file} >/dev/null`;
const create = (args: string) => `qemu-img create -q ${args}`;

const CHAIN = {
  /** raw base ← qcow2 top. */
  rawTop: [
    create('-f raw base.raw 4M'),
    io('base.raw', 'raw', 'write -P 1 0 1M', 'write -P 2 2M 64k'),
    create('-f qcow2 -b base.raw -F raw top.qcow2'),
    io('top.qcow2', 'qcow2', 'write -P 3 4k 4k', 'write -P 4 1536k 4k', 'write -z 2M 64k', 'write -P 5 3M 512', 'discard 512k 64k'),
  ].join(' && '),
  /** qcow2 base (4 KiB clusters) ← qcow2 mid ← qcow2 top (16 KiB clusters), growing sizes. */
  three: [
    create('-f qcow2 -o cluster_size=4096 base.qcow2 3M'),
    io('base.qcow2', 'qcow2', 'write -P 1 0 1M', 'write -P 2 2M 100k'),
    create('-f qcow2 -b base.qcow2 -F qcow2 mid.qcow2 4M'),
    io('mid.qcow2', 'qcow2', 'write -P 3 8k 4k', 'write -z 512k 128k', 'write -P 4 3M 4k'),
    create('-f qcow2 -o cluster_size=16k -b mid.qcow2 -F qcow2 top.qcow2 5M'),
    io('top.qcow2', 'qcow2', 'write -P 5 100k 4k', 'write -P 6 4M 1k', 'discard 0 64k', 'write -z 2M 32k'),
  ].join(' && '),
  /** raw base (1 MiB) ← qcow2 mid ← qcow2 top (3 MiB): the base grows. */
  smallBase: [
    create('-f raw base.raw 1M'),
    io('base.raw', 'raw', 'write -P 1 0 300k', 'write -P 2 700k 100k'),
    create('-f qcow2 -b base.raw -F raw mid.qcow2 2M'),
    io('mid.qcow2', 'qcow2', 'write -P 7 900k 200k'),
    create('-f qcow2 -b mid.qcow2 -F qcow2 top.qcow2 3M'),
    io('top.qcow2', 'qcow2', 'write -P 3 4k 4k', 'write -z 600k 200k', 'write -P 4 1M 4k', 'write -P 6 3008k 64k'),
  ].join(' && '),
  /** compat=0.10 images, 2 GiB, sparse (the top is emptied by discarding). */
  v2: [
    create('-f qcow2 -o compat=0.10 base.qcow2 2G'),
    io('base.qcow2', 'qcow2', 'write -P 1 0 1M'),
    create('-f qcow2 -o compat=0.10 -b base.qcow2 -F qcow2 top.qcow2'),
    io('top.qcow2', 'qcow2', 'write -P 3 4k 4k', 'write -P 4 1G 128k', 'write -P 5 1800M 64k'),
  ].join(' && '),
  /** A top with an internal snapshot (emptied by discarding; the snapshot stays). */
  snapshot: [
    create('-f qcow2 base.qcow2 64M'),
    io('base.qcow2', 'qcow2', 'write -P 1 0 1M'),
    create('-f qcow2 -b base.qcow2 -F qcow2 top.qcow2'),
    io('top.qcow2', 'qcow2', 'write -P 3 4k 4k', 'write -P 4 10M 128k'),
    'qemu-img snapshot -c s1 top.qcow2',
    io('top.qcow2', 'qcow2', 'write -P 5 0 64k', 'write -P 6 20M 64k'),
  ].join(' && '),
  /** 2 MiB clusters under 512-byte clusters: zero granules the base cannot zero alone are copied. */
  clusters: [
    create('-f qcow2 -o cluster_size=2M base.qcow2 8M'),
    io('base.qcow2', 'qcow2', 'write -P 1 0 3M'),
    create('-f qcow2 -o cluster_size=512 -b base.qcow2 -F qcow2 top.qcow2'),
    io('top.qcow2', 'qcow2', 'write -P 3 4k 512', 'write -z 1M 1M', 'write -P 4 5M 4k'),
  ].join(' && '),
  odd: [
    create('-f raw base.raw 100000'),
    io('base.raw', 'raw', 'write -P 1 0 50000'),
    create('-f qcow2 -b base.raw -F raw top.qcow2 300000'),
    io('top.qcow2', 'qcow2', 'write -P 3 40960 512', 'write -P 4 250000 1000'),
  ].join(' && '),
  empty: [create('-f raw base.raw 1M'), create('-f qcow2 -b base.raw -F raw top.qcow2')].join(' && '),
  zeroLength: [create('-f raw base.raw 0'), create('-f qcow2 -b base.raw -F raw top.qcow2 0')].join(' && '),
  lazy: [
    create('-f qcow2 base.qcow2 4M'),
    create('-f qcow2 -o lazy_refcounts=on -b base.qcow2 -F qcow2 top.qcow2'),
    io('top.qcow2', 'qcow2', 'write -P 3 4k 4k', 'write -P 4 3M 64k'),
  ].join(' && '),
  single: create('-f qcow2 a.qcow2 1M'),
};

describe.skipIf(missingPeers('qemu-img', 'qemu-io'))('qemu-img-ts commit vs qemu-img 7.2', () => {
  const RAW_TOP = ['base.raw', 'top.qcow2'];
  const THREE = ['base.qcow2', 'mid.qcow2', 'top.qcow2'];

  describe.concurrent('raw base, qcow2 top', () => {
    compare('commit', { setup: CHAIN.rawTop, args: ['commit', 'top.qcow2'], files: RAW_TOP });
    compare('commit -d', { setup: CHAIN.rawTop, args: ['commit', '-d', 'top.qcow2'], files: RAW_TOP });
    compare('commit -q', { setup: CHAIN.rawTop, args: ['commit', '-q', 'top.qcow2'], files: RAW_TOP });
    compare('commit -p', { setup: CHAIN.rawTop, args: ['commit', '-p', 'top.qcow2'], files: RAW_TOP });
    compare('commit -t none', { setup: CHAIN.rawTop, args: ['commit', '-t', 'none', 'top.qcow2'], files: RAW_TOP });
    compare('commit -t unsafe -r 100M', { setup: CHAIN.rawTop, args: ['commit', '-t', 'unsafe', '-r', '100M', 'top.qcow2'], files: RAW_TOP });
    compare('commit -f qcow2', { setup: CHAIN.rawTop, args: ['commit', '-f', 'qcow2', 'top.qcow2'], files: RAW_TOP });
    compare('commit --image-opts', { setup: CHAIN.rawTop, args: ['commit', '--image-opts', 'driver=qcow2,file.filename=top.qcow2'], files: RAW_TOP });
    compare('commit json:', { setup: CHAIN.rawTop, args: ['commit', 'json:{"driver":"qcow2","file":{"driver":"file","filename":"top.qcow2"}}'], files: RAW_TOP });
  });

  describe.concurrent('three qcow2 images', () => {
    compare('commit top', { setup: CHAIN.three, args: ['commit', 'top.qcow2'], files: THREE });
    compare('commit -d top', { setup: CHAIN.three, args: ['commit', '-d', 'top.qcow2'], files: THREE });
    compare('commit -b base top', { setup: CHAIN.three, args: ['commit', '-b', 'base.qcow2', 'top.qcow2'], files: THREE });
    compare('commit -b ./base top', { setup: CHAIN.three, args: ['commit', '-b', './base.qcow2', 'top.qcow2'], files: THREE });
    compare('commit -b absolute base top', { setup: CHAIN.three, args: ['commit', '-b', '@DIR@/base.qcow2', 'top.qcow2'], files: THREE });
    compare('commit -b mid top', { setup: CHAIN.three, args: ['commit', '-b', 'mid.qcow2', 'top.qcow2'], files: THREE });
    compare('commit mid', { setup: CHAIN.three, args: ['commit', 'mid.qcow2'], files: THREE });
    compare('commit --image-opts with backing options', {
      setup: CHAIN.three,
      args: ['commit', '--image-opts', 'driver=qcow2,file.filename=top.qcow2,backing.driver=qcow2,backing.file.filename=mid.qcow2'],
      files: THREE,
    });
  });

  describe.concurrent('other chains', () => {
    compare('base smaller than the top grows', { setup: CHAIN.smallBase, args: ['commit', 'top.qcow2'], files: ['base.raw', 'mid.qcow2', 'top.qcow2'] });
    compare('-b raw base two below', { setup: CHAIN.smallBase, args: ['commit', '-b', 'base.raw', 'top.qcow2'], files: ['base.raw', 'mid.qcow2', 'top.qcow2'] });
    compare('compat=0.10', { setup: CHAIN.v2, args: ['commit', 'top.qcow2'], files: ['base.qcow2', 'top.qcow2'] });
    compare('top with a snapshot', { setup: CHAIN.snapshot, args: ['commit', 'top.qcow2'], files: ['base.qcow2', 'top.qcow2'] });
    compare('2 MiB clusters under 512-byte clusters', { setup: CHAIN.clusters, args: ['commit', 'top.qcow2'], files: ['base.qcow2', 'top.qcow2'] });
    compare('odd sizes', { setup: CHAIN.odd, args: ['commit', 'top.qcow2'], files: ['base.raw', 'top.qcow2'] });
    compare('empty top', { setup: CHAIN.empty, args: ['commit', 'top.qcow2'], files: ['base.raw', 'top.qcow2'] });
    compare('zero-length images', { setup: CHAIN.zeroLength, args: ['commit', 'top.qcow2'], files: ['base.raw', 'top.qcow2'] });
    compare('lazy refcounts', { setup: CHAIN.lazy, args: ['commit', 'top.qcow2'], files: ['base.qcow2', 'top.qcow2'] });
    compare('relative names in a subdirectory', {
      setup: `mkdir sub && cd sub && ${CHAIN.three}`,
      args: ['commit', '-b', 'base.qcow2', 'sub/top.qcow2'],
      files: ['sub/base.qcow2', 'sub/mid.qcow2', 'sub/top.qcow2'],
    });
  });

  describe.concurrent('errors', () => {
    const e = (name: string, setup: string, args: string[]) => compare(name, { setup, args });
    e('no backing file', CHAIN.single, ['commit', 'a.qcow2']);
    e('-b not in the chain', CHAIN.single, ['commit', '-b', 'x', 'a.qcow2']);
    e('-b the image itself', CHAIN.three, ['commit', '-b', 'top.qcow2', 'top.qcow2']);
    e('-b relative to the wrong directory', `mkdir sub && cd sub && ${CHAIN.three}`, ['commit', '-b', 'sub/base.qcow2', 'sub/top.qcow2']);
    e('bad -r', CHAIN.three, ['commit', '-r', '1x', 'top.qcow2']);
    e('negative -r', CHAIN.three, ['commit', '-r', '-1', 'top.qcow2']);
    e('bad -t', CHAIN.three, ['commit', '-t', 'foo', 'top.qcow2']);
    e('no file name', CHAIN.single, ['commit']);
    e('two file names', CHAIN.single, ['commit', 'a.qcow2', 'b.qcow2']);
    e('unknown option', CHAIN.single, ['commit', '-z', 'a.qcow2']);
    e('--format is not an option', CHAIN.single, ['commit', '--format', 'qcow2', 'a.qcow2']);
    e('missing argument', CHAIN.single, ['commit', 'a.qcow2', '-b']);
    e('raw image', create('-f raw r.raw 1M'), ['commit', '-f', 'raw', 'r.raw']);
    e('probed raw image', create('-f raw r.raw 1M'), ['commit', 'r.raw']);
    e('missing image', CHAIN.single, ['commit', 'nonexist.qcow2']);
    e('--image-opts with -f', CHAIN.single, ['commit', '--image-opts', '-f', 'qcow2', 'file.filename=a.qcow2']);
  });

  it('honours -r (bytes per second)', async () => {
    const dir = path.join(root, 'rate');
    fs.mkdirSync(dir);
    execFileSync('bash', ['-euc', [create('-f raw base.raw 8M'), create('-f qcow2 -b base.raw -F raw top.qcow2'), io('top.qcow2', 'qcow2', 'write -P 5 0 3M')].join(' && ')], { cwd: dir });
    const started = performance.now();
    const r = await runOurs('qemu-img-ts', ['commit', '-r', '1M', 'top.qcow2'], { cwd: dir });
    const seconds = (performance.now() - started) / 1000;
    expect(r).toMatchObject({ code: 0, stdout: 'Image committed.\n' });
    // Three 1 MiB pieces at 1 MiB/s: each is paid for after it goes out.
    expect(seconds).toBeGreaterThan(2.5);
    expect(seconds).toBeLessThan(15);
  });
});
