/*
 * The client side of the NBD handshake (fixed newstyle), in QEMU's order
 * (nbd/client.c nbd_receive_negotiate):
 *
 *   greeting → client flags (FIXED_NEWSTYLE, NO_ZEROES as offered)
 *   → STARTTLS when TLS is wanted (then the rest runs encrypted)
 *   → EXTENDED_HEADERS, else STRUCTURED_REPLY (any error = not supported)
 *   → SET_META_CONTEXT for the wanted contexts (any error = none)
 *   → GO with an NBD_INFO_BLOCK_SIZE request
 *   → if GO is unsupported: LIST (for a clear "No export with name" message),
 *     then EXPORT_NAME (also what a server without fixed newstyle gets).
 *
 * An oldstyle server (size and flags in its greeting, no options) is
 * accepted for the default export only, as QEMU does.
 *
 * Option errors read as QEMU's (nbd_handle_reply_err), with its hint lines
 * ("Requested export not available\nserver reported: export 'x' not
 * present"). A failed handshake sends NBD_OPT_ABORT as a courtesy and
 * closes the connection. Every wait is a read of the next frame, which
 * fails when the connection ends (client-frames.ts), so a handshake never
 * outlives its socket.
 */
import type { Duplex } from 'node:stream';
import { BlockError } from '../block/errors.js';
import { isPowerOfTwo } from '../block/flags.js';
import { FrameStream } from './client-frames.js';
import { ClientFlag, HandshakeFlag, Info, MAX_BUFFER_BYTES, MAX_STRING_BYTES, Opt, Rep, isErrorReply, optName, repName } from './protocol.js';
import type { ServerFrame } from './stream.js';
import {
  INFO_BLOCK_SIZE_BYTES,
  INFO_EXPORT_BYTES,
  decodeRepInfo,
  decodeRepMetaContext,
  encodeClientFlags,
  encodeInfoRequest,
  encodeMetaContextRequest,
  encodeOption,
} from './wire-handshake.js';
import { utf8 } from './wire-util.js';

/** How requests and replies are framed once negotiated. */
export type TransmissionMode = 'oldstyle' | 'export-name' | 'simple' | 'structured' | 'extended';

/** What the server told us about the export (QEMU's NBDExportInfo). */
export interface NbdExportInfo {
  name: string;
  sizeBytes: number;
  /** Transmission flags (TxFlag). */
  flags: number;
  /** NBD_INFO_BLOCK_SIZE; 0 when the server sent none. */
  minBlock: number;
  optBlock: number;
  maxBlock: number;
  mode: TransmissionMode;
  /** Selected metadata contexts: name → id. */
  contexts: Map<string, number>;
  description?: string;
}

/** Upgrades the plain socket to TLS after the server acknowledged STARTTLS. */
export interface ClientTlsUpgrade {
  upgrade(socket: Duplex): Promise<Duplex>;
}

export interface HandshakeOptions {
  /** "" is the default export. */
  exportName: string;
  /** Try NBD_OPT_EXTENDED_HEADERS first (default on). */
  extendedHeaders?: boolean;
  /** Negotiate structured replies (default on). */
  structuredReplies?: boolean;
  /** Contexts to select (default `base:allocation`); ignored without structured replies. */
  metaContexts?: readonly string[];
  /** Ask for NBD_INFO_BLOCK_SIZE and obey it (default on). */
  requestBlockSizes?: boolean;
  /** Require TLS (STARTTLS first). */
  tls?: ClientTlsUpgrade;
}

/** The error a handshake fails with (EINVAL, as QEMU's negotiation returns). */
export function handshakeError(message: string): BlockError {
  return new BlockError('EINVAL', message);
}

/** One option request/reply exchange at a time over a FrameStream. */
export class OptionChannel {
  constructor(public frames: FrameStream) {}

  send(option: number, data?: Uint8Array): void {
    this.frames.send([encodeOption(option, data)]);
  }

