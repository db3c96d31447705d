/*
 * Tests of drivers/file/host-io.ts: the native hostio addon against real
 * files on the temp filesystem (ext4 here) and on /dev/shm (tmpfs) when it
 * is writable, and the pure-Node fallback.
 *
 * Native tests run when the addon loaded. When it did not, they skip with a
 * loud warning, unless REQUIRE_PEERS=1 demands them: then they run against
 * the fallback and fail, starting with "the addon is loaded". With
 * QEMU_BLOCK_TS_NO_NATIVE=1 the fallback is deliberate and they always skip.
 *
 * Filesystem facts the expectations rely on (Linux 6.x): SEEK_DATA/SEEK_HOLE
 * report at block granularity (4 KiB on ext4, a page on tmpfs), so a 10-byte
 * write shows as a whole block of data; unwritten extents (from zeroRange or
 * allocate) read as zeros and SEEK_HOLE reports them as holes, so "still
 * allocated" is checked with st_blocks, not with seeks; tmpfs has no
 * FALLOC_FL_ZERO_RANGE and answers ENOTSUP. O_DIRECT on ext4 here wants
 * 512-byte aligned memory (the disk's logical block size); tmpfs takes
 * O_DIRECT since Linux 6.6 and checks nothing. ext4 takes FS_IOC_FSSETXATTR
 * with an extent size (and ignores it) but not FS_NOCOW_FL; tmpfs takes
 * neither.
 */
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it, vi } from 'vitest';
import { BlockError } from '../../block/errors.js';
import {
  ALIGN_MAX_BYTES,
  ALIGNED_BUFFER_MAX_BYTES,
  EXTENT_SIZE_HINT_MAX_BYTES,
  fallbackHostIo,
  loadHostIo,
  type HostIo,
} from '../../drivers/file/host-io.js';

const KiB = 1024;
const MiB = 1024 * KiB;
const SPARSE_FILE_BYTES = 4 * MiB;
const CHUNK_BYTES = 4 * KiB;
const SECOND_CHUNK_OFFSET_BYTES = 1 * MiB;
const PATTERN_BYTE = 0xab;
const STAT_BLOCK_BYTES = 512;
/** Far above any RLIMIT_NOFILE, so never open, yet a valid C int. */
const BAD_FD = 2 ** 30;
const SECTOR_BYTES = 512;
/** O_DIRECT where the host has it; the O_DIRECT test skips elsewhere. */
const O_DIRECT = (fs.constants as { O_DIRECT?: number }).O_DIRECT;

const hostIo: HostIo = loadHostIo();
const forcedFallback = process.env.QEMU_BLOCK_TS_NO_NATIVE === '1';
const requirePeers = process.env.REQUIRE_PEERS === '1';
const skipNative = !hostIo.native && (forcedFallback || !requirePeers);
if (skipNative) {
  console.warn(
    [
      '',
      '!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!',
      '!!! host-io: native hostio addon NOT loaded - native tests SKIPPED.',
      forcedFallback
        ? '!!! Reason: QEMU_BLOCK_TS_NO_NATIVE=1.'
        : '!!! Run `node scripts/build-native.mjs`; set REQUIRE_PEERS=1 to make this fail.',
      '!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!',
    ].join('\n'),
  );
}

interface Filesystem {
  label: string;
  dir: string;
}

function isWritableDir(dir: string): boolean {
  try {
    fs.accessSync(dir, fs.constants.W_OK);
    return fs.statSync(dir).isDirectory();
  } catch {
    return false;
  }
}

const FILESYSTEMS: Filesystem[] = [
  { label: `tmpdir ${os.tmpdir()}`, dir: os.tmpdir() },
  ...(isWritableDir('/dev/shm') ? [{ label: 'tmpfs /dev/shm', dir: '/dev/shm' }] : []),
];

// ---- helpers --------------------------------------------------------------

/** A fresh scratch directory under `parent`, removed after the suite. */
function useScratchDir(parent: () => string): () => string {
  let dir = '';
  beforeAll(async () => {
    dir = await fs.promises.mkdtemp(path.join(parent(), 'host-io-test-'));
  });
  afterAll(async () => {
    if (dir) await fs.promises.rm(dir, { recursive: true, force: true });
  });
  return () => dir;
}

