/*
 * qemu-img-ts amend against the real qemu-img 7.2 on identical copies of
 * the same images (test/helpers/image-pair.ts):
 *   - stdout, stderr and the exit status are equal: `-o help` listings,
 *     argument and option errors (unknown options, create-only options with
 *     their hint, bad values, the backing file, data files, encryption,
 *     compat/lazy_refcounts/refcount_bits conflicts, snapshots that prevent
 *     a downgrade, refcounts too large for a narrower width), raw images;
 *   - the amended images are the same to qemu-img (info JSON without
 *     actual-size, map, check, compare) and byte-identical files: compat
 *     up and down (zero clusters expanded, with and without a backing file,
 *     snapshots, snapshot entries too short for v3 completed), every
 *     refcount width from every width, lazy refcounts on dirty images, size.
 * `-p` prints progress only on a terminal here (QEMU prints it into pipes
 * too), so stdout is compared without QEMU's progress.
 *
 * A refcount width change on a file whose writes fail (blkdebug) prints
 * the failed step and the close's reports as qemu-img does.
 *
 * One deviation is on purpose: downgrading an image whose preallocated
 * zero cluster is shared with a snapshot, QEMU 7.2 writes zeroes into the
 * snapshot's data and leaves a COPIED error; ours keeps the snapshot and
 * checks clean (the last test).
 *
 * Persistent bitmaps are kept intact but not rewritten here: where QEMU
 * rewrites them on close (a different layout) or leaves them leaked after a
 * downgrade to v2, only the user-visible facts are compared, and our image
 * must check clean.
 *
 * Build first (npm run build): ours runs from dist/.
 */
import { execFileSync, spawnSync } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { describe, expect, it } from 'vitest';
import { compareResults, imageFacts, preparePair, sameBytes } from '../helpers/image-pair.js';
import { missingPeers } from '../helpers/peers.js';
import { runBoth, withoutProgress } from '../helpers/side-by-side.js';
import { scratchDir } from '../helpers/tmp.js';

interface Case {
  setup: string;
  args: string[];
  file: string;
  /** Edits the setup cannot make with the tools (run before the copy). */
  after?: (dir: string) => void;
  /** QEMU rewrites or leaks persistent bitmaps: compare what users see, not the layout. */
  bitmaps?: boolean;
}

const EMPTY = 'qemu-img create -q -f qcow2 a.qcow2 64M; qemu-img create -q -f raw r.raw 1M';
const WRITES = 'qemu-io -c "write -P 1 0 1M" -c "write -z 1M 1M" -c "write -z 8M 64k" -c "write -P 2 8M 4k" -c "write -P 3 40M 3M" -c "discard 41M 64k"';
const withData = (opts: string) => `qemu-img create -q -f qcow2 ${opts} a.qcow2 64M; ${WRITES} a.qcow2`;
const SNAPSHOT_V3 = `${withData('')}; qemu-img snapshot -c s1 a.qcow2; qemu-io -c "write -P 4 40M 64k" -c "write -z 0 64k" a.qcow2`;
const SNAPSHOT_V2 = 'qemu-img create -q -f qcow2 -o compat=0.10 a.qcow2 64M; qemu-io -c "write -P 1 0 1M" a.qcow2; qemu-img snapshot -c s1 a.qcow2; qemu-img snapshot -c s2 a.qcow2';
const BACKED =
  'qemu-img create -q -f qcow2 base.qcow2 64M; qemu-io -c "write -P 9 0 64M" base.qcow2; ' +
  `qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 a.qcow2; ${WRITES} a.qcow2`;
const COMPRESSED = 'qemu-img create -q -f qcow2 a.qcow2 64M; qemu-io -c "write -c -P 1 0 2M" -c "write -z 4M 1M" a.qcow2';
const DIRTY = 'qemu-img create -q -f qcow2 -o lazy_refcounts=on a.qcow2 64M; qemu-io -c "write -P 1 0 1M" -c abort a.qcow2 || true';
const BITMAPS = 'qemu-img create -q -f qcow2 a.qcow2 64M; qemu-io -c "write -P 1 0 1M" a.qcow2; qemu-img bitmap --add a.qcow2 bm0; qemu-img bitmap --add -g 4k a.qcow2 bm1';

