/*
 * Wire structs of the NBD handshake (fixed newstyle): greeting, client
 * flags, option requests and replies, the EXPORT_NAME reply, and the
 * payloads of INFO/GO, LIST/SET_META_CONTEXT, NBD_REP_SERVER, NBD_REP_INFO
 * and NBD_REP_META_CONTEXT. Every struct has a byte map, a size constant and
 * an encoder and a decoder, so the server and the client share one codec.
 *
 * All integers are big-endian. Strings are UTF-8 without NUL, at most
 * MAX_STRING_BYTES. Decoders return a reason instead of throwing; option
 * payload decoders phrase it as QEMU's server does ("Inconsistent lengths
 * in option go", "Invalid name length: 5000", …) because the server sends
 * that text back in an NBD_REP_ERR_INVALID reply.
 */
import {
  IHAVEOPT,
  Info,
  MAX_STRING_BYTES,
  NBDMAGIC,
  OLDSTYLE_MAGIC,
  REP_MAGIC,
  Rep,
  EXPORT_NAME_REPLY_PAD_BYTES,
  optName,
} from './protocol.js';
import { fail, hasNul, ok, readU64, utf8, writeU64, type Decoded } from './wire-util.js';

// ---------------------------------------------------------------- greeting

/**
 * Server greeting, 18 bytes:
 *   [ 0 ..  7]  NBDMAGIC
 *   [ 8 .. 15]  IHAVEOPT
 *   [16 .. 17]  handshake flags
 */
export const GREETING_BYTES = 18;

export function encodeGreeting(handshakeFlags: number): Buffer {
  const buf = Buffer.alloc(GREETING_BYTES);
  buf.writeBigUInt64BE(NBDMAGIC, 0);
  buf.writeBigUInt64BE(IHAVEOPT, 8);
  buf.writeUInt16BE(handshakeFlags, 16);
  return buf;
}

export function decodeGreeting(buf: Buffer): Decoded<{ handshakeFlags: number }> {
  if (buf.length < GREETING_BYTES) return fail('greeting too short');
  if (buf.readBigUInt64BE(0) !== NBDMAGIC) return fail('Bad initial magic received');
  const magic = buf.readBigUInt64BE(8);
  if (magic === OLDSTYLE_MAGIC) return fail('server uses the oldstyle handshake, which is not supported');
  if (magic !== IHAVEOPT) return fail('Bad server magic received');
  return ok({ handshakeFlags: buf.readUInt16BE(16) });
}

/**
 * Client flags, 4 bytes:
 *   [0 .. 3]  client flags (ClientFlag)
 */
export const CLIENT_FLAGS_BYTES = 4;

export function encodeClientFlags(flags: number): Buffer {
  const buf = Buffer.alloc(CLIENT_FLAGS_BYTES);
  buf.writeUInt32BE(flags >>> 0, 0);
  return buf;
}

export function decodeClientFlags(buf: Buffer): number {
  return buf.readUInt32BE(0);
}

// ---------------------------------------------------------------- option request

/**
 * Option request header, 16 bytes, followed by `length` bytes of data:
 *   [ 0 ..  7]  IHAVEOPT
 *   [ 8 .. 11]  option
 *   [12 .. 15]  length of the data
 */
export const OPTION_HEADER_BYTES = 16;

export interface OptionHeader {
  option: number;
  length: number;
}

export function encodeOption(option: number, data: Uint8Array = Buffer.alloc(0)): Buffer {
  const buf = Buffer.alloc(OPTION_HEADER_BYTES + data.length);
  buf.writeBigUInt64BE(IHAVEOPT, 0);
  buf.writeUInt32BE(option >>> 0, 8);
  buf.writeUInt32BE(data.length, 12);
  buf.set(data, OPTION_HEADER_BYTES);
  return buf;
}

export function decodeOptionHeader(buf: Buffer): Decoded<OptionHeader> {
  if (buf.readBigUInt64BE(0) !== IHAVEOPT) return fail('Bad magic received');
  return ok({ option: buf.readUInt32BE(8), length: buf.readUInt32BE(12) });
}

// ---------------------------------------------------------------- option reply

/**
 * Option reply header, 20 bytes, followed by `length` bytes of data:
 *   [ 0 ..  7]  REP_MAGIC (0x3e889045565a9)
 *   [ 8 .. 11]  option being answered
 *   [12 .. 15]  reply type (Rep)
 *   [16 .. 19]  length of the data
 */