/** Opens a new file in `dir` read-write, runs `body`, closes it. */
async function withFile(dir: string, name: string, body: (fd: number) => Promise<void> | void): Promise<void> {
  const fd = fs.openSync(path.join(dir, name), 'w+');
  try {
    await body(fd);
  } finally {
    fs.closeSync(fd);
  }
}

function writePattern(fd: number, offsetBytes: number, lengthBytes: number): void {
  fs.writeSync(fd, Buffer.alloc(lengthBytes, PATTERN_BYTE), 0, lengthBytes, offsetBytes);
}

function readBytes(fd: number, offsetBytes: number, lengthBytes: number): Buffer {
  const buffer = Buffer.alloc(lengthBytes);
  expect(fs.readSync(fd, buffer, 0, lengthBytes, offsetBytes)).toBe(lengthBytes);
  return buffer;
}

function isFilled(buffer: Buffer, byte: number): boolean {
  return buffer.every((b) => b === byte);
}

/** 4 MiB file with 4 KiB of data at 0 and at 1 MiB, holes elsewhere. */
function makeSparseFile(fd: number): void {
  fs.ftruncateSync(fd, SPARSE_FILE_BYTES);
  writePattern(fd, 0, CHUNK_BYTES);
  writePattern(fd, SECOND_CHUNK_OFFSET_BYTES, CHUNK_BYTES);
}

function allocatedBytes(fd: number): number {
  fs.fsyncSync(fd);
  return fs.fstatSync(fd).blocks * STAT_BLOCK_BYTES;
}

function roundUp(value: number, granuleBytes: number): number {
  return Math.ceil(value / granuleBytes) * granuleBytes;
}

/** null when `fn` returns, else what it threw. */
function outcomeOf(fn: () => unknown): unknown {
  try {
    fn();
    return null;
  } catch (e) {
    return e;
  }
}

/** A readable block device, for logicalBlockBytes; null when there is none. */
function findBlockDevice(): string | null {
  for (const name of fs.existsSync('/sys/block') ? fs.readdirSync('/sys/block') : []) {
    const dev = path.join('/dev', name);
    try {
      if (!fs.statSync(dev).isBlockDevice()) continue;
      fs.accessSync(dev, fs.constants.R_OK);
      return dev;
    } catch {
      // missing or unreadable; try the next one
    }
  }
  return null;
}

function expectBlockError(fn: () => unknown, code: string): void {
  let thrown: unknown;
  try {
    fn();
  } catch (e) {
    thrown = e;
  }
  expect(thrown).toBeInstanceOf(BlockError);
  expect((thrown as BlockError).code).toBe(code);
}

async function expectRejectsBlockError(promise: Promise<unknown>, code: string): Promise<void> {
  const thrown = await promise.then(() => undefined, (e: unknown) => e);
  expect(thrown).toBeInstanceOf(BlockError);
  expect((thrown as BlockError).code).toBe(code);
}

// ---- native ---------------------------------------------------------------