const on = (setup: string, ...args: string[]): Case => ({ setup, args: ['amend', ...args], file: 'a.qcow2' });

const ERRORS: Case[] = [
  ['-f', 'qcow2', '-o', 'help'],
  ['-o', 'help', 'a.qcow2'],
  ['-o', 'help,compat=1.1', 'a.qcow2'],
  ['-o', '?', 'a.qcow2'],
  ['-f', 'raw', '-o', 'help'],
  ['-o', 'help', '-f', 'foo'],
  ['a.qcow2'],
  ['-o'],
  ['-x', 'a.qcow2'],
  ['-o', '', 'a.qcow2'],
  ['-o', ',compat=1.1', 'a.qcow2'],
  ['-o', 'compat=1.1', 'a.qcow2', 'b.qcow2'],
  ['-o', 'compat=1.1', '-t', 'foo', 'a.qcow2'],
  ['-o', 'compat=1.1', '-f', 'raw', 'a.qcow2'],
  ['-o', 'compat=1.1', 'nonexist'],
  ['-o', 'size=2M', 'r.raw'],
  ['-o', 'cluster_size=4k', 'a.qcow2'],
  ['-o', 'cluster_size=abc', 'a.qcow2'],
  ['-o', 'encryption=on', 'a.qcow2'],
  ['-o', 'preallocation=full', 'a.qcow2'],
  ['-o', 'foo=1', 'a.qcow2'],
  ['-o', 'backing_file=x', 'a.qcow2'],
  ['-o', 'compat=0.9', 'a.qcow2'],
  ['-o', 'refcount_bits=3', 'a.qcow2'],
  ['-o', 'refcount_bits=0', 'a.qcow2'],
  ['-o', 'refcount_bits=128', 'a.qcow2'],
  ['-o', 'refcount_bits=abc', 'a.qcow2'],
  ['-o', 'refcount_bits=3,compat=0.9', 'a.qcow2'],
  ['-o', 'lazy_refcounts=maybe', 'a.qcow2'],
  ['-o', 'size=1000', 'a.qcow2'],
  ['-o', 'size=-1', 'a.qcow2'],
  ['-o', 'size=1E', 'a.qcow2'],
  ['-o', 'data_file=x', 'a.qcow2'],
  ['-o', 'data_file=', 'a.qcow2'],
  ['-o', 'data_file_raw=on', 'a.qcow2'],
  ['-o', 'encrypt.state=active', 'a.qcow2'],
  ['-o', 'compat=0.10,lazy_refcounts=on', 'a.qcow2'],
  ['-o', 'compat=0.10,refcount_bits=8', 'a.qcow2'],
].map((args) => on(EMPTY, ...args));

