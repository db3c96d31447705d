/*
 * Ranges of an export recently seen to hold data: a hint that lets a
 * structured READ skip block status and send its range as one OFFSET_DATA
 * chunk.
 *
 * A sparse READ asks block status before reading, to send zero areas as
 * OFFSET_HOLE chunks. For small reads over data that costs as much as the
 * read itself. The server therefore asks block status a long way ahead of
 * the request (HINT_LOOKAHEAD_BYTES; for a file that is one lseek whatever
 * the length, for qcow2 a walk of cached L2 entries that stops at the first
 * change) and remembers up to HINT_EXTENTS ranges the answer said hold data.
 * A later READ inside one of them is read and sent as data at once.
 *
 * The hint never decides what bytes a client gets — those are always read
 * from the export — only whether zero areas inside a remembered range are
 * sent as OFFSET_HOLE chunks or as zero bytes, which the NBD specification
 * lets a server choose freely. A stale hint (a discard through another
 * path) therefore costs sparseness, never correctness. Discards and
 * write-zeroes through the export forget every range, so a client that
 * punches holes sees them as holes in its next reads.
 */

/** Ranges remembered (replaced oldest first). */
export const HINT_EXTENTS = 8;
/** How far past a READ block status is asked, to learn long data ranges at once. */
export const HINT_LOOKAHEAD_BYTES = 1 << 30;

export class DataHint {
  private readonly starts: number[] = [];
  private readonly ends: number[] = [];
  private next = 0;

  /** Whether [offset, offset + bytes) lies inside one remembered range. */
  covers(offsetBytes: number, bytes: number): boolean {
    const end = offsetBytes + bytes;
    for (let i = 0; i < this.starts.length; i++) {
      if (this.starts[i]! <= offsetBytes && end <= this.ends[i]!) return true;
    }
    return false;
  }

  /** Block status said [offset, offset + bytes) holds data. */
  learn(offsetBytes: number, bytes: number): void {
    if (bytes <= 0) return;
    this.starts[this.next] = offsetBytes;
    this.ends[this.next] = offsetBytes + bytes;
    this.next = (this.next + 1) % HINT_EXTENTS;
  }

  /** Something may have turned data into holes. */
  forget(): void {
    this.starts.length = 0;
    this.ends.length = 0;
    this.next = 0;
  }
}
