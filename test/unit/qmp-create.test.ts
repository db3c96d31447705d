/*
 * blockdev-create, object-add and object-del in process, through a
 * Daemon's dispatcher: the create job's life (JOB_STATUS_CHANGE only,
 * concluded until job-dismiss, progress 1/1), images made with each
 * option, errors as the command's answer or as the job's `error` with
 * QEMU 7.2's texts, and the object commands' checks in QEMU's order.
 * test/interop/qsd-ts-create.test.ts compares the same with
 * qemu-storage-daemon.
 */
import fs from 'node:fs';
import path from 'node:path';
import { describe, expect, it } from 'vitest';
import { queryImageInfo } from '../../block/info.js';
import { Daemon } from '../../qmp/daemon.js';
import type { MonitorSession } from '../../qmp/dispatch.js';
import type { JsonValue } from '../../block/json-stream.js';
import { scratchDir } from '../helpers/tmp.js';

const MiB = 1024 * 1024;
const dir = scratchDir('qmp-create-');
let serial = 0;
const fresh = (ext: string) => path.join(dir, `img-${++serial}.${ext}`);

interface Harness {
  d: Daemon;
  events: Array<{ event: string; data?: Record<string, unknown> }>;
  exec(command: string, args?: Record<string, unknown>): Promise<unknown>;
  /** Runs blockdev-create and waits for the job to conclude; returns its query-jobs entry, then dismisses it. */
  create(options: Record<string, unknown>): Promise<Record<string, unknown>>;
}

function harness(): Harness {
  const d = new Daemon();
  const events: Harness['events'] = [];
  d.emit = (event, data) => void events.push({ event, data });
  const session: MonitorSession = { mode: 'command' };
  const exec = async (command: string, args?: Record<string, unknown>) => {
    const input = { execute: command, ...(args ? { arguments: args } : {}) } as unknown as JsonValue;
    const r = (await d.dispatcher.dispatch(d, session, input)) as { return?: unknown; error?: { desc: string } };
    if (r.error) throw new Error(r.error.desc);
    return r.return;
  };
  const create = async (options: Record<string, unknown>) => {
    const id = `job${++serial}`;
    await exec('blockdev-create', { 'job-id': id, options });
    await d.jobs.get(id).whenFinished();
    const info = ((await exec('query-jobs')) as Array<Record<string, unknown>>).find((j) => j.id === id)!;
    await exec('job-dismiss', { id });
    return info;
  };
  return { d, events, exec, create };
}

/** A new empty file added as node `name`. */
async function fileNode(h: Harness, name: string): Promise<string> {
  const filename = fresh('qcow2');
  expect(await h.create({ driver: 'file', filename, size: 0 })).not.toHaveProperty('error');
  await h.exec('blockdev-add', { driver: 'file', filename, 'node-name': name });
  return filename;
}

async function imageInfo(h: Harness, filename: string) {
  const node = await h.d.graph.openImage(filename, { readOnly: true, noBacking: true });
  try {
    return await queryImageInfo(node);
  } finally {
    await h.d.graph.closeNode(node);
  }
}