const CHANGES: Case[] = [
  ...[
    ['-o', 'compat=1.1,compat=0.10'],
    ['-o', 'compat=v3'],
    ['-o', 'compat=1.1', '-o', 'lazy_refcounts=on'],
    ['-o', 'id=foo,compat=1.1'],
    ['-o', 'size=0'],
    ['-o', 'size=32M'],
    ['-o', 'size=128M'],
    ['-o', 'data_file_raw=off'],
    ['--force', '-o', 'compat=1.1'],
    ['-o', 'compat=1.1', '--image-opts', 'driver=qcow2,file.filename=a.qcow2'],
    ['-q', '-o', 'compat=0.10'],
    ['-o', 'compat=0.10', '-f', 'qcow2'],
    ['-o', 'lazy_refcounts=off'],
    ['-o', 'refcount_bits=8,compat=0.10'],
  ].map((args) => on(EMPTY, ...args, ...(args.includes('--image-opts') ? [] : ['a.qcow2']))),
  ...['', '-o cluster_size=4k', '-o cluster_size=512', '-o refcount_bits=1', '-o refcount_bits=64', '-o compat=0.10'].flatMap((opts) =>
    [
      'compat=0.10',
      'compat=1.1',
      'refcount_bits=1',
      'refcount_bits=2',
      'refcount_bits=4',
      'refcount_bits=8',
      'refcount_bits=16',
      'refcount_bits=32',
      'refcount_bits=64',
      'lazy_refcounts=on',
      'compat=1.1,refcount_bits=8,lazy_refcounts=on',
      'compat=0.10,size=32M',
      'size=200M,refcount_bits=2',
    ].map((o) => on(opts === '-o compat=0.10' ? 'qemu-img create -q -f qcow2 -o compat=0.10 a.qcow2 64M; qemu-io -c "write -P 1 0 1M" a.qcow2' : withData(opts), '-o', o, 'a.qcow2')),
  ),
  ...[SNAPSHOT_V3, SNAPSHOT_V2, BACKED, COMPRESSED, DIRTY].flatMap((setup) =>
    ['compat=0.10', 'compat=1.1', 'refcount_bits=1', 'refcount_bits=64', 'lazy_refcounts=off', 'compat=0.10,size=32M', 'size=32M', 'size=128M']
      // QEMU corrupts this one (see the last test).
      .filter((o) => !(setup === SNAPSHOT_V3 && o === 'compat=0.10'))
      .map((o) => on(setup, '-o', o, 'a.qcow2')),
  ),
  { ...on(SNAPSHOT_V2, '-o', 'compat=1.1', 'a.qcow2'), after: (dir) => stripSnapshotExtraData(path.join(dir, 'a.qcow2')) },
  { ...on(SNAPSHOT_V2, '-o', 'compat=1.1,size=128M', 'a.qcow2'), after: (dir) => stripSnapshotExtraData(path.join(dir, 'a.qcow2')) },
  on(withData(''), '-p', '-o', 'refcount_bits=8,compat=0.10', 'a.qcow2'),
  ...['compat=0.10', 'refcount_bits=8', 'lazy_refcounts=on'].map((o) => ({ ...on(BITMAPS, '-o', o, 'a.qcow2'), bitmaps: true })),
];

/** qemu-img's stdout without its -p output (a progress end alone leaves a newline ours does not print). */
function dropProgress(stdout: string): string {
  const text = withoutProgress(stdout);
  return text !== stdout && text === '\n' ? '' : text;
}

