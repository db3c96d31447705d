/*
 * BlockBackend: a user's handle on a node (a CLI, an export, a job, an
 * embedding program). It holds one root edge with the permissions the user
 * asked for, checks requests against the node's length (EIO beyond the end,
 * as QEMU's blk_check_byte_request), holds new requests while a drain is in
 * progress, and can be re-pointed at another node (mirror pivot) without the
 * user noticing.
 *
 * Write cache: with `writeCache` off (QEMU's writethrough, qemu-io's
 * default) every write carries FUA, so it is on stable storage when it
 * completes. With it on (writeback) the user flushes when it matters.
 */
import { BlockError } from './errors.js';
import { Perm, Req, type Prealloc } from './flags.js';
import { checkRange, flush, pdiscard, preadv, preadvToHost, pwriteZeroes, pwritev, truncate } from './io.js';
import { drain } from './drain.js';
import { attachChild, detachChild, replaceChildNode, setEdgePerms, type BdrvChild, type BlockNode, type EdgeParent } from './node.js';
import { blockStatus, blockStatusAbove, type ChainStatusResult } from './status.js';
import type { BlockStatusResult, HostRangeSink } from './driver.js';
import type { BlockGraph } from './graph.js';

export interface BackendOptions {
  /** Shown in messages ("block device 'x'"). */
  name?: string;
  /** Ask for write permission (refused on read-only nodes). */
  writable?: boolean;
  /** Ask for resize permission (truncate, writes past the end). */
  resizable?: boolean;
  /** Exactly these permissions instead (blk_new_with_bs's perm), e.g. resize alone for block_resize. */
  perm?: number;
  /** Permissions other users keep (default: all, as QEMU's backends); narrowed after joining the node. */
  shared?: number;
  /** Writes may extend the node (image creation). */
  allowWriteBeyondEof?: boolean;
  /** false = writethrough: every write is FUA. Default true (writeback). */
  writeCache?: boolean;
}

/**
 * I/O limits on a backend (block_set_io_throttle; a member of a throttle
 * group, block/throttle-group.ts). Reads, writes and write-zeroes wait in
 * `intercept` after their range check; a drain turns the limits off.
 */
export interface BackendThrottle {
  intercept(bytes: number, isWrite: boolean): Promise<void>;
  drainedBegin(): void;
  drainedEnd(): void;
}

export class BlockBackend implements EdgeParent {
  readonly name: string;
  private ioThrottle: BackendThrottle | null = null;
  private rootEdge: BdrvChild | null;
  inFlight = 0;
  private quiesceCounter = 0;
  private resumeWaiters: Array<() => void> = [];
  private idleWaiters: Array<() => void> = [];
  allowWriteBeyondEof: boolean;
  writeCache: boolean;

  constructor(
    private readonly graph: BlockGraph,
    node: BlockNode,
    opts: BackendOptions = {},
  ) {
    this.name = opts.name ?? '';
    this.allowWriteBeyondEof = opts.allowWriteBeyondEof ?? false;
    this.writeCache = opts.writeCache ?? true;
    const perm =
      opts.perm ?? Perm.CONSISTENT_READ | (opts.writable ? Perm.WRITE : 0) | (opts.resizable || opts.allowWriteBeyondEof ? Perm.RESIZE : 0);
    // As QEMU's users that narrow sharing (an export: blk_new sharing all, then blk_set_perm):
    // a conflict with the wider first step is the one reported.
    const edge = attachChild(this, 'root', 0, node, perm, Perm.ALL);
    if (opts.shared !== undefined && opts.shared !== Perm.ALL) {
      try {
        setEdgePerms(edge, perm, opts.shared);
      } catch (e) {
        detachChild(edge);
        throw e;
      }
    }
    this.rootEdge = edge;
  }

  describe(): string {
    return this.name ? `block device '${this.name}'` : 'an unnamed block device';
  }

  /** The node requests go to. */
  get node(): BlockNode {
    return this.root.node;
  }

  get root(): BdrvChild {
    if (!this.rootEdge) throw new BlockError('ENOMEDIUM', 'No medium inserted');
    return this.rootEdge;
  }

  get writable(): boolean {
    return (this.root.perm & Perm.WRITE) !== 0;
  }

  /** blk_set_perm: what the root edge takes and shares from now on; a refusal (thrown) leaves both as they were. */
  setPerm(perm: number, shared: number): void {
    setEdgePerms(this.root, perm, shared);
  }

  /** The node's length in bytes. */
  getLength(): number {
    return this.node.totalBytes;
  }

  // ------------------------------------------------------------ drain

  drainedBegin(): void {
    this.quiesceCounter++;
    this.ioThrottle?.drainedBegin();
  }

  drainedEnd(): void {
    this.ioThrottle?.drainedEnd();
    this.quiesceCounter--;
    if (this.quiesceCounter === 0) {
      const waiters = this.resumeWaiters;
      this.resumeWaiters = [];
      for (const w of waiters) w();
    }
  }

  waitIdle(): Promise<void> {
    if (this.inFlight === 0) return Promise.resolve();
    return new Promise((resolve) => this.idleWaiters.push(resolve));
  }

