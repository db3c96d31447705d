/*
 * NBD protocol constants: magics, handshake and transmission flags, option
 * and reply types, info types, commands and command flags, structured reply
 * chunk types, block-status context flags, NBD error values with their
 * mapping to and from the block layer's errno codes, and the named limits.
 *
 * Values are the NBD specification's (NetworkBlockDevice/nbd doc/proto.md,
 * with the EXTENDED_HEADERS extension) and QEMU's include/block/nbd.h; the
 * names are theirs without the NBD_ prefix, grouped in `as const` tables.
 * The limits are QEMU's, so a client that works with qemu-nbd works here.
 *
 * The `*Name` functions give the lower-case names QEMU's nbd_*_lookup use in
 * messages ("structured reply", "block status", …), "<unknown>" otherwise.
 */
import { ERRNO, type ErrnoCode } from '../block/errors.js';

// ---------------------------------------------------------------- magics

/** 'NBDMAGIC': the first 8 bytes a server sends (INIT_PASSWD). */
export const NBDMAGIC = 0x4e42444d41474943n;
/** 'IHAVEOPT': newstyle greeting magic and option request magic. */
export const IHAVEOPT = 0x49484156454f5054n;
/** Option reply magic. */
export const REP_MAGIC = 0x3e889045565a9n;
/** Oldstyle greeting magic (cliserv_magic); we never serve oldstyle. */
export const OLDSTYLE_MAGIC = 0x00420281861253n;
export const REQUEST_MAGIC = 0x25609513;
export const EXTENDED_REQUEST_MAGIC = 0x21e41c71;
export const SIMPLE_REPLY_MAGIC = 0x67446698;
export const STRUCTURED_REPLY_MAGIC = 0x668e33ef;
export const EXTENDED_REPLY_MAGIC = 0x6e8a278c;

// ---------------------------------------------------------------- handshake

/** Handshake flags (16 bits, server greeting). */
export const HandshakeFlag = {
  FIXED_NEWSTYLE: 1 << 0,
  NO_ZEROES: 1 << 1,
} as const;

/** Client flags (32 bits, the client's answer to the greeting). */
export const ClientFlag = {
  FIXED_NEWSTYLE: 1 << 0,
  NO_ZEROES: 1 << 1,
} as const;
export const CLIENT_FLAGS_KNOWN = ClientFlag.FIXED_NEWSTYLE | ClientFlag.NO_ZEROES;

/** Options (NBD_OPT_*). */
export const Opt = {
  EXPORT_NAME: 1,
  ABORT: 2,
  LIST: 3,
  PEEK_EXPORT: 4,
  STARTTLS: 5,
  INFO: 6,
  GO: 7,
  STRUCTURED_REPLY: 8,
  LIST_META_CONTEXT: 9,
  SET_META_CONTEXT: 10,
  EXTENDED_HEADERS: 11,
} as const;

/** Bit 31 marks an error reply type. */
export const REP_FLAG_ERROR = 0x80000000;

/** Option reply types (NBD_REP_*). */
export const Rep = {
  ACK: 1,
  SERVER: 2,
  INFO: 3,
  META_CONTEXT: 4,
  ERR_UNSUP: (REP_FLAG_ERROR | 1) >>> 0,
  ERR_POLICY: (REP_FLAG_ERROR | 2) >>> 0,
  ERR_INVALID: (REP_FLAG_ERROR | 3) >>> 0,
  ERR_PLATFORM: (REP_FLAG_ERROR | 4) >>> 0,
  ERR_TLS_REQD: (REP_FLAG_ERROR | 5) >>> 0,
  ERR_UNKNOWN: (REP_FLAG_ERROR | 6) >>> 0,
  ERR_SHUTDOWN: (REP_FLAG_ERROR | 7) >>> 0,
  ERR_BLOCK_SIZE_REQD: (REP_FLAG_ERROR | 8) >>> 0,
  ERR_TOO_BIG: (REP_FLAG_ERROR | 9) >>> 0,
  ERR_EXT_HEADER_REQD: (REP_FLAG_ERROR | 10) >>> 0,
} as const;

export function isErrorReply(type: number): boolean {
  return (type & REP_FLAG_ERROR) !== 0;
}

/** Information types carried by NBD_REP_INFO (NBD_INFO_*). */
export const Info = {
  EXPORT: 0,
  NAME: 1,
  DESCRIPTION: 2,
  BLOCK_SIZE: 3,
} as const;

// ---------------------------------------------------------------- transmission

/** Transmission flags (16 bits, per export). */
export const TxFlag = {
  HAS_FLAGS: 1 << 0,
  READ_ONLY: 1 << 1,
  SEND_FLUSH: 1 << 2,
  SEND_FUA: 1 << 3,
  ROTATIONAL: 1 << 4,
  SEND_TRIM: 1 << 5,
  SEND_WRITE_ZEROES: 1 << 6,
  SEND_DF: 1 << 7,
  CAN_MULTI_CONN: 1 << 8,
  SEND_RESIZE: 1 << 9,
  SEND_CACHE: 1 << 10,
  SEND_FAST_ZERO: 1 << 11,
  BLOCK_STATUS_PAYLOAD: 1 << 12,
} as const;

