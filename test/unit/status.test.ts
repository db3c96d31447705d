/*
 * Block status (block/status.ts): the generic bits the layer adds to what a
 * driver says (EOF, ALLOCATED, RAW resolution, ZERO for unallocated ranges
 * of a format without backing), and allocation depth through backing chains
 * (blockStatusAbove), over test-mem (a protocol that knows its holes) and
 * test-fmt (a format with a backing child).
 */
import fs from 'node:fs';
import path from 'node:path';
import { describe, expect, it } from 'vitest';
import { Perm, Status } from '../../block/flags.js';
import { pwritev, truncate } from '../../block/io.js';
import { TransientParent, attachChild, detachChild, type BlockNode } from '../../block/node.js';
import { blockStatus, blockStatusAbove, isAllocated } from '../../block/status.js';
import type { BlockGraph } from '../../block/graph.js';
import { memFormatDriver } from '../helpers/mem-format.js';
import { memGraph, pattern } from '../helpers/mem-driver.js';
import { scratchDir } from '../helpers/tmp.js';
import { loadHostIo } from '../../drivers/file/host-io.js';

const { DATA, ZERO, OFFSET_VALID, ALLOCATED, EOF } = Status;
const KiB = 1024;
const dir = scratchDir('qbt-status-');

/** Opens `spec` and writes one pattern block at each [offset, bytes], through an edge it then drops. */
async function openWritten(graph: BlockGraph, spec: Record<string, unknown>, writes: Array<[number, number]>): Promise<BlockNode> {
  const node = await graph.openNode(spec as never);
  const writer = attachChild(new TransientParent('test writer'), 'writer', 0, node, Perm.CONSISTENT_READ | Perm.WRITE, Perm.ALL);
  try {
    for (const [offset, bytes] of writes) await pwritev(writer, offset, pattern(bytes, offset));
  } finally {
    detachChild(writer);
  }
  return node;
}