export const OPTION_REPLY_HEADER_BYTES = 20;

export interface OptionReplyHeader {
  option: number;
  type: number;
  length: number;
}

export function encodeOptionReply(option: number, type: number, data: Uint8Array = Buffer.alloc(0)): Buffer {
  const buf = Buffer.alloc(OPTION_REPLY_HEADER_BYTES + data.length);
  buf.writeBigUInt64BE(REP_MAGIC, 0);
  buf.writeUInt32BE(option >>> 0, 8);
  buf.writeUInt32BE(type >>> 0, 12);
  buf.writeUInt32BE(data.length, 16);
  buf.set(data, OPTION_REPLY_HEADER_BYTES);
  return buf;
}

export function decodeOptionReplyHeader(buf: Buffer): Decoded<OptionReplyHeader> {
  if (buf.readBigUInt64BE(0) !== REP_MAGIC) return fail('Unexpected option reply magic');
  return ok({ option: buf.readUInt32BE(8), type: buf.readUInt32BE(12), length: buf.readUInt32BE(16) });
}

/** An error reply: the data is a human-readable message (may be empty). */
export function encodeOptionError(option: number, type: number, message: string): Buffer {
  return encodeOptionReply(option, type, utf8(message));
}

// ---------------------------------------------------------------- EXPORT_NAME reply

/**
 * Reply to NBD_OPT_EXPORT_NAME, 10 bytes (+124 zero bytes unless NO_ZEROES):
 *   [0 .. 7]  export size
 *   [8 .. 9]  transmission flags
 */
export const EXPORT_NAME_REPLY_BYTES = 10;

export function encodeExportNameReply(sizeBytes: number, transmissionFlags: number, noZeroes: boolean): Buffer {
  const buf = Buffer.alloc(EXPORT_NAME_REPLY_BYTES + (noZeroes ? 0 : EXPORT_NAME_REPLY_PAD_BYTES));
  writeU64(buf, 0, sizeBytes);
  buf.writeUInt16BE(transmissionFlags, 8);
  return buf;
}

export function decodeExportNameReply(buf: Buffer): { sizeBytes: number; transmissionFlags: number } {
  return { sizeBytes: readU64(buf, 0), transmissionFlags: buf.readUInt16BE(8) };
}

// ---------------------------------------------------------------- a cursor over option data

/**
 * Reads the fields of one option's data, reporting QEMU's messages for
 * short data, long names and embedded NULs.
 */
class OptionReader {
  private at = 0;
  constructor(
    private readonly data: Buffer,
    private readonly option: number,
  ) {}

  get remaining(): number {
    return this.data.length - this.at;
  }

  private inconsistent(): string {
    return `Inconsistent lengths in option ${optName(this.option)}`;
  }

  u16(): Decoded<number> {
    if (this.remaining < 2) return fail(this.inconsistent());
    const v = this.data.readUInt16BE(this.at);
    this.at += 2;
    return ok(v);
  }

  u32(): Decoded<number> {
    if (this.remaining < 4) return fail(this.inconsistent());
    const v = this.data.readUInt32BE(this.at);
    this.at += 4;
    return ok(v);
  }

  /** `bytes` bytes of a string that must not contain NUL. */
  text(bytes: number): Decoded<string> {
    if (this.remaining < bytes) return fail(this.inconsistent());
    const raw = this.data.subarray(this.at, this.at + bytes);
    this.at += bytes;
    if (hasNul(raw)) return fail(`Unexpected embedded NUL in option ${optName(this.option)}`);
    return ok(raw.toString('utf8'));
  }

  skip(bytes: number): Decoded<null> {
    if (this.remaining < bytes) return fail(this.inconsistent());
    this.at += bytes;
    return ok(null);
  }

  /** A 32-bit length and that many bytes of name (at most MAX_STRING_BYTES). */
  name(): Decoded<string> {
    const len = this.u32();
    if (!len.ok) return len;
    if (len.value > MAX_STRING_BYTES) return fail(`Invalid name length: ${len.value}`);
    return this.text(len.value);
  }

  trailing(): string | null {
    return this.remaining === 0 ? null : `option '${optName(this.option)}' has unexpected length`;
  }
}

function encodeName(name: string): Buffer {
  const bytes = utf8(name);
  const buf = Buffer.alloc(4 + bytes.length);
  buf.writeUInt32BE(bytes.length, 0);
  buf.set(bytes, 4);
  return buf;
}

