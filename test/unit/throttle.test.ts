/*
 * Throttling on a manual clock: leaky-bucket arithmetic (rates, bursts,
 * burst length, iops-size, total vs read/write), validation texts (checked
 * against qemu-storage-daemon 7.2), throttle groups (shared budget, FIFO
 * per member, round robin, drain), `throttle-group` object properties, the
 * throttle filter and block_set_io_throttle.
 */
import { describe, expect, it } from 'vitest';
import { BlockBackend } from '../../block/backend.js';
import {
  Bucket, READ, WRITE, ThrottleState, configToLimits, emptyThrottleConfig, invalidThrottleConfig, limitsToConfig,
  type ThrottleLimits,
} from '../../block/throttle.js';
import { ManualThrottleClock } from '../../block/throttle-clock.js';
import { ThrottleGroups, throttleGroupsOf } from '../../block/throttle-group.js';
import { throttleConfigFromProps } from '../../block/throttle-object.js';
import { throttleCommands, type ThrottleCommandContext } from '../../qmp/commands-throttle.js';
import { QmpError } from '../../qmp/command.js';
import { testGraph } from '../helpers/graphs.js';
import { ObjectRegistry } from '../../block/objects.js';

const cfgOf = (limits: ThrottleLimits) => limitsToConfig(limits);
const reasonOf = (limits: ThrottleLimits) => {
  try {
    limitsToConfig(limits);
    return null;
  } catch (e) {
    return (e as Error).message;
  }
};

describe('ThrottleState (leaky buckets)', () => {
  it('lets a request go while the bucket holds at most avg/10, then waits overflow/avg', () => {
    const ts = new ThrottleState(0, cfgOf({ 'bps-total': 1000 }));
    expect(ts.waitMs(READ, 0)).toBe(0);
    ts.account(READ, 1000);
    // level 1000, burst allowance 100: 900 bytes over at 1000 B/s.
    expect(ts.waitMs(READ, 0)).toBeCloseTo(900, 6);
    expect(ts.waitMs(WRITE, 400)).toBeCloseTo(500, 6);
    expect(ts.waitMs(READ, 900)).toBe(0);
  });

  it('bursts up to max × burst length, paced at max by the burst level', () => {
    const ts = new ThrottleState(0, cfgOf({ 'bps-total': 1000, 'bps-total-max': 5000, 'bps-total-max-length': 2 }));
    ts.account(WRITE, 4000);
    // Bucket has room (4000 <= 10000) but the burst level is 3500 over max/10 at 5000 B/s.
    expect(ts.waitMs(WRITE, 0)).toBeCloseTo(700, 6);
    ts.account(WRITE, 7000);
    // level 11000 > 10000: a full bucket waits 1000 over at avg (the burst level is not consulted then).
    expect(ts.waitMs(WRITE, 0)).toBeCloseTo(1000, 6);
  });

  it('counts iops by iops-size', () => {
    const ts = new ThrottleState(0, cfgOf({ 'iops-total': 10, 'iops-size': 4096 }));
    ts.account(READ, 16384);
    expect(ts.level(Bucket.OPS_TOTAL)).toBe(4);
    ts.account(READ, 512);
    expect(ts.level(Bucket.OPS_TOTAL)).toBe(5);
    // 5 ops, allowance 1, at 10/s: 400 ms.
    expect(ts.waitMs(READ, 0)).toBeCloseTo(400, 6);
  });

  it('throttles a direction by its own bucket and both by the total', () => {
    const ts = new ThrottleState(0, cfgOf({ 'bps-read': 1000 }));
    ts.account(READ, 5000);
    expect(ts.waitMs(READ, 0)).toBeGreaterThan(0);
    expect(ts.waitMs(WRITE, 0)).toBe(0);
    const total = new ThrottleState(0, cfgOf({ 'iops-total': 1 }));
    total.account(READ, 1);
    total.account(READ, 1);
    expect(total.waitMs(WRITE, 0)).toBeCloseTo(1900, 6);
  });

  it('rounds waits to whole nanoseconds', () => {
    const ts = new ThrottleState(0, cfgOf({ 'bps-total': 3 }));
    ts.account(READ, 1);
    expect(ts.waitMs(READ, 0)).toBe(Math.trunc(((1 - 0.3) * 1e9) / 3) / 1e6);
  });
});