describe('hostio addon', () => {
  it.skipIf(skipNative)('the addon is loaded', () => {
    expect(hostIo.native, 'build/Release/hostio.node did not load; run `node scripts/build-native.mjs`').toBe(true);
  });

    it.skipIf(skipNative)('alignedBuffer gives zeroed memory at the alignment; isAligned sees it', () => {
      for (const alignBytes of [8, SECTOR_BYTES, 4 * KiB, 64 * KiB]) {
        const buffer = hostIo.alignedBuffer(3 * alignBytes, alignBytes);
        expect(buffer).toBeInstanceOf(ArrayBuffer);
        expect(buffer.byteLength).toBe(3 * alignBytes);
        const bytes = new Uint8Array(buffer);
        expect(isFilled(Buffer.from(buffer), 0)).toBe(true);
        expect(hostIo.isAligned(bytes, alignBytes)).toBe(true);
        expect(hostIo.isAligned(buffer, alignBytes)).toBe(true);
        expect(hostIo.isAligned(bytes.subarray(alignBytes), alignBytes)).toBe(true);
        expect(hostIo.isAligned(bytes.subarray(1), 2)).toBe(false);
        expect(hostIo.isAligned(new DataView(buffer, alignBytes / 2), alignBytes)).toBe(false);
        expect(hostIo.isAligned(Buffer.from(buffer, alignBytes), alignBytes)).toBe(true);
        expect(hostIo.isAligned(new Uint32Array(buffer, 4), 8)).toBe(false);
      }
      expect(hostIo.isAligned(new Uint8Array(100).subarray(3), 1)).toBe(true);
    });

    it.skipIf(skipNative)('alignedBuffer memory is ordinary, writable memory', () => {
      const bytes = new Uint8Array(hostIo.alignedBuffer(4 * KiB, 4 * KiB));
      bytes.fill(PATTERN_BYTE, 100, 200);
      expect(bytes[99]).toBe(0);
      expect(bytes[100]).toBe(PATTERN_BYTE);
      expect(Buffer.from(bytes.buffer).subarray(100, 200).every((b) => b === PATTERN_BYTE)).toBe(true);
    });

  describe.each(FILESYSTEMS)('on $label', ({ dir: parentDir }) => {
    const scratch = useScratchDir(() => parentDir);

    it.skipIf(skipNative || O_DIRECT === undefined)('O_DIRECT reads into alignedBuffer memory', async () => {
      await withFile(scratch(), 'direct', (fd) => writePattern(fd, 0, 64 * KiB));
      const fd = fs.openSync(path.join(scratch(), 'direct'), fs.constants.O_RDONLY | O_DIRECT!);
      try {
        const aligned = new Uint8Array(hostIo.alignedBuffer(8 * KiB, 4 * KiB));
        expect(fs.readSync(fd, aligned, 0, 4 * KiB, 4 * KiB)).toBe(4 * KiB);
        expect(isFilled(Buffer.from(aligned.buffer, 0, 4 * KiB), PATTERN_BYTE)).toBe(true);
        expect(fs.readSync(fd, aligned.subarray(SECTOR_BYTES), 0, SECTOR_BYTES, 0)).toBe(SECTOR_BYTES);
      } finally {
        fs.closeSync(fd);
      }
    });

    it.skipIf(skipNative)('logicalBlockBytes is null for a regular file', async () => {
      await withFile(scratch(), 'lbs', (fd) => {
        expect(hostIo.logicalBlockBytes(fd)).toBeNull();
      });
    });

    it.skipIf(skipNative)('setNocow succeeds or says ENOTSUP (only btrfs has NOCOW)', async () => {
      await withFile(scratch(), 'nocow', (fd) => {
        const outcome = outcomeOf(() => hostIo.setNocow(fd));
        if (outcome !== null) {
          expect(outcome).toBeInstanceOf(BlockError);
          expect((outcome as BlockError).code).toBe('ENOTSUP');
        }
      });
    });

    it.skipIf(skipNative)('setExtentSizeHint succeeds or says ENOTSUP (tmpfs: ENOTSUP for a non-zero hint)', async () => {
      await withFile(scratch(), 'extsize', (fd) => {
        for (const hintBytes of [0, 64 * KiB, EXTENT_SIZE_HINT_MAX_BYTES]) {
          const outcome = outcomeOf(() => hostIo.setExtentSizeHint(fd, hintBytes));
          if (parentDir === '/dev/shm' && hintBytes > 0) expect(outcome).not.toBeNull();
          if (outcome !== null) {
            expect(outcome).toBeInstanceOf(BlockError);
            expect((outcome as BlockError).code).toBe('ENOTSUP');
            expect((outcome as BlockError).message).toBe('Operation not supported');
          }
        }
      });
    });

    it.skipIf(skipNative)('seekData/seekHole find the data and hole boundaries', async () => {
      await withFile(scratch(), 'sparse', (fd) => {
        makeSparseFile(fd);
        const second = SECOND_CHUNK_OFFSET_BYTES;
        expect(hostIo.seekData(fd, 0)).toBe(0);
        expect(hostIo.seekHole(fd, 0)).toBe(CHUNK_BYTES);
        expect(hostIo.seekData(fd, CHUNK_BYTES)).toBe(second);
        expect(hostIo.seekData(fd, 100)).toBe(100);
        expect(hostIo.seekHole(fd, second)).toBe(second + CHUNK_BYTES);
        expect(hostIo.seekHole(fd, 3 * MiB)).toBe(3 * MiB);
        expect(hostIo.seekData(fd, second + CHUNK_BYTES)).toBeNull();
        expect(hostIo.seekData(fd, SPARSE_FILE_BYTES)).toBeNull();
        expect(hostIo.seekHole(fd, SPARSE_FILE_BYTES)).toBeNull();
        expect(hostIo.seekHole(fd, SPARSE_FILE_BYTES + MiB)).toBeNull();
        expect(hostIo.sizeBytes(fd)).toBe(SPARSE_FILE_BYTES);
      });
    });

    it.skipIf(skipNative)('reports data at filesystem block granularity', async () => {
      await withFile(scratch(), 'granule', (fd) => {
        makeSparseFile(fd);
        const granuleBytes = fs.fstatSync(fd).blksize;
        const writeOffsetBytes = 2 * MiB + 100;
        fs.writeSync(fd, Buffer.alloc(10, PATTERN_BYTE), 0, 10, writeOffsetBytes);
        const blockStart = Math.floor(writeOffsetBytes / granuleBytes) * granuleBytes;
        expect(hostIo.seekData(fd, 2 * MiB)).toBe(blockStart);
        expect(hostIo.seekHole(fd, writeOffsetBytes)).toBe(roundUp(writeOffsetBytes + 10, granuleBytes));
      });
    });

    it.skipIf(skipNative)('punchHole zeroes the range, frees blocks and keeps the size', async () => {
      await withFile(scratch(), 'punch', async (fd) => {
        writePattern(fd, 0, 128 * KiB);
        const before = allocatedBytes(fd);
        await hostIo.punchHole(fd, 0, 64 * KiB);
        expect(isFilled(readBytes(fd, 0, 64 * KiB), 0)).toBe(true);
        expect(isFilled(readBytes(fd, 64 * KiB, 64 * KiB), PATTERN_BYTE)).toBe(true);
        expect(allocatedBytes(fd)).toBeLessThan(before);
        expect(fs.fstatSync(fd).size).toBe(128 * KiB);
        expect(hostIo.seekData(fd, 0)).toBe(64 * KiB);
      });
    });

    it.skipIf(skipNative)('punchHole of an unaligned range zeroes exactly that range', async () => {
      await withFile(scratch(), 'punch-unaligned', async (fd) => {
        writePattern(fd, 0, 64 * KiB);
        await hostIo.punchHole(fd, 100, 8 * KiB);
        expect(isFilled(readBytes(fd, 0, 100), PATTERN_BYTE)).toBe(true);
        expect(isFilled(readBytes(fd, 100, 8 * KiB), 0)).toBe(true);
        expect(isFilled(readBytes(fd, 100 + 8 * KiB, 64 * KiB - 100 - 8 * KiB), PATTERN_BYTE)).toBe(true);
      });
    });

    it.skipIf(skipNative)('zeroRange zeroes, keeps blocks allocated and extends past EOF (or is ENOTSUP)', async () => {
      await withFile(scratch(), 'zero', async (fd) => {
        writePattern(fd, 0, 128 * KiB);
        const before = allocatedBytes(fd);
        const outcome = await hostIo.zeroRange(fd, 4 * KiB, 64 * KiB).then(() => null, (e: unknown) => e);
        if (outcome !== null) {
          // tmpfs (and other filesystems without FALLOC_FL_ZERO_RANGE)
          expect(outcome).toBeInstanceOf(BlockError);
          expect((outcome as BlockError).code).toBe('ENOTSUP');
          expect(isFilled(readBytes(fd, 0, 128 * KiB), PATTERN_BYTE)).toBe(true);
          return;
        }
        expect(isFilled(readBytes(fd, 0, 4 * KiB), PATTERN_BYTE)).toBe(true);
        expect(isFilled(readBytes(fd, 4 * KiB, 64 * KiB), 0)).toBe(true);
        expect(isFilled(readBytes(fd, 68 * KiB, 60 * KiB), PATTERN_BYTE)).toBe(true);
        expect(allocatedBytes(fd)).toBeGreaterThanOrEqual(before);
        await hostIo.zeroRange(fd, 1 * MiB, 4 * KiB);
        expect(fs.fstatSync(fd).size).toBe(1 * MiB + 4 * KiB);
      });
    });

    it.skipIf(skipNative)('allocate raises the allocated blocks and extends the file', async () => {
      await withFile(scratch(), 'allocate', async (fd) => {
        const before = allocatedBytes(fd);
        await hostIo.allocate(fd, 0, 1 * MiB);
        expect(allocatedBytes(fd)).toBeGreaterThanOrEqual(before + 1 * MiB);
        expect(fs.fstatSync(fd).size).toBe(1 * MiB);
        expect(isFilled(readBytes(fd, 0, 64 * KiB), 0)).toBe(true);
      });
    });
  });

  describe('errors', () => {
    const scratch = useScratchDir(() => os.tmpdir());

    it.skipIf(skipNative)('logicalBlockBytes of a block device is its sector size', (ctx) => {
      const device = findBlockDevice();
      if (device === null) {
        ctx.skip('no readable block device here');
        return;
      }
      const fd = fs.openSync(device, 'r');
      try {
        const sectorBytes = hostIo.logicalBlockBytes(fd);
        expect(sectorBytes).not.toBeNull();
        expect([512, 1024, 2048, 4096]).toContain(sectorBytes);
      } finally {
        fs.closeSync(fd);
      }
    });

    it.skipIf(skipNative)('the ioctls on a bad fd are BlockError EBADF', () => {
      expectBlockError(() => hostIo.logicalBlockBytes(BAD_FD), 'EBADF');
      expectBlockError(() => hostIo.setNocow(BAD_FD), 'EBADF');
      expectBlockError(() => hostIo.setExtentSizeHint(BAD_FD, 0), 'EBADF');
    });

    it.skipIf(skipNative)('bad sizes, alignments, views and hints are TypeErrors', () => {
      expect(() => hostIo.alignedBuffer(0, 512)).toThrow(TypeError);
      expect(() => hostIo.alignedBuffer(ALIGNED_BUFFER_MAX_BYTES + 1, 512)).toThrow(TypeError);
      expect(() => hostIo.alignedBuffer(4096, 3)).toThrow(TypeError);
      expect(() => hostIo.alignedBuffer(4096, 0)).toThrow(TypeError);
      expect(() => hostIo.alignedBuffer(4096, ALIGN_MAX_BYTES * 2)).toThrow(TypeError);
      expect(() => hostIo.isAligned(new Uint8Array(8), 1000)).toThrow(TypeError);
      expect(() => hostIo.isAligned(42 as unknown as Uint8Array, 8)).toThrow(TypeError);
      expect(() => hostIo.setExtentSizeHint(0, EXTENT_SIZE_HINT_MAX_BYTES + 1)).toThrow(TypeError);
      expect(() => hostIo.setNocow(-1)).toThrow(TypeError);
      expect(() => hostIo.logicalBlockBytes(1.5)).toThrow(TypeError);
    });

    it.skipIf(skipNative)('a bad fd is BlockError EBADF, sync and async', async () => {
      expectBlockError(() => hostIo.seekData(BAD_FD, 0), 'EBADF');
      expectBlockError(() => hostIo.seekHole(BAD_FD, 0), 'EBADF');
      expectBlockError(() => hostIo.sizeBytes(BAD_FD), 'EBADF');
      await expectRejectsBlockError(hostIo.punchHole(BAD_FD, 0, 4096), 'EBADF');
      await expectRejectsBlockError(hostIo.zeroRange(BAD_FD, 0, 4096), 'EBADF');
      await expectRejectsBlockError(hostIo.allocate(BAD_FD, 0, 4096), 'EBADF');
    });

    it.skipIf(skipNative)('fallocate on a read-only fd is EBADF; a zero length is EINVAL', async () => {
      await withFile(scratch(), 'ro', () => undefined);
      const fd = fs.openSync(path.join(scratch(), 'ro'), 'r');
      try {
        await expectRejectsBlockError(hostIo.punchHole(fd, 0, 4096), 'EBADF');
      } finally {
        fs.closeSync(fd);
      }
      await withFile(scratch(), 'zero-length', async (rwFd) => {
        await expectRejectsBlockError(hostIo.allocate(rwFd, 0, 0), 'EINVAL');
      });
    });

    it.skipIf(skipNative)('bad offsets and lengths are TypeErrors', async () => {
      await withFile(scratch(), 'args', async (fd) => {
        expect(() => hostIo.seekData(fd, -1)).toThrow(TypeError);
        expect(() => hostIo.seekHole(fd, 0.5)).toThrow(TypeError);
        expect(() => hostIo.seekData(fd, 2 ** 53 + 2)).toThrow(TypeError);
        expect(() => hostIo.seekData(fd, Number.NaN)).toThrow(TypeError);
        expect(() => hostIo.sizeBytes(-1)).toThrow(TypeError);
        await expect(hostIo.punchHole(fd, -1, 4096)).rejects.toThrow(TypeError);
        await expect(hostIo.zeroRange(fd, 0, -4096)).rejects.toThrow(TypeError);
        await expect(hostIo.allocate(fd, 0, Infinity)).rejects.toThrow(TypeError);
      });
    });
  });
});