// ---------------------------------------------------------------- INFO / GO

/**
 * Data of NBD_OPT_INFO and NBD_OPT_GO:
 *   [0 .. 3]          name length L
 *   [4 .. 4+L)        export name
 *   [4+L .. 6+L)      number N of information requests
 *   [6+L .. 6+L+2N)   N × 16-bit NBD_INFO_* types
 */
export interface InfoRequest {
  name: string;
  infos: number[];
}

export function encodeInfoRequest(req: InfoRequest): Buffer {
  const name = encodeName(req.name);
  const tail = Buffer.alloc(2 + 2 * req.infos.length);
  tail.writeUInt16BE(req.infos.length, 0);
  req.infos.forEach((info, i) => tail.writeUInt16BE(info, 2 + 2 * i));
  return Buffer.concat([name, tail]);
}

export function decodeInfoRequest(data: Buffer, option: number): Decoded<InfoRequest> {
  const r = new OptionReader(data, option);
  const name = r.name();
  if (!name.ok) return name;
  const count = r.u16();
  if (!count.ok) return count;
  const infos: number[] = [];
  for (let i = 0; i < count.value; i++) {
    const info = r.u16();
    if (!info.ok) return info;
    infos.push(info.value);
  }
  const trailing = r.trailing();
  return trailing ? fail(trailing) : ok({ name: name.value, infos });
}

// ---------------------------------------------------------------- LIST / SET_META_CONTEXT

/**
 * Data of NBD_OPT_LIST_META_CONTEXT and NBD_OPT_SET_META_CONTEXT:
 *   [0 .. 3]       export name length L
 *   [4 .. 4+L)     export name
 *   [4+L .. 8+L)   number of queries N
 *   then N times:  32-bit query length Q, Q bytes of query
 * A query longer than MAX_STRING_BYTES is skipped, as QEMU does.
 */
export interface MetaContextRequest {
  exportName: string;
  queries: string[];
}

export function encodeMetaContextRequest(req: MetaContextRequest): Buffer {
  const count = Buffer.alloc(4);
  count.writeUInt32BE(req.queries.length, 0);
  return Buffer.concat([encodeName(req.exportName), count, ...req.queries.map(encodeName)]);
}

export function decodeMetaContextRequest(data: Buffer, option: number): Decoded<MetaContextRequest> {
  const r = new OptionReader(data, option);
  const exportName = r.name();
  if (!exportName.ok) return exportName;
  const count = r.u32();
  if (!count.ok) return count;
  const queries: string[] = [];
  for (let i = 0; i < count.value; i++) {
    const len = r.u32();
    if (!len.ok) return len;
    if (len.value > MAX_STRING_BYTES) {
      const skipped = r.skip(len.value);
      if (!skipped.ok) return skipped;
      continue;
    }
    const query = r.text(len.value);
    if (!query.ok) return query;
    queries.push(query.value);
  }
  const trailing = r.trailing();
  return trailing ? fail(trailing) : ok({ exportName: exportName.value, queries });
}

// ---------------------------------------------------------------- NBD_REP_SERVER

/**
 * Data of an NBD_REP_SERVER reply (one per export, answering NBD_OPT_LIST):
 *   [0 .. 3]     name length L
 *   [4 .. 4+L)   export name
 *   [4+L .. )    description (rest of the data, may be empty)
 */
export interface ServerEntry {
  name: string;
  description: string;
}

export function encodeRepServer(entry: ServerEntry): Buffer {
  return Buffer.concat([encodeName(entry.name), utf8(entry.description)]);
}

export function decodeRepServer(data: Buffer): Decoded<ServerEntry> {
  if (data.length < 4) return fail('NBD_REP_SERVER reply too short');
  const len = data.readUInt32BE(0);
  if (len > data.length - 4) return fail('NBD_REP_SERVER name length exceeds the reply');
  return ok({
    name: data.subarray(4, 4 + len).toString('utf8'),
    description: data.subarray(4 + len).toString('utf8'),
  });
}

// ---------------------------------------------------------------- NBD_REP_INFO

