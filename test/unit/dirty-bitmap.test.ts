/*
 * DirtyBitmap and its sparse bit set: byte ranges to granules, queries,
 * resizing, merging, the qcow2 bit layout, and the cost claims (a 4 TiB
 * bitmap with a few dirty extents holds a few chunks and answers "next
 * dirty" without a scan).
 */
import { describe, expect, it } from 'vitest';
import { SparseBits, CHUNK_BITS, popcount32 } from '../../block/dirty-bitmap-bits.js';
import { DirtyBitmap, bitmapCheck, BitmapCheck } from '../../block/dirty-bitmap.js';

const KiB = 1024;
const MiB = 1024 * KiB;
const TiB = 1024 * 1024 * MiB;

const extentsOf = (bm: DirtyBitmap, offset?: number, bytes?: number) =>
  [...bm.extents(offset, bytes)].map((e) => `${e.offset}+${e.bytes}${e.dirty ? 'D' : 'c'}`);

describe('SparseBits', () => {
  it('counts bits set within and across chunks', () => {
    const b = new SparseBits(3 * CHUNK_BITS + 100);
    b.setRange(5, 70);
    expect(b.count).toBe(65);
    b.setRange(CHUNK_BITS - 3, 2 * CHUNK_BITS + 4);
    expect(b.count).toBe(65 + 3 + CHUNK_BITS + 4);
    expect(b.chunkCount).toBe(3);
    b.setRange(0, 10); // overlaps what is set
    expect(b.count).toBe(70 + CHUNK_BITS + 7);
    b.resetRange(0, CHUNK_BITS);
    expect(b.count).toBe(CHUNK_BITS + 4);
    expect(b.chunkCount).toBe(2);
    expect(b.get(CHUNK_BITS)).toBe(true);
    expect(b.get(2 * CHUNK_BITS + 4)).toBe(false);
  });

  it('clamps to its size and never sets bits past it', () => {
    const b = new SparseBits(100);
    b.setRange(90, 500);
    expect(b.count).toBe(10);
    expect(b.nextSet(0, 1000)).toBe(90);
    expect(b.nextClear(90, 1000)).toBe(-1);
    b.resize(95);
    expect(b.count).toBe(5);
    b.resize(200);
    expect(b.count).toBe(5);
    expect(b.nextSet(95, 200)).toBe(-1);
  });

  it('a full chunk drops its words and reading it back gives all ones', () => {
    const b = new SparseBits(2 * CHUNK_BITS);
    b.setRange(0, CHUNK_BITS / 2);
    b.setRange(CHUNK_BITS / 2, CHUNK_BITS);
    expect(b.count).toBe(CHUNK_BITS);
    const out = new Uint8Array(CHUNK_BITS / 8 + 1);
    b.readBytes(0, CHUNK_BITS + 8, out);
    expect(out.subarray(0, CHUNK_BITS / 8).every((v) => v === 0xff)).toBe(true);
    expect(out[CHUNK_BITS / 8]).toBe(0);
    b.resetRange(7, 8);
    expect(b.get(7)).toBe(false);
    expect(b.count).toBe(CHUNK_BITS - 1);
  });

  it('serialises least significant bit first and masks a partial last byte', () => {
    const b = new SparseBits(20);
    b.setRange(0, 1);
    b.setRange(9, 12);
    b.setRange(19, 20);
    const out = new Uint8Array(3);
    b.readBytes(0, 20, out);
    expect([...out]).toEqual([0x01, 0x0e, 0x08]);
    const c = new SparseBits(20);
    c.orBytes(0, 20, Uint8Array.of(0x01, 0x0e, 0xff));
    expect(c.count).toBe(1 + 3 + 4);
    expect(c.nextSet(12, 20)).toBe(16);
  });

  it('popcount32', () => {
    expect(popcount32(0)).toBe(0);
    expect(popcount32(0xffffffff)).toBe(32);
    expect(popcount32(0x80000001)).toBe(2);
  });
});

