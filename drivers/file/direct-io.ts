/*
 * Positioned reads and writes of a host file, buffered or O_DIRECT
 * (cache.direct=on), as QEMU's file-posix does them.
 *
 * Buffered I/O goes straight through FileHandle read/write. O_DIRECT adds
 * two rules the kernel enforces with EINVAL: offsets and lengths must be
 * multiples of the request alignment, and so must the memory address. The
 * gate (block/io.ts) takes care of the first once open sets
 * `limits.requestAlignment` to what probeRequestAlignment finds; this file
 * takes care of the second: a caller's buffer that is already aligned is
 * used as it is, any other goes through a bounce buffer of aligned memory
 * from the native addon, DIRECT_BOUNCE_BYTES at a time, so a 1 GiB request
 * costs no more than one bounce buffer. Each node has a pool of at most
 * DIRECT_BOUNCES_MAX of them; a request that finds none free waits for one.
 *
 * Alignment probing (raw_probe_alignment): a block device reports its
 * logical block size; otherwise reads of 1, 512, 1024, 2048 and 4096 bytes
 * at offset 0 into aligned memory are tried, and the first that does not
 * fail with EINVAL wins. When even 1 byte works the probe learnt nothing
 * (an empty file, a file system that does not check), so the safe
 * MAX_BLOCK_BYTES is used. Memory is aligned to the request alignment too:
 * QEMU probes the memory alignment separately, but on Linux it never exceeds
 * the logical block size.
 *
 * Short reads are end of file: the rest of the buffer is zero-filled. With
 * O_DIRECT the read after a short one starts at an unaligned offset and the
 * kernel answers EINVAL; that too means end of file (handle_aiocb_rw_linear).
 * A write that makes no progress fails with EINVAL, as in QEMU.
 *
 * Left out: XFS_IOC_DIOINFO and statx(STATX_DIOALIGN); the host page size
 * (QEMU's fallback is the larger of 4 KiB and the page size); NFS's
 * byte-aligned O_DIRECT (QEMU skips the probe there).
 */
import fs from 'node:fs';
import { BlockError, toBlockError } from '../../block/errors.js';
import type { HostIo } from './host-io.js';
import type { SerialWriter } from './serial-writer.js';

/** QEMU's MAX_BLOCKSIZE: the alignment used when probing learns nothing. */
export const MAX_BLOCK_BYTES = 4096;
/** Read sizes tried at offset 0, smallest first (raw_probe_alignment). */
const PROBE_ALIGNMENTS = [1, 512, 1024, 2048, 4096] as const;
/** One bounce buffer; unaligned requests are copied through it in chunks this size. */
export const DIRECT_BOUNCE_BYTES = 1 << 20;
/** Bounce buffers one node holds at most; further unaligned requests wait. */
export const DIRECT_BOUNCES_MAX = 4;

/** An open host file and, with O_DIRECT, what its I/O needs. */
export interface HostFile {
  fh: fs.promises.FileHandle;
  direct: DirectIo | null;
  /** Large buffered writes go through it, one after another (serial-writer.ts). */
  serialWriter?: SerialWriter;
  /** Without a serialWriter, large buffered writes go through it (see WriteLane); absent: no limit. */
  writeLane?: WriteLane;
  /** Positioned I/O on the calling thread (OpenFlags.syncIo). */
  syncIo: boolean;
}

/** One positioned read or write of part of `buf`, returning the bytes moved. */
type Transfer = (buf: Uint8Array, at: number, bytes: number, offsetBytes: number) => Promise<number>;

/**
 * Under syncIo, reads of this many bytes or more still go through the
 * thread pool: there the copy in the kernel dwarfs the hand-off, and several
 * such transfers in flight (convert's workers) run on several cores.
 */
export const SYNC_READ_MAX_BYTES = 256 << 10;

/**
 * The same bound for writes, higher: NBD clients write 256 KiB requests
 * (nbdcopy, qemu-img), and with them on the event loop an nbdcopy write of
 * 1 GiB into a tmpfs export took 1.41–1.58 s instead of 1.84–2.62 s (each
 * pool hand-off cost the event loop ~50 µs there). Reads keep the lower
 * bound: large NBD READs no longer pass through here (nbd/socket-sender.ts),
 * and convert's reads of 256–512 KiB qcow2 runs gained nothing on the event
 * loop.
 */
export const SYNC_WRITE_MAX_BYTES = 512 << 10;

/** How a read of `bytes` bytes moves: on the calling thread under syncIo when small, else in the pool. */
function readTransfer(fh: fs.promises.FileHandle, syncIo: boolean, bytes: number): Transfer {
  if (syncIo && bytes < SYNC_READ_MAX_BYTES) return async (buf, at, n, offsetBytes) => fs.readSync(fh.fd, buf, at, n, offsetBytes);
  return (buf, at, n, offsetBytes) => pooled(fs.read, fh.fd, buf, at, n, offsetBytes);
}