/** Commands (NBD_CMD_*). */
export const Cmd = {
  READ: 0,
  WRITE: 1,
  DISC: 2,
  FLUSH: 3,
  TRIM: 4,
  CACHE: 5,
  WRITE_ZEROES: 6,
  BLOCK_STATUS: 7,
  RESIZE: 8,
} as const;

/** Command flags (NBD_CMD_FLAG_*). */
export const CmdFlag = {
  FUA: 1 << 0,
  NO_HOLE: 1 << 1,
  DF: 1 << 2,
  REQ_ONE: 1 << 3,
  FAST_ZERO: 1 << 4,
  /** Extended headers only: the 64-bit length is the length of a payload. */
  PAYLOAD_LEN: 1 << 5,
} as const;

/** Structured / extended reply chunk flags. */
export const ReplyFlag = {
  DONE: 1 << 0,
} as const;

/** Bit 15 marks an error chunk type. */
export const REPLY_TYPE_ERROR_BIT = 1 << 15;

/** Structured reply chunk types (NBD_REPLY_TYPE_*). */
export const ReplyType = {
  NONE: 0,
  OFFSET_DATA: 1,
  OFFSET_HOLE: 2,
  BLOCK_STATUS: 5,
  BLOCK_STATUS_EXT: 6,
  ERROR: REPLY_TYPE_ERROR_BIT | 1,
  ERROR_OFFSET: REPLY_TYPE_ERROR_BIT | 2,
} as const;

export function isErrorChunk(type: number): boolean {
  return (type & REPLY_TYPE_ERROR_BIT) !== 0;
}

/** `base:allocation` extent flags. */
export const StateFlag = {
  HOLE: 1 << 0,
  ZERO: 1 << 1,
} as const;

/** `qemu:dirty-bitmap:NAME` extent flag. */
export const STATE_DIRTY = 1 << 0;

// ---------------------------------------------------------------- meta contexts

export const CONTEXT_BASE_ALLOCATION = 'base:allocation';
export const CONTEXT_ALLOCATION_DEPTH = 'qemu:allocation-depth';
export const CONTEXT_DIRTY_BITMAP_PREFIX = 'qemu:dirty-bitmap:';

/** QEMU's fixed context ids; dirty bitmaps use DIRTY_BITMAP + index. */
export const ContextId = {
  BASE_ALLOCATION: 0,
  ALLOCATION_DEPTH: 1,
  DIRTY_BITMAP: 2,
} as const;

// ---------------------------------------------------------------- errors

/** NBD error values (the wire numbers; Linux errno values by design). */
export const NbdErr = {
  EPERM: 1,
  EIO: 5,
  ENOMEM: 12,
  EINVAL: 22,
  ENOSPC: 28,
  EOVERFLOW: 75,
  ENOTSUP: 95,
  ESHUTDOWN: 108,
} as const;
export type NbdErrName = keyof typeof NbdErr;

/**
 * The one mapping from the block layer's errors to NBD errors (QEMU's
 * system_errno_to_nbd_errno): EROFS is EPERM, EDQUOT/EFBIG are ENOSPC,
 * anything unknown is EINVAL.
 */
export function errnoToNbd(code: ErrnoCode): number {
  switch (code) {
    case 'EPERM':
    case 'EROFS':
      return NbdErr.EPERM;
    case 'EIO':
      return NbdErr.EIO;
    case 'ENOMEM':
      return NbdErr.ENOMEM;
    case 'EFBIG':
    case 'ENOSPC':
      return NbdErr.ENOSPC;
    case 'EOVERFLOW':
      return NbdErr.EOVERFLOW;
    case 'ENOTSUP':
      return NbdErr.ENOTSUP;
    case 'ESHUTDOWN':
      return NbdErr.ESHUTDOWN;
    default:
      return NbdErr.EINVAL;
  }
}

/**
 * NBD error value → errno code (QEMU's nbd_errno_to_system_errno): the
 * spec's values map to themselves, anything else is EINVAL, as the spec
 * tells clients to treat unknown errors.
 */
export function nbdToErrno(nbdError: number): ErrnoCode {
  for (const [name, value] of Object.entries(NbdErr)) {
    if (value === nbdError) return name as NbdErrName;
  }
  return 'EINVAL';
}

/** Sanity check used by tests: every NBD error is the Linux errno of the same name. */
export function nbdErrMatchesErrno(): boolean {
  return Object.entries(NbdErr).every(([name, value]) => ERRNO[name as ErrnoCode] === value);
}

// ---------------------------------------------------------------- limits

