/*
 * qemu-img bitmap (img_bitmap in QEMU 7.2's qemu-img.c): add, remove,
 * clear, enable, disable or merge persistent dirty bitmaps of an image,
 * through the block layer's bitmap operations (block/dirty-bitmap-ops.ts).
 *
 * Arguments: options in order (--object acts at once, -h prints help);
 * each of --add, --remove, --clear, --enable, --disable and --merge SOURCE
 * queues an action, and the actions run in command-line order on the one
 * bitmap named (so `--add --disable` adds a bitmap that does not record).
 * `-g SIZE` (last one wins, 0: the default) sets --add's granularity,
 * taken modulo 2^32 as QEMU's uint32 parameter does; `-b FILE [-F FMT]`
 * makes --merge read SOURCE from another image. Then, in qemu-img's
 * order: no action, "-g" without --add, "-F" without "-b", "-b" without
 * --merge, and anything but exactly a file name and a bitmap name are
 * errors (one line, exit 1, no usage hint).
 *
 * The image is opened read-write without its backing file (so is the
 * merge source, read-only); a failing action prints "Operation OP on
 * bitmap NAME failed: REASON" and stops (earlier actions stay done), and
 * closing the image stores the bitmaps. New bitmaps are persistent and
 * recording. Exit status 0 on success, 1 when an action failed. As in
 * 7.2, an error while storing the bitmaps at close ("Lost persistent
 * bitmaps during inactivation of node …", e.g. for an empty image) is
 * printed but does not change the status (QEMU 8.0 made it 1).
 */
import { Option } from 'commander';
import { BlockError } from '../../block/errors.js';
import type { BlockNode } from '../../block/node.js';
import { bitmapAdd, bitmapClear, bitmapMerge, bitmapRemove, bitmapSetEnabled } from '../../block/dirty-bitmap-ops.js';
import { CliError, reportFailure } from '../cli-common.js';
import { PROG, commonOption, commonOptions, cvtnum, declareCommand, type ImgCommand, type ImgContext } from './command.js';
import { GetoptLong } from './getopt.js';
import { imgOpen } from './open.js';

const command = declareCommand(
  'bitmap',
  '(--merge SOURCE | --add | --remove | --clear | --enable | --disable)... [-b source_file [-F source_fmt]] [-g granularity] [--object objectdef] [--image-opts | -f fmt] filename bitmap',
  'add, remove, clear, enable, disable or merge persistent dirty bitmaps',
  [
    commonOptions.help(),
    commonOptions.object(),
    commonOptions.imageOpts(),
    new Option('--add', 'create the bitmap (recording)'),
    new Option('--remove', 'delete the bitmap'),
    new Option('--clear', 'mark everything clean'),
    new Option('--enable', 'start recording writes'),
    new Option('--disable', 'stop recording writes'),
    new Option('--merge <source>', 'OR the bitmap SOURCE into the bitmap'),
    new Option('-g, --granularity <granularity>', 'bytes per bit for --add (a power of two, at least 512)'),
    new Option('-b, --source-file <source_file>', 'image holding the --merge source'),
    new Option('-F, --source-format <source_fmt>', 'format of the --merge source image'),
    new Option('-f <fmt>', 'image format (probed when absent)'),
  ],
);

type ActionKind = 'add' | 'remove' | 'clear' | 'enable' | 'disable' | 'merge';
interface Action {
  kind: ActionKind;
  /** --merge's source bitmap. */
  source?: string;
}

interface BitmapArgs {
  actions: Action[];
  /** -g as given (0: the node's default). */
  granularity: bigint;
  format?: string;
  sourceFile?: string;
  sourceFormat?: string;
  imageOpts: boolean;
}

/** QEMU's granularity parameter is a uint32: cvtnum's value is cut to 32 bits. */
const GRANULARITY_WRAP = 2n ** 32n;
const ACTION_KEYS: ReadonlySet<string> = new Set(['add', 'remove', 'clear', 'enable', 'disable', 'merge']);

