/*
 * Committing: copying into a base image everything the images above it
 * hold, so the base reads as the top of the chain did (what `qemu-img
 * commit` runs, QEMU's active commit, a mirror of the top onto the base).
 * The commit block job will drive the same function.
 *
 * Inputs: `source`, a backend on the top image (its reads go through the
 * whole chain); `target`, a writable and resizable backend on the base,
 * which must be in the top's backing chain. Steps, as QEMU's mirror_run
 * for an active commit:
 *   1. a base shorter than the top grows to the top's length (it never
 *      shrinks);
 *   2. the "dirty" areas are found with block status through the chain
 *      down to the base: every granule (the copy unit) that a layer above
 *      the base allocates, even partly. Nothing else is read or written, so
 *      the cost grows with the allocated data, not with the virtual size.
 *      This walk runs twice, once to count (the progress total) and once
 *      to copy; it keeps no list of extents;
 *   3. each dirty run (at most IO_MAX_BYTES) is copied piece by piece, as
 *      mirror_iteration does: the piece's status through the whole chain
 *      decides — data: read it from the top and write it to the base
 *      (whole granules); reads as zero over whole granules and whole
 *      clusters of the base: write zeroes with MAY_UNMAP; neither data nor
 *      zero: discard; anything smaller than a granule is copied;
 *   4. the base is flushed.
 * The granule is the base's cluster size clamped to 4 KiB..64 KiB (64 KiB
 * for formats without clusters), as mirror's default granularity, so the
 * base ends up allocated exactly where QEMU's commit allocates it.
 *
 * Bounds: at most IN_FLIGHT_MAX pieces in flight, each with a buffer of at
 * most IO_MAX_BYTES (16 MiB in all, QEMU's default mirror buffer); buffers
 * are reused. A rate limit (bytes per second, block/ratelimit.ts) delays
 * the next piece; zero and discard pieces cost nothing when the base can
 * unmap. `onProgress(done, total)` is called as pieces complete; `signal`
 * stops issuing pieces, waits for those in flight and rejects with
 * ECANCELED. The first failing piece stops the commit the same way and its
 * error is thrown; the base then holds a mix of old and new data (as with
 * QEMU's commit: the top is still intact and still reads the same).
 *
 * Left out: a dirty bitmap that follows writes made to the chain during
 * the copy. Nothing else writes to the chain in qemu-img; the commit job
 * will have to add it (or block writes) for a live top.
 */
import { BlockError } from './errors.js';
import type { BlockBackend } from './backend.js';
import { Req, Status, alignDown, alignUp, isPowerOfTwo } from './flags.js';
import type { BlockNode } from './node.js';
import { RateLimit } from './ratelimit.js';
import { blockStatusAbove } from './status.js';
import { backingChainNext } from './chain.js';

/** Largest piece (QEMU's MAX_IO_BYTES). */
export const IO_MAX_BYTES = 1 << 20;
/** Pieces in flight at once (QEMU's MAX_IN_FLIGHT). */
export const IN_FLIGHT_MAX = 16;
/** Bounds of the default granule (bdrv_get_default_bitmap_granularity). */
export const GRANULE_MIN_BYTES = 4096;
export const GRANULE_MAX_BYTES = 65536;

export interface CommitOptions {
  /** Bytes per second; 0 or absent: unlimited. */
  rateLimitBytesPerSecond?: number;
  /** Called as pieces complete: bytes done so far and the total to do. */
  onProgress?: (doneBytes: number, totalBytes: number) => void;
  /** The copy unit, a power of two up to IO_MAX_BYTES (default: see the note at the top). */
  granuleBytes?: number;
  /** Aborting it stops the commit (ECANCELED). */
  signal?: AbortSignal;
}

type Method = 'copy' | 'zero' | 'discard';

/** The default granule for copying into `base`. */
export function commitGranule(base: BlockNode): number {
  const cluster = base.driver.getInfo(base)?.clusterBytes;
  if (!cluster) return GRANULE_MAX_BYTES;
  return Math.min(GRANULE_MAX_BYTES, Math.max(GRANULE_MIN_BYTES, cluster));
}

/** Commits the chain above `target`'s node into it (see the note at the top). */
export async function commitAbove(source: BlockBackend, target: BlockBackend, opts: CommitOptions = {}): Promise<void> {
  const top = source.node;
  const base = target.node;
  if (!isBelow(top, base)) throw new BlockError('EINVAL', `'${base.filename}' is not in the backing chain of '${top.filename}'`);
  const lengthBytes = top.totalBytes;
  if (target.getLength() < lengthBytes) await target.truncate(lengthBytes, false);
  const granule = opts.granuleBytes ?? commitGranule(base);
  if (!isPowerOfTwo(granule) || granule > IO_MAX_BYTES) throw new BlockError('EINVAL', `Invalid commit granule ${granule}`);
  let totalBytes = 0;
  for await (const [start, end] of dirtyRuns(top, base, lengthBytes, granule)) totalBytes += end - start;
  const copier = new Copier(source, target, granule, totalBytes, opts);
  try {
    for await (const [start, end] of dirtyRuns(top, base, lengthBytes, granule)) await copier.copyRun(start, end);
  } finally {
    await copier.settle();
  }
  await target.flush();
}

function isBelow(top: BlockNode, base: BlockNode): boolean {
  for (let n = backingChainNext(top); n; n = backingChainNext(n)) if (n === base) return true;
  return false;
}

/**
 * The granule-aligned runs (at most IO_MAX_BYTES each, clipped to the
 * length) that layers above `base` allocate, in order.
 */
