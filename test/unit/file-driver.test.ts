/*
 * The `file` protocol driver through a BlockGraph and a BlockBackend (raw on
 * file, as qemu-img and qemu-io open images): cache.direct=on (O_DIRECT) at
 * any offset and length, its refusals, the create options, and the open,
 * create and resize messages. Where qemu-img and qemu-io are installed the
 * messages are also checked against QEMU 7.2's own (stderr, minus the
 * `qemu-img: FILE: ` / `qemu-io: can't open device FILE: ` prefixes).
 *
 * O_DIRECT needs the native addon (aligned memory). Without it
 * (QEMU_BLOCK_TS_NO_NATIVE=1, or not built) every O_DIRECT test asserts the
 * clean refusal instead: ENOTSUP with one line naming the file.
 *
 * Host facts relied on (Linux 6.x, ext4 temp dir): O_DIRECT on ext4 checks
 * alignment (EINVAL), so a non-empty file probes to its logical block size
 * and an empty one to 4096; ext4 directories refuse O_DIRECT with EINVAL;
 * tmpfs takes O_DIRECT since Linux 6.6 without checking (probe: 4096) and
 * refuses FS_IOC_FSSETXATTR with an extent size (EOPNOTSUPP).
 */
import fs from 'node:fs';
import path from 'node:path';
import { afterEach, beforeEach, describe, expect, it, vi } from 'vitest';
import { BlockBackend } from '../../block/backend.js';
import { BlockError } from '../../block/errors.js';
import { BlockGraph } from '../../block/graph.js';
import type { BlockNode } from '../../block/node.js';
import { builtinDrivers } from '../../drivers/index.js';
import { FILE_CREATE_OPTS } from '../../drivers/file/create.js';
import { DIRECT_BOUNCE_BYTES, DIRECT_BOUNCES_MAX, DirectIo, MAX_BLOCK_BYTES, type HostFile } from '../../drivers/file/direct-io.js';
import { loadHostIo } from '../../drivers/file/host-io.js';
import { missingPeers } from '../helpers/peers.js';
import { run } from '../helpers/run.js';
import { scratchDir } from '../helpers/tmp.js';

const KiB = 1024;
const MiB = 1024 * KiB;
const SECTOR_BYTES = 512;
const STAT_BLOCK_BYTES = 512;
const O_DIRECT = (fs.constants as { O_DIRECT?: number }).O_DIRECT;
const SHM_DIR = '/dev/shm';

const host = loadHostIo();
const dir = scratchDir('file-driver-');
const noQemu = missingPeers('qemu-img', 'qemu-io');
const hasShm = (() => {
  try {
    fs.accessSync(SHM_DIR, fs.constants.W_OK);
    return true;
  } catch {
    return false;
  }
})();

let graph: BlockGraph;
/** What the graph warned about during the current test. */
let warnings: string[];
beforeEach(() => {
  graph = new BlockGraph(builtinDrivers);
  warnings = [];
  graph.onWarning = (m) => warnings.push(m);
});
afterEach(() => {
  vi.restoreAllMocks();
});

// ---- helpers --------------------------------------------------------------

let fileCounter = 0;
function scratchFile(name: string, parent = dir): string {
  return path.join(parent, `${++fileCounter}-${name}`);
}

/** Byte i of the test pattern (never all zeroes over a sector). */
const patternByte = (i: number) => (i * 7 + 13) & 0xff;

function patternFile(filename: string, bytes: number): Uint8Array {
  const data = Uint8Array.from({ length: bytes }, (_, i) => patternByte(i));
  fs.writeFileSync(filename, data);
  return data;
}

async function thrown(promise: Promise<unknown>): Promise<BlockError> {
  const e = await promise.then(
    () => null,
    (err: unknown) => err,
  );
  expect(e).toBeInstanceOf(BlockError);
  return e as BlockError;
}

const NO_ADDON = (f: string) =>
  `Could not open '${f}': cache.direct=on needs the native hostio addon for aligned memory, and it is not loaded`;

