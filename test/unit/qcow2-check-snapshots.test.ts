/*
 * `check -r all` rewriting a broken snapshot table (check-snapshots.ts with
 * the allocator of check-alloc.ts), on images built in memory, no peers
 * needed. Each image has 512-byte clusters, every cluster in use (header,
 * one refcount table cluster, refcount blocks, an L1 table, L2 tables and
 * data with COPIED set), the snapshot table in the last clusters. The
 * rewrite must complete or trim the entries, find room for the new table
 * (creating a refcount block, or a larger refcount table, when the file
 * is full up to what the current ones cover), free the old table, and
 * leave an image the check then finds clean. The interop tests
 * (qcow2-check.test.ts) compare the same paths byte for byte with qemu-img.
 */
import { describe, expect, it } from 'vitest';
import { checkImage, type CheckOutcome } from '../../drivers/qcow2/check.js';
import { emptyExtensions } from '../../drivers/qcow2/extensions.js';
import { EntryMask, Qcow2Geometry } from '../../drivers/qcow2/format.js';
import { decodeHeader, encodeHeaderCluster, type Qcow2Header } from '../../drivers/qcow2/header.js';
import { readSnapshotTable, type Qcow2Snapshot } from '../../drivers/qcow2/snapshot-table.js';
import { getRefcount, readTableEntry, setRefcount, writeTableEntry } from '../../drivers/qcow2/tables.js';
import { MemCheckFile } from '../helpers/mem-check-file.js';

const CS = 512;
const CLUSTER_BITS = 9;
/** Entries of one L2 table, and of the one-cluster L1 table. */
const TABLE_ENTRIES = CS / 8;
const VIRTUAL_BYTES = TABLE_ENTRIES * TABLE_ENTRIES * CS;

/** One snapshot table entry: no L1 table, id "1", name "s1", a 32-bit VM state size, `extra` bytes of extra data (0x5a beyond the known 24). */
function entry(extra: number): Uint8Array {
  const id = [0x31];
  const name = [0x73, 0x31];
  const bytes = new Uint8Array(40 + extra + id.length + name.length);
  const v = new DataView(bytes.buffer);
  v.setUint16(12, id.length);
  v.setUint16(14, name.length);
  v.setUint32(16, 1_700_000_000);
  v.setUint32(32, 0x1234);
  v.setUint32(36, extra);
  bytes.fill(0x5a, 40 + Math.min(extra, 24), 40 + extra);
  bytes.set([...id, ...name], 40 + extra);
  return bytes;
}

interface Built {
  file: MemCheckFile;
  g: Qcow2Geometry;
}

/**
 * A consistent image of `used` clusters, all in use, the last
 * `tableClusters` (default: what the entry needs) holding `table` — cut
 * there, so a longer table reaches past the end of the file.
 */
function build(used: number, refcountOrder: number, table: Uint8Array, tableClusters = Math.ceil(table.length / CS)): Built {
  const g = new Qcow2Geometry(CLUSTER_BITS, refcountOrder);
  const blocks = Math.ceil(used / g.refcountBlockEntries);
  const bytes = new Uint8Array(used * CS);
  const l1At = (2 + blocks) * CS;
  const tableAt = (used - tableClusters) * CS;
  const header: Qcow2Header = {
    ...decodeHeader(new Uint8Array(0)),
    magic: 0x514649fb,
    version: 3,
    clusterBits: CLUSTER_BITS,
    virtualBytes: VIRTUAL_BYTES,
    l1Entries: TABLE_ENTRIES,
    l1TableOffset: l1At,
    refcountTableOffset: CS,
    refcountTableClusters: 1,
    snapshotCount: 1,
    snapshotsOffset: tableAt,
    refcountOrder,
    headerBytes: 112,
  };
  const cluster0 = encodeHeaderCluster({ header, unknownFields: new Uint8Array(0), extensions: emptyExtensions(), backingName: null });
  if (typeof cluster0 === 'string') throw new Error(cluster0);
  bytes.set(cluster0, 0);
  for (let i = 0; i < blocks; i++) writeTableEntry(bytes.subarray(CS), i, BigInt((2 + i) * CS));
  fillL2AndData(bytes, l1At, l1At / CS + 1, tableAt / CS);
  for (let c = 0; c < used; c++) {
    const block = Math.floor(c / g.refcountBlockEntries);
    setRefcount(bytes.subarray((2 + block) * CS, (3 + block) * CS), c % g.refcountBlockEntries, refcountOrder, 1);
  }
  bytes.set(table.subarray(0, tableClusters * CS), tableAt);
  return { file: new MemCheckFile(bytes), g };
}

/** L2 tables, each followed by the data clusters it maps, in clusters [first, end). */
function fillL2AndData(bytes: Uint8Array, l1At: number, first: number, end: number): void {
  let l2At = 0;
  let next = first;
  for (let guest = 0; next < end; guest++) {
    if (guest % TABLE_ENTRIES === 0) {
      l2At = next++ * CS;
      writeTableEntry(bytes.subarray(l1At), guest / TABLE_ENTRIES, BigInt(l2At) | EntryMask.COPIED);
      if (next === end) break;
    }
    writeTableEntry(bytes.subarray(l2At), guest % TABLE_ENTRIES, BigInt(next++ * CS) | EntryMask.COPIED);
  }
}

async function check(b: Built, repair?: 'all'): Promise<{ outcome: CheckOutcome; lines: string[] }> {
  const lines: string[] = [];
  const outcome = await checkImage(b.file, { repair }, (line, kind) => lines.push(kind === 'error' ? `qemu-img: ${line}` : line));
  if (typeof outcome === 'string') throw new Error(outcome);
  return { outcome, lines };
}

