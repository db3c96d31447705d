/*
 * Opening and closing the image (qemu-io.c openfile, open_f, close_f), for
 * the command line and for the `open` command alike.
 *
 * Settings mirror qemu-io's BDRV_O_* flags: read-write unless -r, discard
 * punches holes by default (BDRV_O_UNMAP; -d ignore/off turns it off), the
 * write cache is off (writethrough: every write is FUA) unless -t/-n say
 * otherwise, and -t none/directsync ask for O_DIRECT (cache.direct). Like
 * QEMU's flags they are inherited by the top node and its children, and
 * options the user gives (-o, --image-opts) win over them.
 *
 * Three ways to name the image, as in QEMU: a filename, with `-o`/`-f`
 * options for the format (probing when no driver is given); a `json:{…}`
 * filename; or only options (--image-opts, `open -o` without a path). The
 * last two are option trees the graph opens as bdrv_open does (openOptions:
 * `file.filename` without a driver probes too). A probed raw image opened
 * read-write makes the raw driver print QEMU's 3-line WARNING mid-open,
 * through the graph's onWarning (set up by the session).
 *
 * Not supported, and refused with a message rather than ignored: -s
 * (snapshot overlay) and --object. -C (copy-on-read), -k/-i (AIO engine)
 * and -m change nothing observable for images without a backing file and
 * are accepted; aio=native still needs cache.direct, as in QEMU.
 */
import { BlockBackend } from '../../block/backend.js';
import { BlockError } from '../../block/errors.js';
import type { Inherited } from '../../block/graph.js';
import { JSON_FILENAME_PREFIX, parseJsonFilename, unflatten, type OptionTree, type OptionValue } from '../../block/keyval.js';
import type { BlockNode } from '../../block/node.js';
import { parseFlags, usageFailure, type IoCommand } from './commands.js';
import { asBlockError } from './request.js';
import type { IoSession } from './session.js';

export interface OpenSettings {
  readOnly: boolean;
  /** BDRV_O_NOCACHE: cache.direct. */
  direct: boolean;
  /** BDRV_O_NO_FLUSH: cache.no-flush (cache=unsafe). */
  noFlush: boolean;
  /** Every write is FUA (qemu-io's default). */
  writethrough: boolean;
  /** BDRV_O_UNMAP: discard=unmap. */
  unmap: boolean;
  snapshot: boolean;
  nativeAio: boolean;
  forceShare: boolean;
}

export function defaultOpenSettings(): OpenSettings {
  return { readOnly: false, direct: false, noFlush: false, writethrough: true, unmap: true, snapshot: false, nativeAio: false, forceShare: false };
}

/** bdrv_parse_cache_mode; false for an unknown mode. */
export function applyCacheMode(st: OpenSettings, mode: string): boolean {
  const modes: Record<string, [direct: boolean, noFlush: boolean, writethrough: boolean]> = {
    none: [true, false, false],
    off: [true, false, false],
    directsync: [true, false, true],
    writeback: [false, false, false],
    unsafe: [false, true, false],
    writethrough: [false, false, true],
  };
  const m = modes[mode];
  if (!m) return false;
  [st.direct, st.noFlush, st.writethrough] = m;
  return true;
}

/** bdrv_parse_discard_flags; false for an unknown mode. */
export function applyDiscardMode(st: OpenSettings, mode: string): boolean {
  if (mode === 'off' || mode === 'ignore') st.unmap = false;
  else if (mode === 'on' || mode === 'unmap') st.unmap = true;
  else return false;
  return true;
}

/** bdrv_parse_aio; false for an unknown mode. */
export function applyAioMode(st: OpenSettings, mode: string): boolean {
  if (!['threads', 'native', 'io_uring'].includes(mode)) return false;
  st.nativeAio = mode === 'native';
  return true;
}

