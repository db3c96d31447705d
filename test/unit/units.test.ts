/*
 * Sizes (block/units.ts) against what QEMU 7.2 really does: every row of
 * the size-argument table of `qemu-img create` (parseSize is qemu_strtosz)
 * and of the `virtual size` / `disk size` lines of `qemu-img info`
 * (sizeToStr is size_to_str), as recorded on a real 7.2 install.
 */
import { describe, expect, it } from 'vitest';
import { parseSize, parseSizeBig, sizeToStr } from '../../block/units.js';

const INT64_MAX = (1n << 63n) - 1n;

/**
 * qemu-img create's verdict on a size argument: the size it formats with,
 * 'invalid' (the "You may use k, M, G…" message), or 'range' (the "Must be
 * between 0 and 9223372036854775807" message: ERANGE or above INT64_MAX).
 */
function qemuImgVerdict(text: string): bigint | 'invalid' | 'range' {
  const v = parseSizeBig(text);
  if (typeof v === 'bigint' && v > INT64_MAX) return 'range';
  return v;
}

describe('parseSize: qemu_strtosz as qemu-img create 7.2 answers', () => {
  const table: Array<[string, bigint | 'invalid' | 'range']> = [
    ['1024', 1024n],
    ['1k', 1024n],
    ['1K', 1024n],
    ['1M', 1048576n],
    ['1G', 1073741824n],
    ['1T', 1099511627776n],
    ['1P', 1125899906842624n],
    ['1E', 1152921504606846976n],
    ['1.5M', 1572864n],
    ['512b', 512n],
    ['512B', 512n],
    ['1 M', 'invalid'],
    ['0', 0n],
    ['abc', 'invalid'],
    ['1Q', 'invalid'],
    ['99999999999999999999', 'range'],
    ['8E', 'range'],
    ['7E', 8070450532247928832n],
    ['1.5', 'invalid'],
    ['0.5k', 512n],
    ['1e3', 'invalid'],
    ['0x10', 16n],
    ['1kb', 'invalid'],
    ['1KiB', 'invalid'],
    ['1m', 1048576n],
    ['1g', 1073741824n],
    ['1.0000001k', 1024n],
    ['9223372036854775807', 9223372036854775807n],
    ['9223372036854775808', 'range'],
    ['18446744073709551615', 'range'],
    [' 1M', 1048576n],
    ['1M ', 'invalid'],
    ['1.5b', 'invalid'],
    ['1b', 1n],
    ['0x10k', 16384n],
    ['0x1.8', 'invalid'],
    ['0X20', 32n],
    ['+1M', 1048576n],
    ['1.k', 1024n],
    ['.5k', 'invalid'],
    ['1.5e3k', 'invalid'],
    ['1e', 1152921504606846976n],
    ['', 'invalid'],
    ['1KB', 'invalid'],
    ['1.9999999999999999999k', 1024n],
    ['0.0001k', 0n],
    ['0.0005k', 1n],
    ['0.00048828125k', 1n],
    ['1.00048828125k', 1025n],
    ['16E', 'range'],
    ['15.9999999999999999E', 'range'],
    ['inf', 'invalid'],
    ['nan', 'invalid'],
    ['00012', 12n],
    ['012k', 12288n],
    ['1.5E', 1729382256910270464n],
    ['0.5b', 'invalid'],
    ['0.0b', 0n],
    ['1.0', 1n],
    ['2.0b', 2n],
    [' +1k', 1024n],
    ['1,5M', 'invalid'],
    ['1\\tM', 'invalid'],
    ['-1', 'invalid'],
    ['-1k', 'invalid'],
    ['-0', 'invalid'],
  ];
  for (const [text, expected] of table) {
    it(`${JSON.stringify(text)} -> ${expected}`, () => {
      expect(qemuImgVerdict(text)).toBe(expected);
    });
  }

  it('warns, as 7.2 does, about a multiplier suffix on a hex number', () => {
    const warnings: string[] = [];
    expect(parseSize('0x10k', 'B', (w) => warnings.push(w))).toBe(16384);
    expect(parseSize('0x10', 'B', (w) => warnings.push(w))).toBe(16);
    expect(warnings).toEqual(['Using a multiplier suffix on hex numbers is deprecated: 0x10k']);
  });

  it('applies the default suffix to plain and hex numbers and allows fractions with it', () => {
    expect(parseSize('2', 'M')).toBe(2 * 1024 * 1024);
    expect(parseSize('0x2', 'K')).toBe(2048);
    expect(parseSize('1.5', 'K')).toBe(1536);
    expect(parseSize('1b', 'M')).toBe(1);
  });

  it('rejects what strtoull would stop at or wrap', () => {
    expect(parseSize('00x10')).toBe('invalid');
    expect(parseSize('0x')).toBe('invalid');
    expect(parseSize('0xg')).toBe('invalid');
    expect(parseSize('-0x10')).toBe('invalid');
    expect(parseSize('0x10000000000000000')).toBe('range');
    expect(parseSize('99999999999999999999k')).toBe('invalid');
    expect(parseSizeBig('1.5e')).toBe(1729382256910270464n);
  });

  it('returns numbers only up to 2^53 - 1', () => {
    expect(parseSize('9007199254740991')).toBe(Number.MAX_SAFE_INTEGER);
    expect(parseSize('9007199254740992')).toBe('range');
    expect(parseSize('7P')).toBe(7 * 2 ** 50);
    expect(parseSize('8P')).toBe('range');
  });
});

