/*
 * blockdev-mirror and drive-mirror (QEMU 7.2 blockdev.c: qmp_blockdev_mirror,
 * qmp_drive_mirror, blockdev_mirror_common). Arguments are checked in
 * QEMU's order with its texts, nodes resolved, then jobs/mirror.ts does
 * the work. block-job-change reaches the mirror through JobDriver.change
 * (qmp/commands-jobs.ts).
 *
 * blockdev-mirror: `device` and `target` name nodes ("Cannot find
 * device='x' nor node-name='x'"); the device must be a root node, used by
 * nothing but BlockBackends — a node under another node (a job's filter
 * included) or held by a job is refused ("Need a root block node", also
 * for drive-mirror); a target that a BlockBackend uses is
 * refused ("Cannot mirror to an attached block device"); sync top of a
 * node without backing is sync full; sync incremental/bitmap are refused
 * ("Sync mode 'x' not supported"); `replaces` names the node whose users
 * move to the target.
 *
 * drive-mirror: `target` is a file name. With mode absolute-paths (the
 * default) the image is created first, as bdrv_img_create: in `format`
 * (default: the source's format) at the source's size, with no backing
 * for sync full (or a source without backing), else backed by the
 * source's backing image (sync top) or by the source itself (sync none).
 * With mode existing the file is opened as it is (format probed unless
 * given). The target is opened with `node-name` when given; `replaces`
 * requires it. It is opened without its backing image (BDRV_O_NO_BACKING:
 * the source's own file may be that image, and opening it twice would
 * fail on the source's locks); the job attaches it when it ends without
 * error — the source or its backing image (absolute-paths), the file the
 * header names (existing). The job holds the target; once the job is gone
 * nothing else does and it closes, unless the pivot made it the users' node.
 *
 * zero_target (jobs/mirror.ts zeroTarget): blockdev-mirror sets it for
 * sync full as asked (a top without backing, run as full, does not);
 * drive-mirror for sync full (after that same change) when the target
 * existed (mode existing) or its format has no zero init. blockdev-mirror
 * always unmaps; drive-mirror takes `unmap` (default true).
 *
 * Left out: target-is-zero (10.1), `replaces` size checks.
 */
import { z } from 'zod';
import { createImage } from '../block/create.js';
import { backingChainNext } from '../block/chain.js';
import { BlockNode } from '../block/node.js';
import type { BlockGraph } from '../block/graph.js';
import { startMirror, type CopyMode, type MirrorSync } from '../jobs/mirror.js';
import type { JobRegistry } from '../jobs/registry.js';
import { defineCommand, genericError, requireRootNode, type QmpCommand } from './command.js';
import { asQmp, zJobCommon, zOnError } from './commands-stream-commit.js';

export interface MirrorCommandContext {
  graph: BlockGraph;
  jobs: JobRegistry;
}

const zSync = z.enum(['top', 'full', 'none', 'incremental', 'bitmap']);

/** Keys both mirror commands take. */
const mirrorCommon = {
  device: z.string(),
  target: z.string(),
  replaces: z.string().optional(),
  sync: zSync,
  granularity: z.number().int().optional(),
  'buf-size': z.number().int().optional(),
  'on-source-error': zOnError.optional(),
  'on-target-error': zOnError.optional(),
  'copy-mode': z.enum(['background', 'write-blocking']).optional(),
  ...zJobCommon,
};

const blockdevMirrorArgs = z.strictObject(mirrorCommon);

const driveMirrorArgs = z.strictObject({
  ...mirrorCommon,
  format: z.string().optional(),
  'node-name': z.string().optional(),
  mode: z.enum(['existing', 'absolute-paths']).optional(),
  unmap: z.boolean().optional(),
});

type CommonArgs = z.infer<typeof blockdevMirrorArgs> & { unmap?: boolean; zeroTarget: boolean; targetBacking?: 'source' | 'open' };