describe('blockdev-create: the job', () => {
  it('goes created … concluded, stays until job-dismiss, emits no BLOCK_JOB_* event', async () => {
    const h = harness();
    const filename = fresh('raw');
    await h.exec('blockdev-create', { 'job-id': 'c1', options: { driver: 'file', filename, size: MiB } });
    await h.d.jobs.get('c1').whenFinished();
    expect(await h.exec('query-jobs')).toEqual([
      { id: 'c1', type: 'create', status: 'concluded', 'current-progress': 1, 'total-progress': 1 },
    ]);
    await h.exec('job-dismiss', { id: 'c1' });
    expect(await h.exec('query-jobs')).toEqual([]);
    expect(h.events.map((e) => e.data?.status)).toEqual(['created', 'running', 'waiting', 'pending', 'concluded', 'null']);
    expect(h.events.every((e) => e.event === 'JOB_STATUS_CHANGE')).toBe(true);
    expect(fs.statSync(filename).size).toBe(MiB);
  });

  it('reports a failure as the job error after aborting', async () => {
    const h = harness();
    const info = await h.create({ driver: 'file', filename: path.join(dir, 'no', 'such', 'x'), size: 0 });
    expect(info.error).toBe(`Could not create '${path.join(dir, 'no', 'such', 'x')}': No such file or directory`);
    expect(info['current-progress']).toBe(1);
    expect(h.events.map((e) => e.data?.status)).toEqual(['created', 'running', 'aborting', 'concluded', 'null']);
  });

  it("refuses bad commands with QEMU's texts, before any job exists", async () => {
    const h = harness();
    const bad = (options: Record<string, unknown>, id: string | null = 'x') =>
      h.exec('blockdev-create', { ...(id === null ? {} : { 'job-id': id }), options });
    await expect(bad({ driver: 'raw' })).rejects.toThrow(/^Driver does not support blockdev-create$/);
    await expect(bad({ driver: 'raw', size: 1 })).rejects.toThrow("Parameter 'options.size' is unexpected");
    await expect(bad({ driver: 'nope' })).rejects.toThrow("Parameter 'driver' does not accept value 'nope'");
    await expect(bad({ driver: 'vdi', size: 1 })).rejects.toThrow("Block driver 'vdi' not found or not supported");
    await expect(bad({ driver: 'qcow2', file: 'f' })).rejects.toThrow("Parameter 'options.size' is missing");
    await expect(bad({ driver: 'qcow2', file: 'f', size: 1, version: 'v4' })).rejects.toThrow(
      "Parameter 'options.version' does not accept value 'v4'",
    );
    await expect(bad({ driver: 'file', filename: 'f', size: -1 })).rejects.toThrow("Parameter 'options.size' expects uint64");
    await expect(bad({ driver: 'file', filename: 'f', size: 0 }, null)).rejects.toThrow("Parameter 'job-id' is missing");
    await expect(bad({ driver: 'file', filename: 'f', size: 0, bogus: 1 })).rejects.toThrow("Parameter 'options.bogus' is unexpected");
    expect(h.events).toEqual([]);
    await h.exec('blockdev-create', { 'job-id': 'dup', options: { driver: 'file', filename: fresh('raw'), size: 0 } });
    await expect(bad({ driver: 'file', filename: fresh('raw'), size: 0 }, 'dup')).rejects.toThrow("Job ID 'dup' already in use");
  });
});

describe('blockdev-create qcow2', () => {
  it('makes the image the options describe', async () => {
    const h = harness();
    const filename = await fileNode(h, 'f0');
    const info = await h.create({
      driver: 'qcow2', file: 'f0', size: 8 * MiB, 'cluster-size': 4096, 'refcount-bits': 8, 'lazy-refcounts': true,
      'backing-file': 'base.raw', 'backing-fmt': 'raw',
    });
    expect(info).not.toHaveProperty('error');
    await h.exec('blockdev-del', { 'node-name': 'f0' });
    const image = await imageInfo(h, filename);
    expect(image).toMatchObject({ format: 'qcow2', 'virtual-size': 8 * MiB, 'cluster-size': 4096, 'backing-filename': 'base.raw' });
    expect(image['format-specific']).toMatchObject({ data: { compat: '1.1', 'lazy-refcounts': true, 'refcount-bits': 8 } });
  });

  it("refuses to re-create a file a node uses, as QEMU's image locks do", async () => {
    const h = harness();
    const filename = await fileNode(h, 'f2');
    await h.create({ driver: 'qcow2', file: 'f2', size: MiB });
    await h.exec('blockdev-add', { driver: 'qcow2', file: 'f2', 'node-name': 'q2' });
    expect((await h.create({ driver: 'file', filename, size: 0 })).error).toBe('Failed to get "write" lock');
    await h.exec('blockdev-del', { 'node-name': 'q2' });
    expect(await h.create({ driver: 'file', filename, size: 0 })).not.toHaveProperty('error');
    expect(fs.statSync(filename).size).toBe(0);
  });

  it('opens an inline file definition for the job only', async () => {
    const h = harness();
    const filename = fresh('qcow2');
    await h.create({ driver: 'file', filename, size: 0 });
    const info = await h.create({ driver: 'qcow2', file: { driver: 'file', filename }, size: MiB, version: 'v2' });
    expect(info).not.toHaveProperty('error');
    expect([...h.d.graph.nodes.keys()]).toEqual([]);
    expect((await imageInfo(h, filename))['format-specific']).toMatchObject({ data: { compat: '0.10' } });
  });

  it("fails the job with qcow2_co_create's texts", async () => {
    const h = harness();
    await fileNode(h, 'f1');
    const error = async (extra: Record<string, unknown>) => (await h.create({ driver: 'qcow2', file: 'f1', size: MiB, ...extra })).error;
    expect(await error({ 'cluster-size': 1000 })).toBe('Cluster size must be a power of two between 512 and 2048k');
    expect(await error({ size: MiB + 1 })).toBe('Image size must be a multiple of 512 bytes');
    expect(await error({ file: 'nothere' })).toBe("Cannot find device='nothere' nor node-name='nothere'");
    expect(await error({ version: 'v2', 'lazy-refcounts': true })).toBe(
      'Lazy refcounts only supported with compatibility level 1.1 and above (use version=v3 or greater)',
    );
    expect(await error({ 'refcount-bits': 3 })).toBe('Refcount width must be a power of two and may not exceed 64 bits');
    expect(await error({ 'backing-fmt': 'raw' })).toBe('Backing format cannot be used without backing file');
    expect(await error({ 'backing-file': 'b', preallocation: 'metadata' })).toBe(
      'Backing file and preallocation can only be used at the same time if extended_l2 is on',
    );
  });
});