describe('validation (QEMU 7.2 texts)', () => {
  it.each([
    [{ 'bps-total': 5, 'bps-read': 3 }, 'bps/iops/max total values and read/write values cannot be used at the same time'],
    [{ 'iops-total-max': 5, 'iops-write-max': 5, 'iops-total': 1, 'iops-write': 0 }, 'bps/iops/max total values and read/write values cannot be used at the same time'],
    [{ 'bps-total-max': 5 }, 'bps_max/iops_max require corresponding bps/iops values'],
    [{ 'bps-total': 10, 'bps-total-max': 5 }, 'bps_max/iops_max cannot be lower than bps/iops'],
    [{ 'bps-total': 10, 'bps-total-max-length': 5 }, 'burst length set without burst rate'],
    [{ 'iops-size': 5 }, 'iops size requires an iops value to be set'],
    [{ 'bps-total': -5 }, 'bps/iops/max values must be within [0, 1000000000000000]'],
    [{ 'bps-total': 1e15 + 1 }, 'bps/iops/max values must be within [0, 1000000000000000]'],
    [{ 'bps-total': 10, 'bps-total-max': 20, 'bps-total-max-length': 0 }, 'the burst length cannot be 0'],
    [{ 'bps-total': 10, 'bps-total-max': 20, 'bps-total-max-length': 2 ** 32 }, 'bps-total-max-length value must be in the range [0, 4294967295]'],
  ])('%j -> %s', (limits, message) => {
    expect(reasonOf(limits)).toBe(message);
  });

  it('accepts a valid configuration and reports it back as ThrottleLimits', () => {
    const cfg = cfgOf({ 'bps-read': 100, 'bps-read-max': 200, 'bps-read-max-length': 3, 'iops-total': 7, 'iops-size': 4096 });
    expect(invalidThrottleConfig(cfg)).toBeNull();
    const limits = configToLimits(cfg);
    expect(limits).toMatchObject({ 'bps-read': 100, 'bps-read-max': 200, 'bps-read-max-length': 3, 'iops-total': 7, 'iops-size': 4096, 'bps-total-max-length': 1 });
    expect(Object.keys(limits)).toHaveLength(19);
  });
});

describe('throttle-group object properties', () => {
  const propsError = (props: Record<string, unknown>) => {
    try {
      throttleConfigFromProps(props);
      return null;
    } catch (e) {
      return (e as Error).message;
    }
  };

  it.each([
    // Each case was run through qemu-storage-daemon 7.2 --object / object-add.
    [{ 'x-bps-total': 'abc', 'x-iops-total': 'zz' }, "Parameter 'x-iops-total' expects integer"],
    [{ limits: { 'bps-total': '1k' } }, "Parameter 'limits.bps-total' expects integer"],
    [{ 'x-bps-total': 1.5 }, "Invalid parameter type for 'x-bps-total', expected: integer"],
    [{ foo: '1' }, "Parameter 'foo' is unexpected"],
    [{ limits: { foo: '1' } }, "Parameter 'limits.foo' is unexpected"],
    [{ 'x-bps-total': '-1', 'x-iops-total': '-2' }, 'Property values cannot be negative'],
    [{ 'x-bps-total-max-length': '4294967296' }, 'x-bps-total-max-length value must be in therange [0, 4294967295]'],
    [{ limits: { 'bps-total-max-length': 4294967296 } }, 'bps-total-max-length value must be in the range [0, 4294967295]'],
    [{ limits: { 'bps-total': -1 } }, 'bps/iops/max values must be within [0, 1000000000000000]'],
    [{ 'x-bps-total': '100', limits: { 'bps-total-max': '50' } }, 'bps_max/iops_max require corresponding bps/iops values'],
    [{ limits: { 'bps-read': '10' }, 'x-bps-read': '20', 'x-bps-read-max': '15' }, 'bps_max/iops_max cannot be lower than bps/iops'],
    [{ 'x-iops-size': '5' }, 'iops size requires an iops value to be set'],
  ])('%j -> %s', (props, message) => {
    expect(propsError(props)).toBe(message);
  });

  it('applies properties in QEMU QDict order (x-iops-total before limits, x-iops-total-max after)', () => {
    const cfg = throttleConfigFromProps({ 'x-iops-total': '20', limits: { 'iops-total': '10' }, 'x-iops-total-max': '15' });
    expect(configToLimits(cfg)).toMatchObject({ 'iops-total': 10, 'iops-total-max': 15 });
    expect(configToLimits(throttleConfigFromProps({ 'x-bps-total': '0x10' }))['bps-total']).toBe(16);
  });
});

