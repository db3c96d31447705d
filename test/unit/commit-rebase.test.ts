/*
 * The library behind qemu-img commit and rebase, without peer tools:
 * the rate limit, backing-chain lookups, commitAbove (content, progress,
 * bounded requests, cancel and failure, cost on sparse images, the copy
 * granule), qcow2 emptying (both ways, and a crash at every write of the
 * reset, repaired by our next open and, when qemu-img is installed, by
 * `qemu-img check -r all`), rewriting the backing name (refusals,
 * ordering), and the safe
 * rebase copy (content kept through the switch, prefix chains, flattening,
 * cost). The same operations against qemu-img are in
 * test/interop/qemu-img-commit.test.ts and qemu-img-rebase.test.ts.
 */
import { spawnSync } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { describe, expect, it } from 'vitest';
import { BlockBackend } from '../../block/backend.js';
import { backingChainNext, changeBackingFile, findBackingImage } from '../../block/chain.js';
import { reopenSetReadOnly } from '../../block/reopen.js';
import { IN_FLIGHT_MAX, commitAbove } from '../../block/commit.js';
import { createImage } from '../../block/create.js';
import { BlockError } from '../../block/errors.js';
import { Perm, Status } from '../../block/flags.js';
import { preadv } from '../../block/io.js';
import type { BlockGraph } from '../../block/graph.js';
import { makeEmpty } from '../../block/make-empty.js';
import { attachChild, detachChild, TransientParent, type BlockNode } from '../../block/node.js';
import { RateLimit } from '../../block/ratelimit.js';
import { copyBackingDifferences } from '../../block/rebase.js';
import { blockStatus } from '../../block/status.js';
import { stateOf } from '../../drivers/qcow2/state.js';
import { testGraph } from '../helpers/graphs.js';
import { memGraph, memOf, pattern, type MemCall } from '../helpers/mem-driver.js';
import { hasTool } from '../helpers/peers.js';
import { checkOf, CLEAN } from '../helpers/qcow2-verdict.js';
import { scratchDir } from '../helpers/tmp.js';

const KiB = 1024;
const MiB = 1024 * KiB;
const TiB = 1024 * 1024 * MiB;

const dir = scratchDir('qbt-commit-rebase-');
let serial = 0;

type Op = [kind: 'data', offset: number, bytes: number] | [kind: 'zero' | 'discard', offset: number, bytes: number];

interface ImageSpec {
  format?: 'qcow2' | 'raw';
  sizeBytes?: number;
  options?: Array<[string, string]>;
  backing?: string;
  backingFormat?: string;
  ops?: Op[];
}

/** Creates an image in its own subdirectory-free name and applies `ops` (data patterns seeded by position). */
async function image(name: string, spec: ImageSpec = {}): Promise<string> {
  const filename = path.join(dir, `${serial}-${name}`);
  const format = spec.format ?? 'qcow2';
  const graph = testGraph();
  const backingFile = spec.backing ? `${serial}-${spec.backing}` : undefined;
  await createImage(graph, { format, filename, sizeBytes: spec.sizeBytes, options: spec.options ?? [], backingFile, backingFormat: spec.backingFormat, quiet: true });
  if (spec.ops?.length) {
    const node = await graph.openImage(filename, { format, options: { discard: 'unmap' } });
    const blk = new BlockBackend(graph, node, { writable: true });
    for (const [kind, offset, bytes] of spec.ops) {
      if (kind === 'data') await blk.pwrite(offset, pattern(bytes, offset / 512 + name.length));
      else if (kind === 'zero') await blk.pwriteZeroes(offset, bytes);
      else await blk.pdiscard(offset, bytes);
    }
    await blk.close();
  }
  return filename;
}

function nextSerial(): void {
  serial++;
}

async function open(graph: BlockGraph, filename: string, format = 'qcow2', readOnly = false): Promise<BlockNode> {
  return graph.openImage(filename, { format, readOnly, options: { discard: 'unmap' } });
}

/** The node's whole content, read through a short-lived edge. */
async function readAll(node: BlockNode): Promise<Buffer> {
  const buf = Buffer.alloc(node.totalBytes);
  const edge = attachChild(new TransientParent('test read'), 'read', 0, node, Perm.CONSISTENT_READ, Perm.ALL);
  try {
    await preadv(edge, 0, buf);
  } finally {
    detachChild(edge);
  }
  return buf;
}

