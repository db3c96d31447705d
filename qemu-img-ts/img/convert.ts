/*
 * qemu-img convert (img_convert in QEMU 7.2's qemu-img.c); the copy itself
 * is block/convert.ts.
 *
 * Order of events, as qemu-img's (it decides which error a user sees):
 * options in order (-S, -m, -r checked as they come), then the option
 * combinations (--skip-broken-bitmaps without --bitmaps, -C with -c,
 * --target-image-opts without -n, -n with -o, --target-is-zero without
 * -n), `-o help`, "Must specify image file name", the source cache mode,
 * the sources (opened read-only), -l, the target format and -o options,
 * the backing-file rules, the compression rules, --bitmaps (single source,
 * bitmap support, no inconsistent bitmap unless --skip-broken-bitmaps), the
 * creation of the target (errors as "TARGET: error while converting FMT: …"),
 * the target cache mode (-t, default unsafe: no flushes), the target's open,
 * its size (-n), bitmap support of the target, the copy, then --bitmaps'
 * copy of every persistent bitmap (written when the target closes).
 * Progress (-p) prints only on a terminal (img/progress.ts).
 */
import { Option } from 'commander';
import { BlockBackend } from '../../block/backend.js';
import { CONVERT_BUF_BYTES, CONVERT_MAX_BUF_SECTORS, CONVERT_MAX_PARALLEL, ConvertError, convertCopy, type ConvertPlan, type ConvertSource } from '../../block/convert.js';
import { prepareCreate, splitQemuOpts, type PreparedCreate } from '../../block/create.js';
import type { NormalisedDriver } from '../../block/driver.js';
import { BlockError, strerror } from '../../block/errors.js';
import { Perm } from '../../block/flags.js';
import type { BlockGraph } from '../../block/graph.js';
import type { BlockNode } from '../../block/node.js';
import { bitmapsCopyRefusal, copyPersistentBitmaps, supportsPersistentBitmaps } from '../../block/dirty-bitmap-ops.js';
import { loadSnapshotTmp, type SnapshotRef } from '../../block/snapshot-tmp.js';
import { SECTOR_BYTES } from '../../block/zero-scan.js';
import { CliError, closeAfterWork, reportedNow } from '../cli-common.js';
import { strtolWhole } from '../io/args.js';
import { applyCacheMode, defaultOpenSettings, type OpenSettings } from '../io/open.js';
import { commonOption, commonOptions, cvtnum, declareCommand, type ImgCommand, type ImgContext } from './command.js';
import { accumulateOptions, hasHelpOption, optionHelp } from './create.js';
import { GetoptLong } from './getopt.js';
import { imgOpen } from './open.js';
import { snapshotParam } from './measure.js';
import { startProgress, type ProgressLike } from './progress.js';

const command = declareCommand(
  'convert',
  '[--object objectdef] [--image-opts] [--target-image-opts] [--target-is-zero] [--bitmaps] [-U] [-C] [-c] [-p] [-q] [-n] [-f fmt] [-t cache] [-T src_cache] [-O output_fmt] [-B backing_file [-F backing_fmt]] [-o options] [-l snapshot_param] [-S sparse_size] [-r rate_limit] [-m num_coroutines] [-W] [--salvage] filename [filename2 [...]] output_filename',
  'convert an image to another format',
  [
    commonOptions.help(),
    commonOptions.object(),
    commonOptions.imageOpts(),
    new Option('--target-image-opts', 'treat the target name as an option string (needs -n)'),
    new Option('--target-is-zero', 'the target (with -n) already reads as zeroes'),
    new Option('--bitmaps', 'also copy the persistent bitmaps of the source'),
    new Option('--skip-broken-bitmaps', 'skip inconsistent bitmaps (with --bitmaps)'),
    new Option('--salvage', 'turn unreadable source areas into zeroes'),
    commonOptions.forceShare(),
    new Option('-C', 'try copy offloading (falls back to reads and writes)'),
    new Option('-c', 'compress the target (qcow2)'),
    new Option('-p', 'show progress on a terminal'),
    new Option('-q', 'quiet'),
    new Option('-n', 'do not create the target; it must exist'),
    new Option('-f <fmt>', 'source format (probed when absent)'),
    new Option('-t <cache>', 'target cache mode (default unsafe)'),
    new Option('-T <src_cache>', 'source cache mode (default writeback)'),
    new Option('-O <output_fmt>', 'target format (default raw)'),
    new Option('-B <backing_file>', 'create the target as an overlay of this file'),
    new Option('-F <backing_fmt>', 'format of the backing file'),
    new Option('-o <options>', 'target format options; -o help lists them'),
    new Option('-l <snapshot_param>', 'convert this internal snapshot of the source'),
    new Option('-S <sparse_size>', 'zero runs at least this long stay sparse (default 4k, 0: write everything)'),
    new Option('-r <rate_limit>', 'write bandwidth limit, bytes per second'),
    new Option('-m <num_coroutines>', 'requests in flight (1-16, default 8)'),
    new Option('-W', 'allow out-of-order writes'),
  ],
);

