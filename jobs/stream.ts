/*
 * The stream job (QEMU's block/stream.c, block-stream): pull into the
 * device everything the images between it and `base` allocate, then make
 * `base` the device's backing image.
 *
 * Set-up (startStream): the caller has resolved the device and the base
 * (null: the whole chain, so the device ends with no backing image). The
 * job holds one edge on the device's image (filters skipped) that reads
 * consistently and writes only unchanged data (WRITE_UNCHANGED: streaming
 * never changes what the guest sees), sharing what QEMU's job shares
 * (consistent read, write, write unchanged; not resize, since the length is
 * read once at the start).
 *
 * Run: chain-copy.ts's loop. A stretch the device allocates itself is
 * skipped; otherwise block status of the backing chain down to (not
 * including) the base says whether an intermediate image allocates it, and
 * only then is it read through the device and written into it (zeroes as
 * write-zeroes, like QEMU's copy-on-read). Cost grows with the allocated
 * data. Nothing to stream (the base is already the backing image) ends at
 * once with length 0.
 *
 * Prepare (the point of no return, after success): the device's backing
 * edge moves to the base (or is dropped), the image header is rewritten to
 * name `backingFile` if given, else the base's filename, with the base's
 * format — QEMU does this even when there was nothing to stream — and the
 * intermediate images, which nothing references any more, are closed
 * (they stay valid images on disk). On failure or cancel the chain is left
 * as it was; whatever was copied is already in the device and harmless.
 *
 * Left out: QEMU 6.0+ inserts a copy-on-read filter node above the device
 * (`filter-node-name`) so guest reads help; here guest reads do not copy,
 * and no filter node appears in the graph. A read-only device is made
 * writable (block/chain.ts reopenReadWrite) and is not made read-only again.
 */
import { backingChainNext, changeBackingFile, reopenReadWrite } from '../block/chain.js';
import { Perm } from '../block/flags.js';
import type { BlockGraph } from '../block/graph.js';
import { attachChild, detachChild, replaceChildNode, TransientParent, type BdrvChild, type BlockNode } from '../block/node.js';
import { blockStatusAbove, isAllocated } from '../block/status.js';
import { runChainCopy } from './chain-copy.js';
import { createBlockJob, type BlockJobOptions, type JobContext } from './block-job.js';
import type { Job, JobDriver, OnErrorPolicy } from './job.js';

/** What the job shares with other users of the device (QEMU's basic flags | WRITE). */
const STREAM_SHARED = Perm.CONSISTENT_READ | Perm.WRITE_UNCHANGED | Perm.WRITE;

export interface StreamOptions extends BlockJobOptions {
  device: BlockNode;
  /** Nothing at or below it is copied; it becomes the backing image. null: the whole chain. */
  base: BlockNode | null;
  /** The backing file name written into the header (default: the base's filename). */
  backingFile?: string;
  onError?: OnErrorPolicy;
}

/** Creates and starts a stream job (see the note at the top). */
export async function startStream(ctx: JobContext, opts: StreamOptions): Promise<Job> {
  ctx.jobs.checkNewId(opts.jobId);
  let top = opts.device.skipFilters();
  if (top.readOnly) top = await reopenReadWrite(ctx.graph, top);
  const state: StreamState = { graph: ctx.graph, top, base: opts.base, backingFile: opts.backingFile, onError: opts.onError ?? 'report', edge: null };
  const job = createBlockJob(ctx, streamDriver(state), opts, [opts.device, top]);
  try {
    state.edge = attachChild(new TransientParent(`block job '${opts.jobId}'`), 'stream', 0, top, Perm.CONSISTENT_READ | Perm.WRITE_UNCHANGED, STREAM_SHARED);
  } catch (e) {
    job.earlyFail();
    throw e;
  }
  job.start();
  return job;
}

interface StreamState {
  graph: BlockGraph;
  top: BlockNode;
  base: BlockNode | null;
  backingFile: string | undefined;
  onError: OnErrorPolicy;
  edge: BdrvChild | null;
}

function streamDriver(s: StreamState): JobDriver {
  return {
    type: 'stream',
    run: (job) => streamRun(job, s),
    prepare: () => streamPrepare(s),
    clean: () => {
      if (s.edge) detachChild(s.edge);
      s.edge = null;
    },
  };
}

async function streamRun(job: Job, s: StreamState): Promise<void> {
  const below = backingChainNext(s.top);
  if (below === s.base || !below) return;
  await runChainCopy(job, {
    read: s.edge!,
    write: s.edge!,
    lengthBytes: s.top.totalBytes,
    onError: s.onError,
    ignoreMeans: 'skip',
    zeroesAsWriteZeroes: true,
    decide: async (offset, maxBytes) => {
      const own = await isAllocated(s.top, offset, maxBytes);
      if (own.allocated) return { copy: false, bytes: own.pnum };
      const above = await blockStatusAbove(below, s.base, offset, own.pnum, false);
      // Past the end of the backing chain: nothing more to copy.
      if (above.pnum === 0) return { copy: false, bytes: s.top.totalBytes - offset };
      return { copy: above.depth > 0, bytes: above.pnum };
    },
  });
}

/** stream_prepare: rewire the backing edge, rewrite the header, close what dropped out. */
async function streamPrepare(s: StreamState): Promise<void> {
  const backing = s.top.cowChild;
  if (!backing) return;
  const base = s.base?.skipFilters() ?? null;
  const name = base ? (s.backingFile ?? base.filename) : null;
  await changeBackingFile(s.top, name, base ? base.driver.name : null, false);
  const dropped = backing.node;
  if (s.base) replaceChildNode(backing, s.base);
  else detachChild(backing);
  if (dropped !== s.base) await s.graph.unref(dropped);
}
