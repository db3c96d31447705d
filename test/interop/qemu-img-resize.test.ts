/*
 * qemu-img-ts resize against the real qemu-img 7.2 on identical copies of
 * the same images (test/helpers/image-pair.ts):
 *   - stdout, stderr and the exit status are equal (errors included:
 *     arguments, sizes, --shrink, preallocation, v2 images with snapshots,
 *     zeroing past a longer backing file on v2; preallocation the file
 *     cannot take, under a file size limit);
 *   - the resized images are the same to qemu-img: info JSON (without
 *     actual-size), map, check (clean for qcow2), and `qemu-img compare`
 *     finds them identical; cases marked `bytes` are byte-identical files
 *     (QEMU's layout: L1 growth, preallocation, shrink).
 * Where QEMU leaves different dead bytes (freed clusters it wrote or punched
 * differently), only the user-visible facts are compared.
 *
 * Build first (npm run build): ours runs from dist/.
 */
import { describe, expect, it } from 'vitest';
import { compareResults, imageFacts, preparePair, sameBytes } from '../helpers/image-pair.js';
import { missingPeers } from '../helpers/peers.js';
import { oursCommand, run } from '../helpers/run.js';
import { runBoth } from '../helpers/side-by-side.js';
import { scratchDir } from '../helpers/tmp.js';

interface Case {
  setup: string;
  args: string[];
  /** The image the command changes, compared afterwards. */
  file: string;
  /** The files must be byte-identical too. */
  bytes?: boolean;
}

const RAW = 'qemu-img create -q -f raw r.raw 1M';
const QCOW2 =
  'qemu-img create -q -f qcow2 q.qcow2 64M; ' +
  'qemu-io -c "write -P 1 0 1M" -c "write -P 2 40M 1M" -c "write -z 50M 64k" -c "write -P 3 63M 1M" q.qcow2';
const SPARSE_4G = 'qemu-img create -q -f qcow2 q.qcow2 4G; qemu-io -c "write -P 1 0 1M" -c "write -P 2 3G 1M" -c "write -z 2G 64k" q.qcow2';
const SMALL_CLUSTERS =
  'qemu-img create -q -f qcow2 -o cluster_size=512,refcount_bits=64 q.qcow2 64M; ' +
  'qemu-io -c "write -P 1 0 1M" -c "write -P 2 30M 4M" -c "write -P 3 60M 2M" q.qcow2';
const BASE = 'qemu-img create -q -f qcow2 base.qcow2 64M; qemu-io -c "write -P 9 0 64M" base.qcow2';
const overlay = (opts: string, size: string) =>
  `${BASE}; qemu-img create -q -f qcow2 -o ${opts} -b base.qcow2 -F qcow2 q.qcow2 ${size}; qemu-io -c "write -P 1 0 64k" q.qcow2`;
const SNAPSHOT_V3 =
  'qemu-img create -q -f qcow2 q.qcow2 64M; qemu-io -c "write -P 1 0 2M" -c "write -P 2 40M 1M" q.qcow2; ' +
  'qemu-img snapshot -c s1 q.qcow2; qemu-io -c "write -P 3 40M 64k" -c "write -P 4 60M 1M" q.qcow2';
const SNAPSHOT_V2 = 'qemu-img create -q -f qcow2 -o compat=0.10 q.qcow2 64M; qemu-io -c "write -P 1 0 2M" q.qcow2; qemu-img snapshot -c s1 q.qcow2';
const COMPRESSED = 'qemu-img create -q -f qcow2 q.qcow2 64M; qemu-io -c "write -c -P 1 0 2M" -c "write -c -P 2 40M 1M" q.qcow2';
const DIRTY = 'qemu-img create -q -f qcow2 -o lazy_refcounts=on q.qcow2 64M; qemu-io -c "write -P 1 0 2M" -c "write -P 2 40M 1M" -c abort q.qcow2 || true';

const raw = (...args: string[]): Case => ({ setup: RAW, args: ['resize', ...args], file: 'r.raw' });
const on = (setup: string, bytes: boolean, ...args: string[]): Case => ({ setup, args: ['resize', ...args], file: 'q.qcow2', bytes });

