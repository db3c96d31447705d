/*
 * A host file's large buffered writes, done one after another on a thread
 * of the native addon (native/writer.c) instead of libuv's pool.
 *
 * The kernel's buffered write path (tmpfs, ext4, xfs) holds the inode lock
 * exclusively for the whole copy, so a file takes one large write at a
 * time however many threads offer them. Through the pool, the writes
 * waiting for the lock spin on it (rwsem_spin_on_owner) on the core the
 * event loop and the reads need, and a file with fewer writes in flight
 * sits idle whenever the event loop is late to hand out the next. Here the
 * writes wait in a queue and one thread starts the next the moment the
 * last ends, sleeping only when the queue is empty.
 *
 * `write` resolves once every byte is in the file, or rejects with the
 * BlockError of the failing pwrite (EINVAL for one that made no progress,
 * as writeFull in direct-io.ts). Writes complete in the order they were
 * queued. The caller keeps the buffer unchanged until its write settles.
 * The thread writes to the caller's descriptor (not a dup: OFD image locks
 * would outlive the caller's close in one), so `close` waits for the queued
 * writes, then ends the thread; the descriptor may be closed once it has
 * resolved.
 *
 * openSerialWriter returns null where this is not available: no addon (or
 * one built without the writer), or QEMU_BLOCK_TS_NO_NATIVE=1; the driver
 * then writes through the pool with a WriteLane.
 */
import { toBlockError } from '../../block/errors.js';
import { hasFunctions, nativeAddon } from '../../block/native-addon.js';

export interface SerialWriter {
  /** Writes all of `buf` at `offsetBytes`, after every write queued before it. */
  write(buf: Uint8Array, offsetBytes: number): Promise<void>;
  /** No writes after this; resolves once the queued ones have settled and the thread lets go of the descriptor. */
  close(): Promise<void>;
}

interface WriterAddon {
  writerOpen(fd: number, onDone: (id: number, code: string | null) => void): object;
  writerWrite(writer: object, id: number, view: Uint8Array, offsetBytes: number): void;
  writerClose(writer: object): void;
}

const WRITER_FUNCTIONS = ['writerOpen', 'writerWrite', 'writerClose'] as const;

interface Waiter {
  resolve: () => void;
  reject: (e: unknown) => void;
}

class NativeSerialWriter implements SerialWriter {
  private readonly handle: object;
  private nextId = 0;
  private readonly waiting = new Map<number, Waiter>();
  /** The write queued last: writes settle in queue order, so once it has, all have. */
  private last: Promise<void> = Promise.resolve();

  constructor(
    private readonly addon: WriterAddon,
    fd: number,
  ) {
    this.handle = addon.writerOpen(fd, (id, code) => this.done(id, code));
  }

  write(buf: Uint8Array, offsetBytes: number): Promise<void> {
    const id = this.nextId++;
    const written = new Promise<void>((resolve, reject) => {
      try {
        this.addon.writerWrite(this.handle, id, buf, offsetBytes);
      } catch (e) {
        reject(toBlockError(e)); // closed (EBADF) or out of memory: nothing was queued
        return;
      }
      this.waiting.set(id, { resolve, reject });
    });
    this.last = written.catch(() => undefined);
    return written;
  }

  async close(): Promise<void> {
    await this.last;
    this.addon.writerClose(this.handle);
  }

  private done(id: number, code: string | null): void {
    const waiter = this.waiting.get(id);
    this.waiting.delete(id);
    if (code === null) waiter?.resolve();
    else waiter?.reject(toBlockError(Object.assign(new Error(`pwrite: ${code}`), { code })));
  }
}

/** A writer thread for descriptor `fd`, or null where the native path is not available. */
export function openSerialWriter(fd: number): SerialWriter | null {
  const addon = nativeAddon();
  if (!hasFunctions(addon, WRITER_FUNCTIONS)) return null;
  try {
    return new NativeSerialWriter(addon as unknown as WriterAddon, fd);
  } catch {
    // No thread to spare: the pool still works.
    return null;
  }
}
