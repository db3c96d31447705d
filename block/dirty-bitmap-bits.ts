/*
 * SparseBits: a bit set over [0, sizeBits) whose cost grows with the bits
 * that are set, not with its size (the storage under DirtyBitmap; QEMU's
 * HBitmap, organised differently).
 *
 * Layout. Bits are grouped in chunks of CHUNK_BITS (2^15). A chunk with no
 * bit set does not exist; a chunk with every bit set is `FULL` (no words);
 * any other chunk holds its bits in a Uint32Array of WORDS_PER_CHUNK words
 * (bit i of the chunk is bit i % 32 of word i / 32, so on the little-endian
 * hosts Node runs on the words' bytes are the bit stream, least significant
 * bit first, that qcow2 stores). Chunks live in a Map by chunk index, and
 * the indices of existing chunks in a sorted array, so "next set bit from
 * here" is one binary search plus a scan inside at most a few chunks, and
 * ranges that touch no chunk cost nothing.
 *
 * Costs: a 4 TiB bitmap at 64 KiB granularity (2^26 bits) with a few dirty
 * extents holds a handful of chunks; fully set it holds 2^11 FULL chunks
 * (tens of KiB). Setting or clearing a range costs one step per chunk it
 * covers plus a word loop inside the partial ones; clearing skips chunks
 * that do not exist. Inserting a new chunk index shifts the sorted array
 * (a memmove), amortised over the 2^15 bits the chunk covers.
 *
 * Invariants: no bit at or beyond sizeBits is set; a chunk's `count` is
 * the number of its bits set, 0 < count, and count === CHUNK_BITS exactly
 * when it is FULL; `setBits` is the sum of the counts; `keys` is sorted and
 * holds exactly the Map's keys. Bit indices are integers below 2^53, so
 * chunk arithmetic uses division, never 32-bit shifts, above the chunk.
 */
import { invariant } from './errors.js';

/** log2 of the bits in one chunk. */
const CHUNK_SHIFT = 15;
export const CHUNK_BITS = 1 << CHUNK_SHIFT;
const WORD_BITS = 32;
const WORDS_PER_CHUNK = CHUNK_BITS / WORD_BITS;
const ALL_ONES = 0xffffffff;

interface Chunk {
  /** null: every bit is set (FULL). */
  words: Uint32Array | null;
  count: number;
}

/** Number of bits set in a 32-bit word. */
export function popcount32(v: number): number {
  v -= (v >>> 1) & 0x55555555;
  v = (v & 0x33333333) + ((v >>> 2) & 0x33333333);
  return (Math.imul((v + (v >>> 4)) & 0x0f0f0f0f, 0x01010101) >>> 24) & 0xff;
}

/** Index of the lowest set bit of a non-zero word. */
function lowestBit(v: number): number {
  return 31 - Math.clz32(v & -v);
}

/** Bits [lo, hi) of a word (0 ≤ lo < hi ≤ 32) as a mask. */
function wordMask(lo: number, hi: number): number {
  const upper = hi === WORD_BITS ? ALL_ONES : (1 << hi) - 1;
  return (upper & ~((1 << lo) - 1)) >>> 0;
}

/** First set bit of `words` at or after `from` (chunk-local), or -1. */
function firstSet(words: Uint32Array, from: number): number {
  let wi = from >>> 5;
  let w = (words[wi]! & ~((1 << (from & 31)) - 1)) >>> 0;
  while (w === 0) {
    if (++wi === WORDS_PER_CHUNK) return -1;
    w = words[wi]!;
  }
  return wi * WORD_BITS + lowestBit(w);
}

/** First clear bit of `words` at or after `from` (chunk-local), or -1. */
function firstClear(words: Uint32Array, from: number): number {
  let wi = from >>> 5;
  let w = (~words[wi]! & ~((1 << (from & 31)) - 1)) >>> 0;
  while (w === 0) {
    if (++wi === WORDS_PER_CHUNK) return -1;
    w = ~words[wi]! >>> 0;
  }
  return wi * WORD_BITS + lowestBit(w);
}