async function* dirtyRuns(top: BlockNode, base: BlockNode, lengthBytes: number, granule: number): AsyncGenerator<[number, number]> {
  const maxRun = alignDown(IO_MAX_BYTES, granule);
  let runStart = 0;
  let runEnd = 0;
  for (let offset = 0; offset < lengthBytes; ) {
    const st = await blockStatusAbove(top, base, offset, lengthBytes - offset, false);
    if (!(st.pnum > 0)) throw new BlockError('EIO', `Block status made no progress at offset ${offset}`);
    if (st.depth > 0) {
      const from = alignDown(offset, granule);
      if (from > runEnd) {
        if (runEnd > runStart) yield [runStart, runEnd];
        runStart = from;
      }
      runEnd = Math.min(alignUp(offset + st.pnum, granule), lengthBytes);
      for (; runEnd - runStart >= maxRun; runStart += maxRun) yield [runStart, runStart + maxRun];
    }
    offset += st.pnum;
  }
  if (runEnd > runStart) yield [runStart, runEnd];
}

/** Issues the pieces of dirty runs with bounded concurrency, buffers and rate. */
class Copier {
  private readonly inFlight = new Set<Promise<void>>();
  private readonly spareBuffers: Uint8Array[] = [];
  private readonly limit: RateLimit;
  private readonly targetClusterBytes: number;
  private readonly zeroesAreFree: boolean;
  private doneBytes = 0;
  private failure: unknown = null;

  constructor(
    private readonly source: BlockBackend,
    private readonly target: BlockBackend,
    private readonly granule: number,
    private readonly totalBytes: number,
    private readonly opts: CommitOptions,
  ) {
    this.limit = new RateLimit(opts.rateLimitBytesPerSecond ?? 0);
    this.targetClusterBytes = target.node.driver.getInfo(target.node)?.clusterBytes ?? 0;
    this.zeroesAreFree = target.node.openFlags.unmap && target.node.driver.has.pwriteZeroes;
  }

  /** mirror_iteration over one dirty run. */
  async copyRun(start: number, end: number): Promise<void> {
    for (let offset = start; offset < end; ) {
      this.checkGoOn();
      const { method, bytes } = await this.plan(offset, end - offset);
      await this.issue(offset, bytes, method);
      offset += bytes;
    }
  }

  /** What to do with the piece at `offset` and how long it is. */
  private async plan(offset: number, maxBytes: number): Promise<{ method: Method; bytes: number }> {
    const st = await blockStatusAbove(this.source.node, null, offset, maxBytes, true);
    const data = (st.status & Status.DATA) !== 0;
    let bytes = data ? Math.min(st.pnum, IO_MAX_BYTES) : st.pnum;
    bytes -= bytes % this.granule;
    let method: Method = 'copy';
    if (bytes < this.granule) bytes = this.granule;
    else if (!data && this.wholeTargetClusters(offset, bytes)) method = st.status & Status.ZERO ? 'zero' : 'discard';
    return { method, bytes: Math.min(bytes, maxBytes) };
  }

  private wholeTargetClusters(offset: number, bytes: number): boolean {
    const c = this.targetClusterBytes;
    return c === 0 || (offset % c === 0 && bytes % c === 0);
  }

  private checkGoOn(): void {
    if (this.failure !== null) throw this.failure;
    if (this.opts.signal?.aborted) throw new BlockError('ECANCELED', 'The commit was cancelled');
  }

  /** Starts one piece when a slot is free, then waits out the rate limit. */
  private async issue(offset: number, bytes: number, method: Method): Promise<void> {
    while (this.inFlight.size >= IN_FLIGHT_MAX) await Promise.race(this.inFlight);
    this.checkGoOn();
    const piece = this.perform(offset, bytes, method).then(
      () => {
        this.doneBytes += bytes;
        this.opts.onProgress?.(this.doneBytes, this.totalBytes);
      },
      (e: unknown) => {
        this.failure ??= e;
      },
    );
    const tracked = piece.finally(() => this.inFlight.delete(tracked));
    this.inFlight.add(tracked);
    const delayMs = this.limit.delayFor(method !== 'copy' && this.zeroesAreFree ? 0 : bytes);
    if (delayMs > 0) await sleep(delayMs, this.opts.signal);
  }

  private async perform(offset: number, bytes: number, method: Method): Promise<void> {
    if (method === 'zero') return this.target.pwriteZeroes(offset, bytes, Req.MAY_UNMAP);
    if (method === 'discard') return this.target.pdiscard(offset, bytes);
    const buf = this.spareBuffers.pop() ?? new Uint8Array(IO_MAX_BYTES);
    try {
      const piece = buf.subarray(0, bytes);
      await this.source.pread(offset, piece);
      await this.target.pwrite(offset, piece);
    } finally {
      this.spareBuffers.push(buf);
    }
  }

  /** Waits for every piece in flight; throws the first failure. */
  async settle(): Promise<void> {
    while (this.inFlight.size > 0) await Promise.race(this.inFlight);
    if (this.failure !== null) throw this.failure;
  }
}

/** Waits `ms`, or less when `signal` aborts. */
function sleep(ms: number, signal?: AbortSignal): Promise<void> {
  return new Promise((resolve) => {
    const timer = setTimeout(done, ms);
    signal?.addEventListener('abort', done, { once: true });
    function done() {
      clearTimeout(timer);
      signal?.removeEventListener('abort', done);
      resolve();
    }
  });
}
