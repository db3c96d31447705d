/*
 * qemu-img measure (img_measure in QEMU 7.2's qemu-img.c; the sizes come
 * from the output format's driver through block/measure.ts).
 *
 * Unlike every other command, measure's optstring has no leading ':', so
 * glibc reports a bad option itself ("measure: invalid option -- 'X'",
 * "measure: option '--size' requires an argument") and qemu-img then
 * prints the help and ends with status 0.
 *
 * Order, as qemu-img: options in command-line order (--object defined at
 * once; a bad -o list, a bad --output value, a bad --size and a bad
 * `-l snapshot.…` parameter fail at once); then at most one file name;
 * -f, --image-opts and -l need it; --size and a file name exclude each
 * other and one of them is needed. The file is opened read-only (with its
 * backing chain), its snapshot loaded (-l); then the output format, its
 * `-o` values and the measurement. Every error ends with status 1.
 *
 * Output: human "required size: N", "fully allocated size: N" and, when
 * the driver reports it, "bitmaps size: N" (unsigned decimals); JSON is
 * BlockMeasureInfo through QEMU's writer (signed 64-bit, as QEMU's output
 * visitor prints a uint64 that came from an int).
 */
import { Option } from 'commander';
import { BlockError } from '../../block/errors.js';
import { MeasureOptionsError, measureImage, type MeasureInfo } from '../../block/measure.js';
import type { BlockNode } from '../../block/node.js';
import { toJsonPretty } from '../../block/qjson.js';
import { loadSnapshotTmp, type SnapshotRef } from '../../block/snapshot-tmp.js';
import { splitQemuOpts } from '../../block/create.js';
import { CliError, CliExit } from '../cli-common.js';
import { commonOption, commonOptions, cvtnum, declareCommand, PROG, type ImgCommand, type ImgContext, type OutputFormat } from './command.js';
import { accumulateOptions } from './create.js';
import { GetoptLong } from './getopt.js';
import { imgOpen } from './open.js';

const command = declareCommand(
  'measure',
  '[--output=ofmt] [-O output_fmt] [-o options] [--size N | [--object objectdef] [--image-opts] [-f fmt] [-l snapshot_param] filename]',
  'estimate the size of a new image',
  [
    commonOptions.help(),
    new Option('-f <fmt>', 'format of the image to measure (probed when absent)'),
    new Option('-O <output_fmt>', 'format of the new image (default raw)'),
    new Option('-o <options>', 'create options of the new image, key=value,...'),
    new Option('-l <snapshot_param>', 'measure this internal snapshot of the image'),
    commonOptions.forceShare(),
    commonOptions.imageOpts(),
    commonOptions.object(),
    commonOptions.output(),
    new Option('--size <N>', 'measure a new image of this virtual size'),
  ],
);

interface MeasureArgs {
  format?: string;
  outFormat: string;
  options?: string;
  snapshot?: SnapshotRef;
  forceShare: boolean;
  imageOpts: boolean;
  output: OutputFormat;
  sizeBytes?: bigint;
}

/** The keys of QEMU's internal_snapshot_opts (`-l snapshot.id=…,snapshot.name=…`). */
const SNAPSHOT_OPT_BASE = 'snapshot.';

async function run(ctx: ImgContext, argv: string[]): Promise<number> {
  const args = readArgs(ctx, argv);
  const source = args.filename === undefined ? null : await openSource(ctx, args, args.filename);
  try {
    const info = await measure(ctx, args, source);
    ctx.out(args.output === 'json' ? `${toJsonPretty(measureInfoJson(info))}\n` : humanText(info));
  } finally {
    if (source) await ctx.graph.unref(source);
  }
  return 0;
}

export const measureCommand: ImgCommand = { command, run };