async function contentOf(filename: string, format = 'qcow2'): Promise<Buffer> {
  const graph = testGraph();
  const node = await open(graph, filename, format, true);
  const buf = await readAll(node);
  await graph.closeAll();
  return buf;
}


describe('RateLimit', () => {
  it('lets everything through at speed 0', () => {
    expect(new RateLimit(0).delayFor(1 << 30)).toBe(0);
  });

  it('keeps the long-run rate at the speed, whatever the request size', () => {
    for (const requestBytes of [37, 4096, 300_000]) {
      let now = 0;
      const limit = new RateLimit(100_000, 100, () => now);
      let sent = 0;
      while (sent < 1_000_000) {
        now += limit.delayFor(requestBytes);
        sent += requestBytes;
      }
      // Each request is paid for after it goes out: the clock ends where the bytes sent are worth, within a slice.
      expect(Math.abs(now - (sent / 100_000) * 1000)).toBeLessThanOrEqual(100);
    }
  });

  it('does not delay within the slice quota', () => {
    let now = 0;
    const limit = new RateLimit(10_000, 100, () => now);
    expect(limit.delayFor(400)).toBe(0);
    expect(limit.delayFor(599)).toBe(0);
    expect(limit.delayFor(1)).toBe(100);
    now = 50;
    expect(limit.delayFor(1000)).toBe(150);
    now = 300;
    expect(limit.delayFor(999)).toBe(0);
  });
});

describe('backing chains', () => {
  it('finds images by name relative to the image naming them, like bdrv_find_backing_image', async () => {
    nextSerial();
    await image('base.raw', { format: 'raw', sizeBytes: MiB });
    await image('mid.qcow2', { backing: 'base.raw', backingFormat: 'raw' });
    const topFile = await image('top.qcow2', { backing: 'mid.qcow2', backingFormat: 'qcow2' });
    const graph = testGraph();
    const top = await open(graph, topFile);
    const mid = backingChainNext(top)!;
    const base = backingChainNext(mid)!;
    expect(base.driver.name).toBe('raw');
    expect(findBackingImage(top, `${serial}-mid.qcow2`)).toBe(mid);
    expect(findBackingImage(top, `./${serial}-base.raw`)).toBe(base);
    expect(findBackingImage(top, path.join(dir, `${serial}-base.raw`))).toBe(base);
    expect(findBackingImage(top, `${serial}-top.qcow2`)).toBeNull();
    expect(findBackingImage(top, 'absent.qcow2')).toBeNull();
    expect(findBackingImage(top, `${path.basename(dir)}/${serial}-base.raw`)).toBeNull();
    expect(backingChainNext(base)).toBeNull();
  });
});