  /** NBD_OPT_ABORT as a courtesy before hanging up (no reply awaited, as QEMU). */
  abort(): void {
    this.send(Opt.ABORT);
  }

  /** The next reply to `option`. */
  async reply(option: number): Promise<{ type: number; data: Buffer }> {
    const frame: ServerFrame = await this.frames.next('option reply');
    if (frame.kind !== 'optionReply') throw handshakeError('Unexpected option reply magic');
    if (frame.option !== option) {
      throw handshakeError(
        `Unexpected option type ${frame.option} (${optName(frame.option)}), expected ${option} (${optName(option)})`,
      );
    }
    return { type: frame.type, data: frame.data };
  }

  /**
   * A reply that is an error, as QEMU reports it, or null. With `strict`
   * off every error means "unsupported"; with it on only ERR_UNSUP does
   * (`unsupported: true`), the rest fail the handshake.
   */
  replyError(option: number, type: number, data: Buffer, strict: boolean): { unsupported: true } | BlockError | null {
    if (!isErrorReply(type)) return null;
    if (type === Rep.ERR_UNSUP || !strict) return { unsupported: true };
    const opt = `option ${option} (${optName(option)})`;
    const texts: Record<number, string> = {
      [Rep.ERR_POLICY]: `Denied by server for ${opt}`,
      [Rep.ERR_INVALID]: `Invalid parameters for ${opt}`,
      [Rep.ERR_PLATFORM]: `Server lacks support for ${opt}`,
      [Rep.ERR_TLS_REQD]: `TLS negotiation required before ${opt}\nDid you forget a valid tls-creds?`,
      [Rep.ERR_UNKNOWN]: 'Requested export not available',
      [Rep.ERR_SHUTDOWN]: `Server shutting down before ${opt}`,
      [Rep.ERR_BLOCK_SIZE_REQD]: `Server requires INFO_BLOCK_SIZE for ${opt}`,
    };
    const text = texts[type] ?? `Unknown error code when asking for ${opt}`;
    const hint = data.length > 0 ? `\nserver reported: ${data.toString('utf8')}` : '';
    return handshakeError(text + hint);
  }

  /** An option without data answered by a bare ACK: true, false when unsupported (nbd_request_simple_option). */
  async simple(option: number, strict: boolean): Promise<boolean> {
    this.send(option);
    const { type, data } = await this.reply(option);
    const err = this.replyError(option, type, data, strict);
    if (err instanceof BlockError) throw err;
    if (err) return false;
    if (type !== Rep.ACK) {
      throw handshakeError(`Server answered option ${option} (${optName(option)}) with unexpected reply ${type} (${repName(type)})`);
    }
    if (data.length !== 0) {
      throw handshakeError(`Option ${option} ('${optName(option)}') response length is ${data.length} (it should be zero)`);
    }
    return true;
  }

  /**
   * The replies to `option` up to its ACK: each one of `itemType` goes to
   * `onItem`. False when the server does not support the option (any error
   * unless `strict`). `texts` are QEMU's words for this option's ACK with a
   * payload and for a reply of another type.
   */
  async collect(
    option: number,
    itemType: number,
    strict: boolean,
    onItem: (data: Buffer) => void,
    texts: { ackWithData: string; unexpected: 'Unexpected' | 'unexpected' },
  ): Promise<boolean> {
    for (;;) {
      const { type, data } = await this.reply(option);
      const err = this.replyError(option, type, data, strict);
      if (err instanceof BlockError) throw err;
      if (err) return false;
      if (type === Rep.ACK) {
        if (data.length !== 0) throw handshakeError(texts.ackWithData);
        return true;
      }
      if (type !== itemType) {
        throw handshakeError(`${texts.unexpected} reply type ${type} (${repName(type)}), expected ${itemType} (${repName(itemType)})`);
      }
      onItem(data);
    }
  }
}

/** QEMU's texts for the meta context options' replies. */
export const META_CONTEXT_TEXTS = { ackWithData: 'Unexpected length to ACK response', unexpected: 'Unexpected' } as const;

