/*
 * The server side of the fixed newstyle handshake (QEMU's
 * nbd_negotiate_options and its helpers), one option at a time.
 *
 * State: whether the client speaks fixed newstyle and wants NO_ZEROES, the
 * reply mode (simple, structured, extended), whether TLS is up, and the
 * meta contexts chosen by the last SET_META_CONTEXT (with the export they
 * were chosen on: GO or EXPORT_NAME on another export forgets them).
 *
 * Each option gets QEMU's answer and message text:
 *   EXPORT_NAME   reply with size and flags (and 124 zeroes unless
 *                 NO_ZEROES); an unknown name, a name over 4096 bytes, or
 *                 extended headers already on disconnect (no error reply
 *                 exists for this option);
 *   ABORT         ACK, then close;
 *   LIST          one NBD_REP_SERVER per export (name, description), ACK;
 *   STARTTLS      ERR_POLICY "TLS not configured" without TLS, ERR_INVALID
 *                 "TLS already enabled" after it, else ACK and upgrade;
 *   INFO / GO     NAME (only if asked), DESCRIPTION (if set), BLOCK_SIZE,
 *                 EXPORT, then ACK (GO enters transmission); ERR_UNKNOWN for
 *                 a missing export; INFO without a block-size request on an
 *                 export whose alignment exceeds 1: ERR_BLOCK_SIZE_REQD;
 *   STRUCTURED_REPLY, EXTENDED_HEADERS   ACK once; again: ERR_INVALID (or
 *                 ERR_EXT_HEADER_REQD for structured after extended);
 *   LIST/SET_META_CONTEXT   see meta-context.ts; SET needs structured replies;
 *   anything else ERR_UNSUP "Unsupported option N (name)".
 * Options that take no data answer ERR_INVALID "option 'x' has unexpected
 * length" when given some. A TLS-requiring server answers ERR_TLS_REQD to
 * everything before STARTTLS but ABORT (ERR_TLS_REQD, then close) and
 * EXPORT_NAME (disconnect). While the server shuts down, options other than
 * ABORT get ERR_SHUTDOWN.
 */
import type { NbdExport } from './export.js';
import { selectContexts, type NumberedContext } from './meta-context.js';
import {
  ClientFlag,
  CLIENT_FLAGS_KNOWN,
  Info,
  MAX_STRING_BYTES,
  Opt,
  Rep,
  SANITIZED_NAME_BYTES,
  TxFlag,
  optName,
} from './protocol.js';
import {
  decodeInfoRequest,
  decodeMetaContextRequest,
  encodeExportNameReply,
  encodeInfoBlockSize,
  encodeInfoDescription,
  encodeInfoExport,
  encodeInfoName,
  encodeOptionError,
  encodeOptionReply,
  encodeRepMetaContext,
  encodeRepServer,
} from './wire-handshake.js';

export type ReplyMode = 'export-name' | 'simple' | 'structured' | 'extended';

/** What the handshake needs from the server and the connection. */
export interface HandshakeHost {
  findExport(name: string): NbdExport | undefined;
  listExports(): readonly NbdExport[];
  readonly multiConn: boolean;
  readonly tlsConfigured: boolean;
  readonly shuttingDown: boolean;
  send(parts: Buffer[]): Promise<void>;
  /** Switches the connection to TLS (after the ACK was sent); rejects to drop it. */
  startTls(): Promise<void>;
}

/** How the handshake goes on after one option. */
export type OptionOutcome =
  | { next: 'continue' }
  | { next: 'close'; error?: string }
  | { next: 'transmission'; exp: NbdExport };

const CONTINUE: OptionOutcome = { next: 'continue' };

/** QEMU's nbd_sanitize_name: names of 80 bytes or more are cut and marked. */
function sanitizeName(name: string): string {
  return name.length < SANITIZED_NAME_BYTES ? name : `${name.slice(0, SANITIZED_NAME_BYTES)}...`;
}

const hex = (n: number) => `0x${n.toString(16)}`;

export class Handshake {
  fixedNewstyle = false;
  noZeroes = false;
  mode: ReplyMode = 'export-name';
  tlsActive = false;
  /** Meta contexts chosen by the last SET_META_CONTEXT and the export they belong to. */
  contexts: NumberedContext[] = [];
  private contextsExport: NbdExport | null = null;
  /** Alignment a client that asked for block sizes promised to respect (0: none). */
  checkAlign = 0;

  constructor(private readonly host: HandshakeHost) {}

  get structured(): boolean {
    return this.mode === 'structured' || this.mode === 'extended';
  }

  get extended(): boolean {
    return this.mode === 'extended';
  }