describe('commitAbove', () => {
  async function chain() {
    nextSerial();
    await image('base.qcow2', { sizeBytes: 3 * MiB, options: [['cluster_size', '4096']], ops: [['data', 0, MiB], ['data', 2 * MiB, 100 * KiB]] });
    await image('mid.qcow2', { sizeBytes: 4 * MiB, backing: 'base.qcow2', backingFormat: 'qcow2', ops: [['data', 8 * KiB, 4 * KiB], ['zero', 512 * KiB, 128 * KiB], ['data', 3 * MiB, 4 * KiB]] });
    return image('top.qcow2', {
      sizeBytes: 5 * MiB,
      options: [['cluster_size', '16384']],
      backing: 'mid.qcow2',
      backingFormat: 'qcow2',
      ops: [['data', 100 * KiB, 4 * KiB], ['data', 4 * MiB, KiB], ['discard', 0, 64 * KiB], ['zero', 2 * MiB, 32 * KiB]],
    });
  }

  async function commitSetup(topFile: string, baseDepth: number) {
    const graph = testGraph();
    const top = await open(graph, topFile);
    let base = backingChainNext(top)!;
    for (let i = 1; i < baseDepth; i++) base = backingChainNext(base)!;
    await reopenSetReadOnly(base, false);
    const source = new BlockBackend(graph, top);
    const target = new BlockBackend(graph, base, { writable: true, resizable: true });
    return { graph, top, base, source, target };
  }

  it('makes the base read as the top did, grows it, and keeps the check clean', async () => {
    for (const depth of [1, 2]) {
      const topFile = await chain();
      const expected = await contentOf(topFile);
      const { graph, base, source, target } = await commitSetup(topFile, depth);
      const progress: Array<[number, number]> = [];
      await commitAbove(source, target, { onProgress: (done, total) => progress.push([done, total]) });
      expect(base.totalBytes).toBe(5 * MiB);
      const baseContent = await readAll(base);
      expect(baseContent.equals(expected)).toBe(true);
      const [lastDone, total] = progress.at(-1)!;
      expect(lastDone).toBe(total);
      expect(progress.every(([d], i) => i === 0 || d > progress[i - 1]![0])).toBe(true);
      await graph.closeAll();
      expect(await checkOf(base.filename)).toEqual(CLEAN);
    }
  });

  it('copies whole granules: into a raw base, 64 KiB around a 4 KiB cluster of the top', async () => {
    nextSerial();
    const baseFile = await image('base.raw', { format: 'raw', sizeBytes: MiB });
    const topFile = await image('top.qcow2', { options: [['cluster_size', '4096']], backing: 'base.raw', backingFormat: 'raw', ops: [['data', 200 * KiB, 4 * KiB]] });
    const { graph, source, target } = await commitSetup(topFile, 1);
    await commitAbove(source, target);
    await graph.closeAll();
    const g2 = testGraph();
    const raw = await g2.openImage(baseFile, { format: 'raw', readOnly: true });
    const extents: string[] = [];
    for (let at = 0; at < raw.totalBytes; ) {
      const st = await blockStatus(raw, at, raw.totalBytes - at);
      if (st.status & Status.DATA) extents.push(`${at}+${st.pnum}`);
      at += st.pnum;
    }
    // (The first 4 KiB are create's probing block.)
    expect(extents).toEqual(['0+4096', `${192 * KiB}+${64 * KiB}`]);
  });

  it('keeps at most IN_FLIGHT_MAX pieces in flight, and stops cleanly on cancel and on a failing write', async () => {
    nextSerial();
    await image('base.raw', { format: 'raw', sizeBytes: 64 * MiB });
    const ops: Op[] = Array.from({ length: 40 }, (_, i) => ['data', i * 1536 * KiB, 64 * KiB] as Op);
    const topFile = await image('top.qcow2', { backing: 'base.raw', backingFormat: 'raw', ops });
    for (const mode of ['count', 'cancel', 'fail'] as const) {
      const { graph, source, target } = await commitSetup(topFile, 1);
      let current = 0;
      let max = 0;
      let writes = 0;
      const write = target.pwrite.bind(target);
      target.pwrite = async (offset, buf, flags) => {
        current++;
        max = Math.max(max, current);
        try {
          await new Promise((resolve) => setTimeout(resolve, 2));
          if (mode === 'fail' && ++writes === 5) throw new BlockError('ENOSPC');
          return await write(offset, buf, flags);
        } finally {
          current--;
        }
      };
      const abort = new AbortController();
      const run = commitAbove(source, target, { signal: abort.signal, onProgress: () => mode === 'cancel' && abort.abort() });
      if (mode === 'count') await run;
      else await expect(run).rejects.toMatchObject({ code: mode === 'cancel' ? 'ECANCELED' : 'ENOSPC' });
      expect(current).toBe(0);
      expect(target.inFlight).toBe(0);
      if (mode === 'count') expect(max).toBeGreaterThan(1);
      expect(max).toBeLessThanOrEqual(IN_FLIGHT_MAX);
      await graph.closeAll();
    }
  });

  it('costs what the data costs on a sparse 1 TiB chain', async () => {
    nextSerial();
    const baseFile = path.join(dir, `${serial}-base.raw`);
    fs.writeFileSync(baseFile, '');
    fs.truncateSync(baseFile, TiB);
    const topFile = await image('top.qcow2', { backing: 'base.raw', backingFormat: 'raw', ops: [['data', 0, 4 * KiB], ['data', TiB / 2, MiB], ['zero', TiB - 64 * KiB, 64 * KiB]] });
    const { graph, source, target } = await commitSetup(topFile, 1);
    let total = 0;
    const started = performance.now();
    await commitAbove(source, target, { onProgress: (_done, t) => (total = t) });
    expect(performance.now() - started).toBeLessThan(5000);
    expect(total).toBe(64 * KiB + MiB + 64 * KiB);
    await graph.closeAll();
  });

  it('refuses a base outside the chain below the top', async () => {
    nextSerial();
    const a = await image('a.qcow2', { sizeBytes: MiB });
    const graph = testGraph();
    const node = await open(graph, a);
    const blk = new BlockBackend(graph, node, { writable: true, resizable: true });
    await expect(commitAbove(blk, blk)).rejects.toMatchObject({ code: 'EINVAL' });
  });
});

