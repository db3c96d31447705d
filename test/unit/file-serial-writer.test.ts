/*
 * The file driver's writer thread for large buffered writes
 * (drivers/file/serial-writer.ts, native/writer.c): writes land where they
 * were asked to, in queue order, a failing one rejects with its errno as a
 * BlockError, close waits for the queue and leaves the descriptor (and its
 * image locks) to the caller, a queued write keeps the process alive, and
 * the driver routes only large buffered writes of writable files there.
 */
import { spawnSync } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { describe, expect, it } from 'vitest';
import { BlockError } from '../../block/errors.js';
import { pwriteHost, SERIAL_WRITE_MIN_BYTES, SYNC_WRITE_MAX_BYTES } from '../../drivers/file/direct-io.js';
import { openSerialWriter, type SerialWriter } from '../../drivers/file/serial-writer.js';
import { nativeAddon } from '../../block/native-addon.js';
import { scratchDir } from '../helpers/tmp.js';

const root = scratchDir('qbt-serial-writer-');
const forcedFallback = process.env.QEMU_BLOCK_TS_NO_NATIVE === '1';
/** Without the addon these skip, loudly, unless REQUIRE_PEERS=1 demands them (then they fail). */
const skipNative = nativeAddon() === null && (forcedFallback || process.env.REQUIRE_PEERS !== '1');
if (skipNative) {
  console.warn('!!! file-serial-writer: native addon NOT loaded - tests SKIPPED (node scripts/build-native.mjs; REQUIRE_PEERS=1 makes this fail)');
}
const MiB = 1 << 20;
/** Runs of each exit case: a crash at teardown was a race, seen in about 1 of 20 runs under load. */
const EXIT_ROUNDS = 10;

async function withWriter<T>(name: string, flags: string, body: (w: SerialWriter, fh: fs.promises.FileHandle, file: string) => Promise<T>): Promise<T> {
  const file = path.join(root, name);
  const fh = await fs.promises.open(file, flags);
  const writer = openSerialWriter(fh.fd);
  expect(writer).not.toBeNull();
  try {
    return await body(writer!, fh, file);
  } finally {
    await writer!.close();
    await fh.close();
  }
}