export class SparseBits {
  private readonly chunks = new Map<number, Chunk>();
  /** Indices of the chunks in `chunks`, ascending. */
  private keys: number[] = [];
  private setBits = 0;

  constructor(private sizeBitsValue: number) {
    invariant(Number.isSafeInteger(sizeBitsValue) && sizeBitsValue >= 0);
  }

  get sizeBits(): number {
    return this.sizeBitsValue;
  }

  /** Number of bits set. */
  get count(): number {
    return this.setBits;
  }

  /** Chunks held (FULL or with words): what the set costs in memory. */
  get chunkCount(): number {
    return this.keys.length;
  }

  get(bit: number): boolean {
    const chunk = this.chunks.get(Math.floor(bit / CHUNK_BITS));
    if (!chunk) return false;
    if (!chunk.words) return true;
    const local = bit % CHUNK_BITS;
    return ((chunk.words[local >>> 5]! >>> (local & 31)) & 1) === 1;
  }

  /** Sets bits [first, end), clamped to the size. */
  setRange(first: number, end: number): void {
    end = Math.min(end, this.sizeBitsValue);
    for (let b = first; b < end; ) {
      const c = Math.floor(b / CHUNK_BITS);
      const start = c * CHUNK_BITS;
      const lo = b - start;
      const hi = Math.min(end - start, CHUNK_BITS);
      if (lo === 0 && hi === CHUNK_BITS) this.fillChunk(c);
      else this.setInChunk(c, lo, hi);
      b = start + hi;
    }
  }

  /** Clears bits [first, end); chunks that do not exist are skipped. */
  resetRange(first: number, end: number): void {
    end = Math.min(end, this.sizeBitsValue);
    if (first >= end) return;
    let i = this.lowerBound(Math.floor(first / CHUNK_BITS));
    while (i < this.keys.length) {
      const c = this.keys[i]!;
      const start = c * CHUNK_BITS;
      if (start >= end) break;
      const lo = Math.max(first, start) - start;
      const hi = Math.min(end - start, CHUNK_BITS);
      // A chunk that empties leaves `keys`: the next one moves to index i.
      if (!this.resetInChunk(c, lo, hi)) i++;
    }
  }

  /** Clears every bit. */
  resetAll(): void {
    this.chunks.clear();
    this.keys = [];
    this.setBits = 0;
  }

  /** The first set bit in [from, end), or -1. */
  nextSet(from: number, end: number): number {
    end = Math.min(end, this.sizeBitsValue);
    if (from >= end) return -1;
    for (let i = this.lowerBound(Math.floor(from / CHUNK_BITS)); i < this.keys.length; i++) {
      const c = this.keys[i]!;
      const start = c * CHUNK_BITS;
      if (start >= end) return -1;
      const lo = Math.max(from, start) - start;
      const chunk = this.chunks.get(c)!;
      const found = chunk.words ? firstSet(chunk.words, lo) : lo;
      if (found >= 0) return start + found < end ? start + found : -1;
    }
    return -1;
  }

  /** The first clear bit in [from, end), or -1. */
  nextClear(from: number, end: number): number {
    end = Math.min(end, this.sizeBitsValue);
    for (let b = from; b < end; ) {
      const c = Math.floor(b / CHUNK_BITS);
      const chunk = this.chunks.get(c);
      if (!chunk) return b;
      const start = c * CHUNK_BITS;
      if (chunk.words) {
        const found = firstClear(chunk.words, b - start);
        if (found >= 0) return start + found < end ? start + found : -1;
      }
      b = start + CHUNK_BITS;
    }
    return -1;
  }

  /** Changes the size; bits at or beyond a smaller size are cleared, a larger size adds clear bits. */
  resize(sizeBits: number): void {
    invariant(Number.isSafeInteger(sizeBits) && sizeBits >= 0);
    if (sizeBits < this.sizeBitsValue) this.resetRange(sizeBits, this.sizeBitsValue);
    this.sizeBitsValue = sizeBits;
  }