const CASES: Case[] = [
  raw('r.raw', '2M'),
  raw('-f', 'raw', 'r.raw', '2M'),
  raw('-f', 'raw', 'r.raw', '512k'),
  raw('-f', 'raw', 'r.raw', '-512k'),
  raw('-f', 'raw', '--shrink', 'r.raw', '-512k'),
  raw('--shrink', '-f', 'raw', 'r.raw', '1k'),
  raw('--shr', '-f', 'raw', 'r.raw', '1k'),
  raw('-f', 'raw', 'r.raw', '-10M'),
  raw('-f', 'raw', 'r.raw', '0'),
  raw('-f', 'raw', 'r.raw', '+0'),
  raw('-f', 'raw', 'r.raw', 'abc'),
  raw('-f', 'raw', 'r.raw', '1.5k'),
  raw('-f', 'raw', 'r.raw', '3000001'),
  raw('-f', 'raw', 'r.raw', '9E'),
  raw('-f', 'raw', 'r.raw', '20000000000000000000'),
  raw('-f', 'raw', 'r.raw', '0x10k'),
  raw('-f', 'raw', '--preallocation=full', 'r.raw', '1M'),
  raw('-f', 'raw', '--preallocation=foo', 'r.raw', '4M'),
  raw('-f', 'raw', '--preallocation=metadata', 'r.raw', '4M'),
  raw('-f', 'raw', '--preallocation=falloc', 'r.raw', '+1M'),
  raw('-f', 'raw', '--preallocation=full', 'r.raw', '+1M'),
  raw('-f', 'raw', '-q', 'r.raw', '6M'),
  raw('-f', 'raw', 'r.raw'),
  raw('r.raw'),
  raw('-f', 'raw'),
  raw('-f', 'raw', 'r.raw', '1M', 'extra'),
  raw('-f', 'raw', 'nonexist', '1M'),
  raw('-f', 'raw', 'r.raw', '--', '-1M'),
  raw('-x', 'r.raw', '2M'),
  raw('--image-opts', '-f', 'raw', 'r.raw', '2M'),
  raw('--image-opts', 'driver=raw,file.filename=r.raw', '2M'),
  raw('-f', 'qcow2', 'r.raw', '2M'),
  on(QCOW2, true, 'q.qcow2', '128M'),
  on(QCOW2, true, 'q.qcow2', '+1000'),
  on(QCOW2, true, 'q.qcow2', '10G'),
  on(QCOW2, true, 'q.qcow2', '1P'),
  on(QCOW2, true, 'q.qcow2', '4P'),
  on(QCOW2, true, '--preallocation=off', 'q.qcow2', '+1M'),
  on(QCOW2, true, '--preallocation=metadata', 'q.qcow2', '+1M'),
  on(QCOW2, true, '--preallocation=metadata', 'q.qcow2', '5G'),
  on(QCOW2, true, '--preallocation=falloc', 'q.qcow2', '+1M'),
  on(QCOW2, true, '--preallocation=falloc', 'q.qcow2', '1G'),
  on(QCOW2, true, '--preallocation=full', 'q.qcow2', '+3M'),
  on(QCOW2, true, 'q.qcow2', '32M'),
  on(QCOW2, true, '--shrink', 'q.qcow2', '1M'),
  on(QCOW2, true, '--shrink', 'q.qcow2', '41M'),
  on(QCOW2, true, '--shrink', 'q.qcow2', '40000k'),
  on(QCOW2, true, '--shrink', 'q.qcow2', '1000'),
  on(QCOW2, true, '--shrink', '--preallocation=full', 'q.qcow2', '1M'),
  on(SPARSE_4G, true, '--shrink', 'q.qcow2', '1G'),
  on(SPARSE_4G, true, '--shrink', 'q.qcow2', '2G'),
  on(SPARSE_4G, false, '--shrink', 'q.qcow2', '1025M'),
  on(SMALL_CLUSTERS, false, '--shrink', 'q.qcow2', '1M'),
  on(SMALL_CLUSTERS, false, '--shrink', 'q.qcow2', '31M'),
  on(SMALL_CLUSTERS, true, 'q.qcow2', '100M'),
  ...['compat=1.1', 'compat=0.10', 'compat=1.1,cluster_size=4k'].flatMap((opts) =>
    [['q.qcow2', '48M'], ['--preallocation=metadata', 'q.qcow2', '48M'], ['--preallocation=falloc', 'q.qcow2', '48M'], ['q.qcow2', '+512'], ['--shrink', 'q.qcow2', '16M']].map(
      (args) => on(overlay(opts, opts.includes('4k') ? '1000K' : '32M'), true, ...args),
    ),
  ),
  on(overlay('compat=1.1', '32700K'), true, 'q.qcow2', '48M'),
  on(overlay('compat=1.1', '70M'), true, 'q.qcow2', '80M'),
  on(SNAPSHOT_V3, true, 'q.qcow2', '128M'),
  on(SNAPSHOT_V3, true, '--shrink', 'q.qcow2', '40M'),
  on(SNAPSHOT_V3, true, '--shrink', 'q.qcow2', '1M'),
  on(SNAPSHOT_V3, true, '--preallocation=full', 'q.qcow2', '70M'),
  on(SNAPSHOT_V2, true, 'q.qcow2', '128M'),
  on(SNAPSHOT_V2, true, '--shrink', 'q.qcow2', '1M'),
  on(COMPRESSED, true, 'q.qcow2', '128M'),
  on(COMPRESSED, true, '--shrink', 'q.qcow2', '40M'),
  on(COMPRESSED, true, '--shrink', 'q.qcow2', '1M'),
  on(DIRTY, true, '--shrink', 'q.qcow2', '1M'),
  on(DIRTY, true, 'q.qcow2', '128M'),
];

