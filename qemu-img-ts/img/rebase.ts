/*
 * qemu-img rebase (img_rebase in QEMU 7.2's qemu-img.c).
 *
 * Arguments: options as they come (--object acts at once, -h prints help),
 * exactly one file name ("Expecting one image file name"), and -b unless
 * -u ("Must specify backing file (-b) or use unsafe mode (-u)"), both usage
 * errors; then the -t and -T cache modes ("Invalid cache option: X",
 * "Invalid source cache option: X"). -q turns -p off.
 *
 * Work, in qemu-img's order:
 *   1. the image is opened read-write; with -u without its backing file,
 *      so a missing or moved backing file can be renamed;
 *   2. -F must name a format the block layer knows ("Invalid format name:
 *      'X'");
 *   3. safe mode: the new backing file is resolved against the image's
 *      directory; when it is an image of the current chain it is used as
 *      it is (then only what the images above it allocate can differ),
 *      else it is opened read-only with -F's format (probed without it;
 *      -U shares it) — "Could not open new backing file 'B': <reason>".
 *      `-b ""` means no backing file: the image is flattened. Then
 *      block/rebase.ts copies into the image what the old and the new
 *      backing file show differently where the image itself allocates
 *      nothing, so its content never changes. Its failures, in qemu-img's
 *      words: "error while reading image metadata: <strerror>", "error
 *      while reading from old|new backing file", "Error while writing to
 *      COW image: <strerror>"; printed before the image closes, whose own
 *      reports (a qcow2 cache it could not flush) follow;
 *   4. the backing file name and format are rewritten (block/chain.ts).
 *      Refusals: "Could not change the backing file to 'B': No space left
 *      in the file header" (ENOSPC), "…: backing format must be specified"
 *      (a name without -F, checked only here, after the copy, as in
 *      qemu-img), "…: <strerror>" otherwise (raw cannot store one:
 *      "Operation not supported").
 * Nothing is printed on success. Exit status 0, or 1 on any error.
 */
import { Option } from 'commander';
import { BlockBackend } from '../../block/backend.js';
import { changeBackingFile, findBackingImage } from '../../block/chain.js';
import { fullBackingFilename } from '../../block/create.js';
import { BlockError, strerror } from '../../block/errors.js';
import type { BlockGraph } from '../../block/graph.js';
import type { BlockNode } from '../../block/node.js';
import { copyBackingDifferences, RebaseError, type RebaseBackings } from '../../block/rebase.js';
import { CliError, closeAfterWork, reportedNow, usageError } from '../cli-common.js';
import { applyCacheMode, defaultOpenSettings, type OpenSettings } from '../io/open.js';
import { commonOption, commonOptions, declareCommand, type ImgCommand, type ImgContext } from './command.js';
import { GetoptLong } from './getopt.js';
import { imgOpen } from './open.js';
import { NO_PROGRESS, Progress, processProgressSink, type ProgressLike } from './progress.js';

/** qemu-img rebase prints progress in steps of 2 % (qemu_progress_init(progress, 2.0)). */
const REBASE_PROGRESS_STEP_PERCENT = 2;

const command = declareCommand(
  'rebase',
  '[--object objectdef] [--image-opts] [-U] [-q] [-f fmt] [-t cache] [-T src_cache] [-p] [-u] -b backing_file [-F backing_fmt] filename',
  'change the backing file of an image',
  [
    commonOptions.help(),
    commonOptions.object(),
    commonOptions.imageOpts(),
    commonOptions.forceShare(),
    new Option('-f <fmt>', 'image format (probed when absent)'),
    new Option('-F <backing_fmt>', 'format of the new backing file'),
    new Option('-b <backing_file>', 'the new backing file ("" for none)'),
    new Option('-u', 'unsafe: only rewrite the backing file name'),
    new Option('-p', 'show progress'),
    new Option('-t <cache>', 'cache mode of the image (default writeback)'),
    new Option('-T <src_cache>', 'cache mode of the backing files (default writeback)'),
    new Option('-q', 'quiet'),
  ],
);

interface RebaseArgs {
  filename: string;
  format?: string;
  backingFormat?: string;
  backing?: string;
  unsafe: boolean;
  progress: boolean;
  quiet: boolean;
  cache: string;
  srcCache: string;
  imageOpts: boolean;
  forceShare: boolean;
}

function readArgs(ctx: ImgContext, argv: string[]): RebaseArgs {
  const a: RebaseArgs = { filename: '', unsafe: false, progress: false, quiet: false, cache: 'writeback', srcCache: 'writeback', imageOpts: false, forceShare: false };
  const getopt = new GetoptLong(argv, command.options);
  for (const opt of getopt) {
    if (commonOption(ctx, opt)) continue;
    const v = opt.value!;
    if (opt.key === 'f') a.format = v;
    else if (opt.key === 'F') a.backingFormat = v;
    else if (opt.key === 'b') a.backing = v;
    else if (opt.key === 'u') a.unsafe = true;
    else if (opt.key === 'p') a.progress = true;
    else if (opt.key === 't') a.cache = v;
    else if (opt.key === 'T') a.srcCache = v;
    else if (opt.key === 'q') a.quiet = true;
    else if (opt.key === 'imageOpts') a.imageOpts = true;
    else if (opt.key === 'forceShare') a.forceShare = true;
  }
  if (a.quiet) a.progress = false;
  const operands = getopt.operands();
  if (operands.length !== 1) throw usageError('Expecting one image file name');
  if (!a.unsafe && a.backing === undefined) throw usageError('Must specify backing file (-b) or use unsafe mode (-u)');
  a.filename = operands[0]!;
  return a;
}

