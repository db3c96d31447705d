/*
 * A FIFO of received bytes for incremental parsing (pg-protocol's reader,
 * generalised to many chunks). Socket chunks are kept as they arrive; a
 * `take` inside one chunk is a zero-copy view, one that spans chunks is
 * copied once into a fresh Buffer. `skip` discards bytes without keeping
 * them, so a parser can drop a payload it will not use with O(1) memory.
 *
 * Invariant: `length` is the number of unread bytes; chunks[first] starts
 * at `head`; consumed chunks are released as soon as they are passed.
 */
export class ByteQueue {
  private chunks: Buffer[] = [];
  private first = 0;
  private head = 0;
  length = 0;
  /** The last `take` copied into a buffer from its `alloc`. */
  gathered = false;

  push(chunk: Buffer): void {
    if (chunk.length === 0) return;
    this.chunks.push(chunk);
    this.length += chunk.length;
  }

  /** The next `n` bytes without consuming them (a copy when they span chunks), or null. */
  peek(n: number): Buffer | null {
    if (n > this.length) return null;
    if (n === 0) return Buffer.alloc(0);
    const c = this.chunks[this.first]!;
    if (n <= c.length - this.head) return c.subarray(this.head, this.head + n);
    return this.gather(n, false);
  }

  /**
   * Consumes and returns the next `n` bytes; the caller must check `length`
   * first. Bytes spanning chunks are copied into `alloc(n)` (default: a new
   * Buffer); `gathered` tells afterwards whether the last take did that.
   */
  take(n: number, alloc?: (bytes: number) => Buffer): Buffer {
    this.gathered = false;
    if (n > this.length) throw new RangeError(`ByteQueue.take(${n}) with ${this.length} bytes queued`);
    if (n === 0) return Buffer.alloc(0);
    const c = this.chunks[this.first]!;
    if (n <= c.length - this.head) {
      const out = c.subarray(this.head, this.head + n);
      this.advance(n);
      return out;
    }
    this.gathered = true;
    return this.gather(n, true, alloc);
  }

  /** Discards up to `n` bytes; returns how many were discarded. */
  skip(n: number): number {
    const done = Math.min(n, this.length);
    this.advance(done);
    return done;
  }

  /** Everything still queued, consumed (used when handing a stream over, e.g. to TLS). */
  drain(): Buffer {
    return this.take(this.length);
  }

  private gather(n: number, consume: boolean, alloc?: (bytes: number) => Buffer): Buffer {
    const out = alloc ? alloc(n) : Buffer.allocUnsafe(n);
    let filled = 0;
    let index = this.first;
    let at = this.head;
    while (filled < n) {
      const c = this.chunks[index]!;
      const part = Math.min(c.length - at, n - filled);
      c.copy(out, filled, at, at + part);
      filled += part;
      index++;
      at = 0;
    }
    if (consume) this.advance(n);
    return out;
  }

  private advance(n: number): void {
    this.length -= n;
    while (n > 0) {
      const c = this.chunks[this.first]!;
      const left = c.length - this.head;
      if (n < left) {
        this.head += n;
        return;
      }
      n -= left;
      this.chunks[this.first] = undefined as unknown as Buffer;
      this.first++;
      this.head = 0;
    }
    if (this.first === this.chunks.length) {
      this.chunks = [];
      this.first = 0;
    } else if (this.first > 32 && this.first * 2 > this.chunks.length) {
      this.chunks = this.chunks.slice(this.first);
      this.first = 0;
    }
  }
}