/** qemu-img's default -S: 8 sectors. */
const DEFAULT_MIN_SPARSE_SECTORS = 8;
const DEFAULT_PARALLEL = 8;

export interface ConvertArgs {
  srcFormat?: string;
  outFormat?: string;
  imageOpts: boolean;
  targetImageOpts: boolean;
  targetIsZero: boolean;
  bitmaps: boolean;
  skipBroken: boolean;
  salvage: boolean;
  forceShare: boolean;
  copyRange: boolean;
  compressed: boolean;
  progress: boolean;
  quiet: boolean;
  noCreate: boolean;
  cache: string;
  srcCache: string;
  backingFile?: string;
  backingFormat?: string;
  options?: string;
  snapshot?: SnapshotRef;
  minSparseSectors: number;
  explicitMinSparse: boolean;
  rateLimit: number;
  parallel: number;
  outOfOrder: boolean;
}

function defaultArgs(): ConvertArgs {
  return {
    imageOpts: false, targetImageOpts: false, targetIsZero: false, bitmaps: false, skipBroken: false, salvage: false,
    forceShare: false, copyRange: false, compressed: false, progress: false, quiet: false, noCreate: false,
    cache: 'unsafe', srcCache: 'writeback', minSparseSectors: DEFAULT_MIN_SPARSE_SECTORS, explicitMinSparse: false,
    rateLimit: 0, parallel: DEFAULT_PARALLEL, outOfOrder: false,
  };
}

/** Reads the options; returns the operands. */
function parseArgs(ctx: ImgContext, argv: string[], a: ConvertArgs): string[] {
  const getopt = new GetoptLong(argv, command.options);
  const flags: Record<string, keyof ConvertArgs> = {
    imageOpts: 'imageOpts', targetImageOpts: 'targetImageOpts', targetIsZero: 'targetIsZero', bitmaps: 'bitmaps',
    skipBrokenBitmaps: 'skipBroken', salvage: 'salvage', forceShare: 'forceShare', C: 'copyRange', c: 'compressed',
    p: 'progress', q: 'quiet', n: 'noCreate', W: 'outOfOrder',
  };
  const texts: Record<string, keyof ConvertArgs> = {
    f: 'srcFormat', O: 'outFormat', t: 'cache', T: 'srcCache', B: 'backingFile', F: 'backingFormat',
  };
  for (const opt of getopt) {
    if (commonOption(ctx, opt)) continue;
    const flag = flags[opt.key];
    const text = texts[opt.key];
    if (flag) (a[flag] as boolean) = true;
    else if (text) (a[text] as string) = opt.value!;
    else if (opt.key === 'o') a.options = accumulateOptions(a.options, opt.value!);
    else if (opt.key === 'l') a.snapshot = snapshotParam(opt.value!);
    else if (opt.key === 'S') readSparse(ctx, a, opt.value!);
    else if (opt.key === 'r') a.rateLimit = Number(cvtnum('rate limit', opt.value!, ctx.graph.onWarning));
    else if (opt.key === 'm') a.parallel = readParallel(opt.value!);
  }
  return getopt.operands();
}

function readSparse(ctx: ImgContext, a: ConvertArgs, text: string): void {
  const bytes = cvtnum('buffer size for sparse output', text, ctx.graph.onWarning);
  if (bytes % BigInt(SECTOR_BYTES) !== 0n || bytes / BigInt(SECTOR_BYTES) > BigInt(CONVERT_MAX_BUF_SECTORS)) {
    throw new CliError(
      `Invalid buffer size for sparse output specified. Valid sizes are multiples of ${SECTOR_BYTES} up to ` +
        `${CONVERT_MAX_BUF_SECTORS * SECTOR_BYTES}. Select 0 to disable sparse detection (fully allocates output).`,
    );
  }
  a.minSparseSectors = Number(bytes / BigInt(SECTOR_BYTES));
  a.explicitMinSparse = true;
}

/** cvtnum_full for -m: a whole strtol number (base 0) from 1 to 16. */
function readParallel(text: string): number {
  const n = strtolWhole(text);
  if (n === null || n < 1 || n > CONVERT_MAX_PARALLEL) {
    throw new CliError(`Invalid number of coroutines. Allowed number of coroutines is between 1 and ${CONVERT_MAX_PARALLEL}`);
  }
  return n;
}