/** How a write of `bytes` bytes moves (see readTransfer). */
function writeTransfer(fh: fs.promises.FileHandle, syncIo: boolean, bytes: number): Transfer {
  if (syncIo && bytes < SYNC_WRITE_MAX_BYTES) return async (buf, at, n, offsetBytes) => fs.writeSync(fh.fd, buf, at, n, offsetBytes);
  return (buf, at, n, offsetBytes) => pooled(fs.write, fh.fd, buf, at, n, offsetBytes);
}

/**
 * One positioned read or write in libuv's thread pool through the callback
 * API: for the same work, FileHandle's promise API costs about twice the
 * event-loop time per request (its promise and result object come on top
 * of the request's), which shows with many small requests (NBD at 4 KiB).
 */
function pooled(
  op: (fd: number, buf: Uint8Array, at: number, bytes: number, offsetBytes: number, done: (err: Error | null, moved: number) => void) => void,
  fd: number,
  buf: Uint8Array,
  at: number,
  bytes: number,
  offsetBytes: number,
): Promise<number> {
  return new Promise((resolve, reject) => op(fd, buf, at, bytes, offsetBytes, (err, moved) => (err ? reject(err) : resolve(moved))));
}

/**
 * Buffered writes of at least this many bytes go one at a time per file.
 * Smaller ones hold the inode lock briefly and keep their concurrency.
 */
export const SERIAL_WRITE_MIN_BYTES = 256 << 10;

/**
 * A file's large buffered writes in flight at once: one copying and the
 * rest waiting at the inode lock, so the next starts the moment one ends
 * even when the event loop is slow to hand out the next.
 * Measured: with one, an NBD server busy on its event loop left the file
 * idle between writes (nbdcopy ~15% slower); with two, a mirror of 512 MiB
 * of data between qcow2 images on tmpfs took a median 356 ms, with three
 * 360, four 328, eight 333 (12 interleaved rounds on warm pages, see
 * bench/lib.mjs warmFreePages; qemu-storage-daemon 298): the event loop,
 * busy with the job between completions, often reached the next write only
 * after the lock had gone idle. Convert (one write at a time, in order) is
 * the same with two or four. With no limit, writers spinning on the lock
 * (rwsem_spin_on_owner) would take more of libuv's pool than its four
 * threads, and reads of other files would queue behind them.
 */
export const SERIAL_WRITES_IN_FLIGHT = 4;

/**
 * The lane of a file's large buffered writes where the addon's writer
 * thread (serial-writer.ts) is missing. The kernel's buffered write path
 * (tmpfs, ext4, xfs) holds the inode lock exclusively for the whole copy,
 * so more large writes in flight on other pool threads cannot overlap the
 * one copying: they spin on the lock (rwsem_spin_on_owner), burning cores
 * that reads and the event loop need, then copy after it anyway. Holding
 * the rest back here costs no throughput and frees them. (A read-only
 * descriptor gets a lane too, never used: it takes no writes.)
 */
export class WriteLane {
  private running = 0;
  private readonly waiting: Array<() => void> = [];

  async run<T>(body: () => Promise<T>): Promise<T> {
    if (this.running >= SERIAL_WRITES_IN_FLIGHT) await new Promise<void>((resolve) => this.waiting.push(resolve));
    else this.running++;
    try {
      return await body();
    } finally {
      const next = this.waiting.shift();
      if (next) next();
      else this.running--;
    }
  }
}

/** Aligned bounce buffers of one O_DIRECT file. */
export class DirectIo {
  private readonly free: Uint8Array[] = [];
  private allocated = 0;
  private readonly waiters: Array<(bounce: Uint8Array) => void> = [];

  constructor(
    private readonly host: HostIo,
    /** Request and memory alignment in bytes (a power of two). */
    readonly alignBytes: number,
  ) {}

  /** Bounce buffers allocated so far; never more than DIRECT_BOUNCES_MAX. */
  get bounceCount(): number {
    return this.allocated;
  }

  /** Whether `buf` can be handed to the kernel as it is. */
  canUse(buf: Uint8Array): boolean {
    return this.host.isAligned(buf, this.alignBytes);
  }

  /** A free bounce buffer; waits while all DIRECT_BOUNCES_MAX are in use. */
  async acquire(): Promise<Uint8Array> {
    const bounce = this.free.pop();
    if (bounce) return bounce;
    if (this.allocated < DIRECT_BOUNCES_MAX) {
      const bytes = Math.max(DIRECT_BOUNCE_BYTES, this.alignBytes);
      const fresh = new Uint8Array(this.host.alignedBuffer(bytes, this.alignBytes));
      this.allocated++;
      return fresh;
    }
    return new Promise((resolve) => this.waiters.push(resolve));
  }

  release(bounce: Uint8Array): void {
    const waiter = this.waiters.shift();
    if (waiter) waiter(bounce);
    else this.free.push(bounce);
  }
}

