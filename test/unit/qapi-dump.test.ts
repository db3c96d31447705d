/*
 * The shared "Format specific information" dumper (qemu-img-ts/qapi-dump.ts)
 * against qemu-img 7.2's own output. The expected text is `qemu-img info`
 * of a qcow2 image with two persistent bitmaps (made with `qemu-img create
 * -f qcow2` and `qemu-img bitmap --add`); the data is given in QAPI schema
 * order, as a driver builds it, so the QDict order, nesting, list indices
 * and dash-to-space keys all have to come out as QEMU prints them.
 */
import { describe, expect, it } from 'vitest';
import { dumpQObject, formatSpecificInformation } from '../../qemu-img-ts/qapi-dump.js';

const bitmap = (name: string, granularity: number) => ({ name, granularity, flags: ['auto'] });

describe('format-specific information dump (bdrv_image_info_specific_dump)', () => {
  it('prints a qcow2 image with bitmaps as qemu-img info does', () => {
    const data = {
      compat: '1.1',
      'extended-l2': false,
      'lazy-refcounts': false,
      corrupt: false,
      'refcount-bits': 16,
      bitmaps: [bitmap('b0', 65536), bitmap('other-map', 131072)],
      'compression-type': 'zlib',
    };
    expect(formatSpecificInformation({ type: 'qcow2', data })).toBe(
      [
        'Format specific information:',
        '    compat: 1.1',
        '    compression type: zlib',
        '    lazy refcounts: false',
        '    bitmaps:',
        '        [0]:',
        '            flags:',
        '                [0]: auto',
        '            name: b0',
        '            granularity: 65536',
        '        [1]:',
        '            flags:',
        '                [0]: auto',
        '            name: other-map',
        '            granularity: 131072',
        '    refcount bits: 16',
        '    corrupt: false',
        '    extended l2: false',
        '',
      ].join('\n'),
    );
  });

  it('prints scalars alone and empty composites as nothing', () => {
    expect(dumpQObject(1, 2 ** 40)).toBe('1099511627776');
    expect(dumpQObject(1, 2n ** 60n)).toBe('1152921504606846976');
    expect(dumpQObject(1, 0.5)).toBe('0.5');
    expect(dumpQObject(1, 'a-b')).toBe('a-b');
    expect(dumpQObject(1, {})).toBe('');
    expect(dumpQObject(2, { list: [] })).toBe('        list:\n');
  });
});
