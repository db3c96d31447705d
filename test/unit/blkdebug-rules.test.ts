/*
 * blkdebug's error-injection rules: the state machine on its own (which
 * rules an event arms, set-state transitions, sector and iotype matching,
 * `once`), the option and config-file parsing with QEMU's messages, and the
 * driver in a graph: raw and qcow2 fire their debug events on a blkdebug
 * file, the gate fires flush events, `immediately` fails before the next
 * turn of the event loop and the default after it.
 */
import fs from 'node:fs';
import path from 'node:path';
import { describe, expect, it } from 'vitest';
import { BlockBackend } from '../../block/backend.js';
import { createImage } from '../../block/create.js';
import { BlockError } from '../../block/errors.js';
import type { BlockGraph } from '../../block/graph.js';
import { BlkdebugRules, readRules, parseConfigFile, type BlkdebugRule, type InjectErrorRule } from '../../drivers/blkdebug-rules.js';
import { testGraph } from '../helpers/graphs.js';
import { scratchDir } from '../helpers/tmp.js';

const KiB = 1024;
const dir = scratchDir('qbt-blkdebug-');

function inject(event: InjectErrorRule['event'], more: Partial<InjectErrorRule> = {}): InjectErrorRule {
  return { action: 'inject-error', event, state: 0, errno: 5, once: false, immediately: false, offsetBytes: -1, ioMask: 0b11111, ...more };
}

const setState = (event: BlkdebugRule['event'], state: number, newState: number): BlkdebugRule => ({ action: 'set-state', event, state, newState });

describe('blkdebug rules: state machine', () => {
  it('arms nothing until the rule\'s event fires', () => {
    const r = new BlkdebugRules([inject('write_aio')]);
    expect(r.check(0, 512, 'write')).toBeNull();
    r.event('read_aio');
    expect(r.check(0, 512, 'write')).toBeNull();
    r.event('write_aio');
    expect(r.check(0, 512, 'write')).toMatchObject({ errno: 5 });
    expect(r.check(0, 512, 'read')).toMatchObject({ errno: 5 });
  });

  it('matches a sector inside the request only, and never a zero-length request', () => {
    const r = new BlkdebugRules([inject('none', { offsetBytes: 8 * 512 })]);
    r.event('none');
    expect(r.check(0, 8 * 512, 'write')).toBeNull();
    expect(r.check(0, 8 * 512 + 1, 'write')).not.toBeNull();
    expect(r.check(8 * 512, 1, 'read')).not.toBeNull();
    expect(r.check(8 * 512 + 1, 512, 'read')).toBeNull();
    expect(r.check(0, 0, 'flush')).toBeNull();
  });

  it('uses the iotype mask: by default everything but block-status', () => {
    const r = new BlkdebugRules([inject('none', { ioMask: 0b11111 })]);
    r.event('none');
    for (const t of ['read', 'write', 'write-zeroes', 'discard', 'flush'] as const) expect(r.check(0, 512, t)).not.toBeNull();
    expect(r.check(0, 512, 'block-status')).toBeNull();
    const flushOnly = new BlkdebugRules([inject('none', { ioMask: 1 << 4 })]);
    flushOnly.event('none');
    expect(flushOnly.check(0, 512, 'write')).toBeNull();
    expect(flushOnly.check(0, 0, 'flush')).not.toBeNull();
  });

  it('deletes a once rule after its first hit, for good', () => {
    const r = new BlkdebugRules([inject('write_aio', { once: true })]);
    r.event('write_aio');
    expect(r.check(0, 512, 'write')).not.toBeNull();
    expect(r.check(0, 512, 'write')).toBeNull();
    r.event('write_aio');
    expect(r.check(0, 512, 'write')).toBeNull();
  });

  it('picks the first matching active rule in the order given; errno 0 lets the request through', () => {
    const r = new BlkdebugRules([inject('none', { errno: 0, offsetBytes: 0 }), inject('none', { errno: 28 })]);
    r.event('none');
    expect(r.check(0, 512, 'write')).toBeNull();
    expect(r.check(512, 512, 'write')).toMatchObject({ errno: 28 });
  });

  it('replaces the active rules when another event arms some, keeps them otherwise', () => {
    const r = new BlkdebugRules([inject('read_aio', { errno: 5 }), inject('write_aio', { errno: 28 })]);
    r.event('read_aio');
    r.event('l2_load');
    expect(r.check(0, 512, 'read')).toMatchObject({ errno: 5 });
    r.event('write_aio');
    expect(r.check(0, 512, 'read')).toMatchObject({ errno: 28 });
  });

  it('moves between states; rules see the state from before the event', () => {
    const r = new BlkdebugRules([
      inject('read_aio', { state: 2 }),
      setState('write_aio', 1, 2),
      setState('write_aio', 2, 3),
    ]);
    expect(r.state).toBe(1);
    r.event('read_aio');
    expect(r.check(0, 512, 'read')).toBeNull();
    r.event('write_aio');
    expect(r.state).toBe(2);
    r.event('read_aio');
    expect(r.check(0, 512, 'read')).not.toBeNull();
    r.event('write_aio');
    expect(r.state).toBe(3);
  });

  it('lets the first-given set-state rule win when several match', () => {
    const r = new BlkdebugRules([setState('write_aio', 0, 7), setState('write_aio', 1, 9)]);
    r.event('write_aio');
    expect(r.state).toBe(7);
  });
});

