/*
 * qemu-img check (img_check, collect_image_check, dump_human_image_check
 * and dump_json_image_check in QEMU 7.2's qemu-img.c).
 *
 * Arguments: options in order (--object acts at once, -h prints help, a bad
 * -r value is a usage error at once: "Unknown option value for -r
 * (expecting 'leaks' or 'all'): X"), exactly one file name, the --output
 * value, then the -T cache mode ("Invalid source cache option: X"). The
 * image is opened for checking (drivers/qcow2/check-open.ts): read-only,
 * or read-write with -r; -U and -r together fail as QEMU's open does.
 *
 * Exit status: 0 clean, 1 the check could not be completed (open failure,
 * "Check failed[: reason]", internal errors), 2 corruptions, 3 leaks only,
 * 63 a format without a check (raw): "This image format does not support
 * checks".
 *
 * Output. The check's own messages ("Leaked cluster …", "ERROR …") go to
 * stderr while it runs. A repair that fixed anything prints (human only)
 * "The following inconsistencies were found and repaired:" with the
 * counts, then "Double checking the fixed image now..." and the image is
 * checked again without repairs; the summary is that second pass's, with
 * the first pass's fixed counts. Human summary: "No errors were found on
 * the image." or the errors / leaked clusters / internal errors
 * paragraphs, then "A/T = x% allocated, y% fragmented, z% compressed
 * clusters" when both counts are non-zero (printf's %0.2f: glibc rounds the
 * exact double, ties to even), then "Image end offset: N" when non-zero.
 * JSON: ImageCheck through QEMU's writer (block/qjson.ts: QDict order),
 * optional members only when non-zero. -q drops stdout, not the messages.
 */
import { Option } from 'commander';
import { strerror } from '../../block/errors.js';
import { toJsonPretty } from '../../block/qjson.js';
import { openForCheck } from '../../drivers/qcow2/check-open.js';
import { NO_FIX, type CheckFix, type CheckOutcome, type CheckReport, type CheckResult } from '../../drivers/qcow2/check.js';
import { CliError, usageError } from '../cli-common.js';
import { applyCacheMode, defaultOpenSettings } from '../io/open.js';
import { commonOptions, declareCommand, readImageCommand, PROG, type ImageArgs, type ImgCommand, type ImgContext, type OutputFormat } from './command.js';

const command = declareCommand(
  'check',
  '[--object objectdef] [--image-opts] [-q] [-f fmt] [--output=ofmt] [-r [leaks | all]] [-T src_cache] [-U] filename',
  'check an image for consistency, and repair it',
  [
    commonOptions.help(),
    new Option('-f, --format <fmt>', 'image format (probed when absent)'),
    new Option('-r, --repair <mode>', "repair 'leaks' only, or 'all' inconsistencies"),
    commonOptions.output(),
    commonOptions.object(),
    commonOptions.imageOpts(),
    commonOptions.forceShare(),
    new Option('-T <src_cache>', 'cache mode of the image (default writeback)'),
    new Option('-q', 'quiet: print only the messages of the check'),
  ],
);

/** QAPI ImageCheck; optional members are absent when zero (collect_image_check). */
export interface ImageCheck {
  [key: string]: string | number | undefined;
  filename: string;
  format: string;
  'check-errors': number;
  'image-end-offset'?: number;
  corruptions?: number;
  leaks?: number;
  'corruptions-fixed'?: number;
  'leaks-fixed'?: number;
  'total-clusters'?: number;
  'allocated-clusters'?: number;
  'fragmented-clusters'?: number;
  'compressed-clusters'?: number;
}

/** Exit status of a format without a check (qemu-img's 63). */
const EXIT_NO_CHECK = 63;

interface CheckArgs extends ImageArgs {
  fix: CheckFix;
  cache: string;
  quiet: boolean;
}

async function run(ctx: ImgContext, argv: string[]): Promise<number> {
  const args: CheckArgs = { imageOpts: false, forceShare: false, fix: NO_FIX, cache: 'writeback', quiet: false };
  const { filename, output } = readImageCommand(ctx, command, argv, args, (opt) => {
    if (opt.key === 'repair') args.fix = repairMode(opt.value!);
    else if (opt.key === 'T') args.cache = opt.value!;
    else if (opt.key === 'q') args.quiet = true;
  });
  if (args.imageOpts && args.format !== undefined) throw new CliError('--image-opts and --format are mutually exclusive');
  const cache = defaultOpenSettings();
  if (!applyCacheMode(cache, args.cache)) throw new CliError(`Invalid source cache option: ${args.cache}`);
  const repair = args.fix.leaks || args.fix.errors;
  const report: CheckReport = (line, kind) => {
    process.stderr.write(kind === 'error' ? `${PROG}: ${line}\n` : kind === 'unterminated' ? line : `${line}\n`);
  };
  const target = await openForCheck(
    ctx.graph,
    { filename, format: args.format, imageOpts: args.imageOpts, forceShare: args.forceShare, repair, direct: cache.direct, noFlush: cache.noFlush },
    report,
  );
  try {
    if (target.kind !== 'qcow2') throw new CliError('This image format does not support checks', EXIT_NO_CHECK);
    const out = (text: string) => {
      if (!args.quiet) ctx.out(text);
    };
    let outcome = await target.checker.check(args.fix);
    const { leaksFixed, corruptionsFixed } = outcome.result;
    if (outcome.failure === null && (leaksFixed || corruptionsFixed)) {
      if (output === 'human') out(repairedText(outcome.result));
      outcome = await target.checker.check(NO_FIX);
      Object.assign(outcome.result, { leaksFixed, corruptionsFixed });
    }
    return finish(out, output, outcome, imageCheckOf(outcome, filename));
  } finally {
    await target.close();
  }
}

