/*
 * The image commands other than read and write (qemu-io-cmds.c): discard,
 * flush, truncate, length, info, map, alloc, and sleep.
 *
 * map and alloc ask whether ranges are allocated in the image's own node
 * (bdrv_is_allocated: block status without zero detection, ALLOCATED bit),
 * so a raw image is allocated everywhere, holes or not, as in QEMU. map
 * merges neighbouring runs of the same kind into one line; alloc counts the
 * allocated bytes of [offset, offset + count), cut short at the end.
 * info prints the format-specific data with qemu-img info's dumper
 * (../qapi-dump.ts) and, as QEMU, fails quietly (exit 1) for drivers
 * without bdrv_get_info, such as null-co.
 */
import { setTimeout as sleepMs } from 'node:timers/promises';
import { Status, PREALLOC_MODES, type Prealloc } from '../../block/flags.js';
import { strerror } from '../../block/errors.js';
import type { BlockBackend } from '../../block/backend.js';
import { formatSpecificInformation } from '../qapi-dump.js';
import { cvtnum, cvtnumError, strtolWhole } from './args.js';
import { helpText, parseFlags, usageFailure, type IoCommand } from './commands.js';
import { cvtstr } from './report.js';
import { REQUEST_MAX_BYTES, asBlockError, errnoOf, issueRequest, timed, type RequestReport } from './request.js';
import type { IoSession } from './session.js';

/** alloc's default count: one sector. */
const ALLOC_DEFAULT_BYTES = 512;
/** Longest single timer Node accepts (2^31 - 1 ms); longer sleeps are chained. */
const TIMER_MAX_MS = 2 ** 31 - 1;

// ---------------------------------------------------------------- discard, flush, truncate

async function discardF(s: IoSession, argv: string[]): Promise<boolean> {
  const f = { csv: false, quiet: false };
  const operands = parseFlags(s, discardCommand, argv, 'Cq', (key) => {
    if (key === 'C') f.csv = true;
    else f.quiet = true;
    return true;
  });
  if (!operands) return false;
  if (operands.length !== 2) return usageFailure(s, discardCommand);
  const offset = s.num(operands[0]!);
  if (offset === null) return false;
  const count = s.num(operands[1]!);
  if (count === null) return false;
  if (count > REQUEST_MAX_BYTES) {
    s.print(`length cannot exceed ${REQUEST_MAX_BYTES}, given ${operands[1]}`);
    return false;
  }
  const r: RequestReport = { failWord: 'discard', statsWord: 'discard', offsetBytes: offset, countBytes: count, csv: f.csv, quiet: f.quiet };
  return issueRequest(s, r, () => () => s.backend().pdiscard(offset, count));
}

export const discardCommand: IoCommand = {
  name: 'discard',
  altname: 'd',
  args: '[-Cq] off len',
  oneline: 'discards a number of bytes at a specified offset',
  help: helpText(
    ' discards a range of bytes from the given offset',
    '',
    ' Example:',
    " 'discard 512 1k' - discards 1 kilobyte from 512 bytes into the file",
    '',
    ' Discards a segment of the currently open file.',
    ' -C, -- report statistics in a machine parsable format',
    ' -q, -- quiet mode, do not show I/O statistics',
  ),
  argmin: 2,
  argmax: -1,
  needsWrite: true,
  run: discardF,
};

/** flush_f: a failure only shows in the exit status, as in QEMU. */
export const flushCommand: IoCommand = {
  name: 'flush',
  altname: 'f',
  oneline: 'flush all in-core file state to disk',
  argmin: 0,
  argmax: 0,
  async run(s) {
    return (await timed(() => s.backend().flush())).ok;
  },
};

async function truncateF(s: IoSession, argv: string[]): Promise<boolean> {
  let prealloc: Prealloc = 'off';
  const operands = parseFlags(s, truncateCommand, argv, 'm:', (_key, arg) => {
    if (!(PREALLOC_MODES as readonly string[]).includes(arg)) {
      s.report(`Invalid preallocation mode '${arg}'`);
      return false;
    }
    prealloc = arg as Prealloc;
    return true;
  });
  if (!operands) return false;
  // QEMU parses the first operand but names argv[1] in its error (so `-m off abc` blames `-m`).
  const parsed = cvtnum(operands[0] ?? '');
  if (!parsed.ok) {
    s.print(cvtnumError(parsed.errno, argv[1]!));
    return false;
  }
  if (parsed.warning) s.warn(parsed.warning);
  const offset = parsed.value;
  try {
    await s.backend().truncate(offset, false, prealloc);
  } catch (e) {
    s.report(asBlockError(e).message);
    return false;
  }
  return true;
}

export const truncateCommand: IoCommand = {
  name: 'truncate',
  altname: 't',
  args: '[-m prealloc_mode] off',
  oneline: 'truncates the current file at the given offset',
  argmin: 1,
  argmax: 3,
  needsWrite: true,
  needsResize: true,
  run: truncateF,
};

// ---------------------------------------------------------------- length, info

