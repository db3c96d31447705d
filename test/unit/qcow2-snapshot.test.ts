/*
 * Internal qcow2 snapshots without peer tools (drivers/qcow2/snapshot-*.ts,
 * snapshots.ts, block/snapshot.ts): create, write, apply and delete on
 * images made by our own create, the content of every snapshot read back
 * after each step, and our own `qemu-img check` clean (refcounts and
 * COPIED flags consistent, nothing leaked) after every step; IDs and
 * names as QEMU assigns and matches them; the snapshot table codec
 * (short v2-era entries, unknown extra data, QEMU's limits); the errors of
 * the block layer for formats without snapshots; load_tmp; the listing
 * text; and a random model of writes and snapshot operations.
 * test/interop/qemu-img-snapshot.test.ts runs the same against qemu-img.
 */
process.env.TZ = 'UTC';

import path from 'node:path';
import fc from 'fast-check';
import { describe, expect, it } from 'vitest';
import { BlockBackend } from '../../block/backend.js';
import { createImage } from '../../block/create.js';
import { BlockError } from '../../block/errors.js';
import { Req } from '../../block/flags.js';
import type { BlockGraph } from '../../block/graph.js';
import { queryImageInfo } from '../../block/info.js';
import type { BlockNode } from '../../block/node.js';
import {
  formatSnapshotList,
  snapshotCreate,
  snapshotDelete,
  snapshotFind,
  snapshotGoto,
  snapshotInfoQapi,
  snapshotList,
  type SnapshotInfo,
} from '../../block/snapshot.js';
import { loadSnapshotTmp } from '../../block/snapshot-tmp.js';
import { openForCheck } from '../../drivers/qcow2/check-open.js';
import { NO_FIX } from '../../drivers/qcow2/check.js';
import { encodeSnapshotTable, readSnapshotTable, type Qcow2Snapshot } from '../../drivers/qcow2/snapshot-table.js';
import { stateOf } from '../../drivers/qcow2/state.js';
import { formatImageInfoHuman } from '../../qemu-img-ts/img/info.js';
import { testGraph } from '../helpers/graphs.js';
import { pattern } from '../helpers/mem-driver.js';
import { propertyRuns } from '../helpers/block-model.js';
import { scratchDir } from '../helpers/tmp.js';

const KiB = 1024;
const MiB = 1024 * KiB;
const dir = scratchDir('qbt-qcow2-snap-');
let images = 0;

const DATE = { dateSec: 1_700_000_000, dateNsec: 123_000 };

async function newImage(graph: BlockGraph, options: Array<[string, string]> = [], sizeBytes = MiB): Promise<string> {
  const filename = path.join(dir, `img-${images++}.qcow2`);
  await createImage(graph, { format: 'qcow2', filename, sizeBytes, options });
  return filename;
}

async function open(graph: BlockGraph, filename: string, readOnly = false): Promise<{ node: BlockNode; blk: BlockBackend }> {
  const node = await graph.openImage(filename, { format: 'qcow2', readOnly, options: readOnly ? {} : { discard: 'unmap' } });
  return { node, blk: new BlockBackend(graph, node, { writable: !readOnly }) };
}

/** Our qemu-img check of the file: the messages it printed and its counters. */
async function check(filename: string): Promise<{ lines: string[]; corruptions: number; leaks: number; checkErrors: number }> {
  const graph = testGraph();
  const lines: string[] = [];
  const target = await openForCheck(graph, { filename, format: 'qcow2', repair: false }, (line) => lines.push(line));
  try {
    if (target.kind !== 'qcow2') throw new Error('not qcow2');
    const outcome = await target.checker.check(NO_FIX);
    return { lines, ...outcome.result };
  } finally {
    await target.close();
  }
}

async function expectClean(filename: string): Promise<void> {
  expect(await check(filename)).toMatchObject({ lines: [], corruptions: 0, leaks: 0, checkErrors: 0 });
}

