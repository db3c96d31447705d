/*
 * Wire structs of the NBD transmission phase: requests (compact, 28 bytes,
 * and extended, 32 bytes), the simple reply, structured reply chunk headers
 * (20 bytes) and extended reply headers (32 bytes), the chunk payloads
 * (OFFSET_DATA, OFFSET_HOLE, BLOCK_STATUS, BLOCK_STATUS_EXT, ERROR,
 * ERROR_OFFSET, NONE) and the extended BLOCK_STATUS payload.
 *
 * Encoders for the server's hot path build one Buffer holding a reply
 * header and the fixed part of its payload; bulk data (read data, write
 * payloads) is written separately by the caller (writev), never copied
 * here. `extended` selects the 32-byte extended reply header, which also
 * carries the request's offset.
 *
 * Decoders return a reason rather than throwing. Cookies are opaque
 * 64-bit values kept as bigints; offsets and lengths are numbers (see
 * wire-util.ts for values past 2^53).
 */
import {
  Cmd,
  CmdFlag,
  EXTENDED_REPLY_MAGIC,
  EXTENDED_REQUEST_MAGIC,
  MAX_BLOCK_STATUS_EXTENTS,
  REQUEST_MAGIC,
  ReplyType,
  SIMPLE_REPLY_MAGIC,
  STRUCTURED_REPLY_MAGIC,
  isErrorChunk,
  replyTypeName,
} from './protocol.js';
import { fail, ok, readU64, readU64Exact, utf8, writeU64, type Decoded } from './wire-util.js';

const hex = (n: number): string => `0x${(n >>> 0).toString(16)}`;

// ---------------------------------------------------------------- requests

/**
 * Compact request, 28 bytes (followed by `length` bytes of data for WRITE):
 *   [ 0 ..  3]  REQUEST_MAGIC (0x25609513)
 *   [ 4 ..  5]  command flags (CmdFlag)
 *   [ 6 ..  7]  type (Cmd)
 *   [ 8 .. 15]  cookie
 *   [16 .. 23]  offset
 *   [24 .. 27]  length
 * Extended request, 32 bytes (EXTENDED_HEADERS negotiated):
 *   [ 0 ..  3]  EXTENDED_REQUEST_MAGIC (0x21e41c71)
 *   [ 4 .. 23]  as above
 *   [24 .. 31]  64-bit length (a payload length when PAYLOAD_LEN is set)
 */
export const REQUEST_BYTES = 28;
export const EXTENDED_REQUEST_BYTES = 32;

export interface RequestHeader {
  flags: number;
  type: number;
  cookie: bigint;
  /** Exact below 2^53; see `offsetBig`. */
  offset: number;
  length: number;
  /** The exact offset when it does not fit a safe integer (echoed in extended replies). */
  offsetBig?: bigint;
}

export function requestBytes(extended: boolean): number {
  return extended ? EXTENDED_REQUEST_BYTES : REQUEST_BYTES;
}

export function encodeRequest(req: RequestHeader, extended: boolean): Buffer {
  const buf = Buffer.allocUnsafe(requestBytes(extended));
  buf.writeUInt32BE(extended ? EXTENDED_REQUEST_MAGIC : REQUEST_MAGIC, 0);
  buf.writeUInt16BE(req.flags, 4);
  buf.writeUInt16BE(req.type, 6);
  buf.writeBigUInt64BE(req.cookie, 8);
  writeU64(buf, 16, req.offsetBig ?? req.offset);
  if (extended) writeU64(buf, 24, req.length);
  else buf.writeUInt32BE(req.length, 24);
  return buf;
}

export function decodeRequest(buf: Buffer, extended: boolean): Decoded<RequestHeader> {
  const magic = buf.readUInt32BE(0);
  const expect = extended ? EXTENDED_REQUEST_MAGIC : REQUEST_MAGIC;
  if (magic !== expect) return fail(`invalid magic (got ${hex(magic)}, expected ${hex(expect)})`);
  const offset = readU64Exact(buf, 16);
  const req: RequestHeader = {
    flags: buf.readUInt16BE(4),
    type: buf.readUInt16BE(6),
    cookie: buf.readBigUInt64BE(8),
    offset: offset.value,
    // A 64-bit length beyond 2^53 is approximated; every limit check rejects it anyway.
    length: extended ? readU64(buf, 24) : buf.readUInt32BE(24),
  };
  if (!offset.exact) req.offsetBig = offset.big;
  return ok(req);
}

