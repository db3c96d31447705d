/*
 * Image creation as qemu-img does it (QEMU's bdrv_img_create, block.c).
 *
 * Order of work, which decides which error a user sees first:
 *   1. the format must exist ("Unknown file format"), and it and the
 *      filename's protocol must be able to create images;
 *   2. the `-o` options are checked one by one against the merged option
 *      list of format and protocol (graph.createOptsFor), in the order given:
 *      an unknown name or a value that does not parse stops at once; `id` is
 *      ignored, as QemuOpts does; a name given twice keeps the last value;
 *   3. the size: from `-o size=` or the size argument, not both;
 *   4. backing file and format: refused unless the option list has them;
 *      unless `unsafe`, the backing image is opened to check it and to take
 *      its size when none was given;
 *   5. no size by now is an error;
 *   6. the `Formatting 'NAME', fmt=FMT k=v …` line goes to onFormatting
 *      BEFORE the driver runs, so it is printed even when creation fails;
 *   7. the format driver creates the image; EFBIG becomes "The image size is
 *      too large for file format 'FMT'".
 *
 * Values are kept as QemuOpts keeps them: the text as given, and for size
 * and number options the parsed unsigned 64-bit value. The Formatting line
 * walks the option list in its own order and prints set values and
 * defaults: sizes and numbers as signed 64-bit decimals (QEMU's PRId64, so
 * 2^63 prints negative), strings with `,` doubled, booleans as typed. The
 * driver receives the same values by name (strings raw, not doubled).
 *
 * Errors are BlockErrors whose text is QEMU's; qemu-img prefixes them with
 * the file name. Not done here: encryption secrets, `cluster_size` checks
 * (the drivers' business), and protocols other than those in the graph.
 */
import path from 'node:path';
import { BlockError, isBlockError } from './errors.js';
import type { CreateOptDesc } from './driver.js';
import type { BlockGraph } from './graph.js';
import type { BlockNode } from './node.js';
import { parseWith, zBool, zInt, zSize } from './options.js';
import { parseSizeBig } from './units.js';

export interface CreateImageRequest {
  format: string;
  filename: string;
  /** The size argument in bytes, when one was given (qemu-img's positional size). */
  sizeBytes?: bigint | number;
  /** The `-o` values, in the order given; a Map works, pairs keep repeats in order. */
  options: Iterable<readonly [string, string]>;
  backingFile?: string;
  backingFormat?: string;
  /** `-u`: do not open the backing file. */
  unsafe?: boolean;
  /** `-q`: do not report the Formatting line. */
  quiet?: boolean;
  /** Receives the `Formatting …` line (without newline) before the image is created. */
  onFormatting?: (line: string) => void;
}

/** One option value as QemuOpts holds it. */
interface OptValue {
  desc: CreateOptDesc;
  /** The text as given. */
  text: string;
  /** Size and number options: the parsed value (unsigned 64 bits). */
  uint?: bigint;
}

const UINT64_BITS = 64;
/** qemu_opt_get_size's "not set" (-1 as uint64) also means "no size". */
const NO_SIZE = -1n;

/** Option names with meaning to bdrv_img_create (QEMU's BLOCK_OPT_*). */
const OPT = { size: 'size', backingFile: 'backing_file', backingFmt: 'backing_fmt', clusterSize: 'cluster_size' } as const;

/** bdrv_img_create: creates `filename` in `format` (see the note at the top). */
export async function createImage(graph: BlockGraph, req: CreateImageRequest): Promise<void> {
  await prepareCreate(graph, req).create();
}

/** A creation whose options were checked, not yet carried out. */
export interface PreparedCreate {
  /** The text of an option as it will be used (`-o` or -b/-F), if set. */
  option(name: string): string | undefined;
  create(): Promise<void>;
}

/**
 * The checks of bdrv_img_create up to the backing file (format, protocol,
 * `-o` values, size, -b/-F), so that a caller (qemu-img convert) can make
 * its own checks before anything is created.
 */
export function prepareCreate(graph: BlockGraph, req: CreateImageRequest): PreparedCreate {
  const descs = creatableOptions(graph, req.format, req.filename);
  const values = parseCreateOptions(descs, req.options, (message) => graph.onWarning(message));
  const given = setSize(values, descs, req.sizeBytes);
  setBacking(values, descs, req);
  return {
    option: (name) => values.get(name)?.text,
    create: async () => {
      const size = await checkBacking(graph, values, descs, req, given);
      if (size === NO_SIZE) throw new BlockError('EINVAL', 'Image creation needs a size parameter');
      if (!req.quiet) req.onFormatting?.(formattingLine(req.filename, req.format, descs, values));
      await driverCreate(graph, req, descs, values);
    },
  };
}

