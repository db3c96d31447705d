/*
 * aio_read, aio_write, aio_flush (qemu-io-cmds.c): requests that complete
 * in the background. The command succeeds once the request is submitted;
 * its completion prints the statistics (or `readv failed: …` /
 * `aio_write failed: …`, or a pattern mismatch) whenever it finishes, which
 * may be in the middle of a later command, and never changes the exit
 * status. aio_flush, close and the end of the run wait for all of them.
 *
 * 7.2 quirks kept on purpose: `-i` prints `injecting invalid … request` and
 * ends the command at once; aio_write's -P does not count as a pattern flag,
 * so `-z -P` is not refused; and a zero write (-z) never starts its clock,
 * so its statistics show the time since boot (CLOCK_MONOTONIC's epoch).
 */
import { Req } from '../../block/flags.js';
import { helpText, parseFlags, usageFailure, type IoCommand } from './commands.js';
import { WRITE_FILL_BYTE, insideImage, requestDone, requestFailed, timed, type PrepareRequest, type RequestReport } from './request.js';
import { patternArg, readRequest } from './rw.js';
import type { IoSession } from './session.js';
import { vectorRange } from './vector.js';

interface AioFlags {
  csv: boolean;
  quiet: boolean;
  dump: boolean;
  zeroes: boolean;
  /** Req.FUA, Req.MAY_UNMAP. */
  req: number;
  pattern: number | null;
  /** -i: the command printed its message and is done. */
  invalid: boolean;
}

function parseAioFlags(s: IoSession, cmd: IoCommand, argv: string[], spec: string, what: string) {
  const f: AioFlags = { csv: false, quiet: false, dump: false, zeroes: false, req: 0, pattern: null, invalid: false };
  const operands = parseFlags(s, cmd, argv, spec, (key, arg) => {
    if (key === 'P') return (f.pattern = patternArg(s, arg)) !== null;
    if (key === 'i') {
      s.print(`injecting invalid ${what} request`);
      f.invalid = true;
      return false;
    }
    if (key === 'C') f.csv = true;
    else if (key === 'q') f.quiet = true;
    else if (key === 'v') f.dump = true;
    else if (key === 'z') f.zeroes = true;
    else if (key === 'f') f.req |= Req.FUA;
    else if (key === 'u') f.req |= Req.MAY_UNMAP;
    return true;
  });
  return { flags: f, operands };
}

/**
 * Submits a request whose completion reports in the background (outcome
 * and checks never change the exit status). `clockFromBoot`: 7.2's zero
 * write never starts its clock, so it measures from CLOCK_MONOTONIC's zero.
 */
function submit(s: IoSession, r: RequestReport, prepare: PrepareRequest, clockFromBoot = false): void {
  const io = insideImage(s.backend(), r.offsetBytes, r.countBytes) ? prepare() : null;
  const startNs = clockFromBoot ? 0n : process.hrtime.bigint();
  s.startAio(async () => {
    const t = io ? await timed(io) : ({ ok: false, errno: 'EIO' } as const);
    if (t.ok) requestDone(s, r, process.hrtime.bigint() - startNs);
    else requestFailed(s, r, t.errno);
  });
}

async function aioReadF(s: IoSession, argv: string[]): Promise<boolean> {
  const { flags: f, operands } = parseAioFlags(s, aioReadCommand, argv, 'CiP:qv', 'read');
  if (!operands) return f.invalid;
  if (operands.length < 2) return usageFailure(s, aioReadCommand);
  const range = vectorRange(s, operands);
  if (!range) return false;
  const { offset, count } = range;
  const { report, prepare } = readRequest(s, 'readv', offset, count, f);
  submit(s, report, prepare);
  return true;
}

/** aio_write's checks in 7.2's order; the range, or null after printing why not. */
function aioWriteRange(s: IoSession, f: AioFlags, operands: string[]): { offset: number; count: number } | null {
  if (f.zeroes && operands.length !== 2) {
    s.print('-z supports only a single length parameter');
    return null;
  }
  if (f.req & Req.MAY_UNMAP && !f.zeroes) {
    s.print('-u requires -z to be specified');
    return null;
  }
  if (!f.zeroes) return vectorRange(s, operands);
  const offset = s.num(operands[0]!);
  const count = offset === null ? null : s.num(operands[1]!);
  return offset === null || count === null ? null : { offset, count };
}

