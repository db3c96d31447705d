/*
 * Assembling the reply of one NBD request from the frames that answer it:
 * a simple reply, or structured/extended chunks up to the one flagged DONE.
 *
 * A collector is told about each frame; it either records it (data copied
 * into the caller's buffer, a hole zero-filled, extents kept, the first
 * error remembered) or throws a ProtocolError, which ends the connection
 * (the server broke the protocol; QEMU quits such a connection). When the
 * reply is complete, `finish` returns the result or throws the request's
 * error: a BlockError whose code is the NBD error (nbdToErrno), as QEMU's
 * client returns it — per chunk, a structured error fails only its request.
 *
 * Checks, with QEMU's wording where QEMU has one (block/nbd.c): data and
 * holes inside the request, holes of non-zero size, NONE only as the last
 * chunk and empty, no chunk types a command cannot get, error chunks with a
 * non-zero error, block status only for negotiated contexts, at most one
 * chunk per context, no empty extents. Beyond QEMU: a successful READ must
 * be covered exactly by its chunks (no gaps, no overlaps), else the server
 * left part of the buffer undefined.
 */
import { BlockError } from '../block/errors.js';
import { Cmd, NbdErr, ReplyFlag, ReplyType, cmdName, isErrorChunk, nbdToErrno, replyTypeName } from './protocol.js';
import { decodeChunkPayload, type ChunkHeader, type ChunkPayload, type Extent } from './wire-transmission.js';

/** The server broke the protocol: the connection cannot be trusted any more. */
export class ProtocolError extends Error {
  override readonly name = 'ProtocolError';
}

function protocolError(message: string): ProtocolError {
  return new ProtocolError(`Protocol error: ${message}`);
}

/** Gathers the reply of one request. */
export interface ReplyCollector<T> {
  /** Data bytes that follow a successful simple reply (READ without structured replies), else 0. */
  readonly simpleDataBytes: number;
  onSimple(error: number, data: Buffer | null): void;
  onChunk(header: ChunkHeader, payload: ChunkPayload): void;
  finish(): T;
}

/** The error-chunk and NONE handling every collector shares. */
abstract class BaseCollector<T> implements ReplyCollector<T> {
  protected errorCode = 0;
  protected errorMessage = '';
  readonly simpleDataBytes: number = 0;

  constructor(protected readonly command: string) {}

  onSimple(error: number, _data: Buffer | null): void {
    if (error !== 0) this.recordError(error, '');
  }

  onChunk(header: ChunkHeader, payload: ChunkPayload): void {
    if (header.type === ReplyType.NONE) {
      if (!(header.flags & ReplyFlag.DONE)) throw protocolError('NBD_REPLY_TYPE_NONE chunk without NBD_REPLY_FLAG_DONE flag set');
      return;
    }
    if (isErrorChunk(header.type)) {
      const p = payload as { error: number; message: string };
      if (p.error === 0) throw protocolError('server sent structured error chunk with error = 0');
      this.recordError(p.error, p.message);
      return;
    }
    if (!this.onContent(header, payload)) {
      throw new ProtocolError(`Unexpected reply type: ${header.type} (${replyTypeName(header.type)}) for ${this.command}`);
    }
  }

  /** A content chunk; false when this command cannot receive its type. */
  protected onContent(_header: ChunkHeader, _payload: ChunkPayload): boolean {
    return false;
  }

  protected recordError(error: number, message: string): void {
    if (this.errorCode !== 0) return;
    this.errorCode = error;
    this.errorMessage = message;
  }

  /** Throws the request's error, if the server reported one. */
  protected throwIfFailed(): void {
    if (this.errorCode === 0) return;
    const code = nbdToErrno(this.errorCode);
    const cause = this.errorMessage ? new Error(`server reported: ${this.errorMessage}`) : undefined;
    throw new BlockError(code, undefined, cause ? { cause } : undefined);
  }

  abstract finish(): T;
}

// ---------------------------------------------------------------- commands without data

/** WRITE, FLUSH, TRIM, CACHE, WRITE_ZEROES: success or an error. */
export class StatusCollector extends BaseCollector<void> {
  finish(): void {
    this.throwIfFailed();
  }
}

// ---------------------------------------------------------------- READ

/** Separate (out-of-order) ranges a READ reply may cover before it is refused; bounds memory. */
export const MAX_READ_FRAGMENTS = 65536;

/** READ into `buf` (the request covers [offsetBytes, offsetBytes + buf.length)). */
export class ReadCollector extends BaseCollector<void> {
  override readonly simpleDataBytes: number;
  /** Covered [start, end) ranges relative to the request, in arrival order. */
  private readonly covered: Array<[number, number]> = [];

  constructor(
    private readonly offsetBytes: number,
    private readonly buf: Uint8Array,
    structured: boolean,
  ) {
    super(commandLabel(Cmd.READ));
    this.simpleDataBytes = structured ? 0 : buf.length;
  }

