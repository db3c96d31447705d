/*
 * qcow2 resize (shrink, and growth over a longer backing file) and amend
 * (refcount width, compat up and down, lazy refcounts, size) through the
 * library, without peer tools:
 *   - results read back as expected and pass our own check (the checker
 *     qemu-img check is compared against elsewhere) with neither
 *     corruptions nor leaks;
 *   - crash safety: every write the driver makes to the file is recorded,
 *     and the image as it would be after a crash following any prefix of
 *     those writes is checked: no corruption (leaks are allowed), and the
 *     guest data is either the old or the new one;
 *   - the refusals and their order (QEMU's texts).
 * Byte-for-byte and message comparisons with qemu-img are in
 * test/interop/qemu-img-resize.test.ts and qemu-img-amend.test.ts.
 */
import fs from 'node:fs';
import path from 'node:path';
import { describe, expect, it } from 'vitest';
import { BlockBackend } from '../../block/backend.js';
import { createImage } from '../../block/create.js';
import type { AmendRequest, BlockDriver } from '../../block/driver.js';
import { Status } from '../../block/flags.js';
import { blockStatus } from '../../block/status.js';
import { builtinDrivers } from '../../drivers/index.js';
import { checkImage } from '../../drivers/qcow2/check.js';
import type { CheckFile } from '../../drivers/qcow2/check-io.js';
import { stateOf, type Qcow2State } from '../../drivers/qcow2/state.js';
import { testGraph } from '../helpers/graphs.js';
import { pattern } from '../helpers/mem-driver.js';
import { scratchDir } from '../helpers/tmp.js';

const KiB = 1024;
const MiB = 1024 * KiB;
const SECTOR = 512;
/** Header offset of cluster_bits. */
const CLUSTER_BITS_AT = 20;

/** One write the driver made to the image file, in order. */
type FileOp = { kind: 'write'; offset: number; data: Uint8Array } | { kind: 'truncate'; bytes: number };

/** The file driver, recording writes, zero writes, discards (as zeroes) and truncates into `log` while it is set. */
function recordingDrivers(): { drivers: BlockDriver[]; record(log: FileOp[] | null): void } {
  let log: FileOp[] | null = null;
  const file = builtinDrivers.find((d) => d.name === 'file')!;
  const zeroes = (offset: number, bytes: number) => log?.push({ kind: 'write', offset, data: new Uint8Array(bytes) });
  const recording: BlockDriver = {
    ...file,
    coPwritev: async (node, offset, buf, flags) => {
      log?.push({ kind: 'write', offset, data: buf.slice() });
      await file.coPwritev!(node, offset, buf, flags);
    },
    coPwriteZeroes: async (node, offset, bytes, flags) => {
      zeroes(offset, bytes);
      await file.coPwriteZeroes!(node, offset, bytes, flags);
    },
    coPdiscard: async (node, offset, bytes) => {
      zeroes(offset, bytes);
      await file.coPdiscard!(node, offset, bytes);
    },
    coTruncate: async (node, bytes, exact, prealloc, flags) => {
      log?.push({ kind: 'truncate', bytes });
      await file.coTruncate!(node, bytes, exact, prealloc, flags);
    },
  };
  return { drivers: builtinDrivers.map((d) => (d === file ? recording : d)), record: (l) => void (log = l) };
}

/** The file after the first `count` operations of `log`, applied to `base`. */
function crashImage(base: Uint8Array, log: readonly FileOp[], count: number): Uint8Array {
  let bytes = base.slice();
  for (const op of log.slice(0, count)) {
    if (op.kind === 'truncate') {
      const next = new Uint8Array(op.bytes);
      next.set(bytes.subarray(0, Math.min(bytes.length, op.bytes)));
      bytes = next;
      continue;
    }
    if (op.offset + op.data.length > bytes.length) {
      const next = new Uint8Array(op.offset + op.data.length);
      next.set(bytes);
      bytes = next;
    }
    bytes.set(op.data, op.offset);
  }
  return bytes;
}