/** Equal contents; on a mismatch, the first differing offset (not a diff of megabytes). */
function expectSame(actual: Uint8Array, expected: Uint8Array | undefined): void {
  const firstDiff = !expected || actual.length !== expected.length ? -2 : actual.findIndex((v, i) => v !== expected[i]);
  expect(firstDiff).toBe(-1);
}

async function readAll(blk: BlockBackend): Promise<Uint8Array> {
  const buf = new Uint8Array(blk.getLength());
  await blk.pread(0, buf);
  return buf;
}

/** Runs `body` on the image opened read-write, then closes it. */
async function withImage<T>(filename: string, body: (node: BlockNode, blk: BlockBackend) => Promise<T>, readOnly = false): Promise<T> {
  const graph = testGraph();
  const { node, blk } = await open(graph, filename, readOnly);
  try {
    return await body(node, blk);
  } finally {
    await blk.close();
    await graph.closeAll();
  }
}

const errorOf = async (p: Promise<unknown>): Promise<BlockError> => {
  try {
    await p;
  } catch (e) {
    if (e instanceof BlockError) return e;
    throw e;
  }
  throw new Error('expected a BlockError');
};

describe('qcow2 internal snapshots: create, write, apply, delete', () => {
  it('keeps every snapshot intact through writes, applies them, deletes them; check is clean after each step', async () => {
    const filename = await newImage(testGraph(), [['cluster_size', '4096']], 256 * KiB);
    const contents = new Map<string, Uint8Array>();
    const write = (offset: number, bytes: number, seed: number) =>
      withImage(filename, async (_n, blk) => {
        await blk.pwrite(offset, pattern(bytes, seed));
        return readAll(blk);
      });
    const create = (name: string) =>
      withImage(filename, async (node, blk) => {
        const sn = await snapshotCreate(node, { name, ...DATE });
        contents.set(name, await readAll(blk));
        return sn;
      });

    await write(0, 64 * KiB, 1);
    expect((await create('one')).id).toBe('1');
    await expectClean(filename);
    await write(16 * KiB, 8 * KiB, 2);
    await write(200 * KiB, 40 * KiB, 3);
    expect((await create('two')).id).toBe('2');
    await expectClean(filename);
    const latest = await write(4 * KiB, 100 * KiB, 4);
    await expectClean(filename);

    for (const name of ['one', 'two', 'one']) {
      await withImage(filename, async (node, blk) => {
        await snapshotGoto(node, name, () => undefined);
        expectSame(await readAll(blk), contents.get(name));
      });
      await expectClean(filename);
    }
    // Writes after an apply leave the snapshot alone.
    await write(0, 256 * KiB, 5);
    await withImage(filename, async (node, blk) => {
      await snapshotGoto(node, '1', () => undefined);
      expectSame(await readAll(blk), contents.get('one'));
      await snapshotDelete(node, '1', 'one');
      expect((await snapshotList(node)).map((sn) => sn.name)).toEqual(['two']);
      expectSame(await readAll(blk), contents.get('one'));
    });
    await expectClean(filename);
    await withImage(filename, async (node, blk) => {
      await snapshotGoto(node, 'two', () => undefined);
      expectSame(await readAll(blk), contents.get('two'));
      await snapshotDelete(node, '2', null);
      expect(await snapshotList(node)).toEqual([]);
      expectSame(await readAll(blk), contents.get('two'));
    });
    await expectClean(filename);
    expect(Buffer.compare(latest, contents.get("two")!)).not.toBe(0);
  });

  it('restores COPIED: after deleting the only snapshot, writes go in place again', async () => {
    const filename = await newImage(testGraph());
    await withImage(filename, async (node, blk) => {
      await blk.pwrite(0, pattern(128 * KiB, 9));
      await snapshotCreate(node, { name: 's', ...DATE });
      const s = stateOf(node);
      expect(s.l1View.getUint32(0) >>> 31).toBe(0);
      await snapshotDelete(node, null, 's');
      expect(s.l1View.getUint32(0) >>> 31).toBe(1);
      const endBefore = node.file!.node.totalBytes;
      await blk.pwrite(0, pattern(128 * KiB, 10));
      expect(node.file!.node.totalBytes).toBe(endBefore);
    });
    await expectClean(filename);
  });

  it('works on v2 images, with lazy refcounts, 512-byte clusters and 64-bit refcounts', async () => {
    for (const options of [[['compat', '0.10']], [['lazy_refcounts', 'on']], [['cluster_size', '512'], ['refcount_bits', '64']]] as Array<Array<[string, string]>>) {
      const filename = await newImage(testGraph(), options, 128 * KiB);
      await withImage(filename, async (node, blk) => {
        await blk.pwrite(0, pattern(64 * KiB, 1));
        await snapshotCreate(node, { name: 'a', ...DATE });
        const a = await readAll(blk);
        await blk.pwrite(1000, pattern(70 * KiB, 2));
        await snapshotGoto(node, 'a', () => undefined);
        expectSame(await readAll(blk), a);
      });
      await expectClean(filename);
    }
  });

  it('refuses a snapshot whose refcounts would overflow (1-bit refcounts) and leaks nothing', async () => {
    const filename = await newImage(testGraph(), [['refcount_bits', '1']]);
    await withImage(filename, async (node, blk) => {
      await blk.pwrite(0, pattern(64 * KiB, 1));
      expect((await errorOf(snapshotCreate(node, { name: 's', ...DATE }))).code).toBe('EINVAL');
      expect(await snapshotList(node)).toEqual([]);
    });
    await expectClean(filename);
  });

  it('assigns IDs as QEMU: one more than the largest; names may repeat; delete matches ID and name', async () => {
    const filename = await newImage(testGraph());
    await withImage(filename, async (node) => {
      for (const name of ['x', 'x', 'y']) await snapshotCreate(node, { name, ...DATE });
      expect((await snapshotList(node)).map((sn) => `${sn.id}:${sn.name}`)).toEqual(['1:x', '2:x', '3:y']);
      await snapshotDelete(node, '3', 'y');
      expect((await snapshotCreate(node, { name: 'z', ...DATE })).id).toBe('3');
      await snapshotDelete(node, '1', null);
      expect((await snapshotCreate(node, { name: 'w', ...DATE })).id).toBe('4');
      expect((await errorOf(snapshotDelete(node, '2', 'y'))).message).toBe("Can't find the snapshot");
      expect(await snapshotFind(node, 'x')).toMatchObject({ id: '2' });
      expect(await snapshotFind(node, '2')).toBeNull();
    });
    await expectClean(filename);
  });

  it('goto finds by ID before name; a missing snapshot is ENOENT', async () => {
    const filename = await newImage(testGraph());
    await withImage(filename, async (node, blk) => {
      await blk.pwrite(0, pattern(4096, 1));
      await snapshotCreate(node, { name: '2', ...DATE });
      await blk.pwrite(0, pattern(4096, 2));
      const second = await readAll(blk);
      await snapshotCreate(node, { name: 'other', ...DATE });
      await blk.pwrite(0, pattern(4096, 3));
      await snapshotGoto(node, '2', () => undefined);
      expectSame(await readAll(blk), second);
      const e = await errorOf(snapshotGoto(node, 'nope', () => undefined));
      expect([e.code, e.message]).toEqual(['ENOENT', 'Failed to load snapshot: No such file or directory']);
    });
  });

  it('cuts names to 255 bytes and records the request', async () => {
    const filename = await newImage(testGraph());
    await withImage(filename, async (node) => {
      const sn = await snapshotCreate(node, { name: 'n'.repeat(300), dateSec: 5, dateNsec: 6, vmClockNsec: 3_723_004_000_000n, icount: 42n });
      expect(sn).toEqual({ id: '1', name: 'n'.repeat(255), vmStateBytes: 0n, dateSec: 5, dateNsec: 6, vmClockNsec: 3_723_004_000_000n, icount: 42n });
    });
  });

  it('refuses writes on a read-only node and unusable snapshot L1 tables', async () => {
    const filename = await newImage(testGraph());
    await withImage(filename, async (node) => void (await snapshotCreate(node, { name: 's', ...DATE })));
    await withImage(filename, async (node) => {
      expect((await errorOf(snapshotCreate(node, { name: 't', ...DATE }))).code).toBe('EPERM');
    }, true);
    await withImage(filename, async (node) => {
      const s = stateOf(node);
      const sn = s.snapshots.list[0]!;
      sn.l1TableOffset += 8n;
      const reported: string[] = [];
      const e = await errorOf(snapshotGoto(node, 's', (m) => reported.push(m)));
      expect([reported, e.message]).toEqual([['Snapshot L1 table offset invalid'], 'Failed to load snapshot: Invalid argument']);
      expect((await errorOf(snapshotDelete(node, null, 's'))).message).toBe('Snapshot L1 table offset invalid');
      sn.l1TableOffset -= 8n;
    });
  });
});

