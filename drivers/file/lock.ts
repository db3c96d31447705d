/*
 * Image locking: QEMU's file-posix byte-range locks, which keep two
 * processes (ours or QEMU's own tools) from writing one image at once.
 *
 * Byte layout (RAW_LOCK_PERM_BASE / RAW_LOCK_SHARED_BASE; libvirt keeps
 * byte 0): for each permission bit i (consistent read, write, write
 * unchanged, resize) a description that holds the permission locks byte
 * 100 + i, and one that does not share it locks byte 200 + i. Every lock is
 * shared (F_RDLCK), so taking one never fails for a conflict; conflicts are
 * found by testing (F_OFD_GETLK for an exclusive lock): wanting permission
 * i conflicts with someone's lock on 200 + i ("Failed to get "write"
 * lock"), not sharing i with someone's lock on 100 + i ("Failed to get
 * shared "write" lock"); both add the hint "Is another process using the
 * image [FILE]?". OFD locks belong to the open file description, so two
 * nodes on one file conflict even inside one process, as in QEMU.
 *
 * States (FileLocks, one per open file node, QEMU's BDRVRawState fields):
 * `perm`/`shared` are the permissions last committed; `locked` the bits
 * whose bytes this description holds now. A permission refresh calls, in
 * bdrv_refresh_perms' order:
 *   prepare(perm, shared)  raw_handle_perm_lock(PREPARE): when the change
 *       only loosens nothing is done (unlocking cannot fail); otherwise the
 *       union of old and new bytes is locked, then the new permissions are
 *       tested against other descriptions. A failure unlocks back to the
 *       committed state and throws.
 *   commit(perm, shared)   raw_set_perm: exactly the new bytes stay locked.
 *   abort()                raw_abort_perm_update: back to the committed bytes.
 * `disabled` state (locking=off, or auto without lock support) makes all
 * three no-ops. Closing the descriptor drops its locks with it; a reopen
 * that swaps descriptors takes the same bytes on the new one first
 * (copyTo, QEMU's lock copy in raw_check_perm).
 *
 * Image creation (raw_co_create) locks with a one-off table: write and
 * resize held, resize not shared, tested before the file is emptied and
 * dropped before it is closed (lockForCreate / unlockAfterCreate).
 *
 * Left out: BDRV_O_INACTIVE (migration), under which QEMU takes no locks.
 * Unlock failures, which QEMU only prints as warnings, are ignored: a
 * description can always drop its own shared locks.
 */
import { BlockError, isErrnoCode, strerror, toBlockError } from '../../block/errors.js';
import { Perm, permNames } from '../../block/flags.js';
import type { HostIo } from './host-io.js';

/** First byte of the "holds permission i" locks (RAW_LOCK_PERM_BASE). */
export const LOCK_PERM_BASE_BYTE = 100;
/** First byte of the "does not share permission i" locks (RAW_LOCK_SHARED_BASE). */
export const LOCK_SHARED_BASE_BYTE = 200;
/** Each permission locks one byte. */
const LOCK_BYTES = 1;
/** The permission bits, lowest first (PERM_FOREACH). */
const PERM_BITS: readonly number[] = [Perm.CONSISTENT_READ, Perm.WRITE, Perm.WRITE_UNCHANGED, Perm.RESIZE];
/** raw_co_create: it writes and resizes, and lets nobody else resize. */
const CREATE_PERM = Perm.WRITE | Perm.RESIZE;
const CREATE_SHARED = Perm.ALL & ~Perm.RESIZE;

/** The `locking` option (OnOffAuto). */
export type LockingMode = 'on' | 'off' | 'auto';

/** Bits whose bytes a description holds. */
interface LockedBits {
  perm: number;
  unshared: number;
}

/** "Failed to lock byte N" with errno text unless the errno means "locked" (raw_lock_error_setg_errno). */
function lockFailure(e: unknown, what: string): BlockError {
  const error = toBlockError(e);
  if (error.code === 'EAGAIN' || error.code === 'EACCES') return new BlockError(error.code, what, { cause: e });
  return new BlockError(error.code, `${what}: ${errnoText(error)}`, { cause: e });
}

/** strerror of the error, also for errnos the block layer has no name for ("fcntl(F_SETLK): No locks available"). */
function errnoText(error: BlockError): string {
  const sysCode = (error.cause as { code?: unknown } | undefined)?.code;
  if (isErrnoCode(sysCode) || sysCode === undefined) return strerror(error.code);
  const message = error.message;
  return message.slice(message.indexOf(': ') + 2);
}

/**
 * raw_apply_lock_bytes: locks the bytes of `permBits` and `unsharedBits`
 * not yet held and, when `unlock`, drops held bytes outside them. `held`
 * is updated byte by byte, so a failure part-way leaves it true.
 */
function applyLockBytes(host: HostIo, fd: number, held: LockedBits, permBits: number, unsharedBits: number, unlock: boolean): void {
  const tables: Array<[number, 'perm' | 'unshared', number]> = [
    [LOCK_PERM_BASE_BYTE, 'perm', permBits],
    [LOCK_SHARED_BASE_BYTE, 'unshared', unsharedBits],
  ];
  for (const [base, key, wanted] of tables) {
    PERM_BITS.forEach((bit, i) => {
      const offsetBytes = base + i;
      if (wanted & bit && !(held[key] & bit)) {
        try {
          host.lockBytes(fd, offsetBytes, LOCK_BYTES);
        } catch (e) {
          throw lockFailure(e, `Failed to lock byte ${offsetBytes}`);
        }
        held[key] |= bit;
      } else if (unlock && held[key] & bit && !(wanted & bit)) {
        try {
          host.unlockBytes(fd, offsetBytes, LOCK_BYTES);
        } catch {
          // See the note at the top: QEMU only warns.
        }
        held[key] &= ~bit;
      }
    });
  }
}