/** A read-only CheckFile over bytes (whole sectors, zeros past the end, as the block layer reads). */
function memCheckFile(bytes: Uint8Array): CheckFile {
  const none = async () => undefined;
  return {
    lengthBytes: Math.ceil(bytes.length / SECTOR) * SECTOR,
    writable: false,
    read: async (offset, buf) => {
      buf.fill(0);
      buf.set(bytes.subarray(offset, offset + buf.length));
    },
    write: none,
    grow: none,
    discard: none,
    flush: none,
  };
}

/** Our check of an image in memory: corruptions, leaks, check errors, where the used clusters end. */
async function checkBytes(bytes: Uint8Array): Promise<{ corruptions: number; leaks: number; checkErrors: number; imageEndOffset: number }> {
  const outcome = await checkImage(memCheckFile(bytes), {}, () => undefined);
  if (typeof outcome === 'string') throw new Error(outcome);
  const { corruptions, leaks, checkErrors, imageEndOffset } = outcome.result;
  return { corruptions, leaks, checkErrors, imageEndOffset };
}

/** Byte equality without a deep comparison of megabytes (slow in expect); names the first difference. */
function expectSameBytes(actual: Uint8Array, expected: Uint8Array): void {
  let first = -1;
  for (let i = 0; i < Math.max(actual.length, expected.length) && first < 0; i++) if (actual[i] !== expected[i]) first = i;
  expect({ length: actual.length, firstDifference: first }).toEqual({ length: expected.length, firstDifference: -1 });
}