describe('formats without snapshots (block/snapshot.ts)', () => {
  it('raw falls back to its file, which has none: QEMU texts', async () => {
    const graph = testGraph();
    const filename = path.join(dir, 'plain.raw');
    await createImage(graph, { format: 'raw', filename, sizeBytes: MiB, options: [] });
    const node = await graph.openImage(filename, { format: 'raw' });
    expect((await errorOf(snapshotList(node))).code).toBe('ENOTSUP');
    expect((await errorOf(snapshotCreate(node, { name: 's', ...DATE }))).code).toBe('ENOTSUP');
    expect((await errorOf(snapshotGoto(node, 's', () => undefined))).message).toBe('Block driver does not support snapshots');
    expect((await errorOf(snapshotDelete(node, 'i', 's'))).message).toBe(
      "Block format 'file' used by device '' does not support internal snapshot deletion",
    );
    expect(await snapshotFind(node, 's')).toBeNull();
    expect((await queryImageInfo(node)).snapshots).toBeUndefined();
  });
});

describe('load_tmp (convert -l)', () => {
  it('makes a read-only node read the snapshot, by ID or name', async () => {
    const filename = await newImage(testGraph(), [], 3 * MiB);
    const first = await withImage(filename, async (node, blk) => {
      await blk.pwrite(MiB, pattern(MiB, 1));
      await snapshotCreate(node, { name: 'first', ...DATE });
      const content = await readAll(blk);
      await blk.pwrite(0, pattern(3 * MiB, 2));
      return content;
    });
    for (const ref of [{ idOrName: '1' }, { idOrName: 'first' }, { id: '1', name: 'first' }]) {
      await withImage(filename, async (node, blk) => {
        await loadSnapshotTmp(node, ref);
        expectSame(await readAll(blk), first);
      }, true);
    }
    await withImage(filename, async (node) => {
      expect((await errorOf(loadSnapshotTmp(node, { idOrName: 'none' }))).message).toBe("Can't find snapshot");
    }, true);
  });
});

