/*
 * The request gate (block/io.ts) against the test-mem driver, which logs
 * every driver call and fails loudly when the gate breaks its contract
 * (alignment, limits, flags). Each test states the exact driver calls QEMU's
 * block/io.c would make for the request, and checks the bytes against a
 * plain model where content matters.
 */
import { describe, expect, it } from 'vitest';
import { BlockBackend } from '../../block/backend.js';
import { drainedBegin, drainedEnd } from '../../block/drain.js';
import { Req } from '../../block/flags.js';
import { flush, preadv, pwriteZeroes, pwritev } from '../../block/io.js';
import { blockStatus } from '../../block/status.js';
import { Status } from '../../block/flags.js';
import { calls, memGraph, memOf, openMem, pattern } from '../helpers/mem-driver.js';

const KiB = 1024;

async function readBack(blk: BlockBackend, offset: number, bytes: number): Promise<Uint8Array> {
  const buf = new Uint8Array(bytes);
  await blk.pread(offset, buf);
  return buf;
}

/** A latch: `wait()` blocks until `open()`. */
function latch() {
  let open!: () => void;
  const opened = new Promise<void>((resolve) => (open = resolve));
  return { wait: () => opened, open };
}

/** Lets pending promise callbacks and I/O callbacks run. */
const settle = () => new Promise<void>((resolve) => setImmediate(resolve));

describe('alignment: read-modify-write', () => {
  const cases = [
    { name: 'same block', offset: 100, bytes: 100, reads: ['read 0+512'], write: 'write 0+512' },
    { name: 'head only', offset: 100, bytes: 924, reads: ['read 0+512'], write: 'write 0+1024' },
    { name: 'tail only', offset: 0, bytes: 700, reads: ['read 512+512'], write: 'write 0+1024' },
    { name: 'head and tail', offset: 100, bytes: 1000, reads: ['read 0+512', 'read 1024+512'], write: 'write 0+1536' },
    { name: 'aligned', offset: 512, bytes: 512, reads: [], write: 'write 512+512' },
  ];
  for (const c of cases) {
    it(`writes ${c.name}: reads only the partial blocks, writes the covering range`, async () => {
      const { blk, mem } = await openMem({ align: 512, size: 4 * KiB, fill: 0xee });
      const model = new Uint8Array(4 * KiB).fill(0xee);
      const data = pattern(c.bytes, 1);
      await blk.pwrite(c.offset, data);
      model.set(data, c.offset);
      expect(calls(mem.log)).toEqual([...c.reads, c.write]);
      expect(await readBack(blk, 0, 4 * KiB)).toEqual(model);
    });
  }

  it('reads an unaligned range through one covering aligned read', async () => {
    const { blk, mem } = await openMem({ align: 512, size: 4 * KiB, fill: 0x11 });
    expect(await readBack(blk, 100, 1000)).toEqual(new Uint8Array(1000).fill(0x11));
    expect(calls(mem.log)).toEqual(['read 0+1536']);
  });

  it('zeroes an unaligned range: head RMW, aligned middle as write-zeroes, tail RMW', async () => {
    const { blk, mem } = await openMem({ align: 512, size: 4 * KiB, fill: 0xee });
    await blk.pwriteZeroes(100, 1900);
    expect(calls(mem.log)).toEqual(['read 0+512', 'write 0+512', 'write-zeroes 512+1024', 'read 1536+512', 'write 1536+512']);
    const model = new Uint8Array(4 * KiB).fill(0xee).fill(0, 100, 2000);
    expect(await readBack(blk, 0, 4 * KiB)).toEqual(model);
  });

  it('zeroes inside one block with one RMW', async () => {
    const { blk, mem } = await openMem({ align: 512, size: 4 * KiB, fill: 0xee });
    await blk.pwriteZeroes(600, 100);
    expect(calls(mem.log)).toEqual(['read 512+512', 'write 512+512']);
    expect(await readBack(blk, 512, 512)).toEqual(new Uint8Array(512).fill(0xee).fill(0, 88, 188));
  });

  it('serialises concurrent overlapping unaligned writes so no update is lost', async () => {
    const regionBytes = 8 * KiB;
    const { blk, mem } = await openMem({ align: 512, size: regionBytes });
    let seed = 12345;
    const random = (n: number) => {
      seed = (seed * 1103515245 + 12345) % 2 ** 31;
      return seed % n;
    };
    // Random delays inside the driver let requests overtake each other unless the gate orders them.
    mem.beforeCall = async () => {
      for (let i = random(4); i > 0; i--) await settle();
    };
    const model = new Uint8Array(regionBytes);
    const requests: Array<Promise<void>> = [];
    for (let i = 0; i < 300; i++) {
      const offset = random(regionBytes - 1) | 1;
      const bytes = Math.min(1 + random(1500), regionBytes - offset);
      if (i % 5 === 4) {
        model.fill(0, offset, offset + bytes);
        requests.push(blk.pwriteZeroes(offset, bytes));
      } else {
        const data = pattern(bytes, i);
        model.set(data, offset);
        requests.push(blk.pwrite(offset, data));
      }
    }
    await Promise.all(requests);
    mem.beforeCall = null;
    expect(await readBack(blk, 0, regionBytes)).toEqual(model);
  });
});

