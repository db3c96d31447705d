/*
 * qemu-img's img_open: one image from a file name and `-f`, from an option
 * string (`--image-opts`), or from a `json:{...}` pseudo-filename.
 *
 * Every open failure is reported as "Could not open 'NAME': <reason>", NAME
 * being what the user typed (the whole option string for --image-opts);
 * the reason comes from the block layer, which for a missing file already
 * reads "Could not open 'x': No such file or directory" — hence qemu-img's
 * doubled prefix.
 *
 * Option trees (`--image-opts`, `json:`) are opened by the graph as QEMU's
 * bdrv_open does (children named by `filename` alone get their protocol, a
 * tree without `driver` is probed from its `file`); `-f` overrides a json:
 * tree's driver.
 */
import { BlockError } from '../../block/errors.js';
import type { BlockGraph, Inherited } from '../../block/graph.js';
import { parseKeyval, type OptionTree } from '../../block/keyval.js';
import type { BlockNode } from '../../block/node.js';
import { CliError } from '../cli-common.js';

export interface ImgOpenOptions {
  filename: string;
  /** `-f`; probed when absent. */
  format?: string;
  /** `--image-opts`: the file name is a key=value option string. */
  imageOpts?: boolean;
  /** `-U`. */
  forceShare?: boolean;
  readOnly: boolean;
  /** Leave the backing file closed (qemu-img info's BDRV_O_NO_BACKING). */
  noBacking?: boolean;
  /** Cache and discard flags every node of the image inherits (-t, -T, BDRV_O_UNMAP). */
  flags?: Pick<Inherited, 'direct' | 'noFlush' | 'unmap'>;
}

/** Opens an image as qemu-img does; errors carry qemu-img's "Could not open" prefix. */
export async function imgOpen(graph: BlockGraph, o: ImgOpenOptions): Promise<BlockNode> {
  if (o.imageOpts && o.format !== undefined) throw new CliError('--image-opts and --format are mutually exclusive');
  const inherit = { readOnly: o.readOnly, forceShare: o.forceShare, noBacking: o.noBacking, ...o.flags };
  try {
    if (o.imageOpts) return await graph.openOptions(imageOptsTree(o.filename, o.forceShare), inherit);
    return await graph.openImage(o.filename, { ...inherit, format: o.format, inherit: o.flags });
  } catch (e) {
    if (!(e instanceof BlockError)) throw e;
    throw new BlockError(e.code, `Could not open '${o.filename}': ${e.message}`, { cause: e });
  }
}

/**
 * The options of `--image-opts` (`file` implied for a leading bare value).
 * -U reaches the node through `inherit`, as it does for plain file names.
 */
function imageOptsTree(text: string, forceShare: boolean | undefined): OptionTree {
  const tree = parseKeyval(text, 'file');
  const given = tree['force-share'];
  if (forceShare && given !== undefined && given !== 'on') {
    throw new CliError('--force-share/-U conflicts with image options');
  }
  return tree;
}
