/*
 * qemu-img dd (img_dd in QEMU 7.2's qemu-img.c): copies an image, or a
 * part of it, into a new image.
 *
 * Arguments: options (-f input format, -O output format, default raw;
 * --image-opts and -U apply to the input), then dd(1)-style operands,
 * read in order, the first bad one ending the command: `bs=` (1 to
 * INT_MAX, default 512), `count=`, `skip=` (blocks of bs), `if=`, `of=`;
 * anything else is "unrecognized operand NAME". if= and of= are required.
 *
 * Order of work, as qemu-img: open the input (read-only); check the output
 * format ("Unknown file format"), its protocol and that both create images;
 * size the output: the input's length, cut to count*bs when that is
 * shorter, minus skip*bs (0 when skip reaches past the end); create it
 * with only its size set ("OUT: error while creating output image: …");
 * open it; report "IN: cannot skip to specified offset" when skip is past
 * the end (the output stays empty and the status is 0); copy. Every error
 * ends with status 1.
 *
 * The copy differs from QEMU's block-by-block loop in how, not in what:
 * bs only sizes the output and places skip. Data moves in requests of up
 * to DD_BUF_BYTES, so memory stays bounded whatever bs is, and ranges the
 * input's block status reports as zeroes are not written when the new
 * output already reads as zeroes (has zero init). The output has the same
 * content and size as qemu-img's, but stays sparse where the input is.
 */
import { Option } from 'commander';
import { BlockBackend } from '../../block/backend.js';
import { BlockError, strerror } from '../../block/errors.js';
import { Status } from '../../block/flags.js';
import { CliError, reportError } from '../cli-common.js';
import { commonOption, commonOptions, cvtnum, declareCommand, PROG, type ImgCommand, type ImgContext } from './command.js';
import { GetoptLong } from './getopt.js';
import { imgOpen } from './open.js';

const command = declareCommand(
  'dd',
  '[--image-opts] [-U] [-f fmt] [-O output_fmt] [bs=block_size] [count=blocks] [skip=blocks] if=input of=output',
  'copy an image to a new image, dd style',
  [
    commonOptions.help(),
    new Option('-f <fmt>', 'input format (probed when absent)'),
    new Option('-O <output_fmt>', 'output format (default raw)'),
    commonOptions.forceShare(),
    commonOptions.object(),
    commonOptions.imageOpts(),
  ],
);

/** dd's default block size. */
const DEFAULT_BLOCK_BYTES = 512n;
/** bs is an int in QEMU. */
const INT_MAX = 0x7fffffffn;
const INT64_MAX = (1n << 63n) - 1n;
/** Largest read and write of the copy. */
export const DD_BUF_BYTES = 2 << 20;

interface DdArgs {
  format?: string;
  outFormat: string;
  forceShare: boolean;
  imageOpts: boolean;
  blockBytes: bigint;
  count?: bigint;
  skip?: bigint;
  input?: string;
  output?: string;
}

/** What the output gets: its size, and where in the input the copy starts and ends. */
interface DdPlan {
  outputBytes: bigint;
  startBytes: number;
  endBytes: number;
  skipPastEnd: boolean;
}

async function run(ctx: ImgContext, argv: string[]): Promise<number> {
  const args = readArgs(ctx, argv);
  if (args.input === undefined || args.output === undefined) throw new CliError('Must specify both input and output files');
  const source = await imgOpen(ctx.graph, { filename: args.input, format: args.format, imageOpts: args.imageOpts, forceShare: args.forceShare, readOnly: true });
  const input = new BlockBackend(ctx.graph, source);
  try {
    checkOutputFormat(ctx, args.outFormat, args.output);
    const plan = planCopy(args, input.getLength());
    await createOutput(ctx, args.outFormat, args.output, plan.outputBytes);
    const target = await imgOpen(ctx.graph, { filename: args.output, format: args.outFormat, readOnly: false });
    const output = new BlockBackend(ctx.graph, target, { writable: true });
    try {
      if (plan.skipPastEnd) reportError(PROG, `${args.input}: cannot skip to specified offset`);
      await copy(input, output, plan);
    } finally {
      await output.close();
    }
  } finally {
    await input.close();
  }
  return 0;
}

export const ddCommand: ImgCommand = { command, run };