/** The checks qemu-img makes on the options alone. */
function checkCombinations(a: ConvertArgs): void {
  if (a.skipBroken && !a.bitmaps) throw new CliError('Use of --skip-broken-bitmaps requires --bitmaps');
  if (a.compressed && a.copyRange) throw new CliError('Cannot enable copy offloading when -c is used');
  if (a.explicitMinSparse && a.copyRange) throw new CliError('Cannot enable copy offloading when -S is used');
  if (a.copyRange && a.salvage) throw new CliError('Cannot use copy offloading in salvaging mode');
  if (a.targetImageOpts && !a.noCreate) throw new CliError('--target-image-opts requires use of -n flag');
  if (a.noCreate && a.options !== undefined) throw new CliError('-o has no effect when skipping image creation');
  if (a.targetIsZero && !a.noCreate) throw new CliError('--target-is-zero requires use of -n flag');
}

async function run(ctx: ImgContext, argv: string[]): Promise<number> {
  const a = defaultArgs();
  const operands = parseArgs(ctx, argv, a);
  if (a.outFormat === undefined && !a.targetImageOpts) a.outFormat = 'raw';
  checkCombinations(a);
  const outFilename = operands.length >= 2 ? operands[operands.length - 1]! : undefined;
  if (a.options !== undefined && hasHelpOption(a.options)) {
    if (a.outFormat === undefined) throw new CliError('Option help requires a format be specified');
    ctx.out(optionHelp(ctx, a.outFormat, outFilename));
    return 0;
  }
  if (outFilename === undefined) throw new CliError('Must specify image file name');
  const srcCache = defaultOpenSettings();
  if (!applyCacheMode(srcCache, a.srcCache)) throw new CliError(`Invalid source cache option: ${a.srcCache}`);
  const progress = startProgress(a.progress && !a.quiet, 100);
  const opened: BlockNode[] = [];
  const readers: BlockBackend[] = [];
  try {
    await convert(ctx, a, operands.slice(0, -1), outFilename, srcCache, { opened, readers }, progress);
    progress.finish();
  } finally {
    for (const reader of readers) await reader.close();
    for (const node of opened.reverse()) await ctx.graph.unref(node);
  }
  return 0;
}

export const convertCommand: ImgCommand = { command, run };

async function convert(
  ctx: ImgContext,
  a: ConvertArgs,
  srcNames: string[],
  outFilename: string,
  srcCache: OpenSettings,
  held: HeldImages,
  progress: ProgressLike,
): Promise<void> {
  const { opened, readers } = held;
  const sources = await openSources(ctx.graph, a, srcNames, srcCache, held);
  const totalSectors = sources.reduce((n, s) => n + sectorsOf(s), 0);
  if (a.snapshot !== undefined) await loadSnapshot(a.snapshot, sources);
  const prepared = a.noCreate ? null : prepareTarget(ctx.graph, a, outFilename, totalSectors);
  const backingFile = prepared ? prepared.option('backing_file') : a.backingFile;
  if (prepared && backingFile !== undefined && prepared.option('backing_fmt') === undefined) {
    throw new CliError('Use of backing file requires explicit backing format');
  }
  checkBacking(a, backingFile, sources.length);
  if (a.compressed) checkCompression(ctx.graph, a.outFormat, prepared);
  if (a.bitmaps) checkBitmaps(a, sources);
  if (prepared) await createTarget(prepared, a, outFilename);
  const cache = defaultOpenSettings();
  if (!applyCacheMode(cache, a.cache)) throw new CliError(`Invalid cache option: ${a.cache}`);
  const target = await openTarget(ctx.graph, a, outFilename, cache);
  opened.push(target);
  checkTarget(a, target, totalSectors);
  await copy(ctx.graph, a, readers, sources, target, backingFile !== undefined, progress);
}

/** What convert holds open until it ends: the nodes it opened, and the sources' readers. */
interface HeldImages {
  opened: BlockNode[];
  readers: BlockBackend[];
}

/**
 * The permissions a source's reader takes (blk_new_open with
 * BDRV_O_NO_SHARE): nobody else may write or resize it during the copy;
 * -U makes the nodes below share everything.
 */
const SOURCE_SHARED = Perm.CONSISTENT_READ | Perm.WRITE_UNCHANGED;

function sectorsOf(node: BlockNode): number {
  return Math.ceil(node.totalBytes / SECTOR_BYTES);
}

