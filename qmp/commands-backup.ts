/*
 * blockdev-backup and transaction (blockdev.c in QEMU 7.2:
 * qmp_blockdev_backup, do_backup_common, qmp_transaction and the
 * TransactionAction table).
 *
 * blockdev-backup checks its arguments in do_backup_common's order and
 * texts (a bitmap sync needs a bitmap; incremental is bitmap with
 * bitmap-mode on-success; a bitmap needs a bitmap-mode, and never is
 * useless unless the sync reads the bitmap; none produces no bitmap
 * output). It is a transaction of one action, as in QEMU (blockdev_do_action).
 *
 * transaction runs its actions as qmp_transaction does, all-or-nothing:
 * the whole graph is drained once (bdrv_drain_all: every running job
 * pauses and resumes); each action's prepare runs in order and records how
 * to undo itself and what to clean; a backup drains its source from before
 * its checks until the clean step, so no write slips between the filter's
 * insertion and the bitmaps' freezing, and the job it creates starts
 * inside that drained section (so it pauses at once, and runs on when the
 * clean step ends the drain — QEMU's paused/running pair after running).
 * If a prepare fails, the ones before are undone in reverse (a backup job
 * set up but not started is cancelled, which takes its filter out and
 * thaws its bitmap) and the failure is the command's error; otherwise each
 * is committed (backup jobs start). Then every clean runs in order.
 * Actions: block-dirty-bitmap-add/-clear/-merge/-enable/-disable,
 * blockdev-backup, abort. `properties.completion-mode` grouped is refused
 * by each bitmap action's prepare, as QEMU's.
 */
import { z } from 'zod';
import { drainAll, drainedBegin, drainedEnd } from '../block/drain.js';
import { bitmapAdd, bitmapClear, bitmapMerge, bitmapSetEnabled, lookupDirtyBitmap, type MergeSource } from '../block/dirty-bitmap-ops.js';
import { BitmapCheck, releaseDirtyBitmap, requireBitmap, type DirtyBitmap } from '../block/dirty-bitmap.js';
import { createBackup, type BackupOptions, type BackupSync } from '../jobs/backup.js';
import type { Job } from '../jobs/job.js';
import type { JobContext } from '../jobs/block-job.js';
import { defineCommand, genericError, type QmpCommand } from './command.js';
import { bitmapCommands } from './commands-bitmap.js';
import { asQmp, zJobCommon, zOnError } from './commands-stream-commit.js';

export type BackupContext = JobContext;

const backupArgs = z.strictObject({
  device: z.string(),
  target: z.string(),
  sync: z.enum(['full', 'top', 'none', 'incremental', 'bitmap']),
  bitmap: z.string().optional(),
  'bitmap-mode': z.enum(['on-success', 'never', 'always']).optional(),
  compress: z.boolean().optional(),
  'on-source-error': zOnError.optional(),
  'on-target-error': zOnError.optional(),
  ...zJobCommon,
});
type BackupArgs = z.infer<typeof backupArgs>;

interface BitmapArgs {
  node: string;
  name: string;
}
interface BitmapAddArgs extends BitmapArgs {
  granularity?: number;
  persistent?: boolean;
  disabled?: boolean;
}
interface MergeArgs {
  node: string;
  target: string;
  bitmaps: Array<string | { node: string; name: string }>;
}

/** A bitmap command's argument schema (qmp/commands-bitmap.ts): an action takes what its command takes. */
function bitmapSchema<T>(name: string): z.ZodType<T> {
  const command = bitmapCommands.find((c) => c.name === name);
  if (!command) throw new Error(`no QMP command ${name}`);
  return command.args as z.ZodType<T>;
}

const bitmapArgs = bitmapSchema<BitmapArgs>('block-dirty-bitmap-clear');
const bitmapAddArgs = bitmapSchema<BitmapAddArgs>('block-dirty-bitmap-add');
const mergeArgs = bitmapSchema<MergeArgs>('block-dirty-bitmap-merge');