/**
 * Bytes of payload that follow a request header on the wire: WRITE's data
 * (its length in both modes, as QEMU reads it), or with extended headers
 * any command flagged PAYLOAD_LEN; DISC never has one.
 */
export function requestPayloadBytes(req: RequestHeader, extended: boolean): number {
  if (req.type === Cmd.DISC) return 0;
  if (req.type === Cmd.WRITE) return req.length;
  return extended && req.flags & CmdFlag.PAYLOAD_LEN ? req.length : 0;
}

// ---------------------------------------------------------------- simple reply

/**
 * Simple reply, 16 bytes (followed by the data of a successful READ):
 *   [ 0 ..  3]  SIMPLE_REPLY_MAGIC (0x67446698)
 *   [ 4 ..  7]  error (NbdErr, 0 = success)
 *   [ 8 .. 15]  cookie
 */
export const SIMPLE_REPLY_BYTES = 16;

export function encodeSimpleReply(cookie: bigint, error: number): Buffer {
  const buf = Buffer.allocUnsafe(SIMPLE_REPLY_BYTES);
  buf.writeUInt32BE(SIMPLE_REPLY_MAGIC, 0);
  buf.writeUInt32BE(error >>> 0, 4);
  buf.writeBigUInt64BE(cookie, 8);
  return buf;
}

// ---------------------------------------------------------------- chunk headers

/**
 * Structured reply chunk header, 20 bytes (followed by `length` bytes):
 *   [ 0 ..  3]  STRUCTURED_REPLY_MAGIC (0x668e33ef)
 *   [ 4 ..  5]  flags (ReplyFlag.DONE on the last chunk)
 *   [ 6 ..  7]  type (ReplyType)
 *   [ 8 .. 15]  cookie
 *   [16 .. 19]  payload length
 * Extended reply header, 32 bytes (EXTENDED_HEADERS negotiated):
 *   [ 0 ..  3]  EXTENDED_REPLY_MAGIC (0x6e8a278c)
 *   [ 4 .. 15]  as above
 *   [16 .. 23]  offset of the request being answered
 *   [24 .. 31]  64-bit payload length
 */
export const CHUNK_HEADER_BYTES = 20;
export const EXTENDED_REPLY_HEADER_BYTES = 32;

export function chunkHeaderBytes(extended: boolean): number {
  return extended ? EXTENDED_REPLY_HEADER_BYTES : CHUNK_HEADER_BYTES;
}

/** What a chunk header says; `requestOffset` is present in extended replies. */
export interface ChunkHeader {
  flags: number;
  type: number;
  cookie: bigint;
  length: number;
  requestOffset?: number;
}

/** Where a reply goes: the header format and the request it answers. */
export interface ReplyTarget {
  extended: boolean;
  cookie: bigint;
  /** The request's offset (echoed by extended headers). */
  offset: number;
  offsetBig?: bigint;
}

/** Writes a chunk header at the start of `buf`; returns the header size. */
export function writeChunkHeader(buf: Buffer, to: ReplyTarget, flags: number, type: number, payloadBytes: number): number {
  if (to.extended) {
    buf.writeUInt32BE(EXTENDED_REPLY_MAGIC, 0);
    buf.writeUInt16BE(flags, 4);
    buf.writeUInt16BE(type, 6);
    buf.writeBigUInt64BE(to.cookie, 8);
    writeU64(buf, 16, to.offsetBig ?? to.offset);
    writeU64(buf, 24, payloadBytes);
    return EXTENDED_REPLY_HEADER_BYTES;
  }
  buf.writeUInt32BE(STRUCTURED_REPLY_MAGIC, 0);
  buf.writeUInt16BE(flags, 4);
  buf.writeUInt16BE(type, 6);
  buf.writeBigUInt64BE(to.cookie, 8);
  buf.writeUInt32BE(payloadBytes, 16);
  return CHUNK_HEADER_BYTES;
}