/** Shared handling of -t/-d/-i/-n/-r/-U/-k/-s/-C (command line and `open`); false after an error. */
export function applyOpenFlag(s: IoSession, st: OpenSettings, key: string, arg: string): boolean {
  const invalid = (what: string) => {
    s.report(`Invalid ${what} option: ${arg}`);
    return false;
  };
  if (key === 't') return applyCacheMode(st, arg) || invalid('cache');
  if (key === 'd') return applyDiscardMode(st, arg) || invalid('discard');
  if (key === 'i') return applyAioMode(st, arg) || invalid('aio');
  if (key === 'n') [st.direct, st.writethrough] = [true, false];
  else if (key === 'r') st.readOnly = true;
  else if (key === 'U') st.forceShare = true;
  else if (key === 'k') st.nativeAio = true;
  else if (key === 's') st.snapshot = true;
  return true;
}

// ---------------------------------------------------------------- option strings

/** Value of a QemuOpts pair from `at`: up to a single ',' (',,' is a comma). Returns [value, end]. */
function readValue(text: string, at: number): [string, number] {
  let value = '';
  while (at < text.length) {
    if (text[at] === ',') {
      if (text[at + 1] !== ',') break;
      at++;
    }
    value += text[at++];
  }
  return [value, at];
}

/**
 * qemu_opts_parse_noisily into `into` (later keys win): `key=value,…`; a bare
 * `key` is the deprecated short form of key=on (`nokey`: key=off), with
 * QEMU's warning. `id=` is refused where QEMU merges option lists (open -o).
 */
export function parseQemuOpts(s: IoSession, text: string, into: Map<string, string>, refuseId: boolean): boolean {
  let at = 0;
  while (at < text.length) {
    const stop = text.slice(at).search(/[=,]/);
    const nameEnd = stop < 0 ? text.length : at + stop;
    const name = text.slice(at, nameEnd);
    if (text[nameEnd] === '=') {
      if (name === 'id' && refuseId) {
        s.report("Invalid parameter 'id'");
        return false;
      }
      const [value, end] = readValue(text, nameEnd + 1);
      into.set(name, value);
      at = end;
    } else {
      const [key, value] = name.startsWith('no') ? [name.slice(2), 'off'] : [name, 'on'];
      if (key !== 'help' && key !== '?') {
        s.warn(`short-form boolean option '${name}' deprecated`);
        s.printErr(`Please use ${key}=${value} instead`);
      }
      into.set(key, value);
      at = nameEnd;
    }
    if (text[at] === ',') at++;
  }
  return true;
}

// ---------------------------------------------------------------- open

function isTree(v: OptionValue | undefined): v is OptionTree {
  return typeof v === 'object' && v !== null && !Array.isArray(v);
}

/** `defaults` under `tree`: keys the user set win, nested objects merge. */
function withDefaults(tree: OptionTree, defaults: OptionTree): OptionTree {
  const out: OptionTree = { ...defaults, ...tree };
  for (const [k, v] of Object.entries(defaults)) {
    const mine = tree[k];
    if (isTree(v) && isTree(mine)) out[k] = withDefaults(mine, v);
  }
  return out;
}

/** The settings as blockdev options of the top node. */
function settingOptions(st: OpenSettings): OptionTree {
  return { discard: st.unmap ? 'unmap' : 'ignore', cache: { direct: st.direct, 'no-flush': st.noFlush } };
}

/** Checks QEMU makes while opening, before any file is touched. */
function refusedSettings(st: OpenSettings): string | null {
  if (st.forceShare && !st.readOnly) return 'force-share=on can only be used with read-only images';
  if (st.nativeAio && !st.direct) return 'aio=native was specified, but it requires cache.direct=on, which was not specified.';
  if (st.snapshot) return 'snapshot mode (-s) is not supported by qemu-block-ts';
  return null;
}

/** The settings as the flags the top node and its children inherit (options the user gives win). */
function settingFlags(st: OpenSettings): Inherited {
  return { readOnly: st.readOnly, forceShare: st.forceShare, unmap: st.unmap, direct: st.direct, noFlush: st.noFlush };
}