  override onSimple(error: number, data: Buffer | null): void {
    if (error !== 0) {
      this.recordError(error, '');
      return;
    }
    if (data) this.buf.set(data);
    this.covered.push([0, this.buf.length]);
  }

  protected override onContent(_header: ChunkHeader, payload: ChunkPayload): boolean {
    if (payload.type === ReplyType.OFFSET_DATA && 'data' in payload) {
      const at = this.place(payload.offset, payload.data.length);
      this.buf.set(payload.data, at);
      return true;
    }
    if (payload.type === ReplyType.OFFSET_HOLE && 'length' in payload) {
      if (payload.length === 0) throw protocolError('server sent chunk exceeding requested region');
      const at = this.place(payload.offset, payload.length);
      this.buf.fill(0, at, at + payload.length);
      return true;
    }
    return false;
  }

  /** Where a chunk of `bytes` at `offset` lands in the buffer; a protocol error when outside. */
  private place(offset: number, bytes: number): number {
    const at = offset - this.offsetBytes;
    if (at < 0 || bytes > this.buf.length || at > this.buf.length - bytes) {
      throw protocolError('server sent chunk exceeding requested region');
    }
    // Chunks in order extend the last range, so the list stays short for any sane server.
    const last = this.covered[this.covered.length - 1];
    if (last && last[1] === at) last[1] = at + bytes;
    else if (this.covered.push([at, at + bytes]) > MAX_READ_FRAGMENTS) {
      throw protocolError('server sent too many out-of-order read chunks');
    }
    return at;
  }

  finish(): void {
    this.throwIfFailed();
    if (!coversExactly(this.covered, this.buf.length)) {
      throw protocolError('server sent read chunks that do not cover the requested region exactly once');
    }
  }
}

function coversExactly(ranges: Array<[number, number]>, length: number): boolean {
  const sorted = [...ranges].sort((a, b) => a[0] - b[0]);
  let next = 0;
  for (const [start, end] of sorted) {
    if (start !== next) return false;
    next = end;
  }
  return next === length;
}

// ---------------------------------------------------------------- BLOCK_STATUS

/** Block status answer: extents by context name, each list starting at the request offset. */
export type BlockStatusReply = Map<string, Extent[]>;

export class BlockStatusCollector extends BaseCollector<BlockStatusReply> {
  private readonly reply: BlockStatusReply = new Map();

  /** `contexts`: negotiated id → name; `lengthBytes`: the request's length (extents are clamped to it). */
  constructor(
    private readonly contexts: ReadonlyMap<number, string>,
    private readonly lengthBytes: number,
    private readonly reqOne: boolean,
  ) {
    super(commandLabel(Cmd.BLOCK_STATUS));
  }

  protected override onContent(_header: ChunkHeader, payload: ChunkPayload): boolean {
    if (payload.type !== ReplyType.BLOCK_STATUS && payload.type !== ReplyType.BLOCK_STATUS_EXT) return false;
    const p = payload as { contextId: number; extents: Extent[] };
    const name = this.contexts.get(p.contextId);
    if (name === undefined) {
      throw protocolError(`unexpected context id ${p.contextId} for NBD_REPLY_TYPE_BLOCK_STATUS`);
    }
    if (this.reply.has(name)) throw new ProtocolError('Several BLOCK_STATUS chunks in reply');
    this.reply.set(name, this.clamp(p.extents));
    return true;
  }

  /** Extents up to the request's end (a server may describe more); one with REQ_ONE. */
  private clamp(extents: Extent[]): Extent[] {
    const out: Extent[] = [];
    let left = this.lengthBytes;
    for (const e of extents) {
      if (e.length === 0) throw protocolError('server sent status chunk with zero length');
      if (left === 0 || (this.reqOne && out.length === 1)) break;
      const length = Math.min(e.length, left);
      out.push({ length, flags: e.flags });
      left -= length;
    }
    return out;
  }

  override onSimple(error: number, _data: Buffer | null): void {
    this.recordError(error === 0 ? NbdErr.EIO : error, error === 0 ? 'Server did not reply with any status extents' : '');
  }

  finish(): BlockStatusReply {
    this.throwIfFailed();
    if (this.reply.size === 0) throw new BlockError('EIO', 'Server did not reply with any status extents');
    return this.reply;
  }
}

/** The command as QEMU's messages name it: CMD_READ, CMD_WRITE_ZEROES, … */
export function commandLabel(type: number): string {
  return `CMD_${cmdName(type).toUpperCase().replaceAll(' ', '_')}`;
}

/** Decodes a chunk's payload, or throws the protocol error (unknown non-error types included). */
export function decodeChunk(header: ChunkHeader, raw: Buffer): ChunkPayload {
  const r = decodeChunkPayload(header.type, raw);
  if (!r.ok) throw protocolError(r.reason);
  return r.value;
}