// ---- fallback -------------------------------------------------------------

describe('fallbackHostIo', () => {
  const scratch = useScratchDir(() => os.tmpdir());
  const io = fallbackHostIo;

  it('is not native', () => {
    expect(io.native).toBe(false);
  });

  it('reports everything below EOF as data and EOF as the only hole', async () => {
    await withFile(scratch(), 'sparse', (fd) => {
      makeSparseFile(fd);
      expect(io.seekData(fd, 0)).toBe(0);
      expect(io.seekData(fd, 3 * MiB)).toBe(3 * MiB);
      expect(io.seekHole(fd, 0)).toBe(SPARSE_FILE_BYTES);
      expect(io.seekHole(fd, SPARSE_FILE_BYTES - 1)).toBe(SPARSE_FILE_BYTES);
      expect(io.seekData(fd, SPARSE_FILE_BYTES)).toBeNull();
      expect(io.seekHole(fd, SPARSE_FILE_BYTES)).toBeNull();
      expect(io.sizeBytes(fd)).toBe(SPARSE_FILE_BYTES);
    });
  });

  it('rejects the fallocate family with ENOTSUP and leaves the file alone', async () => {
    await withFile(scratch(), 'enotsup', async (fd) => {
      writePattern(fd, 0, 8 * KiB);
      await expectRejectsBlockError(io.punchHole(fd, 0, 4096), 'ENOTSUP');
      await expectRejectsBlockError(io.zeroRange(fd, 0, 4096), 'ENOTSUP');
      await expectRejectsBlockError(io.allocate(fd, 0, 1 * MiB), 'ENOTSUP');
      expect(isFilled(readBytes(fd, 0, 8 * KiB), PATTERN_BYTE)).toBe(true);
      expect(fs.fstatSync(fd).size).toBe(8 * KiB);
    });
  });

  it('has no aligned memory, block size or file attributes', async () => {
    expectBlockError(() => io.alignedBuffer(4096, 4096), 'ENOTSUP');
    expect(io.isAligned(new Uint8Array(4096), 1)).toBe(false);
    await withFile(scratch(), 'attrs', (fd) => {
      expect(io.logicalBlockBytes(fd)).toBeNull();
      expectBlockError(() => io.setNocow(fd), 'ENOTSUP');
      expectBlockError(() => io.setExtentSizeHint(fd, 64 * KiB), 'ENOTSUP');
    });
    expect(() => io.alignedBuffer(4096, 3)).toThrow(TypeError);
    expect(() => io.isAligned(42 as unknown as Uint8Array, 8)).toThrow(TypeError);
    expect(() => io.setExtentSizeHint(0, -1)).toThrow(TypeError);
  });

  it('maps a bad fd to BlockError EBADF and bad arguments to TypeError', async () => {
    expectBlockError(() => io.seekData(BAD_FD, 0), 'EBADF');
    expectBlockError(() => io.seekHole(BAD_FD, 0), 'EBADF');
    expectBlockError(() => io.sizeBytes(BAD_FD), 'EBADF');
    expect(() => io.seekData(0, -1)).toThrow(TypeError);
    await expect(io.punchHole(0, 1.5, 4096)).rejects.toThrow(TypeError);
  });
});

// ---- loader ---------------------------------------------------------------

describe('loadHostIo', () => {
  it('is memoised', () => {
    expect(loadHostIo()).toBe(hostIo);
  });

  it('QEMU_BLOCK_TS_NO_NATIVE=1 forces the fallback', async () => {
    vi.stubEnv('QEMU_BLOCK_TS_NO_NATIVE', '1');
    vi.resetModules();
    try {
      const fresh = await import('../../drivers/file/host-io.js');
      expect(fresh.loadHostIo()).toBe(fresh.fallbackHostIo);
    } finally {
      vi.unstubAllEnvs();
      vi.resetModules();
    }
  });
});