/** A header plus `fixedBytes` of payload to fill, for a payload of `payloadBytes` in all. */
function chunkBuffer(to: ReplyTarget, flags: number, type: number, fixedBytes: number, payloadBytes: number) {
  const buf = Buffer.allocUnsafe(chunkHeaderBytes(to.extended) + fixedBytes);
  const at = writeChunkHeader(buf, to, flags, type, payloadBytes);
  return { buf, at };
}

export function decodeChunkHeader(buf: Buffer, extended: boolean): Decoded<ChunkHeader> {
  const magic = buf.readUInt32BE(0);
  const expect = extended ? EXTENDED_REPLY_MAGIC : STRUCTURED_REPLY_MAGIC;
  if (magic !== expect) return fail(`invalid reply magic (got ${hex(magic)}, expected ${hex(expect)})`);
  const header: ChunkHeader = {
    flags: buf.readUInt16BE(4),
    type: buf.readUInt16BE(6),
    cookie: buf.readBigUInt64BE(8),
    length: extended ? readU64(buf, 24) : buf.readUInt32BE(16),
  };
  if (extended) header.requestOffset = readU64(buf, 16);
  return ok(header);
}

// ---------------------------------------------------------------- chunk payloads

/** NONE: no payload; only ever the final chunk. */
export function encodeNoneChunk(to: ReplyTarget, flags: number): Buffer {
  return chunkBuffer(to, flags, ReplyType.NONE, 0, 0).buf;
}

/**
 * OFFSET_DATA payload: [0 .. 7] offset, [8 .. ) data (at least 1 byte).
 * Returns the header and the offset; the caller writes `dataBytes` after it.
 */
export const OFFSET_DATA_PREFIX_BYTES = 8;

export function encodeOffsetDataHeader(to: ReplyTarget, flags: number, dataOffset: number, dataBytes: number): Buffer {
  const { buf, at } = chunkBuffer(to, flags, ReplyType.OFFSET_DATA, OFFSET_DATA_PREFIX_BYTES, OFFSET_DATA_PREFIX_BYTES + dataBytes);
  writeU64(buf, at, dataOffset);
  return buf;
}

/** OFFSET_HOLE payload, 12 bytes: [0 .. 7] offset, [8 .. 11] hole size. */
export const OFFSET_HOLE_BYTES = 12;

export function encodeOffsetHoleChunk(to: ReplyTarget, flags: number, holeOffset: number, holeBytes: number): Buffer {
  const { buf, at } = chunkBuffer(to, flags, ReplyType.OFFSET_HOLE, OFFSET_HOLE_BYTES, OFFSET_HOLE_BYTES);
  writeU64(buf, at, holeOffset);
  buf.writeUInt32BE(holeBytes, at + 8);
  return buf;
}

/**
 * ERROR payload: [0 .. 3] error, [4 .. 5] message length M, [6 .. 6+M) message.
 * ERROR_OFFSET adds [6+M .. 14+M) the offset the error applies to.
 */
export const ERROR_PREFIX_BYTES = 6;

export function encodeErrorChunk(to: ReplyTarget, flags: number, error: number, message: string, errorOffset?: number): Buffer {
  const msg = utf8(message).subarray(0, 0xffff);
  const type = errorOffset === undefined ? ReplyType.ERROR : ReplyType.ERROR_OFFSET;
  const payloadBytes = ERROR_PREFIX_BYTES + msg.length + (errorOffset === undefined ? 0 : 8);
  const { buf, at } = chunkBuffer(to, flags, type, payloadBytes, payloadBytes);
  buf.writeUInt32BE(error >>> 0, at);
  buf.writeUInt16BE(msg.length, at + 4);
  buf.set(msg, at + ERROR_PREFIX_BYTES);
  if (errorOffset !== undefined) writeU64(buf, at + ERROR_PREFIX_BYTES + msg.length, errorOffset);
  return buf;
}