async function driverCreate(graph: BlockGraph, req: CreateImageRequest, descs: CreateOptDesc[], values: Map<string, OptValue>) {
  try {
    await graph.createImage(req.format, req.filename, driverOptions(descs, values));
  } catch (e) {
    if (!isBlockError(e, 'EFBIG')) throw e;
    // qemu_opt_get_size falls back to the option's default: the hint shows for any format with a cluster size.
    const clusterSize = values.get(OPT.clusterSize)?.uint ?? BigInt(descs.find((d) => d.name === OPT.clusterSize)?.defaultValue ?? 0);
    const hint = clusterSize !== 0n ? ' (try using a larger cluster size)' : '';
    throw new BlockError('EFBIG', `The image size is too large for file format '${req.format}'${hint}`, { cause: e });
  }
}

/** The merged `-o` list for a format on a filename, after QEMU's capability checks. */
export function creatableOptions(graph: BlockGraph, format: string, filename: string): CreateOptDesc[] {
  const drv = graph.findDriver(format);
  if (!drv) throw new BlockError('EINVAL', `Unknown file format '${format}'`);
  if (!drv.coCreate || !drv.createOpts) {
    throw new BlockError('ENOTSUP', `Format driver '${format}' does not support image creation`);
  }
  const proto = graph.protocolFor(filename);
  if (!proto.coCreate || !proto.createOpts) {
    throw new BlockError('ENOTSUP', `Protocol driver '${proto.name}' does not support image creation`);
  }
  return graph.createOptsFor(format, filename);
}

/** Checks and parses `-o` values in order; the last of repeated names wins. */
function parseCreateOptions(
  descs: CreateOptDesc[],
  options: Iterable<readonly [string, string]>,
  warn: (message: string) => void,
): Map<string, OptValue> {
  const values = new Map<string, OptValue>();
  for (const [name, text] of options) {
    if (name === 'id') continue;
    const desc = descs.find((d) => d.name === name);
    if (!desc) throw new BlockError('EINVAL', `Invalid parameter '${name}'`);
    values.set(name, { desc, text, uint: parseTyped(desc, text, warn) });
  }
  return values;
}

/**
 * The `-o` values checked against `descs` as above, by name: sizes and
 * numbers as unsigned decimals, other values as given (qemu-img measure).
 */
export function checkedOptionValues(
  descs: readonly CreateOptDesc[],
  options: Iterable<readonly [string, string]>,
  warn: (message: string) => void,
): Map<string, string> {
  const out = new Map<string, string>();
  for (const [name, v] of parseCreateOptions([...descs], options, warn)) out.set(name, v.uint !== undefined ? String(v.uint) : v.text);
  return out;
}

/**
 * qemu_opt_parse: the value of a size or number option; checks booleans.
 * Sizes keep all 64 bits (the Formatting line prints them); the zod
 * helpers, whose messages are QemuOpts', reject what does not parse.
 */
function parseTyped(desc: CreateOptDesc, text: string, warn: (message: string) => void): bigint | undefined {
  switch (desc.type) {
    case 'size': {
      const v = parseSizeBig(text, 'B', warn);
      return typeof v === 'bigint' ? v : BigInt(parseWith(zSize(desc.name), text));
    }
    case 'number':
      return BigInt(parseWith(zInt(desc.name), text));
    case 'bool':
      parseWith(zBool(desc.name), text);
      return undefined;
    case 'string':
      return undefined;
  }
}

/** Puts the size argument into the options; returns the size (-1: none) as int64. */
function setSize(values: Map<string, OptValue>, descs: CreateOptDesc[], sizeBytes: bigint | number | undefined): bigint {
  const given = values.get(OPT.size);
  if (given && sizeBytes !== undefined) throw new BlockError('EINVAL', 'The image size must be specified only once');
  if (!given && sizeBytes !== undefined) {
    const uint = BigInt(sizeBytes);
    const desc = descs.find((d) => d.name === OPT.size);
    if (desc) values.set(OPT.size, { desc, text: uint.toString(), uint });
  }
  const uint = values.get(OPT.size)?.uint;
  return uint === undefined ? NO_SIZE : BigInt.asIntN(UINT64_BITS, uint);
}

function setBacking(values: Map<string, OptValue>, descs: CreateOptDesc[], req: CreateImageRequest): void {
  const set = (name: string, text: string, what: string) => {
    const desc = descs.find((d) => d.name === name);
    if (!desc) throw new BlockError('ENOTSUP', `${what} not supported for file format '${req.format}'`);
    values.set(name, { desc, text });
  };
  if (req.backingFile !== undefined) set(OPT.backingFile, req.backingFile, 'Backing file');
  if (req.backingFormat !== undefined) set(OPT.backingFmt, req.backingFormat, 'Backing file format');
}

