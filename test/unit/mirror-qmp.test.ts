/*
 * blockdev-mirror and drive-mirror as QMP commands (schema and handler,
 * no daemon): QEMU's refusals and texts, drive-mirror's image creation
 * (backing by sync mode), and a mirror driven to completion.
 */
import fs from 'node:fs';
import path from 'node:path';
import { describe, expect, it } from 'vitest';
import { BlockBackend } from '../../block/backend.js';
import type { BlockNode } from '../../block/node.js';
import { mirrorCommands, type MirrorCommandContext } from '../../qmp/commands-mirror.js';
import { QmpError } from '../../qmp/command.js';
import { storedBackingName } from '../../block/chain.js';
import { testGraph } from '../helpers/graphs.js';
import { scratchDir } from '../helpers/tmp.js';
import { finished, jobWorld } from '../helpers/mirror-setup.js';

const MiB = 1024 * 1024;
const dir = scratchDir('qbt-mirror-qmp-');

function command(name: string) {
  return mirrorCommands.find((c) => c.name === name)!;
}

/** Parses and runs a command; returns its result or the QMP error as {class, desc}. */
async function exec(ctx: MirrorCommandContext, name: string, args: Record<string, unknown>): Promise<unknown> {
  const c = command(name);
  try {
    return await c.run(ctx, c.args.parse(args));
  } catch (e) {
    if (e instanceof QmpError) return { class: e.errorClass, desc: e.message };
    throw e;
  }
}

async function setup() {
  const w = jobWorld(testGraph());
  const file = path.join(dir, `src${Math.random().toString(36).slice(2)}.qcow2`);
  await w.graph.createImage('qcow2', file, new Map([['size', String(4 * MiB)]]));
  const src = await w.graph.openImage(file, { format: 'qcow2', options: { 'node-name': 'src' } });
  src.userOwned = true;
  const user = new BlockBackend(w.graph, src, { name: 'guest', writable: true });
  await user.pwrite(MiB, new Uint8Array(65536).fill(7));
  return { w, src, user, file };
}

describe('blockdev-mirror', () => {
  it('refuses what QEMU refuses, with its texts', async () => {
    const { w, user } = await setup();
    const tgt = await w.graph.openNode({ driver: 'null-co', 'node-name': 'tgt', size: 4 * MiB });
    tgt.userOwned = true;
    const base = { 'job-id': 'j', device: 'src', target: 'tgt', sync: 'full' };
    expect(await exec(w, 'blockdev-mirror', { ...base, device: 'nope' })).toEqual({
      class: 'GenericError',
      desc: "Cannot find device='nope' nor node-name='nope'",
    });
    expect(await exec(w, 'blockdev-mirror', { ...base, target: 'nope' })).toEqual({
      class: 'GenericError',
      desc: "Cannot find device='nope' nor node-name='nope'",
    });
    expect(await exec(w, 'blockdev-mirror', { ...base, granularity: 1000 })).toEqual({
      class: 'GenericError',
      desc: "Parameter 'granularity' expects a power of 2",
    });
    expect(await exec(w, 'blockdev-mirror', { ...base, sync: 'bitmap' })).toEqual({
      class: 'GenericError',
      desc: "Sync mode 'bitmap' not supported",
    });
    expect(await exec(w, 'blockdev-mirror', { ...base, 'job-id': undefined })).toEqual({
      class: 'GenericError',
      desc: 'An explicit job ID is required',
    });
    const other = new BlockBackend(w.graph, tgt, {});
    expect(await exec(w, 'blockdev-mirror', base)).toEqual({ class: 'GenericError', desc: 'Cannot mirror to an attached block device' });
    await other.close();
    expect(() => command('blockdev-mirror').args.parse({ ...base, unmap: true })).toThrow();
    expect(w.jobs.list()).toEqual([]);
    expect(user.node.nodeName).toBe('src');
  });

  it('runs a mirror with a named filter; a second mirror of the source is refused (not a root node any more)', async () => {
    const { w, src, user } = await setup();
    const tgt = await w.graph.openNode({ driver: 'null-co', 'node-name': 'tgt', size: 4 * MiB, 'read-zeroes': true });
    tgt.userOwned = true;
    expect(await exec(w, 'blockdev-mirror', { 'job-id': 'j', device: 'src', target: 'tgt', sync: 'full', 'filter-node-name': 'mt', speed: 1 })).toEqual({});
    expect(user.node.nodeName).toBe('mt');
    expect(await exec(w, 'blockdev-mirror', { 'job-id': 'k', device: 'src', target: 'tgt', sync: 'full' })).toEqual({
      class: 'GenericError',
      desc: 'Need a root block node',
    });
    const job = w.jobs.get('j');
    job.cancel(true);
    await finished(job);
    expect(user.node).toBe(src);
    expect(w.graph.nodes.has('mt')).toBe(false);
  });
});

describe('implicit filters', () => {
  it('an unnamed mirror filter gets the next #blockNNN, as QEMU names it', async () => {
    const { w, user } = await setup();
    const tgt = await w.graph.openNode({ driver: 'null-co', 'node-name': 'tgt', size: 4 * MiB, 'read-zeroes': true });
    tgt.userOwned = true;
    expect(await exec(w, 'blockdev-mirror', { 'job-id': 'j', device: 'src', target: 'tgt', sync: 'full', speed: 1 })).toEqual({});
    expect(user.node.nodeName).toMatch(/^#block\d+$/);
    expect(user.node.driver.name).toBe('mirror_top');
    const job = w.jobs.get('j');
    job.cancel(true);
    await finished(job);
  });
});

describe('drive-mirror', () => {
  async function driveMirror(sync: string, extra: Record<string, unknown> = {}) {
    const { w, src, user, file } = await setup();
    const target = `${file}.${sync}.qcow2`;
    const r = await exec(w, 'drive-mirror', { 'job-id': 'd', device: 'src', target, sync, 'node-name': 'dst', ...extra });
    expect(r).toEqual({});
    const job = w.jobs.get('d');
    await w.waitEvent('BLOCK_JOB_READY');
    job.complete();
    await finished(job);
    return { w, src, user, target, node: user.node as BlockNode };
  }

  it('sync full creates a qcow2 without backing at the source size and pivots onto it', async () => {
    const { node, target, user } = await driveMirror('full');
    expect(node.nodeName).toBe('dst');
    expect(storedBackingName(node)).toBe(null);
    expect(node.totalBytes).toBe(4 * MiB);
    const back = new Uint8Array(65536);
    await user.pread(MiB, back);
    expect(back.every((b) => b === 7)).toBe(true);
    expect(fs.existsSync(target)).toBe(true);
  });

  it('sync none creates the target backed by the source', async () => {
    const { node, file } = await (async () => {
      const r = await driveMirror('none');
      return { node: r.node, file: r.src.filename };
    })();
    expect(storedBackingName(node)).toBe(file);
  });

  it('replaces without node-name is refused', async () => {
    const { w, file } = await setup();
    expect(await exec(w, 'drive-mirror', { 'job-id': 'd', device: 'src', target: `${file}.r`, sync: 'full', replaces: 'src' })).toEqual({
      class: 'GenericError',
      desc: 'a node-name must be provided when replacing a named node of the graph',
    });
  });
});