/** Checks clean afterwards: no messages, no corruption, leak or internal error. */
async function expectClean(b: Built): Promise<void> {
  const { outcome, lines } = await check(b);
  expect(lines).toEqual([]);
  expect(outcome.failure).toBeNull();
  expect(outcome.result).toMatchObject({ corruptions: 0, leaks: 0, checkErrors: 0 });
}

function header(b: Built): Qcow2Header {
  return decodeHeader(b.file.bytes);
}

/** The table the header points at now. */
async function snapshots(b: Built): Promise<Qcow2Snapshot[]> {
  const h = header(b);
  const read = await readSnapshotTable(async (offset, bytes) => b.file.bytes.slice(offset, offset + bytes), h.snapshotsOffset, h.snapshotCount);
  if (typeof read === 'string') throw new Error(read);
  return read.list;
}

/** The refcount of `cluster`, read through the refcount table on disk. */
function refcountOf(b: Built, cluster: number): number {
  const h = header(b);
  const t = Math.floor(cluster / b.g.refcountBlockEntries);
  const block = Number(readTableEntry(b.file.bytes.subarray(h.refcountTableOffset), t));
  if (block === 0) return 0;
  return Number(getRefcount(b.file.bytes.subarray(block, block + CS), cluster % b.g.refcountBlockEntries, b.g.refcountOrder));
}

describe('check -r all rewrites a broken snapshot table', () => {
  it('completes an incomplete v3 entry in a fresh cluster and frees the old one', async () => {
    const b = build(12, 4, entry(0));
    const { outcome, lines } = await check(b, 'all');
    expect(lines).toEqual(['Repairing snapshot table entry 0 is incomplete']);
    expect(outcome.failure).toBeNull();
    expect(outcome.result).toMatchObject({ corruptions: 0, corruptionsFixed: 1, checkErrors: 0 });
    expect(header(b)).toMatchObject({ snapshotCount: 1, snapshotsOffset: 12 * CS });
    expect(refcountOf(b, 11)).toBe(0);
    const [sn] = await snapshots(b);
    expect(sn).toMatchObject({ extraDataBytes: 24, vmStateBytes: 0x1234n, diskBytes: BigInt(VIRTUAL_BYTES), icount: null, dateSec: 1_700_000_000 });
    expect(new TextDecoder().decode(sn!.nameBytes)).toBe('s1');
    await expectClean(b);
  });

  it('keeps the first 1000 bytes of unknown extra data where there was too much', async () => {
    const b = build(16, 4, entry(1100));
    const { outcome, lines } = await check(b, 'all');
    expect(lines).toEqual(['Discarding too much extra metadata in snapshot table entry 0 (1100 > 1024)']);
    expect(outcome.result).toMatchObject({ corruptions: 0, corruptionsFixed: 1 });
    const [sn] = await snapshots(b);
    expect(sn!.extraDataBytes).toBe(1024);
    expect(sn!.unknownExtra).toEqual(new Uint8Array(1000).fill(0x5a));
    await expectClean(b);
  });

  it('creates the refcount block the new table needs, after the run it found, then takes that run', async () => {
    const b = build(256, 4, entry(0));
    const { outcome } = await check(b, 'all');
    expect(outcome.failure).toBeNull();
    expect(readTableEntry(b.file.bytes.subarray(CS), 1)).toBe(257n * BigInt(CS));
    expect(refcountOf(b, 257)).toBe(1);
    expect(header(b).snapshotsOffset).toBe(256 * CS);
    await expectClean(b);
  });

  it('grows the refcount table when the new block needs it; the old table’s cluster, freed, takes the snapshot table', async () => {
    const b = build(4096, 6, entry(0));
    const { outcome } = await check(b, 'all');
    expect(outcome.failure).toBeNull();
    const h = header(b);
    expect(h.refcountTableOffset).toBeGreaterThan(4096 * CS);
    expect(h.refcountTableClusters).toBeGreaterThan(1);
    expect(h.snapshotsOffset).toBe(1 * CS);
    expect(refcountOf(b, 4097)).toBe(1);
    expect((await snapshots(b))[0]!.extraDataBytes).toBe(24);
    await expectClean(b);
  });

  it('skips the clusters an old table reaching past the end still covers, where QEMU’s overlap check refuses', async () => {
    const b = build(12, 4, entry(4000), 1);
    const { outcome, lines } = await check(b, 'all');
    expect(lines).toContain('Discarding too much extra metadata in snapshot table entry 0 (4000 > 1024)');
    expect(lines).toContain('qcow2_free_clusters failed: Invalid argument');
    expect(lines.join('\n')).not.toMatch(/Marking image as corrupt|failed to update/);
    expect(outcome.failure).toBeNull();
    const oldEnd = 11 * CS + 40 + 4000 + 3;
    expect(header(b).snapshotsOffset).toBe(Math.ceil(oldEnd / CS) * CS);
    await expectClean(b);
  });

  it('gives the clusters back and keeps the old table when the write fails', async () => {
    const b = build(12, 4, entry(0));
    b.file.writableBytes = b.file.bytes.length;
    const { outcome, lines } = await check(b, 'all');
    expect(lines).toEqual(['Repairing snapshot table entry 0 is incomplete', 'ERROR failed to update snapshot table: No space left on device']);
    expect(outcome).toMatchObject({ failure: 'ENOSPC', result: { checkErrors: 1 } });
    expect(header(b).snapshotsOffset).toBe(11 * CS);
    expect(refcountOf(b, 12)).toBe(0);
    const after = await check(b);
    expect(after.lines).toEqual(['ERROR snapshot table entry 0 is incomplete']);
    expect(after.outcome.result).toMatchObject({ corruptions: 1, leaks: 0, checkErrors: 0 });
  });
});
