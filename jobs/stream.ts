/*
 * The stream job (QEMU 7.2's block/stream.c, block-stream): pull into the
 * device everything the images between it and `base` allocate, then make
 * `base` the device's backing image.
 *
 * Set-up (startStream, in stream_start's order): the caller has resolved
 * the device and the base (null: the whole chain, so the device ends with
 * no backing image). No node from the device down to the base may be busy
 * with another job (qmp_block_stream's op blocker check). A read-only
 * device is made writable in place (block/reopen.ts, as stream_start's
 * bdrv_reopen_set_read_only on the node the user named — a filter, when
 * the device is one) and read-only again when the job ends, whatever the
 * outcome (stream_clean; a failure to do so is ignored, as in QEMU), or
 * when the set-up fails. A copy-on-read filter (drivers/copy-on-read.ts) is
 * inserted above the device — named `filter-node-name`, else automatically
 * (`#blockNNN`, as QEMU's implicit filter) — with `bottom` the lowest image
 * streamed from (the base's overlay), and every user of the device
 * (exports, parents) moves onto it, so their reads copy too. Then the job
 * is created (an error there takes the filter out again). Its permissions
 * (jobs/block-job.ts): its BlockBackend reads through the filter
 * (consistent read, sharing consistent read, write and write unchanged;
 * not resize, since the length is read once); an 'active node' edge on the
 * device shares the same; an 'intermediate node' edge on every node below
 * the device down to the base shares only consistent read and write
 * unchanged, so nobody writes or resizes what is being streamed away.
 * The images the job works on are the device's first non-filter node
 * (`top`, QEMU's bdrv_skip_filters) and its backing chain.
 *
 * Run: chain-copy.ts's loop. A stretch the device allocates itself is
 * skipped; otherwise block status of the backing chain down to (not
 * including) the base says whether an intermediate image allocates it, and
 * only then is it read through the filter with Req.PREFETCH: the filter
 * turns that into a copy-on-read of the device (block/copy-on-read-io.ts:
 * cluster-aligned, zeroes as write-zeroes, WRITE_UNCHANGED), so a guest
 * read and the job never copy the same cluster twice. Every failure is a
 * read failure, as in QEMU. Cost grows with the allocated data. Nothing to
 * stream (the base is already the backing image) ends at once with
 * length 0.
 *
 * Prepare (the point of no return, after success): the filter is taken
 * out (its users move back onto the device), the device's backing edge
 * moves to the base (or is dropped), the image header is rewritten to name
 * `backingFile` if given, else the base's filename, with the base's format
 * — QEMU does this even when there was nothing to stream — and the
 * intermediate images, which nothing references any more, are closed
 * (they stay valid images on disk). Clean (after success, failure or
 * cancel) takes the filter out if it is still there and drops the job's
 * edges; on failure or cancel the chain is left as it was, and whatever
 * was copied is already in the device and harmless.
 */
import { backingChainNext, changeBackingFile, setBackingNode } from '../block/chain.js';
import { Perm, Req } from '../block/flags.js';
import type { BlockGraph } from '../block/graph.js';
import { detachChild, type BdrvChild, type BlockNode } from '../block/node.js';
import { reopenSetReadOnly } from '../block/reopen.js';
import { blockStatusAbove, isAllocated } from '../block/status.js';
import { dropCopyOnRead, insertCopyOnRead } from '../drivers/copy-on-read.js';
import { runChainCopy } from './chain-copy.js';
import { checkNodesFree, createBlockJob, jobBackend, JobEdges, type BlockJobOptions, type JobContext } from './block-job.js';
import type { Job, JobDriver, OnErrorPolicy } from './job.js';

/** What the job shares on the nodes it streams from (QEMU's basic_flags). */
const STREAM_BASIC = Perm.CONSISTENT_READ | Perm.WRITE_UNCHANGED;
/** What the job shares with other users of the device (basic_flags | WRITE). */
const STREAM_SHARED = STREAM_BASIC | Perm.WRITE;

export interface StreamOptions extends BlockJobOptions {
  device: BlockNode;
  /** Nothing at or below it is copied; it becomes the backing image. null: the whole chain. */
  base: BlockNode | null;
  /** The backing file name written into the header (default: the base's filename). */
  backingFile?: string;
  onError?: OnErrorPolicy;
  /** Node name of the copy-on-read filter (default: automatic). */
  filterNodeName?: string;
}