describe('blkdebug rules: options and config file', () => {
  const reason = (p: Promise<unknown>) => p.then(() => 'ok', (e: BlockError) => e.message);

  it('builds rules with QEMU\'s defaults (errno EIO, any sector, iotype mask without block-status)', async () => {
    const [rule] = await readRules(undefined, { 'inject-error': [{ event: 'write_aio' }] });
    expect(rule).toEqual(inject('write_aio', { ioMask: 0b11111 }));
    const [one] = await readRules(undefined, { 'inject-error': { event: 'read_aio', iotype: 'block-status', sector: '3', once: 'on', errno: '0x1c' } });
    expect(one).toMatchObject({ event: 'read_aio', ioMask: 1 << 5, offsetBytes: 3 * 512, once: true, errno: 28 });
  });

  it('refuses bad rules with QemuOpts\' and blkdebug\'s messages', async () => {
    expect(await reason(readRules(undefined, { 'inject-error': [{}] }))).toBe('Missing event name for rule');
    expect(await reason(readRules(undefined, { 'inject-error': [{ event: 'foo' }] }))).toBe('invalid parameter value: foo');
    expect(await reason(readRules(undefined, { 'inject-error': [{ event: 'none', iotype: 'x' }] }))).toBe('invalid parameter value: x');
    expect(await reason(readRules(undefined, { 'inject-error': [{ event: 'none', errno: 'x' }] }))).toBe("Parameter 'errno' expects a number");
    expect(await reason(readRules(undefined, { 'inject-error': [{ event: 'none', once: 'maybe' }] }))).toBe("Parameter 'once' expects 'on' or 'off'");
    expect(await reason(readRules(undefined, { 'set-state': [{ event: 'none', bogus: 1 }] }))).toBe("[set-state] section doesn't support the option 'bogus'");
    expect(await reason(readRules(path.join(dir, 'missing.ini'), {}))).toBe('Could not read blkdebug config file: No such file or directory');
  });

  it('parses the ini syntax of qemu_config_parse', () => {
    const text = '# comment\n\n[inject-error]\n  event   =   "read_aio"\nerrno = "28"\n[set-state "s"]\nevent = "write_aio"\nnew_state = "2"\n';
    expect(parseConfigFile(text)).toEqual([
      { group: 'inject-error', typed: { event: 'read_aio', errno: 28 } },
      { group: 'set-state', typed: { event: 'write_aio', new_state: 2 } },
    ]);
    const fails = (t: string) => (() => parseConfigFile(t));
    expect(fails('[foo]\nevent = "x"\n')).toThrow("There is no option group 'foo'");
    expect(fails('event = "x"\n')).toThrow('no group defined');
    expect(fails('[inject-error]\n \n')).toThrow('parse error');
    expect(fails('[inject-error]\nevent="x"\n')).toThrow("Invalid parameter 'event=\"x\"'");
    expect(fails('[set-state "a"]\n[set-state "a"]\n')).toThrow("Duplicate ID 'a' for set-state");
    expect(parseConfigFile('[inject-error]\nevent = unquoted\n')).toEqual([{ group: 'inject-error', typed: { event: '' } }]);
  });

  it('takes config-file rules before option rules', async () => {
    const config = path.join(dir, 'rules.ini');
    fs.writeFileSync(config, '[inject-error]\nevent = "none"\nerrno = "28"\n');
    const rules = await readRules(config, { 'inject-error': [{ event: 'none', errno: 5 }] });
    expect(rules.map((r) => (r as InjectErrorRule).errno)).toEqual([28, 5]);
  });
});