describe('blockStatus of one node', () => {
  it('reports EOF with pnum 0 at and beyond the end, and EOF on the last range', async () => {
    const graph = memGraph();
    const mem = await openWritten(graph, { driver: 'test-mem', size: 8 * KiB }, [[0, 4 * KiB]]);
    expect(await blockStatus(mem, 8 * KiB, 512)).toEqual({ status: EOF, pnum: 0 });
    expect(await blockStatus(mem, 100 * KiB, 512)).toEqual({ status: EOF, pnum: 0 });
    expect(await blockStatus(mem, 0, 100 * KiB)).toEqual({ status: DATA | OFFSET_VALID | ALLOCATED, pnum: 4 * KiB, map: 0, file: mem });
    expect(await blockStatus(mem, 4 * KiB, 100 * KiB)).toEqual({
      status: ZERO | OFFSET_VALID | ALLOCATED | EOF, pnum: 4 * KiB, map: 4 * KiB, file: mem,
    });
    expect(await blockStatus(mem, 100, 0)).toEqual({ status: 0, pnum: 0 });
  });

  it('says DATA|ALLOCATED at the same offset for a protocol without block status', async () => {
    const graph = memGraph();
    const bare = await graph.openNode({ driver: 'test-mem-bare', size: 8 * KiB });
    expect(await blockStatus(bare, 512, 100 * KiB)).toEqual({
      status: DATA | ALLOCATED | OFFSET_VALID | EOF, pnum: 8 * KiB - 512, map: 512, file: bare,
    });
  });

  it('marks ZERO as ALLOCATED, and no DATA/ZERO as unallocated (null-co)', async () => {
    const graph = memGraph();
    const zeroes = await graph.openNode({ driver: 'null-co', size: 4096, 'read-zeroes': true });
    expect((await blockStatus(zeroes, 0, 4096)).status).toBe(ZERO | OFFSET_VALID | ALLOCATED | EOF);
    const unknown = await graph.openNode({ driver: 'null-co', size: 4096 });
    expect((await blockStatus(unknown, 0, 4096)).status).toBe(OFFSET_VALID | EOF);
  });

  it('resolves RAW answers through raw to its file', async () => {
    const graph = memGraph();
    const raw = await openWritten(graph, { driver: 'raw', file: { driver: 'test-mem', 'node-name': 'mem', size: 8 * KiB } }, [[0, 4 * KiB]]);
    const mem = graph.node('mem');
    expect(await blockStatus(raw, 1000, 100 * KiB)).toEqual({ status: DATA | OFFSET_VALID | ALLOCATED, pnum: 3096, map: 1000, file: mem });
    expect(await blockStatus(raw, 4 * KiB, 100 * KiB)).toEqual({
      status: ZERO | OFFSET_VALID | ALLOCATED | EOF, pnum: 4 * KiB, map: 4 * KiB, file: mem,
    });
  });

  it('resolves raw over a real sparse file to the file node, holes as ZERO', async () => {
    const filename = path.join(dir, 'sparse.img');
    fs.writeFileSync(filename, new Uint8Array(0));
    fs.truncateSync(filename, 64 * KiB);
    const fd = fs.openSync(filename, 'r+');
    fs.writeSync(fd, pattern(4 * KiB, 1), 0, 4 * KiB, 8 * KiB);
    fs.closeSync(fd);
    const graph = memGraph();
    const raw = await graph.openNode({ driver: 'raw', offset: 4 * KiB, size: 16 * KiB, file: { driver: 'file', 'node-name': 'proto', filename } });
    const proto = graph.node('proto');
    const hole = await blockStatus(raw, 0, 16 * KiB);
    const data = await blockStatus(raw, 4 * KiB, 16 * KiB);
    expect(data).toMatchObject({ map: 8 * KiB, file: proto });
    expect(data.status & (DATA | ZERO | ALLOCATED | OFFSET_VALID)).toBe(DATA | ALLOCATED | OFFSET_VALID);
    // Without the native helper every byte of a file is data, so only the data range is checked then.
    if (loadHostIo().native) {
      expect(data.pnum).toBe(4 * KiB);
      expect(hole).toEqual({ status: ZERO | OFFSET_VALID | ALLOCATED, pnum: 4 * KiB, map: 4 * KiB, file: proto });
      expect(await blockStatus(raw, 8 * KiB, 16 * KiB)).toEqual({ status: ZERO | OFFSET_VALID | ALLOCATED | EOF, pnum: 8 * KiB, map: 12 * KiB, file: proto });
    }
  });

  it('shifts a raw window by its offset and ends it (EOF) at its size', async () => {
    const graph = memGraph();
    const mem = await openWritten(graph, { driver: 'test-mem', 'node-name': 'mem', size: 16 * KiB }, [[0, 4 * KiB], [8 * KiB, KiB]]);
    const raw = await graph.openNode({ driver: 'raw', offset: 4 * KiB, size: 8 * KiB, file: 'mem' });
    expect(await blockStatus(raw, 0, 100 * KiB)).toEqual({ status: ZERO | OFFSET_VALID | ALLOCATED, pnum: 4 * KiB, map: 4 * KiB, file: mem });
    expect(await blockStatus(raw, 4 * KiB, 100 * KiB)).toEqual({ status: DATA | OFFSET_VALID | ALLOCATED, pnum: KiB, map: 8 * KiB, file: mem });
    expect(await blockStatus(raw, 5 * KiB, 100 * KiB)).toEqual({
      status: ZERO | OFFSET_VALID | ALLOCATED | EOF, pnum: 3 * KiB, map: 9 * KiB, file: mem,
    });
    expect(await blockStatus(raw, 8 * KiB, 512)).toEqual({ status: EOF, pnum: 0 });
  });

  it('reads a window past its shrunken child as allocated zeroes', async () => {
    const graph = memGraph();
    const raw = await graph.openNode({ driver: 'raw', file: { driver: 'test-mem', size: 8 * KiB } });
    // A resizer of the raw node, so that raw takes resize on its file (raw_child_perm).
    attachChild(new TransientParent('resizer'), 'x', 0, raw, Perm.RESIZE, Perm.ALL);
    await truncate(raw.file!, 4 * KiB, true, 'off');
    expect(raw.totalBytes).toBe(8 * KiB);
    expect(await blockStatus(raw, 4 * KiB, 4 * KiB)).toEqual({ status: ZERO | ALLOCATED | EOF, pnum: 4 * KiB });
  });

  it('asks a filter with a large alignment at the caller\'s offset, not the aligned one', async () => {
    const graph = memGraph();
    await openWritten(graph, { driver: 'test-mem', 'node-name': 'mem', size: 8 * KiB }, [[0, 100]]);
    const debug = await graph.openNode({ driver: 'blkdebug', align: 4096, image: 'mem' });
    const mem = graph.node('mem');
    expect(await blockStatus(debug, 0, 4096)).toEqual({ status: DATA | OFFSET_VALID | ALLOCATED, pnum: 100, map: 0, file: mem });
    expect(await blockStatus(debug, 200, 1000)).toEqual({ status: ZERO | OFFSET_VALID | ALLOCATED, pnum: 1000, map: 200, file: mem });
  });

  it('reads unallocated ranges of a backing-capable format as ZERO when it has no backing', async () => {
    const graph = memGraph(memFormatDriver);
    const fmt = await openWritten(graph, { driver: 'test-fmt', size: 4 * KiB, file: { driver: 'test-mem', size: 4 * KiB } }, [[0, KiB]]);
    expect((await blockStatus(fmt, 0, 4 * KiB)).status).toBe(DATA | OFFSET_VALID | ALLOCATED);
    expect(await blockStatus(fmt, KiB, 4 * KiB)).toEqual({ status: ZERO | EOF, pnum: 3 * KiB });
    expect(await isAllocated(fmt, KiB, 4 * KiB)).toEqual({ allocated: false, pnum: 3 * KiB });
  });

  it('reads unallocated ranges with a backing file as unknown, ZERO past the backing\'s end', async () => {
    const graph = memGraph(memFormatDriver);
    await graph.openNode({ driver: 'test-fmt', 'node-name': 'base', size: 4 * KiB, file: { driver: 'test-mem', size: 4 * KiB } });
    const top = await graph.openNode({ driver: 'test-fmt', size: 8 * KiB, backing: 'base', file: { driver: 'test-mem', size: 8 * KiB } });
    expect(await blockStatus(top, 0, 4 * KiB)).toEqual({ status: 0, pnum: 4 * KiB });
    expect(await blockStatus(top, 4 * KiB, 4 * KiB)).toEqual({ status: ZERO | EOF, pnum: 4 * KiB });
    expect(await blockStatus(top, 4 * KiB, 4 * KiB, false)).toEqual({ status: EOF, pnum: 4 * KiB });
  });
});

