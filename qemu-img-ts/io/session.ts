/*
 * The state one qemu-io run works on: the block graph, the open image (a
 * BlockBackend, or none), the quit flag, and where text goes.
 *
 * qemu-io prints through three channels and users' scripts depend on which
 * one: command results and most command errors on stdout (`print`), a few
 * errors bare on stderr (`printErr`: `bad argument count …`, `no file open
 * …`, getopt's messages), and error_report's `qemu-io: …` lines on stderr
 * (`report`, `warn`, and the block layer's warnings). The Output is
 * injected so tests can capture it.
 *
 * Invariant: `blk` is null or a backend on an open node; commands that need
 * an image are only run while it is set (the dispatcher checks).
 */
import { BlockBackend } from '../../block/backend.js';
import { BlockGraph } from '../../block/graph.js';
import type { BlockDriver } from '../../block/driver.js';
import { warningText, type Output } from '../cli-common.js';
import { cvtnum, cvtnumError } from './args.js';
import { invariant } from '../../block/errors.js';

/** The program name in messages (QEMU uses argv[0]'s basename; users know `qemu-io`). */
export const PROG = 'qemu-io';

export type { Output };

/** Largest request whose buffer synchronous commands reuse (bigger ones allocate). */
export const SCRATCH_MAX_BYTES = 64 << 20;

export class IoSession {
  readonly graph: BlockGraph;
  blk: BlockBackend | null = null;
  /** Set by `quit`: no further command runs. */
  quit = false;
  /** aio_read/aio_write requests not yet completed (their completion prints). */
  private readonly aioInFlight = new Set<Promise<void>>();

  /** --image-opts: the image argument, and `open`'s path, are option strings. */
  imageOpts = false;

  /** Memory reused by synchronous commands (see `syncBuffer`). */
  private scratch: Uint8Array = new Uint8Array(0);

  constructor(
    readonly output: Output,
    drivers: readonly BlockDriver[],
  ) {
    this.graph = new BlockGraph(drivers);
    // One command at a time: host I/O on this thread saves a hand-off per request.
    this.graph.syncIo = true;
    this.graph.onWarning = (message, opts) => this.output.stderr(warningText(PROG, message, opts));
  }

  /**
   * A buffer of `bytes` filled with `fill` (qemu_io_alloc) for a command that
   * completes before the next one starts (read, write, readv, writev), so
   * its memory can be reused instead of left to the garbage collector.
   * Requests above SCRATCH_MAX_BYTES get their own memory; aio_* commands,
   * whose requests outlive the command, must not use this.
   */
  syncBuffer(bytes: number, fill: number): Uint8Array {
    if (bytes > SCRATCH_MAX_BYTES) return new Uint8Array(bytes).fill(fill);
    if (this.scratch.length < bytes) this.scratch = Buffer.allocUnsafeSlow(bytes);
    return this.scratch.subarray(0, bytes).fill(fill);
  }

  /** A line on stdout (printf). */
  print(line: string): void {
    this.output.stdout(`${line}\n`);
  }

  /** A bare line on stderr (fprintf(stderr, …)). */
  printErr(line: string): void {
    this.output.stderr(`${line}\n`);
  }

  /** error_report(): `qemu-io: message` on stderr. */
  report(message: string): void {
    this.output.stderr(`${PROG}: ${message}\n`);
  }

  /** warn_report(): `qemu-io: warning: message` on stderr. */
  warn(message: string): void {
    this.output.stderr(warningText(PROG, message));
  }

  /** The open image; only called by commands the dispatcher ran with one open. */
  backend(): BlockBackend {
    invariant(this.blk, 'command needs an open image');
    return this.blk;
  }

  /** cvtnum() with qemu-io's messages: the value, or null after printing why not. */
  num(text: string): number | null {
    const r = cvtnum(text);
    if (!r.ok) {
      this.print(cvtnumError(r.errno, text));
      return null;
    }
    if (r.warning) this.warn(r.warning);
    return r.value;
  }

  /** Starts an asynchronous request; `task` reports its own outcome and must not throw. */
  startAio(task: () => Promise<void>): void {
    const running: Promise<void> = task().finally(() => this.aioInFlight.delete(running));
    this.aioInFlight.add(running);
  }

  /** blk_drain_all: waits until every asynchronous request has completed. */
  async drainAio(): Promise<void> {
    while (this.aioInFlight.size > 0) await Promise.all([...this.aioInFlight]);
  }

  /** close_f: lets go of the image once its requests are done (its node is flushed and closed). */
  async closeImage(): Promise<void> {
    await this.drainAio();
    const blk = this.blk;
    this.blk = null;
    await blk?.close();
  }
}
