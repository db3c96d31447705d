/*
 * qemu-img resize (img_resize in QEMU 7.2's qemu-img.c; the work is the
 * format driver's truncate through the gate).
 *
 * Arguments, in qemu-img's order: fewer than two arguments is "Not enough
 * arguments"; the last argument is the size and is taken away before
 * getopt runs, so a negative size is never read as an option; then the
 * options (a bad --preallocation fails at once: "Invalid preallocation mode
 * 'X'"); then exactly one file name must be left ("Expecting image file name
 * and size"). The size is `[+|-]SIZE`: absolute, or relative to the current
 * length; it is parsed as QemuOpts parses a size option (before the image
 * is opened) and the arithmetic is C's int64.
 *
 * The image is opened read-write (with its backing chain), then: a new size
 * that is not positive, preallocation that does not grow, or a shrink
 * without --shrink are refused with qemu-img's texts (the last one adds a
 * warning about the data beyond the new end). The resize itself is exact;
 * its errors are the driver's. "Image resized." unless -q.
 */
import { Option } from 'commander';
import { BlockBackend } from '../../block/backend.js';
import { PREALLOC_MODES, type Prealloc } from '../../block/flags.js';
import { parseSizeBig } from '../../block/units.js';
import { CliError, usageError } from '../cli-common.js';
import { commonOption, commonOptions, declareCommand, PROG, type ImgCommand, type ImgContext } from './command.js';
import { GetoptLong } from './getopt.js';
import { imgOpen } from './open.js';

const command = declareCommand(
  'resize',
  '[--object objectdef] [--image-opts] [-f fmt] [--preallocation=prealloc] [-q] [--shrink] filename [+ | -]size',
  'resize an image',
  [
    commonOptions.help(),
    new Option('-f <fmt>', 'image format (probed when absent)'),
    new Option('-q', 'quiet: do not print "Image resized."'),
    commonOptions.object(),
    commonOptions.imageOpts(),
    new Option('--preallocation <prealloc>', 'preallocate the new area: off, metadata, falloc or full'),
    new Option('--shrink', 'allow the image to shrink (data past the new end is lost)'),
  ],
);

interface ResizeArgs {
  format?: string;
  quiet: boolean;
  imageOpts: boolean;
  prealloc: Prealloc;
  shrink: boolean;
}

const INT64_BITS = 64;

async function run(ctx: ImgContext, argv: string[]): Promise<number> {
  if (argv.length < 3) throw usageError('Not enough arguments');
  const sizeText = argv[argv.length - 1]!;
  const args: ResizeArgs = { quiet: false, imageOpts: false, prealloc: 'off', shrink: false };
  const getopt = new GetoptLong(argv.slice(0, -1), command.options);
  for (const opt of getopt) {
    if (commonOption(ctx, opt)) continue;
    if (opt.key === 'f') args.format = opt.value;
    else if (opt.key === 'q') args.quiet = true;
    else if (opt.key === 'imageOpts') args.imageOpts = true;
    else if (opt.key === 'preallocation') args.prealloc = preallocMode(opt.value!);
    else if (opt.key === 'shrink') args.shrink = true;
  }
  const operands = getopt.operands();
  if (operands.length !== 1) throw usageError('Expecting image file name and size');
  const filename = operands[0]!;
  const { relative, bytes } = parseNewSize(sizeText, ctx.graph.onWarning);
  const node = await imgOpen(ctx.graph, { filename, format: args.format, imageOpts: args.imageOpts, readOnly: false });
  const blk = new BlockBackend(ctx.graph, node, { writable: true, resizable: true });
  try {
    const current = BigInt(blk.getLength());
    const total = relative === 0 ? bytes : BigInt.asIntN(INT64_BITS, current + BigInt(relative) * bytes);
    checkNewSize(total, current, args);
    await blk.truncate(Number(total), true, args.prealloc);
  } finally {
    await blk.close();
  }
  if (!args.quiet) ctx.out('Image resized.\n');
  return 0;
}

export const resizeCommand: ImgCommand = { command, run };

/** qapi_enum_parse(PreallocMode) for --preallocation. */
function preallocMode(text: string): Prealloc {
  const mode = PREALLOC_MODES.find((m) => m === text);
  if (mode === undefined) throw new CliError(`Invalid preallocation mode '${text}'`);
  return mode;
}

/** `[+|-]SIZE`: the sign (0: absolute) and the size as QemuOpts reads it, as an int64. */
function parseNewSize(text: string, warn: (message: string) => void): { relative: -1 | 0 | 1; bytes: bigint } {
  const relative = text.startsWith('+') ? 1 : text.startsWith('-') ? -1 : 0;
  const value = relative === 0 ? text : text.slice(1);
  const parsed = parseSizeBig(value, 'B', warn);
  if (parsed === 'range') throw new CliError(`Value '${value}' is out of range for parameter 'size'`);
  if (parsed === 'invalid') {
    throw new CliError(
      "Parameter 'size' expects a non-negative number below 2^64\n" +
        'Optional suffix k, M, G, T, P or E means kilo-, mega-, giga-, tera-, peta-\nand exabytes, respectively.',
    );
  }
  return { relative, bytes: BigInt.asIntN(INT64_BITS, parsed) };
}

/** img_resize's refusals before the truncate, in its order. */
function checkNewSize(total: bigint, current: bigint, args: ResizeArgs): void {
  if (total <= 0n) throw new CliError('New image size must be positive');
  if (total <= current && args.prealloc !== 'off') throw new CliError('Preallocation can only be used for growing images');
  if (total < current && !args.shrink) {
    throw new CliError(
      'Use the --shrink option to perform a shrink operation.\n' +
        `${PROG}: warning: Shrinking an image will delete all data beyond the shrunken image's end. ` +
        'Before performing such an operation, make sure there is no important data there.',
    );
  }
}