describe('the snapshot table codec', () => {
  const entry = (over: Partial<Qcow2Snapshot> = {}): Qcow2Snapshot => ({
    l1TableOffset: 0x30000n, l1Entries: 2, idBytes: new TextEncoder().encode('1'), nameBytes: new TextEncoder().encode('snap'),
    dateSec: 7, dateNsec: 8, vmClockNsec: 9n, vmStateBytes: 0x1_0000_0000n, diskBytes: 0x100000n, icount: 11n,
    extraDataBytes: 24, unknownExtra: new Uint8Array(0), ...over,
  });
  const reader = (bytes: Uint8Array) => async (offset: number, n: number) => {
    const out = new Uint8Array(n);
    out.set(bytes.subarray(offset, offset + n));
    return out;
  };

  it('round-trips entries; a VM state size beyond 32 bits leaves the 32-bit field 0; entries are 8-aligned', async () => {
    const list = [entry(), entry({ idBytes: new TextEncoder().encode('22'), nameBytes: new TextEncoder().encode('x'), unknownExtra: new Uint8Array([1, 2, 3, 4, 5, 6, 7, 8]), extraDataBytes: 32 })];
    const table = encodeSnapshotTable(list, 0)!;
    expect(new DataView(table.buffer).getUint32(32)).toBe(0);
    expect(table.length).toBe(72 + 64 + 8 + 2 + 1);
    expect(await readSnapshotTable(reader(table), 0, 2)).toEqual({ list, tableBytes: table.length });
  });

  it('reads short entries as QEMU (no 64-bit VM state, disk size or icount) and completes them on rewrite', async () => {
    const table = encodeSnapshotTable([entry({ vmStateBytes: 5n })], 0)!;
    const view = new DataView(table.buffer);
    view.setUint32(36, 8);
    const short = new Uint8Array([...table.subarray(0, 48), ...new TextEncoder().encode('1snap')]);
    const read = await readSnapshotTable(reader(short), 0, 1);
    expect(read).toMatchObject({ tableBytes: short.length, list: [{ vmStateBytes: 5n, diskBytes: null, icount: null, extraDataBytes: 8 }] });
    const rewritten = encodeSnapshotTable((read as { list: Qcow2Snapshot[] }).list, 4 * MiB)!;
    const again = await readSnapshotTable(reader(rewritten), 0, 1);
    expect(again).toMatchObject({ list: [{ diskBytes: BigInt(4 * MiB), icount: null, extraDataBytes: 24 }] });
  });

  it("refuses too much extra data and tables over 64 MiB with QEMU's texts", async () => {
    const table = encodeSnapshotTable([entry()], 0)!;
    new DataView(table.buffer).setUint32(36, 1025);
    expect(await readSnapshotTable(reader(table), 0, 1)).toBe('Too much extra metadata in snapshot table entry 0');
    const big = entry({ nameBytes: new Uint8Array(0xffff).fill(0x61) });
    expect(encodeSnapshotTable(Array.from({ length: 1100 }, () => big), 0)).toBeNull();
  });
});

