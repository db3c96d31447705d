/*
 * block-stream and block-commit (blockdev.c qmp_block_stream and
 * qmp_block_commit in QEMU 7.2): the arguments are checked and resolved to
 * nodes in QEMU's order and with its texts, then jobs/stream.ts or
 * jobs/commit.ts does the work. A commit whose top is the device's active
 * layer is an active commit, which jobs/mirror.ts runs (`startActiveCommit`).
 *
 * Lookups: `device` of block-stream, `base-node`, `top-node`, `bottom` name
 * nodes ("Cannot find device='x' nor node-name='x'"); block-commit's
 * `device` missing is DeviceNotFound "Device 'x' not found". `base` and
 * `top` are file names found as bdrv_find_backing_image does
 * (block/chain.ts findBackingImage). A chain here is walked through
 * filters and backing images (bdrv_chain_contains).
 *
 * Not accepted: `backing-mask-protocol` (QEMU 9.0). `filter-node-name`
 * names the job's filter node: copy-on-read for stream, commit_top for an
 * intermediate commit, mirror_top for active commit (jobs/stream.ts,
 * jobs/commit.ts, jobs/mirror-commit.ts).
 */
import { z } from 'zod';
import { backingChainNext, findBackingImage } from '../block/chain.js';
import { BlockError } from '../block/errors.js';
import type { BlockNode } from '../block/node.js';
import { startCommit } from '../jobs/commit.js';
import { startActiveCommit } from '../jobs/mirror.js';
import { JobError } from '../jobs/job.js';
import type { JobContext } from '../jobs/block-job.js';
import { startStream } from '../jobs/stream.js';
import { QmpError, defineCommand, genericError, requireRootNode, type QmpCommand } from './command.js';

export type StreamCommitContext = JobContext;

export const zOnError = z.enum(['report', 'ignore', 'enospc', 'stop', 'auto']);

/** Keys every block job command takes. */
export const zJobCommon = {
  'job-id': z.string().optional(),
  speed: z.number().int().optional(),
  'filter-node-name': z.string().optional(),
  'auto-finalize': z.boolean().optional(),
  'auto-dismiss': z.boolean().optional(),
};

const streamArgs = z.strictObject({
  device: z.string(),
  base: z.string().optional(),
  'base-node': z.string().optional(),
  bottom: z.string().optional(),
  'backing-file': z.string().optional(),
  'on-error': zOnError.optional(),
  ...zJobCommon,
});

const commitArgs = z.strictObject({
  device: z.string(),
  base: z.string().optional(),
  'base-node': z.string().optional(),
  top: z.string().optional(),
  'top-node': z.string().optional(),
  'backing-file': z.string().optional(),
  'on-error': zOnError.optional(),
  ...zJobCommon,
});

/** Runs a handler body, turning job and block errors into QMP GenericErrors. */
export async function asQmp<T>(body: () => Promise<T>): Promise<T> {
  try {
    return await body();
  } catch (e) {
    if (e instanceof JobError || e instanceof BlockError) throw genericError(e.message);
    throw e;
  }
}

/** bdrv_chain_contains: `node` is `top` or below it. */
export function chainContains(top: BlockNode, node: BlockNode): boolean {
  for (let n: BlockNode | null = top; n; n = n.filterOrCowNode) if (n === node) return true;
  return false;
}

/** The bottom image of the chain (bdrv_find_base). */
function chainBottom(top: BlockNode): BlockNode {
  let n = top;
  for (let below = backingChainNext(n); below; below = backingChainNext(n)) n = below;
  return n;
}

/** bdrv_lookup_bs(NULL, name): a node by node name only. */
function nodeNamed(ctx: StreamCommitContext, name: string): BlockNode {
  const node = ctx.graph.nodes.get(name);
  if (!node) throw genericError(`Cannot find device='' nor node-name='${name}'`);
  return node;
}

function bothGiven(a: unknown, b: unknown): boolean {
  return a !== undefined && b !== undefined;
}