  /** ORs `other` (same chunking, any size: bits past this size are dropped) into this set. */
  orWith(other: SparseBits): void {
    for (const c of other.keys) {
      const src = other.chunks.get(c)!;
      const start = c * CHUNK_BITS;
      if (start >= this.sizeBitsValue) break;
      if (!src.words) {
        this.setRange(start, start + CHUNK_BITS);
        continue;
      }
      const dst = this.materialise(c);
      if (!dst) continue;
      let delta = 0;
      for (let w = 0; w < WORDS_PER_CHUNK; w++) {
        const added = (src.words[w]! & ~dst.words![w]!) >>> 0;
        if (added === 0) continue;
        dst.words![w]! |= added;
        delta += popcount32(added);
      }
      this.addCount(c, dst, delta);
      // Bits of `other` past our size must not survive (only in our last chunk).
      if (start + CHUNK_BITS > this.sizeBitsValue) this.resetRange(this.sizeBitsValue, start + CHUNK_BITS);
    }
  }

  /**
   * Writes bits [first, first + bitCount) as a little-endian bit stream
   * into `out` (first must be a multiple of 8; out is zero-filled first).
   */
  readBytes(first: number, bitCount: number, out: Uint8Array): void {
    invariant(first % 8 === 0 && out.length >= Math.ceil(bitCount / 8));
    out.fill(0);
    const end = first + bitCount;
    for (let i = this.lowerBound(Math.floor(first / CHUNK_BITS)); i < this.keys.length; i++) {
      const c = this.keys[i]!;
      const start = c * CHUNK_BITS;
      if (start >= end) break;
      const chunk = this.chunks.get(c)!;
      const fromBit = Math.max(first, start);
      const toBit = Math.min(end, start + CHUNK_BITS);
      for (let b = fromBit; b < toBit; b += 8) {
        const local = b - start;
        const byte = chunk.words ? (chunk.words[local >>> 5]! >>> (local & 24)) & 0xff : 0xff;
        out[(b - first) >>> 3] = byte;
      }
    }
    if (bitCount % 8) out[bitCount >>> 3]! &= (1 << bitCount % 8) - 1;
  }

  /** Sets the bits of [first, first + bitCount) that are set in the little-endian bit stream `data`. */
  orBytes(first: number, bitCount: number, data: Uint8Array): void {
    invariant(first % 8 === 0 && data.length >= Math.ceil(bitCount / 8));
    const end = Math.min(first + bitCount, this.sizeBitsValue);
    for (let b = first; b < end; ) {
      const c = Math.floor(b / CHUNK_BITS);
      const start = c * CHUNK_BITS;
      const chunkEnd = Math.min(end, start + CHUNK_BITS);
      this.orBytesInChunk(c, b - first, b - start, chunkEnd - b, data);
      b = chunkEnd;
    }
  }

  /** A copy of this set. */
  clone(): SparseBits {
    const copy = new SparseBits(this.sizeBitsValue);
    for (const c of this.keys) {
      const chunk = this.chunks.get(c)!;
      copy.chunks.set(c, { words: chunk.words ? chunk.words.slice() : null, count: chunk.count });
    }
    copy.keys = [...this.keys];
    copy.setBits = this.setBits;
    return copy;
  }

  // ---------------------------------------------------------------- chunks

  /** Index in `keys` of the first chunk index ≥ c. */
  private lowerBound(c: number): number {
    let lo = 0;
    let hi = this.keys.length;
    while (lo < hi) {
      const mid = (lo + hi) >>> 1;
      if (this.keys[mid]! < c) lo = mid + 1;
      else hi = mid;
    }
    return lo;
  }

  private insertChunk(c: number, chunk: Chunk): void {
    this.chunks.set(c, chunk);
    const keys = this.keys;
    if (keys.length === 0 || keys[keys.length - 1]! < c) keys.push(c);
    else keys.splice(this.lowerBound(c), 0, c);
  }

  private removeChunk(c: number): void {
    this.chunks.delete(c);
    this.keys.splice(this.lowerBound(c), 1);
  }