function cacheSettings(mode: string, what: string): OpenSettings {
  const settings = defaultOpenSettings();
  if (!applyCacheMode(settings, mode)) throw new CliError(`Invalid ${what}cache option: ${mode}`);
  return settings;
}

async function run(ctx: ImgContext, argv: string[]): Promise<number> {
  const a = readArgs(ctx, argv);
  const progress = a.progress ? new Progress(processProgressSink(), 1, REBASE_PROGRESS_STEP_PERCENT) : NO_PROGRESS;
  try {
    const settings = cacheSettings(a.cache, '');
    const src = cacheSettings(a.srcCache, 'source ');
    const top = await imgOpen(ctx.graph, {
      filename: a.filename,
      format: a.format,
      imageOpts: a.imageOpts,
      readOnly: false,
      noBacking: a.unsafe,
      flags: { direct: settings.direct, noFlush: settings.noFlush },
    });
    let failed = false;
    try {
      await rebase(ctx.graph, top, a, settings, src, progress);
    } catch (e) {
      failed = true;
      throw e;
    } finally {
      await closeAfterWork(failed, () => ctx.graph.unref(top));
    }
  } finally {
    progress.finish();
  }
  return 0;
}

export const rebaseCommand: ImgCommand = { command, run };

/** Steps 2 to 4 of the note at the top, on the open image. */
async function rebase(graph: BlockGraph, top: BlockNode, a: RebaseArgs, settings: OpenSettings, src: OpenSettings, progress: ProgressLike) {
  if (a.backingFormat !== undefined && !graph.findDriver(a.backingFormat)) {
    throw new CliError(`Invalid format name: '${a.backingFormat}'`);
  }
  const overlay = new BlockBackend(graph, top.skipFilters(), { name: 'rebase', writable: true, writeCache: !settings.writethrough });
  let failed = false;
  try {
    if (!a.unsafe) await copyDifferences(graph, overlay, a, src, progress);
    const name = a.backing ? a.backing : null;
    try {
      await changeBackingFile(overlay.node, name, name === null ? null : (a.backingFormat ?? null), name !== null);
    } catch (e) {
      if (!(e instanceof BlockError)) throw e;
      throw new CliError(`Could not change the backing file to '${a.backing ?? '(null)'}': ${changeFailure(e, a)}`);
    }
  } catch (e) {
    failed = true;
    throw reportedNow(graph.onWarning, e, (b) => (b instanceof RebaseError ? rebaseFailureText(b) : b.message));
  } finally {
    await closeAfterWork(failed, () => overlay.close());
  }
}

/** qemu-img's words for a failed step of the safe rebase. */
function rebaseFailureText(e: RebaseError): string {
  switch (e.phase) {
    case 'metadata':
      return `error while reading image metadata: ${strerror(e.code)}`;
    case 'old-backing':
      return 'error while reading from old backing file';
    case 'new-backing':
      return 'error while reading from new backing file';
    case 'write':
      return `Error while writing to COW image: ${strerror(e.code)}`;
  }
}

function changeFailure(e: BlockError, a: RebaseArgs): string {
  if (e.code === 'ENOSPC') return 'No space left in the file header';
  if (e.code === 'EINVAL' && a.backing && a.backingFormat === undefined) return 'backing format must be specified';
  return strerror(e.code);
}

/** Safe mode: opens (or finds) the new backing file and copies what differs. */
async function copyDifferences(graph: BlockGraph, overlay: BlockBackend, a: RebaseArgs, src: OpenSettings, progress: ProgressLike) {
  const top = overlay.node;
  const backings: RebaseBackings = { old: top.cowChild?.node ?? null, newBacking: null, prefix: null };
  let opened: BlockNode | null = null;
  if (a.backing) {
    const realPath = fullBackingFilename(top.filename, a.backing);
    backings.prefix = findBackingImage(top, realPath);
    if (!backings.prefix) {
      opened = await openNewBacking(graph, realPath, a, src);
    }
    backings.newBacking = backings.prefix ?? opened;
  }
  try {
    let reported = 0;
    await copyBackingDifferences(overlay, backings, (done, total) => {
      if (reported === 0) progress.reset(total);
      progress.add(done - reported);
      reported = done;
    });
  } finally {
    if (opened) await graph.unref(opened);
  }
}

async function openNewBacking(graph: BlockGraph, realPath: string, a: RebaseArgs, src: OpenSettings): Promise<BlockNode> {
  try {
    return await graph.openImage(realPath, {
      format: a.backingFormat,
      readOnly: true,
      forceShare: a.forceShare || undefined,
      inherit: { direct: src.direct, noFlush: src.noFlush },
    });
  } catch (e) {
    if (!(e instanceof BlockError)) throw e;
    throw new CliError(`Could not open new backing file '${a.backing}': ${e.message}`);
  }
}