/** Opens each source with its reader, as qemu-img's img_open does, before anything else happens. */
async function openSources(graph: BlockGraph, a: ConvertArgs, names: string[], cache: OpenSettings, held: HeldImages) {
  const nodes: BlockNode[] = [];
  for (const filename of names) {
    const node = await imgOpen(graph, {
      filename, format: a.srcFormat, imageOpts: a.imageOpts, forceShare: a.forceShare, readOnly: true,
      flags: { direct: cache.direct, noFlush: cache.noFlush },
    });
    held.opened.push(node);
    try {
      held.readers.push(new BlockBackend(graph, node, { shared: SOURCE_SHARED }));
    } catch (e) {
      if (e instanceof BlockError) throw new CliError(`Could not open '${filename}': ${e.message}`);
      throw e;
    }
    nodes.push(node);
  }
  return nodes;
}

/** -l: the (first) source reads one of its internal snapshots. */
async function loadSnapshot(ref: SnapshotRef, sources: BlockNode[]): Promise<void> {
  if (ref.idOrName !== undefined && sources.length > 1) throw new CliError('No support for concatenating multiple snapshot');
  try {
    await loadSnapshotTmp(sources[0]!, ref);
  } catch (e) {
    if (e instanceof BlockError) throw new CliError(`Failed to load snapshot: ${e.message}`);
    throw e;
  }
}

/** Format, protocol and -o checks of the target's creation (nothing is created yet). */
function prepareTarget(graph: BlockGraph, a: ConvertArgs, filename: string, totalSectors: number): PreparedCreate {
  try {
    return prepareCreate(graph, {
      format: a.outFormat!, filename, sizeBytes: totalSectors * SECTOR_BYTES, options: splitQemuOpts(a.options ?? ''),
      quiet: true, unsafe: true, backingFile: a.backingFile, backingFormat: a.backingFormat,
    });
  } catch (e) {
    if (e instanceof BlockError) throw new CliError(e.message);
    throw e;
  }
}

function checkBacking(a: ConvertArgs, backingFile: string | undefined, sourceCount: number): void {
  if (backingFile === undefined) return;
  if (a.targetIsZero) throw new CliError('Cannot use --target-is-zero when the destination image has a backing file');
  if (sourceCount > 1) {
    throw new CliError('Having a backing file for the target makes no sense when concatenating multiple input images');
  }
}

function checkCompression(graph: BlockGraph, format: string | undefined, prepared: PreparedCreate | null): void {
  const drv = format === undefined ? undefined : graph.findDriver(format);
  if (drv && !canCompress(drv)) throw new CliError('Compression not supported for this file format');
  if (prepared?.option('encryption') !== undefined || prepared?.option('encrypt.format') !== undefined) {
    throw new CliError('Compression and encryption not supported at the same time');
  }
  const prealloc = prepared?.option('preallocation');
  if (prealloc !== undefined && prealloc !== 'off') {
    throw new CliError('Compression and preallocation not supported at the same time');
  }
}

async function createTarget(prepared: PreparedCreate, a: ConvertArgs, filename: string): Promise<void> {
  try {
    await prepared.create();
  } catch (e) {
    if (e instanceof BlockError) throw new CliError(`${filename}: error while converting ${a.outFormat}: ${e.message}`);
    throw e;
  }
}

/** The target, read-write, with discard=unmap unless -S 0, in the -t cache mode. */
async function openTarget(graph: BlockGraph, a: ConvertArgs, filename: string, cache: OpenSettings): Promise<BlockNode> {
  const flags = { direct: cache.direct, noFlush: cache.noFlush, unmap: a.minSparseSectors !== 0 };
  return imgOpen(graph, { filename, format: a.outFormat, imageOpts: a.targetImageOpts, readOnly: false, flags });
}

/** --bitmaps: qemu-img's checks on the source (convert_check_bitmaps). */
function checkBitmaps(a: ConvertArgs, sources: BlockNode[]): void {
  if (sources.length > 1) throw new CliError('Copying bitmaps only possible with single source');
  const refusal = bitmapsCopyRefusal(sources[0]!, a.skipBroken);
  if (refusal !== null) throw new CliError(refusal);
}

/** --bitmaps after the copy (convert_copy_bitmaps): the target's close writes them. */
async function copyBitmaps(graph: BlockGraph, a: ConvertArgs, source: BlockNode, target: BlockNode): Promise<void> {
  try {
    await copyPersistentBitmaps(source, target, { skipBroken: a.skipBroken, warn: (m) => graph.onWarning(m) });
  } catch (e) {
    if (e instanceof BlockError) throw new CliError(e.message);
    throw e;
  }
}

