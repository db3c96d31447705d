/*
 * What every qemu-img subcommand shares: its declaration, its context, and
 * the small helpers of qemu-img.c that several commands call (cvtnum,
 * --output checking, the one-file-name rule).
 *
 * A subcommand is one file under img/ exporting an ImgCommand: a commander
 * `Command` that declares its name, qemu-img's syntax line and its options
 * (used both for `--help` and as the getopt table), and `run`, which parses
 * argv with GetoptLong and does the work. Adding `convert` or `check` is
 * one more file and one more entry in qemu-img.ts's list.
 */
import { Command, Option } from 'commander';
import type { BlockGraph } from '../../block/graph.js';
import { parseSizeBig } from '../../block/units.js';
import { CliError, CliExit, usageError } from '../cli-common.js';
import type { ObjectRegistry } from '../../block/objects.js';
import { GetoptLong, type ParsedOption } from './getopt.js';

/** QEMU's tools print their own name, whatever argv[0] is (see the reference, §0). */
export const PROG = 'qemu-img';

/** Largest value cvtnum accepts (INT64_MAX). */
const CVTNUM_MAX = (1n << 63n) - 1n;

export interface ImgContext {
  readonly graph: BlockGraph;
  readonly objects: ObjectRegistry;
  /** Writes to standard output. */
  out(text: string): void;
  /** The full `--help` text. */
  helpText(): string;
}

export interface ImgCommand {
  /** Name, syntax line (`usage`), summary and options of the command. */
  readonly command: Command;
  /** Runs the command on its arguments (argv[0] is the command name); resolves to the exit status. */
  run(ctx: ImgContext, argv: string[]): Promise<number>;
}

/** Declares a subcommand with qemu-img's syntax line and its options. */
export function declareCommand(name: string, syntax: string, summary: string, options: Option[]): Command {
  const cmd = new Command(name).usage(syntax).summary(summary).description(summary).helpOption(false);
  for (const o of options) cmd.addOption(o);
  return cmd;
}

/** Options several commands declare the same way. */
export const commonOptions = {
  help: () => new Option('-h, --help', 'display the help and exit'),
  object: () => new Option('--object <objectdef>', 'define an object such as a secret'),
  imageOpts: () => new Option('--image-opts', 'treat the file name as an option string (key=value,...)'),
  forceShare: () => new Option('-U, --force-share', 'open the image even if another process uses it'),
  output: () => new Option('--output <ofmt>', 'output format: human or json'),
};

/** What the commands that read one image (info, map; later check, compare…) take to open it. */
export interface ImageArgs {
  format?: string;
  output?: string;
  imageOpts: boolean;
  forceShare: boolean;
}

/** The options that fill ImageArgs, plus -h and --object. */
export function imageCommandOptions(): Option[] {
  return [
    commonOptions.help(),
    new Option('-f, --format <fmt>', 'image format (probed when absent)'),
    commonOptions.output(),
    commonOptions.object(),
    commonOptions.imageOpts(),
    commonOptions.forceShare(),
  ];
}

/** Records an ImageArgs option; false for anything else. */
function imageArg(args: ImageArgs, opt: ParsedOption): boolean {
  if (opt.key === 'format') args.format = opt.value;
  else if (opt.key === 'output') args.output = opt.value;
  else if (opt.key === 'imageOpts') args.imageOpts = true;
  else if (opt.key === 'forceShare') args.forceShare = true;
  else return false;
  return true;
}

/**
 * Reads the arguments of a command on one image (info, map; later check,
 * compare…) in qemu-img's order: options as they come (the common ones and
 * ImageArgs here, the command's own through `own`), then exactly one file
 * name, then the --output value.
 */
export function readImageCommand(
  ctx: ImgContext,
  command: Command,
  argv: string[],
  args: ImageArgs,
  own: (opt: ParsedOption) => void,
): { filename: string; output: OutputFormat } {
  const getopt = new GetoptLong(argv, command.options);
  for (const opt of getopt) {
    if (!commonOption(ctx, opt) && !imageArg(args, opt)) own(opt);
  }
  const operands = getopt.operands();
  if (operands.length !== 1) throw usageError('Expecting one image file name');
  return { filename: operands[0]!, output: outputFormat(args.output) };
}

/**
 * Handles the options every command treats alike: -h prints the full help
 * and ends with status 0; --object defines an object at once (as qemu-img,
 * before later options are read). Returns false for other options.
 */
export function commonOption(ctx: ImgContext, opt: ParsedOption): boolean {
  if (opt.key === 'help') {
    ctx.out(ctx.helpText());
    throw new CliExit(0);
  }
  if (opt.key === 'object') {
    const listing = ctx.objects.add(opt.value!);
    if (listing !== null) {
      ctx.out(listing);
      throw new CliExit(0);
    }
    return true;
  }
  return false;
}

/**
 * qemu-img's cvtnum: a size from 0 to INT64_MAX (cvtnum_full: from `min`
 * to `max`), with qemu-img's two error texts; `warn` gets qemu_strtosz's
 * deprecation warning (hex with a suffix).
 */
export function cvtnum(what: string, text: string, warn: (message: string) => void, min = 0n, max = CVTNUM_MAX): bigint {
  const v = parseSizeBig(text, 'B', warn);
  if (v === 'invalid') {
    throw new CliError(
      `Invalid ${what} specified. You may use k, M, G, T, P or E suffixes for\n` +
        `${PROG}: kilobytes, megabytes, gigabytes, terabytes, petabytes and exabytes.`,
    );
  }
  if (v === 'range' || v > max || v < min) {
    throw new CliError(`Invalid ${what} specified. Must be between ${min} and ${max}.`);
  }
  return v;
}

export type OutputFormat = 'human' | 'json';

/** The --output value (last one given), checked as qemu-img does after the file name. */
function outputFormat(output: string | undefined): OutputFormat {
  if (output === undefined || output === 'human') return 'human';
  if (output === 'json') return 'json';
  throw new CliError('--output must be used with human or json as argument.');
}