// ---------------------------------------------------------------- start

/** Where the handshake stands after the greeting and the reply-format options. */
export interface Started {
  channel: OptionChannel;
  /** False: the server is not fixed newstyle; only EXPORT_NAME may follow. */
  fixedNewstyle: boolean;
  noZeroes: boolean;
  mode: TransmissionMode;
  /** An oldstyle server's export (it sends no greeting flags and takes no options). */
  oldstyle?: { sizeBytes: number; transmissionFlags: number };
}

async function startTls(channel: OptionChannel, socket: Duplex, tls: ClientTlsUpgrade): Promise<void> {
  if (!(await channel.simple(Opt.STARTTLS, true))) {
    channel.abort();
    throw handshakeError("Server don't support STARTTLS option");
  }
  channel.frames.detach();
  const secure = await tls.upgrade(socket);
  channel.frames = new FrameStream(secure, true);
}

/** nbd_start_negotiate: greeting, flags, STARTTLS, and the richest reply format both sides know. */
export async function startNegotiate(socket: Duplex, opts: Omit<HandshakeOptions, 'exportName'>): Promise<Started> {
  const channel = new OptionChannel(new FrameStream(socket));
  const greeting = await channel.frames.next('initial magic');
  if (greeting.kind === 'exportNameReply') {
    if (opts.tls) throw handshakeError('Server does not support STARTTLS');
    return { channel, fixedNewstyle: false, noZeroes: true, mode: 'oldstyle', oldstyle: greeting };
  }
  if (greeting.kind !== 'greeting') throw handshakeError('Bad initial magic received');
  const fixedNewstyle = (greeting.handshakeFlags & HandshakeFlag.FIXED_NEWSTYLE) !== 0;
  const noZeroes = (greeting.handshakeFlags & HandshakeFlag.NO_ZEROES) !== 0;
  const flags = (fixedNewstyle ? ClientFlag.FIXED_NEWSTYLE : 0) | (noZeroes ? ClientFlag.NO_ZEROES : 0);
  channel.frames.send([encodeClientFlags(flags)]);
  if (opts.tls) {
    if (!fixedNewstyle) throw handshakeError('Server does not support STARTTLS');
    await startTls(channel, socket, opts.tls);
  }
  if (!fixedNewstyle) return { channel, fixedNewstyle, noZeroes, mode: 'export-name' };
  if ((opts.extendedHeaders ?? true) && (await channel.simple(Opt.EXTENDED_HEADERS, false))) {
    return { channel, fixedNewstyle, noZeroes, mode: 'extended' };
  }
  if ((opts.structuredReplies ?? true) && (await channel.simple(Opt.STRUCTURED_REPLY, false))) {
    return { channel, fixedNewstyle, noZeroes, mode: 'structured' };
  }
  return { channel, fixedNewstyle, noZeroes, mode: 'simple' };
}

// ---------------------------------------------------------------- meta contexts

/** A META_CONTEXT reply's context, checked as QEMU does. */
export function decodeContextReply(data: Buffer): { id: number; name: string } {
  const ctx = decodeRepMetaContext(data);
  if (!ctx.ok || data.length <= 4 || data.length > MAX_BUFFER_BYTES) {
    throw handshakeError(`Failed to negotiate meta context, server answered with unexpected length ${data.length}`);
  }
  return ctx.value;
}

/** SET_META_CONTEXT: the contexts the server selected (empty when it has none of them or cannot). */
async function setMetaContexts(channel: OptionChannel, exportName: string, queries: readonly string[]): Promise<Map<string, number>> {
  const selected = new Map<string, number>();
  channel.send(Opt.SET_META_CONTEXT, encodeMetaContextRequest({ exportName, queries: [...queries] }));
  const supported = await channel.collect(Opt.SET_META_CONTEXT, Rep.META_CONTEXT, false, (data) => {
    const ctx = decodeContextReply(data);
    checkContext(queries, selected, ctx.name);
    selected.set(ctx.name, ctx.id);
  }, META_CONTEXT_TEXTS);
  return supported ? selected : new Map();
}

