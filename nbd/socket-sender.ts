/*
 * Sends READ replies from a host file straight to a client's socket, on a
 * thread of the native addon (native/sender.c): a reply header, then the
 * file's bytes by sendfile(), with no copy through a JS buffer and no work
 * on the event loop beyond queueing the frame and hearing it is done.
 *
 * One SocketSender per plain (non-TLS) connection, opened when transmission
 * starts. Frames leave in the order they were queued, each whole; the
 * connection's ReplyWriter keeps its own writes and these apart (it never
 * writes to the socket while frames are queued here, nor queues a frame
 * while its own writes are pending).
 *
 * `sendFile` resolves true when every byte was handed to the kernel, false
 * when the frame failed (the client went away, the socket broke) or the
 * sender was closed first: the stream is then out of step and the
 * connection must close. It never rejects. `close(true)` aborts: the socket
 * is shut down, so a frame blocked on a client that stopped reading ends at
 * once, and queued frames resolve false.
 *
 * openSocketSender returns null where this cannot work: no addon (or one
 * without the sender), a non-Linux host, a socket without a descriptor, or
 * QEMU_BLOCK_TS_NO_NATIVE=1. The server then answers with pread + write.
 */
import type net from 'node:net';
import { hasFunctions, nativeAddon } from '../block/native-addon.js';

export interface SocketSender {
  /** Queues `header` followed by `bytes` bytes of file `fd` from `offsetBytes`. */
  sendFile(header: Buffer, fd: number, offsetBytes: number, bytes: number): Promise<boolean>;
  /** No frames after this; with `abort`, queued ones fail and the socket is shut down. */
  close(abort: boolean): void;
}

interface SenderAddon {
  senderOpen(socketFd: number, onDone: (id: number, code: string | null) => void): object;
  senderFileRange(sender: object, id: number, header: Buffer, fd: number, offsetBytes: number, bytes: number): void;
  senderClose(sender: object, abort: boolean): void;
}

const SENDER_FUNCTIONS = ['senderOpen', 'senderFileRange', 'senderClose'] as const;

/** A socket's descriptor, where Node's handle exposes one (TCP and unix sockets on POSIX). */
function socketFd(socket: net.Socket): number | null {
  const fd = (socket as unknown as { _handle?: { fd?: unknown } })._handle?.fd;
  return typeof fd === 'number' && Number.isInteger(fd) && fd >= 0 ? fd : null;
}

class NativeSocketSender implements SocketSender {
  private readonly handle: object;
  private nextId = 0;
  private readonly waiting = new Map<number, (sent: boolean) => void>();
  private closed = false;

  constructor(
    private readonly addon: SenderAddon,
    fd: number,
  ) {
    this.handle = addon.senderOpen(fd, (id, code) => this.done(id, code));
  }

  sendFile(header: Buffer, fd: number, offsetBytes: number, bytes: number): Promise<boolean> {
    if (this.closed) return Promise.resolve(false);
    const id = this.nextId++;
    try {
      this.addon.senderFileRange(this.handle, id, header, fd, offsetBytes, bytes);
    } catch {
      // dup() of the file failed (EMFILE): nothing was queued or written.
      return Promise.resolve(false);
    }
    return new Promise((resolve) => this.waiting.set(id, resolve));
  }

  close(abort: boolean): void {
    if (this.closed) return;
    this.closed = true;
    this.addon.senderClose(this.handle, abort);
  }

  private done(id: number, code: string | null): void {
    const resolve = this.waiting.get(id);
    this.waiting.delete(id);
    resolve?.(code === null);
  }
}

/** A sender for `socket`, or null where the native path is not available. */
export function openSocketSender(socket: net.Socket): SocketSender | null {
  const addon = nativeAddon();
  const fd = socketFd(socket);
  if (!hasFunctions(addon, SENDER_FUNCTIONS) || fd === null) return null;
  try {
    return new NativeSocketSender(addon as unknown as SenderAddon, fd);
  } catch {
    // ENOTSUP off Linux; EMFILE or no thread: the plain path still works.
    return null;
  }
}
