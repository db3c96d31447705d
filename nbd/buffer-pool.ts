/*
 * Reusable data buffers for the server's reads.
 *
 * A fresh Buffer per READ costs more than the read itself: buffers this
 * large are mmap'ed and unmapped by malloc, every page faults on first
 * touch, and V8 counts the external memory and collects garbage more often.
 * The pool keeps released buffers in power-of-two size classes (from
 * MIN_CLASS_BYTES up) and hands them out again; `acquire(n)` returns a view
 * of exactly n bytes of a class buffer. At most `maxPooledBytes` are kept;
 * beyond that released buffers are left to the garbage collector, so the
 * pool never holds more than that bound.
 *
 * A buffer must be released only when nothing references it any more (for
 * a reply: after the socket's write callback), and at most once.
 */

/** Smallest class; smaller requests use a buffer of this size. */
export const MIN_CLASS_BYTES = 4096;
/** Default bound on the bytes kept in the pool. */
export const DEFAULT_POOLED_BYTES = 64 * 1024 * 1024;

export class BufferPool {
  private readonly free = new Map<number, Buffer[]>();
  private pooledBytes = 0;

  constructor(private readonly maxPooledBytes = DEFAULT_POOLED_BYTES) {}

  /** A buffer of exactly `bytes` bytes (contents undefined). */
  acquire(bytes: number): Buffer {
    const cls = classBytes(bytes);
    const list = this.free.get(cls);
    const whole = list?.pop();
    if (whole) {
      this.pooledBytes -= cls;
      return whole.subarray(0, bytes);
    }
    return Buffer.allocUnsafeSlow(cls).subarray(0, bytes);
  }

  /** Gives back a buffer from `acquire`. */
  release(buf: Buffer): void {
    const cls = buf.buffer.byteLength;
    if (buf.byteOffset !== 0 || cls !== classBytes(cls) || this.pooledBytes + cls > this.maxPooledBytes) return;
    const whole = Buffer.from(buf.buffer, 0, cls);
    let list = this.free.get(cls);
    if (!list) this.free.set(cls, (list = []));
    list.push(whole);
    this.pooledBytes += cls;
  }

  /** Bytes currently kept for reuse. */
  get keptBytes(): number {
    return this.pooledBytes;
  }
}

/** The class (a power of two, at least MIN_CLASS_BYTES) that holds `bytes`. */
export function classBytes(bytes: number): number {
  let cls = MIN_CLASS_BYTES;
  while (cls < bytes) cls *= 2;
  return cls;
}