describe('listing (bdrv_snapshot_dump)', () => {
  it('prints the table as qemu-img 7.2 does, widths in bytes, icount blank when not recorded', () => {
    const sn = (over: Partial<SnapshotInfo>): SnapshotInfo => ({
      id: '1', name: 'first', vmStateBytes: 0n, dateSec: 1_700_000_000, dateNsec: 0, vmClockNsec: 0n, icount: 0n, ...over,
    });
    const text = formatSnapshotList(
      [sn({}), sn({ id: '12', name: 'über', vmStateBytes: 1536n * 1024n, vmClockNsec: 3_723_004_000_000n, icount: null })].map(snapshotInfoQapi),
    );
    expect(text).toBe(
      'Snapshot list:\n' +
        'ID        TAG               VM SIZE                DATE     VM CLOCK     ICOUNT\n' +
        '1         first                 0 B 2023-11-14 22:13:20 00:00:00.000          0\n' +
        // 'über' is 5 bytes: %-16s pads it with 11 spaces.
        `12        über${' '.repeat(11)}  1.5 MiB 2023-11-14 22:13:20 01:02:03.004           \n`,
    );
    expect(snapshotInfoQapi(sn({ vmClockNsec: 3_723_004_000_005n, icount: null }))).toEqual({
      id: '1', name: 'first', 'vm-state-size': 0, 'date-sec': 1_700_000_000, 'date-nsec': 0, 'vm-clock-sec': 3723, 'vm-clock-nsec': 4_000_005, icount: undefined,
    });
  });

  it('info lists snapshots between the backing lines and the format-specific data', async () => {
    const filename = await newImage(testGraph());
    await withImage(filename, async (node) => {
      await snapshotCreate(node, { name: 'a', ...DATE, icount: 0n });
      const human = formatImageInfoHuman(await queryImageInfo(node));
      expect(human).toContain('cluster_size: 65536\nSnapshot list:\nID        TAG');
      expect(human).toContain('00:00:00.000          0\nFormat specific information:\n');
    });
  });
});