async function openBackend(filename: string, opts: { direct?: boolean; readOnly?: boolean } = {}): Promise<BlockBackend> {
  const node = await graph.openImage(filename, {
    format: 'raw',
    readOnly: opts.readOnly ?? false,
    protocolOptions: opts.direct ? { cache: { direct: true } } : {},
  });
  return new BlockBackend(graph, node, { writable: !opts.readOnly, resizable: !opts.readOnly });
}

/**
 * Opens `filename` with cache.direct=on and runs `body`, then closes. Without
 * the addon, asserts the refusal instead and skips `body`.
 */
async function withDirect(filename: string, body: (blk: BlockBackend, file: BlockNode) => Promise<void>): Promise<void> {
  if (!host.native) {
    const e = await thrown(openBackend(filename, { direct: true }));
    expect(e.code).toBe('ENOTSUP');
    expect(e.message).toBe(NO_ADDON(filename));
    return;
  }
  const blk = await openBackend(filename, { direct: true });
  try {
    await body(blk, blk.node.file!.node);
  } finally {
    await blk.close();
  }
}

/** Whether `target` opens with O_DIRECT (false: EINVAL, the file system refuses). */
function opensDirect(target: string): boolean {
  try {
    fs.closeSync(fs.openSync(target, fs.constants.O_RDONLY | O_DIRECT!));
    return true;
  } catch (e) {
    if ((e as { code?: string }).code === 'EINVAL') return false;
    throw e;
  }
}

/** Writes `len` bytes at `offset` through blk and the model, then checks a wider window. */
async function writeAndCheck(blk: BlockBackend, model: Uint8Array, offset: number, len: number, fill: number) {
  const data = new Uint8Array(len).fill(fill);
  await blk.pwrite(offset, data);
  model.set(data, offset);
  const start = Math.max(0, offset - 700);
  const end = Math.min(model.length, offset + len + 700);
  const back = new Uint8Array(end - start);
  await blk.pread(start, back);
  expect(Buffer.from(back).equals(Buffer.from(model.subarray(start, end)))).toBe(true);
}

/** Small deterministic PRNG (xorshift32), so a failure replays. */
function prng(seed: number): () => number {
  let x = seed;
  return () => {
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    return (x >>> 0) / 2 ** 32;
  };
}

/** The message qemu-img prints for a create, minus `qemu-img: FILE: `. */
async function qemuCreateError(filename: string, oOption: string, size = '1M'): Promise<string> {
  const r = await run('qemu-img', ['create', '-f', 'raw', '-o', oOption, filename, size]);
  expect(r.code).toBe(1);
  const line = r.stderr.replace(/\n$/, '').split('\n').pop()!;
  const prefix = `qemu-img: ${filename}: `;
  expect(line.startsWith(prefix)).toBe(true);
  return line.slice(prefix.length);
}

/** The message qemu-io prints when it cannot open, minus its prefix. */
async function qemuOpenError(filename: string, extraArgs: string[]): Promise<string> {
  const r = await run('qemu-io', [...extraArgs, '-f', 'raw', '-c', 'read 0 512', filename]);
  expect(r.code).toBe(1);
  const prefix = `qemu-io: can't open device ${filename}: `;
  const line = r.stderr.replace(/\n$/, '');
  expect(line.startsWith(prefix)).toBe(true);
  return line.slice(prefix.length);
}

// ---- cache.direct=on --------------------------------------------------------