function checkContext(queries: readonly string[], selected: Map<string, number>, name: string): void {
  if (!queries.includes(name)) {
    const asked = queries.length === 1 ? `'${queries[0]}'` : 'the requested contexts';
    throw handshakeError(`Failed to negotiate meta context ${asked}, server answered with different context '${name}'`);
  }
  if (selected.has(name)) throw handshakeError('Server answered with more than one context');
}

// ---------------------------------------------------------------- GO / INFO

/** Applies one NBD_REP_INFO to `info`, checking it as QEMU does. */
function applyInfo(info: NbdExportInfo, data: Buffer, sawExport: { yes: boolean }): void {
  if (data.length < 2) throw handshakeError(`NBD_REP_INFO length ${data.length} is too short`);
  const type = data.readUInt16BE(0);
  const unexpectedSize = () => handshakeError(`remaining export info len ${data.length - 2} is unexpected size`);
  if (type === Info.EXPORT && data.length !== INFO_EXPORT_BYTES) throw unexpectedSize();
  if (type === Info.BLOCK_SIZE && data.length !== INFO_BLOCK_SIZE_BYTES) throw unexpectedSize();
  const r = decodeRepInfo(data);
  if (!r.ok) throw handshakeError(r.reason);
  const v = r.value;
  if ('sizeBytes' in v) {
    info.sizeBytes = v.sizeBytes;
    info.flags = v.transmissionFlags;
    sawExport.yes = true;
    if (info.minBlock && info.sizeBytes % info.minBlock !== 0) {
      throw handshakeError(`export size ${info.sizeBytes} is not multiple of minimum block size ${info.minBlock}`);
    }
  } else if ('minimum' in v) {
    applyBlockSizes(info, v.minimum, v.preferred, v.maximum);
  } else if ('description' in v) {
    info.description = v.description;
  }
}

function applyBlockSizes(info: NbdExportInfo, minimum: number, preferred: number, maximum: number): void {
  if (!isPowerOfTwo(minimum)) throw handshakeError(`server minimum block size ${minimum} is not a power of two`);
  if (!isPowerOfTwo(preferred) || preferred < minimum) throw handshakeError(`server preferred block size ${preferred} is not valid`);
  if (maximum < minimum) throw handshakeError(`server maximum block size ${maximum} is not valid`);
  info.minBlock = minimum;
  info.optBlock = preferred;
  info.maxBlock = maximum;
}

/**
 * NBD_OPT_GO or NBD_OPT_INFO (nbd_opt_info_or_go): fills `info`; returns
 * false when the server does not know the option (fall back).
 */
export async function infoOrGo(channel: OptionChannel, option: number, info: NbdExportInfo, requestBlockSizes: boolean): Promise<boolean> {
  channel.send(option, encodeInfoRequest({ name: info.name, infos: requestBlockSizes ? [Info.BLOCK_SIZE] : [] }));
  const sawExport = { yes: false };
  const texts = { ackWithData: 'server sent invalid NBD_REP_ACK', unexpected: 'unexpected' } as const;
  if (!(await channel.collect(option, Rep.INFO, true, (data) => applyInfo(info, data, sawExport), texts))) return false;
  if (!sawExport.yes || info.flags === 0) throw handshakeError('broken server omitted NBD_INFO_EXPORT');
  return true;
}

// ---------------------------------------------------------------- LIST and EXPORT_NAME

/** One NBD_OPT_LIST entry. */
export interface ListedExport {
  name: string;
  description: string;
}

/** NBD_OPT_LIST: the exports, or null when the server does not support listing. */
export async function listExportNames(channel: OptionChannel): Promise<ListedExport[] | null> {
  channel.send(Opt.LIST);
  const out: ListedExport[] = [];
  const texts = { ackWithData: 'length too long for option end', unexpected: 'Unexpected' } as const;
  return (await channel.collect(Opt.LIST, Rep.SERVER, true, (data) => out.push(decodeListEntry(data)), texts)) ? out : null;
}

