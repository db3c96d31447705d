/*
 * qemu-img-ts snapshot (and the snapshot list of info) against the real
 * qemu-img 7.2:
 *
 *   - snapshots we create are listed, applied and deleted by qemu-img, and
 *     the ones qemu-img creates by us; `qemu-img check` is clean after
 *     every step, and every snapshot's content (qemu-img convert -l) and
 *     the active content (qemu-io reads, convert) are what was written;
 *   - the same sequence of snapshot operations and qemu-io writes, run by
 *     qemu-img on one copy of an image and by us on another, leaves files
 *     that are byte for byte the same but for the snapshot dates (same
 *     allocation, same table layout, freed clusters discarded alike);
 *   - our `snapshot -l`, `info` and `info --output=json` print exactly
 *     what qemu-img prints for the same image (both read the same file, so
 *     dates agree; a non-UTC time zone checks local-time dates), and human
 *     info of our copy equals theirs with dates and disk size masked;
 *   - argument errors, missing snapshots, formats without snapshots and
 *     unusable snapshots give the same stdout, stderr and exit status
 *     (except -a on a probed raw image: QEMU closes and reopens the raw
 *     node around its fallback and so prints the probing warning twice);
 *   - compressed clusters, v2 images, short (pre-icount) table entries
 *     written by older QEMUs, and snapshots of other disk sizes.
 *
 * Build first (npx tsc -p tsconfig.json): the tests run dist/.
 */
import { execFileSync, spawnSync } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { describe, expect, it } from 'vitest';
import { missingPeers } from '../helpers/peers.js';
import { ROOT } from '../helpers/run.js';
import { scratchDir } from '../helpers/tmp.js';

const OURS_BIN = path.join(ROOT, 'dist/bin/qemu-img-ts.mjs');
const TZ = 'Asia/Kolkata';

interface Result {
  stdout: string;
  stderr: string;
  code: number;
}

