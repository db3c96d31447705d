/*
 * Host-file operations Node's fs lacks, behind one interface.
 *
 * The file driver asks questions fs cannot answer: where is data and
 * where are holes (SEEK_DATA/SEEK_HOLE, for block-status), can a range be
 * deallocated or zeroed without writing a buffer (fallocate PUNCH_HOLE /
 * ZERO_RANGE, for discard and write-zeroes), and how big is a block device
 * (fstat says 0). For cache.direct=on (O_DIRECT) it needs memory at an
 * aligned address, which no JS allocation promises, and a way to tell
 * whether a caller's buffer already is; for create it sets the nocow and
 * extent-size-hint file attributes; for image locking (QEMU's file-posix
 * locks, drivers/file/lock.ts) it takes, drops and tests shared byte-range
 * locks with fcntl. The optional N-API addon native/hostio.c answers them; it is built at install time by scripts/build-native.mjs and
 * may be missing.
 *
 * Two implementations of `HostIo`, chosen once per process by loadHostIo():
 *   - the addon, wrapped so every operating error is a BlockError with the
 *     errno name as code ('ENOTSUP' meaning "this file cannot, fall back");
 *   - fallbackHostIo, pure Node: every byte below EOF is data, the only hole
 *     is the virtual one at EOF, and the fallocate family rejects with
 *     ENOTSUP so the generic layer writes zero buffers or ignores discard.
 *     It has no aligned memory (alignedBuffer throws ENOTSUP, isAligned says
 *     false: "not known to be aligned", so O_DIRECT is refused at open), no
 *     block size (null) and no file attributes (ENOTSUP). It has no
 *     byte-range locks either (`lockKind` null; the lock calls throw
 *     ENOTSUP): Node has no fcntl.
 * Both check arguments identically: fd and byte counts must be non-negative
 * integers (byte counts ≤ 2^53), alignments powers of two up to 1 MiB;
 * anything else is a programmer error and throws (sync calls) or rejects
 * (promise calls) with a TypeError.
 *
 * The choice is memoised in this module: the addon is a process-wide
 * dlopen()ed library (found by block/native-addon.ts), so there is nothing
 * per-node to keep. The environment variable QEMU_BLOCK_TS_NO_NATIVE=1,
 * read on the first call, forces the fallback (tests of the fallback path,
 * or a misbehaving host).
 *
 * sizeBytes() of the addon moves the fd's file position (lseek SEEK_END);
 * the block layer uses positioned I/O only, so nothing restores it.
 */
import fs from 'node:fs';
import { BlockError, toBlockError } from '../../block/errors.js';
import { isPowerOfTwo } from '../../block/flags.js';
import { MAX_ALIGNMENT_BYTES, MAX_REQUEST_BYTES } from '../../block/io.js';
import { hasFunctions, nativeAddon, nativeAddonPath } from '../../block/native-addon.js';

/** Operations on an open host file descriptor. Offsets and lengths in bytes. */
export interface HostIo {
  /** true when the native addon is in use. */
  readonly native: boolean;
  /** First data byte at or after offsetBytes; null if none before EOF. */
  seekData(fd: number, offsetBytes: number): number | null;
  /** First hole byte at or after offsetBytes (EOF counts); null if offsetBytes ≥ EOF. */
  seekHole(fd: number, offsetBytes: number): number | null;
  /** Deallocates the range; it reads back as zeros; the file size is kept. */
  punchHole(fd: number, offsetBytes: number, lengthBytes: number): Promise<void>;
  /** Zeroes the range, keeping it allocated; extends the file when past EOF. */
  zeroRange(fd: number, offsetBytes: number, lengthBytes: number): Promise<void>;
  /** Allocates the range (fallocate mode 0); extends the file when past EOF. */
  allocate(fd: number, offsetBytes: number, lengthBytes: number): Promise<void>;
  /** Size in bytes, including block devices for the addon. */
  sizeBytes(fd: number): number;
  /** Zero-filled memory whose address is a multiple of alignBytes (freed when collected). */
  alignedBuffer(bytes: number, alignBytes: number): ArrayBuffer;
  /** Whether the view's first byte is at a multiple of alignBytes. */
  isAligned(view: ArrayBufferView | ArrayBuffer, alignBytes: number): boolean;
  /** Logical block size of a block device (BLKSSZGET); null for files. */
  logicalBlockBytes(fd: number): number | null;
  /** Turns off copy-on-write for the file (FS_NOCOW_FL; btrfs); ENOTSUP elsewhere. */
  setNocow(fd: number): void;
  /** Sets the file's extent size hint (FS_XFLAG_EXTSIZE; XFS); ENOTSUP where unsupported. */
  setExtentSizeHint(fd: number, hintBytes: number): void;
  /**
   * The byte-range locks fcntl gives: 'ofd' (owned by the open file
   * description: two opens of a file conflict even in one process), 'posix'
   * (owned by the process, dropped when any of its descriptors of the file
   * closes), or null (no addon: no locks at all).
   */
  readonly lockKind: 'ofd' | 'posix' | null;
  /** Takes a shared (read) lock on the range; never waits. */
  lockBytes(fd: number, offsetBytes: number, lengthBytes: number): void;
  /** Drops this description's lock on the range. */
  unlockBytes(fd: number, offsetBytes: number, lengthBytes: number): void;
  /** Whether another description (process, for POSIX locks) holds any lock on the range. */
  lockConflict(fd: number, offsetBytes: number, lengthBytes: number): boolean;
}