describe('cache.direct=on (O_DIRECT)', () => {
  it('probes the alignment: the logical block size for data, 4096 for an empty file', async () => {
    const full = scratchFile('probe.raw');
    patternFile(full, 64 * KiB);
    await withDirect(full, async (_blk, file) => {
      expect([512, 1024, 2048, 4096]).toContain(file.limits.requestAlignment);
    });
    const empty = scratchFile('empty.raw');
    fs.writeFileSync(empty, '');
    await withDirect(empty, async (_blk, file) => {
      expect(file.limits.requestAlignment).toBe(MAX_BLOCK_BYTES);
    });
  });

  it('reads and writes at unaligned offsets and lengths, across bounce buffers', async () => {
    const f = scratchFile('unaligned.raw');
    const model = patternFile(f, 3 * MiB);
    await withDirect(f, async (blk) => {
      const cases: Array<[number, number]> = [
        [0, 1],
        [1, 511],
        [511, 2],
        [777, 4096],
        [4095, 4098],
        [MiB - 100, DIRECT_BOUNCE_BYTES + 3000],
        [3 * MiB - 10, 10],
      ];
      for (const [i, [offset, len]] of cases.entries()) await writeAndCheck(blk, model, offset, len, 0xa0 + i);
      const next = prng(0x5eed);
      for (let i = 0; i < 40; i++) {
        const offset = Math.floor(next() * (model.length - 1));
        const len = 1 + Math.floor(next() * Math.min(20 * KiB, model.length - offset - 1));
        await writeAndCheck(blk, model, offset, len, i & 0xff);
      }
      await blk.flush();
      const whole = new Uint8Array(model.length);
      await blk.pread(0, whole);
      expect(Buffer.from(whole).equals(Buffer.from(model))).toBe(true);
    });
    if (host.native) expect(fs.readFileSync(f).equals(Buffer.from(model))).toBe(true);
  });

  it('uses an aligned caller buffer as it is and bounces only unaligned memory', async () => {
    const f = scratchFile('zero-copy.raw');
    const model = patternFile(f, 256 * KiB);
    await withDirect(f, async (blk) => {
      const acquire = vi.spyOn(DirectIo.prototype, 'acquire');
      const aligned = new Uint8Array(host.alignedBuffer(64 * KiB, MAX_BLOCK_BYTES));
      await blk.pread(64 * KiB, aligned);
      expect(Buffer.from(aligned).equals(Buffer.from(model.subarray(64 * KiB, 128 * KiB)))).toBe(true);
      aligned.fill(0x77);
      await blk.pwrite(0, aligned);
      expect(acquire).not.toHaveBeenCalled();
      const unaligned = new Uint8Array(64 * KiB + 1).subarray(1);
      await blk.pread(0, unaligned);
      expect(unaligned.every((b) => b === 0x77)).toBe(true);
      expect(acquire).toHaveBeenCalled();
    });
  });

  it('holds at most DIRECT_BOUNCES_MAX bounce buffers, however many requests wait', async () => {
    const f = scratchFile('bounded.raw');
    const model = patternFile(f, 4 * MiB);
    await withDirect(f, async (blk, file) => {
      const reads = Array.from({ length: 2 * DIRECT_BOUNCES_MAX + 1 }, async (_, i) => {
        const offset = (i % 2) * MiB + 333;
        const buf = new Uint8Array(2 * MiB);
        await blk.pread(offset, buf);
        expect(Buffer.from(buf).equals(Buffer.from(model.subarray(offset, offset + buf.length)))).toBe(true);
      });
      await Promise.all(reads);
      expect((file.opaque as HostFile).direct!.bounceCount).toBe(DIRECT_BOUNCES_MAX);
    });
  });

  it('zero-fills reads past an unaligned end of file; a write there grows it, as QEMU', async () => {
    const f = scratchFile('short.raw');
    const model = patternFile(f, 1000);
    await withDirect(f, async (blk, file) => {
      expect(blk.getLength()).toBe(1024);
      const back = new Uint8Array(1024);
      await blk.pread(0, back);
      expect(Buffer.from(back.subarray(0, 1000)).equals(Buffer.from(model))).toBe(true);
      expect(back.subarray(1000).every((b) => b === 0)).toBe(true);
      await blk.pwrite(1000, new Uint8Array(24).fill(0x11));
      expect(fs.statSync(f).size).toBe(Math.max(1024, file.limits.requestAlignment));
    });
  });

  it('write-zeroes and truncate work on an O_DIRECT node', async () => {
    const f = scratchFile('zeroes.raw');
    const model = patternFile(f, 64 * KiB);
    await withDirect(f, async (blk) => {
      await blk.pwriteZeroes(100, 1000);
      model.fill(0, 100, 1100);
      const back = new Uint8Array(4 * KiB);
      await blk.pread(0, back);
      expect(Buffer.from(back).equals(Buffer.from(model.subarray(0, 4 * KiB)))).toBe(true);
      await blk.truncate(128 * KiB, true, 'full');
      expect(fs.statSync(f).size).toBe(128 * KiB);
      const tail = new Uint8Array(64 * KiB);
      await blk.pread(64 * KiB, tail);
      expect(tail.every((b) => b === 0)).toBe(true);
    });
  });

  it.skipIf(!hasShm || O_DIRECT === undefined)('on tmpfs: opens where the kernel has O_DIRECT there, else QEMU’s refusal', async () => {
    const f = scratchFile('shm.raw', SHM_DIR);
    const model = patternFile(f, 64 * KiB);
    try {
      if (host.native && !opensDirect(f)) {
        const e = await thrown(openBackend(f, { direct: true }));
        expect(e.code).toBe('EINVAL');
        expect(e.message).toBe(`Could not open '${f}': filesystem does not support O_DIRECT`);
        return;
      }
      await withDirect(f, async (blk, file) => {
        expect(file.limits.requestAlignment).toBe(MAX_BLOCK_BYTES);
        await writeAndCheck(blk, model, 1234, 5678, 0x42);
      });
    } finally {
      fs.rmSync(f, { force: true });
    }
  });

  it.skipIf(O_DIRECT === undefined)('a file system refusing O_DIRECT: "filesystem does not support O_DIRECT"', async () => {
    // ext4 directories refuse O_DIRECT with EINVAL yet open read-only without it.
    const target = scratchFile('dir');
    fs.mkdirSync(target);
    const expected = opensDirect(target)
      ? `'file' driver requires '${target}' to be a regular file`
      : `Could not open '${target}': filesystem does not support O_DIRECT`;
    if (!host.native) {
      expect((await thrown(openBackend(target, { direct: true, readOnly: true }))).message).toBe(NO_ADDON(target));
      return;
    }
    const e = await thrown(openBackend(target, { direct: true, readOnly: true }));
    expect(e.message).toBe(expected);
    if (!noQemu) expect(await qemuOpenError(target, ['-r', '-t', 'none'])).toBe(expected);
  });

  it.skipIf(host.native)('without the addon the refusal is one line and leaves no node', async () => {
    const f = scratchFile('refused.raw');
    patternFile(f, 4 * KiB);
    const e = await thrown(openBackend(f, { direct: true }));
    expect(e.code).toBe('ENOTSUP');
    expect(e.message).not.toContain('\n');
    expect(graph.nodes.size).toBe(0);
  });
});