  /** The client flags; returns a reason to disconnect, or null. */
  clientFlags(flags: number): string | null {
    const unknown = flags & ~CLIENT_FLAGS_KNOWN;
    if (unknown) return `Unknown client flags ${hex(unknown >>> 0)} received`;
    this.fixedNewstyle = (flags & ClientFlag.FIXED_NEWSTYLE) !== 0;
    this.noZeroes = (flags & ClientFlag.NO_ZEROES) !== 0;
    this.mode = this.fixedNewstyle ? 'simple' : 'export-name';
    return null;
  }

  /** One option; `data` is null when it was too long to buffer. */
  async option(option: number, length: number, data: Buffer | null): Promise<OptionOutcome> {
    if (this.host.tlsConfigured && !this.tlsActive) return this.beforeTls(option, length);
    if (!this.fixedNewstyle) {
      if (option === Opt.EXPORT_NAME) return this.exportName(length, data);
      return { next: 'close', error: `Unsupported option ${option} (${optName(option)})` };
    }
    if (this.host.shuttingDown && option !== Opt.ABORT) {
      return this.error(option, Rep.ERR_SHUTDOWN, 'Server is shutting down');
    }
    return this.fixedOption(option, length, data);
  }

  private async fixedOption(option: number, length: number, data: Buffer | null): Promise<OptionOutcome> {
    switch (option) {
      case Opt.EXPORT_NAME:
        return this.exportName(length, data);
      case Opt.ABORT:
        await this.host.send([encodeOptionReply(option, Rep.ACK)]);
        return { next: 'close' };
      case Opt.LIST:
        return length ? this.unexpectedLength(option) : this.list();
      case Opt.STARTTLS:
        if (length) return this.unexpectedLength(option);
        if (this.host.tlsConfigured) return this.error(option, Rep.ERR_INVALID, 'TLS already enabled');
        return this.error(option, Rep.ERR_POLICY, 'TLS not configured');
      case Opt.INFO:
      case Opt.GO:
        return data ? this.info(option, data) : this.tooBig(option);
      case Opt.STRUCTURED_REPLY:
        return this.structuredReply(length);
      case Opt.EXTENDED_HEADERS:
        return this.extendedHeaders(length);
      case Opt.LIST_META_CONTEXT:
      case Opt.SET_META_CONTEXT:
        return this.metaContext(option, data);
      default:
        return this.error(option, Rep.ERR_UNSUP, `Unsupported option ${option} (${optName(option)})`);
    }
  }

  private async beforeTls(option: number, length: number): Promise<OptionOutcome> {
    if (!this.fixedNewstyle) return { next: 'close', error: `Unsupported option ${hex(option)}` };
    if (option === Opt.STARTTLS) {
      if (length) {
        await this.error(option, Rep.ERR_INVALID, `option '${optName(option)}' has unexpected length`);
        return { next: 'close', error: `option '${optName(option)}' has unexpected length` };
      }
      await this.host.send([encodeOptionReply(option, Rep.ACK)]);
      await this.host.startTls();
      this.tlsActive = true;
      return CONTINUE;
    }
    if (option === Opt.EXPORT_NAME) return { next: 'close', error: `Option ${hex(option)} not permitted before TLS` };
    await this.error(option, Rep.ERR_TLS_REQD, `Option ${hex(option)} not permitted before TLS`);
    return option === Opt.ABORT ? { next: 'close' } : CONTINUE;
  }

  private async error(option: number, type: number, message: string): Promise<OptionOutcome> {
    await this.host.send([encodeOptionError(option, type, message)]);
    return CONTINUE;
  }

  private unexpectedLength(option: number): Promise<OptionOutcome> {
    return this.error(option, Rep.ERR_INVALID, `option '${optName(option)}' has unexpected length`);
  }

  private tooBig(option: number): Promise<OptionOutcome> {
    return this.error(option, Rep.ERR_TOO_BIG, `option '${optName(option)}' is too long`);
  }

  private findExport(name: string): NbdExport | undefined {
    const exp = this.host.findExport(name);
    return exp && !exp.removing ? exp : undefined;
  }

  /** GO or EXPORT_NAME picked `exp`: contexts chosen for another export are forgotten. */
  private checkMetaExport(exp: NbdExport): void {
    if (exp !== this.contextsExport) this.contexts = [];
  }

  /** The export's flags as this client sees them (DF once structured, PAYLOAD with extended contexts). */
  private flagsFor(exp: NbdExport, isInfo: boolean): number {
    let flags = exp.transmissionFlags(this.host.multiConn);
    if (this.structured) flags |= TxFlag.SEND_DF;
    if (this.extended && (this.contexts.length > 0 || isInfo)) flags |= TxFlag.BLOCK_STATUS_PAYLOAD;
    return flags;
  }