describe('splitting by maxTransfer', () => {
  it('splits reads and writes into chunks of at most max-transfer', async () => {
    const { blk, mem } = await openMem({ 'max-transfer': 4096, size: 16 * KiB });
    const data = pattern(10000, 3);
    await blk.pwrite(0, data);
    expect(await readBack(blk, 0, 10000)).toEqual(data);
    expect(calls(mem.log)).toEqual([
      'write 0+4096', 'write 4096+4096', 'write 8192+1808',
      'read 0+4096', 'read 4096+4096', 'read 8192+1808',
    ]);
  });

  it('keeps chunks aligned when max-transfer and alignment combine', async () => {
    const { blk, mem } = await openMem({ align: 512, 'max-transfer': 1024, size: 4 * KiB });
    await blk.pwrite(100, pattern(2000, 4));
    expect(calls(mem.log)).toEqual(['read 0+512', 'read 2048+512', 'write 0+1024', 'write 1024+1024', 'write 2048+512']);
  });
});

describe('write-zeroes', () => {
  it('splits by the write-zeroes alignment: small head, aligned bulk, tail', async () => {
    const { blk, mem } = await openMem({ align: 512, 'opt-write-zero': 4096, size: 16 * KiB });
    await blk.pwriteZeroes(512, 10240);
    expect(calls(mem.log)).toEqual(['write-zeroes 512+3584', 'write-zeroes 4096+4096', 'write-zeroes 8192+2560']);
  });

  it('splits by max-write-zero', async () => {
    const { blk, mem } = await openMem({ 'max-write-zero': 4096, size: 16 * KiB });
    await blk.pwriteZeroes(0, 10000);
    expect(calls(mem.log)).toEqual(['write-zeroes 0+4096', 'write-zeroes 4096+4096', 'write-zeroes 8192+1808']);
  });

  it('falls back to zero-buffer writes, split by max-transfer, when the driver has no write-zeroes', async () => {
    const { blk, mem } = await openMem({ driver: 'test-mem-bare', 'max-transfer': 4096, size: 16 * KiB, fill: 0xff });
    await blk.pwriteZeroes(0, 10000);
    expect(calls(mem.log)).toEqual(['write 0+4096', 'write 4096+4096', 'write 8192+1808']);
    expect(await readBack(blk, 0, 10001)).toEqual(new Uint8Array(10001).fill(0, 0, 10000).fill(0xff, 10000));
  });

  it('falls back to writes when the driver says ENOTSUP, retrying write-zeroes for each chunk', async () => {
    const { blk, mem } = await openMem({ 'write-zeroes': 'enotsup', 'max-transfer': 4096, size: 16 * KiB, fill: 0xff });
    await blk.pwriteZeroes(0, 10000);
    expect(calls(mem.log)).toEqual([
      'write-zeroes 0+10000', 'write 0+4096',
      'write-zeroes 4096+5904', 'write 4096+4096',
      'write-zeroes 8192+1808', 'write 8192+1808',
    ]);
    expect(await readBack(blk, 0, 10000)).toEqual(new Uint8Array(10000));
  });

  it('keeps unaligned write-zeroes inside one zero-alignment block after a shortened fallback', async () => {
    // Fallback chunks are bounded by max-transfer (1 KiB) while the zero alignment is 4 KiB:
    // later write-zeroes attempts must still not cross a 4 KiB boundary (the driver asserts it).
    // As in QEMU, the unaligned head pieces are also bounded by max-transfer.
    const { blk, mem } = await openMem({ 'write-zeroes': 'enotsup', 'opt-write-zero': 4096, 'max-transfer': 1024, size: 16 * KiB });
    await blk.pwriteZeroes(1024, 8192);
    expect(calls(mem.log, ['write-zeroes'])).toEqual([
      'write-zeroes 1024+1024', 'write-zeroes 2048+1024', 'write-zeroes 3072+1024',
      'write-zeroes 4096+4096', 'write-zeroes 5120+1024', 'write-zeroes 6144+1024', 'write-zeroes 7168+1024',
      'write-zeroes 8192+1024',
    ]);
  });

  describe('NO_FALLBACK', () => {
    it('fails with ENOTSUP at once when the driver lacks write-zeroes', async () => {
      const { blk, mem } = await openMem({ driver: 'test-mem-bare' });
      await expect(blk.pwriteZeroes(0, 4096, Req.NO_FALLBACK)).rejects.toMatchObject({ code: 'ENOTSUP' });
      expect(mem.log).toEqual([]);
    });

    it('fails with ENOTSUP before any read-modify-write when the node does not support it', async () => {
      const { blk, mem } = await openMem({ align: 512, size: 4 * KiB, fill: 0xee });
      await expect(blk.pwriteZeroes(100, 1000, Req.NO_FALLBACK)).rejects.toMatchObject({ code: 'ENOTSUP' });
      await expect(blk.pwriteZeroes(100, 10, Req.NO_FALLBACK)).rejects.toMatchObject({ code: 'ENOTSUP' });
      expect(mem.log).toEqual([]);
    });

    it('fails with ENOTSUP on an unaligned request even when the node zeroes natively', async () => {
      const { blk, mem } = await openMem({ align: 512, 'zero-flags': Req.NO_FALLBACK });
      await expect(blk.pwriteZeroes(100, 1000, Req.NO_FALLBACK)).rejects.toMatchObject({ code: 'ENOTSUP' });
      expect(mem.log).toEqual([]);
    });

    it('passes NO_FALLBACK down and does not fall back when the driver says ENOTSUP', async () => {
      const { blk, mem } = await openMem({ 'zero-flags': Req.NO_FALLBACK, 'write-zeroes': 'enotsup' });
      await expect(blk.pwriteZeroes(0, 4096, Req.NO_FALLBACK)).rejects.toMatchObject({ code: 'ENOTSUP' });
      expect(calls(mem.log)).toEqual(['write-zeroes 0+4096/0x100']);
    });

    it('succeeds when the driver zeroes natively', async () => {
      const { blk, mem } = await openMem({ 'zero-flags': Req.NO_FALLBACK });
      await blk.pwriteZeroes(0, 4096, Req.NO_FALLBACK);
      expect(calls(mem.log)).toEqual(['write-zeroes 0+4096/0x100']);
    });
  });

  describe('MAY_UNMAP', () => {
    it('is stripped unless the node was opened with discard=unmap', async () => {
      const { blk, mem } = await openMem({ 'zero-flags': Req.MAY_UNMAP });
      await blk.pwriteZeroes(0, 4096, Req.MAY_UNMAP);
      expect(calls(mem.log)).toEqual(['write-zeroes 0+4096']);
    });

    it('reaches the driver with discard=unmap and deallocates', async () => {
      const { node, blk, mem } = await openMem({ 'zero-flags': Req.MAY_UNMAP, discard: 'unmap', fill: 0xee });
      await blk.pwriteZeroes(0, 4096, Req.MAY_UNMAP);
      expect(calls(mem.log)).toEqual(['write-zeroes 0+4096/0x4']);
      expect((await blockStatus(node, 0, 4096)).status & Status.ZERO).toBe(Status.ZERO);
    });

    it('is dropped when the driver does not honour it', async () => {
      const { blk, mem } = await openMem({ discard: 'unmap' });
      await blk.pwriteZeroes(0, 4096, Req.MAY_UNMAP);
      expect(calls(mem.log)).toEqual(['write-zeroes 0+4096']);
    });
  });
});

