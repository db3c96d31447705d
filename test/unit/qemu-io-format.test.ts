/*
 * qemu-io-ts's text formats and parsers, checked against what qemu-io 7.2
 * prints (values from /tmp/notes/cli-reference.md §5 and runs of the real
 * binary): cvtstr, timestr, the statistics lines, the hexdump, cvtnum,
 * pattern bytes, glibc getopt and QemuOpts option strings.
 */
import { describe, expect, it } from 'vitest';
import { cvtnum, cvtnumError, parsePattern, strtolWhole } from '../../qemu-img-ts/io/args.js';
import { breakline } from '../../qemu-img-ts/io/commands.js';
import { getopt, type LongOption } from '../../qemu-img-ts/io/getopt.js';
import { dumpBuffer } from '../../qemu-img-ts/io/hexdump.js';
import { parseQemuOpts } from '../../qemu-img-ts/io/open.js';
import { cvtstr, formatReport, printfFixed, timestr } from '../../qemu-img-ts/io/report.js';
import { IoSession, type Output } from '../../qemu-img-ts/io/session.js';

const NS = 1_000_000_000n;

describe('printfFixed (glibc %.Nf)', () => {
  it('rounds the exact binary value half to even', () => {
    expect(printfFixed(1.0625, 3)).toBe('1.062');
    expect(printfFixed(1.0635, 3)).toBe('1.063'); // stored a little below the tie
    expect(printfFixed(1.0645, 3)).toBe('1.065'); // stored a little above it
    expect(printfFixed(0.125, 2)).toBe('0.12');
    expect(printfFixed(0.375, 2)).toBe('0.38');
    expect(printfFixed(2.5, 0)).toBe('2');
    expect(printfFixed(1.9999995, 3)).toBe('2.000');
    expect(printfFixed(753.138942, 6)).toBe('753.138942');
    expect(printfFixed(0, 4)).toBe('0.0000');
  });

  it('prints inf and nan as glibc does', () => {
    expect(printfFixed(Infinity, 3)).toBe('inf');
    expect(printfFixed(NaN, 3)).toBe('-nan');
  });
});

describe('cvtstr', () => {
  it.each([
    [65536, '64 KiB'],
    [1536, '1.500 KiB'],
    [1048576, '1 MiB'],
    [2000000, '1.907 MiB'],
    [2000384, '1.908 MiB'], // a 2000000-byte raw image is 2000384 bytes long
    [1000, '1000 bytes'],
    [1, '1 bytes'],
    [0, '0 bytes'],
    [753.138942, '753.138942 bytes'],
    [1020.576 * 1048576, '1020.576 MiB'],
    [2147483136, '2 GiB'],
    [1088, '1.062 KiB'],
    [1099511627776, '1 TiB'],
    [7 * 2 ** 60, '7 EiB'],
    [753.0005, '753 bytes'],
  ])('%s -> %s', (value, text) => {
    expect(cvtstr(value)).toBe(text);
  });
});

describe('timestr', () => {
  it('uses `SS.ss sec` under a second and H:MM:SS.ss from one second on', () => {
    expect(timestr(0n, false)).toBe('00.00 sec');
    expect(timestr(12_345_678n, false)).toBe('00.01 sec');
    expect(timestr(996_000_000n, false)).toBe('01.00 sec');
    expect(timestr(3n * NS, false)).toBe('0:00:03.00');
    expect(timestr(2n * NS + 960_000_000n, true)).toBe('0:00:02.96');
    expect(timestr(3723n * NS + 500_000_000n, false)).toBe('1:02:03.50');
  });

  it('-C always uses the long form', () => {
    expect(timestr(0n, true)).toBe('0:00:00.00');
  });
});

describe('statistics lines', () => {
  it('prints the two human lines', () => {
    const text = formatReport({ op: 'wrote', elapsedNs: NS, offsetBytes: 0, countBytes: 65536, totalBytes: 65536, ops: 1, csv: false });
    expect(text).toBe('wrote 65536/65536 bytes at offset 0\n64 KiB, 1 ops; 0:00:01.00 (64 KiB/sec and 1.0000 ops/sec)\n');
  });

  it('prints sub-second rates with the short time form', () => {
    const text = formatReport({ op: 'read', elapsedNs: NS / 4n, offsetBytes: 512, countBytes: 1536, totalBytes: 1536, ops: 1, csv: false });
    expect(text).toBe('read 1536/1536 bytes at offset 512\n1.500 KiB, 1 ops; 00.25 sec (6 KiB/sec and 4.0000 ops/sec)\n');
  });

  it('prints the -C line', () => {
    const text = formatReport({ op: 'discard', elapsedNs: NS / 2n, offsetBytes: 0, countBytes: 65536, totalBytes: 65536, ops: 1, csv: true });
    expect(text).toBe('65536,1,0:00:00.50,131072.000,2.000\n');
  });
});

