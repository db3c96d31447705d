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
 * `send` resolves when the stream has handed the bytes to the OS (the write
 * callback). The server counts a request in flight until then, so a client
 * that stops reading replies stops being served new requests instead of
 * growing the server's write buffer. After the stream failed or was closed,
 * `send` resolves at once and writes nothing.
 */
import type { Duplex } from 'node:stream';

export class ReplyWriter {
  private closed = false;
  /** The stream is corked and an uncork is scheduled. */
  private batching = false;

  constructor(private stream: Duplex) {}

  /** Redirects later frames (after STARTTLS); what was batched goes out on the old stream first. */
  setStream(stream: Duplex): void {
    this.flush();
    this.stream = stream;
  }

  close(): void {
    this.flush();
    this.closed = true;
  }

  get isClosed(): boolean {
    return this.closed || this.stream.destroyed || this.stream.writableEnded;
  }

  send(parts: readonly Buffer[]): Promise<void> {
    if (this.isClosed || parts.length === 0) return Promise.resolve();
    return new Promise((resolve) => {
      const s = this.stream;
      if (!this.batching) {
        this.batching = true;
        s.cork();
        setImmediate(this.flush);
      }
      for (let i = 0; i < parts.length - 1; i++) s.write(parts[i]);
      s.write(parts[parts.length - 1], (err) => {
        if (err) this.closed = true;
        resolve();
      });
    });
  }

  /** Writes out what was batched. */
  private readonly flush = (): void => {
    if (!this.batching) return;
    this.batching = false;
    this.stream.uncork();
  };
}