/** do_backup_common's checks: the job's options. */
function backupOptions(ctx: BackupContext, a: BackupArgs): BackupOptions {
  const source = ctx.graph.node(a.device);
  const target = ctx.graph.node(a.target);
  let sync = a.sync;
  let mode = a['bitmap-mode'];
  if ((sync === 'bitmap' || sync === 'incremental') && a.bitmap === undefined) {
    throw genericError(`must provide a valid bitmap name for '${sync}' sync mode`);
  }
  if (sync === 'incremental') {
    if (mode !== undefined && mode !== 'on-success') throw genericError("Bitmap sync mode must be 'on-success' when using sync mode 'incremental'");
    [sync, mode] = ['bitmap', 'on-success'];
  }
  let bitmap: DirtyBitmap | undefined;
  if (a.bitmap !== undefined) {
    bitmap = source.dirtyBitmaps.find((b) => b.name === a.bitmap);
    if (!bitmap) throw genericError(`Bitmap '${a.bitmap}' could not be found`);
    if (mode === undefined) throw genericError('Bitmap sync mode must be given when providing a bitmap');
    requireBitmap(bitmap, BitmapCheck.ALLOW_RO);
    if (sync === 'none') throw genericError(`sync mode '${sync}' does not produce meaningful bitmap outputs`);
    if (mode === 'never' && sync !== 'bitmap') throw genericError(`Bitmap sync mode 'never' has no meaningful effect when combined with sync mode '${sync}'`);
  } else if (mode !== undefined) {
    throw genericError('Cannot specify bitmap sync mode without a bitmap');
  }
  return {
    jobId: a['job-id'] ?? '',
    source,
    target,
    sync: sync as BackupSync,
    bitmap,
    bitmapMode: mode,
    compress: a.compress,
    speed: a.speed,
    onSourceError: a['on-source-error'],
    onTargetError: a['on-target-error'],
    filterNodeName: a['filter-node-name'],
    autoFinalize: a['auto-finalize'],
    autoDismiss: a['auto-dismiss'],
  };
}

// ---------------------------------------------------------------- transaction actions

/** One prepared action: how to finish it and how to undo it. */
interface Prepared {
  commit(): void;
  abort(): Promise<void> | void;
}

const nothing = (): void => {};

/** What a transaction's actions share: the context, and the clean steps run at the end, success or not. */
interface TransactionRun {
  ctx: BackupContext;
  cleans: Array<() => void>;
}

interface ActionDef<S extends z.ZodType> {
  args: S;
  /** Refused with completion-mode grouped (the bitmap actions). */
  individualOnly?: boolean;
  prepare(run: TransactionRun, a: z.infer<S>): Promise<Prepared>;
}

function action<S extends z.ZodType>(def: ActionDef<S>): ActionDef<z.ZodType> {
  return def as unknown as ActionDef<z.ZodType>;
}

/** An action that changes a bitmap's bits: restores them on abort. */
function bitsAction(change: (ctx: BackupContext, a: { node: string; name: string }) => void, args: z.ZodType) {
  return action({
    args,
    individualOnly: true,
    async prepare({ ctx }, a: { node: string; name: string }) {
      const bm = lookupDirtyBitmap(ctx.graph.node(a.node), a.name);
      const saved = bm.copyBits(null);
      change(ctx, a);
      return {
        commit: nothing,
        abort: () => {
          bm.clear();
          bm.mergeFrom(saved);
        },
      };
    },
  });
}

function enableAction(enabled: boolean) {
  return action({
    args: bitmapArgs,
    individualOnly: true,
    async prepare({ ctx }, a) {
      const node = ctx.graph.node(a.node);
      const bm = lookupDirtyBitmap(node, a.name);
      const was = bm.disabled;
      bitmapSetEnabled(node, a.name, enabled);
      return { commit: nothing, abort: () => void (bm.disabled = was) };
    },
  });
}

function mergeSources(ctx: BackupContext, a: MergeArgs): MergeSource[] {
  const node = ctx.graph.node(a.node);
  return a.bitmaps.map((b) => (typeof b === 'string' ? { node, name: b } : { node: ctx.graph.node(b.node), name: b.name }));
}

