/*
 * qemu-img commit (img_commit in QEMU 7.2's qemu-img.c).
 *
 * Arguments: options as they come (--object acts at once, -h prints help,
 * -r is checked with cvtnum as it is read: "Invalid rate limit specified"),
 * then exactly one file name, then the -t cache mode ("Invalid cache
 * option: X"). -b names the image to commit into, anywhere below the top,
 * and implies -d; -q turns -p off.
 *
 * Work, in qemu-img's order:
 *   1. the image is opened read-write with discard=unmap, its backing chain
 *      read-only;
 *   2. the base: -b as bdrv_find_backing_image finds it ("Did not find 'B'
 *      in the backing chain of 'F'"), else the backing file ("Image does
 *      not have a backing file");
 *   3. the base is made writable in place (block/reopen.ts, as
 *      commit_active_start does; it keeps the cache and discard flags it
 *      inherited from the top) and everything above it is copied into it (block/commit.ts: the base
 *      grows to the top's size if it is smaller; -r limits the rate in
 *      bytes per second; -p shows the job's progress). A failure there is
 *      "Block job failed: <strerror>";
 *   4. without -d (and -b) the top is emptied (block/make-empty.ts), unless
 *      its format cannot be emptied, which is not an error;
 *   5. "Image committed." (not with -q).
 * The top keeps naming its backing file as before; images between the top
 * and a -b base are left as they are. Exit status 0, or 1 on any error.
 */
import { Option } from 'commander';
import { BlockBackend } from '../../block/backend.js';
import { backingChainNext, findBackingImage } from '../../block/chain.js';
import { commitAbove } from '../../block/commit.js';
import { BlockError, strerror } from '../../block/errors.js';
import type { BlockGraph } from '../../block/graph.js';
import { makeEmpty } from '../../block/make-empty.js';
import type { BlockNode } from '../../block/node.js';
import { reopenSetReadOnly } from '../../block/reopen.js';
import { CliError, usageError } from '../cli-common.js';
import { applyCacheMode, defaultOpenSettings, type OpenSettings } from '../io/open.js';
import { commonOption, commonOptions, cvtnum, declareCommand, type ImgCommand, type ImgContext } from './command.js';
import { GetoptLong } from './getopt.js';
import { imgOpen } from './open.js';
import { startProgress, type ProgressLike } from './progress.js';

const command = declareCommand(
  'commit',
  '[--object objectdef] [--image-opts] [-q] [-f fmt] [-t cache] [-b base] [-r rate_limit] [-d] [-p] filename',
  'commit the changes of an image into its backing file',
  [
    commonOptions.help(),
    commonOptions.object(),
    commonOptions.imageOpts(),
    new Option('-f <fmt>', 'image format (probed when absent)'),
    new Option('-t <cache>', 'cache mode of the image and its backing files (default writeback)'),
    new Option('-b <base>', 'the image to commit into (default: the backing file); implies -d'),
    new Option('-r <rate_limit>', 'rate limit in bytes per second'),
    new Option('-d', 'do not empty the image after committing it'),
    new Option('-p', 'show progress'),
    new Option('-q', 'quiet'),
  ],
);

interface CommitArgs {
  filename: string;
  format?: string;
  imageOpts: boolean;
  cache: string;
  base?: string;
  drop: boolean;
  progress: boolean;
  quiet: boolean;
  rateBytesPerSecond: number;
}

function readArgs(ctx: ImgContext, argv: string[]): CommitArgs {
  const a: CommitArgs = { filename: '', imageOpts: false, cache: 'writeback', drop: false, progress: false, quiet: false, rateBytesPerSecond: 0 };
  const getopt = new GetoptLong(argv, command.options);
  for (const opt of getopt) {
    if (commonOption(ctx, opt)) continue;
    const v = opt.value!;
    if (opt.key === 'f') a.format = v;
    else if (opt.key === 't') a.cache = v;
    else if (opt.key === 'b') [a.base, a.drop] = [v, true];
    else if (opt.key === 'd') a.drop = true;
    else if (opt.key === 'p') a.progress = true;
    else if (opt.key === 'q') a.quiet = true;
    else if (opt.key === 'r') a.rateBytesPerSecond = Number(cvtnum('rate limit', v, ctx.graph.onWarning));
    else if (opt.key === 'imageOpts') a.imageOpts = true;
  }
  if (a.quiet) a.progress = false;
  const operands = getopt.operands();
  if (operands.length !== 1) throw usageError('Expecting one image file name');
  a.filename = operands[0]!;
  return a;
}

async function run(ctx: ImgContext, argv: string[]): Promise<number> {
  const a = readArgs(ctx, argv);
  const settings = defaultOpenSettings();
  if (!applyCacheMode(settings, a.cache)) throw new CliError(`Invalid cache option: ${a.cache}`);
  const flags = { direct: settings.direct, noFlush: settings.noFlush, unmap: true };
  const top = await imgOpen(ctx.graph, { filename: a.filename, format: a.format, imageOpts: a.imageOpts, readOnly: false, flags });
  const progress = startProgress(a.progress, 1);
  try {
    const base = findBase(top, a);
    await commitInto(ctx.graph, top, base, a, settings, progress);
  } finally {
    progress.finish();
    await ctx.graph.unref(top);
  }
  if (!a.quiet) ctx.out('Image committed.\n');
  return 0;
}

export const commitCommand: ImgCommand = { command, run };

function findBase(top: BlockNode, a: CommitArgs): BlockNode {
  if (a.base !== undefined) {
    const base = findBackingImage(top, a.base);
    if (!base) throw new CliError(`Did not find '${a.base}' in the backing chain of '${a.filename}'`);
    return base;
  }
  const base = backingChainNext(top);
  if (!base) throw new CliError('Image does not have a backing file');
  return base;
}

/** Steps 3 and 4 of the note at the top. */
async function commitInto(graph: BlockGraph, top: BlockNode, base: BlockNode, a: CommitArgs, settings: OpenSettings, progress: ProgressLike) {
  await reopenSetReadOnly(base, false);
  const writeCache = !settings.writethrough;
  const source = new BlockBackend(graph, top, { name: 'commit', writable: !a.drop, writeCache });
  try {
    const target = new BlockBackend(graph, base, { name: 'commit target', writable: true, resizable: true, writeCache });
    try {
      let reported = 0;
      await commitAbove(source, target, {
        rateLimitBytesPerSecond: a.rateBytesPerSecond,
        onProgress: (done, total) => {
          if (reported === 0) progress.reset(total);
          progress.add(done - reported);
          reported = done;
        },
      });
    } catch (e) {
      if (e instanceof BlockError) throw new CliError(`Block job failed: ${strerror(e.code)}`);
      throw e;
    } finally {
      await target.close();
    }
    if (!a.drop) await emptyTop(source);
  } finally {
    await source.close();
  }
}

/** blk_make_empty on the top; a format that cannot be emptied is left alone, as qemu-img does. */
async function emptyTop(source: BlockBackend): Promise<void> {
  try {
    await makeEmpty(source.root);
  } catch (e) {
    if (!(e instanceof BlockError) || e.code !== 'ENOTSUP') throw e;
  }
}
