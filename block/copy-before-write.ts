/*
 * Copy-before-write: the filter a backup job puts above its source, and the
 * copy state it shares with the job (QEMU's block/copy-before-write.c and
 * block/block-copy.c, reduced).
 *
 * BlockCopy keeps a copy bitmap over the source, one bit per cluster: set =
 * "the target does not yet hold this cluster as it was when the job
 * started". Whoever copies a cluster first — the job's walk or the filter
 * before a guest write — claims it (clears its bits and registers the range
 * in flight, synchronously, so nobody else copies it again), reads it from
 * the source and writes it to the target; a failed copy sets the bits again
 * and throws. `copyRange` returns only when no bit of the range is set and
 * no copy of it is in flight, so after it a guest write may land: the old
 * data is safe in the target. That gives the point-in-time property.
 *
 * A copy asks block status of the source first: stretches that read as
 * zeroes become write-zeroes on the target, data is read and written
 * (compressed when asked). Pieces are QEMU's block-copy tasks: at most
 * `chunkBytes` (block_copy_chunk_size: the cluster when compressing or
 * when the nodes' max transfer is below a cluster, else COPY_MAX_BYTES or
 * the cluster if larger, capped by the max transfer). A zero run may be
 * claimed whole (up to ZERO_RUN_MAX_BYTES, so an unthrottled copy of a
 * sparse source costs little per GiB); a speed-limited job asks for zero
 * runs in chunks too, since QEMU charges every task, zeroes included, to
 * the rate limit. Errors of the write half are marked (`CopyError.isRead`
 * false) so the job can apply on-target-error.
 *
 * The filter (`copy-before-write`, children `file` = the source and
 * `target`) passes reads through; a write, write-zeroes or discard first
 * waits for copyRange over its range. Without copy state attached (before
 * the job sets it) it is a plain pass-through filter.
 */
import { z } from 'zod';
import type { BlockDriver } from './driver.js';
import { DirtyBitmap } from './dirty-bitmap.js';
import { BlockError, toBlockError } from './errors.js';
import { Perm, Req, Status, alignDown, alignUp } from './flags.js';
import { pdiscard, preadv, pwriteZeroes, pwritev } from './io.js';
import { ChildRole, refreshPermsBelow, type BdrvChild, type BlockNode } from './node.js';
import { filterDefaultPerms, type ParentPerms, type PermPair } from './perms.js';
import { zBlockdevRef } from './options.js';
import { blockStatusAbove } from './status.js';

/** Largest data piece copied at once, unless the cluster is larger (QEMU's BLOCK_COPY_MAX_BUFFER). */
export const COPY_MAX_BYTES = 1 << 20;
/** Longest zero run written with one write-zeroes. */
export const ZERO_RUN_MAX_BYTES = 1 << 30;

/** A failed copy: `isRead` says which half failed. */
export class CopyError extends BlockError {
  constructor(
    readonly isRead: boolean,
    failure: BlockError,
  ) {
    super(failure.code, failure.message, { cause: failure });
  }
}

interface InFlight {
  start: number;
  end: number;
  done: Promise<void>;
}

export interface BlockCopyOptions {
  clusterBytes: number;
  compress: boolean;
  /** Called with the bytes of every completed copy (job progress). */
  onCopied: (bytes: number) => void;
}

export class BlockCopy {
  readonly copyBitmap: DirtyBitmap;
  readonly lengthBytes: number;
  /** Largest piece copied (and claimed) at once: QEMU's block_copy_chunk_size (see the note at the top). */
  readonly chunkBytes: number;
  private readonly inFlight = new Set<InFlight>();
  private readonly buf: Uint8Array;
  private bufBusy: Promise<void> = Promise.resolve();

  constructor(
    readonly source: BdrvChild,
    readonly target: BdrvChild,
    private readonly opts: BlockCopyOptions,
  ) {
    this.lengthBytes = source.node.totalBytes;
    this.copyBitmap = new DirtyBitmap(null, opts.clusterBytes, this.lengthBytes);
    this.buf = new Uint8Array(Math.max(COPY_MAX_BYTES, opts.clusterBytes));
    this.chunkBytes = copyChunkBytes(source.node, target.node, opts);
  }

