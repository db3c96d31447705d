/*
 * The qcow2 check (drivers/qcow2/check*.ts) on crafted images in memory,
 * no peers needed: a small image is built consistent (header, refcount
 * table and block, L1 and L2 tables, data clusters, COPIED flags), then
 * one thing is broken and the check must report it with QEMU's words and
 * counters, and repair it when asked. The interop tests compare the same
 * code with qemu-img 7.2 on images QEMU made; these pin the logic case by
 * case, including paths real images rarely reach (overflow, limits).
 */
import { describe, expect, it } from 'vitest';
import { toJsonPretty } from '../../block/qjson.js';
import { Qcow2Checker, checkImage, MAX_CHECK_CLUSTERS, type CheckFile, type CheckOutcome } from '../../drivers/qcow2/check.js';
import { IMRT_MAX_BYTES } from '../../drivers/qcow2/check-imrt.js';
import { EntryMask, Incompat, Qcow2Geometry } from '../../drivers/qcow2/format.js';
import { encodeHeaderCluster, decodeHeader, type Qcow2Header } from '../../drivers/qcow2/header.js';
import { emptyExtensions } from '../../drivers/qcow2/extensions.js';
import { getRefcount, readTableEntry, setRefcount, writeTableEntry } from '../../drivers/qcow2/tables.js';
import { humanSummary, imageCheckOf, printfFixed2 } from '../../qemu-img-ts/img/check.js';
import { MemCheckFile as MemFile } from '../helpers/mem-check-file.js';

/**
 * An image with 512-byte clusters: 0 header, 1 refcount table, 2 refcount
 * block, 3 L1 table (2 entries: 64 KiB of guest), 4 L2 table, then one
 * data cluster per guest cluster in `guest`, in that order, all with
 * refcount 1 and COPIED.
 */
interface Built {
  file: MemFile;
  g: Qcow2Geometry;
  header: Qcow2Header;
}
const CS = 512;
const AT = { reftable: 1 * CS, refblock: 2 * CS, l1: 3 * CS, l2: 4 * CS, data: 5 * CS } as const;

function build(guest: number[] = [0, 1, 2], refcountOrder = 4): Built {
  const g = new Qcow2Geometry(9, refcountOrder);
  const clusters = 5 + guest.length;
  const bytes = new Uint8Array(clusters * CS);
  const header: Qcow2Header = {
    ...decodeHeader(new Uint8Array(0)),
    magic: 0x514649fb,
    version: 3,
    clusterBits: 9,
    virtualBytes: 64 * 1024,
    l1Entries: 2,
    l1TableOffset: AT.l1,
    refcountTableOffset: AT.reftable,
    refcountTableClusters: 1,
    refcountOrder,
    headerBytes: 112,
  };
  const cluster0 = encodeHeaderCluster({ header, unknownFields: new Uint8Array(0), extensions: emptyExtensions(), backingName: null });
  if (typeof cluster0 === 'string') throw new Error(cluster0);
  bytes.set(cluster0, 0);
  writeTableEntry(bytes.subarray(AT.reftable), 0, BigInt(AT.refblock));
  writeTableEntry(bytes.subarray(AT.l1), 0, BigInt(AT.l2) | EntryMask.COPIED);
  guest.forEach((gc, i) => writeTableEntry(bytes.subarray(AT.l2), gc, BigInt(AT.data + i * CS) | EntryMask.COPIED));
  for (let c = 0; c < clusters; c++) setRefcount(bytes.subarray(AT.refblock, AT.refblock + CS), c, refcountOrder, 1);
  return { file: new MemFile(bytes), g, header };
}

function refblockOf(b: Built): Uint8Array {
  return b.file.bytes.subarray(AT.refblock, AT.refblock + CS);
}

function setL2(b: Built, index: number, raw: bigint): void {
  writeTableEntry(b.file.bytes.subarray(AT.l2), index, raw);
}

async function check(b: Built, repair?: 'leaks' | 'all'): Promise<{ outcome: CheckOutcome; lines: string[] }> {
  const lines: string[] = [];
  const outcome = await checkImage(b.file, { repair }, (line, kind) => lines.push(kind === 'error' ? `qemu-img: ${line}` : line));
  if (typeof outcome === 'string') throw new Error(outcome);
  return { outcome, lines };
}