  private fillChunk(c: number): void {
    const chunk = this.chunks.get(c);
    if (!chunk) {
      this.insertChunk(c, { words: null, count: CHUNK_BITS });
      this.setBits += CHUNK_BITS;
      return;
    }
    this.setBits += CHUNK_BITS - chunk.count;
    chunk.words = null;
    chunk.count = CHUNK_BITS;
  }

  /** The chunk with words, created empty if absent; null if FULL (nothing to add). */
  private materialise(c: number): Chunk | null {
    let chunk = this.chunks.get(c);
    if (!chunk) {
      chunk = { words: new Uint32Array(WORDS_PER_CHUNK), count: 0 };
      this.insertChunk(c, chunk);
    }
    return chunk.words ? chunk : null;
  }

  /** Adds `delta` set bits to a chunk; a chunk that becomes full drops its words. */
  private addCount(c: number, chunk: Chunk, delta: number): void {
    chunk.count += delta;
    this.setBits += delta;
    if (chunk.count === CHUNK_BITS) chunk.words = null;
    else if (chunk.count === 0) this.removeChunk(c);
  }

  private setInChunk(c: number, lo: number, hi: number): void {
    const chunk = this.materialise(c);
    if (!chunk) return;
    const words = chunk.words!;
    let delta = 0;
    for (let b = lo; b < hi; ) {
      const wi = b >>> 5;
      const top = Math.min(hi - wi * WORD_BITS, WORD_BITS);
      const added = (wordMask(b & 31, top) & ~words[wi]!) >>> 0;
      words[wi]! |= added;
      delta += popcount32(added);
      b = wi * WORD_BITS + top;
    }
    this.addCount(c, chunk, delta);
  }

  /** Clears chunk-local bits [lo, hi) of an existing chunk; returns whether the chunk was removed. */
  private resetInChunk(c: number, lo: number, hi: number): boolean {
    const chunk = this.chunks.get(c)!;
    if (lo === 0 && hi === CHUNK_BITS) {
      this.setBits -= chunk.count;
      this.removeChunk(c);
      return true;
    }
    if (!chunk.words) chunk.words = new Uint32Array(WORDS_PER_CHUNK).fill(ALL_ONES);
    const words = chunk.words;
    let delta = 0;
    for (let b = lo; b < hi; ) {
      const wi = b >>> 5;
      const top = Math.min(hi - wi * WORD_BITS, WORD_BITS);
      const removed = (wordMask(b & 31, top) & words[wi]!) >>> 0;
      words[wi] = (words[wi]! & ~removed) >>> 0;
      delta += popcount32(removed);
      b = wi * WORD_BITS + top;
    }
    this.addCount(c, chunk, -delta);
    return chunk.count === 0;
  }

  /**
   * ORs `bitCount` bits of `data` starting at data bit `dataBit` into
   * chunk `c` from chunk-local bit `local` (both multiples of 8, except
   * that bitCount may end mid-byte: only those bits are taken).
   */
  private orBytesInChunk(c: number, dataBit: number, local: number, bitCount: number, data: Uint8Array): void {
    const firstByte = dataBit >>> 3;
    const byteCount = Math.ceil(bitCount / 8);
    let any = false;
    for (let k = 0; k < byteCount && !any; k++) any = data[firstByte + k] !== 0;
    if (!any) return;
    const chunk = this.materialise(c);
    if (!chunk) return;
    const words = chunk.words!;
    let delta = 0;
    for (let k = 0; k < byteCount; k++) {
      let byte = data[firstByte + k]!;
      if (k === byteCount - 1 && bitCount % 8) byte &= (1 << bitCount % 8) - 1;
      if (byte === 0) continue;
      const bit = local + k * 8;
      const shifted = (byte << (bit & 24)) >>> 0;
      const added = (shifted & ~words[bit >>> 5]!) >>> 0;
      words[bit >>> 5]! |= added;
      delta += popcount32(added);
    }
    this.addCount(c, chunk, delta);
  }
}