  get clusterBytes(): number {
    return this.opts.clusterBytes;
  }

  /** Makes [offset, offset + bytes) safe to overwrite (see the note at the top). */
  async copyRange(offsetBytes: number, bytes: number): Promise<void> {
    const start = alignDown(offsetBytes, this.clusterBytes);
    const end = Math.min(alignUp(offsetBytes + bytes, this.clusterBytes), this.lengthBytes);
    for (;;) {
      const area = this.copyBitmap.nextDirtyArea(start, end - start);
      if (area) {
        await this.copyFirstOf(area.offset, area.bytes);
        continue;
      }
      const busy = [...this.inFlight].find((f) => f.start < end && f.end > start);
      if (!busy) return;
      await busy.done;
    }
  }

  /**
   * Copies the first piece of the dirty area [offset, offset + bytes): a
   * zero run of at most `zeroRunMaxBytes` (the chunk, for a speed-limited
   * job), or at most a chunk of data. Returns the bytes claimed (0 when
   * someone else claimed them meanwhile).
   */
  async copyFirstOf(offsetBytes: number, bytes: number, zeroRunMaxBytes = ZERO_RUN_MAX_BYTES): Promise<number> {
    const st = await blockStatusAbove(this.source.node, null, offsetBytes, Math.min(bytes, Math.max(zeroRunMaxBytes, this.chunkBytes)), true);
    const zero = (st.status & Status.ZERO) !== 0;
    let want = Math.min(st.pnum, zero ? zeroRunMaxBytes : this.chunkBytes);
    want = Math.max(this.clusterBytes, alignDown(want, this.clusterBytes));
    // The await above let others run: claim only what is still dirty.
    if (!this.copyBitmap.isDirty(offsetBytes)) return 0;
    const clean = this.copyBitmap.nextClean(offsetBytes, want);
    const claimed = Math.min((clean < 0 ? offsetBytes + want : clean) - offsetBytes, this.lengthBytes - offsetBytes);
    await this.claimAndCopy(offsetBytes, claimed, zero && claimed <= st.pnum);
    return claimed;
  }

  private async claimAndCopy(offsetBytes: number, bytes: number, zero: boolean): Promise<void> {
    this.copyBitmap.resetDirty(offsetBytes, bytes);
    let finish!: () => void;
    const entry: InFlight = { start: offsetBytes, end: offsetBytes + bytes, done: new Promise((r) => (finish = r)) };
    this.inFlight.add(entry);
    try {
      if (zero) await this.writeTarget(() => pwriteZeroes(this.target, offsetBytes, bytes, Req.MAY_UNMAP));
      else await this.copyData(offsetBytes, bytes);
      this.opts.onCopied(bytes);
    } catch (e) {
      this.copyBitmap.setDirty(offsetBytes, bytes);
      throw e;
    } finally {
      this.inFlight.delete(entry);
      finish();
    }
  }

  /** Reads and writes through the one buffer, one copy at a time. */
  private async copyData(offsetBytes: number, bytes: number): Promise<void> {
    const previous = this.bufBusy;
    let release!: () => void;
    this.bufBusy = new Promise((r) => (release = r));
    await previous;
    try {
      const piece = this.buf.subarray(0, bytes);
      try {
        await preadv(this.source, offsetBytes, piece);
      } catch (e) {
        throw new CopyError(true, toBlockError(e));
      }
      const flags = this.opts.compress ? Req.WRITE_COMPRESSED : 0;
      await this.writeTarget(() => pwritev(this.target, offsetBytes, piece, flags));
    } finally {
      release();
    }
  }

  private async writeTarget(write: () => Promise<void>): Promise<void> {
    try {
      await write();
    } catch (e) {
      throw new CopyError(false, toBlockError(e));
    }
  }
}

/**
 * block_copy_chunk_size for read/write copies (no copy offload): the
 * cluster when compressing or when the nodes' max transfer (aligned down
 * to the cluster) is below one, else the larger of COPY_MAX_BYTES and the
 * cluster, capped by that max transfer.
 */