describe('qcow2 resize and amend', () => {
  const dir = scratchDir('qbt-qcow2-amend-');
  let n = 0;

  async function fresh(options: Array<[string, string]>, sizeBytes: number, backing?: string): Promise<string> {
    const filename = path.join(dir, `img-${n++}.qcow2`);
    await createImage(testGraph(), { format: 'qcow2', filename, sizeBytes, options, backingFile: backing, backingFormat: backing ? 'qcow2' : undefined });
    return filename;
  }

  async function open(filename: string, drivers: readonly BlockDriver[] = builtinDrivers) {
    const graph = testGraph(drivers);
    const node = await graph.openImage(filename, { format: 'qcow2' });
    return { graph, node, blk: new BlockBackend(graph, node, { writable: true, resizable: true }) };
  }

  /** A fact about the open image's driver state. */
  async function inspect<T>(filename: string, fact: (s: Qcow2State) => T): Promise<T> {
    const { blk, node } = await open(filename);
    try {
      return fact(stateOf(node));
    } finally {
      await blk.close();
    }
  }

  async function readAll(filename: string): Promise<Uint8Array> {
    const { blk, node } = await open(filename);
    const buf = new Uint8Array(node.totalBytes);
    await blk.pread(0, buf);
    await blk.close();
    return buf;
  }

  /** Writes `writes` (offset, length, seed; seed 0: write-zeroes) and returns the expected guest content. */
  async function fill(filename: string, writes: ReadonlyArray<readonly [number, number, number]>): Promise<Uint8Array> {
    const { blk, node } = await open(filename);
    const expected = new Uint8Array(node.totalBytes);
    for (const [offset, bytes, seed] of writes) {
      if (seed === 0) {
        await blk.pwriteZeroes(offset, bytes);
        expected.fill(0, offset, offset + bytes);
      } else {
        const data = pattern(bytes, seed);
        await blk.pwrite(offset, data);
        expected.set(data, offset);
      }
    }
    await blk.close();
    return expected;
  }

  function amendRequest(options: Record<string, string>, blk: BlockBackend): AmendRequest {
    return { options: new Map(Object.entries(options)), force: false, progress: () => undefined, resize: (bytes) => blk.truncate(bytes, true, 'off') };
  }

  async function amend(filename: string, options: Record<string, string>, drivers?: readonly BlockDriver[]): Promise<void> {
    const { blk, node } = await open(filename, drivers);
    try {
      await node.driver.amend!(node, amendRequest(options, blk));
    } finally {
      await blk.close();
    }
  }

  /** No corruption, no leak; with `cutTail`, the file also ends in its last used cluster (shrink cuts it). */
  async function expectClean(filename: string, cutTail = false): Promise<void> {
    const bytes = fs.readFileSync(filename);
    const { imageEndOffset, ...verdict } = await checkBytes(bytes);
    expect(verdict).toEqual({ corruptions: 0, leaks: 0, checkErrors: 0 });
    if (!cutTail) return;
    const clusterBytes = 2 ** bytes.readUInt32BE(CLUSTER_BITS_AT);
    expect(bytes.length).toBeGreaterThan(imageEndOffset - clusterBytes);
    expect(bytes.length).toBeLessThanOrEqual(imageEndOffset);
  }

  /** Runs `operation` on a copy of `filename` while recording, then checks the image after every prefix of its writes. */
  async function crashEveryWhere(filename: string, operation: (copy: string, drivers: readonly BlockDriver[]) => Promise<void>, accept: (guest: Uint8Array) => boolean) {
    const copy = `${filename}.crash`;
    fs.copyFileSync(filename, copy);
    const base = new Uint8Array(fs.readFileSync(copy));
    const { drivers, record } = recordingDrivers();
    const log: FileOp[] = [];
    record(log);
    try {
      await operation(copy, drivers);
    } finally {
      record(null);
    }
    expect(log.length).toBeGreaterThan(0);
    const probe = `${filename}.probe`;
    for (let count = 0; count <= log.length; count++) {
      const image = crashImage(base, log, count);
      const verdict = await checkBytes(image);
      expect({ count, corruptions: verdict.corruptions, checkErrors: verdict.checkErrors }).toEqual({ count, corruptions: 0, checkErrors: 0 });
      fs.writeFileSync(probe, image);
      expect(accept(await readAll(probe)), `guest data after ${count} of ${log.length} writes`).toBe(true);
    }
  }

  const DATA: ReadonlyArray<readonly [number, number, number]> = [
    [0, 64 * KiB, 1],
    [200 * KiB, 8 * KiB, 0],
    [300 * KiB + 100, 70 * KiB, 2],
    [MiB - 4 * KiB, 4 * KiB, 3],
    [2 * MiB + 512, 600 * KiB, 4],
    [4 * MiB - KiB, KiB, 5],
  ];

  describe('shrink', () => {
    it('keeps the data below the new end, frees the rest (file cut, no leaks), keeps the L1 size; regrown space reads zeroes', async () => {
      const filename = await fresh([['cluster_size', '512']], 4 * MiB);
      const expected = await fill(filename, DATA);
      const l1Before = await inspect(filename, (s) => s.image.header.l1Entries);
      const { blk, node } = await open(filename);
      await blk.truncate(MiB + 1024, true, 'off');
      expect(node.totalBytes).toBe(MiB + 1024);
      expect(stateOf(node).image.header.l1Entries).toBe(l1Before);
      await blk.close();
      await expectClean(filename, true);
      expectSameBytes(await readAll(filename), expected.subarray(0, MiB + 1024));
      const grown = await open(filename);
      await grown.blk.truncate(4 * MiB, true, 'off');
      await grown.blk.close();
      const after = await readAll(filename);
      expectSameBytes(after.subarray(0, MiB + 1024), expected.subarray(0, MiB + 1024));
      expect(after.subarray(MiB + 1536).every((b) => b === 0)).toBe(true);
      await expectClean(filename);
    });

    it('drops refcount blocks that only count themselves', async () => {
      const filename = await fresh([['cluster_size', '512'], ['refcount_bits', '64']], 4 * MiB);
      await fill(filename, [[0, 3 * MiB, 7]]);
      const blocksBefore = await inspect(filename, (s) => s.refblocks.size);
      const { blk, node } = await open(filename);
      await blk.truncate(64 * KiB, true, 'off');
      expect(stateOf(node).refblocks.size).toBeLessThan(blocksBefore);
      await blk.close();
      await expectClean(filename, true);
    });

    it('is crash safe at every write', async () => {
      const filename = await fresh([['cluster_size', '512']], 4 * MiB);
      const expected = await fill(filename, DATA);
      const newEnd = 2 * MiB + 64 * KiB;
      await crashEveryWhere(
        filename,
        async (copy, drivers) => {
          const { blk } = await open(copy, drivers);
          await blk.truncate(newEnd, true, 'off');
          await blk.close();
        },
        (guest) => equalPrefix(guest, expected, newEnd),
      );
    });

    it("refuses preallocation while shrinking, and sizes that are not whole sectors (QEMU's texts)", async () => {
      const filename = await fresh([], 4 * MiB);
      const { blk } = await open(filename);
      await expect(blk.truncate(MiB, true, 'falloc')).rejects.toThrow("Preallocation can't be used for shrinking an image");
      await expect(blk.truncate(MiB + 100, true, 'off')).rejects.toThrow('The new size must be a multiple of 512');
      await blk.close();
    });
  });

  describe('growth over a longer backing file', () => {
    it('makes the new area read as zeroes, not as the backing data (v3: zero clusters and a zeroed tail)', async () => {
      const base = await fresh([], 4 * MiB);
      await fill(base, [[0, 4 * MiB, 9]]);
      const overlay = await fresh([], 3 * MiB - 64 * KiB - 1536, path.basename(base));
      const { blk, node } = await open(overlay);
      await blk.truncate(4 * MiB, true, 'off');
      const buf = new Uint8Array(4 * MiB);
      await blk.pread(0, buf);
      const oldEnd = 3 * MiB - 64 * KiB - 1536;
      expect(equalPrefix(buf, pattern(4 * MiB, 9), oldEnd)).toBe(true);
      expect(buf.subarray(oldEnd).every((b) => b === 0)).toBe(true);
      const status = await blockStatus(node, 3 * MiB, MiB);
      expect(status.status & Status.ZERO).toBe(Status.ZERO);
      await blk.close();
      await expectClean(overlay);
    });

    it('refuses on v2 images, which have no zero clusters', async () => {
      const base = await fresh([], 4 * MiB);
      const overlay = await fresh([['compat', '0.10']], 2 * MiB, path.basename(base));
      const { blk } = await open(overlay);
      await expect(blk.truncate(3 * MiB, true, 'off')).rejects.toThrow('Failed to zero out new clusters: Operation not supported');
      await blk.close();
    });
  });

  describe('amend refcount_bits', () => {
    it('rewrites the refcount structures at every width with the same refcounts', async () => {
      const filename = await fresh([['cluster_size', '4096']], 8 * MiB);
      const expected = await fill(filename, DATA);
      for (const bits of ['1', '2', '4', '8', '32', '64', '16']) {
        await amend(filename, { refcount_bits: bits });
        const { node, blk } = await open(filename);
        expect(stateOf(node).geometry.refcountBits).toBe(Number(bits));
        expect(stateOf(node).image.header.refcountOrder).toBe(Math.log2(Number(bits)));
        await blk.close();
        await expectClean(filename);
        expectSameBytes(await readAll(filename), expected);
      }
    });

    it('is crash safe at every write', async () => {
      const filename = await fresh([['cluster_size', '4096']], 8 * MiB);
      const expected = await fill(filename, DATA);
      for (const bits of ['1', '64']) {
        await crashEveryWhere(filename, (copy, drivers) => amend(copy, { refcount_bits: bits }, drivers), (guest) => equalPrefix(guest, expected, expected.length));
      }
    });
  });

  describe('amend compat', () => {
    it('downgrades to 0.10: zero clusters become unallocated (no backing) or allocated zeroes (backing)', async () => {
      const base = await fresh([], 4 * MiB);
      await fill(base, [[0, 4 * MiB, 6]]);
      for (const backing of [undefined, path.basename(base)]) {
        const filename = await fresh([], 4 * MiB, backing);
        const expected = await fill(filename, [[0, 64 * KiB, 1], [64 * KiB, 128 * KiB, 0], [MiB, 64 * KiB, 2], [MiB, 64 * KiB, 0]]);
        const guest = backing ? mergeOver(pattern(4 * MiB, 6), expected, [[0, 192 * KiB], [MiB, 64 * KiB]]) : expected;
        await amend(filename, { compat: '0.10' });
        const { node, blk } = await open(filename);
        expect(stateOf(node).image.header.version).toBe(2);
        const status = await blockStatus(node, 64 * KiB, 128 * KiB);
        expect(status.status & Status.DATA).toBe(backing ? Status.DATA : 0);
        await blk.close();
        await expectClean(filename);
        expectSameBytes(await readAll(filename), guest);
      }
    });

    it('downgrade is crash safe at every write; upgrade back to 1.1 keeps the data', async () => {
      const filename = await fresh([['lazy_refcounts', 'on']], 4 * MiB);
      const expected = await fill(filename, [[0, 64 * KiB, 1], [64 * KiB, 128 * KiB, 0], [2 * MiB, 64 * KiB, 2], [2 * MiB, 64 * KiB, 0]]);
      await crashEveryWhere(filename, (copy, drivers) => amend(copy, { compat: '0.10' }, drivers), (guest) => equalPrefix(guest, expected, expected.length));
      await amend(filename, { compat: '0.10' });
      await amend(filename, { compat: '1.1', lazy_refcounts: 'on' });
      const { node, blk } = await open(filename);
      expect(stateOf(node).image.header.version).toBe(3);
      expect(stateOf(node).opts.lazyRefcounts).toBe(true);
      await blk.close();
      await expectClean(filename);
      expectSameBytes(await readAll(filename), expected);
    });
  });

  describe('amend refusals, in the order QEMU reads the options', () => {
    const cases: Array<[Record<string, string>, string, Array<[string, string]>?]> = [
      [{ refcount_bits: '3', compat: '0.9' }, 'Unknown compatibility level 0.9'],
      [{ refcount_bits: '3' }, 'Refcount width must be a power of two and may not exceed 64 bits'],
      [{ refcount_bits: '128' }, 'Refcount width must be a power of two and may not exceed 64 bits'],
      [{ 'encrypt.state': 'active', compat: 'x' }, "Can't amend encryption options - encryption not present"],
      [{ data_file: '' }, 'data-file can only be set for images that use an external data file'],
      [{ data_file_raw: 'on' }, 'data-file-raw cannot be set on existing images'],
      [{ backing_file: 'x' }, "Cannot amend the backing file\nYou can use 'qemu-img rebase' instead."],
      [{ compat: '0.10', lazy_refcounts: 'on' }, 'Lazy refcounts only supported with compatibility level 1.1 and above (use compat=1.1 or greater)'],
      [{ compat: '0.10', refcount_bits: '8' }, 'Refcount widths other than 16 bits require compatibility level 1.1 or above (use compat=1.1 or greater)'],
      [{ compat: '0.10' }, 'compat=0.10 requires refcount_bits=16', [['refcount_bits', '8']]],
      [{ size: '1000' }, 'The new size must be a multiple of 512'],
      [{ size: String(2n ** 60n) }, 'Failed to grow the L1 table: File too large'],
    ];
    for (const [options, message, create] of cases) {
      it(`${JSON.stringify(options)}: ${message.split('\n')[0]}`, async () => {
        const filename = await fresh(create ?? [], MiB);
        await expect(amend(filename, options)).rejects.toThrow(message);
        await expectClean(filename);
      });
    }

    it('accepts the backing file and format the image already has', async () => {
      const base = await fresh([], MiB);
      const filename = await fresh([], MiB, path.basename(base));
      await amend(filename, { backing_file: path.basename(base), backing_fmt: 'qcow2', data_file_raw: 'off' });
      await expect(amend(filename, { backing_file: path.basename(base) })).rejects.toThrow('Cannot amend the backing file');
    });

    it('resizes with size= (shrinking too) and ignores size=0', async () => {
      const filename = await fresh([], 4 * MiB);
      await amend(filename, { size: '0' });
      await amend(filename, { size: String(2 * MiB) });
      const { node, blk } = await open(filename);
      expect(node.totalBytes).toBe(2 * MiB);
      await blk.close();
    });
  });
});

function equalPrefix(actual: Uint8Array, expected: Uint8Array, bytes: number): boolean {
  return Buffer.compare(actual.subarray(0, bytes), expected.subarray(0, bytes)) === 0;
}

/** `under`, with `over`'s bytes in the given ranges. */
function mergeOver(under: Uint8Array, over: Uint8Array, ranges: ReadonlyArray<readonly [number, number]>): Uint8Array {
  const out = under.slice();
  for (const [offset, bytes] of ranges) out.set(over.subarray(offset, offset + bytes), offset);
  return out;
}

