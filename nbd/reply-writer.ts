/*
 * Writes NBD frames to a connection's stream. One `send` is one frame (a
 * reply header and its payload parts), written back to back so no other
 * frame can come between the parts; bulk data is passed by reference,
 * never copied.
 *
 * Frames are batched: the first frame after a flush corks the stream and
 * schedules the uncork with setImmediate, so every frame sent in the same
 * turn of the event loop (replies whose reads completed together, the
 * chunks of one sparse read) leaves in a single writev. Under load that is
 * one system call and one wake-up of the client for many replies instead
 * of one each; an idle connection waits at most until the end of the
 * current loop turn.
 *
 * With a SocketSender attached (plain sockets, nbd/socket-sender.ts),
 * `sendFile` frames go out on the sender's thread straight from a host
 * file. The two paths write to one socket, so frames keep their order in
 * one queue: a file frame starts only when no stream write is pending, a
 * stream frame only when no file frame is; whichever has to wait is queued
 * and started, in order, when the other side drains. Frames of one kind
 * follow each other without waiting (the stream buffers, the sender queues).
 *
 * `send` and `sendFile` resolve when the bytes were handed to the OS (the
 * write callback, the sender's report). The server counts a request in
 * flight until then, so a client that stops reading replies stops being
 * served new requests instead of growing the server's write buffer. After
 * the stream failed or was closed, they resolve at once and write nothing.
 * A file frame that fails leaves the stream out of step: the writer closes
 * and calls `onBroken` (the connection drops the client).
 */
import type { Duplex } from 'node:stream';
import type { SocketSender } from './socket-sender.js';

interface Waiting {
  fileFrame: boolean;
  start: () => void;
}

export class ReplyWriter {
  private closed = false;
  /** The stream is corked and an uncork is scheduled. */
  private batching = false;
  private sender: SocketSender | null = null;
  /** Frames written to the stream whose write callback has not come. */
  private streamPending = 0;
  /** Frames queued on the sender, not yet reported. */
  private filePending = 0;
  /** Frames waiting for the other path to drain, in order. */
  private readonly waiting: Waiting[] = [];
  private idleWaiters: Array<() => void> = [];

  constructor(
    private stream: Duplex,
    private readonly onBroken: () => void = () => undefined,
  ) {}

  /** Redirects later frames (after STARTTLS); what was batched goes out on the old stream first. */
  setStream(stream: Duplex): void {
    this.flush();
    this.stream = stream;
  }

  /** Lets `sendFile` frames go out through `sender` (a plain socket in transmission). */
  attachSender(sender: SocketSender): void {
    this.sender = sender;
  }

  /** Whether file frames can be sent. */
  get sendsFiles(): boolean {
    return this.sender !== null && !this.isClosed;
  }

  /** No more frames are accepted; those queued still go out. */
  close(): void {
    this.flush();
    this.closed = true;
  }

  /** Closes and stops the sender: a file frame blocked on the client ends now. */
  abort(): void {
    this.close();
    this.sender?.close(true);
    this.sender = null;
  }

  /** Lets the sender's thread end once its frames are out (graceful close). */
  releaseSender(): void {
    this.sender?.close(false);
    this.sender = null;
  }

  get isClosed(): boolean {
    return this.closed || this.stream.destroyed || this.stream.writableEnded;
  }

  /** Resolves when nothing is pending or waiting on either path. */
  idle(): Promise<void> {
    const p = new Promise<void>((resolve) => this.idleWaiters.push(resolve));
    this.checkIdle();
    return p;
  }

  send(parts: readonly Buffer[]): Promise<void> {
    if (this.isClosed || parts.length === 0) return Promise.resolve();
    return new Promise((resolve) => this.enqueue(false, () => this.writeStream(parts, resolve)));
  }

  /** A frame of `header` then `bytes` bytes of file `fd` at `offsetBytes`; needs `sendsFiles`. */
  sendFile(header: Buffer, fd: number, offsetBytes: number, bytes: number): Promise<void> {
    if (!this.sendsFiles) return Promise.resolve();
    return new Promise((resolve) => this.enqueue(true, () => this.writeFile(header, fd, offsetBytes, bytes, resolve)));
  }

  private enqueue(fileFrame: boolean, start: () => void): void {
    const otherPending = fileFrame ? this.streamPending : this.filePending;
    if (this.waiting.length === 0 && otherPending === 0) start();
    else this.waiting.push({ fileFrame, start });
  }

  private writeStream(parts: readonly Buffer[], resolve: () => void): void {
    const s = this.stream;
    if (s.destroyed || s.writableEnded) {
      resolve();
      return this.advance();
    }
    if (!this.batching) {
      this.batching = true;
      s.cork();
      setImmediate(this.flush);
    }
    this.streamPending++;
    for (let i = 0; i < parts.length - 1; i++) s.write(parts[i]);
    s.write(parts[parts.length - 1], (err) => {
      this.streamPending--;
      if (err) this.closed = true;
      resolve();
      this.advance();
    });
  }

  private writeFile(header: Buffer, fd: number, offsetBytes: number, bytes: number, resolve: () => void): void {
    const sender = this.sender;
    if (!sender) {
      resolve();
      return this.advance();
    }
    this.filePending++;
    void sender.sendFile(header, fd, offsetBytes, bytes).then((sent) => {
      this.filePending--;
      if (!sent && !this.closed) {
        this.abort();
        this.onBroken();
      }
      resolve();
      this.advance();
    });
  }

  /** Starts waiting frames whose path is now free. */
  private advance(): void {
    while (this.waiting.length > 0) {
      const head = this.waiting[0];
      if ((head.fileFrame ? this.streamPending : this.filePending) > 0) break;
      this.waiting.shift();
      head.start();
    }
    this.checkIdle();
  }

  private checkIdle(): void {
    if (this.idleWaiters.length === 0 || this.waiting.length || this.streamPending || this.filePending) return;
    const waiters = this.idleWaiters;
    this.idleWaiters = [];
    for (const w of waiters) w();
  }

  /** Writes out what was batched. */
  private readonly flush = (): void => {
    if (!this.batching) return;
    this.batching = false;
    this.stream.uncork();
  };
}
