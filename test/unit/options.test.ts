/*
 * Option parsing: keyval strings (block/keyval.ts, checked against QEMU's
 * tests/unit/test-keyval.c cases), json: pseudo-filenames, the zod value
 * helpers with QEMU's messages (block/options.ts), node-name rules, and the
 * graph's refusal of unknown keys.
 */
import { describe, expect, it } from 'vitest';
import { z } from 'zod';
import { isBlockError } from '../../block/errors.js';
import { parseJsonFilename, parseKeyval, unflatten } from '../../block/keyval.js';
import { invalidNodeName, parseBaseOptions, parseWith, zBool, zEnum, zInt, zSize } from '../../block/options.js';
import { memGraph } from '../helpers/mem-driver.js';

/** The EINVAL message `fn` throws. */
function einval(fn: () => unknown): string {
  try {
    fn();
  } catch (e) {
    if (isBlockError(e, 'EINVAL')) return e.message;
    throw e;
  }
  throw new Error('expected an EINVAL BlockError');
}

describe('keyval', () => {
  it('parses pairs, escapes and trailing commas', () => {
    expect(parseKeyval('')).toEqual({});
    expect(parseKeyval('a=1,b=2,,x,a=3')).toEqual({ a: '3', b: '2,x' });
    expect(parseKeyval('x=,,id=bar')).toEqual({ x: ',id=bar' });
    expect(parseKeyval('x=y,')).toEqual({ x: 'y' });
    expect(parseKeyval('x=')).toEqual({ x: '' });
    expect(parseKeyval('_x-y_z=1')).toEqual({ '_x-y_z': '1' });
  });

  it('nests dotted keys, the last value winning', () => {
    expect(parseKeyval('a.b.c=1,a.b.c=2,d=3')).toEqual({ a: { b: { c: '2' } }, d: '3' });
    expect(parseKeyval('driver=raw,file.driver=file,file.filename=/tmp/a,,b')).toEqual({
      driver: 'raw',
      file: { driver: 'file', filename: '/tmp/a,b' },
    });
  });

  it('makes index-keyed objects lists, in index order', () => {
    const list012 = ['null', 'eins', 'zwei'];
    expect(parseKeyval('list.0=null,list.2=zwei,list.1=eins')).toEqual({ list: list012 });
    expect(parseKeyval('list.1=goner,list.0=null,list.01=eins,list.2=zwei')).toEqual({ list: list012 });
    expect(parseKeyval('a.list.1=eins,a.list.00=null,a.list.2=zwei')).toEqual({ a: { list: list012 } });
    expect(parseKeyval('s.0.driver=file,s.0.filename=x,s.1=y')).toEqual({ s: [{ driver: 'file', filename: 'x' }, 'y'] });
  });

  it('takes an implied key for a first value without "="', () => {
    expect(parseKeyval('an,aus=off,noaus=', 'implied')).toEqual({ implied: 'an', aus: 'off', noaus: '' });
    expect(parseKeyval('val', 'eins.zwei')).toEqual({ eins: { zwei: 'val' } });
    expect(parseKeyval('img.raw,format=raw', 'file')).toEqual({ file: 'img.raw', format: 'raw' });
    expect(parseKeyval('file=img.raw', 'file')).toEqual({ file: 'img.raw' });
  });

  const errors: Array<[string, string | undefined, string]> = [
    ['=val', undefined, "Invalid parameter ''"],
    [',', undefined, "Invalid parameter ''"],
    ['.', undefined, "Invalid parameter '.'"],
    ['key.', undefined, "Invalid parameter 'key.'"],
    ['7up=val', undefined, "Invalid parameter '7up'"],
    ['key[0]=val', undefined, "Invalid parameter 'key[0]'"],
    ['a b=1', undefined, "Invalid parameter 'a b'"],
    ['0=1', undefined, "Invalid parameter '0'"],
    ['an,noaus,noaus=', undefined, "Expected '=' after parameter 'an'"],
    ['no', undefined, "Expected '=' after parameter 'no'"],
    ['a.b=1,a=2', undefined, "Parameters 'a.*' used inconsistently"],
    ['a=2,a.b=1', undefined, "Parameters 'a.*' used inconsistently"],
    ['a.b=1,a.b.c=2', undefined, "Parameters 'a.b.*' used inconsistently"],
    ['a.b.c=1,a.b.0=2', undefined, "Parameters 'a.b.*' used inconsistently"],
    ['a.0.c=1,a.b.c=2', undefined, "Parameters 'a.*' used inconsistently"],
    ['list.1=lonely', undefined, "Parameter 'list.0' missing"],
    ['list.0=null,list.2=eins,list.02=zwei', undefined, "Parameter 'list.1' missing"],
    [',', 'implied', "Invalid parameter ''"],
    [',,,a=1', 'implied', "Invalid parameter ''"],
    ['val,,ue', 'implied', "Invalid parameter ''"],
    ['=val', 'implied', "Invalid parameter ''"],
    ['a=1,val', 'implied', "Expected '=' after parameter 'val'"],
  ];
  for (const [text, implied, message] of errors) {
    it(`refuses ${JSON.stringify(text)}${implied ? ` (implied ${implied})` : ''}: ${message}`, () => {
      expect(einval(() => parseKeyval(text, implied))).toBe(message);
    });
  }

  it('limits key fragments to 127 bytes', () => {
    const long = 'a'.repeat(127);
    expect(parseKeyval(`${long}=v`)).toEqual({ [long]: 'v' });
    expect(parseKeyval(`k.${long}=v`)).toEqual({ k: { [long]: 'v' } });
    const tooLong = `${long}z`;
    expect(einval(() => parseKeyval(`${tooLong}=v`))).toBe(`Parameter '${tooLong}' is too long`);
    expect(einval(() => parseKeyval(`k.${tooLong}=v`))).toBe(`Parameter fragment '${tooLong}' is too long`);
  });

  it('merges objects given whole into what dotted keys built', () => {
    expect(unflatten([['file.driver', 'file'], ['file', { filename: 'x', 'cache.direct': true }]])).toEqual({
      file: { driver: 'file', filename: 'x', cache: { direct: true } },
    });
  });
});