describe('sizeToStr: size_to_str as qemu-img info 7.2 prints it', () => {
  const virtualSizes: Array<[number, string]> = [
    [0, '0 B'],
    [512, '512 B'],
    [1024, '1 KiB'],
    [1536, '1.5 KiB'],
    [2048, '2 KiB'],
    [10240, '10 KiB'],
    [102400, '100 KiB'],
    [1022976, '999 KiB'],
    [1023488, '1e+03 KiB'],
    [1024000, '0.977 MiB'],
    [1048576, '1 MiB'],
    [1572864, '1.5 MiB'],
    [123457024, '118 MiB'],
    [987654656, '942 MiB'],
    [1073741824, '1 GiB'],
    [1610612736, '1.5 GiB'],
    [1099511627776, '1 TiB'],
  ];
  const diskSizes: Array<[number, string]> = [
    [4 * 1024, '4 KiB'],
    [12 * 1024, '12 KiB'],
    [100 * 1024, '100 KiB'],
    [996 * 1024, '996 KiB'],
    [1000 * 1024, '0.977 MiB'],
    [1020 * 1024, '0.996 MiB'],
    [1024 * 1024, '1 MiB'],
    [1536 * 1024, '1.5 MiB'],
    [1540 * 1024, '1.5 MiB'],
    [2000 * 1024, '1.95 MiB'],
    [10000 * 1024, '9.77 MiB'],
  ];
  for (const [bytes, text] of [...virtualSizes, ...diskSizes]) {
    it(`${bytes} -> ${text}`, () => expect(sizeToStr(bytes)).toBe(text));
  }

  it('switches unit at 1000 of the current one', () => {
    expect(sizeToStr(999)).toBe('999 B');
    expect(sizeToStr(1000)).toBe('0.977 KiB');
    expect(sizeToStr(2 ** 60)).toBe('1 EiB');
    expect(sizeToStr(999 * 2 ** 50)).toBe('999 PiB');
    expect(sizeToStr(1000 * 2 ** 50)).toBe('0.977 EiB');
  });

  it('rounds exact ties to even, as glibc printf does', () => {
    expect(sizeToStr(1152)).toBe('1.12 KiB'); // 1.125
    expect(sizeToStr(1408)).toBe('1.38 KiB'); // 1.375
    expect(sizeToStr(10496)).toBe('10.2 KiB'); // 10.25
    expect(sizeToStr(11008)).toBe('10.8 KiB'); // 10.75
    expect(sizeToStr(998.5 * 1024)).toBe('998 KiB');
    expect(sizeToStr(999.5 * 1024)).toBe('1e+03 KiB');
  });
});
