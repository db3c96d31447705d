/*
 * qemu-img create (img_create and print_block_option_help in QEMU 7.2's
 * qemu-img.c; the work itself is block/create.ts).
 *
 * Order, as qemu-img: options in command-line order (each `-o` must be a
 * valid option list on its own: not empty, not starting with ',', not
 * ending in an odd number of ','; repeated `-o` are joined with ','); then
 * `-o help` or `-o ?` anywhere lists the options and ends with status 0;
 * then the file name is required, the size (if any) goes through cvtnum,
 * and anything after it is an "Unexpected argument". Errors from creating
 * are printed as "FILENAME: message"; those before are not.
 *
 * The option listing is qemu_opts_print_help: one `  name=<type>` line per
 * option, padded to 24 columns before " - help", sorted. Without a file name
 * only the format's options are listed, with a hint about the protocol.
 */
import { Option } from 'commander';
import { BlockError } from '../../block/errors.js';
import { createImage, creatableOptions, splitQemuOpts } from '../../block/create.js';
import type { CreateOptDesc } from '../../block/driver.js';
import { CliError, usageError } from '../cli-common.js';
import { commonOption, commonOptions, cvtnum, declareCommand, type ImgCommand, type ImgContext } from './command.js';
import { GetoptLong } from './getopt.js';

const command = declareCommand(
  'create',
  '[--object objectdef] [-q] [-f fmt] [-b backing_file [-F backing_fmt]] [-u] [-o options] filename [size]',
  'create a new image',
  [
    commonOptions.help(),
    commonOptions.object(),
    new Option('-F <backing_fmt>', 'format of the backing file'),
    new Option('-b <backing_file>', 'backing file of the new image'),
    new Option('-f <fmt>', 'image format (default raw)'),
    new Option('-o <options>', 'format options, key=value,...; -o help lists them'),
    new Option('-q', 'quiet: do not print the Formatting line'),
    new Option('-u', 'do not open the backing file (unsafe)'),
  ],
);

/** Width qemu_opts_print_help pads `  name=<type>` to. */
const HELP_NAME_COLUMNS = 24;
const TYPE_NAMES: Record<CreateOptDesc['type'], string> = { string: 'str', bool: 'bool (on/off)', number: 'num', size: 'size' };

interface CreateArgs {
  format: string;
  options?: string;
  backingFile?: string;
  backingFormat?: string;
  quiet: boolean;
  unsafe: boolean;
}

async function run(ctx: ImgContext, argv: string[]): Promise<number> {
  const args: CreateArgs = { format: 'raw', quiet: false, unsafe: false };
  const getopt = new GetoptLong(argv, command.options);
  for (const opt of getopt) {
    if (commonOption(ctx, opt)) continue;
    if (opt.key === 'F') args.backingFormat = opt.value;
    else if (opt.key === 'b') args.backingFile = opt.value;
    else if (opt.key === 'f') args.format = opt.value!;
    else if (opt.key === 'o') args.options = accumulateOptions(args.options, opt.value!);
    else if (opt.key === 'q') args.quiet = true;
    else if (opt.key === 'u') args.unsafe = true;
  }
  const [filename, sizeText, extra] = getopt.operands();
  if (args.options !== undefined && hasHelpOption(args.options)) {
    ctx.out(optionHelp(ctx, args.format, filename));
    return 0;
  }
  if (filename === undefined) throw usageError('Expecting image file name');
  const sizeBytes = sizeText === undefined ? undefined : cvtnum('image size', sizeText, ctx.graph.onWarning);
  if (extra !== undefined) throw usageError(`Unexpected argument: ${extra}`);
  try {
    await createImage(ctx.graph, {
      ...args,
      filename,
      sizeBytes,
      options: splitQemuOpts(args.options ?? ''),
      onFormatting: (line) => ctx.out(`${line}\n`),
    });
  } catch (e) {
    if (e instanceof BlockError) throw new CliError(`${filename}: ${e.message}`);
    throw e;
  }
  return 0;
}

export const createCommand: ImgCommand = { command, run };

/** accumulate_options: checks one `-o` argument and appends it. */
export function accumulateOptions(sofar: string | undefined, text: string): string {
  const trailingCommas = text.length - text.replace(/,+$/, '').length;
  if (text === '' || text.startsWith(',') || trailingCommas % 2 === 1) {
    throw new CliError(`Invalid option list: ${text}`);
  }
  return sofar === undefined ? text : `${sofar},${text}`;
}

/** has_help_option: some element of the list (`,,` being a comma inside it) is exactly `help` or `?`. */
export function hasHelpOption(options: string): boolean {
  let element = '';
  for (let i = 0; i <= options.length; i++) {
    if (i === options.length || (options[i] === ',' && options[i + 1] !== ',')) {
      if (element === 'help' || element === '?') return true;
      element = '';
      continue;
    }
    if (options[i] === ',') i++;
    element += options[i];
  }
  return false;
}

/** qemu_opts_print_help without caption: one `  name=<type> - help` line per option, sorted. */
export function optionListText(descs: readonly CreateOptDesc[]): string {
  const lines = descs.map((d) => `  ${d.name}=<${TYPE_NAMES[d.type]}>`.padEnd(HELP_NAME_COLUMNS) + ` - ${d.help}`);
  lines.sort((a, b) => (a < b ? -1 : a > b ? 1 : 0));
  return lines.map((l) => `${l}\n`).join('');
}

/** print_block_option_help: the option list of a format (and protocol, given a file name). */
export function optionHelp(ctx: ImgContext, format: string, filename: string | undefined): string {
  let descs: CreateOptDesc[];
  try {
    descs = creatableOptions(ctx.graph, format, filename ?? '');
  } catch (e) {
    if (e instanceof BlockError) throw new CliError(e.message);
    throw e;
  }
  if (filename === undefined) descs = [...(ctx.graph.driver(format).createOpts ?? [])];
  const body = optionListText(descs);
  if (filename !== undefined) return `Supported options:\n${body}`;
  return (
    `Supported ${format} options:\n${body}\n` +
    'The protocol level may support further options.\nSpecify the target filename to include those options.\n'
  );
}