describe('DirtyBitmap', () => {
  it('marks every granule a byte range touches', () => {
    const bm = new DirtyBitmap('b', 64 * KiB, 4 * MiB);
    bm.setDirty(65 * KiB, 1);
    bm.setDirty(1 * MiB - 1, 2);
    expect(extentsOf(bm)).toEqual(['0+65536c', '65536+65536D', '131072+851968c', '983040+131072D', '1114112+3080192c']);
    expect(bm.dirtyBytes).toBe(3 * 64 * KiB);
    expect(bm.isDirty(64 * KiB)).toBe(true);
    expect(bm.isDirty(128 * KiB)).toBe(false);
  });

  it('next dirty / next clean answer from inside a granule with the offset itself', () => {
    const bm = new DirtyBitmap('b', 4 * KiB, 1 * MiB);
    bm.setDirty(8 * KiB, 8 * KiB);
    expect(bm.nextDirty(0)).toBe(8 * KiB);
    expect(bm.nextDirty(9 * KiB)).toBe(9 * KiB);
    expect(bm.nextDirty(16 * KiB)).toBe(-1);
    expect(bm.nextDirty(0, 8 * KiB)).toBe(-1);
    expect(bm.nextClean(8 * KiB)).toBe(16 * KiB);
    expect(bm.nextClean(3)).toBe(3);
    expect(bm.nextDirtyArea(0, 1 * MiB)).toEqual({ offset: 8 * KiB, bytes: 8 * KiB });
    expect(bm.nextDirtyArea(10 * KiB, 2 * KiB)).toEqual({ offset: 10 * KiB, bytes: 2 * KiB });
    expect([...bm.dirtyExtents()]).toEqual([{ offset: 8 * KiB, bytes: 8 * KiB }]);
    expect(extentsOf(bm, 10 * KiB, 10 * KiB)).toEqual(['10240+6144D', '16384+4096c']);
  });

  it('a size that is not a multiple of the granularity: the last granule is partial', () => {
    const bm = new DirtyBitmap('b', 64 * KiB, 100 * KiB);
    bm.setDirty(99 * KiB, 10 * KiB);
    expect(extentsOf(bm)).toEqual(['0+65536c', '65536+36864D']);
    expect(bm.dirtyBytes).toBe(64 * KiB); // QEMU's count: granules times granularity
    expect(bm.nextClean(64 * KiB)).toBe(-1);
  });

  it('resizing: a grown area is clean, a cut one is forgotten', () => {
    const bm = new DirtyBitmap('b', 512, 8 * KiB);
    bm.setDirty(0, 8 * KiB);
    bm.resize(4 * KiB);
    expect(bm.dirtyBytes).toBe(4 * KiB);
    bm.resize(16 * KiB);
    expect(extentsOf(bm)).toEqual(['0+4096D', '4096+12288c']);
  });

  it('merges bitmaps of the same and of different granularities', () => {
    const target = new DirtyBitmap('t', 64 * KiB, 4 * MiB);
    const fine = new DirtyBitmap('f', 512, 4 * MiB);
    fine.setDirty(70 * KiB, 512);
    target.mergeFrom(fine);
    expect(extentsOf(target)).toEqual(['0+65536c', '65536+65536D', '131072+4063232c']);
    const coarse = new DirtyBitmap('c', 2 * MiB, 4 * MiB);
    coarse.setDirty(3 * MiB, 1);
    fine.mergeFrom(coarse);
    expect(extentsOf(fine)).toEqual(['0+71680c', '71680+512D', '72192+2024960c', '2097152+2097152D']);
    const same = new DirtyBitmap('s', 512, 4 * MiB);
    same.setDirty(1 * MiB, 512);
    same.mergeFrom(fine);
    expect(same.dirtyBytes).toBe(fine.dirtyBytes + 512);
  });

  it('serialises a range as qcow2 stores it and reads it back', () => {
    const bm = new DirtyBitmap('b', 512, 1 * MiB);
    bm.setDirty(0, 512);
    bm.setDirty(4 * KiB + 512, 1024);
    const buf = new Uint8Array(256);
    bm.serialize(0, 1 * MiB, buf);
    expect([...buf.subarray(0, 2)]).toEqual([0x01, 0x06]);
    const back = new DirtyBitmap('c', 512, 1 * MiB);
    back.deserialize(0, 1 * MiB, buf);
    expect(extentsOf(back)).toEqual(extentsOf(bm));
    // A later part of the stream: 4 KiB at 512 B granules = byte 1 of the stream.
    const part = new Uint8Array(1);
    bm.serialize(4 * KiB, 4 * KiB, part);
    expect(part[0]).toBe(0x06);
    expect(() => bm.serialize(512, 4 * KiB, part)).toThrow();
  });

  it('copyBits copies bits only', () => {
    const bm = new DirtyBitmap('b', 4 * KiB, 1 * MiB);
    bm.setDirty(0, 1);
    bm.disabled = true;
    const copy = bm.copyBits(null);
    expect(copy.name).toBeNull();
    expect(copy.disabled).toBe(false);
    expect(copy.dirtyBytes).toBe(4 * KiB);
  });

  it('checks refuse with QEMU\'s messages', () => {
    const bm = new DirtyBitmap('b0', 64 * KiB, 1 * MiB);
    expect(bitmapCheck(bm, BitmapCheck.DEFAULT)).toBeNull();
    bm.inconsistent = true;
    expect(bitmapCheck(bm, BitmapCheck.ALLOW_RO)?.message).toBe(
      "Bitmap 'b0' is inconsistent and cannot be used\nTry block-dirty-bitmap-remove to delete this bitmap from disk",
    );
    bm.readOnly = true;
    expect(bitmapCheck(bm, BitmapCheck.DEFAULT)?.message).toBe("Bitmap 'b0' is readonly and cannot be modified");
    expect(bitmapCheck(bm, BitmapCheck.ALLOW_RO)?.message).toMatch(/inconsistent/);
    bm.busy = true;
    expect(bitmapCheck(bm, BitmapCheck.RO)?.message).toBe("Bitmap 'b0' is readonly and cannot be modified");
    expect(bitmapCheck(bm, BitmapCheck.DEFAULT)?.message).toBe("Bitmap 'b0' is currently in use by another operation and cannot be used");
  });

  describe('cost grows with what is dirty, not with the size', () => {
    it('4 TiB at 64 KiB: a few extents hold a few chunks; queries do not scan', () => {
      const bm = new DirtyBitmap('big', 64 * KiB, 4 * TiB);
      bm.setDirty(1 * TiB, 4 * KiB);
      bm.setDirty(3 * TiB + 5 * MiB, 1 * MiB);
      expect(bm.chunkCount).toBe(2);
      const t0 = performance.now();
      for (let i = 0; i < 1000; i++) {
        expect(bm.nextDirty(0)).toBe(1 * TiB);
        expect(bm.nextDirty(1 * TiB + 64 * KiB)).toBe(3 * TiB + 5 * MiB);
      }
      expect([...bm.dirtyExtents()]).toEqual([
        { offset: 1 * TiB, bytes: 64 * KiB },
        { offset: 3 * TiB + 5 * MiB, bytes: 1 * MiB },
      ]);
      expect(performance.now() - t0).toBeLessThan(500);
    });

    it('4 TiB fully dirty at 64 KiB holds only full chunks, and clears in one step per chunk', () => {
      const bm = new DirtyBitmap('all', 64 * KiB, 4 * TiB);
      bm.setDirty(0, 4 * TiB);
      expect(bm.dirtyBytes).toBe(4 * TiB);
      expect(bm.chunkCount).toBe((4 * TiB) / (64 * KiB) / CHUNK_BITS);
      expect(bm.nextClean(0)).toBe(-1);
      bm.resetDirty(0, 2 * TiB);
      expect(bm.nextDirty(0)).toBe(2 * TiB);
      bm.clear();
      expect(bm.chunkCount).toBe(0);
    });

    it('8 PiB at 512 B: sparse marks stay cheap', () => {
      const size = 2 ** 53 - 2 ** 30;
      const bm = new DirtyBitmap('huge', 512, size);
      for (let i = 0; i < 100; i++) bm.setDirty(i * 2 ** 45, 4 * KiB);
      expect(bm.chunkCount).toBe(100);
      expect(bm.nextDirty(2 ** 45 + 4 * KiB)).toBe(2 * 2 ** 45);
      bm.resize(2 ** 46);
      expect(bm.chunkCount).toBe(2);
    });
  });
});