/** The options in order, then the file name rules (see the note at the top). */
function readArgs(ctx: ImgContext, argv: string[]): MeasureArgs & { filename?: string } {
  const args: MeasureArgs = { outFormat: 'raw', forceShare: false, imageOpts: false, output: 'human' };
  const getopt = new GetoptLong(argv, command.options, false, true);
  for (const opt of getopt) {
    if (opt.key === '?') {
      process.stderr.write(`${opt.value}\n`);
      ctx.out(ctx.helpText());
      throw new CliExit(0);
    }
    if (!commonOption(ctx, opt)) readOption(ctx, args, opt.key, opt.value);
  }
  const operands = getopt.operands();
  if (operands.length > 1) throw new CliError('At most one filename argument is allowed.');
  const filename = operands[0];
  if (filename === undefined && (args.imageOpts || args.format !== undefined || args.snapshot !== undefined)) {
    throw new CliError('--image-opts, -f, and -l require a filename argument.');
  }
  if (filename !== undefined && args.sizeBytes !== undefined) throw new CliError('--size N cannot be used together with a filename.');
  if (filename === undefined && args.sizeBytes === undefined) throw new CliError('Either --size N or one filename must be specified.');
  return { ...args, filename };
}

function readOption(ctx: ImgContext, args: MeasureArgs, key: string, value: string | undefined): void {
  if (key === 'f') args.format = value;
  else if (key === 'O') args.outFormat = value!;
  else if (key === 'o') args.options = accumulateOptions(args.options, value!);
  else if (key === 'l') args.snapshot = snapshotParam(value!);
  else if (key === 'forceShare') args.forceShare = true;
  else if (key === 'imageOpts') args.imageOpts = true;
  else if (key === 'output') args.output = outputValue(value!);
  else if (key === 'size') args.sizeBytes = cvtnum('image size', value!, ctx.graph.onWarning);
}

/** --output, checked as soon as it is read. */
function outputValue(value: string): OutputFormat {
  if (value === 'json' || value === 'human') return value;
  throw new CliError('--output must be used with human or json as argument.');
}

/**
 * A `-l` value: `snapshot.id=ID,snapshot.name=NAME` (QEMU's
 * internal_snapshot_opts, either key optional), or an ID or name.
 */
export function snapshotParam(text: string): SnapshotRef {
  if (!text.startsWith(SNAPSHOT_OPT_BASE)) return { idOrName: text };
  const ref: SnapshotRef = {};
  for (const [key, value] of splitQemuOpts(text)) {
    if (key === `${SNAPSHOT_OPT_BASE}id`) ref.id = value;
    else if (key === `${SNAPSHOT_OPT_BASE}name`) ref.name = value;
    else throw new CliError(`Invalid parameter '${key}'\n${PROG}: Failed in parsing snapshot param '${text}'`);
  }
  return ref;
}

/** Opens the image to measure read-only, and loads its snapshot (-l). */
async function openSource(ctx: ImgContext, args: MeasureArgs, filename: string): Promise<BlockNode> {
  const node = await imgOpen(ctx.graph, { filename, format: args.format, imageOpts: args.imageOpts, forceShare: args.forceShare, readOnly: true });
  try {
    if (args.snapshot) await loadSnapshotTmp(node, args.snapshot);
  } catch (e) {
    await ctx.graph.unref(node);
    if (e instanceof BlockError) throw new CliError(`Failed to load snapshot: ${e.message}`);
    throw e;
  }
  return node;
}

async function measure(ctx: ImgContext, args: MeasureArgs, source: BlockNode | null): Promise<MeasureInfo> {
  try {
    return await measureImage(ctx.graph, {
      format: args.outFormat,
      options: splitQemuOpts(args.options ?? ''),
      sizeBytes: args.sizeBytes,
      source,
    });
  } catch (e) {
    if (e instanceof MeasureOptionsError) throw new CliError(`${e.message}\n${PROG}: Invalid options for file format '${e.format}'`);
    throw e;
  }
}

function humanText(info: MeasureInfo): string {
  const bitmaps = info.bitmaps === undefined ? '' : `bitmaps size: ${info.bitmaps}\n`;
  return `required size: ${info.required}\nfully allocated size: ${info.fullyAllocated}\n${bitmaps}`;
}

/** BlockMeasureInfo in QAPI member order; QEMU's visitor prints the sizes as int64. */
function measureInfoJson(info: MeasureInfo): Record<string, bigint | undefined> {
  const int64 = (v: bigint | undefined) => (v === undefined ? undefined : BigInt.asIntN(64, v));
  return { required: int64(info.required), 'fully-allocated': int64(info.fullyAllocated), bitmaps: int64(info.bitmaps) };
}