describe('FUA', () => {
  it('is emulated by one flush after all chunks of a split write', async () => {
    const { blk, mem } = await openMem({ 'max-transfer': 4096 });
    await blk.pwrite(0, pattern(10000, 5), Req.FUA);
    expect(calls(mem.log)).toEqual(['write 0+4096', 'write 4096+4096', 'write 8192+1808', 'flush 0+0']);
  });

  it('is passed to a driver that honours it, with no flush', async () => {
    const { blk, mem } = await openMem({ 'max-transfer': 4096, 'write-flags': Req.FUA });
    await blk.pwrite(0, pattern(5000, 5), Req.FUA);
    expect(calls(mem.log)).toEqual(['write 0+4096/0x10', 'write 4096+904/0x10']);
  });

  it('flushes even when a flush just happened (the FUA write itself is new)', async () => {
    const { blk, mem } = await openMem();
    await blk.pwrite(0, pattern(512, 1));
    await blk.flush();
    await blk.pwrite(0, pattern(512, 2), Req.FUA);
    expect(calls(mem.log)).toEqual(['write 0+512', 'flush 0+0', 'write 0+512', 'flush 0+0']);
    await blk.flush();
    expect(calls(mem.log, ['flush'])).toHaveLength(2);
  });

  it('on write-zeroes: native FUA, or one flush at the end', async () => {
    const native = await openMem({ 'zero-flags': Req.FUA });
    await native.blk.pwriteZeroes(0, 4096, Req.FUA);
    expect(calls(native.mem.log)).toEqual(['write-zeroes 0+4096/0x10']);

    const emulated = await openMem({ 'max-write-zero': 4096 });
    await emulated.blk.pwriteZeroes(0, 10000, Req.FUA);
    expect(calls(emulated.mem.log)).toEqual(['write-zeroes 0+4096', 'write-zeroes 4096+4096', 'write-zeroes 8192+1808', 'flush 0+0']);
  });

  it('on the zero-buffer fallback: one flush, or FUA on the writes when they honour it', async () => {
    const emulated = await openMem({ driver: 'test-mem-bare', 'max-transfer': 4096 });
    await emulated.blk.pwriteZeroes(0, 8192, Req.FUA);
    expect(calls(emulated.mem.log)).toEqual(['write 0+4096', 'write 4096+4096', 'flush 0+0']);

    const native = await openMem({ driver: 'test-mem-bare', 'max-transfer': 4096, 'write-flags': Req.FUA });
    await native.blk.pwriteZeroes(0, 8192, Req.FUA);
    expect(calls(native.mem.log)).toEqual(['write 0+4096/0x10', 'write 4096+4096/0x10']);
  });

  it('is added to every write of a writethrough backend', async () => {
    const { blk, mem } = await openMem({}, { writeCache: false });
    await blk.pwrite(0, pattern(512, 1));
    await blk.pwrite(512, pattern(512, 2));
    expect(calls(mem.log)).toEqual(['write 0+512', 'flush 0+0', 'write 512+512', 'flush 0+0']);
  });
});