const ACTIONS: Record<string, ActionDef<z.ZodType>> = {
  abort: action({
    args: z.strictObject({}),
    prepare: async () => {
      throw genericError('Transaction aborted using Abort action');
    },
  }),
  'block-dirty-bitmap-add': action({
    args: bitmapAddArgs,
    individualOnly: true,
    async prepare({ ctx }, a) {
      const node = ctx.graph.node(a.node);
      const bm = await bitmapAdd(node, { name: a.name, granularityBytes: a.granularity, persistent: a.persistent, disabled: a.disabled });
      return { commit: nothing, abort: () => releaseDirtyBitmap(node, bm) };
    },
  }),
  'block-dirty-bitmap-clear': bitsAction((ctx, a) => bitmapClear(ctx.graph.node(a.node), a.name), bitmapArgs),
  'block-dirty-bitmap-merge': bitsAction(
    (ctx, a) => bitmapMerge(ctx.graph.node(a.node), (a as unknown as MergeArgs).target, mergeSources(ctx, a as unknown as MergeArgs)),
    mergeArgs.transform((a) => ({ ...a, name: a.target })),
  ),
  'block-dirty-bitmap-enable': enableAction(true),
  'block-dirty-bitmap-disable': enableAction(false),
  'blockdev-backup': action({
    args: backupArgs,
    async prepare({ ctx, cleans }, a) {
      // blockdev_backup_prepare: the lookups, then the source drained until clean, then do_backup_common.
      const source = ctx.graph.node(a.device);
      ctx.graph.node(a.target);
      await drainedBegin(source);
      cleans.push(() => drainedEnd(source));
      const job: Job = await createBackup(ctx, backupOptions(ctx, a));
      return {
        commit: () => job.start(),
        abort: async () => {
          job.cancel(true);
          await job.whenFinished();
        },
      };
    },
  }),
};

const transactionArgs = z.strictObject({
  actions: z.array(z.strictObject({ type: z.string(), data: z.record(z.string(), z.unknown()) })),
  properties: z.strictObject({ 'completion-mode': z.enum(['individual', 'grouped']).optional() }).optional(),
});

/** Parses every action's data first (QAPI rejects a malformed transaction before running any of it). */
function parseActions(actions: z.infer<typeof transactionArgs>['actions']): Array<{ def: ActionDef<z.ZodType>; type: string; data: unknown }> {
  return actions.map((act, i) => {
    const def = ACTIONS[act.type];
    if (!def) throw genericError(`Parameter 'type' does not accept value '${act.type}'`);
    const parsed = def.args.safeParse(act.data);
    if (!parsed.success) throw genericError(`Invalid parameter in 'actions[${i}].data': ${parsed.error.issues[0]?.message ?? 'invalid'}`);
    return { def, type: act.type, data: parsed.data };
  });
}

type ParsedAction = ReturnType<typeof parseActions>[number];

/** qmp_transaction (see the note at the top). */
async function runActions(ctx: BackupContext, actions: ParsedAction[], grouped = false): Promise<object> {
  await drainAll([...ctx.graph.nodes.values()]);
  const run: TransactionRun = { ctx, cleans: [] };
  const prepared: Prepared[] = [];
  try {
    for (const act of actions) {
      if (grouped && act.def.individualOnly) throw genericError(`Action '${act.type}' does not support Transaction property completion-mode = grouped`);
      prepared.push(await act.def.prepare(run, act.data));
    }
    for (const p of prepared) p.commit();
  } catch (e) {
    for (const p of prepared.reverse()) await p.abort();
    throw e;
  } finally {
    for (const clean of run.cleans) clean();
  }
  return {};
}

function runTransaction(ctx: BackupContext, a: z.infer<typeof transactionArgs>): Promise<object> {
  return runActions(ctx, parseActions(a.actions), a.properties?.['completion-mode'] === 'grouped');
}

export const backupCommands: QmpCommand<BackupContext>[] = [
  defineCommand({
    name: 'blockdev-backup',
    args: backupArgs,
    run: (ctx: BackupContext, a: BackupArgs) => asQmp(() => runActions(ctx, [{ def: ACTIONS['blockdev-backup']!, type: 'blockdev-backup', data: a }])),
  }),
  defineCommand({
    name: 'transaction',
    args: transactionArgs,
    run: (ctx: BackupContext, a: z.infer<typeof transactionArgs>) => asQmp(() => runTransaction(ctx, a)),
  }),
];