describe.skipIf(missingPeers('qemu-img', 'qemu-io'))('qemu-img snapshot against qemu-img 7.2', () => {
  const dir = scratchDir('qbt-snapshot-');
  const file = (name: string) => path.join(dir, name);
  const env = { ...process.env, TZ };
  const runTool = (cmd: string, args: string[]): Result => {
    const r = spawnSync(cmd, args, { cwd: dir, env, encoding: 'utf8' });
    return { stdout: r.stdout, stderr: r.stderr, code: r.status ?? -1 };
  };
  const theirs = (...args: string[]) => runTool('qemu-img', args);
  const ours = (...args: string[]) => runTool(process.execPath, [OURS_BIN, ...args]);
  const ok = (r: Result) => {
    expect(r.stderr).toBe('');
    expect(r.code).toBe(0);
    return r.stdout;
  };
  const qemuIo = (name: string, ...commands: string[]) => {
    const r = spawnSync('qemu-io', ['-f', 'qcow2', ...commands.flatMap((c) => ['-c', c]), name], { cwd: dir, encoding: 'utf8' });
    if (r.status !== 0 || /failed|error/i.test(r.stdout + r.stderr)) throw new Error(`qemu-io ${commands.join('; ')}: ${r.stdout}${r.stderr}`);
  };
  const checkClean = (name: string) => {
    const r = theirs('check', '-f', 'qcow2', name);
    expect(`${r.code} ${r.stdout}${r.stderr}`).toMatch(/^0 No errors were found on the image/);
  };
  /** The image's content (or a snapshot's, with `-l`), as qemu-img converts it to raw. */
  const contentOf = (name: string, snapshot?: string): Buffer => {
    const out = file(`${name}.${snapshot ?? 'active'}.raw`);
    execFileSync('qemu-img', ['convert', ...(snapshot ? ['-l', snapshot] : []), '-O', 'raw', name, out], { cwd: dir });
    const bytes = fs.readFileSync(out);
    fs.rmSync(out);
    return bytes;
  };
  const newImage = (name: string, size = '4M', ...options: string[]) => {
    execFileSync('qemu-img', ['create', '-q', '-f', 'qcow2', ...options.flatMap((o) => ['-o', o]), name, size], { cwd: dir });
  };
  const sameAsQemu = (...args: string[]) => expect(ours(...args)).toEqual(theirs(...args));
  const listOf = (name: string) => ok(theirs('snapshot', '-l', name));

  it('snapshots we create are listed, applied and deleted by qemu-img; check is clean after each step', () => {
    newImage('a.qcow2', '4M', 'cluster_size=4096');
    qemuIo('a.qcow2', 'write -P 1 0 1M', 'write -P 2 3M 64k');
    const v1 = contentOf('a.qcow2');
    ok(ours('snapshot', '-c', 'one', 'a.qcow2'));
    checkClean('a.qcow2');
    qemuIo('a.qcow2', 'write -P 3 512k 1M', 'write -z 3M 4k');
    const v2 = contentOf('a.qcow2');
    ok(ours('snapshot', '-c', 'two', 'a.qcow2'));
    checkClean('a.qcow2');
    qemuIo('a.qcow2', 'write -P 4 0 4M');
    expect(listOf('a.qcow2')).toMatch(/^Snapshot list:\nID +TAG.*\n1 +one +0 B .*\n2 +two +0 B .*\n$/);
    expectSameBytes(contentOf('a.qcow2', 'one'), v1);
    expectSameBytes(contentOf('a.qcow2', 'two'), v2);
    ok(theirs('snapshot', '-a', 'one', 'a.qcow2'));
    checkClean('a.qcow2');
    expectSameBytes(contentOf('a.qcow2'), v1);
    ok(theirs('snapshot', '-d', 'one', 'a.qcow2'));
    checkClean('a.qcow2');
    ok(ours('snapshot', '-a', '2', 'a.qcow2'));
    checkClean('a.qcow2');
    expectSameBytes(contentOf('a.qcow2'), v2);
    qemuIo('a.qcow2', 'read -P 3 512k 1M', 'read -P 0 3M 4k');
  });

  it('snapshots qemu-img creates are listed, applied and deleted by us', () => {
    newImage('b.qcow2');
    qemuIo('b.qcow2', 'write -P 5 0 2M');
    ok(theirs('snapshot', '-c', 'base', 'b.qcow2'));
    const base = contentOf('b.qcow2');
    qemuIo('b.qcow2', 'write -P 6 1M 2M');
    ok(theirs('snapshot', '-c', 'later', 'b.qcow2'));
    const later = contentOf('b.qcow2');
    qemuIo('b.qcow2', 'write -P 7 0 4M');
    expect(ok(ours('snapshot', '-l', 'b.qcow2'))).toBe(listOf('b.qcow2'));
    ok(ours('snapshot', '-a', 'base', 'b.qcow2'));
    checkClean('b.qcow2');
    expectSameBytes(contentOf('b.qcow2'), base);
    qemuIo('b.qcow2', 'write -P 8 0 64k');
    ok(ours('snapshot', '-d', 'base', 'b.qcow2'));
    checkClean('b.qcow2');
    expectSameBytes(contentOf('b.qcow2', 'later'), later);
    ok(ours('snapshot', '-a', 'later', 'b.qcow2'));
    checkClean('b.qcow2');
    expectSameBytes(contentOf('b.qcow2'), later);
    expect(listOf('b.qcow2')).toMatch(/^Snapshot list:\n.*\n2 +later .*\n$/);
  });

  it('the same sequence by qemu-img and by us: the same file but for the dates, same map, listing and info', () => {
    newImage('seq.qcow2', '64M');
    qemuIo('seq.qcow2', 'write -P 1 0 1M', 'write -P 3 10M 128k');
    for (const copy of ['seq-t.qcow2', 'seq-o.qcow2']) fs.copyFileSync(file('seq.qcow2'), file(copy));
    const step = (...args: string[]) => {
      ok(theirs('snapshot', ...args, 'seq-t.qcow2'));
      ok(ours('snapshot', ...args, 'seq-o.qcow2'));
    };
    const write = (command: string) => ['seq-t.qcow2', 'seq-o.qcow2'].forEach((name) => qemuIo(name, command));
    step('-c', 's1');
    write('write -P 2 0 512k');
    step('-c', 's2');
    write('write -P 4 10M 64k');
    step('-a', 's1');
    write('write -P 5 20M 64k');
    step('-d', 's2');
    step('-c', 's3');
    step('-a', '1');
    step('-d', 's1');
    for (const name of ['seq-t.qcow2', 'seq-o.qcow2']) checkClean(name);
    const facts = (name: string) => ({
      map: ok(theirs('map', '--output=json', name)),
      end: theirs('check', name).stdout.match(/Image end offset: \d+/)?.[0],
      snapshots: ok(theirs('snapshot', '-l', name)).replace(/\d{4}-\d\d-\d\d \d\d:\d\d:\d\d/g, 'DATE'),
    });
    expect(facts('seq-o.qcow2')).toEqual(facts('seq-t.qcow2'));
    expectSameBytes(withoutDates(file('seq-o.qcow2')), withoutDates(file('seq-t.qcow2')));
    const masked = (text: string) => text.replace(/\d{4}-\d\d-\d\d \d\d:\d\d:\d\d/g, 'DATE').replace(/^disk size: .*$/m, 'disk size: N').replace('seq-o', 'seq-t');
    expect(masked(ok(ours('info', 'seq-o.qcow2')))).toBe(masked(ok(theirs('info', 'seq-t.qcow2'))));
  });

  it('-l, info and info --output=json print what qemu-img prints for the same image', () => {
    newImage('list.qcow2', '1M');
    ok(theirs('snapshot', '-c', 'theirs', 'list.qcow2'));
    ok(ours('snapshot', '-c', 'ours', 'list.qcow2'));
    ok(ours('snapshot', '-c', 'a name longer than sixteen bytes', 'list.qcow2'));
    ok(theirs('snapshot', '-c', 'ünïcødé', 'list.qcow2'));
    ok(ours('snapshot', '-c', '', 'list.qcow2'));
    ok(ours('snapshot', '-c', 'x'.repeat(300), 'list.qcow2'));
    for (const args of [['snapshot', '-l'], ['snapshot', '-q', '-l'], ['info'], ['info', '--output=json'], ['info', '-U', '--backing-chain', '--output=json']]) {
      sameAsQemu(...args, 'list.qcow2');
    }
    sameAsQemu('snapshot', '-l', '--image-opts', `driver=qcow2,file.filename=${file('list.qcow2')}`);
    newImage('none.qcow2', '1M');
    sameAsQemu('snapshot', '-l', 'none.qcow2');
    sameAsQemu('info', '--output=json', 'none.qcow2');
  });

  it('argument errors, missing snapshots and formats without snapshots: same output and status', () => {
    newImage('err.qcow2', '1M');
    ok(theirs('snapshot', '-c', 'first', 'err.qcow2'));
    fs.writeFileSync(file('plain.raw'), Buffer.alloc(1024 * 1024));
    const cases = [
      ['-a', 'nope', 'err.qcow2'], ['-d', 'nope', 'err.qcow2'], ['-d', '1', 'err.qcow2'], ['-l', '-a', 'x', 'err.qcow2'],
      ['-l', '-l', 'err.qcow2'], ['-c', 'err.qcow2'], ['-x', 'err.qcow2'], ['-a'], ['-l'], ['-l', 'err.qcow2', 'extra'],
      ['-c', 'y', '-U', 'err.qcow2'], ['-U', 'err.qcow2'], ['err.qcow2'], ['-l', '-U', 'err.qcow2'], ['-l', '-f', 'qcow2', 'err.qcow2'],
      ['-c', 's', 'plain.raw'], ['-a', 's', '--image-opts', 'driver=raw,file.filename=plain.raw'], ['-d', 's', 'plain.raw'], ['-l', 'plain.raw'], ['-l', 'missing.qcow2'],
      ['--object', 'foo', '-l', 'err.qcow2'],
    ];
    for (const args of cases) {
      const before = fs.readFileSync(file('err.qcow2'));
      const expected = theirs('snapshot', ...args);
      fs.writeFileSync(file('err.qcow2'), before);
      expect({ args, ...ours('snapshot', ...args) }).toEqual({ args, ...expected });
      fs.writeFileSync(file('err.qcow2'), before);
    }
  });

  it('refcount overflow (1-bit refcounts) fails as in QEMU, without leaking the L1 copy', () => {
    newImage('r1.qcow2', '1M', 'refcount_bits=1');
    qemuIo('r1.qcow2', 'write 0 64k');
    fs.copyFileSync(file('r1.qcow2'), file('r1-t.qcow2'));
    const result = ours('snapshot', '-c', 's', 'r1.qcow2');
    expect(result).toEqual(theirs('snapshot', '-c', 's', 'r1-t.qcow2'));
    expect(result.stderr).toBe("qemu-img: Could not create snapshot 's': -22 (Invalid argument)\n");
    checkClean('r1.qcow2');
  });

  it('a qcow2 with persistent bitmaps cannot apply snapshots', () => {
    newImage('bm.qcow2', '1M');
    ok(theirs('snapshot', '-c', 's', 'bm.qcow2'));
    ok(theirs('bitmap', '--add', 'bm.qcow2', 'b0'));
    sameAsQemu('snapshot', '-a', 's', 'bm.qcow2');
  });

  it('compressed clusters and v2 images keep their refcounts right', () => {
    newImage('src.qcow2', '2M');
    qemuIo('src.qcow2', 'write -P 9 0 2M');
    execFileSync('qemu-img', ['convert', '-c', '-O', 'qcow2', 'src.qcow2', 'comp.qcow2'], { cwd: dir });
    execFileSync('qemu-img', ['convert', '-O', 'qcow2', '-o', 'compat=0.10', 'src.qcow2', 'v2.qcow2'], { cwd: dir });
    for (const name of ['comp.qcow2', 'v2.qcow2']) {
      const before = contentOf(name);
      ok(ours('snapshot', '-c', 'c', name));
      checkClean(name);
      qemuIo(name, 'write -P 1 100k 300k');
      ok(ours('snapshot', '-c', 'd', name));
      ok(ours('snapshot', '-a', 'c', name));
      checkClean(name);
      expectSameBytes(contentOf(name), before);
      ok(ours('snapshot', '-d', 'c', name));
      ok(ours('snapshot', '-d', 'd', name));
      checkClean(name);
      sameAsQemu('info', '--output=json', name);
    }
  });

  it('short table entries of older QEMUs (no icount) list as qemu-img lists them and survive our rewrite', () => {
    newImage('old.qcow2', '1M');
    ok(theirs('snapshot', '-c', 'old', 'old.qcow2'));
    shortenFirstEntry(file('old.qcow2'));
    checkClean('old.qcow2');
    sameAsQemu('snapshot', '-l', 'old.qcow2');
    sameAsQemu('info', '--output=json', 'old.qcow2');
    ok(ours('snapshot', '-c', 'new', 'old.qcow2'));
    checkClean('old.qcow2');
    sameAsQemu('snapshot', '-l', 'old.qcow2');
    expect(listOf('old.qcow2')).toMatch(/\n1 +old +0 B .* 00:00:00.000 {11}\n2 +new +0 B .* 00:00:00.000 {10}0\n$/);
    ok(ours('snapshot', '-a', 'old', 'old.qcow2'));
    checkClean('old.qcow2');
  });

  it('applying a snapshot of another disk size resizes the image, up and down', () => {
    newImage('grow.qcow2', '1M');
    qemuIo('grow.qcow2', 'write -P 1 0 1M');
    ok(theirs('snapshot', '-c', 'small', 'grow.qcow2'));
    const small = contentOf('grow.qcow2');
    ok(theirs('resize', 'grow.qcow2', '300M'));
    qemuIo('grow.qcow2', 'write -P 2 299M 1M');
    ok(theirs('snapshot', '-c', 'big', 'grow.qcow2'));
    const big = contentOf('grow.qcow2');
    ok(theirs('resize', '--shrink', 'grow.qcow2', '1M'));
    ok(ours('snapshot', '-a', 'big', 'grow.qcow2'));
    checkClean('grow.qcow2');
    expect(ok(theirs('info', '--output=json', 'grow.qcow2'))).toContain('"virtual-size": 314572800,');
    expectSameBytes(contentOf('grow.qcow2'), big);
    ok(ours('snapshot', '-a', 'small', 'grow.qcow2'));
    checkClean('grow.qcow2');
    expect(ok(theirs('info', '--output=json', 'grow.qcow2'))).toContain('"virtual-size": 1048576,');
    expectSameBytes(contentOf('grow.qcow2'), small);
  });
});