// ---- create -----------------------------------------------------------------

async function create(filename: string, opts: Record<string, string>): Promise<void> {
  await graph.createFile(filename, new Map(Object.entries({ size: String(MiB), ...opts })));
}

function allocatedBytes(filename: string): number {
  return fs.statSync(filename).blocks * STAT_BLOCK_BYTES;
}

describe('files in memory (tmpfs)', () => {
  /** The file node under a raw backend. */
  const fileState = (blk: BlockBackend) => blk.root.node.primaryChild!.node.opaque as HostFile;

  it.skipIf(!hasShm)('do small transfers on the calling thread; files on disk do not', async () => {
    const inMemory = scratchFile('shm.raw', fs.mkdtempSync(path.join(SHM_DIR, 'qbt-file-')));
    const onDisk = scratchFile('disk.raw');
    const model = patternFile(inMemory, 256 * KiB);
    patternFile(onDisk, 64 * KiB);
    const shm = await openBackend(inMemory);
    const disk = await openBackend(onDisk);
    try {
      expect(fileState(shm).syncIo).toBe(fs.statfsSync(SHM_DIR).type === 0x01021994);
      expect(fileState(disk).syncIo).toBe(false);
      await writeAndCheck(shm, model, 4 * KiB + 3, 9000, 0x5a);
    } finally {
      await shm.close();
      await disk.close();
      fs.rmSync(path.dirname(inMemory), { recursive: true, force: true });
    }
  });
});