/** Default TCP port (IANA). */
export const DEFAULT_PORT = 10809;
/** Largest READ/WRITE payload and option length QEMU accepts (NBD_MAX_BUFFER_SIZE). */
export const MAX_BUFFER_BYTES = 32 * 1024 * 1024;
/** Longest string (export name, description, context, message) (NBD_MAX_STRING_SIZE). */
export const MAX_STRING_BYTES = 4096;
/** Largest option the server buffers whole; longer known options get ERR_TOO_BIG. */
export const MAX_OPTION_BUFFER_BYTES = 1024 * 1024;
/** Most extents in one block-status chunk (NBD_MAX_BLOCK_STATUS_EXTENTS: 1 MiB of extents). */
export const MAX_BLOCK_STATUS_EXTENTS = (1024 * 1024) / 8;
/** Requests in flight per connection (MAX_NBD_REQUESTS). */
export const MAX_REQUESTS_IN_FLIGHT = 16;
/** Zero bytes after the EXPORT_NAME reply unless NO_ZEROES was negotiated. */
export const EXPORT_NAME_REPLY_PAD_BYTES = 124;
/** Error messages QEMU puts in option error replies are cut to this many bytes of name. */
export const SANITIZED_NAME_BYTES = 80;
/** The minimum block size a server must accept when it advertises none. */
export const DEFAULT_PREFERRED_BLOCK_BYTES = 4096;

// ---------------------------------------------------------------- names

const OPT_NAMES: Record<number, string> = {
  [Opt.EXPORT_NAME]: 'export name',
  [Opt.ABORT]: 'abort',
  [Opt.LIST]: 'list',
  [Opt.PEEK_EXPORT]: 'peek export',
  [Opt.STARTTLS]: 'starttls',
  [Opt.INFO]: 'info',
  [Opt.GO]: 'go',
  [Opt.STRUCTURED_REPLY]: 'structured reply',
  [Opt.LIST_META_CONTEXT]: 'list meta context',
  [Opt.SET_META_CONTEXT]: 'set meta context',
  [Opt.EXTENDED_HEADERS]: 'extended headers',
};

const REP_NAMES: Record<number, string> = {
  [Rep.ACK]: 'ack',
  [Rep.SERVER]: 'server',
  [Rep.INFO]: 'info',
  [Rep.META_CONTEXT]: 'meta context',
  [Rep.ERR_UNSUP]: 'unsupported',
  [Rep.ERR_POLICY]: 'denied by policy',
  [Rep.ERR_INVALID]: 'invalid',
  [Rep.ERR_PLATFORM]: 'platform lacks support',
  [Rep.ERR_TLS_REQD]: 'TLS required',
  [Rep.ERR_UNKNOWN]: 'export unknown',
  [Rep.ERR_SHUTDOWN]: 'server shutting down',
  [Rep.ERR_BLOCK_SIZE_REQD]: 'block size required',
  [Rep.ERR_TOO_BIG]: 'option payload too big',
  [Rep.ERR_EXT_HEADER_REQD]: 'extended headers required',
};

const INFO_NAMES: Record<number, string> = {
  [Info.EXPORT]: 'export',
  [Info.NAME]: 'name',
  [Info.DESCRIPTION]: 'description',
  [Info.BLOCK_SIZE]: 'block size',
};

const CMD_NAMES: Record<number, string> = {
  [Cmd.READ]: 'read',
  [Cmd.WRITE]: 'write',
  [Cmd.DISC]: 'disconnect',
  [Cmd.FLUSH]: 'flush',
  [Cmd.TRIM]: 'trim',
  [Cmd.CACHE]: 'cache',
  [Cmd.WRITE_ZEROES]: 'write zeroes',
  [Cmd.BLOCK_STATUS]: 'block status',
  [Cmd.RESIZE]: 'resize',
};

const REPLY_TYPE_NAMES: Record<number, string> = {
  [ReplyType.NONE]: 'none',
  [ReplyType.OFFSET_DATA]: 'data',
  [ReplyType.OFFSET_HOLE]: 'hole',
  [ReplyType.BLOCK_STATUS]: 'block status (32-bit)',
  [ReplyType.BLOCK_STATUS_EXT]: 'block status (64-bit)',
  [ReplyType.ERROR]: 'generic error',
  [ReplyType.ERROR_OFFSET]: 'error at offset',
};

const UNKNOWN = '<unknown>';

export const optName = (opt: number): string => OPT_NAMES[opt] ?? UNKNOWN;
export const repName = (rep: number): string => REP_NAMES[rep] ?? UNKNOWN;
export const infoName = (info: number): string => INFO_NAMES[info] ?? UNKNOWN;
export const cmdName = (cmd: number): string => CMD_NAMES[cmd] ?? UNKNOWN;
export const replyTypeName = (type: number): string => REPLY_TYPE_NAMES[type] ?? UNKNOWN;