describe('discard', () => {
  it('is ignored unless the node was opened with discard=unmap', async () => {
    const { blk, mem } = await openMem({ fill: 0xee });
    await blk.pdiscard(0, 4096);
    expect(mem.log).toEqual([]);
    expect(await readBack(blk, 0, 4096)).toEqual(new Uint8Array(4096).fill(0xee));
  });

  it('reaches the driver with discard=unmap', async () => {
    const { blk, mem } = await openMem({ discard: 'unmap' });
    await blk.pdiscard(0, 4096);
    expect(calls(mem.log)).toEqual(['discard 0+4096']);
  });

  it('succeeds when the driver says ENOTSUP or has no discard', async () => {
    const enotsup = await openMem({ discard: 'unmap', pdiscard: 'enotsup' });
    await enotsup.blk.pdiscard(0, 4096);
    expect(calls(enotsup.mem.log)).toEqual(['discard 0+4096']);
    const bare = await openMem({ driver: 'test-mem-bare', discard: 'unmap' });
    await bare.blk.pdiscard(0, 4096);
    expect(bare.mem.log).toEqual([]);
  });

  it('fragments as QEMU does: small head up to the discard alignment, aligned bulk, tail', async () => {
    const { blk, mem } = await openMem({ discard: 'unmap', 'opt-discard': 4096, size: 16 * KiB });
    await blk.pdiscard(100, 10000);
    expect(calls(mem.log)).toEqual(['discard 100+3996', 'discard 4096+4096', 'discard 8192+1908']);
  });

  it('splits by max-discard', async () => {
    const { blk, mem } = await openMem({ discard: 'unmap', 'max-discard': 4096, size: 16 * KiB });
    await blk.pdiscard(0, 10000);
    expect(calls(mem.log)).toEqual(['discard 0+4096', 'discard 4096+4096', 'discard 8192+1808']);
  });

  it('drops fragments smaller than the request alignment instead of sending them unaligned', async () => {
    const { blk, mem } = await openMem({ discard: 'unmap', align: 512, 'opt-discard': 4096, size: 16 * KiB });
    await blk.pdiscard(100, 8092);
    await blk.pdiscard(8192, 5000);
    expect(calls(mem.log)).toEqual(['discard 512+3584', 'discard 4096+4096', 'discard 8192+4096', 'discard 12288+512']);
  });
});

