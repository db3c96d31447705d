/*
 * qemu-img snapshot (img_snapshot and dump_snapshots in QEMU 7.2's
 * qemu-img.c): list, apply, create or delete the internal snapshots of an
 * image, through the block layer's snapshot calls (block/snapshot.ts).
 *
 * Arguments: options in order (--object acts at once, -h prints help); at
 * most one of -l, -a, -c, -d, else "Cannot mix '-l', '-a', '-c', '-d'"
 * (usage error, even for the same one twice); exactly one file name. The
 * image is opened read-write, read-only for -l (so -U works only with -l:
 * "force-share=on can only be used with read-only images"). Without an
 * action the image is opened and closed, and nothing else happens.
 *
 * Output and errors, exit status 1 on failure:
 *   -l  the "Snapshot list:" table on stdout; nothing at all for an image
 *       without snapshots or a format without them (-q changes nothing);
 *   -c  "Could not create snapshot 'N': -95 (Operation not supported)"
 *       (negative errno and strerror); the name is cut to 255 bytes and the
 *       date is now (microseconds), VM clock and icount 0, as qemu-img
 *       records them;
 *   -a  "Could not apply snapshot 'N': Failed to load snapshot: No such
 *       file or directory", after any line the driver reported first;
 *   -d  the snapshot is looked up by name only (QEMU 7.2's
 *       bdrv_snapshot_find): "Could not delete snapshot 'N': snapshot not
 *       found", else the driver's error after the same prefix.
 */
import { Option } from 'commander';
import { BlockError, strerror } from '../../block/errors.js';
import type { BlockNode } from '../../block/node.js';
import { formatSnapshotList, snapshotCreate, snapshotDelete, snapshotFind, snapshotGoto, snapshotInfoQapi, snapshotList, type SnapshotInfo } from '../../block/snapshot.js';
import { CliError, reportError, usageError } from '../cli-common.js';
import { PROG, commonOption, commonOptions, declareCommand, type ImgCommand, type ImgContext } from './command.js';
import { GetoptLong } from './getopt.js';
import { imgOpen } from './open.js';

const command = declareCommand(
  'snapshot',
  '[--object objectdef] [--image-opts] [-U] [-q] [-l | -a snapshot | -c snapshot | -d snapshot] filename',
  'list, apply, create or delete internal snapshots of an image',
  [
    commonOptions.help(),
    commonOptions.object(),
    commonOptions.imageOpts(),
    commonOptions.forceShare(),
    new Option('-l', 'list all snapshots in the image'),
    new Option('-a <snapshot>', 'apply a snapshot (revert the disk to it)'),
    new Option('-c <snapshot>', 'create a snapshot'),
    new Option('-d <snapshot>', 'delete a snapshot'),
    new Option('-q', 'quiet mode'),
  ],
);

type Action = { kind: 'l' } | { kind: 'a' | 'c' | 'd'; name: string };

interface SnapshotArgs {
  action?: Action;
  imageOpts: boolean;
  forceShare: boolean;
}

const MICROSECONDS_PER_SECOND = 1_000_000;
const NANOSECONDS_PER_MICROSECOND = 1000;

function readArgs(ctx: ImgContext, argv: string[]): { args: SnapshotArgs; filename: string } {
  const args: SnapshotArgs = { imageOpts: false, forceShare: false };
  const getopt = new GetoptLong(argv, command.options);
  for (const opt of getopt) {
    if (commonOption(ctx, opt)) continue;
    if (opt.key === 'l' || opt.key === 'a' || opt.key === 'c' || opt.key === 'd') {
      if (args.action) throw usageError("Cannot mix '-l', '-a', '-c', '-d'");
      args.action = opt.key === 'l' ? { kind: 'l' } : { kind: opt.key, name: opt.value! };
    } else if (opt.key === 'imageOpts') args.imageOpts = true;
    else if (opt.key === 'forceShare') args.forceShare = true;
  }
  const operands = getopt.operands();
  if (operands.length !== 1) throw usageError('Expecting one image file name');
  return { args, filename: operands[0]! };
}

async function run(ctx: ImgContext, argv: string[]): Promise<number> {
  const { args, filename } = readArgs(ctx, argv);
  const node = await imgOpen(ctx.graph, {
    filename,
    imageOpts: args.imageOpts,
    forceShare: args.forceShare,
    readOnly: args.action?.kind === 'l',
  });
  try {
    if (args.action) await perform(ctx, node, args.action);
  } finally {
    await ctx.graph.unref(node);
  }
  return 0;
}

async function perform(ctx: ImgContext, node: BlockNode, action: Action): Promise<void> {
  switch (action.kind) {
    case 'l':
      return dumpSnapshots(ctx, node);
    case 'c':
      return create(node, action.name);
    case 'a':
      return failWith(`Could not apply snapshot '${action.name}'`, () => snapshotGoto(node, action.name, (m) => reportError(PROG, m)));
    case 'd':
      return remove(node, action.name);
  }
}

/** dump_snapshots: nothing unless the image has snapshots. */
async function dumpSnapshots(ctx: ImgContext, node: BlockNode): Promise<void> {
  let list: SnapshotInfo[];
  try {
    list = await snapshotList(node);
  } catch (e) {
    if (e instanceof BlockError) return;
    throw e;
  }
  if (list.length > 0) ctx.out(formatSnapshotList(list.map(snapshotInfoQapi)));
}

async function create(node: BlockNode, name: string): Promise<void> {
  const nowUs = Math.round((performance.timeOrigin + performance.now()) * 1000);
  try {
    await snapshotCreate(node, {
      name,
      dateSec: Math.floor(nowUs / MICROSECONDS_PER_SECOND),
      dateNsec: (nowUs % MICROSECONDS_PER_SECOND) * NANOSECONDS_PER_MICROSECOND,
      vmClockNsec: 0n,
      icount: 0n,
    });
  } catch (e) {
    if (!(e instanceof BlockError)) throw e;
    throw new CliError(`Could not create snapshot '${name}': ${-e.errno} (${strerror(e.code)})`);
  }
}

async function remove(node: BlockNode, name: string): Promise<void> {
  const sn = await snapshotFind(node, name);
  if (!sn) throw new CliError(`Could not delete snapshot '${name}': snapshot not found`);
  await failWith(`Could not delete snapshot '${name}'`, () => snapshotDelete(node, sn.id, sn.name));
}

/** Runs `op`; a block-layer failure becomes "<context>: <its message>". */
async function failWith(context: string, op: () => Promise<void>): Promise<void> {
  try {
    await op();
  } catch (e) {
    if (!(e instanceof BlockError)) throw e;
    throw new CliError(`${context}: ${e.message}`);
  }
}

export const snapshotCommand: ImgCommand = { command, run };