describe('json: filenames', () => {
  it('nests dotted keys and keeps JSON types', () => {
    expect(parseJsonFilename('json:{"driver":"raw","file.driver":"file","file":{"filename":"a","locking":false},"size":512}')).toEqual({
      driver: 'raw',
      file: { driver: 'file', filename: 'a', locking: false },
      size: 512,
    });
    expect(parseJsonFilename('json:{"file":{"x.y":1}}')).toEqual({ file: { x: { y: 1 } } });
    expect(parseJsonFilename('json:{"a.0":"x","a.1":"y","b":[1,2]}')).toEqual({ a: ['x', 'y'], b: [1, 2] });
  });

  it('refuses what is not a JSON object, with QEMU\'s prefixes', () => {
    expect(einval(() => parseJsonFilename('json:[1]'))).toBe('Invalid JSON object given');
    expect(einval(() => parseJsonFilename('json:"x"'))).toBe('Invalid JSON object given');
    expect(einval(() => parseJsonFilename('json:{'))).toMatch(/^Could not parse the JSON options: /);
    expect(einval(() => parseJsonFilename('json:{"file":"x","file.driver":"file"}'))).toBe("Parameters 'file.*' used inconsistently");
  });

  it('opens a graph from a json: filename', async () => {
    const graph = memGraph();
    const node = await graph.openImage('json:{"driver":"raw","file.driver":"test-mem","file.size":"4k"}');
    expect(node.driver.name).toBe('raw');
    expect(node.totalBytes).toBe(4096);
  });
});

describe('zod value helpers', () => {
  const parse = (schema: z.ZodType, value: unknown) => (parseWith(z.object({ v: schema }), { v: value }) as { v: unknown }).v;
  const message = (schema: z.ZodType, value: unknown) => einval(() => parse(schema, value));

  it('zBool takes booleans and QEMU\'s words', () => {
    for (const word of ['on', 'yes', 'true', 'y']) expect(parse(zBool('v'), word)).toBe(true);
    for (const word of ['off', 'no', 'false', 'n']) expect(parse(zBool('v'), word)).toBe(false);
    expect(parse(zBool('v'), true)).toBe(true);
    expect(message(zBool('read-only'), 'offer')).toBe("Parameter 'read-only' expects 'on' or 'off'");
    expect(message(zBool('read-only'), 'ON')).toBe("Parameter 'read-only' expects 'on' or 'off'");
  });

  it('zInt reads numbers as QemuOpts does (hex, octal, decimal)', () => {
    expect(parse(zInt('v'), '42')).toBe(42);
    expect(parse(zInt('v'), '0x2a')).toBe(42);
    expect(parse(zInt('v'), '052')).toBe(42);
    expect(parse(zInt('v'), '0')).toBe(0);
    expect(parse(zInt('v'), ' +7')).toBe(7);
    expect(parse(zInt('v'), 42)).toBe(42);
    for (const bad of ['3.14', '08', 'abc', '', '1k', '7 ', '-1']) {
      expect(message(zInt('latency-ns'), bad)).toBe("Parameter 'latency-ns' expects a number");
    }
    expect(message(zInt('v'), 1.5)).toBe("Parameter 'v' expects a number");
    expect(message(zInt('v'), '18446744073709551616')).toBe("Value '18446744073709551616' is too large for parameter 'v'");
    expect(message(zInt('v', { min: 1, max: 255 }), '0')).toBe("Parameter 'v' expects an integer between 1 and 255");
  });

  it('zSize reads sizes as qemu_strtosz, with QemuOpts\' messages', () => {
    expect(parse(zSize('size'), '1M')).toBe(1 << 20);
    expect(parse(zSize('size'), '1.5k')).toBe(1536);
    expect(parse(zSize('size'), '0x10')).toBe(16);
    expect(parse(zSize('size'), 4096)).toBe(4096);
    const hint = "Parameter 'size' expects a non-negative number below 2^64\nOptional suffix k, M, G, T, P or E means kilo-, mega-, giga-, tera-, peta-\nand exabytes, respectively.";
    expect(message(zSize('size'), 'abc')).toBe(hint);
    expect(message(zSize('size'), '-1')).toBe(hint);
    expect(message(zSize('size'), -1)).toBe(hint);
    expect(message(zSize('size'), '16E')).toBe("Value '16E' is out of range for parameter 'size'");
    expect(message(zSize('size'), '8P')).toBe("Value '8P' is out of range for parameter 'size'");
  });

  it('zEnum takes one of its words', () => {
    expect(parse(zEnum('discard', ['ignore', 'unmap'] as const), 'unmap')).toBe('unmap');
    expect(message(zEnum('discard', ['ignore', 'unmap'] as const), 'foo')).toBe("Parameter 'discard' does not accept value 'foo'");
  });
});