describe('a consistent image', () => {
  it('has no errors, and the allocation statistics of its active L1', async () => {
    const { outcome, lines } = await check(build([0, 1, 5]));
    expect(lines).toEqual([]);
    expect(outcome.failure).toBeNull();
    expect(outcome.result).toMatchObject({ corruptions: 0, leaks: 0, checkErrors: 0, imageEndOffset: 8 * CS });
    expect(outcome.result.bfi).toEqual({ totalClusters: 128, allocatedClusters: 3, fragmentedClusters: 0, compressedClusters: 0 });
  });

  it('counts a cluster whose host offset does not follow the previous one as fragmented', async () => {
    const b = build([0, 1]);
    setL2(b, 1, BigInt(AT.data) | EntryMask.COPIED);
    setL2(b, 0, BigInt(AT.data + CS) | EntryMask.COPIED);
    const { outcome } = await check(b);
    expect(outcome.result.bfi.fragmentedClusters).toBe(1);
  });
});

describe('refcount mismatches', () => {
  it('reports a leak, and -r leaks lowers the refcount on disk', async () => {
    const b = build([0]);
    b.file.bytes = new Uint8Array([...b.file.bytes, ...new Uint8Array(CS)]);
    setRefcount(refblockOf(b), 6, 4, 1);
    const before = await check(b);
    expect(before.lines).toEqual(['Leaked cluster 6 refcount=1 reference=0']);
    expect(before.outcome.result.leaks).toBe(1);
    const repaired = await check(b, 'leaks');
    expect(repaired.lines).toEqual(['Leaked cluster 6 refcount=1 reference=0', 'Repairing cluster 6 refcount=1 reference=0']);
    expect(repaired.outcome.result).toMatchObject({ leaks: 0, leaksFixed: 1 });
    expect(getRefcount(refblockOf(b), 6, 4)).toBe(0);
  });

  it('reports a refcount below the references as a corruption; -r leaks leaves it, -r all fixes it', async () => {
    const b = build([0, 1]);
    setL2(b, 2, BigInt(AT.data)); // a second reference to the first data cluster (no COPIED: refcount 2)
    const { lines, outcome } = await check(b);
    expect(lines).toEqual(['ERROR cluster 5 refcount=1 reference=2', 'ERROR OFLAG_COPIED data cluster: l2_entry=a00 refcount=1']);
    expect(outcome.result.corruptions).toBe(2);
    expect((await check(b, 'leaks')).outcome.result.corruptions).toBe(2);
    const fixed = await check(b, 'all');
    expect(fixed.lines).toEqual([
      'ERROR cluster 5 refcount=1 reference=2',
      'Repairing cluster 5 refcount=1 reference=2',
      'Repairing OFLAG_COPIED data cluster: l2_entry=8000000000000a00 refcount=2',
    ]);
    expect(fixed.outcome.result).toMatchObject({ corruptions: 0, corruptionsFixed: 2 });
    expect((await check(b)).lines).toEqual([]);
  });

  it('needs a rebuild when a referenced cluster has refcount 0, and -r all rebuilds the structure', async () => {
    const b = build([0, 1]);
    refblockOf(b).fill(0);
    const { lines, outcome } = await check(b, 'leaks');
    expect(lines.slice(-2)).toEqual(['ERROR cluster 6 refcount=0 reference=1', 'ERROR need to rebuild refcount structures']);
    expect(outcome.failure).toBe('EIO');
    const rebuilt = await check(b, 'all');
    expect(rebuilt.lines).toContain('Rebuilding refcount structure');
    expect(rebuilt.outcome.failure).toBeNull();
    expect(rebuilt.outcome.result.corruptions).toBe(0);
    expect(rebuilt.outcome.result.corruptionsFixed).toBe(7);
    const after = await check(b);
    expect(after.lines).toEqual([]);
    expect(after.outcome.result.leaks).toBe(0);
    expect(decodeHeader(b.file.bytes).refcountTableOffset).not.toBe(AT.reftable);
  });

  it('counts past the width of 1-bit refcounts as an overflow', async () => {
    const b = build([0], 0);
    setL2(b, 1, BigInt(AT.data));
    const { lines, outcome } = await check(b);
    expect(lines[0]).toBe('ERROR: overflow cluster offset=0xa00');
    expect(lines[1]).toMatch(/^Use qemu-img amend to increase the refcount entry width/);
    expect(outcome.result.corruptions).toBeGreaterThan(0);
  });
});