describe.skipIf(skipNative)('SerialWriter', () => {
  it('writes every byte where asked, settling in queue order; a later overlapping write wins', async () => {
    await withWriter('order.bin', 'w+', async (writer, _fh, file) => {
      const settled: number[] = [];
      const pieces = Array.from({ length: 6 }, (_, i) => Buffer.alloc(MiB + 17 * i, i + 1));
      const writes = pieces.map((p, i) => writer.write(p, (5 - i) * MiB).then(() => settled.push(i)));
      const overlap = writer.write(Buffer.alloc(4096, 0xee), 0).then(() => settled.push(6));
      await Promise.all([...writes, overlap]);
      expect(settled).toEqual([0, 1, 2, 3, 4, 5, 6]);
      const back = await fs.promises.readFile(file);
      expect(back.length).toBe(6 * MiB);
      expect(back.subarray(0, 4096).every((b) => b === 0xee)).toBe(true);
      expect(back[4096]).toBe(6);
      for (let i = 0; i < 5; i++) expect(back[(5 - i) * MiB + 200]).toBe(i + 1); // past the next piece's 17-byte overhangs
    });
  });

  it('writes a view at its own offset into a larger buffer', async () => {
    await withWriter('view.bin', 'w+', async (writer, _fh, file) => {
      const big = Buffer.alloc(3 * MiB);
      big.fill(1, 0, MiB).fill(2, MiB, 2 * MiB).fill(3, 2 * MiB);
      await writer.write(new Uint8Array(big.buffer, big.byteOffset + MiB, MiB), 0);
      const back = await fs.promises.readFile(file);
      expect(back.length).toBe(MiB);
      expect(back.every((b) => b === 2)).toBe(true);
    });
  });

  it('rejects a write the file refuses with its errno, and goes on with the next', async () => {
    const file = path.join(root, 'ro.bin');
    fs.writeFileSync(file, Buffer.alloc(4096));
    await withWriter('ro.bin', 'r', async (writer) => {
      const failed = writer.write(Buffer.alloc(MiB, 1), 0);
      await expect(failed).rejects.toBeInstanceOf(BlockError);
      await expect(failed).rejects.toMatchObject({ code: 'EBADF', message: 'Bad file descriptor' });
      await expect(writer.write(Buffer.alloc(MiB, 1), 0)).rejects.toMatchObject({ code: 'EBADF' });
    });
    void file;
  });

  it('close waits for the queued writes and leaves the descriptor open', async () => {
    await withWriter('close.bin', 'w+', async (writer, fh) => {
      let done = 0;
      for (let i = 0; i < 8; i++) void writer.write(Buffer.alloc(2 * MiB, i), i * 2 * MiB).then(() => done++);
      await writer.close();
      expect(done).toBe(8);
      expect((await fh.stat()).size).toBe(16 * MiB);
      const probe = Buffer.alloc(1);
      await fh.read(probe, 0, 1, 15 * MiB);
      expect(probe[0]).toBe(7);
      await expect(writer.write(Buffer.alloc(1), 0)).rejects.toBeInstanceOf(BlockError);
      await expect(writer.write(Buffer.alloc(1), 0)).rejects.toMatchObject({ code: 'EBADF', message: 'Bad file descriptor' });
    });
  });

  it('keeps the process alive while a write is queued', () => {
    const file = path.join(root, 'alive.bin');
    // The compiled module (npm test builds first): a child runs it without the test's transform.
    const module = path.resolve('dist/drivers/file/serial-writer.js');
    const script = `
      import fs from 'node:fs';
      import { openSerialWriter } from ${JSON.stringify(module)};
      const fd = fs.openSync(${JSON.stringify(file)}, 'w');
      const w = openSerialWriter(fd);
      w.write(Buffer.alloc(64 << 20, 5), 0).then(() => console.log('written', fs.fstatSync(fd).size));
    `;
    const run = spawnSync(process.execPath, ['--input-type=module', '-e', script], { encoding: 'utf8', timeout: 60_000 });
    expect(run.stderr).toBe('');
    expect(run.stdout.trim()).toBe(`written ${64 << 20}`);
  });

  it('ends cleanly at exit: a writer left open, one closed just before, one with a write in flight at process.exit', () => {
    const module = path.resolve('dist/drivers/file/serial-writer.js');
    const script = (mode: string, file: string) => `
      import fs from 'node:fs';
      import { openSerialWriter } from ${JSON.stringify(module)};
      const fd = fs.openSync(${JSON.stringify(file)}, 'w');
      const w = openSerialWriter(fd);
      const mode = ${JSON.stringify(mode)};
      const written = w.write(Buffer.alloc(8 << 20, 1), 0);
      if (mode === 'closed') written.then(() => w.close());
      if (mode === 'exit') setImmediate(() => process.exit(0));
    `;
    const statuses = new Map<string, number>();
    for (let round = 0; round < EXIT_ROUNDS; round++) {
      for (const mode of ['open', 'closed', 'exit']) {
        const file = path.join(root, `exit-${mode}.bin`);
        const run = spawnSync(process.execPath, ['--input-type=module', '-e', script(mode, file)], { encoding: 'utf8', timeout: 60_000 });
        const key = `${mode} ${run.status ?? run.signal} ${run.stderr.trim()}`;
        statuses.set(key, (statuses.get(key) ?? 0) + 1);
      }
    }
    expect(Object.fromEntries(statuses)).toEqual({ 'open 0 ': EXIT_ROUNDS, 'closed 0 ': EXIT_ROUNDS, 'exit 0 ': EXIT_ROUNDS });
  });

  it('the driver sends large buffered writes there, small ones stay on the calling thread', async () => {
    await withWriter('route.bin', 'w+', async (writer, fh) => {
      const seen: number[] = [];
      const spy: SerialWriter = { write: (buf, at) => (seen.push(buf.length), writer.write(buf, at)), close: () => writer.close() };
      const host = { fh, direct: null, syncIo: false, serialWriter: spy };
      await pwriteHost(host, 0, Buffer.alloc(SERIAL_WRITE_MIN_BYTES - 1, 1));
      await pwriteHost(host, 0, Buffer.alloc(SERIAL_WRITE_MIN_BYTES, 2));
      const sync = { ...host, syncIo: true };
      await pwriteHost(sync, 0, Buffer.alloc(SYNC_WRITE_MAX_BYTES - 1, 3));
      await pwriteHost(sync, 0, Buffer.alloc(SYNC_WRITE_MAX_BYTES, 4));
      expect(seen).toEqual([SERIAL_WRITE_MIN_BYTES, SYNC_WRITE_MAX_BYTES]);
      const probe = Buffer.alloc(1);
      await fh.read(probe, 0, 1, 0);
      expect(probe[0]).toBe(4);
    });
  });
});
