/*
 * qemu-img map (img_map and dump_map_entry in QEMU 7.2's qemu-img.c).
 *
 * --start-offset/-s and --max-length/-l are checked with cvtnum as they are
 * read; then one file name, then --output. The image is opened read-only.
 *
 * Human: the header line, then one line per entry that is data and not
 * zero: start, length and host offset as C's "%#-16" PRIx64 (so zero is
 * "0", not "0x0") and the file name; a data entry without a host offset
 * ends the program with "File contains external, encrypted or compressed
 * clusters.". JSON: `[`, the entries joined by ",\n", `]` and a newline;
 * each entry `{ "start": N, "length": N, "depth": N, "present": B,
 * "zero": B, "data": B[, "offset": N]}` (7.2 prints no filename).
 * Entries are written as the walk produces them, so a huge image streams.
 */
import { Option } from 'commander';
import { BlockError, strerror } from '../../block/errors.js';
import { mapImage, type MapEntry } from '../../block/map.js';
import { CliError } from '../cli-common.js';
import { cvtnum, declareCommand, imageCommandOptions, readImageCommand, type ImageArgs, type ImgCommand, type ImgContext, type OutputFormat } from './command.js';
import { imgOpen } from './open.js';

const command = declareCommand(
  'map',
  '[--object objectdef] [--image-opts] [-f fmt] [--start-offset=offset] [--max-length=len] [--output=ofmt] [-U] filename',
  'show where the data of an image is',
  [
    ...imageCommandOptions(),
    new Option('-s, --start-offset <offset>', 'first byte to map'),
    new Option('-l, --max-length <len>', 'bytes to map from the start offset'),
  ],
);

interface MapArgs extends ImageArgs {
  startOffset: bigint;
  maxLength?: bigint;
}

const HUMAN_HEADER = `${'Offset'.padEnd(16)}${'Length'.padEnd(16)}${'Mapped to'.padEnd(16)}File\n`;

async function run(ctx: ImgContext, argv: string[]): Promise<number> {
  const args: MapArgs = { imageOpts: false, forceShare: false, startOffset: 0n };
  const { filename, output } = readImageCommand(ctx, command, argv, args, (opt) => {
    if (opt.key === 'startOffset') args.startOffset = cvtnum('start offset', opt.value!, ctx.graph.onWarning);
    else if (opt.key === 'maxLength') args.maxLength = cvtnum('max length', opt.value!, ctx.graph.onWarning);
  });
  const node = await imgOpen(ctx.graph, {
    filename,
    format: args.format,
    imageOpts: args.imageOpts,
    forceShare: args.forceShare,
    readOnly: true,
  });
  try {
    await printMap(ctx, output, mapImage(node, {
      startOffset: Number(args.startOffset),
      maxLength: args.maxLength === undefined ? undefined : Number(args.maxLength),
      mode: output,
    }));
  } finally {
    await ctx.graph.unref(node);
  }
  return 0;
}

export const mapCommand: ImgCommand = { command, run };

async function printMap(ctx: ImgContext, output: OutputFormat, entries: AsyncGenerator<MapEntry>): Promise<void> {
  ctx.out(output === 'human' ? HUMAN_HEADER : '[');
  let first = true;
  try {
    for await (const e of entries) {
      ctx.out(output === 'human' ? humanLine(e) : `${first ? '' : ',\n'}${jsonEntry(e)}`);
      first = false;
    }
  } catch (e) {
    if (e instanceof BlockError) throw new CliError(`Could not read file metadata: ${strerror(e.code)}`);
    throw e;
  }
  if (output === 'json') ctx.out(']\n');
}

/** C's "%#x": 0 stays "0", anything else gets 0x. */
function hexAlt(n: number): string {
  return n === 0 ? '0' : `0x${n.toString(16)}`;
}

function humanLine(e: MapEntry): string {
  if (e.data && e.offset === undefined) throw new CliError('File contains external, encrypted or compressed clusters.');
  if (!e.data || e.zero) return '';
  return `${hexAlt(e.start).padEnd(16)}${hexAlt(e.length).padEnd(16)}${hexAlt(e.offset ?? 0).padEnd(16)}${e.filename ?? ''}\n`;
}

function jsonEntry(e: MapEntry): string {
  const offset = e.offset !== undefined ? `, "offset": ${e.offset}` : '';
  return `{ "start": ${e.start}, "length": ${e.length}, "depth": ${e.depth}, "present": ${e.present}, "zero": ${e.zero}, "data": ${e.data}${offset}}`;
}