describe.skipIf(missingPeers('qemu-img', 'qemu-io'))('qemu-img-ts resize against qemu-img 7.2', () => {
  const root = scratchDir('qbt-resize-');

  for (const c of CASES) {
    it(`${c.args.slice(1).join(' ')}  [${c.setup.slice(0, 60)}]`, async () => {
      const dirs = preparePair(root, { setup: c.setup });
      const { theirs, ours } = await runBoth(c.args, dirs);
      expect(ours).toEqual(theirs);
      const facts = imageFacts(dirs.ours, c.file);
      expect(facts).toEqual(imageFacts(dirs.theirs, c.file));
      if (c.file.endsWith('.qcow2')) expect(facts.check.code, facts.check.stdout + facts.check.stderr).toBe(0);
      expect(compareResults(dirs, c.file)).toEqual({ stdout: 'Images are identical.\n', stderr: '', code: 0 });
      if (c.bytes) expect(sameBytes(dirs, c.file)).toBe(true);
    }, 60_000);
  }

  it('preallocation the file cannot take (a file size limit): the file\'s words after "Failed to resize underlying file:"', async () => {
    // ulimit -f makes growing the file fail with EFBIG (SIGXFSZ ignored), as a full disk fails it with ENOSPC.
    const dirs = preparePair(root, { setup: 'qemu-img create -q -f qcow2 q.qcow2 64M; qemu-io -c "write -P 1 0 900k" q.qcow2' });
    const limited = (argv: string[], cwd: string) => run('bash', ['-c', 'trap "" XFSZ; ulimit -f 2048; exec "$@"', 'bash', ...argv], { cwd });
    // Twice: the first failure must give its data clusters back, or the second finds them taken.
    for (const prealloc of ['full', 'falloc']) {
      const args = ['resize', `--preallocation=${prealloc}`, 'q.qcow2', '+4M'];
      const theirs = await limited(['qemu-img', ...args], dirs.theirs);
      const ours = await limited([...oursCommand('qemu-img-ts'), ...args], dirs.ours);
      expect(theirs.stderr).toContain('Failed to resize underlying file: ');
      expect({ code: ours.code, stdout: ours.stdout, stderr: ours.stderr }).toEqual({ code: theirs.code, stdout: theirs.stdout, stderr: theirs.stderr });
      expect(imageFacts(dirs.ours, 'q.qcow2')).toEqual(imageFacts(dirs.theirs, 'q.qcow2'));
    }
  }, 60_000);
});