/** blockdev_mirror_common's checks, then the job. */
async function startCheckedMirror(ctx: MirrorCommandContext, a: CommonArgs, source: BlockNode, target: BlockNode): Promise<void> {
  if (target.parents.some((e) => !(e.parent instanceof BlockNode))) throw genericError('Cannot mirror to an attached block device');
  if (a.sync === 'incremental' || a.sync === 'bitmap') throw genericError(`Sync mode '${a.sync}' not supported`);
  const sync: MirrorSync = a.sync === 'top' && !backingChainNext(source) ? 'full' : a.sync;
  await startMirror(ctx, {
    jobId: a['job-id'] as string,
    source,
    target,
    sync,
    replaces: a.replaces === undefined ? undefined : ctx.graph.node(a.replaces),
    speed: a.speed,
    granularity: a.granularity,
    bufSize: a['buf-size'],
    onSourceError: a['on-source-error'],
    onTargetError: a['on-target-error'],
    filterNodeName: a['filter-node-name'],
    copyMode: a['copy-mode'] as CopyMode | undefined,
    unmap: a.unmap,
    zeroTarget: a.zeroTarget,
    targetBacking: a.targetBacking,
    autoFinalize: a['auto-finalize'],
    autoDismiss: a['auto-dismiss'],
  });
}

/** qmp_get_root_bs. */
function rootNode(ctx: MirrorCommandContext, name: string): BlockNode {
  return requireRootNode(ctx.graph.node(name));
}

/** drive-mirror's image creation and open (see the note at the top). */
async function driveMirrorTarget(ctx: MirrorCommandContext, a: z.infer<typeof driveMirrorArgs>, bs: BlockNode): Promise<BlockNode> {
  const mode = a.mode ?? 'absolute-paths';
  const format = a.format ?? (mode === 'existing' ? undefined : bs.skipFilters().driver.name);
  let backing = backingChainNext(bs);
  const sync = !backing && a.sync === 'top' ? 'full' : a.sync;
  if (sync === 'none') backing = bs;
  if (a.replaces !== undefined && a['node-name'] === undefined) {
    throw genericError('a node-name must be provided when replacing a named node of the graph');
  }
  if (mode !== 'existing') {
    const withBacking = sync !== 'full' && backing !== null;
    await createImage(ctx.graph, {
      format: format!,
      filename: a.target,
      sizeBytes: bs.totalBytes,
      options: [],
      backingFile: withBacking ? backing!.filename : undefined,
      backingFormat: withBacking ? backing!.skipFilters().driver.name : undefined,
      quiet: true,
    });
  }
  const options = a['node-name'] === undefined ? undefined : { 'node-name': a['node-name'] };
  // Without its backing (BDRV_O_NO_BACKING): the job attaches it on exit (MirrorOptions.targetBacking).
  return ctx.graph.openImage(a.target, { format, options, noBacking: true });
}

export const mirrorCommands: QmpCommand<MirrorCommandContext>[] = [
  defineCommand({
    name: 'blockdev-mirror',
    args: blockdevMirrorArgs,
    run: (ctx: MirrorCommandContext, a: z.infer<typeof blockdevMirrorArgs>) =>
      asQmp(async () => {
        const bs = rootNode(ctx, a.device);
        const target = ctx.graph.node(a.target);
        await startCheckedMirror(ctx, { ...a, zeroTarget: a.sync === 'full' }, bs, target);
        return {};
      }),
  }),
  defineCommand({
    name: 'drive-mirror',
    args: driveMirrorArgs,
    run: (ctx: MirrorCommandContext, a: z.infer<typeof driveMirrorArgs>) =>
      asQmp(async () => {
        const bs = rootNode(ctx, a.device);
        const target = await driveMirrorTarget(ctx, a, bs);
        try {
          const sync = a.sync === 'top' && !backingChainNext(bs) ? 'full' : a.sync;
          const zeroTarget = sync === 'full' && (a.mode === 'existing' || !target.driver.hasZeroInit(target));
          const targetBacking = a.mode === 'existing' ? 'open' : 'source';
          await startCheckedMirror(ctx, { ...a, sync, zeroTarget, targetBacking }, bs, target);
        } catch (e) {
          await ctx.graph.unref(target);
          throw e;
        }
        return {};
      }),
  }),
];
