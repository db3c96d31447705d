/*
 * Measuring a new image before it is made (QEMU's bdrv_measure and the
 * option handling of qemu-img measure): how many host bytes a file of a
 * given format needs, for a virtual size (`--size`) or to hold a copy of
 * an open image.
 *
 * Order of work, which decides the error a user sees first (all EINVAL or
 * ENOTSUP BlockErrors with QEMU's texts):
 *   1. the format must exist ("Unknown file format 'x'") and create images
 *      ("Format driver 'x' does not support image creation");
 *   2. the `-o` values are checked against the format's create options
 *      followed by the `file` protocol's (whatever the output name would
 *      be, as qemu-img appends bdrv_file's list): a failure is a
 *      MeasureOptionsError, after which qemu-img adds "Invalid options for
 *      file format 'x'";
 *   3. `sizeBytes` (--size) overrides any `-o size=`;
 *   4. the driver must measure ("Block driver 'x' does not support size
 *      measurement"), and does, with its own checks.
 *
 * Sizes are bigints: QEMU's are 64-bit and a raw `--size` near 2^63 is
 * reported exactly. The driver sees the options by name, sizes and numbers
 * as unsigned decimals, unset options absent (QEMU's defaults are the
 * driver's business, as in its *_measure functions).
 */
import { checkedOptionValues } from './create.js';
import { BlockError } from './errors.js';
import type { BlockGraph } from './graph.js';
import type { BlockNode } from './node.js';
import { parseWith, zBool } from './options.js';

/** What a driver's `measure` gets. */
export interface MeasureRequest {
  /** Checked `-o` values by name (sizes and numbers as unsigned decimals), `size` included when known. */
  readonly opts: ReadonlyMap<string, string>;
  /** The image whose content the new image would hold, or null (`--size`). */
  readonly source: BlockNode | null;
}

/** QEMU's BlockMeasureInfo, in bytes. */
export interface MeasureInfo {
  /** Bytes the new image needs for the data it would hold and its metadata. */
  required: bigint;
  /** Bytes the new image needs when every cluster is allocated. */
  fullyAllocated: bigint;
  /** Bytes of the source's persistent bitmaps, when both formats keep them (else absent). */
  bitmaps?: bigint;
}

export interface MeasureImageRequest {
  /** Output format (`-O`). */
  format: string;
  /** `-o` values, in the order given. */
  options: Iterable<readonly [string, string]>;
  /** `--size`, when given. */
  sizeBytes?: bigint;
  source: BlockNode | null;
}

/** The `-o` values did not parse; qemu-img follows the message with "Invalid options for file format". */
export class MeasureOptionsError extends BlockError {
  constructor(
    cause: BlockError,
    readonly format: string,
  ) {
    super(cause.code, cause.message, { cause });
  }
}

/** bdrv_measure with qemu-img measure's option handling (see the note at the top). */
export async function measureImage(graph: BlockGraph, req: MeasureImageRequest): Promise<MeasureInfo> {
  const drv = graph.findDriver(req.format);
  if (!drv) throw new BlockError('EINVAL', `Unknown file format '${req.format}'`);
  if (!drv.createOpts) throw new BlockError('ENOTSUP', `Format driver '${drv.name}' does not support image creation`);
  let opts: Map<string, string>;
  try {
    opts = checkedOptionValues(graph.createOptsFor(drv.name, ''), req.options, (message) => graph.onWarning(message));
  } catch (e) {
    if (e instanceof BlockError) throw new MeasureOptionsError(e, req.format);
    throw e;
  }
  if (req.sizeBytes !== undefined) opts.set('size', String(req.sizeBytes));
  if (!drv.measure) throw new BlockError('ENOTSUP', `Block driver '${drv.name}' does not support size measurement`);
  return drv.measure({ opts, source: req.source });
}

/** A size or number option (qemu_opt_get_size/number): its value, or `fallback` when unset. */
export function optUint(opts: ReadonlyMap<string, string>, name: string, fallback: bigint): bigint {
  const text = opts.get(name);
  return text === undefined ? fallback : BigInt(text);
}

/** A boolean option (qemu_opt_get_bool), or `fallback` when unset. */
export function optBool(opts: ReadonlyMap<string, string>, name: string, fallback: boolean): boolean {
  const text = opts.get(name);
  return text === undefined ? fallback : parseWith(zBool(name), text);
}

/** x rounded up to a multiple of `align` (bigint ROUND_UP). */
export function roundUpBig(x: bigint, align: bigint): bigint {
  return ((x + align - 1n) / align) * align;
}