  /** Runs a request: waits out a drain, counts it in flight. */
  private async request<T>(body: () => Promise<T>): Promise<T> {
    while (this.quiesceCounter > 0) await new Promise<void>((resolve) => this.resumeWaiters.push(resolve));
    this.inFlight++;
    try {
      return await body();
    } finally {
      this.inFlight--;
      if (this.inFlight === 0 && this.idleWaiters.length) {
        const waiters = this.idleWaiters;
        this.idleWaiters = [];
        for (const w of waiters) w();
      }
    }
  }

  private checkByteRequest(offsetBytes: number, bytes: number, mayExtend: boolean): void {
    checkRange(offsetBytes, bytes);
    if (mayExtend && this.allowWriteBeyondEof) return;
    const length = this.node.totalBytes;
    if (offsetBytes > length || length - offsetBytes < bytes) throw new BlockError('EIO');
  }

  /** I/O limits, when set (null: none). */
  get throttle(): BackendThrottle | null {
    return this.ioThrottle;
  }

  /** Sets or removes I/O limits; a new throttle starts with limits off if a drain is in progress. */
  setThrottle(throttle: BackendThrottle | null): void {
    this.ioThrottle = throttle;
    for (let i = 0; throttle && i < this.quiesceCounter; i++) throttle.drainedBegin();
  }

  // ------------------------------------------------------------ I/O

  /** Reads `buf.length` bytes at `offsetBytes`. */
  pread(offsetBytes: number, buf: Uint8Array, flags = 0): Promise<void> {
    return this.request(async () => {
      this.checkByteRequest(offsetBytes, buf.length, false);
      if (this.ioThrottle) await this.ioThrottle.intercept(buf.length, false);
      await preadv(this.root, offsetBytes, buf, flags);
    });
  }

  /**
   * Hands `bytes` bytes at `offsetBytes` to `sink` as a host file's range
   * instead of reading them (block/io.ts preadvToHost); false, with nothing
   * done, where the node cannot or I/O limits apply (they meter reads).
   */
  preadToHost(offsetBytes: number, bytes: number, sink: HostRangeSink): Promise<boolean> {
    if (this.ioThrottle) return Promise.resolve(false);
    return this.request(async () => {
      this.checkByteRequest(offsetBytes, bytes, false);
      return preadvToHost(this.root, offsetBytes, bytes, sink);
    });
  }

  /** Writes `buf` at `offsetBytes` (FUA added in writethrough mode). */
  pwrite(offsetBytes: number, buf: Uint8Array, flags = 0): Promise<void> {
    return this.request(async () => {
      this.checkByteRequest(offsetBytes, buf.length, true);
      if (this.ioThrottle) await this.ioThrottle.intercept(buf.length, true);
      await pwritev(this.root, offsetBytes, buf, this.writeFlags(flags));
    });
  }

  /** Makes the range read as zeroes; MAY_UNMAP lets it be deallocated. */
  pwriteZeroes(offsetBytes: number, bytes: number, flags = 0): Promise<void> {
    return this.request(async () => {
      this.checkByteRequest(offsetBytes, bytes, true);
      if (this.ioThrottle) await this.ioThrottle.intercept(bytes, true);
      await pwriteZeroes(this.root, offsetBytes, bytes, this.writeFlags(flags));
    });
  }

  /** Discards the range (a hint; see the gate). */
  pdiscard(offsetBytes: number, bytes: number): Promise<void> {
    return this.request(async () => {
      this.checkByteRequest(offsetBytes, bytes, false);
      await pdiscard(this.root, offsetBytes, bytes);
    });
  }

  flush(): Promise<void> {
    return this.request(() => flush(this.node));
  }

  truncate(sizeBytes: number, exact = true, prealloc: Prealloc = 'off'): Promise<void> {
    return this.request(() => truncate(this.root, sizeBytes, exact, prealloc));
  }

  private writeFlags(flags: number): number {
    return this.writeCache ? flags : flags | Req.FUA;
  }

  /** Block status of the node itself. */
  blockStatus(offsetBytes: number, bytes: number, wantZero = true): Promise<BlockStatusResult> {
    return this.request(() => blockStatus(this.node, offsetBytes, bytes, wantZero));
  }

  /** Block status through the backing chain down to `base` (null: all of it). */
  blockStatusAbove(offsetBytes: number, bytes: number, base: BlockNode | null = null, wantZero = true): Promise<ChainStatusResult> {
    return this.request(() => blockStatusAbove(this.node, base, offsetBytes, bytes, wantZero));
  }

  // ------------------------------------------------------------ graph

  /** Re-points the backend at another node (mirror pivot); requests already in flight finish on the old one. */
  replaceNode(node: BlockNode): void {
    replaceChildNode(this.root, node);
  }

  /**
   * Lets go of the node; it is closed when nothing else holds it. As QEMU's
   * blk_unref of the last reference, the node is drained twice on the way
   * (blk_unref, then blk_remove_bs): jobs using it pause and resume twice.
   */
  async close(): Promise<void> {
    const edge = this.rootEdge;
    if (!edge) return;
    await drain(edge.node);
    await drain(edge.node);
    this.rootEdge = null;
    detachChild(edge);
    await this.graph.unref(edge.node);
  }
}
