/*
 * readv and writev (qemu-io-cmds.c readv_f, writev_f, create_iovec): an
 * offset and several lengths, done as one request of their sum (QEMU sends
 * one vectored request; the block layer sees the same range and bytes).
 *
 * Each length is checked as QEMU 7.2 does: cvtnum's parse error, then
 * `Argument '<len>' exceeds maximum size 2147483136`, then the running total
 * against the same limit. readv -P checks the whole range, reports
 * `Pattern verification failed at offset N, M bytes` and fails after the
 * statistics, like read.
 */
import { Req } from '../../block/flags.js';
import { helpText, parseFlags, usageFailure, type IoCommand } from './commands.js';
import { REQUEST_MAX_BYTES, WRITE_FILL_BYTE, issueRequest, type RequestReport } from './request.js';
import { patternArg, readRequest } from './rw.js';
import type { IoSession } from './session.js';

interface VectorFlags {
  csv: boolean;
  quiet: boolean;
  dump: boolean;
  fua: boolean;
  pattern: number | null;
}

/** A vector command's flags, offset and total length; null after printing why not. */
function parseVector(s: IoSession, cmd: IoCommand, argv: string[], spec: string): { f: VectorFlags; offset: number; count: number } | null {
  const f: VectorFlags = { csv: false, quiet: false, dump: false, fua: false, pattern: null };
  const operands = parseFlags(s, cmd, argv, spec, (key, arg) => {
    if (key === 'P') return (f.pattern = patternArg(s, arg)) !== null;
    if (key === 'C') f.csv = true;
    else if (key === 'q') f.quiet = true;
    else if (key === 'v') f.dump = true;
    else if (key === 'f') f.fua = true;
    return true;
  });
  if (!operands) return null;
  if (operands.length < 2) {
    usageFailure(s, cmd);
    return null;
  }
  const range = vectorRange(s, operands);
  return range && { f, ...range };
}

/** create_iovec's length checks: the total, or null after printing why not. */
export function totalLength(s: IoSession, lengths: string[]): number | null {
  let total = 0;
  for (const text of lengths) {
    const n = s.num(text);
    if (n === null) return null;
    if (n > REQUEST_MAX_BYTES) {
      s.print(`Argument '${text}' exceeds maximum size ${REQUEST_MAX_BYTES}`);
      return null;
    }
    if (total > REQUEST_MAX_BYTES - n) {
      s.print(`The total number of bytes exceed the maximum size ${REQUEST_MAX_BYTES}`);
      return null;
    }
    total += n;
  }
  return total;
}

/** Offset and total of a vector command's operands, or null. */
export function vectorRange(s: IoSession, operands: string[]): { offset: number; count: number } | null {
  const offset = s.num(operands[0]!);
  if (offset === null) return null;
  const count = totalLength(s, operands.slice(1));
  return count === null ? null : { offset, count };
}

async function readvF(s: IoSession, argv: string[]): Promise<boolean> {
  const parsed = parseVector(s, readvCommand, argv, 'CP:qv');
  if (!parsed) return false;
  const { report, prepare } = readRequest(s, 'readv', parsed.offset, parsed.count, { ...parsed.f, synchronous: true });
  return issueRequest(s, report, prepare);
}

async function writevF(s: IoSession, argv: string[]): Promise<boolean> {
  const parsed = parseVector(s, writevCommand, argv, 'CfP:q');
  if (!parsed) return false;
  const { f, offset, count } = parsed;
  const r: RequestReport = { failWord: 'writev', statsWord: 'wrote', offsetBytes: offset, countBytes: count, csv: f.csv, quiet: f.quiet };
  return issueRequest(s, r, () => {
    const buf = s.syncBuffer(count, f.pattern ?? WRITE_FILL_BYTE);
    return () => s.backend().pwrite(offset, buf, f.fua ? Req.FUA : 0);
  });
}

export const readvCommand: IoCommand = {
  name: 'readv',
  args: '[-Cqv] [-P pattern] off len [len..]',
  oneline: 'reads a number of bytes at a specified offset',
  help: helpText(
    ' reads a range of bytes from the given offset into multiple buffers',
    '',
    ' Example:',
    " 'readv -v 512 1k 1k ' - dumps 2 kilobytes read from 512 bytes into the file",
    '',
    ' Reads a segment of the currently open file, optionally dumping it to the',
    ' standard output stream (with -v option) for subsequent inspection.',
    ' Uses multiple iovec buffers if more than one byte range is specified.',
    ' -C, -- report statistics in a machine parsable format',
    ' -P, -- use a pattern to verify read data',
    ' -v, -- dump buffer to standard output',
    ' -q, -- quiet mode, do not show I/O statistics',
  ),
  argmin: 2,
  argmax: -1,
  run: readvF,
};

export const writevCommand: IoCommand = {
  name: 'writev',
  args: '[-Cfq] [-P pattern] off len [len..]',
  oneline: 'writes a number of bytes at a specified offset',
  help: helpText(
    ' writes a range of bytes from the given offset source from multiple buffers',
    '',
    ' Example:',
    " 'writev 512 1k 1k' - writes 2 kilobytes at 512 bytes into the open file",
    '',
    ' Writes into a segment of the currently open file, using a buffer',
    ' filled with a set pattern (0xcdcdcdcd).',
    ' -P, -- use different pattern to fill file',
    ' -C, -- report statistics in a machine parsable format',
    ' -f, -- use Force Unit Access semantics',
    ' -q, -- quiet mode, do not show I/O statistics',
  ),
  argmin: 2,
  argmax: -1,
  needsWrite: true,
  run: writevF,
};