describe('permissions and ranges', () => {
  it('refuses writes to a read-only node with EPERM', async () => {
    const { blk, node } = await openMem({ 'read-only': true }, { writable: false, resizable: false });
    await expect(blk.pwrite(0, new Uint8Array(512))).rejects.toMatchObject({ code: 'EPERM' });
    await expect(blk.pwriteZeroes(0, 512)).rejects.toMatchObject({ code: 'EPERM' });
    await expect(blk.pdiscard(0, 512)).rejects.toMatchObject({ code: 'EPERM' });
    await expect(pwritev(blk.root, 0, new Uint8Array(512))).rejects.toMatchObject({ code: 'EPERM' });
    expect(() => new BlockBackend(memGraph(), node, { writable: true })).toThrow(/read-only/);
    await flush(node);
    expect(memOf(node).log).toEqual([]);
  });

  it('refuses writes through an edge without write permission', async () => {
    const { graph, node } = await openMem();
    const reader = new BlockBackend(graph, node, { writable: false });
    await expect(reader.pwrite(0, new Uint8Array(1))).rejects.toMatchObject({ code: 'EPERM' });
  });

  it('fails requests beyond the end at the backend with EIO', async () => {
    const { blk } = await openMem({ size: 4096 });
    await expect(blk.pread(4000, new Uint8Array(200))).rejects.toMatchObject({ code: 'EIO' });
    await expect(blk.pwrite(4096, new Uint8Array(1))).rejects.toMatchObject({ code: 'EIO' });
    await expect(blk.pwriteZeroes(0, 4097)).rejects.toMatchObject({ code: 'EIO' });
    await expect(blk.pdiscard(5000, 1)).rejects.toMatchObject({ code: 'EIO' });
    await expect(blk.pread(-1, new Uint8Array(1))).rejects.toMatchObject({ code: 'EIO' });
    await blk.pread(4096, new Uint8Array(0));
  });

  it('refuses writes past the end through an edge without resize permission', async () => {
    const { graph, node } = await openMem({ size: 4096 });
    const blk = new BlockBackend(graph, node, { writable: true });
    await expect(pwritev(blk.root, 4000, new Uint8Array(200))).rejects.toMatchObject({ code: 'EIO' });
  });

  it('grows the node, in whole sectors, on a write past the end with resize permission', async () => {
    const { blk, node } = await openMem({ size: 0 }, { allowWriteBeyondEof: true });
    await blk.pwrite(0, pattern(100, 1));
    expect(node.totalBytes).toBe(512);
    const expected = new Uint8Array(512);
    expected.set(pattern(100, 1));
    expect(await readBack(blk, 0, 512)).toEqual(expected);
  });

  it('does not grow the node when a write past the end fails', async () => {
    const { blk, node, mem } = await openMem({ size: 0 }, { allowWriteBeyondEof: true });
    mem.beforeCall = () => Promise.reject(new Error('injected'));
    await expect(blk.pwrite(0, new Uint8Array(100))).rejects.toThrow('injected');
    expect(node.totalBytes).toBe(0);
  });
});