describe('hexdump', () => {
  const dump = (buf: Uint8Array, offset: number) => {
    let out = '';
    dumpBuffer(buf, offset, (t) => (out += t));
    return out;
  };

  it('prints absolute offsets, unpadded short lines and only alphanumerics', () => {
    const data = Buffer.from('AAAAAAAAAAAAAzzzzzzz');
    expect(dump(data, 3)).toBe(
      '00000003:  41 41 41 41 41 41 41 41 41 41 41 41 41 7a 7a 7a  AAAAAAAAAAAAAzzz\n00000013:  7a 7a 7a 7a  zzzz\n',
    );
    expect(dump(Buffer.from([0x20, 0x0a, 0x80, 0x30, 0x5f, 0x2e]), 0x100000)).toBe('00100000:  20 0a 80 30 5f 2e  ...0..\n');
    expect(dump(new Uint8Array(0), 0)).toBe('');
  });

  it('keeps lines whole across output batches', () => {
    const out = dump(new Uint8Array(40000).fill(0x61), 0);
    expect(out.split('\n')).toHaveLength(2501);
    expect(out.split('\n')[2499]).toBe('00009c30:  61 61 61 61 61 61 61 61 61 61 61 61 61 61 61 61  aaaaaaaaaaaaaaaa');
  });
});

describe('cvtnum', () => {
  it.each([
    ['0', 0],
    ['64k', 65536],
    ['1.5k', 1536],
    ['0x200', 512],
    ['0X20', 32],
    ['+1M', 1048576],
    ['1.k', 1024],
    ['0.5k', 512],
    ['012k', 12288],
    ['7E', 7 * 2 ** 60],
    ['9223372036854775807', 9223372036854775807],
  ])('%s = %s', (text, value) => {
    expect(cvtnum(text)).toEqual({ ok: true, value });
  });

  it('accepts a hex number with a suffix, with the 7.2 deprecation warning', () => {
    expect(cvtnum('0x10k')).toEqual({ ok: true, value: 16384, warning: 'Using a multiplier suffix on hex numbers is deprecated: 0x10k' });
  });

  it.each(['abc', '1x', '0x', '1.5', '-1', '1 M', '1KiB', '1kb', '', '0x1.8', '+-1', '1e3'])('%j is not a number', (text) => {
    expect(cvtnum(text)).toEqual({ ok: false, errno: 'EINVAL' });
  });

  it.each(['99999999999999999999', '16E', '8E', '9223372036854775808'])('%s is too large', (text) => {
    expect(cvtnum(text)).toEqual({ ok: false, errno: 'ERANGE' });
  });

  it('has qemu-io’s error texts', () => {
    expect(cvtnumError('EINVAL', 'abc')).toBe('Parsing error: non-numeric argument, or extraneous/unrecognized suffix -- abc');
    expect(cvtnumError('ERANGE', '8E')).toBe('Parsing error: argument too large -- 8E');
  });

  it('keeps qemu_strtosz 7.2 quirks', () => {
    expect(cvtnum('1.0')).toEqual({ ok: true, value: 1 });
    expect(cvtnum('0.0b')).toEqual({ ok: true, value: 0 });
    expect(cvtnum('1.9999999999999999999k')).toEqual({ ok: true, value: 1024 });
    expect(cvtnum(' +1k')).toEqual({ ok: true, value: 1024 });
  });
});

describe('pattern bytes and strtol', () => {
  it.each([
    ['0xab', 0xab],
    ['010', 8],
    ['65', 65],
    ['+5', 5],
    ['0377', 255],
    ['-0', 0],
    ['', 0],
  ])('%j is byte %s', (text, value) => {
    expect(parsePattern(text)).toBe(value);
  });

  it.each(['256', '0400', 'xyz', '-1', '0x1ff', '0x', '1x', '08', ' '])('%j is not a pattern byte', (text) => {
    expect(parsePattern(text)).toBeNull();
  });

  it('parses sleep’s milliseconds like strtol(…, 0)', () => {
    expect(strtolWhole('0x10')).toBe(16);
    expect(strtolWhole('010')).toBe(8);
    expect(strtolWhole('-1')).toBe(-1);
    expect(strtolWhole('1x')).toBeNull();
  });
});