function copyChunkBytes(source: BlockNode, target: BlockNode, opts: BlockCopyOptions): number {
  const limits = [source.limits.maxTransfer, target.limits.maxTransfer].filter((n) => n > 0);
  const maxTransfer = limits.length > 0 ? alignDown(Math.min(...limits), opts.clusterBytes) : Infinity;
  if (opts.compress || maxTransfer < opts.clusterBytes) return opts.clusterBytes;
  return Math.min(Math.max(opts.clusterBytes, COPY_MAX_BYTES), maxTransfer);
}

// ---------------------------------------------------------------- the filter

interface CbwState {
  file: BdrvChild;
  target: BdrvChild;
  copier: BlockCopy | null;
}

const state = (node: BlockNode) => node.opaque as CbwState;

/**
 * Attaches the copy state the filter consults before writes (null:
 * pass-through). The filter's child permissions are derived again: the
 * backup job that attaches it is a user of the filter (QEMU's job edge).
 */
export function setCopyState(filter: BlockNode, copier: BlockCopy | null): void {
  state(filter).copier = copier;
  refreshPermsBelow(filter);
}

/**
 * cbw_child_perm: the target is only written, and shared with all but
 * resizers (its size was checked once). The source gets what the filter's
 * users take; once the filter has users (a backup job always is one) their
 * writes come with consistent reads (the old data is copied first) and
 * nobody may write or resize the source beside the filter.
 */
function cbwChildPerms(filter: BlockNode, role: number, users: ParentPerms): PermPair {
  if (!(role & ChildRole.FILTERED)) return { perm: Perm.WRITE, shared: Perm.ALL & ~Perm.RESIZE };
  let { perm, shared } = filterDefaultPerms(users);
  const st = filter.opaque as CbwState | undefined;
  if (st?.copier || filter.parents.length > 0) {
    if (perm & Perm.WRITE) perm |= Perm.CONSISTENT_READ;
    shared &= ~(Perm.WRITE | Perm.RESIZE);
  }
  return { perm, shared };
}

export function cbwChildren(filter: BlockNode): { file: BdrvChild; target: BdrvChild } {
  return state(filter);
}

async function beforeWrite(node: BlockNode, offsetBytes: number, bytes: number): Promise<void> {
  await state(node).copier?.copyRange(offsetBytes, bytes);
}

export const copyBeforeWriteDriver: BlockDriver = {
  name: 'copy-before-write',
  isFilter: true,
  optionsSchema: z.object({ file: zBlockdevRef, target: zBlockdevRef }),
  async open(node, _options, ctx) {
    // With no users yet the filter takes nothing on its source; its parents arrive later.
    const file = (await ctx.openChild('file', ChildRole.FILTERED | ChildRole.PRIMARY))!;
    const target = (await ctx.openChild('target', ChildRole.DATA))!;
    node.opaque = { file, target, copier: null } satisfies CbwState;
    node.supportedWriteFlags = Req.FUA & file.node.supportedWriteFlags;
    node.supportedZeroFlags = (Req.FUA | Req.MAY_UNMAP | Req.NO_FALLBACK) & file.node.supportedZeroFlags;
  },
  childPerms: cbwChildPerms,
  getLength: async (node) => state(node).file.node.totalBytes,
  coPreadv: (node, offsetBytes, buf, flags) => preadv(state(node).file, offsetBytes, buf, flags),
  async coPwritev(node, offsetBytes, buf, flags) {
    await beforeWrite(node, offsetBytes, buf.length);
    await pwritev(state(node).file, offsetBytes, buf, flags);
  },
  async coPwriteZeroes(node, offsetBytes, bytes, flags) {
    await beforeWrite(node, offsetBytes, bytes);
    await pwriteZeroes(state(node).file, offsetBytes, bytes, flags);
  },
  async coPdiscard(node, offsetBytes, bytes) {
    await beforeWrite(node, offsetBytes, bytes);
    await pdiscard(state(node).file, offsetBytes, bytes);
  },
};