/** Largest offset or length a JS number holds exactly; the addon's limit too. */
const OFFSET_MAX_BYTES = 2 ** 53;
/** Largest fd the addon accepts (C int). */
const FD_MAX = 2 ** 31 - 1;
/** Largest alignedBuffer: the block layer's largest request (the addon's HOSTIO_ALIGNED_BUFFER_MAX_BYTES). */
export const ALIGNED_BUFFER_MAX_BYTES = MAX_REQUEST_BYTES;
/** Largest alignment: the block layer's largest request alignment (the addon's HOSTIO_ALIGN_MAX_BYTES). */
export const ALIGN_MAX_BYTES = MAX_ALIGNMENT_BYTES;
/** fsx_extsize is 32 bits wide. */
export const EXTENT_SIZE_HINT_MAX_BYTES = 2 ** 32 - 1;

/** The raw addon: same functions (lockKind a call), errors are plain Errors with an errno `.code`. */
type HostIoAddon = Omit<HostIo, 'native' | 'lockKind'> & { lockKind(): 'ofd' | 'posix' };
const ADDON_FUNCTIONS = [
  'seekData',
  'seekHole',
  'punchHole',
  'zeroRange',
  'allocate',
  'sizeBytes',
  'alignedBuffer',
  'isAligned',
  'logicalBlockBytes',
  'setNocow',
  'setExtentSizeHint',
  'lockKind',
  'lockBytes',
  'unlockBytes',
  'lockConflict',
] as const;

// ---- argument checks (programmer errors) ---------------------------------

function checkInteger(value: number, max: number, what: string): void {
  if (typeof value !== 'number' || !Number.isInteger(value) || value < 0 || value > max) {
    throw new TypeError(`host-io: ${what} must be an integer in [0, ${max}], got ${String(value)}`);
  }
}

function checkArgs(fd: number, offsetBytes?: number, lengthBytes?: number): void {
  checkInteger(fd, FD_MAX, 'fd');
  if (offsetBytes !== undefined) checkInteger(offsetBytes, OFFSET_MAX_BYTES, 'offsetBytes');
  if (lengthBytes !== undefined) checkInteger(lengthBytes, OFFSET_MAX_BYTES, 'lengthBytes');
}

function checkAlignment(alignBytes: number): void {
  checkInteger(alignBytes, ALIGN_MAX_BYTES, 'alignBytes');
  if (!isPowerOfTwo(alignBytes)) throw new TypeError(`host-io: alignBytes must be a power of two, got ${alignBytes}`);
}

function checkView(view: ArrayBufferView | ArrayBuffer): void {
  if (!ArrayBuffer.isView(view) && !(view instanceof ArrayBuffer)) {
    throw new TypeError('host-io: view must be a TypedArray, Buffer, DataView or ArrayBuffer');
  }
}

function checkBufferArgs(bytes: number, alignBytes: number): void {
  checkInteger(bytes, ALIGNED_BUFFER_MAX_BYTES, 'bytes');
  if (bytes === 0) throw new TypeError('host-io: bytes must be at least 1');
  checkAlignment(alignBytes);
}

/** Argument TypeErrors pass through; everything else becomes a BlockError. */
function asBlockError(e: unknown): unknown {
  return e instanceof TypeError ? e : toBlockError(e);
}

// ---- the addon, wrapped ---------------------------------------------------

function callSync<T>(op: () => T): T {
  try {
    return op();
  } catch (e) {
    throw asBlockError(e);
  }
}

async function callAsync(op: () => Promise<void>): Promise<void> {
  try {
    await op();
  } catch (e) {
    throw asBlockError(e);
  }
}