/** qmp_block_stream's checks: the base node (null: whole chain). */
function streamBase(ctx: StreamCommitContext, bs: BlockNode, a: z.infer<typeof streamArgs>): BlockNode | null {
  if (bothGiven(a.base, a['base-node'])) throw genericError("'base' and 'base-node' cannot be specified at the same time");
  if (bothGiven(a.base, a.bottom)) throw genericError("'base' and 'bottom' cannot be specified at the same time");
  if (bothGiven(a.bottom, a['base-node'])) throw genericError("'bottom' and 'base-node' cannot be specified at the same time");
  let base: BlockNode | null = null;
  if (a.base !== undefined) {
    base = findBackingImage(bs, a.base);
    if (!base) throw genericError(`Can't find '${a.base}' in the backing chain`);
  }
  if (a['base-node'] !== undefined) {
    base = nodeNamed(ctx, a['base-node']);
    if (base === bs || !chainContains(bs, base)) throw genericError(`Node '${a['base-node']}' is not a backing image of '${a.device}'`);
  }
  if (a.bottom !== undefined) {
    const bottom = nodeNamed(ctx, a.bottom);
    if (bottom.driver.isFilter) throw genericError(`Node '${a.bottom}' is a filter, use a non-filter node as 'bottom'`);
    if (!chainContains(bs, bottom)) throw genericError(`Node '${a.bottom}' is not in a chain starting from '${a.device}'`);
    base = backingChainNext(bottom);
    if (a['backing-file'] !== undefined) throw genericError('backing file specified, but streaming the entire chain');
  }
  if (!base && a['backing-file'] !== undefined) throw genericError('backing file specified, but streaming the entire chain');
  return base;
}

/** qmp_block_commit's checks: top and base nodes. */
function commitTopBase(ctx: StreamCommitContext, bs: BlockNode, a: z.infer<typeof commitArgs>): { top: BlockNode; base: BlockNode } {
  let top = bs;
  if (bothGiven(a['top-node'], a.top)) throw genericError("'top-node' and 'top' are mutually exclusive");
  if (a['top-node'] !== undefined) {
    top = nodeNamed(ctx, a['top-node']);
    if (!chainContains(bs, top)) throw genericError(`'${a['top-node']}' is not in this backing file chain`);
  } else if (a.top !== undefined && a.top !== bs.filename) {
    const found = findBackingImage(bs, a.top);
    if (!found) throw genericError(`Top image file ${a.top} not found`);
    top = found;
  }
  let base: BlockNode;
  if (bothGiven(a['base-node'], a.base)) throw genericError("'base-node' and 'base' are mutually exclusive");
  if (a['base-node'] !== undefined) {
    base = nodeNamed(ctx, a['base-node']);
    if (!chainContains(top, base)) throw genericError(`'${a['base-node']}' is not in this backing file chain`);
  } else if (a.base !== undefined) {
    const found = findBackingImage(top, a.base);
    if (!found) throw genericError(`Can't find '${a.base}' in the backing chain`);
    base = found;
  } else {
    base = chainBottom(top);
  }
  if (top === base) throw genericError('cannot commit an image into itself');
  return { top, base };
}

function commonJobOptions(a: z.infer<z.ZodObject<typeof zJobCommon>>) {
  // Without job-id QEMU falls back to the device name, empty for a node: "Invalid job ID ''".
  return { jobId: a['job-id'] ?? '', speed: a.speed, autoFinalize: a['auto-finalize'], autoDismiss: a['auto-dismiss'] };
}

export const streamCommitCommands: QmpCommand<StreamCommitContext>[] = [
  defineCommand({
    name: 'block-stream',
    args: streamArgs,
    run: (ctx: StreamCommitContext, a: z.infer<typeof streamArgs>) =>
      asQmp(async () => {
        const bs = ctx.graph.node(a.device);
        const base = streamBase(ctx, bs, a);
        await startStream(ctx, { ...commonJobOptions(a), device: bs, base, backingFile: a['backing-file'], onError: a['on-error'], filterNodeName: a['filter-node-name'] });
        return {};
      }),
  }),
  defineCommand({
    name: 'block-commit',
    args: commitArgs,
    run: (ctx: StreamCommitContext, a: z.infer<typeof commitArgs>) =>
      asQmp(async () => {
        const device = ctx.graph.nodes.get(a.device);
        if (!device) throw new QmpError('DeviceNotFound', `Device '${a.device}' not found`);
        const bs = requireRootNode(device).skipFilters();
        const { top, base } = commitTopBase(ctx, bs, a);
        if (top === bs) return activeCommit(ctx, a, top, base);
        await startCommit(ctx, { ...commonJobOptions(a), device, top, base, backingFile: a['backing-file'], onError: a['on-error'], filterNodeName: a['filter-node-name'] });
        return {};
      }),
  }),
];

/** Commit of the active layer: mirror's job (jobs/mirror.ts), READY then job-complete. */
async function activeCommit(ctx: StreamCommitContext, a: z.infer<typeof commitArgs>, top: BlockNode, base: BlockNode): Promise<object> {
  if (a['backing-file'] !== undefined) throw genericError("'backing-file' specified, but 'top' is the active layer");
  await startActiveCommit(ctx, {
    ...commonJobOptions(a),
    top,
    base,
    onError: a['on-error'],
    filterNodeName: a['filter-node-name'],
  });
  return {};
}