describe('reads past the end of a node', () => {
  it('zero-fill the last partial sector', async () => {
    const { blk, node, mem } = await openMem({ size: 1000, fill: 0xaa });
    expect(node.totalBytes).toBe(1024);
    const expected = new Uint8Array(1024).fill(0xaa).fill(0, 1000);
    expect(await readBack(blk, 0, 1024)).toEqual(expected);
    expect(calls(mem.log)).toEqual(['read 0+1024']);
  });

  it('return zeroes without asking the driver beyond the aligned end', async () => {
    const { blk, mem } = await openMem({ size: 1024, fill: 0xaa });
    const buf = new Uint8Array(1024).fill(1);
    await preadv(blk.root, 512, buf);
    expect(buf).toEqual(new Uint8Array(1024).fill(0xaa, 0, 512).fill(0, 512));
    await preadv(blk.root, 4096, buf);
    expect(buf).toEqual(new Uint8Array(1024));
    expect(calls(mem.log)).toEqual(['read 512+512']);
  });
});

describe('flush and write generations', () => {
  it('skips the disk flush when nothing was written since the last one', async () => {
    const { blk, mem } = await openMem({ discard: 'unmap' });
    await blk.flush();
    expect(calls(mem.log, ['flush'])).toEqual([]);
    await blk.pwrite(0, pattern(512, 1));
    await blk.flush();
    await blk.flush();
    expect(calls(mem.log, ['flush'])).toHaveLength(1);
    await blk.pwriteZeroes(0, 512);
    await blk.flush();
    expect(calls(mem.log, ['flush'])).toHaveLength(2);
    await blk.pdiscard(0, 512);
    await blk.flush();
    expect(calls(mem.log, ['flush'])).toHaveLength(3);
  });

  it('lets concurrent flushes of one generation share one disk flush', async () => {
    const { blk, mem } = await openMem();
    await blk.pwrite(0, pattern(512, 1));
    await Promise.all([blk.flush(), blk.flush(), blk.flush()]);
    expect(calls(mem.log, ['flush'])).toHaveLength(1);
  });

  it('never flushes the disk with cache.no-flush', async () => {
    const { blk, mem } = await openMem({ cache: { 'no-flush': true } });
    await blk.pwrite(0, pattern(512, 1), Req.FUA);
    await blk.flush();
    expect(calls(mem.log, ['flush'])).toEqual([]);
  });

  it('flushes the children a node writes to', async () => {
    const graph = memGraph();
    const raw = await graph.openNode({ driver: 'raw', file: { driver: 'test-mem', 'node-name': 'mem' } });
    const blk = new BlockBackend(graph, raw, { writable: true });
    const mem = memOf(graph.node('mem'));
    await blk.pwrite(0, pattern(512, 1));
    await Promise.all([blk.flush(), blk.flush()]);
    expect(calls(mem.log)).toEqual(['write 0+512', 'flush 0+0']);
  });
});

describe('truncate', () => {
  it('grows and shrinks the node, rounding the length to whole sectors', async () => {
    const { blk, node, mem } = await openMem({ size: 4096, fill: 0xaa });
    await blk.truncate(8192);
    expect(node.totalBytes).toBe(8192);
    expect(mem.data.length).toBe(8192);
    expect(await readBack(blk, 4096, 4096)).toEqual(new Uint8Array(4096));
    await blk.truncate(1000);
    expect(node.totalBytes).toBe(1024);
    expect(calls(mem.log, ['truncate'])).toEqual(['truncate 8192+0', 'truncate 1000+0']);
  });

  it('needs resize permission, a writable node and a sane size', async () => {
    const { graph, node, blk } = await openMem();
    const fixed = new BlockBackend(graph, node, { writable: true });
    await expect(fixed.truncate(8192)).rejects.toMatchObject({ code: 'EPERM' });
    await expect(blk.truncate(-1)).rejects.toMatchObject({ code: 'EINVAL' });
    const ro = await openMem({ 'read-only': true }, { writable: false, resizable: false });
    await expect(ro.blk.truncate(8192)).rejects.toMatchObject({ code: 'EACCES' });
  });

  it('refuses to resize a raw window', async () => {
    const graph = memGraph();
    const raw = await graph.openNode({ driver: 'raw', offset: 512, size: 1024, file: { driver: 'test-mem' } });
    const blk = new BlockBackend(graph, raw, { writable: true, resizable: true });
    await expect(blk.truncate(2048)).rejects.toMatchObject({ code: 'ENOTSUP', message: 'Cannot resize fixed-size raw disks' });
  });
});