describe('table entries', () => {
  it('reports reserved bits in L1 and L2 entries', async () => {
    const b = build([0]);
    writeTableEntry(b.file.bytes.subarray(AT.l1), 0, BigInt(AT.l2) | EntryMask.COPIED | 0x100n);
    setL2(b, 0, BigInt(AT.data) | EntryMask.COPIED | 0x0100000000000002n);
    const { lines } = await check(b);
    expect(lines).toEqual([
      'ERROR found L1 entry with reserved bits set: 8000000000000900',
      'ERROR found l2 entry with reserved bits set: 8100000000000a02',
    ]);
  });

  it('reports COPIED on a compressed cluster, with the offset bits only', async () => {
    const b = build([0]);
    // 512-byte clusters: x = 62 - (9 - 8) = 61 offset bits; one extra sector at bit 61.
    const descriptor = EntryMask.COMPRESSED | EntryMask.COPIED | (1n << 61n) | BigInt(AT.data);
    setL2(b, 0, descriptor);
    const { lines } = await check(b);
    expect(lines[0]).toBe('ERROR: coffset=0xa00: copied flag must never be set for compressed clusters');
  });

  it('reports a reference more than a cluster past the end of the file', async () => {
    const b = build([0]);
    setL2(b, 1, 0x100000n | EntryMask.COPIED);
    const { lines, outcome } = await check(b);
    expect(lines).toContain(
      'ERROR: counting reference for region exceeding the end of the file by one cluster or more: offset 0x100000 size 0x200',
    );
    expect(outcome.result.corruptions).toBeGreaterThan(0);
  });

  it('repairs a missing COPIED flag under -r leaks only when nothing else is wrong', async () => {
    const b = build([0]);
    writeTableEntry(b.file.bytes.subarray(AT.l1), 0, BigInt(AT.l2));
    const { lines } = await check(b);
    expect(lines).toEqual(['ERROR OFLAG_COPIED L2 cluster: l1_index=0 l1_entry=800 refcount=1']);
    const fixed = await check(b, 'leaks');
    expect(fixed.lines).toEqual(['Repairing OFLAG_COPIED L2 cluster: l1_index=0 l1_entry=800 refcount=1']);
    expect(readTableEntry(b.file.bytes.subarray(AT.l1), 0)).toBe(BigInt(AT.l2) | EntryMask.COPIED);
  });
});

describe('refcount structures', () => {
  it('reports a refcount table entry with reserved bits, and one past the end of the file', async () => {
    const b = build([0]);
    writeTableEntry(b.file.bytes.subarray(AT.reftable), 1, 0x100000n);
    writeTableEntry(b.file.bytes.subarray(AT.reftable), 2, 0x1n);
    const { lines } = await check(b);
    expect(lines).toEqual(['ERROR refcount block 1 is outside image', 'ERROR refcount table entry 2 has reserved bits set']);
  });

  it('signals an unaligned refcount block once: non-fatal read-only, fatal (corrupt bit) writable', async () => {
    const { file } = bigClusterImage();
    writeTableEntry(file.bytes.subarray(0x10000), 0, 0x28000n);
    file.writable = false;
    const lines: string[] = [];
    const outcome = await checkImage(file, {}, (l) => lines.push(l));
    expect(typeof outcome).not.toBe('string');
    expect(lines[1]).toBe(
      'qcow2: Image is corrupt: Refblock offset 0x28000 unaligned (reftable index: 0); further non-fatal corruption events will be suppressed',
    );
    expect(lines.filter((l) => l.startsWith('qcow2:'))).toHaveLength(1);
    expect(lines.filter((l) => l.startsWith("Can't get refcount for cluster"))).toHaveLength(6);
    const rw = bigClusterImage();
    writeTableEntry(rw.file.bytes.subarray(0x10000), 0, 0x28000n);
    const rwLines: string[] = [];
    const checker = await Qcow2Checker.open(rw.file, (l) => rwLines.push(l));
    if (typeof checker === 'string') throw new Error(checker);
    const first = await checker.check();
    expect(rwLines[1]).toMatch(/^qcow2: Marking image as corrupt: Refblock offset 0x28000 unaligned/);
    expect(decodeHeader(rw.file.bytes).incompatibleFeatures & Incompat.CORRUPT).toBe(Incompat.CORRUPT);
    expect(first.result.checkErrors).toBe(6);
    expect((await checker.check()).failure).toBe('ENOMEDIUM');
  });
});