/** One block-status extent: a length and the context's flags for it. */
export interface Extent {
  length: number;
  flags: number;
}

/**
 * BLOCK_STATUS payload: [0 .. 3] context id, then N × (32-bit length, 32-bit flags).
 * BLOCK_STATUS_EXT payload: [0 .. 3] context id, [4 .. 7] N, then N × (64-bit length, 64-bit flags).
 * `extended` picks the 64-bit form, the only one allowed with extended headers.
 */
export function encodeBlockStatusChunk(to: ReplyTarget, flags: number, contextId: number, extents: readonly Extent[]): Buffer {
  if (to.extended) {
    const payloadBytes = 8 + 16 * extents.length;
    const { buf, at } = chunkBuffer(to, flags, ReplyType.BLOCK_STATUS_EXT, payloadBytes, payloadBytes);
    buf.writeUInt32BE(contextId >>> 0, at);
    buf.writeUInt32BE(extents.length, at + 4);
    extents.forEach((e, i) => {
      writeU64(buf, at + 8 + 16 * i, e.length);
      writeU64(buf, at + 16 + 16 * i, e.flags >>> 0);
    });
    return buf;
  }
  const payloadBytes = 4 + 8 * extents.length;
  const { buf, at } = chunkBuffer(to, flags, ReplyType.BLOCK_STATUS, payloadBytes, payloadBytes);
  buf.writeUInt32BE(contextId >>> 0, at);
  extents.forEach((e, i) => {
    buf.writeUInt32BE(e.length, at + 4 + 8 * i);
    buf.writeUInt32BE(e.flags >>> 0, at + 8 + 8 * i);
  });
  return buf;
}

/** A decoded chunk payload. */
export type ChunkPayload =
  | { type: typeof ReplyType.NONE }
  | { type: typeof ReplyType.OFFSET_DATA; offset: number; data: Buffer }
  | { type: typeof ReplyType.OFFSET_HOLE; offset: number; length: number }
  | { type: typeof ReplyType.BLOCK_STATUS | typeof ReplyType.BLOCK_STATUS_EXT; contextId: number; extents: Extent[] }
  | { type: typeof ReplyType.ERROR | typeof ReplyType.ERROR_OFFSET; error: number; message: string; offset?: number }
  | { type: number; unknownError: true; error: number; message: string };

export function decodeChunkPayload(type: number, payload: Buffer): Decoded<ChunkPayload> {
  const wrongLength = () => fail<ChunkPayload>(`invalid length for a ${replyTypeName(type)} chunk: ${payload.length}`);
  switch (type) {
    case ReplyType.NONE:
      return payload.length === 0 ? ok({ type }) : wrongLength();
    case ReplyType.OFFSET_DATA:
      if (payload.length <= OFFSET_DATA_PREFIX_BYTES) return wrongLength();
      return ok({ type, offset: readU64(payload, 0), data: payload.subarray(OFFSET_DATA_PREFIX_BYTES) });
    case ReplyType.OFFSET_HOLE:
      if (payload.length !== OFFSET_HOLE_BYTES) return wrongLength();
      return ok({ type, offset: readU64(payload, 0), length: payload.readUInt32BE(8) });
    case ReplyType.BLOCK_STATUS:
      return decodeBlockStatus(payload);
    case ReplyType.BLOCK_STATUS_EXT:
      return decodeBlockStatusExt(payload);
    default:
      if (isErrorChunk(type)) return decodeErrorChunk(type, payload);
      return fail(`unknown structured reply chunk type ${type}`);
  }
}

function decodeBlockStatus(payload: Buffer): Decoded<ChunkPayload> {
  const count = (payload.length - 4) / 8;
  if (payload.length < 12 || !Number.isInteger(count)) return fail(`invalid length for a block status chunk: ${payload.length}`);
  const extents: Extent[] = [];
  for (let i = 0; i < count; i++) {
    extents.push({ length: payload.readUInt32BE(4 + 8 * i), flags: payload.readUInt32BE(8 + 8 * i) });
  }
  return ok({ type: ReplyType.BLOCK_STATUS, contextId: payload.readUInt32BE(0), extents });
}