describe('makeEmpty (qcow2)', () => {
  /** A base and a top holding the same data (as after a commit), so any partial emptying reads the same. */
  async function committed(options: Array<[string, string]> = []) {
    nextSerial();
    const ops: Op[] = [['data', 0, 200 * KiB], ['data', 3 * MiB, 64 * KiB], ['zero', 5 * MiB, 128 * KiB]];
    const baseFile = await image('base.qcow2', { sizeBytes: 8 * MiB, ops: ops.map(([k, o, b]) => [k === 'zero' ? 'data' : k, o, b] as Op) });
    const topFile = await image('top.qcow2', { options, backing: 'base.qcow2', backingFormat: 'qcow2' });
    // The top gets the base's bytes where it allocates, and zero clusters where the base has zero data.
    const base = await contentOf(baseFile);
    const graph = testGraph();
    const top = await open(graph, topFile);
    const blk = new BlockBackend(graph, top, { writable: true });
    for (const [, offset, bytes] of ops) await blk.pwrite(offset, base.subarray(offset, offset + bytes));
    await blk.close();
    return { baseFile, topFile, base };
  }

  async function empty(topFile: string) {
    const graph = testGraph();
    const top = await open(graph, topFile);
    const blk = new BlockBackend(graph, top, { writable: true });
    await makeEmpty(blk.root);
    await blk.close();
  }

  it('resets a v3 image to header, refcount table, refcount block and L1 table', async () => {
    const { topFile, base } = await committed();
    await empty(topFile);
    expect(fs.statSync(topFile).size).toBe(4 * 64 * KiB);
    expect((await contentOf(topFile)).equals(base)).toBe(true);
    expect(await checkOf(topFile)).toEqual(CLEAN);
    const graph = testGraph();
    const top = await open(graph, topFile);
    expect(stateOf(top).image.header).toMatchObject({ l1TableOffset: 3 * 64 * KiB, refcountTableOffset: 64 * KiB, refcountTableClusters: 1 });
    const blk = new BlockBackend(graph, top, { writable: true });
    await blk.pwrite(MiB, pattern(4096, 9));
    await graph.closeAll();
    expect(await checkOf(topFile)).toEqual(CLEAN);
    expect((await contentOf(topFile)).subarray(MiB, MiB + 4096).equals(Buffer.from(pattern(4096, 9)))).toBe(true);
  });

  it('discards every cluster of a v2 image, without giving empty L1 entries a table', async () => {
    const { topFile, base } = await committed([['compat', '0.10']]);
    const before = fs.statSync(topFile).size;
    await empty(topFile);
    expect(fs.statSync(topFile).size).toBeLessThanOrEqual(before);
    expect((await contentOf(topFile)).equals(base)).toBe(true);
    expect(await checkOf(topFile)).toEqual(CLEAN);
    const graph = testGraph();
    const top = await open(graph, topFile, 'qcow2', true);
    for (let at = 0; at < top.totalBytes; ) {
      const st = await blockStatus(top, at, top.totalBytes - at, false);
      expect(st.status & Status.ALLOCATED).toBe(0);
      at += st.pnum;
    }
  });

  it('is ENOTSUP for raw and needs write permission', async () => {
    nextSerial();
    const raw = await image('r.raw', { format: 'raw', sizeBytes: MiB });
    const graph = testGraph();
    const node = await open(graph, raw, 'raw');
    const reader = new BlockBackend(graph, node);
    await expect(makeEmpty(reader.root)).rejects.toMatchObject({ code: 'EPERM' });
    const writer = new BlockBackend(graph, node, { writable: true });
    await expect(makeEmpty(writer.root)).rejects.toThrow(new BlockError('ENOTSUP', 'raw does not support emptying nodes'));
  });

  it('leaves an image that the next read-write open repairs, whichever write a crash stops at', async () => {
    const { topFile, baseFile, base } = await committed();
    const bytes = fs.readFileSync(topFile);
    const mutating = new Set<MemCall['op']>(['write', 'write-zeroes', 'discard', 'truncate']);
    let writesInAll = Infinity;
    for (let crashAt = 0; crashAt <= writesInAll; crashAt++) {
      const graph = memGraph();
      const disk = await graph.openNode({ driver: 'test-mem', 'node-name': 'disk', size: bytes.length });
      const mem = memOf(disk);
      mem.data.set(bytes);
      mem.allocated.fill(1);
      let writes = 0;
      mem.beforeCall = (call) => {
        if (mutating.has(call.op) && ++writes > crashAt) throw new BlockError('EIO', 'crash');
      };
      const top = await graph.openNode({ driver: 'qcow2', file: 'disk', backing: null, discard: 'unmap' });
      const blk = new BlockBackend(graph, top, { writable: true });
      const outcome = await makeEmpty(blk.root).then(() => 'done', () => 'crashed');
      if (outcome === 'done') writesInAll = writes;
      const crashed = path.join(dir, `${serial}-crash-${crashAt}.qcow2`);
      fs.writeFileSync(crashed, mem.data);
      if (hasTool('qemu-img')) fs.writeFileSync(`${crashed}.qemu`, mem.data);
      mem.beforeCall = () => {
        throw new BlockError('EIO', 'gone');
      };
      await graph.closeAll().catch(() => undefined);
      // Repoint the copy at the base, then open it read-write: a dirty image is repaired.
      const g2 = testGraph();
      const node = await g2.openImage(crashed, { format: 'qcow2', options: { backing: { driver: 'qcow2', file: { driver: 'file', filename: baseFile } } } });
      expect((await readAll(node)).equals(base)).toBe(true);
      await g2.closeAll();
      expect(await checkOf(crashed), `crash after ${crashAt} writes`).toEqual(CLEAN);
      if (hasTool('qemu-img')) {
        const repaired = spawnSync('qemu-img', ['check', '-q', '-r', 'all', `${crashed}.qemu`], { encoding: 'utf8' });
        expect(repaired.status, `qemu-img check -r all after ${crashAt} writes: ${repaired.stderr}`).toBe(0);
        const same = spawnSync('qemu-img', ['compare', '-q', `${crashed}.qemu`, baseFile]);
        expect(same.status).toBe(0);
      }
    }
    expect(writesInAll).toBeGreaterThan(3);
  });
});