function readArgs(ctx: ImgContext, argv: string[]): { args: BitmapArgs; operands: string[] } {
  const args: BitmapArgs = { actions: [], granularity: 0n, imageOpts: false };
  const getopt = new GetoptLong(argv, command.options);
  const warn = (message: string) => ctx.graph.onWarning(message);
  for (const opt of getopt) {
    if (commonOption(ctx, opt)) continue;
    if (ACTION_KEYS.has(opt.key)) args.actions.push({ kind: opt.key as ActionKind, source: opt.value });
    else if (opt.key === 'granularity') args.granularity = cvtnum('granularity', opt.value!, warn);
    else if (opt.key === 'sourceFile') args.sourceFile = opt.value;
    else if (opt.key === 'sourceFormat') args.sourceFormat = opt.value;
    else if (opt.key === 'f') args.format = opt.value;
    else if (opt.key === 'imageOpts') args.imageOpts = true;
  }
  return { args, operands: getopt.operands() };
}

/** img_bitmap's checks after the options, in its order. */
function checkArgs(args: BitmapArgs, operands: string[]): void {
  const has = (kind: ActionKind) => args.actions.some((a) => a.kind === kind);
  if (args.actions.length === 0) throw new CliError('Need at least one of --add, --remove, --clear, --enable, --disable, or --merge');
  if (args.granularity !== 0n && !has('add')) throw new CliError('granularity only supported with --add');
  if (args.sourceFormat !== undefined && args.sourceFile === undefined) throw new CliError('-F only supported with -b');
  if (args.sourceFile !== undefined && !has('merge')) throw new CliError('Merge bitmap source file only supported with --merge');
  if (operands.length !== 2) throw new CliError('Expecting filename and bitmap name');
}

async function run(ctx: ImgContext, argv: string[]): Promise<number> {
  const { args, operands } = readArgs(ctx, argv);
  checkArgs(args, operands);
  const [filename, bitmap] = operands as [string, string];
  const node = await imgOpen(ctx.graph, { filename, format: args.format, imageOpts: args.imageOpts, readOnly: false, noBacking: true });
  let source: BlockNode | null = null;
  let status = 0;
  try {
    if (args.sourceFile !== undefined) {
      source = await imgOpen(ctx.graph, { filename: args.sourceFile, format: args.sourceFormat, readOnly: true, noBacking: true });
    }
    for (const action of args.actions) await perform(node, source ?? node, bitmap, action, args.granularity);
  } catch (e) {
    status = reportFailure(PROG, e);
  }
  // As blk_unref: the source, then the image (which stores its bitmaps); failures are printed, not returned.
  for (const closing of [source, node]) {
    if (closing) await ctx.graph.unref(closing).catch((e: unknown) => reportFailure(PROG, e));
  }
  return status;
}

/** One action; a block-layer failure becomes "Operation OP on bitmap NAME failed: REASON". */
async function perform(node: BlockNode, source: BlockNode, bitmap: string, action: Action, granularity: bigint): Promise<void> {
  try {
    switch (action.kind) {
      case 'add':
        await bitmapAdd(node, {
          name: bitmap,
          granularityBytes: granularity === 0n ? undefined : Number(granularity % GRANULARITY_WRAP),
          persistent: true,
        });
        return;
      case 'remove':
        return await bitmapRemove(node, bitmap);
      case 'clear':
        return bitmapClear(node, bitmap);
      case 'enable':
      case 'disable':
        return bitmapSetEnabled(node, bitmap, action.kind === 'enable');
      case 'merge':
        return bitmapMerge(node, bitmap, [{ node: source, name: action.source! }]);
    }
  } catch (e) {
    if (!(e instanceof BlockError)) throw e;
    throw new CliError(`Operation ${action.kind} on bitmap ${bitmap} failed: ${e.message}`);
  }
}

export const bitmapCommand: ImgCommand = { command, run };
