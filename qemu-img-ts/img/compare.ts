/*
 * qemu-img compare (img_compare in QEMU 7.2's qemu-img.c; the walk itself
 * is block/compare.ts).
 *
 * Arguments: options in order (--object acts at once, -h prints the help),
 * then exactly two file names ("Expecting two image file names", a usage
 * error), then the -T cache mode. -q silences stdout and turns -p off.
 * Both images are opened read-only, with their backing chains.
 *
 * Output and exit status, as qemu-img:
 *   0  "Images are identical." (after "Warning: Image size mismatch!" when
 *      the lengths differ and the longer tail reads as zeroes);
 *   1  "Content mismatch at offset N!", or with -s "Strict mode: Image size
 *      mismatch!" / "Strict mode: Offset N block status mismatch!";
 *      usage errors (bad option, wrong number of names) are 1 too;
 *   2  a bad -T value or an image that does not open;
 *   3  block status failed ("Sector allocation test failed for NAME");
 *   4  a read failed ("Error while reading offset N of NAME: …").
 * -p shows the share of the longer image compared so far (progress.ts, in
 * steps of 2 %, as qemu-img's compare).
 */
import { Option } from 'commander';
import { BlockBackend } from '../../block/backend.js';
import { CompareError, compareImages, type CompareResult } from '../../block/compare.js';
import { BlockError } from '../../block/errors.js';
import type { BlockNode } from '../../block/node.js';
import { CliError, usageError } from '../cli-common.js';
import { applyCacheMode, defaultOpenSettings } from '../io/open.js';
import { commonOption, commonOptions, declareCommand, type ImgCommand, type ImgContext } from './command.js';
import { GetoptLong, type ParsedOption } from './getopt.js';
import { imgOpen } from './open.js';
import { NO_PROGRESS, Progress, processProgressSink, type ProgressLike } from './progress.js';

const command = declareCommand(
  'compare',
  '[--object objectdef] [--image-opts] [-f fmt] [-F fmt] [-T src_cache] [-p] [-q] [-s] [-U] filename1 filename2',
  'compare the content of two images',
  [
    commonOptions.help(),
    new Option('-f <fmt>', 'format of the first image (probed when absent)'),
    new Option('-F <fmt>', 'format of the second image (probed when absent)'),
    new Option('-T <src_cache>', 'cache mode of the images (default writeback)'),
    new Option('-p', 'show progress'),
    new Option('-q', 'quiet: print nothing, report by exit status only'),
    new Option('-s', 'strict: sizes and allocation must match too'),
    commonOptions.forceShare(),
    commonOptions.object(),
    commonOptions.imageOpts(),
  ],
);

/** qemu-img compare's exit statuses. */
const Exit = { IDENTICAL: 0, DIFFERENT: 1, OPEN_FAILED: 2, STATUS_FAILED: 3, READ_FAILED: 4 } as const;
/** qemu-img compare's progress step (qemu_progress_init(progress, 2.0)). */
const COMPARE_PROGRESS_STEP_PERCENT = 2;

interface CompareArgs {
  formats: [string | undefined, string | undefined];
  cache: string;
  progress: boolean;
  quiet: boolean;
  strict: boolean;
  forceShare: boolean;
  imageOpts: boolean;
}

async function run(ctx: ImgContext, argv: string[]): Promise<number> {
  const { args, filenames } = readArgs(ctx, argv);
  const cache = defaultOpenSettings();
  if (!applyCacheMode(cache, args.cache)) throw new CliError(`Invalid source cache option: ${args.cache}`, Exit.OPEN_FAILED);
  const open = async (i: 0 | 1) => {
    const node = await openImage(ctx, args, filenames[i], i, { direct: cache.direct, noFlush: cache.noFlush });
    return { blk: new BlockBackend(ctx.graph, node), name: filenames[i] };
  };
  const a = await open(0);
  try {
    const b = await open(1);
    try {
      return await compare(ctx, args, a, b);
    } finally {
      await b.blk.close();
    }
  } finally {
    await a.blk.close();
  }
}