/**
 * raw_check_lock_bytes: throws QEMU's refusal (without the hint) when
 * another description holds a byte that conflicts with taking `perm` and
 * sharing only `shared`.
 */
function checkLockBytes(host: HostIo, fd: number, perm: number, shared: number): void {
  const test = (offsetBytes: number, what: string) => {
    let conflict: boolean;
    try {
      conflict = host.lockConflict(fd, offsetBytes, LOCK_BYTES);
    } catch (e) {
      throw lockFailure(e, what);
    }
    if (conflict) throw new BlockError('EAGAIN', what);
  };
  PERM_BITS.forEach((bit, i) => {
    if (perm & bit) test(LOCK_SHARED_BASE_BYTE + i, `Failed to get "${permNames(bit)}" lock`);
  });
  PERM_BITS.forEach((bit, i) => {
    if (!(shared & bit)) test(LOCK_PERM_BASE_BYTE + i, `Failed to get shared "${permNames(bit)}" lock`);
  });
}

/** The refusal with QEMU's hint on the next line. */
function withHint(e: BlockError, filename: string): BlockError {
  return new BlockError(e.code, `${e.message}\nIs another process using the image [${filename}]?`, { cause: e });
}

/**
 * raw_open_common's `locking`: whether the node locks. `on` where this
 * process can take no locks at all (no addon) is refused rather than
 * silently ignored; `on` with POSIX locks only warns as QEMU does.
 */
export function lockingEnabled(mode: LockingMode, host: HostIo, warn: (message: string) => void): boolean {
  if (mode === 'off') return false;
  if (mode === 'auto') return host.lockKind === 'ofd';
  if (host.lockKind === null) {
    throw new BlockError('ENOTSUP', 'locking=on needs the native hostio addon for file locks, and it is not loaded');
  }
  if (host.lockKind === 'posix') {
    warn('File lock requested but OFD locking syscall is unavailable, falling back to POSIX file locks');
  }
  return true;
}

/** One open file node's locks (see the note at the top). */
export class FileLocks {
  /** Permissions last committed (s->perm, s->shared_perm). */
  private perm = 0;
  private shared: number = Perm.ALL;
  /** Bytes this description holds (s->locked_perm, s->locked_shared_perm). */
  private readonly locked: LockedBits = { perm: 0, unshared: 0 };

  constructor(
    private readonly host: HostIo,
    readonly enabled: boolean,
    /** Named in the hint (bs->filename). */
    private readonly filename: string,
  ) {}

  /** raw_handle_perm_lock(PREPARE): locks what `perm`/`shared` need and tests them, or throws with nothing changed. */
  prepare(fd: number, perm: number, shared: number): void {
    if (!this.enabled) return;
    if ((this.perm | perm) === this.perm && (this.shared & shared) === this.shared) return;
    try {
      applyLockBytes(this.host, fd, this.locked, this.perm | perm, ~this.shared | ~shared, false);
      try {
        checkLockBytes(this.host, fd, perm, shared);
      } catch (e) {
        throw withHint(e as BlockError, this.filename);
      }
    } catch (e) {
      this.abort(fd);
      throw e;
    }
  }

  /** raw_set_perm: exactly the bytes of the new permissions stay locked. */
  commit(fd: number, perm: number, shared: number): void {
    if (!this.enabled) return;
    applyLockBytes(this.host, fd, this.locked, perm, ~shared, true);
    this.perm = perm;
    this.shared = shared;
  }

  /** raw_abort_perm_update: back to the committed bytes. */
  abort(fd: number): void {
    if (!this.enabled) return;
    applyLockBytes(this.host, fd, this.locked, this.perm, ~this.shared, true);
  }

  /** Takes the bytes held on the old descriptor on `fd` too (a reopen, before the old one closes). */
  copyTo(fd: number): void {
    if (!this.enabled) return;
    applyLockBytes(this.host, fd, { perm: 0, unshared: 0 }, this.locked.perm, this.locked.unshared, false);
  }
}

/**
 * raw_co_create's locks, on the new file's descriptor before it is emptied:
 * throws QEMU's refusal when another description uses the file. Without
 * lock support (no addon) nothing is locked, as QEMU without any fcntl.
 */
export function lockForCreate(host: HostIo, fd: number, filename: string): void {
  if (host.lockKind === null) return;
  const held: LockedBits = { perm: 0, unshared: 0 };
  try {
    applyLockBytes(host, fd, held, CREATE_PERM, ~CREATE_SHARED, false);
    try {
      checkLockBytes(host, fd, CREATE_PERM, CREATE_SHARED);
    } catch (e) {
      throw withHint(e as BlockError, filename);
    }
  } catch (e) {
    unlockAfterCreate(host, fd);
    throw e;
  }
}

/** raw_co_create's unlock of every byte before the file is closed. */
export function unlockAfterCreate(host: HostIo, fd: number): void {
  if (host.lockKind === null) return;
  applyLockBytes(host, fd, { perm: Perm.ALL, unshared: Perm.ALL }, 0, 0, true);
}