describe('blockStatusAbove: allocation depth through a backing chain', () => {
  /*
   * base (4 KiB):  data [0, 1K) and [3.5K, 4K)
   * mid (16 KiB):  data [2K, 3K), backing base
   * top (16 KiB):  data [4K, 5K), backing mid
   */
  async function chain() {
    const graph = memGraph(memFormatDriver);
    const fmt = (name: string, size: number, backing?: string) => ({
      driver: 'test-fmt', 'node-name': name, size, file: { driver: 'test-mem', size }, ...(backing ? { backing } : {}),
    });
    const base = await openWritten(graph, fmt('base', 4 * KiB), [[0, KiB], [3.5 * KiB, 512]]);
    const mid = await openWritten(graph, fmt('mid', 16 * KiB, 'base'), [[2 * KiB, KiB]]);
    const top = await openWritten(graph, fmt('top', 16 * KiB, 'mid'), [[4 * KiB, KiB]]);
    return { graph, base, mid, top };
  }

  /** Walks the whole node with blockStatusAbove and returns [offset, pnum, depth, status] rows. */
  async function walk(node: BlockNode, base: BlockNode | null, wantZero = true) {
    const rows: Array<[number, number, number, number]> = [];
    for (let offset = 0; offset < node.totalBytes; ) {
      const r = await blockStatusAbove(node, base, offset, node.totalBytes - offset, wantZero);
      rows.push([offset, r.pnum, r.depth, r.status & ~OFFSET_VALID]);
      offset += r.pnum;
    }
    return rows;
  }

  it('finds the layer that allocates each range; EOF only at the top\'s end', async () => {
    const { top } = await chain();
    expect(await walk(top, null)).toEqual([
      [0, KiB, 3, DATA | ALLOCATED],
      [KiB, KiB, 0, ZERO],
      [2 * KiB, KiB, 2, DATA | ALLOCATED],
      [3 * KiB, 512, 0, ZERO],
      [3.5 * KiB, 512, 3, DATA | ALLOCATED],
      [4 * KiB, KiB, 1, DATA | ALLOCATED],
      [5 * KiB, 11 * KiB, 3, ZERO | ALLOCATED | EOF],
    ]);
  });

  it('names the node holding the data, and the short backing layer for synthesized zeroes', async () => {
    const { top, mid, base } = await chain();
    const deep = await blockStatusAbove(top, null, 0, KiB);
    expect(deep.file).toBe(base.file!.node);
    expect((await blockStatusAbove(top, null, 2 * KiB, KiB)).file).toBe(mid.file!.node);
    expect((await blockStatusAbove(top, null, 8 * KiB, KiB)).file).toBe(base);
  });

  it('stops above `base`: what only lower layers allocate has depth 0', async () => {
    const { top, mid } = await chain();
    expect(await walk(top, mid)).toEqual([
      [0, 4 * KiB, 0, 0],
      [4 * KiB, KiB, 1, DATA | ALLOCATED],
      [5 * KiB, 11 * KiB, 0, EOF],
    ]);
    expect(await blockStatusAbove(top, top, 0, 4 * KiB)).toMatchObject({ status: 0, pnum: 4 * KiB, depth: 0 });
  });

  it('gives the same depths without wantZero', async () => {
    const { top } = await chain();
    expect((await walk(top, null, false)).map(([o, p, d]) => [o, p, d])).toEqual([
      [0, KiB, 3], [KiB, KiB, 0], [2 * KiB, KiB, 2], [3 * KiB, 512, 0], [3.5 * KiB, 512, 3], [4 * KiB, KiB, 1], [5 * KiB, 11 * KiB, 3],
    ]);
  });

  it('counts a filter above the chain as a layer', async () => {
    const { graph, top } = await chain();
    const filter = await graph.openNode({ driver: 'blkdebug', image: top.nodeName });
    expect((await walk(filter, null)).map(([o, p, d]) => [o, p, d])).toEqual([
      [0, KiB, 4], [KiB, KiB, 0], [2 * KiB, KiB, 3], [3 * KiB, 512, 0], [3.5 * KiB, 512, 4], [4 * KiB, KiB, 1], [5 * KiB, 11 * KiB, 4],
    ]);
  });

  it('returns EOF with depth 0 beyond the top\'s end', async () => {
    const { top } = await chain();
    expect(await blockStatusAbove(top, null, 16 * KiB, KiB)).toEqual({ status: EOF, pnum: 0, depth: 0 });
  });
});