describe('detect-zeroes', () => {
  it('on: turns an all-zero write into write-zeroes without MAY_UNMAP', async () => {
    const { blk, mem } = await openMem({ 'detect-zeroes': 'on', 'zero-flags': Req.MAY_UNMAP });
    await blk.pwrite(0, new Uint8Array(4096));
    await blk.pwrite(4096, pattern(512, 1));
    expect(calls(mem.log)).toEqual(['write-zeroes 0+4096', 'write 4096+512']);
  });

  it('unmap: adds MAY_UNMAP (with discard=unmap), so the range is deallocated', async () => {
    const { blk, node, mem } = await openMem({ 'detect-zeroes': 'unmap', discard: 'unmap', 'zero-flags': Req.MAY_UNMAP, fill: 0xee });
    await blk.pwrite(0, new Uint8Array(4096));
    expect(calls(mem.log)).toEqual(['write-zeroes 0+4096/0x4']);
    expect((await blockStatus(node, 0, 4096)).status & (Status.ZERO | Status.DATA)).toBe(Status.ZERO);
  });

  it('unmap is refused without discard=unmap', async () => {
    await expect(openMem({ 'detect-zeroes': 'unmap' })).rejects.toMatchObject({ code: 'EINVAL' });
  });

  it('writes normally when the driver has no write-zeroes', async () => {
    const { blk, mem } = await openMem({ driver: 'test-mem-bare', 'detect-zeroes': 'on' });
    await blk.pwrite(0, new Uint8Array(4096));
    expect(calls(mem.log)).toEqual(['write 0+4096']);
  });
});

describe('drain', () => {
  it('waits for requests in flight and holds new backend requests until it ends', async () => {
    const { blk, node, mem } = await openMem();
    const gate = latch();
    mem.beforeCall = () => gate.wait();
    const write = blk.pwrite(0, pattern(512, 1));
    await settle();
    expect(node.inFlight).toBe(1);
    expect(blk.inFlight).toBe(1);

    let drained = false;
    const draining = drainedBegin(node).then(() => (drained = true));
    const read = readBack(blk, 0, 512);
    await settle();
    expect(drained).toBe(false);
    expect(calls(mem.log)).toEqual(['write 0+512']);

    gate.open();
    await draining;
    await write;
    expect(node.inFlight).toBe(0);
    await settle();
    expect(calls(mem.log)).toEqual(['write 0+512']);

    drainedEnd(node);
    expect(await read).toEqual(pattern(512, 1));
    expect(calls(mem.log)).toEqual(['write 0+512', 'read 0+512']);
  });

  it('does not hold requests the gate issues below the drained node', async () => {
    const graph = memGraph();
    const raw = await graph.openNode({ driver: 'raw', file: { driver: 'test-mem', 'node-name': 'mem' } });
    // A writer of the raw node, so that raw takes write on its file (raw_child_perm).
    new BlockBackend(graph, raw, { writable: true });
    const mem = memOf(graph.node('mem'));
    await drainedBegin(raw);
    await pwriteZeroes(raw.file!, 0, 512);
    drainedEnd(raw);
    expect(calls(mem.log)).toEqual(['write-zeroes 0+512']);
  });
});

describe('in-flight accounting', () => {
  it('counts each request from gate entry to completion, also when it fails', async () => {
    const { blk, node, mem } = await openMem();
    mem.beforeCall = () => Promise.reject(new Error('injected'));
    await expect(blk.pwrite(0, new Uint8Array(10))).rejects.toThrow('injected');
    await expect(blk.pread(0, new Uint8Array(10))).rejects.toThrow('injected');
    expect(node.inFlight).toBe(0);
    expect(node.tracked.size).toBe(0);
    expect(node.serialisingInFlight).toBe(0);
  });
});
