/*
 * read and write (qemu-io-cmds.c read_f, write_f), with qemu-io 7.2's
 * checks in its order and its texts.
 *
 * read fills its buffer with 0xab, reads, then (with -P) compares the
 * [-s, -s + -l) window against the pattern: a mismatch prints
 * `Pattern verification failed at offset N, M bytes` before anything else,
 * even with -q, and fails the command after the statistics. write fills with
 * 0xcd, or -P's byte, or the cycled contents of -s's file; -z writes zeroes
 * (-u may unmap, -n forbids the slow fallback), -f adds FUA, -c writes
 * compressed (blk_pwrite_compressed: ENOTSUP on formats without it, EIO
 * past the end as the range is checked first). The vmstate (-b) path fails
 * with ENOTSUP as it does on raw.
 *
 * `readRequest` is the read every reading command shares (read, readv,
 * aio_read): its buffer, its -P check and its -v dump.
 */
import fs from 'node:fs';
import { Req } from '../../block/flags.js';
import { strerror } from '../../block/errors.js';
import { parsePattern } from './args.js';
import { helpText, parseFlags, usageFailure, type IoCommand } from './commands.js';
import { dumpBuffer } from './hexdump.js';
import { READ_FILL_BYTE, REQUEST_MAX_BYTES, WRITE_FILL_BYTE, errnoOf, issueRequest, requestFailed, type PrepareRequest, type RequestReport } from './request.js';
import type { IoSession } from './session.js';

const SECTOR_BYTES = 512;

/** Result of a command's own checks: a value, or null after printing why not. */
type Checked<T> = T | null;

/** `-P` handler shared by every command that takes a pattern. */
export function patternArg(s: IoSession, arg: string): Checked<number> {
  const p = parsePattern(arg);
  if (p === null) s.print(`${arg} is not a valid pattern byte`);
  return p;
}

/** A length argument with read's limit message. */
function lengthArg(s: IoSession, text: string, limitSuffix: string): Checked<number> {
  const n = s.num(text);
  if (n !== null && n > REQUEST_MAX_BYTES) {
    s.print(`length cannot exceed ${REQUEST_MAX_BYTES}${limitSuffix}, given ${text}`);
    return null;
  }
  return n;
}

/** -b/-c need whole sectors. */
function sectorAligned(s: IoSession, offsetBytes: number, bytes: number): boolean {
  for (const [value, what] of [[offsetBytes, 'offset'], [bytes, 'count']] as const) {
    if (value % SECTOR_BYTES !== 0) {
      s.print(`${value} is not a sector-aligned value for '${what}'`);
      return false;
    }
  }
  return true;
}

/** Bytes compared at a time by the pattern check (large reads are checked with memcmp, not per byte). */
const PATTERN_CHUNK_BYTES = 64 * 1024;

/** Whether every byte of `buf` is `byte`. */
function allBytesAre(buf: Uint8Array, byte: number): boolean {
  const reference = Buffer.alloc(Math.min(buf.length, PATTERN_CHUNK_BYTES), byte);
  const view = Buffer.from(buf.buffer, buf.byteOffset, buf.length);
  for (let at = 0; at < view.length; at += reference.length) {
    const chunk = view.subarray(at, at + reference.length);
    if (!chunk.equals(reference.subarray(0, chunk.length))) return false;
  }
  return true;
}

/** The -P check of a read: prints qemu-io's mismatch line; true when every byte matches. */
export function verifyPattern(s: IoSession, checked: Uint8Array, pattern: number, offsetBytes: number): boolean {
  if (allBytesAre(checked, pattern)) return true;
  s.print(`Pattern verification failed at offset ${offsetBytes}, ${checked.length} bytes`);
  return false;
}

// ---------------------------------------------------------------- read

interface ReadFlags {
  vmstate: boolean;
  csv: boolean;
  quiet: boolean;
  dump: boolean;
  pattern: number | null;
  patternOffset: number | null;
  patternCount: number | null;
}

function parseReadFlags(s: IoSession, argv: string[]): { flags: ReadFlags; operands: string[] } | null {
  const f: ReadFlags = { vmstate: false, csv: false, quiet: false, dump: false, pattern: null, patternOffset: null, patternCount: null };
  const operands = parseFlags(s, readCommand, argv, 'bCl:pP:qs:v', (key, arg) => {
    if (key === 'b') f.vmstate = true;
    else if (key === 'C') f.csv = true;
    else if (key === 'q') f.quiet = true;
    else if (key === 'v') f.dump = true;
    else if (key === 'P') return (f.pattern = patternArg(s, arg)) !== null;
    else if (key === 'l') return (f.patternCount = s.num(arg)) !== null;
    else if (key === 's') return (f.patternOffset = s.num(arg)) !== null;
    return true;
  });
  return operands ? { flags: f, operands } : null;
}