describe('qemu-img --object throttle-group', () => {
  it('checks the properties as qemu-img 7.2 does', () => {
    expect(() => new ObjectRegistry().add('throttle-group,id=g,x-bps-total=abc')).toThrow("Parameter 'x-bps-total' expects integer");
    expect(() => new ObjectRegistry().add('throttle-group,id=g,limits.bps-total=5,limits.bps-read=1')).toThrow(
      'bps/iops/max total values and read/write values cannot be used at the same time',
    );
    expect(new ObjectRegistry().add('throttle-group,id=g,limits.bps-total=5')).toBeNull();
  });
});

describe('ThrottleGroups', () => {
  it('creates objects once, refuses duplicates and deleting a group in use', async () => {
    const groups = new ThrottleGroups(new ManualThrottleClock());
    groups.createObject('g', { limits: { 'bps-total': 10 } });
    expect(() => groups.createObject('g', {})).toThrow('A group with this name already exists');
    const m = groups.join('g');
    expect(() => groups.deleteObject('g')).toThrow("object 'g' is in use, can not be deleted");
    await groups.leave(m);
    groups.deleteObject('g');
    expect(groups.find('g')).toBeUndefined();
  });

  it('creates implicit groups on join and drops them with their last member', async () => {
    const groups = new ThrottleGroups(new ManualThrottleClock());
    const a = groups.join('dev');
    const b = groups.join('dev');
    expect(a.group).toBe(b.group);
    await groups.leave(a);
    expect(groups.find('dev')).toBe(b.group);
    await groups.leave(b);
    expect(groups.find('dev')).toBeUndefined();
  });

  it('creates a group from a pending --object specification', () => {
    const objects = new Map([['tg', { qomType: 'throttle-group', props: { 'x-bps-total': '1000' } }]]);
    const groups = new ThrottleGroups(new ManualThrottleClock(), () => objects);
    expect(configToLimits(groups.find('tg')!.config())['bps-total']).toBe(1000);
    expect(groups.find('other')).toBeUndefined();
  });
});

/** Starts `n` requests of `bytes` on `member`, recording the order they go in. */
function launch(member: { intercept(b: number, w: boolean): Promise<void> }, tag: string, n: number, bytes: number, order: string[], isWrite = false) {
  return Array.from({ length: n }, (_, i) => member.intercept(bytes, isWrite).then(() => order.push(`${tag}${i}`)));
}

/** A manual clock, a registry and one member of group `g` with `limits`. */
function oneMember(limits: ThrottleLimits) {
  const clock = new ManualThrottleClock();
  const groups = new ThrottleGroups(clock);
  groups.createObject('g', { limits });
  return { clock, groups, m: groups.join('g') };
}