async function aioWriteF(s: IoSession, argv: string[]): Promise<boolean> {
  const { flags: f, operands } = parseAioFlags(s, aioWriteCommand, argv, 'CfiP:quz', 'write');
  if (!operands) return f.invalid;
  if (operands.length < 2) return usageFailure(s, aioWriteCommand);
  const range = aioWriteRange(s, f, operands);
  if (!range) return false;
  const { offset, count } = range;
  const r: RequestReport = { failWord: 'aio_write', statsWord: 'wrote', offsetBytes: offset, countBytes: count, csv: f.csv, quiet: f.quiet };
  const blk = s.backend();
  submit(s, r, () => {
    if (f.zeroes) return () => blk.pwriteZeroes(offset, count, f.req);
    const buf = new Uint8Array(count).fill(f.pattern ?? WRITE_FILL_BYTE);
    return () => blk.pwrite(offset, buf, f.req & Req.FUA);
  }, f.zeroes);
  return true;
}

export const aioReadCommand: IoCommand = {
  name: 'aio_read',
  args: '[-Ciqv] [-P pattern] off len [len..]',
  oneline: 'asynchronously reads a number of bytes',
  help: helpText(
    ' asynchronously reads a range of bytes from the given offset',
    '',
    ' Example:',
    " 'aio_read -v 512 1k 1k ' - dumps 2 kilobytes read from 512 bytes into the file",
    '',
    ' Reads a segment of the currently open file, optionally dumping it to the',
    ' standard output stream (with -v option) for subsequent inspection.',
    ' The read is performed asynchronously and the aio_flush command must be',
    ' used to ensure all outstanding aio requests have been completed.',
    ' Note that due to its asynchronous nature, this command will be',
    ' considered successful once the request is submitted, independently',
    ' of potential I/O errors or pattern mismatches.',
    ' -C, -- report statistics in a machine parsable format',
    ' -P, -- use a pattern to verify read data',
    ' -i, -- treat request as invalid, for exercising stats',
    ' -v, -- dump buffer to standard output',
    ' -q, -- quiet mode, do not show I/O statistics',
  ),
  argmin: 2,
  argmax: -1,
  run: aioReadF,
};

export const aioWriteCommand: IoCommand = {
  name: 'aio_write',
  args: '[-Cfiquz] [-P pattern] off len [len..]',
  oneline: 'asynchronously writes a number of bytes',
  help: helpText(
    ' asynchronously writes a range of bytes from the given offset source',
    ' from multiple buffers',
    '',
    ' Example:',
    " 'aio_write 512 1k 1k' - writes 2 kilobytes at 512 bytes into the open file",
    '',
    ' Writes into a segment of the currently open file, using a buffer',
    ' filled with a set pattern (0xcdcdcdcd).',
    ' The write is performed asynchronously and the aio_flush command must be',
    ' used to ensure all outstanding aio requests have been completed.',
    ' Note that due to its asynchronous nature, this command will be',
    ' considered successful once the request is submitted, independently',
    ' of potential I/O errors or pattern mismatches.',
    ' -P, -- use different pattern to fill file',
    ' -C, -- report statistics in a machine parsable format',
    ' -f, -- use Force Unit Access semantics',
    ' -i, -- treat request as invalid, for exercising stats',
    ' -q, -- quiet mode, do not show I/O statistics',
    ' -u, -- with -z, allow unmapping',
    ' -z, -- write zeroes using blk_aio_pwrite_zeroes',
  ),
  argmin: 2,
  argmax: -1,
  needsWrite: true,
  run: aioWriteF,
};

export const aioFlushCommand: IoCommand = {
  name: 'aio_flush',
  oneline: 'completes all outstanding aio requests',
  argmin: 0,
  argmax: 0,
  async run(s) {
    await s.drainAio();
    return true;
  },
};