  private async exportName(length: number, data: Buffer | null): Promise<OptionOutcome> {
    if (this.extended) return { next: 'close', error: 'Extended headers already negotiated' };
    if (!data || length > MAX_STRING_BYTES) return { next: 'close', error: 'Bad length received' };
    const exp = this.findExport(data.toString('utf8'));
    if (!exp) return { next: 'close', error: 'export not found' };
    this.checkMetaExport(exp);
    await this.host.send([encodeExportNameReply(exp.sizeBytes, this.flagsFor(exp, false), this.noZeroes)]);
    return { next: 'transmission', exp };
  }

  private async list(): Promise<OptionOutcome> {
    const replies = this.host
      .listExports()
      .filter((e) => !e.removing)
      .map((e) => encodeOptionReply(Opt.LIST, Rep.SERVER, encodeRepServer({ name: e.name, description: e.description ?? '' })));
    await this.host.send([...replies, encodeOptionReply(Opt.LIST, Rep.ACK)]);
    return CONTINUE;
  }

  private async info(option: number, data: Buffer): Promise<OptionOutcome> {
    const req = decodeInfoRequest(data, option);
    if (!req.ok) return this.error(option, Rep.ERR_INVALID, req.reason);
    const { name, infos } = req.value;
    const exp = this.findExport(name);
    if (!exp) return this.error(option, Rep.ERR_UNKNOWN, `export '${sanitizeName(name)}' not present`);
    if (option === Opt.GO) this.checkMetaExport(exp);
    const wantsBlockSize = infos.includes(Info.BLOCK_SIZE);
    const obeys = option === Opt.INFO || wantsBlockSize;
    const replies: Buffer[] = [];
    const info = (payload: Buffer) => replies.push(encodeOptionReply(option, Rep.INFO, payload));
    if (infos.includes(Info.NAME)) info(encodeInfoName(name));
    if (exp.description !== undefined) info(encodeInfoDescription(exp.description));
    info(encodeInfoBlockSize(exp.blockSizes(obeys)));
    info(encodeInfoExport(exp.sizeBytes, this.flagsFor(exp, option === Opt.INFO)));
    if (option === Opt.INFO && !wantsBlockSize && exp.requestAlignment > 1) {
      replies.push(encodeOptionError(option, Rep.ERR_BLOCK_SIZE_REQD, 'request NBD_INFO_BLOCK_SIZE to use this export'));
      await this.host.send(replies);
      return CONTINUE;
    }
    replies.push(encodeOptionReply(option, Rep.ACK));
    await this.host.send(replies);
    if (option === Opt.INFO) return CONTINUE;
    this.checkAlign = obeys ? exp.requestAlignment : 0;
    return { next: 'transmission', exp };
  }

  private async structuredReply(length: number): Promise<OptionOutcome> {
    const option = Opt.STRUCTURED_REPLY;
    if (length) return this.unexpectedLength(option);
    if (this.extended) return this.error(option, Rep.ERR_EXT_HEADER_REQD, 'extended headers already negotiated');
    if (this.structured) return this.error(option, Rep.ERR_INVALID, 'structured reply already negotiated');
    this.mode = 'structured';
    await this.host.send([encodeOptionReply(option, Rep.ACK)]);
    return CONTINUE;
  }

  private async extendedHeaders(length: number): Promise<OptionOutcome> {
    const option = Opt.EXTENDED_HEADERS;
    if (length) return this.unexpectedLength(option);
    if (this.extended) return this.error(option, Rep.ERR_INVALID, 'extended headers already negotiated');
    this.mode = 'extended';
    await this.host.send([encodeOptionReply(option, Rep.ACK)]);
    return CONTINUE;
  }

  private async metaContext(option: number, data: Buffer | null): Promise<OptionOutcome> {
    const set = option === Opt.SET_META_CONTEXT;
    if (set && !this.structured) {
      return this.error(option, Rep.ERR_INVALID, `request option '${optName(option)}' when structured reply is not negotiated`);
    }
    if (set) {
      this.contexts = [];
      this.contextsExport = null;
    }
    if (!data) return this.tooBig(option);
    const req = decodeMetaContextRequest(data, option);
    if (!req.ok) return this.error(option, Rep.ERR_INVALID, req.reason);
    const exp = this.findExport(req.value.exportName);
    if (!exp) return this.error(option, Rep.ERR_UNKNOWN, `export '${sanitizeName(req.value.exportName)}' not present`);
    const chosen = selectContexts(exp.contexts, req.value.queries, !set);
    const replies = chosen.map((c) =>
      encodeOptionReply(option, Rep.META_CONTEXT, encodeRepMetaContext({ id: set ? c.id : 0, name: c.source.name })),
    );
    await this.host.send([...replies, encodeOptionReply(option, Rep.ACK)]);
    if (set) {
      this.contexts = chosen;
      this.contextsExport = exp;
    }
    return CONTINUE;
  }
}