function decodeListEntry(data: Buffer): ListedExport {
  if (data.length < 4) throw handshakeError(`incorrect option length ${data.length}`);
  const nameBytes = data.readUInt32BE(0);
  if (data.length - 4 < nameBytes || nameBytes > MAX_STRING_BYTES) {
    throw handshakeError("incorrect name length in server's list response");
  }
  if (data.length - 4 - nameBytes > MAX_STRING_BYTES) {
    throw handshakeError("incorrect description length in server's list response");
  }
  return {
    name: data.subarray(4, 4 + nameBytes).toString('utf8'),
    description: data.subarray(4 + nameBytes).toString('utf8'),
  };
}

/** nbd_receive_query_exports: fails with QEMU's message when the list lacks `name`. */
async function checkExportListed(channel: OptionChannel, name: string): Promise<void> {
  const list = await listExportNames(channel);
  // An empty list cannot be told from no list support: assume the export exists.
  if (!list || list.length === 0 || list.some((e) => e.name === name)) return;
  throw handshakeError(`No export with name '${name}' available`);
}

/** NBD_OPT_EXPORT_NAME: the old way in; the server closes the connection instead of refusing. */
async function exportName(started: Started, info: NbdExportInfo): Promise<void> {
  const frames = started.channel.frames;
  frames.expectExportNameReply(started.noZeroes);
  started.channel.send(Opt.EXPORT_NAME, utf8(info.name));
  const reply = await frames.next('export length');
  if (reply.kind !== 'exportNameReply') throw handshakeError('Unexpected reply to NBD_OPT_EXPORT_NAME');
  info.sizeBytes = reply.sizeBytes;
  info.flags = reply.transmissionFlags;
}

// ---------------------------------------------------------------- the whole handshake

/** nbd_receive_negotiate over a connected socket: ends in transmission, or throws after closing it. */
export async function negotiate(socket: Duplex, opts: HandshakeOptions): Promise<{ frames: FrameStream; info: NbdExportInfo }> {
  if (utf8(opts.exportName).length > MAX_STRING_BYTES) throw handshakeError('export name too long to send to server');
  let started: Started | null = null;
  try {
    started = await startNegotiate(socket, opts);
    const info = await finishNegotiate(started, opts);
    return { frames: started.channel.frames, info };
  } catch (e) {
    if (started && !started.channel.frames.ended) started.channel.abort();
    (started?.channel.frames.stream ?? socket).destroy();
    socket.destroy();
    throw e;
  }
}

async function finishNegotiate(started: Started, opts: HandshakeOptions): Promise<NbdExportInfo> {
  const { channel, mode } = started;
  const info: NbdExportInfo = {
    name: opts.exportName,
    sizeBytes: 0,
    flags: 0,
    minBlock: 0,
    optBlock: 0,
    maxBlock: 0,
    mode,
    contexts: new Map(),
  };
  if (started.oldstyle) {
    if (info.name !== '') throw handshakeError('Server does not support non-empty export names');
    info.sizeBytes = started.oldstyle.sizeBytes;
    info.flags = started.oldstyle.transmissionFlags;
    return info;
  }
  if (!started.fixedNewstyle) {
    await exportName(started, info);
    return info;
  }
  const queries = opts.metaContexts ?? ['base:allocation'];
  if ((mode === 'structured' || mode === 'extended') && queries.length > 0) {
    info.contexts = await setMetaContexts(channel, info.name, queries);
  }
  if (await infoOrGo(channel, Opt.GO, info, opts.requestBlockSizes ?? true)) {
    channel.frames.enterTransmission(mode === 'extended');
    return info;
  }
  if (mode === 'extended') throw handshakeError('Server negotiated extended headers but does not support NBD_OPT_GO');
  await checkExportListed(channel, info.name);
  await exportName(started, info);
  return info;
}