/** raw over blkdebug over a 1 MiB file, with the given blkdebug options. */
async function rawOverBlkdebug(graph: BlockGraph, name: string, blkdebug: Record<string, unknown>): Promise<BlockBackend> {
  const filename = path.join(dir, name);
  await createImage(graph, { format: 'raw', filename, sizeBytes: 1024 * KiB, options: [] });
  const node = await graph.openNode({ driver: 'raw', file: { driver: 'blkdebug', ...blkdebug, image: { driver: 'file', filename } } });
  return new BlockBackend(graph, node, { writable: true });
}

const code = (p: Promise<unknown>) => p.then(() => 'ok', (e: BlockError) => e.code);

describe('blkdebug in a graph', () => {
  it('fails raw writes after raw fired write_aio, with the rule\'s errno; sector ranges and once hold', async () => {
    const graph = testGraph();
    const blk = await rawOverBlkdebug(graph, 'a.raw', { 'inject-error': [{ event: 'write_aio', errno: 28, sector: 16, once: true }] });
    expect(await code(blk.pwrite(0, new Uint8Array(4 * KiB)))).toBe('ok');
    expect(await code(blk.pwrite(4 * KiB, new Uint8Array(4 * KiB)))).toBe('ok');
    expect(await code(blk.pwrite(8 * KiB, new Uint8Array(4 * KiB)))).toBe('ENOSPC');
    expect(await code(blk.pwrite(8 * KiB, new Uint8Array(4 * KiB)))).toBe('ok');
  });

  it('fires none when the node opens', async () => {
    const graph = testGraph();
    const blk = await rawOverBlkdebug(graph, 'b.raw', { 'inject-error': [{ event: 'none', iotype: 'read' }] });
    expect(await code(blk.pread(0, new Uint8Array(512)))).toBe('EIO');
    expect(await code(blk.pwrite(0, new Uint8Array(512)))).toBe('ok');
  });

  it('fails a flush after the gate fired flush_to_disk on the format\'s file', async () => {
    const graph = testGraph();
    const blk = await rawOverBlkdebug(graph, 'c.raw', { 'inject-error': [{ event: 'flush_to_disk', iotype: 'flush' }] });
    await blk.pwrite(0, new Uint8Array(512));
    expect(await code(blk.flush())).toBe('EIO');
  });

  it('fails an injected request before the next event-loop turn only with immediately', async () => {
    const order = async (immediately: boolean) => {
      const graph = testGraph();
      const blk = await rawOverBlkdebug(graph, `d${immediately}.raw`, { 'inject-error': [{ event: 'none', iotype: 'read', immediately }] });
      const seen: string[] = [];
      await blk.pread(0, new Uint8Array(512)).catch(() => undefined);
      const failed = blk.pread(0, new Uint8Array(512)).catch(() => seen.push('failed'));
      setImmediate(() => seen.push('turn'));
      await failed;
      await new Promise((r) => setImmediate(r));
      return seen;
    };
    expect(await order(true)).toEqual(['failed', 'turn']);
    expect(await order(false)).toEqual(['turn', 'failed']);
  });

  it('sees qcow2\'s metadata events: cluster_alloc fails allocating writes, not in-place ones', async () => {
    const graph = testGraph();
    const filename = path.join(dir, 'e.qcow2');
    await createImage(graph, { format: 'qcow2', filename, sizeBytes: 4096 * KiB, options: [] });
    const plain = await graph.openNode({ driver: 'qcow2', file: { driver: 'file', filename } });
    await new BlockBackend(graph, plain, { writable: true }).pwrite(0, new Uint8Array(64 * KiB).fill(1));
    await graph.closeAll();
    const node = await graph.openNode({
      driver: 'qcow2',
      file: { driver: 'blkdebug', 'inject-error': [{ event: 'cluster_alloc' }], image: { driver: 'file', filename } },
    });
    const blk = new BlockBackend(graph, node, { writable: true });
    expect(await code(blk.pwrite(0, new Uint8Array(4 * KiB).fill(2)))).toBe('ok');
    expect(await code(blk.pwrite(1024 * KiB, new Uint8Array(64 * KiB).fill(3)))).toBe('EIO');
  });
});