export const compareCommand: ImgCommand = { command, run };

function readArgs(ctx: ImgContext, argv: string[]): { args: CompareArgs; filenames: [string, string] } {
  const args: CompareArgs = { formats: [undefined, undefined], cache: 'writeback', progress: false, quiet: false, strict: false, forceShare: false, imageOpts: false };
  const getopt = new GetoptLong(argv, command.options);
  for (const opt of getopt) {
    if (objectOrHelp(ctx, opt)) continue;
    if (opt.key === 'f') args.formats[0] = opt.value;
    else if (opt.key === 'F') args.formats[1] = opt.value;
    else if (opt.key === 'T') args.cache = opt.value!;
    else if (opt.key === 'p') args.progress = true;
    else if (opt.key === 'q') args.quiet = true;
    else if (opt.key === 's') args.strict = true;
    else if (opt.key === 'forceShare') args.forceShare = true;
    else if (opt.key === 'imageOpts') args.imageOpts = true;
  }
  if (args.quiet) args.progress = false;
  const operands = getopt.operands();
  if (operands.length !== 2) throw usageError('Expecting two image file names');
  return { args, filenames: [operands[0]!, operands[1]!] };
}

/** -h and --object; a bad object definition ends compare with status 2. */
function objectOrHelp(ctx: ImgContext, opt: ParsedOption): boolean {
  try {
    return commonOption(ctx, opt);
  } catch (e) {
    if (e instanceof BlockError) throw new CliError(e.message, Exit.OPEN_FAILED);
    throw e;
  }
}

/** Opens one image read-only; any failure ends the command with status 2. */
async function openImage(
  ctx: ImgContext,
  args: CompareArgs,
  filename: string,
  index: 0 | 1,
  flags: { direct: boolean; noFlush: boolean },
): Promise<BlockNode> {
  try {
    return await imgOpen(ctx.graph, { filename, format: args.formats[index], imageOpts: args.imageOpts, forceShare: args.forceShare, readOnly: true, flags });
  } catch (e) {
    if (e instanceof BlockError || e instanceof CliError) throw new CliError(e.message, Exit.OPEN_FAILED);
    throw e;
  }
}

type Side = { blk: BlockBackend; name: string };

async function compare(ctx: ImgContext, args: CompareArgs, a: Side, b: Side): Promise<number> {
  const say = (text: string) => {
    if (!args.quiet) ctx.out(text);
  };
  const totalBytes = Math.max(a.blk.getLength(), b.blk.getLength());
  const progress: ProgressLike = args.progress ? new Progress(processProgressSink(), totalBytes, COMPARE_PROGRESS_STEP_PERCENT) : NO_PROGRESS;
  let identical = false;
  try {
    const result = await compareImages(a, b, {
      strict: args.strict,
      onProgress: (bytes) => progress.add(bytes),
      onSizeMismatch: () => say('Warning: Image size mismatch!\n'),
    });
    say(verdictText(result));
    identical = result.kind === 'identical';
    return identical ? Exit.IDENTICAL : Exit.DIFFERENT;
  } catch (e) {
    if (e instanceof CompareError) throw new CliError(e.message, e.stage === 'status' ? Exit.STATUS_FAILED : Exit.READ_FAILED);
    throw e;
  } finally {
    progress.finish(identical);
  }
}

function verdictText(result: CompareResult): string {
  switch (result.kind) {
    case 'identical':
      return 'Images are identical.\n';
    case 'content-mismatch':
      return `Content mismatch at offset ${result.offsetBytes}!\n`;
    case 'size-mismatch':
      return 'Strict mode: Image size mismatch!\n';
    case 'status-mismatch':
      return `Strict mode: Offset ${result.offsetBytes} block status mismatch!\n`;
  }
}