describe.skipIf(missingPeers('qemu-img', 'qemu-io'))('qemu-img-ts amend against qemu-img 7.2', () => {
  const root = scratchDir('qbt-amend-');

  for (const c of [...ERRORS, ...CHANGES]) {
    it(`${c.args.slice(1).join(' ')}  [${c.setup.slice(0, 60)}]`, async () => {
      const dirs = preparePair(root, { setup: c.setup, after: c.after });
      const { theirs, ours } = await runBoth(c.args, dirs);
      expect(ours).toEqual({ ...theirs, stdout: dropProgress(theirs.stdout) });
      const facts = imageFacts(dirs.ours, c.file);
      const theirFacts = imageFacts(dirs.theirs, c.file);
      expect(facts.check.code, facts.check.stdout + facts.check.stderr).toBe(0);
      const same = compareResults(dirs, c.file);
      expect({ stdout: same.stdout, code: same.code }).toEqual({ stdout: 'Images are identical.\n', code: 0 });
      if (c.bitmaps) {
        expect(facts.info).toEqual(theirFacts.info);
        expect(facts.map.stdout).toEqual(theirFacts.map.stdout);
        return;
      }
      expect(same.stderr).toBe('');
      expect(facts).toEqual(theirFacts);
      expect(sameBytes(dirs, c.file)).toBe(true);
    }, 60_000);
  }

  it('a refcount width change whose writes fail reports the failed step, then what the close could not write, as qemu-img', async () => {
    // blkdebug on the image's file: every request after the event fails (ENOSPC), or only the next one.
    const dirs = preparePair(root, { setup: withData(''), copy: true });
    for (const event of ['cluster_alloc', 'refblock_load']) {
      for (const once of ['off', 'on']) {
        for (const dir of [dirs.ours, dirs.theirs]) fs.copyFileSync(path.join(dir, 'a.qcow2'), path.join(dir, 'f.qcow2'));
        const rule = [`event=${event}`, 'errno=28', 'immediately=on', `once=${once}`].map((r) => `file.inject-error.0.${r}`);
        const opts = ['driver=qcow2', 'file.driver=blkdebug', 'file.image.filename=f.qcow2', ...rule].join(',');
        const { theirs, ours } = await runBoth(['amend', '-o', 'refcount_bits=1', '--image-opts', opts], dirs);
        expect(theirs.code, `${event} once=${once}`).toBe(1);
        expect(ours, `${event} once=${once}`).toEqual(theirs);
      }
    }
  }, 60_000);

  it('downgrading keeps the snapshot data a preallocated zero cluster shares (QEMU 7.2 zeroes it and leaves COPIED set)', async () => {
    const setup = `${SNAPSHOT_V3}; qemu-img create -q -f qcow2 base.qcow2 64M; cp a.qcow2 b.qcow2; qemu-img rebase -u -b base.qcow2 -F qcow2 b.qcow2`;
    const dirs = preparePair(root, { setup, copy: true });
    const snapshotOf = (dir: string, file: string) => {
      execFileSync('qemu-img', ['convert', '-l', 's1', '-O', 'raw', file, `${file}.s1.raw`], { cwd: dir });
      return path.join(dir, `${file}.s1.raw`);
    };
    for (const file of ['a.qcow2', 'b.qcow2']) {
      const before = snapshotOf(dirs.theirs, file);
      const { theirs, ours } = await runBoth(['amend', '-o', 'compat=0.10', file], dirs);
      expect(ours).toEqual(theirs);
      const facts = imageFacts(dirs.ours, file);
      expect(facts.check.code, facts.check.stdout + facts.check.stderr).toBe(0);
      const theirCheck = imageFacts(dirs.theirs, file).check;
      expect(theirCheck.stdout + theirCheck.stderr).toMatch(/ERROR OFLAG_COPIED data cluster/);
      expect(compareResults(dirs, file)).toEqual({ stdout: 'Images are identical.\n', stderr: '', code: 0 });
      const snapshot = spawnSync('qemu-img', ['compare', '-f', 'raw', '-F', 'raw', before, snapshotOf(dirs.ours, file)], { encoding: 'utf8' });
      expect(snapshot.stdout).toBe('Images are identical.\n');
    }
  }, 60_000);
});

/*
 * Snapshot table entries as QEMU before 5.0 wrote them in v2 images: no
 * extra data (the 64-bit VM state size and the disk size that v3 needs).
 * Entry map: snapshot-table.ts; the table is rewritten in place, shorter.
 */
function stripSnapshotExtraData(file: string): void {
  const image = fs.readFileSync(file);
  const count = image.readUInt32BE(60);
  const tableOffset = Number(image.readBigUInt64BE(64));
  const entries: Buffer[] = [];
  let at = tableOffset;
  for (let i = 0; i < count; i++) {
    at = Math.ceil(at / 8) * 8;
    const header = Buffer.from(image.subarray(at, at + 40));
    const idBytes = header.readUInt16BE(12);
    const nameBytes = header.readUInt16BE(14);
    const extraBytes = header.readUInt32BE(36);
    header.writeUInt32BE(0, 36);
    const strings = image.subarray(at + 40 + extraBytes, at + 40 + extraBytes + idBytes + nameBytes);
    entries.push(Buffer.concat([header, strings]));
    at += 40 + extraBytes + idBytes + nameBytes;
  }
  let out = Buffer.alloc(0);
  for (const entry of entries) out = Buffer.concat([out, Buffer.alloc((8 - (out.length % 8)) % 8), entry]);
  out.copy(image, tableOffset);
  fs.writeFileSync(file, image);
}