function wrapAddon(addon: HostIoAddon): HostIo {
  const range = (call: (fd: number, offsetBytes: number, lengthBytes: number) => Promise<void>) =>
    (fd: number, offsetBytes: number, lengthBytes: number) =>
      callAsync(() => {
        checkArgs(fd, offsetBytes, lengthBytes);
        return call(fd, offsetBytes, lengthBytes);
      });
  return Object.freeze({
    native: true,
    seekData(fd: number, offsetBytes: number) {
      checkArgs(fd, offsetBytes);
      return callSync(() => addon.seekData(fd, offsetBytes));
    },
    seekHole(fd: number, offsetBytes: number) {
      checkArgs(fd, offsetBytes);
      return callSync(() => addon.seekHole(fd, offsetBytes));
    },
    punchHole: range((fd, o, l) => addon.punchHole(fd, o, l)),
    zeroRange: range((fd, o, l) => addon.zeroRange(fd, o, l)),
    allocate: range((fd, o, l) => addon.allocate(fd, o, l)),
    sizeBytes(fd: number) {
      checkArgs(fd);
      return callSync(() => addon.sizeBytes(fd));
    },
    alignedBuffer(bytes: number, alignBytes: number) {
      checkBufferArgs(bytes, alignBytes);
      return callSync(() => addon.alignedBuffer(bytes, alignBytes));
    },
    isAligned(view: ArrayBufferView | ArrayBuffer, alignBytes: number) {
      checkView(view);
      checkAlignment(alignBytes);
      return addon.isAligned(view, alignBytes);
    },
    logicalBlockBytes(fd: number) {
      checkArgs(fd);
      return callSync(() => addon.logicalBlockBytes(fd));
    },
    setNocow(fd: number) {
      checkArgs(fd);
      callSync(() => addon.setNocow(fd));
    },
    setExtentSizeHint(fd: number, hintBytes: number) {
      checkArgs(fd);
      checkInteger(hintBytes, EXTENT_SIZE_HINT_MAX_BYTES, 'hintBytes');
      callSync(() => addon.setExtentSizeHint(fd, hintBytes));
    },
    lockKind: addon.lockKind(),
    lockBytes: lockRange((fd, o, l) => addon.lockBytes(fd, o, l)),
    unlockBytes: lockRange((fd, o, l) => addon.unlockBytes(fd, o, l)),
    lockConflict: lockRange((fd, o, l) => addon.lockConflict(fd, o, l)),
  });
}

/** A synchronous (fd, offset, length) lock call with checked arguments. */
function lockRange<T>(call: (fd: number, offsetBytes: number, lengthBytes: number) => T) {
  return (fd: number, offsetBytes: number, lengthBytes: number): T => {
    checkArgs(fd, offsetBytes, lengthBytes);
    return callSync(() => call(fd, offsetBytes, lengthBytes));
  };
}

function locksUnsupported(fd: number, offsetBytes: number, lengthBytes: number): never {
  checkArgs(fd, offsetBytes, lengthBytes);
  throw new BlockError('ENOTSUP', 'Byte-range locks need the native hostio addon');
}

// ---- the pure-Node fallback ----------------------------------------------

function fstatSizeBytes(fd: number): number {
  checkArgs(fd);
  return callSync(() => fs.fstatSync(fd).size);
}

async function fallocateUnsupported(fd: number, offsetBytes: number, lengthBytes: number): Promise<void> {
  checkArgs(fd, offsetBytes, lengthBytes);
  throw new BlockError('ENOTSUP');
}

/** Pure Node: all data below EOF, no fallocate, aligned memory or attributes (ENOTSUP), size from fstat. */
export const fallbackHostIo: HostIo = Object.freeze({
  native: false,
  seekData(fd: number, offsetBytes: number): number | null {
    checkArgs(fd, offsetBytes);
    return offsetBytes < fstatSizeBytes(fd) ? offsetBytes : null;
  },
  seekHole(fd: number, offsetBytes: number): number | null {
    checkArgs(fd, offsetBytes);
    const sizeBytes = fstatSizeBytes(fd);
    return offsetBytes < sizeBytes ? sizeBytes : null;
  },
  punchHole: fallocateUnsupported,
  zeroRange: fallocateUnsupported,
  allocate: fallocateUnsupported,
  sizeBytes: fstatSizeBytes,
  alignedBuffer(bytes: number, alignBytes: number): ArrayBuffer {
    checkBufferArgs(bytes, alignBytes);
    throw new BlockError('ENOTSUP', 'Aligned memory needs the native hostio addon');
  },
  isAligned(view: ArrayBufferView | ArrayBuffer, alignBytes: number): boolean {
    checkView(view);
    checkAlignment(alignBytes);
    return false;
  },
  logicalBlockBytes(fd: number): number | null {
    checkArgs(fd);
    return null;
  },
  setNocow(fd: number): void {
    checkArgs(fd);
    throw new BlockError('ENOTSUP');
  },
  setExtentSizeHint(fd: number, hintBytes: number): void {
    checkArgs(fd);
    checkInteger(hintBytes, EXTENT_SIZE_HINT_MAX_BYTES, 'hintBytes');
    throw new BlockError('ENOTSUP');
  },
  lockKind: null,
  lockBytes: locksUnsupported,
  unlockBytes: locksUnsupported,
  lockConflict: locksUnsupported,
});

// ---- loading --------------------------------------------------------------

/** The addon, or null when it is missing or lacks the file functions (a warning says so). */
function tryLoadAddon(): HostIoAddon | null {
  const addon = nativeAddon();
  if (addon === null) return null;
  if (hasFunctions(addon, ADDON_FUNCTIONS)) return addon as unknown as HostIoAddon;
  process.emitWarning(`${nativeAddonPath()} lacks the expected functions; using plain I/O`, 'HostIoWarning');
  return null;
}

let loadedHostIo: HostIo | undefined;

/** The process's HostIo: the addon when built and loadable, else fallbackHostIo. */
export function loadHostIo(): HostIo {
  if (loadedHostIo === undefined) {
    const addon = tryLoadAddon();
    loadedHostIo = addon === null ? fallbackHostIo : wrapAddon(addon);
  }
  return loadedHostIo;
}