/**
 * Data of an NBD_REP_INFO reply:
 *   [0 .. 1]  information type (Info)
 *   then by type:
 *   EXPORT (12 bytes in all):      [2 .. 9] export size, [10 .. 11] transmission flags
 *   NAME:                          [2 .. ) canonical export name
 *   DESCRIPTION:                   [2 .. ) description
 *   BLOCK_SIZE (14 bytes in all):  [2 .. 5] minimum, [6 .. 9] preferred, [10 .. 13] maximum payload
 */
export const INFO_EXPORT_BYTES = 12;
export const INFO_BLOCK_SIZE_BYTES = 14;

export interface BlockSizes {
  minimum: number;
  preferred: number;
  maximum: number;
}

export type InfoReply =
  | { type: typeof Info.EXPORT; sizeBytes: number; transmissionFlags: number }
  | { type: typeof Info.NAME; name: string }
  | { type: typeof Info.DESCRIPTION; description: string }
  | ({ type: typeof Info.BLOCK_SIZE } & BlockSizes)
  | { type: number; unknown: Buffer };

export function encodeInfoExport(sizeBytes: number, transmissionFlags: number): Buffer {
  const buf = Buffer.alloc(INFO_EXPORT_BYTES);
  buf.writeUInt16BE(Info.EXPORT, 0);
  writeU64(buf, 2, sizeBytes);
  buf.writeUInt16BE(transmissionFlags, 10);
  return buf;
}

function encodeInfoText(type: number, text: string): Buffer {
  const bytes = utf8(text);
  const buf = Buffer.alloc(2 + bytes.length);
  buf.writeUInt16BE(type, 0);
  buf.set(bytes, 2);
  return buf;
}

export const encodeInfoName = (name: string): Buffer => encodeInfoText(Info.NAME, name);
export const encodeInfoDescription = (description: string): Buffer => encodeInfoText(Info.DESCRIPTION, description);

export function encodeInfoBlockSize(sizes: BlockSizes): Buffer {
  const buf = Buffer.alloc(INFO_BLOCK_SIZE_BYTES);
  buf.writeUInt16BE(Info.BLOCK_SIZE, 0);
  buf.writeUInt32BE(sizes.minimum, 2);
  buf.writeUInt32BE(sizes.preferred, 6);
  buf.writeUInt32BE(sizes.maximum, 10);
  return buf;
}

export function decodeRepInfo(data: Buffer): Decoded<InfoReply> {
  if (data.length < 2) return fail('NBD_REP_INFO reply too short');
  const type = data.readUInt16BE(0);
  switch (type) {
    case Info.EXPORT:
      if (data.length !== INFO_EXPORT_BYTES) return fail('NBD_INFO_EXPORT has the wrong length');
      return ok({ type, sizeBytes: readU64(data, 2), transmissionFlags: data.readUInt16BE(10) });
    case Info.NAME:
      return ok({ type, name: data.subarray(2).toString('utf8') });
    case Info.DESCRIPTION:
      return ok({ type, description: data.subarray(2).toString('utf8') });
    case Info.BLOCK_SIZE:
      if (data.length !== INFO_BLOCK_SIZE_BYTES) return fail('NBD_INFO_BLOCK_SIZE has the wrong length');
      return ok({ type, minimum: data.readUInt32BE(2), preferred: data.readUInt32BE(6), maximum: data.readUInt32BE(10) });
    default:
      return ok({ type, unknown: data.subarray(2) });
  }
}

// ---------------------------------------------------------------- NBD_REP_META_CONTEXT

/**
 * Data of an NBD_REP_META_CONTEXT reply:
 *   [0 .. 3]  context id (0 in replies to LIST_META_CONTEXT)
 *   [4 .. )   context name
 */
export interface MetaContextReply {
  id: number;
  name: string;
}

export function encodeRepMetaContext(ctx: MetaContextReply): Buffer {
  const name = utf8(ctx.name);
  const buf = Buffer.alloc(4 + name.length);
  buf.writeUInt32BE(ctx.id >>> 0, 0);
  buf.set(name, 4);
  return buf;
}

export function decodeRepMetaContext(data: Buffer): Decoded<MetaContextReply> {
  if (data.length < 4) return fail('NBD_REP_META_CONTEXT reply too short');
  return ok({ id: data.readUInt32BE(0), name: data.subarray(4).toString('utf8') });
}

/** Reply types whose data is a message (error replies) rather than a struct. */
export function replyCarriesMessage(type: number): boolean {
  return type !== Rep.ACK && type !== Rep.SERVER && type !== Rep.INFO && type !== Rep.META_CONTEXT;
}