describe('object-add / object-del', () => {
  it("checks in QEMU's order with its texts", async () => {
    const h = harness();
    const add = (args: Record<string, unknown>) => h.exec('object-add', args);
    await add({ 'qom-type': 'throttle-group', id: 'tg0', limits: { 'bps-total': MiB } });
    await expect(add({ 'qom-type': 'throttle-group', id: 'tg0' })).rejects.toThrow(
      "attempt to add duplicate property 'tg0' to object (type 'container')",
    );
    await expect(add({ 'qom-type': 'throttle-group', id: 'tg0', 'x-bps-total': -5 })).rejects.toThrow('Property values cannot be negative');
    await expect(add({ 'qom-type': 'throttle-group', id: 't', limits: { 'bps-total': 'x' } })).rejects.toThrow(
      "Invalid parameter type for 'limits.bps-total', expected: integer",
    );
    await expect(add({ 'qom-type': 'nope', id: 'x' })).rejects.toThrow("Parameter 'qom-type' does not accept value 'nope'");
    await expect(add({ id: 'x' })).rejects.toThrow("Parameter 'qom-type' is missing");
    await expect(add({ 'qom-type': 'secret' })).rejects.toThrow("Parameter 'id' is missing");
    await expect(add({ 'qom-type': 'secret', id: '1bad', data: 'x' })).rejects.toThrow("Parameter 'id' expects an identifier");
    await expect(add({ 'qom-type': 'secret', id: 's1' })).rejects.toThrow("Either 'file' or 'data' must be provided");
    await expect(add({ 'qom-type': 'authz-simple', id: '1x' })).rejects.toThrow("Parameter 'identity' is missing");
    await expect(add({ 'qom-type': 'authz-listfile', id: 'a' })).rejects.toThrow("Parameter 'filename' is missing");
    await expect(add({ 'qom-type': 'authz-listfile', id: 'a', filename: '/x' })).rejects.toThrow('invalid object type: authz-listfile');
    await expect(add({ 'qom-type': 'memory-backend-ram', id: 'm', size: 1 })).rejects.toThrow('invalid object type: memory-backend-ram');
    await expect(add({ 'qom-type': 'tls-creds-psk', id: 'p', dir: '/nonexistent', endpoint: 'server' })).rejects.toThrow(
      'Unable to access credentials /nonexistent/keys.psk: No such file or directory',
    );
    await add({ 'qom-type': 'authz-simple', id: 'az0', identity: 'alice' });
    await add({ 'qom-type': 'tls-creds-anon', id: 'anon0', endpoint: 'server' });
    expect(h.d.objectLookup('anon0')).toBeDefined();
    await h.exec('object-del', { id: 'anon0' });
    expect(h.d.objectLookup('anon0')).toBeUndefined();
    await h.exec('object-del', { id: 'az0' });
    await expect(h.exec('object-del', { id: 'az0' })).rejects.toThrow("object 'az0' not found");
  });

  it('refuses to delete a throttle group in use, from object-add or --object', async () => {
    const h = harness();
    const raw = fresh('raw');
    fs.writeFileSync(raw, Buffer.alloc(MiB));
    h.d.addObject('throttle-group,id=cli0,x-bps-total=1000000');
    await h.exec('object-add', { 'qom-type': 'throttle-group', id: 'qmp0', 'x-iops-total': 100 });
    for (const group of ['cli0', 'qmp0']) {
      const nodeName = `t-${group}`;
      await h.exec('blockdev-add', { driver: 'throttle', 'node-name': nodeName, 'throttle-group': group, file: { driver: 'file', filename: raw } });
      await expect(h.exec('object-del', { id: group })).rejects.toThrow(`object '${group}' is in use, can not be deleted`);
      await h.exec('blockdev-del', { 'node-name': nodeName });
      await h.exec('object-del', { id: group });
      await expect(h.exec('blockdev-add', { driver: 'throttle', 'node-name': nodeName, 'throttle-group': group, file: { driver: 'file', filename: raw } }))
        .rejects.toThrow(`Throttle group '${group}' does not exist`);
    }
    await h.exec('object-add', { 'qom-type': 'throttle-group', id: 'qmp0' });
  });
});
