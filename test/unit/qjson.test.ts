/*
 * QEMU's JSON writer: layout, string escaping, numbers and QDict key order.
 * Expected texts are qemu-img 7.2's (see /tmp/notes/cli-reference.md §3.3
 * and the qcow2 transcripts quoted below).
 */
import { describe, expect, it } from 'vitest';
import { formatNumber, qdictEntries, quoteString, toJsonCompact, toJsonPretty } from '../../block/qjson.js';

describe('qjson pretty layout', () => {
  it('prints a raw image info exactly as qemu-img info --output=json', () => {
    const info = { 'virtual-size': 1048576, filename: 'created.raw', format: 'raw', 'actual-size': 4096, 'dirty-flag': false };
    expect(`${toJsonPretty(info)}\n`).toBe(
      '{\n    "virtual-size": 1048576,\n    "filename": "created.raw",\n    "format": "raw",\n' +
        '    "actual-size": 4096,\n    "dirty-flag": false\n}\n',
    );
  });

  it('indents a list of objects one level more (--backing-chain)', () => {
    expect(toJsonPretty([{ format: 'raw' }])).toBe('[\n    {\n        "format": "raw"\n    }\n]');
  });

  it('prints empty containers on two lines, at their own indent', () => {
    expect(toJsonPretty({})).toBe('{\n}');
    expect(toJsonPretty([])).toBe('[\n]');
    expect(toJsonPretty({ data: {} })).toBe('{\n    "data": {\n    }\n}');
  });

  it('leaves out members whose value is undefined', () => {
    expect(toJsonPretty({ a: 1, b: undefined })).toBe('{\n    "a": 1\n}');
  });

  it('writes the compact form of json: filenames', () => {
    expect(toJsonCompact({ driver: 'file', filename: 'c.raw' })).toBe('{"driver": "file", "filename": "c.raw"}');
    expect(toJsonCompact([1, true, null, 'x'])).toBe('[1, true, null, "x"]');
    expect(toJsonCompact({})).toBe('{}');
  });
});

/** The order a QDict holding `keys` (inserted in this order) iterates them. */
function qdictOrder(keys: string[]): string[] {
  return qdictEntries(Object.fromEntries(keys.map((k) => [k, 0]))).map(([k]) => k);
}

describe('qjson key order (QDict buckets)', () => {
  // Insertion orders as QEMU's output visitor adds members (QAPI schema order); expected as qemu-img 7.2 prints them.
  it.each([
    {
      what: 'raw and qcow2 ImageInfo',
      keys: ['filename', 'format', 'dirty-flag', 'actual-size', 'virtual-size', 'cluster-size', 'format-specific'],
      printed: ['virtual-size', 'filename', 'cluster-size', 'format', 'actual-size', 'format-specific', 'dirty-flag'],
    },
    {
      what: 'a qcow2 overlay ImageInfo',
      keys: ['filename', 'format', 'dirty-flag', 'virtual-size', 'backing-filename', 'full-backing-filename', 'backing-filename-format'],
      printed: ['backing-filename-format', 'virtual-size', 'filename', 'format', 'full-backing-filename', 'backing-filename', 'dirty-flag'],
    },
    {
      what: 'qcow2 format-specific data',
      keys: ['compat', 'lazy-refcounts', 'corrupt', 'refcount-bits', 'compression-type', 'extended-l2'],
      printed: ['compat', 'compression-type', 'lazy-refcounts', 'refcount-bits', 'corrupt', 'extended-l2'],
    },
  ])('orders $what as qemu-img 7.2 prints it', ({ keys, printed }) => {
    expect(qdictOrder(keys)).toEqual(printed);
  });

  it('puts the newest of two keys in one bucket first', () => {
    // 'backing-filename-format' and 'children' share bucket 206.
    expect(qdictOrder(['children', 'backing-filename-format'])).toEqual(['backing-filename-format', 'children']);
    expect(qdictOrder(['backing-filename-format', 'children'])).toEqual(['children', 'backing-filename-format']);
  });
});

describe('qjson strings', () => {
  it('escapes quote, backslash and the short control escapes', () => {
    expect(quoteString('q"b\\s\tt')).toBe('"q\\"b\\\\s\\tt"');
    expect(quoteString('\b\f\n\r')).toBe('"\\b\\f\\n\\r"');
  });

  it('escapes other control characters, DEL and non-ASCII as uppercase \\uXXXX', () => {
    expect(quoteString('ctl\u0001x')).toBe('"ctl\\u0001x"');
    expect(quoteString('\u007f')).toBe('"\\u007F"');
    expect(quoteString('é.raw')).toBe('"\\u00E9.raw"');
    expect(quoteString('\u20ac')).toBe('"\\u20AC"');
  });

  it('writes code points beyond the BMP as a surrogate pair and lone surrogates as U+FFFD', () => {
    expect(quoteString('\u{1F600}')).toBe('"\\uD83D\\uDE00"');
    expect(quoteString('a\ud800b')).toBe('"a\\uFFFDb"');
  });
});

describe('qjson numbers', () => {
  it('prints integers exactly, bigint included', () => {
    expect(formatNumber(0)).toBe('0');
    expect(formatNumber(-5)).toBe('-5');
    expect(formatNumber(9007199254740993n)).toBe('9007199254740993');
  });

  it('prints doubles as %.17g', () => {
    expect(formatNumber(0.5)).toBe('0.5');
    expect(formatNumber(0.1)).toBe('0.10000000000000001');
    expect(formatNumber(-1.25)).toBe('-1.25');
    expect(formatNumber(1e-7)).toBe('9.9999999999999995e-08');
  });
});