describe('changeBackingFile', () => {
  it('rewrites the name and format durably, after flushing what came before', async () => {
    nextSerial();
    await image('a.raw', { format: 'raw', sizeBytes: MiB });
    const topFile = await image('top.qcow2', { sizeBytes: MiB });
    const bytes = fs.readFileSync(topFile);
    const graph = memGraph();
    const disk = await graph.openNode({ driver: 'test-mem', 'node-name': 'disk', size: bytes.length });
    memOf(disk).data.set(bytes);
    const top = await graph.openNode({ driver: 'qcow2', file: 'disk' });
    const blk = new BlockBackend(graph, top, { writable: true });
    await blk.pwrite(0, pattern(4096, 1));
    const log = memOf(disk).log;
    log.length = 0;
    await changeBackingFile(top, 'a.raw', 'raw', true);
    const ops = log.filter((c) => c.op !== 'read').map((c) => `${c.op}@${c.offset}`);
    const header = ops.lastIndexOf('write@0');
    expect(ops.slice(header - 1)).toEqual(['flush@0', 'write@0', 'flush@0']);
    expect(ops.slice(0, header - 1).some((o) => o.startsWith('write'))).toBe(true);
    expect(top.driver.getInfo(top)).toMatchObject({ backingFile: 'a.raw', backingFormat: 'raw' });
    await changeBackingFile(top, null, null, false);
    expect(top.driver.getInfo(top)).toMatchObject({ backingFile: undefined, backingFormat: undefined });
  });

  it('refuses what cannot be stored, changing nothing', async () => {
    nextSerial();
    const small = await image('small.qcow2', { sizeBytes: MiB, options: [['cluster_size', '512']] });
    const graph = testGraph();
    const top = await open(graph, small);
    const before = fs.readFileSync(small);
    await expect(changeBackingFile(top, 'x'.repeat(1024), 'raw', true)).rejects.toMatchObject({ code: 'EINVAL' });
    await expect(changeBackingFile(top, 'x'.repeat(400), 'raw', true)).rejects.toMatchObject({ code: 'ENOSPC' });
    await expect(changeBackingFile(top, 'x', null, true)).rejects.toThrow('backing format must be specified');
    await expect(changeBackingFile(top, null, 'raw', false)).rejects.toMatchObject({ code: 'EINVAL' });
    expect(fs.readFileSync(small).equals(before)).toBe(true);
    expect(top.driver.getInfo(top)).toMatchObject({ backingFile: undefined });
    const raw = await open(graph, await image('r.raw', { format: 'raw', sizeBytes: MiB }), 'raw');
    await expect(changeBackingFile(raw, 'x', 'raw', true)).rejects.toMatchObject({ code: 'ENOTSUP' });
  });
});

