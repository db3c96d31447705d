/*
 * Zero detection for convert (block/zero-scan.ts) against a plain
 * sector-by-sector reading of qemu-img's is_allocated_sectors(_min):
 * fast-check builds buffers out of zero and data sectors (and data sectors
 * whose first byte is zero) and both must agree on every answer.
 */
import fc from 'fast-check';
import { describe, expect, it } from 'vitest';
import { SECTOR_BYTES, allocatedSectors, allocatedSectorsMin, isZeroRange } from '../../block/zero-scan.js';

const naiveZero = (buf: Uint8Array, s: number) => buf.subarray(s * SECTOR_BYTES, (s + 1) * SECTOR_BYTES).every((b) => b === 0);

function naiveAllocated(buf: Uint8Array, first: number, n: number, sector: number, alignment: number) {
  if (n <= 0) return { data: false, count: 0 };
  let zero = naiveZero(buf, first);
  let i = 1;
  while (i < n && naiveZero(buf, first + i) === zero) i++;
  if (i === n) return { data: !zero, count: n };
  const tail = (sector + i) & (alignment - 1);
  if (tail) {
    if (zero && i <= tail) zero = false;
    i = zero ? i - tail : Math.min(i + alignment - tail, n);
  }
  return { data: !zero, count: i };
}

function naiveMin(buf: Uint8Array, n: number, sector: number, min: number, alignment: number) {
  min = Math.min(min, n);
  const head = naiveAllocated(buf, 0, n, sector, alignment);
  if (!head.data) return head;
  let used = head.count;
  let checked = used;
  while (checked < n) {
    const next = naiveAllocated(buf, checked, n - checked, sector + checked, alignment);
    checked += next.count;
    if (next.data) used = checked;
    else if (next.count >= min) break;
  }
  return { data: true, count: used };
}

/** Sector kinds: 0 zero, 1 data, 2 data starting with a zero byte. */
function buffer(kinds: number[]): Uint8Array {
  const buf = new Uint8Array(kinds.length * SECTOR_BYTES);
  kinds.forEach((k, i) => {
    if (k === 1) buf.fill(0xab, i * SECTOR_BYTES, (i + 1) * SECTOR_BYTES);
    if (k === 2) buf[(i + 1) * SECTOR_BYTES - 1] = 1;
  });
  return buf;
}

describe('zero detection', () => {
  it('isZeroRange sees a single non-zero byte anywhere, across its 1 MiB pieces', () => {
    const buf = new Uint8Array(3 << 20);
    expect(isZeroRange(buf)).toBe(true);
    for (const at of [0, 1, (1 << 20) - 1, 1 << 20, (3 << 20) - 1]) {
      buf[at] = 9;
      expect(isZeroRange(buf)).toBe(false);
      expect(isZeroRange(buf, 0, at)).toBe(true);
      buf[at] = 0;
    }
  });

  it('agrees with qemu-img on every mix of zero and data sectors', () => {
    const seed = Number(process.env.PROPERTY_SEED ?? Date.now() % 2 ** 31);
    console.log(`zero-scan.test: seed=${seed}`);
    fc.assert(
      fc.property(
        fc.array(fc.constantFrom(0, 0, 1, 2), { minLength: 1, maxLength: 64 }),
        fc.nat(100),
        fc.constantFrom(1, 2, 8, 16),
        fc.integer({ min: 1, max: 16 }),
        (kinds, sector, alignment, min) => {
          const buf = buffer(kinds);
          expect(allocatedSectors(buf, 0, kinds.length, sector, alignment)).toEqual(naiveAllocated(buf, 0, kinds.length, sector, alignment));
          expect(allocatedSectorsMin(buf, kinds.length, sector, min, alignment)).toEqual(naiveMin(buf, kinds.length, sector, min, alignment));
        },
      ),
      { seed, numRuns: 500 },
    );
  });
});