async function readF(s: IoSession, argv: string[]): Promise<boolean> {
  const parsed = parseReadFlags(s, argv);
  if (!parsed) return false;
  const { flags: f, operands } = parsed;
  if (operands.length !== 2) return usageFailure(s, readCommand);
  const offset = s.num(operands[0]!);
  if (offset === null) return false;
  const count = lengthArg(s, operands[1]!, '');
  if (count === null) return false;
  if (f.pattern === null && (f.patternCount !== null || f.patternOffset !== null)) return usageFailure(s, readCommand);
  const patternOffset = f.patternOffset ?? 0;
  const patternCount = f.patternCount ?? count - patternOffset;
  if (patternCount < 0 || patternCount + patternOffset > count) {
    s.print('pattern verification range exceeds end of read data');
    return false;
  }
  if (f.vmstate && !sectorAligned(s, offset, count)) return false;
  const { report, prepare } = readRequest(s, 'read', offset, count, {
    ...f,
    checkFrom: patternOffset,
    checkBytes: patternCount,
    synchronous: true,
  });
  if (f.vmstate) return requestFailed(s, report, 'ENOTSUP');
  return issueRequest(s, report, prepare);
}

export interface ReadOutput {
  csv: boolean;
  quiet: boolean;
  dump: boolean;
  pattern: number | null;
  /** The -P window, relative to the offset (default: all of it). */
  checkFrom?: number;
  /** The command completes before the next starts, so the session's buffer may be reused. */
  synchronous?: boolean;
  checkBytes?: number;
}

/** A read into a 0xab-filled buffer, with -P checked over its window and -v dumping it (read, readv, aio_read). */
export function readRequest(s: IoSession, failWord: string, offset: number, count: number, o: ReadOutput) {
  let buf: Uint8Array = new Uint8Array(0);
  const from = o.checkFrom ?? 0;
  const window = () => buf.subarray(from, from + (o.checkBytes ?? count));
  const report: RequestReport = {
    failWord,
    statsWord: 'read',
    offsetBytes: offset,
    countBytes: count,
    csv: o.csv,
    quiet: o.quiet,
    verify: () => o.pattern === null || verifyPattern(s, window(), o.pattern, offset + from),
    dump: o.dump ? () => dumpBuffer(buf, offset, (text) => s.output.stdout(text)) : undefined,
  };
  const prepare: PrepareRequest = () => {
    buf = o.synchronous ? s.syncBuffer(count, READ_FILL_BYTE) : new Uint8Array(count).fill(READ_FILL_BYTE);
    return () => s.backend().pread(offset, buf);
  };
  return { report, prepare };
}

export const readCommand: IoCommand = {
  name: 'read',
  altname: 'r',
  args: '[-abCqv] [-P pattern [-s off] [-l len]] off len',
  oneline: 'reads a number of bytes at a specified offset',
  help: helpText(
    ' reads a range of bytes from the given offset',
    '',
    ' Example:',
    " 'read -v 512 1k' - dumps 1 kilobyte read from 512 bytes into the file",
    '',
    ' Reads a segment of the currently open file, optionally dumping it to the',
    ' standard output stream (with -v option) for subsequent inspection.',
    ' -b, -- read from the VM state rather than the virtual disk',
    ' -C, -- report statistics in a machine parsable format',
    ' -l, -- length for pattern verification (only with -P)',
    ' -p, -- ignored for backwards compatibility',
    ' -P, -- use a pattern to verify read data',
    ' -q, -- quiet mode, do not show I/O statistics',
    ' -s, -- start offset for pattern verification (only with -P)',
    ' -v, -- dump buffer to standard output',
  ),
  argmin: 2,
  argmax: -1,
  run: readF,
};

// ---------------------------------------------------------------- write

interface WriteFlags {
  vmstate: boolean;
  compressed: boolean;
  csv: boolean;
  quiet: boolean;
  zeroes: boolean;
  /** Req.FUA, Req.MAY_UNMAP, Req.NO_FALLBACK as given by -f, -u, -n. */
  req: number;
  pattern: number | null;
  sourceFile: string | null;
}

function parseWriteFlags(s: IoSession, argv: string[]): { flags: WriteFlags; operands: string[] } | null {
  const f: WriteFlags = { vmstate: false, compressed: false, csv: false, quiet: false, zeroes: false, req: 0, pattern: null, sourceFile: null };
  const simple: Record<string, () => void> = {
    b: () => (f.vmstate = true),
    c: () => (f.compressed = true),
    C: () => (f.csv = true),
    f: () => (f.req |= Req.FUA),
    n: () => (f.req |= Req.NO_FALLBACK),
    q: () => (f.quiet = true),
    u: () => (f.req |= Req.MAY_UNMAP),
    z: () => (f.zeroes = true),
    p: () => undefined,
  };
  const operands = parseFlags(s, writeCommand, argv, 'bcCfnpP:qs:uz', (key, arg) => {
    if (key === 'P') return (f.pattern = patternArg(s, arg)) !== null;
    if (key === 's') f.sourceFile = arg;
    else simple[key]!();
    return true;
  });
  return operands ? { flags: f, operands } : null;
}