describe('create', () => {
  it('lists QEMU’s options in QEMU’s order, with its types and help texts', () => {
    expect(FILE_CREATE_OPTS).toEqual([
      { name: 'size', type: 'size', help: 'Virtual disk size' },
      { name: 'nocow', type: 'bool', help: 'Turn off copy-on-write (valid only on btrfs)' },
      { name: 'preallocation', type: 'string', help: 'Preallocation mode (allowed values: off, falloc, full)' },
      { name: 'extent_size_hint', type: 'size', help: 'Extent size hint for the image file, 0 to disable' },
    ]);
  });

  it('preallocation=off is sparse but for the first block; sizes round up to a sector', async () => {
    const f = scratchFile('off.raw');
    await create(f, { preallocation: 'off' });
    expect(fs.statSync(f).size).toBe(MiB);
    expect(allocatedBytes(f)).toBeGreaterThan(0);
    expect(allocatedBytes(f)).toBeLessThan(MiB);
    const small = scratchFile('small.raw');
    await create(small, { size: '1000' });
    expect(fs.statSync(small).size).toBe(1024);
    const empty = scratchFile('zero.raw');
    await create(empty, { size: '0', preallocation: 'full' });
    expect(fs.statSync(empty).size).toBe(0);
  });

  it.each(['falloc', 'full'])('preallocation=%s allocates the whole file, reading as zeroes', async (mode) => {
    const f = scratchFile(`${mode}.raw`);
    await create(f, { preallocation: mode });
    expect(fs.statSync(f).size).toBe(MiB);
    expect(allocatedBytes(f)).toBeGreaterThanOrEqual(MiB);
    expect(fs.readFileSync(f).every((b) => b === 0)).toBe(true);
  });

  it('empties an existing file and shrinks a larger one', async () => {
    const f = scratchFile('existing.raw');
    patternFile(f, 5 * MiB);
    await create(f, { size: '1024' });
    expect(fs.statSync(f).size).toBe(1024);
    expect(fs.readFileSync(f).every((b) => b === 0)).toBe(true);
  });

  it('nocow=on succeeds whether or not the file system has NOCOW', async () => {
    const f = scratchFile('nocow.raw');
    await create(f, { nocow: 'on', preallocation: 'falloc' });
    expect(fs.statSync(f).size).toBe(MiB);
    expect(warnings).toEqual([]);
  });

  it('extent_size_hint: set when possible, a warning only when given and non-zero', async () => {
    const f = scratchFile('hint.raw');
    await create(f, { extent_size_hint: '65536', nocow: 'off' });
    expect(fs.statSync(f).size).toBe(MiB);
    await create(f, { extent_size_hint: String(2 ** 32 - 1) });
    if (!hasShm) return;
    const shm = scratchFile('hint.raw', SHM_DIR);
    try {
      warnings = [];
      await create(shm, {});
      await create(shm, { extent_size_hint: '0' });
      expect(warnings).toEqual([]);
      await create(shm, { extent_size_hint: '65536' });
      expect(warnings).toEqual(['Failed to set extent size hint: Operation not supported']);
      expect(fs.statSync(shm).size).toBe(MiB);
      if (!noQemu) {
        const r = await run('qemu-img', ['create', '-q', '-f', 'raw', '-o', 'extent_size_hint=64k', shm, '1M']);
        expect(r.stderr).toBe(`qemu-img: warning: ${warnings[0]}\n`);
      }
    } finally {
      fs.rmSync(shm, { force: true });
    }
  });

  // [what the user passed to -o, its value in the opts map, code, message, size of the file left behind]
  const badOptions: Array<[string, Record<string, string>, string, string, number | null]> = [
    ['preallocation=metadata', { preallocation: 'metadata' }, 'ENOTSUP', 'Unsupported preallocation mode: metadata', 0],
    ['preallocation=bogus', { preallocation: 'bogus' }, 'EINVAL', 'invalid parameter value: bogus', null],
    ['preallocation', { preallocation: 'on' }, 'EINVAL', 'invalid parameter value: on', null],
    ['preallocation=', { preallocation: '' }, 'EINVAL', 'invalid parameter value: ', null],
    ['extent_size_hint=4G', { extent_size_hint: String(4 * 2 ** 30) }, 'EINVAL', 'Extent size hint is too large', null],
    ['nocow=maybe', { nocow: 'maybe' }, 'EINVAL', "Parameter 'nocow' expects 'on' or 'off'", null],
  ];
  it.each(badOptions)('-o %s fails as qemu-img does', async (oOption, opts, code, message, leftBytes) => {
    const f = scratchFile('bad.raw');
    const e = await thrown(create(f, opts));
    expect(e.code).toBe(code);
    expect(e.message).toBe(message);
    expect(fs.existsSync(f) ? fs.statSync(f).size : null).toBe(leftBytes);
    if (!noQemu) {
      const q = scratchFile('bad-qemu.raw');
      expect(await qemuCreateError(q, oOption)).toBe(message);
      expect(fs.existsSync(q) ? fs.statSync(q).size : null).toBe(leftBytes);
    }
  });

  it('cannot create in a missing directory or over a directory', async () => {
    const missing = path.join(dir, 'nonexistent', 'x.raw');
    let e = await thrown(create(missing, {}));
    expect([e.code, e.message]).toEqual(['ENOENT', `Could not create '${missing}': No such file or directory`]);
    const target = scratchFile('d');
    fs.mkdirSync(target);
    e = await thrown(create(target, {}));
    expect([e.code, e.message]).toEqual(['EISDIR', `Could not create '${target}': Is a directory`]);
    if (!noQemu) {
      expect(await qemuCreateError(missing, 'preallocation=off')).toBe(`Could not create '${missing}': No such file or directory`);
      expect(await qemuCreateError(target, 'preallocation=off')).toBe(`Could not create '${target}': Is a directory`);
    }
  });
});