describe('copyBackingDifferences', () => {
  async function rebaseTo(topFile: string, newName: string | null, newFormat: string | null) {
    const graph = testGraph();
    const top = await open(graph, topFile);
    const overlay = new BlockBackend(graph, top, { writable: true });
    const old = top.cowChild?.node ?? null;
    const prefix = newName ? findBackingImage(top, newName) : null;
    const opened = newName && !prefix ? await graph.openImage(path.join(dir, newName), { format: newFormat!, readOnly: true }) : null;
    await copyBackingDifferences(overlay, { old, newBacking: prefix ?? opened, prefix });
    await changeBackingFile(top, newName, newFormat, newName !== null);
    await overlay.close();
    if (opened) await graph.unref(opened);
  }

  it('keeps the content through the switch: to another image, to an image of the chain, to none', async () => {
    for (const target of ['other', 'base', 'none'] as const) {
      nextSerial();
      await image('base.raw', { format: 'raw', sizeBytes: 2 * MiB, ops: [['data', 0, 256 * KiB], ['data', MiB, 64 * KiB]] });
      await image('mid.qcow2', { sizeBytes: 3 * MiB, options: [['cluster_size', '4096']], backing: 'base.raw', backingFormat: 'raw', ops: [['data', 64 * KiB, 4 * KiB], ['zero', MiB, 64 * KiB], ['data', 2 * MiB, 8 * KiB]] });
      const topFile = await image('top.qcow2', { sizeBytes: 4 * MiB, backing: 'mid.qcow2', backingFormat: 'qcow2', ops: [['data', 0, 4 * KiB], ['data', 3 * MiB, 4 * KiB]] });
      await image('other.qcow2', { sizeBytes: 5 * MiB, options: [['cluster_size', '512']], ops: [['data', 0, 128 * KiB], ['data', 1536 * KiB, 64 * KiB], ['data', 3500 * KiB, 100 * KiB]] });
      const expected = await contentOf(topFile);
      if (target === 'other') await rebaseTo(topFile, `${serial}-other.qcow2`, 'qcow2');
      else if (target === 'base') await rebaseTo(topFile, `${serial}-base.raw`, 'raw');
      else await rebaseTo(topFile, null, null);
      expect((await contentOf(topFile)).equals(expected), target).toBe(true);
      expect(await checkOf(topFile)).toEqual(CLEAN);
    }
  });

  it('reads nothing where both backing files read as zeroes (sparse 1 TiB)', async () => {
    nextSerial();
    const oldFile = path.join(dir, `${serial}-old.raw`);
    fs.writeFileSync(oldFile, '');
    fs.truncateSync(oldFile, TiB);
    await image('new.qcow2', { sizeBytes: TiB, ops: [['data', TiB / 4, 64 * KiB]] });
    const topFile = await image('top.qcow2', { backing: 'old.raw', backingFormat: 'raw', ops: [['data', 0, 64 * KiB]] });
    const started = performance.now();
    await rebaseTo(topFile, `${serial}-new.qcow2`, 'qcow2');
    expect(performance.now() - started).toBeLessThan(5000);
    const graph = testGraph();
    const top = await open(graph, topFile, 'qcow2', true);
    const st = await blockStatus(top, TiB / 4, 64 * KiB, false);
    expect(st.status & Status.ALLOCATED).toBeTruthy();
    expect((await blockStatus(top, TiB / 8, 64 * KiB, false)).status & Status.ALLOCATED).toBe(0);
  });
});