describe('common node options', () => {
  it('requires a driver of type string', () => {
    expect(einval(() => parseBaseOptions({}))).toBe("Parameter 'driver' is required");
    expect(einval(() => parseBaseOptions({ driver: 5 }))).toBe("Invalid parameter type for 'driver', expected: string");
  });

  it('coerces keyval strings of the common keys', () => {
    const { base, rest } = parseBaseOptions({ driver: 'raw', 'read-only': 'on', cache: { 'no-flush': 'yes' }, discard: 'unmap', size: '1M' });
    expect(base).toEqual({ driver: 'raw', 'read-only': true, cache: { 'no-flush': true }, discard: 'unmap' });
    expect(rest).toEqual({ size: '1M' });
  });

  it('checks node names as QEMU does: well-formed first, then shorter than 32 bytes', () => {
    expect(invalidNodeName('a')).toBeNull();
    expect(invalidNodeName('a.b-c_D9')).toBeNull();
    expect(invalidNodeName('a'.repeat(31))).toBeNull();
    expect(invalidNodeName('a'.repeat(32))).toBe('Node name too long');
    expect(invalidNodeName('')).toBe("Invalid node-name: ''");
    expect(invalidNodeName('1abc')).toBe("Invalid node-name: '1abc'");
    expect(invalidNodeName('a b')).toBe("Invalid node-name: 'a b'");
    expect(invalidNodeName('#block001')).toBe("Invalid node-name: '#block001'");
    expect(invalidNodeName(`_${'a'.repeat(40)}`)).toBe(`Invalid node-name: '_${'a'.repeat(40)}'`);
  });

  it('is enforced by the graph, with duplicates refused', async () => {
    const graph = memGraph();
    await expect(graph.openNode({ driver: 'test-mem', 'node-name': 'bad name' })).rejects.toMatchObject({
      code: 'EINVAL', message: "Invalid node-name: 'bad name'",
    });
    await graph.openNode({ driver: 'test-mem', 'node-name': 'disk0' });
    await expect(graph.openNode({ driver: 'test-mem', 'node-name': 'disk0' })).rejects.toMatchObject({
      code: 'EEXIST', message: "Duplicate nodes with node-name='disk0'",
    });
  });
});

describe('unknown keys', () => {
  it('are refused with QEMU\'s message for formats and protocols', async () => {
    const graph = memGraph();
    await expect(graph.openNode({ driver: 'raw', file: { driver: 'test-mem' }, foo: 'x' })).rejects.toMatchObject({
      code: 'EINVAL', message: "Block format 'raw' does not support the option 'foo'",
    });
    await expect(graph.openNode({ driver: 'test-mem', foo: 'x' })).rejects.toMatchObject({
      code: 'EINVAL', message: "Block protocol 'test-mem' doesn't support the option 'foo'",
    });
    await expect(graph.openNode({ driver: 'raw', file: { driver: 'file', filename: '/nonexistent', bar: '1' } })).rejects.toMatchObject({
      code: 'EINVAL', message: "Block protocol 'file' doesn't support the option 'bar'",
    });
    expect(graph.nodes.size).toBe(0);
  });

  it('coerce driver options from keyval strings', async () => {
    const graph = memGraph();
    const node = await graph.openNode(parseKeyval('driver=raw,offset=1k,size=2k,file.driver=test-mem,file.size=4k'));
    expect(node.totalBytes).toBe(2048);
    await expect(graph.openNode(parseKeyval('driver=raw,size=1x,file.driver=test-mem'))).rejects.toMatchObject({
      code: 'EINVAL', message: expect.stringMatching(/^Parameter 'size' expects a non-negative number below 2\^64/),
    });
  });
});