// ---- open and resize messages -------------------------------------------------

describe('open and resize messages', () => {
  it('a missing file, a directory read-write and read-only', async () => {
    const missing = scratchFile('missing.raw');
    let e = await thrown(openBackend(missing));
    expect([e.code, e.message]).toEqual(['ENOENT', `Could not open '${missing}': No such file or directory`]);
    const target = scratchFile('dir');
    fs.mkdirSync(target);
    e = await thrown(openBackend(target));
    expect([e.code, e.message]).toEqual(['EISDIR', `Could not open '${target}': Is a directory`]);
    e = await thrown(openBackend(target, { readOnly: true }));
    expect([e.code, e.message]).toEqual(['EINVAL', `'file' driver requires '${target}' to be a regular file`]);
    expect(graph.nodes.size).toBe(0);
    if (!noQemu) {
      expect(await qemuOpenError(missing, [])).toBe(`Could not open '${missing}': No such file or directory`);
      expect(await qemuOpenError(target, [])).toBe(`Could not open '${target}': Is a directory`);
      expect(await qemuOpenError(target, ['-r'])).toBe(`'file' driver requires '${target}' to be a regular file`);
    }
  });

  it('resize refuses metadata preallocation and preallocated shrinking', async () => {
    const f = scratchFile('resize.raw');
    await create(f, {});
    const blk = await openBackend(f);
    try {
      let e = await thrown(blk.truncate(2 * MiB, true, 'metadata'));
      expect([e.code, e.message]).toEqual(['ENOTSUP', 'Unsupported preallocation mode: metadata']);
      e = await thrown(blk.truncate(SECTOR_BYTES, true, 'falloc'));
      expect([e.code, e.message]).toEqual(['ENOTSUP', 'Cannot use preallocation for shrinking files']);
      expect(fs.statSync(f).size).toBe(MiB);
      await blk.truncate(2 * MiB, true, 'falloc');
      expect(fs.statSync(f).size).toBe(2 * MiB);
      expect(allocatedBytes(f)).toBeGreaterThanOrEqual(MiB);
    } finally {
      await blk.close();
    }
  });
});
