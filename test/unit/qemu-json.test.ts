/*
 * parseQemuJson (block/json-stream.ts): qobject_from_json's values and
 * error texts, as qemu-img 7.2 prints them after "Could not parse the JSON
 * options: " (the interop test compares with qemu-img itself).
 */
import { describe, expect, it } from 'vitest';
import { parseQemuJson } from '../../block/json-stream.js';

const ERRORS: [string, string][] = [
  ['{bad', "JSON parse error, invalid keyword 'bad'"],
  ['{"a":1', 'JSON parse error, premature EOI'],
  ['{1:2}', 'JSON parse error, key is not a string in object'],
  ['{"a":1,}', 'JSON parse error, expecting value'],
  ['{"a":01}', "JSON parse error, stray '01'"],
  ['{"a":1.}', "JSON parse error, stray '1.}'"],
  ['{"a":-}', "JSON parse error, stray '-}'"],
  ['{"a":"x', `JSON parse error, stray '"x'`],
  ['{"a":"\\u12"}', 'JSON parse error, \\u12" is not a valid Unicode character'],
  ['{"a":"\\ud800\\u0041"}', 'JSON parse error, \\ud800 is not a valid Unicode character'],
  ['{"a":1}}', 'Expecting at most one JSON value'],
  ['', 'Expecting a JSON value'],
];

describe('parseQemuJson', () => {
  it.each(ERRORS)('%s → %s', (text, message) => {
    expect(() => parseQemuJson(text)).toThrow(message);
  });

  it('reads numbers, single-quoted strings and surrogate pairs as QEMU does', () => {
    expect(parseQemuJson(`{'a': [0, -0.5, 1e3, 1E+2], "b": "\\ud83d\\ude00", "c": 'x"y'}`)).toEqual({
      a: [0, -0.5, 1000, 100],
      b: '😀',
      c: 'x"y',
    });
  });

  it('ends a finished number before the next character', () => {
    expect(() => parseQemuJson('0x')).toThrow('Expecting at most one JSON value');
    expect(parseQemuJson('12')).toBe(12);
  });
});
