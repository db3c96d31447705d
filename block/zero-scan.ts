/*
 * Finding zeroes in buffers: QEMU's buffer_is_zero and qemu-img's
 * is_allocated_sectors / is_allocated_sectors_min, which decide which
 * parts of a data buffer `convert` may leave sparse.
 *
 * Speed: a whole buffer is compared with a zero buffer in one native
 * memcmp (Buffer#compare with ranges allocates nothing); sector by sector,
 * a sector whose first byte is non-zero is data without a scan, so random
 * data costs one byte test per sector and only zero-looking sectors are
 * compared in full.
 */
export const SECTOR_BYTES = 512;

/** Zeroes to compare against; longer ranges are compared in pieces. */
const ZERO_BYTES = 1 << 20;
const zeroes = Buffer.alloc(ZERO_BYTES);

function asBuffer(buf: Uint8Array): Buffer {
  return Buffer.isBuffer(buf) ? buf : Buffer.from(buf.buffer, buf.byteOffset, buf.byteLength);
}

/** Whether sector `index` of `b` is all zero bytes; a non-zero first byte answers without a scan. */
function sectorIsZero(b: Buffer, index: number): boolean {
  const at = index * SECTOR_BYTES;
  return b[at] === 0 && zeroes.compare(b, at, at + SECTOR_BYTES, 0, SECTOR_BYTES) === 0;
}

/** Whether buf[start, end) is all zero bytes. */
export function isZeroRange(buf: Uint8Array, start = 0, end = buf.length): boolean {
  const b = asBuffer(buf);
  for (let at = start; at < end; at += ZERO_BYTES) {
    const stop = Math.min(end, at + ZERO_BYTES);
    if (b[at] !== 0) return false;
    if (zeroes.compare(b, at, stop, 0, stop - at) !== 0) return false;
  }
  return true;
}

/**
 * is_allocated_sectors: whether the first of `n` sectors from `sector`
 * (buffer sector index `first`) holds data, and how many sectors from it
 * share that state — with the end moved to an `alignment` boundary (in
 * sectors, a power of two) so that writes stay aligned on the target.
 */
export function allocatedSectors(
  buf: Uint8Array,
  first: number,
  n: number,
  sector: number,
  alignment: number,
): { data: boolean; count: number } {
  if (n <= 0) return { data: false, count: 0 };
  const b = asBuffer(buf);
  let zero = sectorIsZero(b, first);
  if (zero && isZeroRange(b, first * SECTOR_BYTES, (first + n) * SECTOR_BYTES)) return { data: false, count: n };
  let i = 1;
  while (i < n && sectorIsZero(b, first + i) === zero) i++;
  if (i === n) return { data: !zero, count: n };
  const tail = (sector + i) & (alignment - 1);
  if (tail) {
    // The next sector differs; a short zero run inside an alignment unit
    // would be rewritten by the data's read-modify-write anyway.
    if (zero && i <= tail) zero = false;
    i = zero ? i - tail : Math.min(i + alignment - tail, n);
  }
  return { data: !zero, count: i };
}

/**
 * is_allocated_sectors_min: like allocatedSectors, but once data starts,
 * zero runs shorter than `minSectors` count as data (they do not break up
 * the write).
 */
export function allocatedSectorsMin(
  buf: Uint8Array,
  n: number,
  sector: number,
  minSectors: number,
  alignment: number,
): { data: boolean; count: number } {
  const min = Math.min(minSectors, n);
  const head = allocatedSectors(buf, 0, n, sector, alignment);
  if (!head.data) return head;
  let used = head.count;
  let checked = used;
  while (checked < n) {
    const next = allocatedSectors(buf, checked, n - checked, sector + checked, alignment);
    checked += next.count;
    if (next.data) used = checked;
    else if (next.count >= min) break;
  }
  return { data: true, count: used };
}