/** Validates the backing file and, unless unsafe, opens it (for its size when none was given). */
async function checkBacking(
  graph: BlockGraph,
  values: Map<string, OptValue>,
  descs: CreateOptDesc[],
  req: CreateImageRequest,
  size: bigint,
): Promise<bigint> {
  const backingFile = values.get(OPT.backingFile)?.text;
  if (backingFile === undefined) return size;
  if (backingFile === req.filename) {
    throw new BlockError('EINVAL', 'Error: Trying to create an image with the same filename as the backing file');
  }
  if (backingFile === '') throw new BlockError('EINVAL', 'Expected backing file name, got empty string');
  const backingFormat = values.get(OPT.backingFmt)?.text;
  if (req.unsafe) {
    if (backingFormat === undefined) throw new BlockError('EINVAL', 'Backing file specified without backing format');
    return size;
  }
  const backingBytes = await backingImageBytes(graph, fullBackingFilename(req.filename, backingFile), backingFormat);
  if (size !== NO_SIZE) return size;
  const desc = descs.find((d) => d.name === OPT.size)!;
  values.set(OPT.size, { desc, text: String(backingBytes), uint: BigInt(backingBytes) });
  return BigInt(backingBytes);
}

/** Opens the backing image read-only and shared; returns its length. */
async function backingImageBytes(graph: BlockGraph, filename: string, format: string | undefined): Promise<number> {
  let node: BlockNode;
  try {
    node = await graph.openImage(filename, { format, readOnly: true, forceShare: true });
  } catch (e) {
    const err = e instanceof BlockError ? e : new BlockError('EIO', String(e));
    throw new BlockError(err.code, `${err.message}\nCould not open backing image.`, { cause: e });
  }
  try {
    if (format === undefined) {
      throw new BlockError('EINVAL', `Backing file specified without backing format\nDetected format of ${node.driver.name}.`);
    }
    return node.totalBytes;
  } finally {
    await graph.unref(node);
  }
}

/**
 * A backing file name as the image's users resolve it (QEMU's path_combine):
 * absolute names and names with a protocol stay; relative ones are taken
 * from the directory of the image that refers to them.
 */
export function fullBackingFilename(imageFilename: string, backingFile: string): string {
  if (path.isAbsolute(backingFile) || hasProtocol(backingFile) || !imageFilename.includes('/')) return backingFile;
  return imageFilename.slice(0, imageFilename.lastIndexOf('/') + 1) + backingFile;
}

/** path_has_protocol: a `proto:` prefix before any `/`. */
export function hasProtocol(filename: string): boolean {
  const stop = filename.search(/[:/]/);
  return stop >= 0 && filename[stop] === ':';
}

/** `Formatting 'NAME', fmt=FMT ` followed by qemu_opts_print(opts, " "). */
function formattingLine(filename: string, format: string, descs: CreateOptDesc[], values: Map<string, OptValue>): string {
  const parts: string[] = [];
  for (const desc of descs) {
    const opt = values.get(desc.name);
    const text = opt?.text ?? desc.defaultValue;
    if (text === undefined) continue;
    if (desc.type === 'string') parts.push(`${desc.name}=${text.replaceAll(',', ',,')}`);
    else if (opt?.uint !== undefined) parts.push(`${desc.name}=${BigInt.asIntN(UINT64_BITS, opt.uint)}`);
    else parts.push(`${desc.name}=${text}`);
  }
  return `Formatting '${filename}', fmt=${format} ${parts.join(' ')}`;
}

/** What the driver gets: set values and defaults, by name, sizes in decimal. */
function driverOptions(descs: CreateOptDesc[], values: Map<string, OptValue>): Map<string, string> {
  const out = new Map<string, string>();
  for (const desc of descs) {
    const opt = values.get(desc.name);
    if (opt) out.set(desc.name, opt.uint !== undefined ? String(BigInt.asIntN(UINT64_BITS, opt.uint)) : opt.text);
    else if (desc.defaultValue !== undefined) out.set(desc.name, desc.defaultValue);
  }
  return out;
}

/**
 * Splits a QemuOpts string (`-o a=b,flag,nox,c=d,,e`) into ordered pairs as
 * qemu_opts_do_parse does: `,,` is a comma inside a value; a bare name is
 * `name=on`, or `x=off` when it reads `nox`.
 */
export function splitQemuOpts(text: string): Array<[string, string]> {
  const pairs: Array<[string, string]> = [];
  let i = 0;
  while (i < text.length) {
    let end = i;
    while (end < text.length && text[end] !== '=' && text[end] !== ',') end++;
    const name = text.slice(i, end);
    if (text[end] === '=') {
      let value = '';
      for (i = end + 1; i < text.length && !(text[i] === ',' && text[i + 1] !== ','); i++) {
        value += text[i];
        if (text[i] === ',') i++;
      }
      pairs.push([name, value]);
    } else {
      pairs.push(name.startsWith('no') ? [name.slice(2), 'off'] : [name, 'on']);
      i = end;
    }
    if (text[i] === ',') i++;
  }
  return pairs;
}
