/*
 * qemu-img info (img_info in QEMU 7.2's qemu-img.c).
 *
 * Options are read in order (--object acts at once, -h prints help); then
 * exactly one file name, then the --output value is checked. Each image is
 * opened read-only (with -U shared) and queried; with --backing-chain each
 * backing file is opened in turn by its full name and stored format.
 *
 * Output. JSON: the ImageInfo object (or, with --backing-chain, a list of
 * them) through QEMU's pretty writer, then a newline. Human: the four fixed
 * lines of bdrv_image_info_dump (sizes through size_to_str), then, when the
 * image has them, `encrypted: yes`, `cluster_size:`, `cleanly shut down: no`,
 * the backing file lines, the "Snapshot list:" table (block/snapshot.ts)
 * and the format-specific data (../qapi-dump.ts,
 * shared with qemu-io's `info`); chain entries are separated by a blank
 * line.
 */
import { Option } from 'commander';
import { collectImageInfoList, type ImageInfo } from '../../block/info.js';
import { formatSnapshotList } from '../../block/snapshot.js';
import { sizeToStr } from '../../block/units.js';
import { toJsonPretty, type QValue } from '../../block/qjson.js';
import { formatSpecificInformation } from '../qapi-dump.js';
import { declareCommand, imageCommandOptions, readImageCommand, type ImageArgs, type ImgCommand, type ImgContext } from './command.js';
import { imgOpen } from './open.js';

const command = declareCommand(
  'info',
  '[--object objectdef] [--image-opts] [-f fmt] [--output=ofmt] [--backing-chain] [-U] filename',
  'show information about an image',
  [...imageCommandOptions(), new Option('--backing-chain', 'also show every backing file of the image')],
);

interface InfoArgs extends ImageArgs {
  chain: boolean;
}

async function run(ctx: ImgContext, argv: string[]): Promise<number> {
  const args: InfoArgs = { chain: false, imageOpts: false, forceShare: false };
  const { filename, output } = readImageCommand(ctx, command, argv, args, (opt) => {
    if (opt.key === 'backingChain') args.chain = true;
  });
  const list = await collectImageInfoList(
    async (name, format, top) => {
      const node = await imgOpen(ctx.graph, {
        filename: name,
        format,
        imageOpts: top && args.imageOpts,
        forceShare: args.forceShare,
        readOnly: true,
        noBacking: true,
      });
      return { node, close: () => ctx.graph.unref(node) };
    },
    filename,
    args.format,
    args.chain,
  );
  // ImageInfo is plain JSON data; only format-specific's `data` is typed loosely (unknown).
  if (output === 'json') ctx.out(`${toJsonPretty((args.chain ? list : list[0]!) as unknown as QValue)}\n`);
  else ctx.out(list.map(formatImageInfoHuman).join('\n'));
  return 0;
}

export const infoCommand: ImgCommand = { command, run };

/** bdrv_image_info_dump: the human form of one image's info. */
export function formatImageInfoHuman(info: ImageInfo): string {
  const actual = info['actual-size'];
  let text =
    `image: ${info.filename}\n` +
    `file format: ${info.format}\n` +
    `virtual size: ${sizeToStr(info['virtual-size'])} (${info['virtual-size']} bytes)\n` +
    `disk size: ${actual === undefined ? 'unavailable' : sizeToStr(actual)}\n`;
  if (info.encrypted) text += 'encrypted: yes\n';
  if (info['cluster-size'] !== undefined) text += `cluster_size: ${info['cluster-size']}\n`;
  if (info['dirty-flag']) text += 'cleanly shut down: no\n';
  text += backingLines(info);
  if (info.snapshots) text += formatSnapshotList(info.snapshots);
  const specific = info['format-specific'];
  if (specific) text += formatSpecificInformation(specific);
  return text;
}

function backingLines(info: ImageInfo): string {
  const backing = info['backing-filename'];
  if (backing === undefined) return '';
  const full = info['full-backing-filename'];
  let line = `backing file: ${backing}`;
  if (full === undefined) line += ' (cannot determine actual path)';
  else if (full !== backing) line += ` (actual path: ${full})`;
  const fmt = info['backing-filename-format'];
  return `${line}\n${fmt !== undefined ? `backing file format: ${fmt}\n` : ''}`;
}