/** write_f's flag combination checks, in its order. */
function writeFlagsProblem(f: WriteFlags): string | null {
  if (f.vmstate && f.zeroes) return '-b and -z cannot be specified at the same time';
  if (f.req & Req.FUA && (f.vmstate || f.compressed)) return '-f and -b or -c cannot be specified at the same time';
  if (f.req & Req.NO_FALLBACK && !f.zeroes) return '-n requires -z to be specified';
  if (f.req & Req.MAY_UNMAP && !f.zeroes) return '-u requires -z to be specified';
  if (Number(f.zeroes) + Number(f.pattern !== null) + Number(f.sourceFile !== null) > 1) {
    return 'Only one of -z, -P, and -s can be specified at the same time';
  }
  return null;
}

/** Bytes read from a -s source file per read call. */
const SOURCE_CHUNK_BYTES = 1 << 20;

/** fread(buf, 1, bytes, f): up to `bytes` bytes of an open file (fewer at its end). */
function readUpTo(fd: number, bytes: number): Buffer {
  const chunks: Buffer[] = [];
  let total = 0;
  while (total < bytes) {
    const chunk = Buffer.alloc(Math.min(SOURCE_CHUNK_BYTES, bytes - total));
    const n = fs.readSync(fd, chunk, 0, chunk.length, null);
    if (n === 0) break;
    chunks.push(chunk.subarray(0, n));
    total += n;
  }
  return Buffer.concat(chunks, total);
}

/**
 * qemu_io_alloc_from_file: the file's first bytes repeated to `bytes`; null
 * after printing the error (`FILE: strerror`, or `FILE: file is empty`, which
 * QEMU also says for a zero-length write since it reads nothing).
 */
function bufferFromFile(s: IoSession, file: string, bytes: number): Uint8Array | null {
  let content: Buffer;
  try {
    const fd = fs.openSync(file, 'r');
    try {
      content = readUpTo(fd, bytes);
    } finally {
      fs.closeSync(fd);
    }
  } catch (e) {
    s.printErr(`${file}: ${strerror(errnoOf(e))}`);
    return null;
  }
  if (content.length === 0) {
    s.printErr(`${file}: file is empty`);
    return null;
  }
  const buf = new Uint8Array(bytes);
  for (let at = 0; at < bytes; at += content.length) buf.set(content.subarray(0, Math.min(content.length, bytes - at)), at);
  return buf;
}

async function writeF(s: IoSession, argv: string[]): Promise<boolean> {
  const parsed = parseWriteFlags(s, argv);
  if (!parsed) return false;
  const { flags: f, operands } = parsed;
  if (operands.length !== 2) return usageFailure(s, writeCommand);
  const problem = writeFlagsProblem(f);
  if (problem) {
    s.print(problem);
    return false;
  }
  const offset = s.num(operands[0]!);
  if (offset === null) return false;
  const count = f.req & Req.NO_FALLBACK ? s.num(operands[1]!) : lengthArg(s, operands[1]!, ' without -n');
  if (count === null) return false;
  if ((f.vmstate || f.compressed) && !sectorAligned(s, offset, count)) return false;
  let source: Uint8Array | null = null;
  if (!f.zeroes && f.sourceFile !== null) {
    source = bufferFromFile(s, f.sourceFile, count);
    if (!source) return false;
  }
  const r: RequestReport = { failWord: 'write', statsWord: 'wrote', offsetBytes: offset, countBytes: count, csv: f.csv, quiet: f.quiet };
  if (f.vmstate) return requestFailed(s, r, 'ENOTSUP');
  const blk = s.backend();
  return issueRequest(s, r, () => {
    if (f.zeroes) return () => blk.pwriteZeroes(offset, count, f.req);
    const buf = source ?? s.syncBuffer(count, f.pattern ?? WRITE_FILL_BYTE);
    if (f.compressed) return () => blk.pwrite(offset, buf, Req.WRITE_COMPRESSED);
    return () => blk.pwrite(offset, buf, f.req & Req.FUA);
  });
}

export const writeCommand: IoCommand = {
  name: 'write',
  altname: 'w',
  args: '[-bcCfnquz] [-P pattern | -s source_file] off len',
  oneline: 'writes a number of bytes at a specified offset',
  help: helpText(
    ' writes a range of bytes from the given offset',
    '',
    ' Example:',
    " 'write 512 1k' - writes 1 kilobyte at 512 bytes into the open file",
    '',
    ' Writes into a segment of the currently open file, using a buffer',
    ' filled with a set pattern (0xcdcdcdcd).',
    ' -b, -- write to the VM state rather than the virtual disk',
    ' -c, -- write compressed data with blk_write_compressed',
    ' -f, -- use Force Unit Access semantics',
    " -n, -- with -z, don't allow slow fallback",
    ' -p, -- ignored for backwards compatibility',
    ' -P, -- use different pattern to fill file',
    ' -s, -- use a pattern file to fill the write buffer',
    ' -C, -- report statistics in a machine parsable format',
    ' -q, -- quiet mode, do not show I/O statistics',
    ' -u, -- with -z, allow unmapping',
    ' -z, -- write zeroes using blk_co_pwrite_zeroes',
  ),
  argmin: 2,
  argmax: -1,
  needsWrite: true,
  run: writeF,
};