/** Opens the node: by filename (with format options), or from options (json: filename, --image-opts, `open -o`). */
async function openNode(s: IoSession, name: string | null, st: OpenSettings, tree: OptionTree): Promise<BlockNode> {
  const refused = refusedSettings(st);
  if (refused) throw new BlockError('EINVAL', refused);
  if (name === null || name.startsWith(JSON_FILENAME_PREFIX)) {
    return s.graph.openOptions(name !== null ? { ...parseJsonFilename(name), ...tree } : tree, settingFlags(st));
  }
  if (tree.file !== undefined) throw new BlockError('EINVAL', "Can't specify 'file' and 'filename' options at the same time");
  // openImage takes no inherited cache and discard flags: they go in as options of both nodes.
  const base = settingOptions(st);
  const { driver, ...rest } = tree;
  const format = typeof driver === 'string' ? driver : undefined;
  return s.graph.openImage(name, { readOnly: st.readOnly, forceShare: st.forceShare, format, options: withDefaults(rest, base), protocolOptions: base });
}

/**
 * openfile(): opens the image as the session's backend. `name` is the path
 * (null with --image-opts or `open -o` alone); `pairs` the option string's
 * keys. Prints QEMU's `can't open device NAME: …` on failure.
 */
export async function openFile(s: IoSession, name: string | null, st: OpenSettings, pairs: Map<string, string>): Promise<boolean> {
  if (s.blk) {
    s.report("file open already, try 'help close'");
    return false;
  }
  if (st.forceShare) {
    const given = pairs.get('force-share');
    if (given !== undefined && given !== 'on') {
      s.report('-U conflicts with image options');
      return false;
    }
    pairs.set('force-share', 'on');
  }
  let node: BlockNode;
  try {
    node = await openNode(s, name, st, unflatten(pairs));
  } catch (e) {
    s.report(`can't open${name !== null ? ` device ${name}` : ''}: ${asBlockError(e).message}`);
    return false;
  }
  // Resize is taken by the commands that need it (truncate), as qemu-io's command() does.
  s.blk = new BlockBackend(s.graph, node, { writable: !node.readOnly, writeCache: !st.writethrough });
  return true;
}

// ---------------------------------------------------------------- open and close commands

async function openF(s: IoSession, argv: string[]): Promise<boolean> {
  const st = defaultOpenSettings();
  const pairs = new Map<string, string>();
  const operands = parseFlags(s, openCommand, argv, 'snCro:ki:t:d:U', (key, arg) => {
    if (key !== 'o') return applyOpenFlag(s, st, key, arg);
    if (s.imageOpts) {
      s.print("--image-opts and 'open -o' are mutually exclusive");
      return false;
    }
    return parseQemuOpts(s, arg, pairs, true);
  });
  if (!operands) return false;
  if (s.imageOpts && operands.length === 1) {
    if (!parseQemuOpts(s, operands.shift()!, pairs, true)) return false;
  }
  if (operands.length > 1) return usageFailure(s, openCommand);
  return openFile(s, operands[0] ?? null, st, pairs);
}

export const openCommand: IoCommand = {
  name: 'open',
  altname: 'o',
  args: '[-rsCnkU] [-t cache] [-d discard] [-o options] [path]',
  oneline: 'open the file specified by path',
  help: [
    '',
    ' opens a new file in the requested mode',
    '',
    ' Example:',
    " 'open -n -o driver=raw /tmp/data' - opens raw data file read-write, uncached",
    '',
    ' Opens a file for subsequent use by all of the other qemu-io commands.',
    ' -r, -- open file read-only',
    ' -s, -- use snapshot file',
    ' -C, -- use copy-on-read',
    ' -n, -- disable host cache, short for -t none',
    ' -U, -- force shared permissions',
    ' -k, -- use kernel AIO implementation (Linux only, prefer use of -i)',
    ' -i, -- use AIO mode (threads, native or io_uring)',
    ' -t, -- use the given cache mode for the image',
    ' -d, -- use the given discard mode for the image',
    ' -o, -- options to be given to the block driver',
    '',
  ].join('\n'),
  argmin: 1,
  argmax: -1,
  nofileOk: true,
  run: openF,
};

export const closeCommand: IoCommand = {
  name: 'close',
  altname: 'c',
  oneline: 'close the current open file',
  argmin: 0,
  argmax: 0,
  async run(s) {
    try {
      await s.closeImage();
    } catch {
      // blk_unref reports nothing: a failed final flush is not the user's command failing.
    }
    return true;
  },
};