export const lengthCommand: IoCommand = {
  name: 'length',
  altname: 'l',
  oneline: 'gets the length of the current file',
  argmin: 0,
  argmax: 0,
  async run(s) {
    s.print(cvtstr(s.backend().getLength()));
    return true;
  },
};

async function infoF(s: IoSession): Promise<boolean> {
  const node = s.backend().node;
  s.print(`format name: ${node.driver.name}`);
  if (node.driver.protocolName !== undefined) s.print(`format name: ${node.driver.protocolName}`);
  const info = node.driver.getInfo(node);
  // qemu-io's info_f gives up quietly (status 1) when bdrv_get_info fails.
  if (!info) return false;
  s.print(`cluster size: ${cvtstr(info.clusterBytes ?? 0)}`);
  s.print(`vm state offset: ${cvtstr(0)}`);
  const specific = node.driver.getSpecificInfo(node);
  if (specific) s.output.stdout(formatSpecificInformation(specific));
  return true;
}

export const infoCommand: IoCommand = {
  name: 'info',
  altname: 'i',
  oneline: 'prints information about the current file',
  argmin: 0,
  argmax: 0,
  run: infoF,
};

// ---------------------------------------------------------------- map, alloc

/** bdrv_is_allocated on the image's node; pnum 0 at or past the end. */
async function isAllocated(blk: BlockBackend, offsetBytes: number, bytes: number): Promise<{ allocated: boolean; pnum: number }> {
  const length = blk.getLength();
  if (!Number.isSafeInteger(offsetBytes) || offsetBytes >= length || bytes === 0) return { allocated: false, pnum: 0 };
  const r = await blk.blockStatus(offsetBytes, Math.min(bytes, length - offsetBytes), false);
  return { allocated: (r.status & Status.ALLOCATED) !== 0, pnum: r.pnum };
}

/** map_is_allocated: the run starting at `offset` of one kind, merged across answers. */
async function allocatedRun(blk: BlockBackend, offsetBytes: number, bytes: number) {
  const first = await isAllocated(blk, offsetBytes, bytes);
  let pnum = first.pnum;
  while (pnum > 0 && pnum < bytes) {
    const next = await isAllocated(blk, offsetBytes + pnum, bytes - pnum);
    if (next.allocated !== first.allocated || next.pnum === 0) break;
    pnum += next.pnum;
  }
  return { allocated: first.allocated, pnum };
}

async function mapF(s: IoSession): Promise<boolean> {
  const blk = s.backend();
  let offset = 0;
  let bytes = blk.getLength();
  while (bytes > 0) {
    let run: { allocated: boolean; pnum: number };
    try {
      run = await allocatedRun(blk, offset, bytes);
    } catch (e) {
      s.print(`Failed to get allocation status: ${strerror(errnoOf(e))}`);
      return false;
    }
    if (run.pnum === 0) {
      s.print('Unexpected end of image');
      return false;
    }
    const kind = run.allocated ? '    allocated' : 'not allocated';
    s.print(`${cvtstr(run.pnum)} (0x${run.pnum.toString(16)}) bytes ${kind} at offset ${cvtstr(offset)} (0x${offset.toString(16)})`);
    offset += run.pnum;
    bytes -= run.pnum;
  }
  return true;
}

export const mapCommand: IoCommand = {
  name: 'map',
  args: '',
  oneline: 'prints the allocated areas of a file',
  argmin: 0,
  argmax: 0,
  run: mapF,
};

async function allocF(s: IoSession, argv: string[]): Promise<boolean> {
  const start = s.num(argv[1]!);
  if (start === null) return false;
  let count = ALLOC_DEFAULT_BYTES;
  if (argv.length === 3) {
    const n = s.num(argv[2]!);
    if (n === null) return false;
    count = n;
  }
  const blk = s.backend();
  let offset = start;
  let remaining = count;
  let allocatedBytes = 0;
  try {
    while (remaining > 0) {
      const r = await isAllocated(blk, offset, remaining);
      if (r.pnum === 0) {
        count -= remaining;
        break;
      }
      if (r.allocated) allocatedBytes += r.pnum;
      offset += r.pnum;
      remaining -= r.pnum;
    }
  } catch (e) {
    s.print(`is_allocated failed: ${strerror(errnoOf(e))}`);
    return false;
  }
  s.print(`${allocatedBytes}/${count} bytes allocated at offset ${cvtstr(start)}`);
  return true;
}

export const allocCommand: IoCommand = {
  name: 'alloc',
  altname: 'a',
  args: 'offset [count]',
  oneline: 'checks if offset is allocated in the file',
  argmin: 1,
  argmax: 2,
  run: allocF,
};

// ---------------------------------------------------------------- sleep

export const sleepCommand: IoCommand = {
  name: 'sleep',
  oneline: 'waits for the given value in milliseconds',
  argmin: 1,
  argmax: 1,
  nofileOk: true,
  async run(s, argv) {
    const ms = strtolWhole(argv[1]!);
    if (ms === null || ms < 0) {
      s.print(`${argv[1]} is not a valid number`);
      return false;
    }
    for (let left = ms; left > 0; left -= TIMER_MAX_MS) await sleepMs(Math.min(left, TIMER_MAX_MS));
    return true;
  },
};