describe('model: random writes and snapshot operations', () => {
  const PROPERTY = propertyRuns('qcow2-snapshot.test', 15);
  const SIZE = 192 * KiB;
  interface ZeroOp {
    kind: 'zero' | 'discard';
    offset: number;
    bytes: number;
    unmap: boolean;
  }
  type Op =
    | { kind: 'write'; offset: number; bytes: number; seed: number }
    | ZeroOp
    | { kind: 'create' }
    | { kind: 'goto'; pick: number }
    | { kind: 'delete'; pick: number };
  const opArb: fc.Arbitrary<Op> = fc.oneof(
    fc.record({ kind: fc.constant('write' as const), offset: fc.integer({ min: 0, max: SIZE - 1 }), bytes: fc.integer({ min: 1, max: 40 * KiB }), seed: fc.nat(1000) }),
    fc.record({ kind: fc.constantFrom('zero' as const, 'discard' as const), offset: fc.integer({ min: 0, max: SIZE - 1 }), bytes: fc.integer({ min: 1, max: 40 * KiB }), unmap: fc.boolean() }),
    fc.record({ kind: fc.constant('create' as const) }),
    fc.record({ kind: fc.constant('goto' as const), pick: fc.nat() }),
    fc.record({ kind: fc.constant('delete' as const), pick: fc.nat() }),
  );

  /** Zeroes (any alignment) or discards (whole 4 KiB clusters inside the range, which then read as zeroes). */
  async function zeroOrDiscard(blk: BlockBackend, op: ZeroOp, current: Uint8Array) {
    const end = Math.min(op.offset + op.bytes, SIZE);
    if (op.kind === 'zero') {
      await blk.pwriteZeroes(op.offset, end - op.offset, op.unmap ? Req.MAY_UNMAP : 0);
      current.fill(0, op.offset, end);
      return;
    }
    await blk.pdiscard(op.offset, end - op.offset);
    const first = Math.ceil(op.offset / (4 * KiB)) * 4 * KiB;
    const last = end === SIZE ? SIZE : Math.floor(end / (4 * KiB)) * 4 * KiB;
    if (last > first) current.fill(0, first, last);
  }

  async function runOps(ops: Op[]): Promise<void> {
    const filename = await newImage(testGraph(), [['cluster_size', '4096']], SIZE);
    const saved = new Map<string, Uint8Array>();
    let current = new Uint8Array(SIZE);
    await withImage(filename, async (node, blk) => {
      for (const op of ops) {
        const ids = [...saved.keys()];
        if (op.kind === 'write') {
          const bytes = Math.min(op.bytes, SIZE - op.offset);
          const data = pattern(bytes, op.seed);
          await blk.pwrite(op.offset, data);
          current.set(data, op.offset);
        } else if (op.kind === 'zero' || op.kind === 'discard') {
          await zeroOrDiscard(blk, op, current);
        } else if (op.kind === 'create') {
          saved.set((await snapshotCreate(node, { name: 's', ...DATE })).id, current.slice());
        } else if (ids.length > 0 && (op.kind === 'goto' || op.kind === 'delete')) {
          const id = ids[op.pick % ids.length]!;
          if (op.kind === 'goto') {
            await snapshotGoto(node, id, () => undefined);
            current = saved.get(id)!.slice();
          } else {
            await snapshotDelete(node, id, null);
            saved.delete(id);
          }
        }
      }
      expectSame(await readAll(blk), current);
    });
    await expectClean(filename);
    for (const [id, content] of saved) {
      await withImage(filename, async (node, blk) => {
        await loadSnapshotTmp(node, { id });
        expectSame(await readAll(blk), content);
      }, true);
    }
  }

  it('every snapshot reads what it saved; check is clean', async () => {
    await fc.assert(fc.asyncProperty(fc.array(opArb, { maxLength: 25 }), runOps), PROPERTY.parameters);
  }, 120_000);
});
