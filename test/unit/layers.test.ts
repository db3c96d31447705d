/*
 * Call order through stacked layers (nbdkit's test-layers, in our terms):
 *
 *   backend -> A (trace) -> B (trace) -> raw (offset=4096) -> C (trace) -> file
 *
 * Each trace filter logs every call on the way in (`>`) and on the way out
 * (`<`) into one shared log, so each test states the exact order, offsets
 * and flags of the calls at every layer: requests go down in order and
 * complete in reverse, raw shifts offsets by its window, the gate emulates
 * FUA with flushes that walk down the same stack, and read-modify-write
 * happens at the layer that has the alignment.
 */
import fs from 'node:fs';
import path from 'node:path';
import { describe, expect, it } from 'vitest';
import { BlockBackend } from '../../block/backend.js';
import { Req, Status } from '../../block/flags.js';
import { memGraph, pattern } from '../helpers/mem-driver.js';
import { scratchDir } from '../helpers/tmp.js';
import { traceFilter, type TraceEntry } from '../helpers/trace-filter.js';

const WINDOW_OFFSET = 4096;
const FILE_BYTES = 64 * 1024 + WINDOW_OFFSET;
const dir = scratchDir('qbt-layers-');
let files = 0;

/** Opens the stack on a fresh file; `b` adds options to layer B, `top` to layer A. */
async function stack(b: Record<string, unknown> = {}, top: Record<string, unknown> = {}) {
  const filename = path.join(dir, `layers-${files++}.img`);
  fs.writeFileSync(filename, new Uint8Array(FILE_BYTES));
  const log: TraceEntry[] = [];
  const graph = memGraph(traceFilter(log));
  const node = await graph.openNode({
    driver: 'trace', label: 'A', ...top,
    file: {
      driver: 'trace', label: 'B', ...b,
      file: { driver: 'raw', offset: WINDOW_OFFSET, file: { driver: 'trace', label: 'C', file: { driver: 'file', filename } } },
    },
  });
  const blk = new BlockBackend(graph, node, { writable: true });
  /** The log since the last call, as `A> write 0+4096` lines. */
  const take = () => {
    const lines = log.map((e) => `${e.layer}${e.phase === 'enter' ? '>' : '<'} ${e.op} ${e.offset}+${e.bytes}${e.flags ? `/0x${e.flags.toString(16)}` : ''}`);
    log.length = 0;
    return lines;
  };
  return { graph, node, blk, filename, take };
}

/** The calls of one request passing A, B and C with the given op, A/B range and C offset. */
function through(op: string, offset: number, bytes: number, flags = '') {
  const at = (o: number) => `${op} ${o}+${bytes}${flags}`;
  return [`A> ${at(offset)}`, `B> ${at(offset)}`, `C> ${at(offset + WINDOW_OFFSET)}`, `C< ${at(offset + WINDOW_OFFSET)}`, `B< ${at(offset)}`, `A< ${at(offset)}`];
}

const flushes = ['A> flush 0+0', 'A< flush 0+0', 'B> flush 0+0', 'B< flush 0+0', 'C> flush 0+0', 'C< flush 0+0'];

describe('call order through stacked filters', () => {
  it('opens children before parents and closes parents before children', async () => {
    const { blk, take } = await stack();
    expect(take()).toEqual(['C> open 0+0', 'B> open 0+0', 'A> open 0+0']);
    await blk.close();
    expect(take()).toEqual(['A> close 0+0', 'B> close 0+0', 'C> close 0+0']);
  });

  it('passes reads and writes down in order, shifted by the raw window, completing in reverse', async () => {
    const { blk, filename, take } = await stack();
    take();
    const data = pattern(4096, 7);
    await blk.pwrite(8192, data);
    expect(take()).toEqual(through('write', 8192, 4096));
    const back = new Uint8Array(4096);
    await blk.pread(8192, back);
    expect(take()).toEqual(through('read', 8192, 4096));
    expect(back).toEqual(data);
    expect(fs.readFileSync(filename).subarray(8192 + WINDOW_OFFSET, 8192 + WINDOW_OFFSET + 4096)).toEqual(Buffer.from(data));
  });

  it('passes write-zeroes down with MAY_UNMAP when discard=unmap, and discards', async () => {
    const { blk, take } = await stack({}, { discard: 'unmap' });
    take();
    await blk.pwriteZeroes(0, 4096, Req.MAY_UNMAP);
    expect(take()).toEqual(through('write-zeroes', 0, 4096, '/0x4'));
    await blk.pdiscard(4096, 8192);
    expect(take()).toEqual(through('discard', 4096, 8192));
  });

  it('flushes every layer top-down, and only the layers written since', async () => {
    const { blk, take } = await stack();
    take();
    await blk.flush();
    expect(take()).toEqual([]);
    await blk.pwrite(0, pattern(512, 1));
    take();
    await blk.flush();
    expect(take()).toEqual(flushes);
    await blk.flush();
    expect(take()).toEqual([]);
  });

  // QEMU 7.2 (bdrv_driver_pwritev, then bdrv_co_write_req_finish): the
  // emulated FUA flush runs inside the write request, before the top node
  // counts the write, so the top's own flush is skipped as already clean;
  // the nodes below have finished their writes and flush.
  it('emulates FUA at the top with one flush walking down the stack after the write', async () => {
    const { blk, take } = await stack();
    take();
    await blk.pwrite(0, pattern(512, 1), Req.FUA);
    expect(take()).toEqual([...through('write', 0, 512), ...flushes.filter((call) => !call.startsWith('A'))]);
  });

  it('does read-modify-write at the layer with the alignment', async () => {
    const { blk, take } = await stack({ align: 512 });
    take();
    await blk.pwrite(100, pattern(10, 1));
    expect(take()).toEqual([
      'A> write 100+10',
      'B> read 0+512', 'C> read 4096+512', 'C< read 4096+512', 'B< read 0+512',
      'B> write 0+512', 'C> write 4096+512', 'C< write 4096+512', 'B< write 0+512',
      'A< write 100+10',
    ]);
  });

  it('answers block status layer by layer, each deferring (RAW) to the one below', async () => {
    const { node, blk, take } = await stack();
    await blk.pwrite(0, pattern(4096, 1));
    take();
    const status = await blk.blockStatus(0, 4096);
    expect(take()).toEqual([
      'A> block-status 0+4096', 'A< block-status 0+4096',
      'B> block-status 0+4096', 'B< block-status 0+4096',
      'C> block-status 4096+4096', 'C< block-status 4096+4096',
    ]);
    expect(status.status & (Status.DATA | Status.ALLOCATED)).toBe(Status.DATA | Status.ALLOCATED);
    expect(status.map).toBe(WINDOW_OFFSET);
    expect(status.file).toBe(node.filteredChild!.node.filteredChild!.node.file!.node.filteredChild!.node);
  });
});