function readArgs(ctx: ImgContext, argv: string[]): DdArgs {
  const args: DdArgs = { outFormat: 'raw', forceShare: false, imageOpts: false, blockBytes: DEFAULT_BLOCK_BYTES };
  const getopt = new GetoptLong(argv, command.options);
  for (const opt of getopt) {
    if (commonOption(ctx, opt)) continue;
    if (opt.key === 'f') args.format = opt.value;
    else if (opt.key === 'O') args.outFormat = opt.value!;
    else if (opt.key === 'forceShare') args.forceShare = true;
    else if (opt.key === 'imageOpts') args.imageOpts = true;
  }
  for (const operand of getopt.operands()) readOperand(ctx, args, operand);
  return args;
}

/** One `name=value` operand. */
function readOperand(ctx: ImgContext, args: DdArgs, operand: string): void {
  const eq = operand.indexOf('=');
  if (eq < 0) throw new CliError(`unrecognized operand ${operand}`);
  const [name, value] = [operand.slice(0, eq), operand.slice(eq + 1)];
  const warn = ctx.graph.onWarning;
  if (name === 'bs') args.blockBytes = cvtnum('bs', value, warn, 1n, INT_MAX);
  else if (name === 'count') args.count = cvtnum('count', value, warn);
  else if (name === 'skip') args.skip = cvtnum('skip', value, warn);
  else if (name === 'if') args.input = value;
  else if (name === 'of') args.output = value;
  else throw new CliError(`unrecognized operand ${name}`);
}

/** The output format and the output's protocol must exist and create images. */
function checkOutputFormat(ctx: ImgContext, format: string, filename: string): void {
  const drv = ctx.graph.findDriver(format);
  if (!drv) throw new CliError('Unknown file format');
  const proto = ctx.graph.protocolFor(filename);
  if (!drv.createOpts) throw new CliError(`Format driver '${drv.name}' does not support image creation`);
  if (!proto.createOpts) throw new CliError(`Protocol driver '${proto.name}' does not support image creation`);
}

/** Sizes as img_dd computes them, in int64 arithmetic (see the note at the top). */
function planCopy(args: DdArgs, inputBytes: number): DdPlan {
  const bs = args.blockBytes;
  let size = BigInt(inputBytes);
  if (args.count !== undefined && args.count <= INT64_MAX / bs && args.count * bs < size) size = args.count * bs;
  const skip = args.skip ?? 0n;
  const skipPastEnd = skip > INT64_MAX / bs || size < bs * skip;
  const start = skipPastEnd ? size : bs * skip;
  return { outputBytes: size - start, startBytes: Number(start), endBytes: Number(size), skipPastEnd };
}

/** bdrv_create with only the size set. */
async function createOutput(ctx: ImgContext, format: string, filename: string, sizeBytes: bigint): Promise<void> {
  try {
    await ctx.graph.createImage(format, filename, new Map([['size', String(sizeBytes)]]));
  } catch (e) {
    if (e instanceof BlockError) throw new CliError(`${filename}: error while creating output image: ${e.message}`);
    throw e;
  }
}

/** Copies input [start, end) to output offset 0 on; zero ranges are skipped on an output that reads as zeroes. */
async function copy(input: BlockBackend, output: BlockBackend, plan: DdPlan): Promise<void> {
  const skipZeroes = output.node.driver.hasZeroInit(output.node);
  const buf = new Uint8Array(Math.min(DD_BUF_BYTES, plan.endBytes - plan.startBytes));
  for (let pos = plan.startBytes; pos < plan.endBytes; ) {
    const zero = skipZeroes ? await zeroRun(input, pos, plan.endBytes) : 0;
    if (zero > 0) {
      pos += zero;
      continue;
    }
    const chunk = buf.subarray(0, Math.min(buf.length, plan.endBytes - pos));
    await transfer(() => input.pread(pos, chunk), 'reading from input');
    await transfer(() => output.pwrite(pos - plan.startBytes, chunk), 'writing to output');
    pos += chunk.length;
  }
}

/** Bytes from `pos` (before `end`) that the input's chain reports as zeroes; 0 when data comes first. */
async function zeroRun(input: BlockBackend, pos: number, end: number): Promise<number> {
  const s = await transfer(() => input.blockStatusAbove(pos, end - pos), 'reading from input');
  return s.status & Status.ZERO ? s.pnum : 0;
}

/** Runs one I/O step; a failure is img_dd's "error while … image file: <strerror>". */
async function transfer<T>(io: () => Promise<T>, what: string): Promise<T> {
  try {
    return await io();
  } catch (e) {
    if (e instanceof BlockError) throw new CliError(`error while ${what} image file: ${strerror(e.code)}`);
    throw e;
  }
}