function errorCode(e: unknown): unknown {
  return (e as { code?: unknown } | null)?.code;
}

/** Reads buf.length bytes at offsetBytes into buf; zeroes past end of file. */
export async function readFull(
  fh: fs.promises.FileHandle,
  buf: Uint8Array,
  offsetBytes: number,
  direct: boolean,
  syncIo = false,
) {
  const read = readTransfer(fh, syncIo, buf.length);
  for (let done = 0; done < buf.length; ) {
    let bytesRead: number;
    try {
      bytesRead = await read(buf, done, buf.length - done, offsetBytes + done);
    } catch (e) {
      if (!(direct && done > 0 && errorCode(e) === 'EINVAL')) throw toBlockError(e);
      bytesRead = 0;
    }
    if (bytesRead === 0) {
      buf.fill(0, done);
      return;
    }
    done += bytesRead;
  }
}

/** Writes all of buf at offsetBytes. */
export async function writeFull(fh: fs.promises.FileHandle, buf: Uint8Array, offsetBytes: number, syncIo = false) {
  const write = writeTransfer(fh, syncIo, buf.length);
  for (let done = 0; done < buf.length; ) {
    let bytesWritten: number;
    try {
      bytesWritten = await write(buf, done, buf.length - done, offsetBytes + done);
    } catch (e) {
      throw toBlockError(e);
    }
    if (bytesWritten === 0) throw new BlockError('EINVAL');
    done += bytesWritten;
  }
}

/** Runs `step` over [0, bytes) in bounce-sized chunks, holding one bounce buffer. */
async function throughBounce(
  direct: DirectIo,
  bytes: number,
  step: (bounce: Uint8Array, doneBytes: number) => Promise<void>,
): Promise<void> {
  const bounce = await direct.acquire();
  try {
    for (let done = 0; done < bytes; done += bounce.length) {
      await step(bounce.subarray(0, Math.min(bounce.length, bytes - done)), done);
    }
  } finally {
    direct.release(bounce);
  }
}

/** Reads into buf at offsetBytes, through a bounce buffer when O_DIRECT needs one. */
export async function preadHost(file: HostFile, offsetBytes: number, buf: Uint8Array): Promise<void> {
  const { fh, direct, syncIo } = file;
  if (!direct || direct.canUse(buf)) {
    await readFull(fh, buf, offsetBytes, direct !== null, syncIo);
    return;
  }
  await throughBounce(direct, buf.length, async (chunk, done) => {
    await readFull(fh, chunk, offsetBytes + done, true, syncIo);
    buf.set(chunk, done);
  });
}

/** Writes buf at offsetBytes, through a bounce buffer when O_DIRECT needs one. */
export async function pwriteHost(file: HostFile, offsetBytes: number, buf: Uint8Array): Promise<void> {
  const { fh, direct, syncIo } = file;
  if (file.serialWriter && buf.length >= (syncIo ? SYNC_WRITE_MAX_BYTES : SERIAL_WRITE_MIN_BYTES)) {
    await file.serialWriter.write(buf, offsetBytes);
    return;
  }
  if (!direct && file.writeLane && buf.length >= SERIAL_WRITE_MIN_BYTES) {
    await file.writeLane.run(() => writeFull(fh, buf, offsetBytes, syncIo));
    return;
  }
  if (!direct || direct.canUse(buf)) {
    await writeFull(fh, buf, offsetBytes, syncIo);
    return;
  }
  await throughBounce(direct, buf.length, async (chunk, done) => {
    chunk.set(buf.subarray(done, done + chunk.length));
    await writeFull(fh, chunk, offsetBytes + done, syncIo);
  });
}

/** Whether an O_DIRECT read of probe.length bytes at 0 is accepted (raw_is_io_aligned). */
async function readAccepted(fh: fs.promises.FileHandle, probe: Uint8Array): Promise<boolean> {
  try {
    await fh.read(probe, 0, probe.length, 0);
    return true;
  } catch (e) {
    // Only EINVAL speaks of alignment; other errors (a failing disk) do not.
    return errorCode(e) !== 'EINVAL';
  }
}

/** The request alignment of an O_DIRECT file; null when no probe size works. */
export async function probeRequestAlignment(fh: fs.promises.FileHandle, host: HostIo): Promise<number | null> {
  const logicalBytes = host.logicalBlockBytes(fh.fd);
  if (logicalBytes !== null) return logicalBytes;
  const probe = new Uint8Array(host.alignedBuffer(MAX_BLOCK_BYTES, MAX_BLOCK_BYTES));
  for (const alignBytes of PROBE_ALIGNMENTS) {
    if (await readAccepted(fh, probe.subarray(0, alignBytes))) {
      return alignBytes === 1 ? MAX_BLOCK_BYTES : alignBytes;
    }
  }
  return null;
}