interface StreamState {
  graph: BlockGraph;
  /** The node the user named (QEMU's bs): reopened, filtered, held as 'active node'. */
  device: BlockNode;
  /** Its first non-filter node: the image streamed into. */
  top: BlockNode;
  base: BlockNode | null;
  backingFile: string | undefined;
  onError: OnErrorPolicy;
  filter: BlockNode | null;
  /** The job's reading edge on the filter (its BlockBackend). */
  readEdge: BdrvChild | null;
  /** The job's child_job edges: 'active node', 'intermediate node' (set once the job exists). */
  edges: JobEdges | null;
  /** The device was read-only: it is made so again at the end (stream_clean). */
  deviceWasReadOnly: boolean;
}

/** The lowest image above `base` in the chain below `top` (bdrv_find_overlay); `top` when base is its backing. */
function baseOverlay(top: BlockNode, base: BlockNode | null): BlockNode {
  let overlay = top;
  for (let n = backingChainNext(top); n && n !== base?.skipFilters(); n = backingChainNext(n)) overlay = n;
  return overlay;
}

/** The nodes from `device` down to (not including) `base`, through filters and backing images. */
function chainDownTo(device: BlockNode, base: BlockNode | null): BlockNode[] {
  const nodes: BlockNode[] = [];
  for (let n: BlockNode | null = device; n && n !== base; n = n.filterOrCowNode) nodes.push(n);
  return nodes;
}

/** Creates and starts a stream job (see the note at the top). */
export async function startStream(ctx: JobContext, opts: StreamOptions): Promise<Job> {
  const { device, base } = opts;
  checkNodesFree(chainDownTo(device, base));
  const top = device.skipFilters();
  const s: StreamState = { graph: ctx.graph, device, top, base, backingFile: opts.backingFile, onError: opts.onError ?? 'report', filter: null, readEdge: null, edges: null, deviceWasReadOnly: device.readOnly };
  if (s.deviceWasReadOnly) await reopenSetReadOnly(device, false);
  let job: Job;
  try {
    const filter = await insertCopyOnRead(ctx.graph, device, baseOverlay(top, base), opts.filterNodeName);
    s.filter = filter;
    ctx.jobs.checkNewId(opts.jobId);
    job = createBlockJob(ctx, streamDriver(s), opts, [filter]);
  } catch (e) {
    await streamClean(s);
    throw e;
  }
  try {
    s.readEdge = jobBackend(s.filter!, Perm.CONSISTENT_READ, STREAM_SHARED);
    s.edges = new JobEdges(job);
    s.edges.add('active node', device, STREAM_SHARED);
    for (const node of chainDownTo(device, base).slice(1)) s.edges.add('intermediate node', node, STREAM_BASIC);
  } catch (e) {
    await streamClean(s);
    job.earlyFail();
    throw e;
  }
  job.start();
  return job;
}

async function dropFilter(s: StreamState): Promise<void> {
  const filter = s.filter;
  s.filter = null;
  if (filter) await dropCopyOnRead(s.graph, filter);
}

/** The job's BlockBackend and child_job edges go. */
function dropEdges(s: StreamState): void {
  if (s.readEdge) detachChild(s.readEdge);
  s.readEdge = null;
  s.edges?.removeAll();
}

/** stream_clean: the job's edges go, the filter if prepare did not take it out, then a read-only device is so again. */
async function streamClean(s: StreamState): Promise<void> {
  dropEdges(s);
  await dropFilter(s);
  if (!s.deviceWasReadOnly) return;
  s.deviceWasReadOnly = false;
  await reopenSetReadOnly(s.device, true).catch(() => undefined);
}

function streamDriver(s: StreamState): JobDriver {
  return {
    type: 'stream',
    run: (job) => streamRun(job, s),
    prepare: () => streamPrepare(s),
    clean: () => streamClean(s),
  };
}

async function streamRun(job: Job, s: StreamState): Promise<void> {
  const below = backingChainNext(s.top);
  if (below === s.base || !below) return;
  await runChainCopy(job, {
    read: s.readEdge!,
    readFlags: Req.PREFETCH,
    write: null,
    lengthBytes: s.top.totalBytes,
    onError: s.onError,
    ignoreMeans: 'skip',
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

/** stream_prepare: the filter goes, then rewire the backing edge, rewrite the header, close what dropped out. */
async function streamPrepare(s: StreamState): Promise<void> {
  // The intermediate images drop out below: nothing of the job may keep them.
  dropEdges(s);
  await dropFilter(s);
  if (!s.top.cowChild) return;
  const base = s.base?.skipFilters() ?? null;
  const name = base ? (s.backingFile ?? base.filename) : null;
  await changeBackingFile(s.top, name, base ? base.driver.name : null, false);
  await setBackingNode(s.graph, s.top, s.base);
}
