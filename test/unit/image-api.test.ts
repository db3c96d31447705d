import fs from 'node:fs';
import path from 'node:path';
import { describe, expect, it } from 'vitest';
import { createImage, openImage, BlockError } from '../../index.js';
import { scratchDir } from '../helpers/tmp.js';

const dir = scratchDir();

describe('Image (library API)', () => {
  it('writes, reads, zeroes, discards and reports extents of a raw file', async () => {
    const file = path.join(dir, 'api.raw');
    fs.writeFileSync(file, Buffer.alloc(0));
    fs.truncateSync(file, 4 << 20);
    const img = await openImage(file, { format: 'raw', discard: 'unmap' });
    expect(img.size).toBe(4 << 20);
    await img.write(1 << 20, new Uint8Array(65536).fill(0xab), { fua: true });
    expect(Array.from(await img.read((1 << 20) + 100, 4))).toEqual([0xab, 0xab, 0xab, 0xab]);
    await img.writeZeroes(1 << 20, 4096, { unmap: true });
    expect((await img.read(1 << 20, 4096)).every((b) => b === 0)).toBe(true);
    await img.discard(2 << 20, 1 << 20);
    await img.flush();
    const extents = [];
    for await (const e of img.extents()) extents.push(e);
    expect(extents[0]!.offset).toBe(0);
    const covered = extents.reduce((n, e) => n + e.length, 0);
    expect(covered).toBe(4 << 20);
    const data = extents.filter((e) => e.data);
    expect(data.length).toBeGreaterThan(0);
    for (const e of extents) expect(e.depth).toBe(1);
    await img.close();
  });

  it('rejects requests beyond the end with EIO and writes to read-only images with EPERM', async () => {
    const file = path.join(dir, 'small.raw');
    fs.writeFileSync(file, Buffer.alloc(8192));
    const img = await openImage(file, { format: 'raw' });
    await expect(img.read(8000, 1000)).rejects.toMatchObject({ code: 'EIO' });
    await img.close();
    const ro = await openImage(file, { format: 'raw', readOnly: true });
    const err = await ro.write(0, new Uint8Array(512)).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(BlockError);
    expect((err as BlockError).code).toBe('EPERM');
    await ro.close();
  });

  it('resizes', async () => {
    const file = path.join(dir, 'grow.raw');
    fs.writeFileSync(file, Buffer.alloc(4096));
    const img = await openImage(file, { format: 'raw' });
    await img.resize(1 << 20);
    expect(img.size).toBe(1 << 20);
    expect(fs.statSync(file).size).toBe(1 << 20);
    await img.close();
  });
});

describe('createImage, info and map (library API)', () => {
  it('creates a raw image like qemu-img create, then reports info and map', async () => {
    const file = path.join(dir, 'created.raw');
    await createImage(file, { sizeBytes: 1000, options: { preallocation: 'off' } });
    // qemu-img rounds to whole sectors and writes the first block.
    expect(fs.statSync(file).size).toBe(1024);
    const img = await openImage(file, { format: 'raw' });
    const info = await img.info();
    expect(Object.keys(info)).toEqual(['virtual-size', 'filename', 'format', 'actual-size', 'dirty-flag']);
    expect(info).toMatchObject({ 'virtual-size': 1024, filename: file, format: 'raw', 'dirty-flag': false });
    const entries = [];
    for await (const e of img.map()) entries.push(e);
    expect(entries).toEqual([{ start: 0, length: 1024, depth: 0, present: true, zero: false, data: true, offset: 0, filename: file }]);
    await img.close();
  });

  it('refuses unknown formats and options with qemu-img messages', async () => {
    const file = path.join(dir, 'bad.raw');
    await expect(createImage(file, { format: 'nosuch', sizeBytes: 4096 })).rejects.toThrow("Unknown file format 'nosuch'");
    await expect(createImage(file, { sizeBytes: 4096, options: { foo: 'bar' } })).rejects.toThrow("Invalid parameter 'foo'");
  });
});