export const checkCommand: ImgCommand = { command, run };

function repairMode(value: string): CheckFix {
  if (value === 'leaks') return { leaks: true, errors: false };
  if (value === 'all') return { leaks: true, errors: true };
  throw usageError(`Unknown option value for -r (expecting 'leaks' or 'all'): ${value}`);
}

function repairedText(r: CheckResult): string {
  return (
    'The following inconsistencies were found and repaired:\n\n' +
    `    ${r.leaksFixed} leaked clusters\n` +
    `    ${r.corruptionsFixed} corruptions\n\n` +
    'Double checking the fixed image now...\n'
  );
}

/** The summary, then qemu-img's exit status for the outcome. */
function finish(out: (text: string) => void, output: OutputFormat, outcome: CheckOutcome, check: ImageCheck): number {
  if (outcome.failure === null) out(output === 'json' ? `${toJsonPretty(check)}\n` : humanSummary(outcome.result));
  if (outcome.failure !== null) throw new CliError(`Check failed: ${strerror(outcome.failure)}`);
  if (outcome.result.checkErrors) throw new CliError('Check failed');
  if (outcome.result.corruptions) return 2;
  return outcome.result.leaks ? 3 : 0;
}

/** collect_image_check: ImageCheck members in QAPI schema order (QEMU's output visitor order). */
export function imageCheckOf(outcome: CheckOutcome, filename: string): ImageCheck {
  const r = outcome.result;
  const nonZero = (n: number) => (n !== 0 ? n : undefined);
  return {
    filename,
    format: 'qcow2',
    'check-errors': r.checkErrors,
    'image-end-offset': nonZero(r.imageEndOffset),
    corruptions: nonZero(r.corruptions),
    leaks: nonZero(r.leaks),
    'corruptions-fixed': nonZero(r.corruptionsFixed),
    'leaks-fixed': nonZero(r.leaksFixed),
    'total-clusters': nonZero(r.bfi.totalClusters),
    'allocated-clusters': nonZero(r.bfi.allocatedClusters),
    'fragmented-clusters': nonZero(r.bfi.fragmentedClusters),
    'compressed-clusters': nonZero(r.bfi.compressedClusters),
  };
}

/** dump_human_image_check. */
export function humanSummary(r: CheckResult): string {
  let text = '';
  if (!(r.corruptions || r.leaks || r.checkErrors)) {
    text += 'No errors were found on the image.\n';
  } else {
    if (r.corruptions) {
      text += `\n${r.corruptions} errors were found on the image.\nData may be corrupted, or further writes to the image may corrupt it.\n`;
    }
    if (r.leaks) text += `\n${r.leaks} leaked clusters were found on the image.\nThis means waste of disk space, but no harm to data.\n`;
    if (r.checkErrors) text += `\n${r.checkErrors} internal errors have occurred during the check.\n`;
  }
  const { totalClusters: total, allocatedClusters: allocated } = r.bfi;
  if (total !== 0 && allocated !== 0) {
    text +=
      `${allocated}/${total} = ${printfFixed2((allocated * 100.0) / total)}% allocated, ` +
      `${printfFixed2((r.bfi.fragmentedClusters * 100.0) / allocated)}% fragmented, ` +
      `${printfFixed2((r.bfi.compressedClusters * 100.0) / allocated)}% compressed clusters\n`;
  }
  if (r.imageEndOffset) text += `Image end offset: ${r.imageEndOffset}\n`;
  return text;
}

/** printf("%0.2f", x) for a finite x ≥ 0: the exact binary value rounded to 2 decimals, ties to even (glibc). */
export function printfFixed2(x: number): string {
  const view = new DataView(new ArrayBuffer(8));
  view.setFloat64(0, x);
  const bits = view.getBigUint64(0);
  const exponent = Number((bits >> 52n) & 0x7ffn);
  const mantissa = (bits & ((1n << 52n) - 1n)) | (exponent ? 1n << 52n : 0n);
  const shift = (exponent || 1) - 1075;
  const num = mantissa * 100n * (shift > 0 ? 1n << BigInt(shift) : 1n);
  const den = shift < 0 ? 1n << BigInt(-shift) : 1n;
  let hundredths = num / den;
  const twiceRest = (num % den) * 2n;
  if (twiceRest > den || (twiceRest === den && hundredths % 2n === 1n)) hundredths++;
  return `${hundredths / 100n}.${(hundredths % 100n).toString().padStart(2, '0')}`;
}
