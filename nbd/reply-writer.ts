/*
 * Writes NBD frames to a connection's stream. One `send` is one frame (a
 * reply header and its payload parts) written back to back between cork and
 * uncork, so Node issues a single writev and no other frame can come
 * between the parts; bulk data is passed by reference, never copied.
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

  constructor(private stream: Duplex) {}

  /** Redirects later frames (after STARTTLS). */
  setStream(stream: Duplex): void {
    this.stream = stream;
  }

  close(): void {
    this.closed = true;
  }

  get isClosed(): boolean {
    return this.closed || this.stream.destroyed || this.stream.writableEnded;
  }

  send(parts: readonly Buffer[]): Promise<void> {
    if (this.isClosed || parts.length === 0) return Promise.resolve();
    return new Promise((resolve) => {
      const s = this.stream;
      s.cork();
      for (let i = 0; i < parts.length - 1; i++) s.write(parts[i]);
      s.write(parts[parts.length - 1], (err) => {
        if (err) this.closed = true;
        resolve();
      });
      s.uncork();
    });
  }
}