describe('throttle group scheduling', () => {
  it('keeps the rate: 10 requests of 100 bytes at 100 B/s take ~9 s', async () => {
    const { clock, m } = oneMember({ 'bps-total': 100 });
    const order: string[] = [];
    const all = Promise.all(launch(m, 'r', 10, 100, order));
    await clock.advance(0);
    expect(order).toEqual(['r0']);
    await clock.advance(4500);
    expect(order.length).toBeGreaterThanOrEqual(5);
    expect(order.length).toBeLessThanOrEqual(6);
    await clock.advance(5000);
    await all;
    expect(order).toEqual(Array.from({ length: 10 }, (_, i) => `r${i}`));
  });

  it('shares one budget between members and alternates between them (round robin)', async () => {
    const clock = new ManualThrottleClock();
    const groups = new ThrottleGroups(clock);
    groups.createObject('g', { limits: { 'iops-total': 10 } });
    const a = groups.join('g');
    const b = groups.join('g');
    const order: string[] = [];
    const all = Promise.all([...launch(a, 'a', 4, 1, order), ...launch(b, 'b', 4, 1, order)]);
    await clock.advance(1000);
    await all;
    expect(order).toHaveLength(8);
    // FIFO within a member.
    expect(order.filter((t) => t.startsWith('a'))).toEqual(['a0', 'a1', 'a2', 'a3']);
    expect(order.filter((t) => t.startsWith('b'))).toEqual(['b0', 'b1', 'b2', 'b3']);
    // Turns alternate once both have requests queued.
    const turns = order.slice(2, 6).map((t) => t[0]);
    for (let i = 1; i < turns.length; i++) expect(turns[i]).not.toBe(turns[i - 1]);
    expect(clock.nowMs()).toBe(1000);
  });

  it('keeps reads and writes in separate queues', async () => {
    const { clock, m } = oneMember({ 'bps-read': 100 });
    const order: string[] = [];
    const reads = Promise.all(launch(m, 'r', 3, 100, order));
    const writes = Promise.all(launch(m, 'w', 3, 100, order, true));
    await clock.advance(0);
    await writes;
    expect(order.filter((t) => t.startsWith('w'))).toHaveLength(3);
    expect(order.filter((t) => t.startsWith('r'))).toEqual(['r0']);
    await clock.advance(2000);
    await reads;
  });

  it('lets queued requests go at once during a drain', async () => {
    const { clock, m } = oneMember({ 'bps-total': 1 });
    const order: string[] = [];
    const all = Promise.all(launch(m, 'r', 3, 1000, order));
    await clock.advance(0);
    expect(order).toEqual(['r0']);
    m.drainedBegin();
    await clock.advance(0);
    await all;
    expect(order).toEqual(['r0', 'r1', 'r2']);
    m.drainedEnd();
    expect(clock.nowMs()).toBe(0);
  });

  it('restarts queues when the group is reconfigured', async () => {
    const clock = new ManualThrottleClock();
    const groups = new ThrottleGroups(clock);
    const g = groups.createObject('g', { limits: { 'bps-total': 1 } });
    const order: string[] = [];
    const all = Promise.all(launch(g.register(), 'r', 2, 1000, order));
    await clock.advance(0);
    expect(order).toEqual(['r0']);
    g.configure(emptyThrottleConfig());
    await clock.advance(0);
    await all;
    expect(order).toEqual(['r0', 'r1']);
  });
});

describe('throttle filter driver', () => {
  it('needs an existing group, with QEMU messages', async () => {
    const graph = testGraph();
    await graph.openNode({ driver: 'null-co', 'node-name': 'n0', size: 1 << 20 });
    await expect(graph.openNode({ driver: 'throttle', file: 'n0' })).rejects.toThrow("Parameter 'throttle-group' is missing");
    await expect(graph.openNode({ driver: 'throttle', file: 'n0', 'throttle-group': 'nope' })).rejects.toThrow(
      "Throttle group 'nope' does not exist",
    );
  });

  it('passes data through and delays requests by the group', async () => {
    const graph = testGraph();
    const clock = new ManualThrottleClock();
    throttleGroupsOf(graph, clock).createObject('tg', { limits: { 'bps-write': 4096 } });
    const node = await graph.openNode({
      driver: 'throttle', 'node-name': 't', 'throttle-group': 'tg',
      file: { driver: 'null-co', size: 1 << 20, 'read-zeroes': true },
    });
    expect(node.driver.isFilter).toBe(true);
    expect(node.totalBytes).toBe(1 << 20);
    const blk = new BlockBackend(graph, node, { writable: true });
    let done = 0;
    const writes = [0, 1, 2].map((i) => blk.pwrite(i * 4096, new Uint8Array(4096).fill(1)).then(() => done++));
    await clock.advance(0);
    expect(done).toBe(1);
    const buf = new Uint8Array(8).fill(7);
    await blk.pread(0, buf); // reads are not limited
    expect([...buf]).toEqual([0, 0, 0, 0, 0, 0, 0, 0]);
    await clock.advance(2000);
    await Promise.all(writes);
    await blk.flush();
    await blk.close();
    // Closing the node leaves the group, which can then be deleted.
    expect(() => throttleGroupsOf(graph).deleteObject('tg')).not.toThrow();
  });
});

