/*
 * qemu-img amend (img_amend and print_amend_option_help in QEMU 7.2's
 * qemu-img.c; the work is the format driver's `amend`).
 *
 * Order, as qemu-img: options in command-line order (each `-o` checked as
 * create checks it: "Invalid option list: X"); no `-o` at all is a usage
 * error ("Must specify options (-o)"). With `-f` and `-o help` the format's
 * amend options are listed without opening anything. Then exactly one file
 * name ("Expecting one image file name", not a usage error), the `-t`
 * cache mode ("Invalid cache option: X"), the image opened read-write;
 * `-o help` now lists the options of the format found. A format without
 * amendment: "Format driver 'X' does not support option amendment". The
 * options are checked against the format's amend options; one that is not
 * there but is a create option gets the hint "This option is only
 * supported for image creation". Then the driver amends the image, and
 * resizes it, when asked, through a BlockBackend holding resize
 * permission. -p shows progress (on a terminal only, see progress.ts); -q
 * turns it off. --force is passed to the driver (QEMU uses it for LUKS key
 * slots, which do not exist here).
 */
import { Option } from 'commander';
import { BlockBackend } from '../../block/backend.js';
import { checkedOptionValues, splitQemuOpts } from '../../block/create.js';
import type { AmendRequest, CreateOptDesc } from '../../block/driver.js';
import { BlockError } from '../../block/errors.js';
import type { BlockNode } from '../../block/node.js';
import { CliError, closeAfterWork, reportedNow, usageError } from '../cli-common.js';
import { applyCacheMode, defaultOpenSettings } from '../io/open.js';
import { commonOption, commonOptions, declareCommand, type ImgCommand, type ImgContext } from './command.js';
import { accumulateOptions, hasHelpOption, optionListText } from './create.js';
import { GetoptLong } from './getopt.js';
import { imgOpen } from './open.js';
import { startProgress } from './progress.js';

const command = declareCommand(
  'amend',
  '[--object objectdef] [--image-opts] [-p] [-q] [-f fmt] [-t cache] [--force] -o options filename',
  'change the format-specific options of an image',
  [
    commonOptions.help(),
    new Option('-o <options>', 'format options to change, key=value,...; -o help lists them'),
    new Option('-f <fmt>', 'image format (probed when absent)'),
    new Option('-t <cache>', 'cache mode of the image (default writeback)'),
    new Option('-p', 'show progress'),
    new Option('-q', 'quiet: no progress'),
    commonOptions.object(),
    commonOptions.imageOpts(),
    new Option('--force', 'allow operations that may lose data (LUKS key slots)'),
  ],
);

interface AmendArgs {
  options?: string;
  format?: string;
  cache: string;
  progress: boolean;
  quiet: boolean;
  imageOpts: boolean;
  force: boolean;
}

/** Percentage points a progress report is scaled to. */
const PERCENT = 100;

async function run(ctx: ImgContext, argv: string[]): Promise<number> {
  const args: AmendArgs = { cache: 'writeback', progress: false, quiet: false, imageOpts: false, force: false };
  const getopt = new GetoptLong(argv, command.options);
  for (const opt of getopt) {
    if (commonOption(ctx, opt)) continue;
    if (opt.key === 'o') args.options = accumulateOptions(args.options, opt.value!);
    else if (opt.key === 'f') args.format = opt.value;
    else if (opt.key === 't') args.cache = opt.value!;
    else if (opt.key === 'p') args.progress = true;
    else if (opt.key === 'q') args.quiet = true;
    else if (opt.key === 'imageOpts') args.imageOpts = true;
    else if (opt.key === 'force') args.force = true;
  }
  if (args.options === undefined) throw usageError('Must specify options (-o)');
  const options = args.options;
  const operands = getopt.operands();
  if (args.format !== undefined && hasHelpOption(options)) return printAmendHelp(ctx, args.format);
  if (operands.length !== 1) throw new CliError('Expecting one image file name');
  const settings = defaultOpenSettings();
  if (!applyCacheMode(settings, args.cache)) throw new CliError(`Invalid cache option: ${args.cache}`);
  const node = await imgOpen(ctx.graph, {
    filename: operands[0]!,
    format: args.format,
    imageOpts: args.imageOpts,
    readOnly: false,
    flags: { direct: settings.direct, noFlush: settings.noFlush },
  });
  const blk = new BlockBackend(ctx.graph, node, { writable: true, resizable: true });
  let failed = false;
  try {
    if (hasHelpOption(options)) return printAmendHelp(ctx, node.driver.name);
    const descs = amendOptsOf(ctx, node.driver.name);
    const values = amendValues(ctx, node, descs, options);
    await amendImage(node, blk, values, args);
  } catch (e) {
    failed = true;
    throw reportedNow(ctx.graph.onWarning, e);
  } finally {
    await closeAfterWork(failed, () => blk.close());
  }
  return 0;
}

export const amendCommand: ImgCommand = { command, run };

/** The driver's amend options, or qemu-img's refusal. */
function amendOptsOf(ctx: ImgContext, format: string): readonly CreateOptDesc[] {
  const drv = ctx.graph.findDriver(format);
  if (!drv) throw new CliError(`Unknown file format '${format}'`);
  if (!drv.amend || !drv.amendOpts) throw new CliError(`Format driver '${format}' does not support option amendment`);
  return drv.amendOpts;
}

/** print_amend_option_help; the exit status. */
function printAmendHelp(ctx: ImgContext, format: string): number {
  const descs = amendOptsOf(ctx, format);
  ctx.out(`Amend options for '${format}':\n${optionListText(descs)}`);
  return 0;
}

/** The `-o` values checked against the amend options (then, for the hint, with the create options too). */
function amendValues(ctx: ImgContext, node: BlockNode, descs: readonly CreateOptDesc[], options: string): Map<string, string> {
  const pairs = splitQemuOpts(options);
  try {
    return checkedOptionValues(descs, pairs, ctx.graph.onWarning);
  } catch (e) {
    if (!(e instanceof BlockError)) throw e;
    const withCreate = [...descs, ...(node.driver.createOpts ?? []).filter((c) => !descs.some((d) => d.name === c.name))];
    let hint = '';
    try {
      checkedOptionValues(withCreate, pairs, () => undefined);
      hint = '\nThis option is only supported for image creation';
    } catch {
      // Not a create option either: the first message alone.
    }
    throw new CliError(`${e.message}${hint}`);
  }
}

/** Runs the driver's amend with progress and a resize through `blk`. */
async function amendImage(node: BlockNode, blk: BlockBackend, values: Map<string, string>, args: AmendArgs): Promise<void> {
  const progress = startProgress(args.progress && !args.quiet, PERCENT);
  let shownPercent = 0;
  const request: AmendRequest = {
    options: values,
    force: args.force,
    progress: (done, total) => {
      const percent = total > 0 ? (PERCENT * done) / total : PERCENT;
      if (percent > shownPercent) progress.add(percent - shownPercent);
      shownPercent = Math.max(shownPercent, percent);
    },
    resize: (sizeBytes) => blk.truncate(sizeBytes, true, 'off'),
  };
  try {
    await node.driver.amend!(node, request);
  } finally {
    progress.finish();
  }
}