function decodeBlockStatusExt(payload: Buffer): Decoded<ChunkPayload> {
  if (payload.length < 24 || (payload.length - 8) % 16 !== 0) {
    return fail(`invalid length for an extended block status chunk: ${payload.length}`);
  }
  const count = payload.readUInt32BE(4);
  if (count !== (payload.length - 8) / 16) return fail(`extended block status chunk count ${count} does not match its length`);
  if (count > MAX_BLOCK_STATUS_EXTENTS * 8) return fail(`extended block status chunk has too many extents: ${count}`);
  const extents: Extent[] = [];
  for (let i = 0; i < count; i++) {
    const flags = readU64(payload, 16 + 16 * i);
    if (flags > 0xffffffff) return fail('extended block status flags do not fit 32 bits');
    extents.push({ length: readU64(payload, 8 + 16 * i), flags });
  }
  return ok({ type: ReplyType.BLOCK_STATUS_EXT, contextId: payload.readUInt32BE(0), extents });
}

function decodeErrorChunk(type: number, payload: Buffer): Decoded<ChunkPayload> {
  if (payload.length < ERROR_PREFIX_BYTES) return fail(`invalid length for an error chunk: ${payload.length}`);
  const error = payload.readUInt32BE(0);
  const msgBytes = payload.readUInt16BE(4);
  if (ERROR_PREFIX_BYTES + msgBytes > payload.length) return fail('error chunk message length exceeds the chunk');
  const message = payload.subarray(ERROR_PREFIX_BYTES, ERROR_PREFIX_BYTES + msgBytes).toString('utf8');
  const rest = payload.length - ERROR_PREFIX_BYTES - msgBytes;
  if (type === ReplyType.ERROR) {
    return rest === 0 ? ok({ type, error, message }) : fail('error chunk has trailing bytes');
  }
  if (type === ReplyType.ERROR_OFFSET) {
    if (rest !== 8) return fail('error-offset chunk has the wrong length');
    return ok({ type, error, message, offset: readU64(payload, ERROR_PREFIX_BYTES + msgBytes) });
  }
  // An unknown error type still fails the request with its error (spec).
  return ok({ type, unknownError: true, error, message });
}

// ---------------------------------------------------------------- block status payload

/**
 * Extended BLOCK_STATUS payload (PAYLOAD_LEN flag, BLOCK_STATUS_PAYLOAD negotiated):
 *   [0 .. 7]   effect length (the range to describe)
 *   [8 .. )    N × 32-bit context ids to report, a subset of the negotiated ones
 */
export const BLOCK_STATUS_PAYLOAD_PREFIX_BYTES = 8;

export interface BlockStatusPayload {
  effectLength: number;
  contextIds: number[];
}

export function encodeBlockStatusPayload(p: BlockStatusPayload): Buffer {
  const buf = Buffer.allocUnsafe(BLOCK_STATUS_PAYLOAD_PREFIX_BYTES + 4 * p.contextIds.length);
  writeU64(buf, 0, p.effectLength);
  p.contextIds.forEach((id, i) => buf.writeUInt32BE(id >>> 0, BLOCK_STATUS_PAYLOAD_PREFIX_BYTES + 4 * i));
  return buf;
}

export function decodeBlockStatusPayload(payload: Buffer): Decoded<BlockStatusPayload> {
  if (payload.length < BLOCK_STATUS_PAYLOAD_PREFIX_BYTES || payload.length % 4 !== 0) {
    return fail(`invalid block status payload length ${payload.length}`);
  }
  const contextIds: number[] = [];
  for (let at = BLOCK_STATUS_PAYLOAD_PREFIX_BYTES; at < payload.length; at += 4) contextIds.push(payload.readUInt32BE(at));
  return ok({ effectLength: readU64(payload, 0), contextIds });
}