describe('block_set_io_throttle', () => {
  const command = throttleCommands.find((c) => c.name === 'block_set_io_throttle')!;
  const zeroes = { bps: 0, bps_rd: 0, bps_wr: 0, iops: 0, iops_rd: 0, iops_wr: 0 };

  async function setup() {
    const graph = testGraph();
    throttleGroupsOf(graph, new ManualThrottleClock());
    const node = await graph.openNode({ driver: 'null-co', 'node-name': 'n0', size: 1 << 20 });
    const blk = new BlockBackend(graph, node, { writable: true });
    const ctx: ThrottleCommandContext = { graph, findBackendForThrottle: (name) => (name === 'exp' ? blk : undefined) };
    const run = (args: Record<string, unknown>) => command.run(ctx, command.args.parse(args));
    return { graph, blk, run };
  }

  async function qmpError(p: unknown): Promise<{ cls: string; desc: string }> {
    try {
      await p;
    } catch (e) {
      if (e instanceof QmpError) return { cls: e.errorClass, desc: e.message };
      throw e;
    }
    throw new Error('no error');
  }

  it('addresses one device or id, with QEMU errors', async () => {
    const { run } = await setup();
    expect(await qmpError(run({ ...zeroes }))).toEqual({ cls: 'GenericError', desc: "Need exactly one of 'device' and 'id'" });
    expect(await qmpError(run({ ...zeroes, device: 'exp', id: 'exp' }))).toEqual({
      cls: 'GenericError', desc: "Need exactly one of 'device' and 'id'",
    });
    expect(await qmpError(run({ ...zeroes, device: 'x' }))).toEqual({ cls: 'DeviceNotFound', desc: "Device 'x' not found" });
    expect(await qmpError(run({ ...zeroes, id: 'exp', bps: 5, bps_rd: 3 }))).toEqual({
      cls: 'GenericError', desc: 'bps/iops/max total values and read/write values cannot be used at the same time',
    });
    expect(await qmpError(run({ ...zeroes, id: 'exp', bps: 5, bps_max: 2 }))).toEqual({
      cls: 'GenericError', desc: 'bps_max/iops_max cannot be lower than bps/iops',
    });
    expect(() => command.args.parse({ ...zeroes, device: 'exp', bogus: 1 })).toThrow();
  });

  it('throttles the backend, moves it between groups and removes the limits', async () => {
    const { graph, blk, run } = await setup();
    expect(await run({ ...zeroes, device: 'exp', bps: 1000, bps_max: 2000, bps_max_length: 3, iops_rd: 5, iops_size: 512 })).toEqual({});
    const groups = throttleGroupsOf(graph);
    const first = groups.find('exp')!;
    expect(blk.throttle).not.toBeNull();
    expect(configToLimits(first.config())).toMatchObject({ 'bps-total': 1000, 'bps-total-max': 2000, 'bps-total-max-length': 3, 'iops-read': 5, 'iops-size': 512 });
    await run({ ...zeroes, id: 'exp', bps_wr: 10, group: 'shared' });
    expect(groups.find('exp')).toBeUndefined();
    expect(configToLimits(groups.find('shared')!.config())['bps-write']).toBe(10);
    await run({ ...zeroes, id: 'exp' });
    expect(blk.throttle).toBeNull();
    expect(groups.find('shared')).toBeUndefined();
  });

  it('releases queued requests when the limits are removed', async () => {
    const { blk, run } = await setup();
    await run({ ...zeroes, device: 'exp', bps_wr: 1 });
    let done = 0;
    const writes = [0, 1, 2].map(() => blk.pwrite(0, new Uint8Array(4096)).then(() => done++));
    await new Promise((r) => setImmediate(r));
    expect(done).toBe(1);
    await run({ ...zeroes, device: 'exp' });
    await Promise.all(writes);
    expect(done).toBe(3);
  });
});