/** A 64 KiB-cluster image like qemu-img's: header, reftable, refblock, L1, L2, one data cluster. */
function bigClusterImage(): { file: MemFile } {
  const cs = 0x10000;
  const header: Qcow2Header = {
    ...decodeHeader(new Uint8Array(0)),
    magic: 0x514649fb,
    version: 3,
    clusterBits: 16,
    virtualBytes: 1 << 20,
    l1Entries: 1,
    l1TableOffset: 3 * cs,
    refcountTableOffset: cs,
    refcountTableClusters: 1,
    refcountOrder: 4,
    headerBytes: 112,
  };
  const bytes = new Uint8Array(6 * cs);
  const cluster0 = encodeHeaderCluster({ header, unknownFields: new Uint8Array(0), extensions: emptyExtensions(), backingName: null });
  if (typeof cluster0 === 'string') throw new Error(cluster0);
  bytes.set(cluster0);
  writeTableEntry(bytes.subarray(cs), 0, BigInt(2 * cs));
  writeTableEntry(bytes.subarray(3 * cs), 0, BigInt(4 * cs) | EntryMask.COPIED);
  writeTableEntry(bytes.subarray(4 * cs), 0, BigInt(5 * cs) | EntryMask.COPIED);
  for (let c = 0; c < 6; c++) setRefcount(bytes.subarray(2 * cs, 3 * cs), c, 4, 1);
  return { file: new MemFile(bytes) };
}

describe('unaligned entries with 64 KiB clusters', () => {
  const cases: Array<[string, number, bigint, string]> = [
    ['data cluster', 0x40000 + 8, 0x50200n | EntryMask.COPIED, 'ERROR offset=50200: Data cluster is not properly aligned; L2 entry corrupted.'],
    ['L2 table', 0x30000, 0x40200n | EntryMask.COPIED, 'ERROR l2_offset=40200: Table is not cluster aligned; L1 entry corrupted'],
  ];
  it.each(cases)('reports an unaligned %s', async (_what, at, entry, message) => {
    const { file } = bigClusterImage();
    writeTableEntry(file.bytes.subarray(at), 0, entry);
    const lines: string[] = [];
    await checkImage(file, {}, (l) => lines.push(l));
    expect(lines[0]).toBe(message);
  });

  it('-r all turns an unaligned preallocated zero cluster into a plain zero cluster', async () => {
    const { file } = bigClusterImage();
    writeTableEntry(file.bytes.subarray(0x40000), 1, 0x50200n | EntryMask.ZERO);
    const lines: string[] = [];
    const outcome = await checkImage(file, { repair: 'all' }, (l) => lines.push(l));
    expect(lines[0]).toBe('Repairing offset=50200: Preallocated cluster is not properly aligned; L2 entry corrupted.');
    expect(readTableEntry(file.bytes.subarray(0x40000), 1)).toBe(EntryMask.ZERO);
    expect(typeof outcome !== 'string' && outcome.result.corruptionsFixed).toBeGreaterThanOrEqual(1);
  });
});

describe('limits', () => {
  /** A file that claims `lengthBytes` but holds only `image`'s bytes (zeros after). */
  function claimed(image: MemFile, lengthBytes: number): CheckFile {
    return { ...image, lengthBytes, writable: false, read: (o, b) => image.read(o, b), write: () => Promise.resolve(), grow: () => Promise.resolve(), discard: () => Promise.resolve(), flush: () => Promise.resolve() };
  }

  it('refuses more than INT_MAX clusters, as QEMU (EFBIG)', async () => {
    const b = build([0]);
    const lines: string[] = [];
    const outcome = await checkImage(claimed(b.file, (MAX_CHECK_CLUSTERS + 1) * CS), {}, (l) => lines.push(l));
    expect(outcome).toMatchObject({ failure: 'EFBIG' });
    expect(typeof outcome !== 'string' && outcome.result.checkErrors).toBe(1);
  });

  it('refuses an in-memory refcount table beyond IMRT_MAX_BYTES with a message (ENOMEM)', async () => {
    const b = build([0]);
    const clusters = (IMRT_MAX_BYTES / 2) * 2; // 16-bit refcounts: twice the limit in bytes
    const lines: string[] = [];
    const outcome = await checkImage(claimed(b.file, clusters * CS), {}, (l) => lines.push(l));
    expect(outcome).toMatchObject({ failure: 'ENOMEM' });
    expect(lines[0]).toMatch(/^ERROR: counting refcounts for \d+ clusters needs more than the \d+ bytes this implementation allows$/);
  });
});