describe('getopt (glibc)', () => {
  it('permutes options after operands, clusters flags and takes attached or next-word arguments', () => {
    expect(getopt('read', ['0', '1', '-qv', '-P0x41', '-l', '-1'], 'bCl:pP:qs:v')).toEqual({
      events: [{ key: 'q' }, { key: 'v' }, { key: 'P', arg: '0x41' }, { key: 'l', arg: '-1' }],
      operands: ['0', '1'],
    });
  });

  it('ends options at `--` and treats a lone `-` as an operand', () => {
    expect(getopt('read', ['-q', '--', '-1', '1'], 'q').operands).toEqual(['-1', '1']);
    expect(getopt('read', ['-', '1'], 'q').operands).toEqual(['-', '1']);
  });

  it('reports invalid options and missing arguments with glibc’s texts, as the last event', () => {
    expect(getopt('read', ['-q', '-x', '-v'], 'qv').events).toEqual([{ key: 'q' }, { error: "read: invalid option -- 'x'" }]);
    expect(getopt('read', ['0', '-1'], 'q').events).toEqual([{ error: "read: invalid option -- '1'" }]);
    expect(getopt('read', ['0', '1', '-P'], 'P:').events).toEqual([{ error: "read: option requires an argument -- 'P'" }]);
    expect(getopt('read', ['--x'], 'q').events).toEqual([{ error: "read: invalid option -- '-'" }]);
  });

  const LONG: LongOption[] = [
    { name: 'help', hasArg: false, key: 'h' },
    { name: 'cmd', hasArg: true, key: 'c' },
    { name: 'format', hasArg: true, key: 'f' },
    { name: 'read-only', hasArg: false, key: 'r' },
    { name: 'copy-on-read', hasArg: false, key: 'C' },
    { name: 'cache', hasArg: true, key: 't' },
    { name: 'force-share', hasArg: false, key: 'U' },
  ];

  it('matches long options exactly or by unique prefix, with = or the next word', () => {
    expect(getopt('qemu-io', ['--read', '--form', 'raw', '--cmd=length', 'x.raw'], 'hc:f:rCt:U', LONG)).toEqual({
      events: [{ key: 'r' }, { key: 'f', arg: 'raw' }, { key: 'c', arg: 'length' }],
      operands: ['x.raw'],
    });
  });

  it('reports long option errors as glibc 2.36 does', () => {
    const err = (args: string[]) => getopt('qemu-io', args, 'hc:f:rCt:U', LONG).events.at(-1);
    expect(err(['--bogus'])).toEqual({ error: "qemu-io: unrecognized option '--bogus'" });
    expect(err(['--help=x'])).toEqual({ error: "qemu-io: option '--help' doesn't allow an argument" });
    expect(err(['--form'])).toEqual({ error: "qemu-io: option '--format' requires an argument" });
    expect(err(['--c'])).toEqual({ error: "qemu-io: option '--c' is ambiguous; possibilities: '--cmd' '--copy-on-read' '--cache'" });
    expect(err(['--fo', 'raw'])).toEqual({ error: "qemu-io: option '--fo' is ambiguous; possibilities: '--format' '--force-share'" });
  });
});

describe('command lines and option strings', () => {
  it('splits commands on single spaces only (breakline)', () => {
    expect(breakline('  read   0   1  ')).toEqual(['read', '0', '1']);
    expect(breakline('read\t0 1')).toEqual(['read\t0', '1']);
    expect(breakline('')).toEqual([]);
  });

  function capture() {
    const text = { stdout: '', stderr: '' };
    const output: Output = { stdout: (t) => void (text.stdout += t), stderr: (t) => void (text.stderr += t) };
    return { session: new IoSession(output, []), text };
  }

  it('parses QemuOpts strings: later keys win, `,,` escapes, trailing comma', () => {
    const { session, text } = capture();
    const pairs = new Map<string, string>();
    expect(parseQemuOpts(session, 'driver=raw,file.filename=a,,b,driver=file,', pairs, true)).toBe(true);
    expect([...pairs]).toEqual([['driver', 'file'], ['file.filename', 'a,b']]);
    expect(text.stderr).toBe('');
  });

  it('warns about short-form booleans as 7.2 does, and refuses id= in merged lists', () => {
    const { session, text } = capture();
    const pairs = new Map<string, string>();
    expect(parseQemuOpts(session, 'x.raw,nofoo,help', pairs, true)).toBe(true);
    expect([...pairs]).toEqual([['x.raw', 'on'], ['foo', 'off'], ['help', 'on']]);
    expect(text.stderr).toBe(
      "qemu-io: warning: short-form boolean option 'x.raw' deprecated\nPlease use x.raw=on instead\n" +
        "qemu-io: warning: short-form boolean option 'nofoo' deprecated\nPlease use foo=off instead\n",
    );
    expect(parseQemuOpts(session, 'id=x,driver=raw', new Map(), true)).toBe(false);
    expect(text.stderr).toContain("qemu-io: Invalid parameter 'id'\n");
  });
});