function checkTarget(a: ConvertArgs, target: BlockNode, totalSectors: number): void {
  if (a.bitmaps && !supportsPersistentBitmaps(target)) throw new CliError(`Format driver '${target.driver.name}' does not support bitmaps`);
  if (a.compressed && !canCompress(target.driver)) throw new CliError('Compression not supported for this file format');
  if (a.noCreate && sectorsOf(target) < totalSectors) throw new CliError('output file is smaller than input file');
}

/** Sets up and runs the copy (convert_do_copy); errors as qemu-img words them. */
async function copy(
  graph: BlockGraph,
  a: ConvertArgs,
  readers: BlockBackend[],
  sources: BlockNode[],
  target: BlockNode,
  hasBacking: boolean,
  progress: ProgressLike,
): Promise<void> {
  const backend = new BlockBackend(graph, target, { writable: true });
  let failed = false;
  try {
    await convertCopy(copyPlan(a, readers, backend, hasBacking, progress, (m) => graph.onWarning(m)));
    // While the backend still holds the target: closing it closes the node, which writes the bitmaps.
    if (a.bitmaps) await copyBitmaps(graph, a, sources[0]!, target);
  } catch (e) {
    failed = true;
    if (!(e instanceof ConvertError)) throw e;
    throw reportedNow(graph.onWarning, e, () => copyFailureText(e));
  } finally {
    await closeAfterWork(failed, () => backend.close());
  }
}

/** qemu-img's words for a failed copy. */
function copyFailureText(e: ConvertError): string {
  if (e.phase === 'status') return `error while reading block status at offset ${e.offsetBytes}: ${strerror(e.code)}`;
  return `error while ${e.phase === 'write' ? 'writing' : 'reading'} at byte ${e.offsetBytes}: ${strerror(e.code)}`;
}

/** The plan of the copy: the target's limits and zero initialisation decide its shape. */
function copyPlan(
  a: ConvertArgs,
  readers: BlockBackend[],
  backend: BlockBackend,
  hasBacking: boolean,
  progress: ProgressLike,
  warn: (message: string) => void,
): ConvertPlan {
  const target = backend.node;
  const sectorsOfBytes = (bytes: number) => Math.ceil(bytes / SECTOR_BYTES);
  const bufSectors = Math.min(
    CONVERT_MAX_BUF_SECTORS,
    Math.max(CONVERT_BUF_BYTES / SECTOR_BYTES, sectorsOfBytes(target.limits.optTransfer), sectorsOfBytes(target.limits.pdiscardAlignment)),
  );
  const backing = hasBacking && !a.noCreate ? target.cowChild?.node : undefined;
  return {
    sources: readers.map((r) => copySource(r, hasBacking)),
    target: backend.root,
    minSparseSectors: a.minSparseSectors,
    alignmentSectors: Math.max(pow2floor(a.minSparseSectors), sectorsOfBytes(target.limits.requestAlignment)),
    hasZeroInit: a.targetIsZero || (!a.noCreate && a.minSparseSectors !== 0 && !hasBacking && target.driver.hasZeroInit(target)),
    targetHasBacking: hasBacking,
    targetBackingSectors: backing ? sectorsOf(backing) : -1,
    compressed: a.compressed,
    clusterSectors: Math.floor((target.driver.getInfo(target)?.clusterBytes ?? 0) / SECTOR_BYTES),
    bufSectors,
    parallel: a.parallel,
    outOfOrder: a.outOfOrder,
    rateLimitBytesPerSec: a.rateLimit,
    salvage: a.salvage ? (message) => !a.quiet && warn(message) : undefined,
    progress: { start: (total) => progress.reset(total), add: (n) => progress.add(n) },
  };
}

function copySource(reader: BlockBackend, hasBacking: boolean): ConvertSource {
  const node = reader.node;
  const clusterBytes = node.driver.getInfo(node)?.clusterBytes ?? 0;
  return {
    child: reader.root,
    base: hasBacking ? (node.skipFilters().cowChild?.node ?? null) : null,
    sectors: sectorsOf(node),
    alignmentSectors: Math.max(Math.ceil(node.limits.requestAlignment / SECTOR_BYTES), Math.floor(clusterBytes / SECTOR_BYTES), 1),
  };
}

function pow2floor(n: number): number {
  return n <= 0 ? 0 : 2 ** Math.floor(Math.log2(n));
}

/** Whether the format writes compressed clusters (block_driver_can_compress). */
function canCompress(drv: NormalisedDriver): boolean {
  return drv.has.pwritevCompressed;
}