describe('snapshot table', () => {
  /** Adds one snapshot table entry (at cluster 5+n) with `extra` bytes of extra data and an L1 table of the active one. */
  function withSnapshot(b: Built, extra: number): void {
    const entry = new Uint8Array(40 + extra + 2);
    const v = new DataView(entry.buffer);
    v.setBigUint64(0, BigInt(AT.l1));
    v.setUint32(8, 2);
    v.setUint16(12, 1);
    v.setUint16(14, 1);
    v.setUint32(36, extra);
    entry.set([0x31, 0x73], 40 + extra); // id "1", name "s"
    const at = b.file.bytes.length;
    b.file.bytes = new Uint8Array([...b.file.bytes, ...entry, ...new Uint8Array(Math.ceil(entry.length / CS) * CS - entry.length)]);
    const h = new DataView(b.file.bytes.buffer);
    h.setUint32(60, 1);
    h.setBigUint64(64, BigInt(at));
    setRefcount(refblockOf(b), at / CS, 4, 1);
  }

  it('counts the snapshot L1 table, flags an incomplete v3 entry', async () => {
    const b = build([0]);
    withSnapshot(b, 0);
    const { lines } = await check(b);
    expect(lines[0]).toBe('ERROR snapshot table entry 0 is incomplete');
  });

  it('fails on too much extra data, with the hint to use -r all', async () => {
    const b = build([0]);
    withSnapshot(b, 2000);
    const { lines, outcome } = await check(b);
    expect(lines).toEqual([
      'qemu-img: ERROR failed to read the snapshot table: Too much extra metadata in snapshot table entry 0',
      'You can force-remove this extra metadata with qemu-img check -r all',
    ]);
    expect(outcome.failure).toBe('EFBIG');
    expect(outcome.result.checkErrors).toBe(1);
  });
});

describe('qemu-img check output', () => {
  it('prints percentages as glibc printf("%0.2f") does: the exact double, ties to even', () => {
    expect(printfFixed2(12.125)).toBe('12.12');
    expect(printfFixed2(12.375)).toBe('12.38');
    expect(printfFixed2(0.125)).toBe('0.12');
    expect(printfFixed2((1 * 100.0) / 3)).toBe('33.33');
    expect(printfFixed2(1.015)).toBe('1.01'); // the double is 1.01499999…
    expect(printfFixed2(100)).toBe('100.00');
    expect(printfFixed2((24579 * 100.0) / 64)).toBe('38404.69');
  });

  it('summarises like dump_human_image_check', () => {
    const result = { corruptions: 2, leaks: 1, checkErrors: 1, corruptionsFixed: 0, leaksFixed: 0, imageEndOffset: 4096 };
    const text = humanSummary({ ...result, bfi: { totalClusters: 64, allocatedClusters: 18, fragmentedClusters: 1, compressedClusters: 0 } });
    expect(text).toBe(
      '\n2 errors were found on the image.\nData may be corrupted, or further writes to the image may corrupt it.\n' +
        '\n1 leaked clusters were found on the image.\nThis means waste of disk space, but no harm to data.\n' +
        '\n1 internal errors have occurred during the check.\n' +
        '18/64 = 28.12% allocated, 5.56% fragmented, 0.00% compressed clusters\n' +
        'Image end offset: 4096\n',
    );
  });

  it('prints ImageCheck JSON in QEMU key order, optional members only when non-zero', () => {
    const result = { corruptions: 0, leaks: 1, checkErrors: 0, corruptionsFixed: 0, leaksFixed: 0, imageEndOffset: 1638400 };
    const outcome = { result: { ...result, bfi: { totalClusters: 64, allocatedClusters: 18, fragmentedClusters: 1, compressedClusters: 0 } }, failure: null };
    expect(toJsonPretty(imageCheckOf(outcome, 'leak.qcow2'))).toBe(
      [
        '{',
        '    "image-end-offset": 1638400,',
        '    "total-clusters": 64,',
        '    "check-errors": 0,',
        '    "leaks": 1,',
        '    "allocated-clusters": 18,',
        '    "filename": "leak.qcow2",',
        '    "format": "qcow2",',
        '    "fragmented-clusters": 1',
        '}',
      ].join('\n'),
    );
  });
});
