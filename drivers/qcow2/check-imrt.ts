/*
 * The in-memory refcount table (QEMU's "IMRT"): the refcount of every host
 * cluster as the metadata says it should be, rebuilt by the check from the
 * header, the L1/L2 tables, the snapshot table, the refcount structures and
 * the bitmaps, then compared with the refcounts on disk.
 *
 * Layout. Entries have the image's refcount width and the byte layout of a
 * refcount block (sub-byte widths pack from bit 0, wider ones big-endian),
 * and the array always spans whole clusters, so that a rebuild can write a
 * slice of it to disk as a refcount block, as QEMU does. A value counts up
 * to the width's maximum; counting past it is the "overflow" corruption.
 *
 * Memory. One entry per cluster of the file (plus at most one cluster past
 * its end, which QEMU tolerates): the array grows as references are counted
 * and is refused beyond IMRT_MAX_BYTES with a message and ENOMEM (QEMU's
 * check fails the same way when its allocation fails). QEMU's own limit of
 * INT_MAX clusters (EFBIG) is checked by the caller before anything is read.
 */
import { CheckAbort, hex64, type CheckReport, type CheckResult } from './check-io.js';
import type { CheckState } from './check-state.js';
import type { Qcow2Geometry } from './format.js';

/** Largest in-memory refcount table the check allocates (512 MiB: 2^28 clusters at 16-bit refcounts). */
export const IMRT_MAX_BYTES = 512 * 2 ** 20;

export class RefcountArray {
  /** The entries, in refcount block layout; a whole number of clusters long. */
  bytes: Uint8Array;
  private view: DataView;
  /** Number of entries in use (QEMU's nb_clusters / refcount_table_size). */
  entries = 0;
  private readonly bits: number;

  constructor(
    private readonly geometry: Qcow2Geometry,
    private readonly report: CheckReport,
  ) {
    this.bits = geometry.refcountBits;
    this.bytes = new Uint8Array(0);
    this.view = new DataView(this.bytes.buffer);
  }

  /** Entries the current allocation holds. */
  get capacity(): number {
    return (this.bytes.length * 8) / this.bits;
  }

  /** realloc_refcount_array: room for `entries` entries (whole clusters, new ones zero); ENOMEM past the limit. */
  resize(entries: number): void {
    const clusterBytes = this.geometry.clusterBytes;
    const wanted = Math.ceil(Math.ceil((entries * this.bits) / 8) / clusterBytes) * clusterBytes;
    if (wanted !== this.bytes.length) {
      if (!(wanted <= IMRT_MAX_BYTES)) {
        this.report(
          `ERROR: counting refcounts for ${entries} clusters needs more than the ${IMRT_MAX_BYTES} bytes this implementation allows`,
        );
        throw new CheckAbort('ENOMEM');
      }
      const grown = new Uint8Array(wanted);
      grown.set(this.bytes.subarray(0, Math.min(wanted, this.bytes.length)));
      this.bytes = grown;
      this.view = new DataView(grown.buffer);
    }
    this.entries = entries;
  }

  clear(): void {
    this.bytes.fill(0);
  }

  get(index: number): number {
    switch (this.bits) {
      case 16:
        return this.view.getUint16(index * 2);
      case 32:
        return this.view.getUint32(index * 4);
      case 64:
        return Number(this.view.getBigUint64(index * 8));
      default: {
        const perByte = 8 / this.bits;
        return (this.bytes[Math.floor(index / perByte)]! >> ((index % perByte) * this.bits)) & (2 ** this.bits - 1);
      }
    }
  }

  set(index: number, value: number): void {
    switch (this.bits) {
      case 16:
        this.view.setUint16(index * 2, value);
        return;
      case 32:
        this.view.setUint32(index * 4, value);
        return;
      case 64:
        this.view.setBigUint64(index * 8, BigInt(value));
        return;
      default: {
        const perByte = 8 / this.bits;
        const at = Math.floor(index / perByte);
        const shift = (index % perByte) * this.bits;
        this.bytes[at] = (this.bytes[at]! & ~((2 ** this.bits - 1) << shift)) | (value << shift);
      }
    }
  }

  /** The refcount block that covers refcount table entry `reftableIndex`. */
  refblock(reftableIndex: number): Uint8Array {
    const clusterBytes = this.geometry.clusterBytes;
    return this.bytes.subarray(reftableIndex * clusterBytes, (reftableIndex + 1) * clusterBytes);
  }
}

/** Offsets up to this add any size below 2^31 without leaving the exact range of doubles. */
const SAFE_OFFSET = BigInt(Number.MAX_SAFE_INTEGER - 2 ** 31);

function beyondEnd(c: Counting, offset: bigint, size: number): void {
  c.s.report(
    `ERROR: counting reference for region exceeding the end of the file by one cluster or more: offset 0x${hex64(offset)} size 0x${size.toString(16)}`,
  );
  c.res.corruptions++;
}

/** What counting references needs: the image, the array being built, the counters. */
export interface Counting {
  readonly s: CheckState;
  readonly imrt: RefcountArray;
  readonly res: CheckResult;
}

/**
 * qcow2_inc_refcounts_imrt: counts one reference to every cluster of
 * [offset, offset + size). A region reaching a cluster or more past the end
 * of the file is a corruption and is not counted (the last cluster may be
 * partly written); a refcount at the width's maximum is an overflow.
 * `offset` is a 64-bit value as QEMU holds it (int64 arithmetic).
 */
export function incRefcounts(c: Counting, offset: bigint, size: number): void {
  if (size <= 0) return;
  const { s, imrt, res } = c;
  const { clusterBytes, clusterBits, refcountMax } = s.geometry;
  let start: number;
  let last: number;
  if (offset <= SAFE_OFFSET) {
    // The common case, in plain numbers: offset + size stays below 2^53.
    const at = Number(offset);
    if (at + size - s.file.lengthBytes >= clusterBytes) return beyondEnd(c, offset, size);
    start = Math.floor(at / clusterBytes);
    last = Math.floor((at + size - 1) / clusterBytes);
  } else {
    if (BigInt.asIntN(64, offset + BigInt(size) - BigInt(s.file.lengthBytes)) >= BigInt(clusterBytes)) return beyondEnd(c, offset, size);
    start = Number(BigInt.asUintN(64, offset) >> BigInt(clusterBits));
    last = Number(BigInt.asUintN(64, offset + BigInt(size) - 1n) >> BigInt(clusterBits));
  }
  if (last >= imrt.entries) {
    try {
      imrt.resize(last + 1);
    } catch (e) {
      res.checkErrors++;
      throw e;
    }
  }
  for (let k = start; k <= last; k++) {
    const refcount = imrt.get(k);
    if (refcount >= refcountMax) {
      s.report(`ERROR: overflow cluster offset=0x${(k * clusterBytes).toString(16)}`);
      s.report(
        'Use qemu-img amend to increase the refcount entry width or qemu-img convert to create a clean copy if the image cannot be opened for writing',
      );
      res.corruptions++;
      continue;
    }
    imrt.set(k, refcount + 1);
  }
}