/** Equal bytes; on a mismatch, the first differing offset (not a diff of megabytes). */
function expectSameBytes(actual: Buffer, expected: Buffer): void {
  const firstDiff = actual.length !== expected.length ? -2 : actual.findIndex((v, i) => v !== expected[i]);
  expect(firstDiff).toBe(-1);
}

/** The file with the date fields of its snapshot table entries zeroed. */
function withoutDates(filename: string): Buffer {
  const bytes = fs.readFileSync(filename);
  const count = bytes.readUInt32BE(60);
  let at = Number(bytes.readBigUInt64BE(64));
  for (let i = 0; i < count; i++) {
    at = Math.ceil(at / 8) * 8;
    bytes.fill(0, at + 16, at + 24);
    at += 40 + bytes.readUInt32BE(at + 36) + bytes.readUInt16BE(at + 12) + bytes.readUInt16BE(at + 14);
  }
  return bytes;
}

/**
 * Rewrites the first snapshot table entry as QEMU before 5.0 wrote it: 16
 * bytes of extra data (no icount). The entry shrinks, so the table still
 * fits where it is; snapshots_offset stays.
 */
function shortenFirstEntry(filename: string): void {
  const fd = fs.openSync(filename, 'r+');
  try {
    const header = Buffer.alloc(72);
    fs.readSync(fd, header, 0, 72, 0);
    const tableOffset = Number(header.readBigUInt64BE(64));
    const entry = Buffer.alloc(40 + 24 + 512);
    fs.readSync(fd, entry, 0, entry.length, tableOffset);
    const idBytes = entry.readUInt16BE(12);
    const nameBytes = entry.readUInt16BE(14);
    const extra = entry.readUInt32BE(36);
    const strings = entry.subarray(40 + extra, 40 + extra + idBytes + nameBytes);
    const short = Buffer.concat([entry.subarray(0, 40), entry.subarray(40, 56), strings, Buffer.alloc(8)]);
    short.writeUInt32BE(16, 36);
    fs.writeSync(fd, short, 0, short.length, tableOffset);
  } finally {
    fs.closeSync(fd);
  }
}
