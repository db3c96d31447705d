/*
 * qemu-nbd's command line (QEMU 7.2's qemu-nbd.c main, up to opening the
 * image): the options, parsed by glibc's getopt_long in their order, with
 * qemu-nbd's checks and messages as it makes them — some while parsing
 * (an invalid cache mode, `--detect-zeroes=unmap` before `--discard=unmap`,
 * a relative socket path, an export name over 4096 bytes), the rest after
 * (argument count, list-mode conflicts, TLS conflicts).
 *
 * Differences, on purpose:
 *   - TCP listens on 127.0.0.1 unless -b says otherwise (qemu-nbd: 0.0.0.0),
 *     so that a server nobody asked to expose is not exposed;
 *   - kernel devices (-c, -d) are answered as a qemu-nbd built without
 *     them answers ("Kernel /dev/nbdN support not available");
 *   - -s (a temporary overlay) and --selinux-label are refused with a
 *     message; -T (tracing) and -v are accepted and change nothing.
 */
import { Option } from 'commander';
import { BlockError } from '../../block/errors.js';
import { MAX_STRING_BYTES } from '../../nbd/protocol.js';
import type { TlsCreds } from '../../nbd/tls-creds.js';
import { createTlsObject, isTlsObjectType, resolveTlsCreds, type ObjectLookup, type TlsObject } from '../../nbd/tls-objects.js';
import { CliError, CliExit } from '../cli-common.js';
import { GetoptLong } from '../img/getopt.js';
import { snapshotParam } from '../img/measure.js';
import { ObjectRegistry } from '../../block/objects.js';
import { applyAioMode, applyCacheMode, applyDiscardMode, defaultOpenSettings, type OpenSettings } from '../io/open.js';
import type { SnapshotRef } from '../../block/snapshot-tmp.js';

export const PROG = 'qemu-nbd';
/** NBD's IANA port. */
export const NBD_DEFAULT_PORT = 10809;
/** Where TCP listens without -b (see the note at the top). */
export const DEFAULT_BIND = '127.0.0.1';

export type DetectZeroes = 'off' | 'on' | 'unmap';

export interface NbdCliConfig {
  /** The image (absent in list mode). */
  filename?: string;
  list: boolean;
  bind: string;
  port: string;
  socket?: string;
  /** -e: clients served at once; 0 = no limit. */
  shared: number;
  persistent: boolean;
  exportName: string;
  description?: string;
  allocationDepth: boolean;
  bitmaps: string[];
  format?: string;
  imageOpts: boolean;
  /** -o: bytes skipped at the start of the image. */
  offsetBytes: number;
  snapshot?: SnapshotRef;
  open: OpenSettings;
  detectZeroes: DetectZeroes;
  objects: ObjectRegistry;
  /** --object's tls-creds-* and authz-* objects, created as they were given (QEMU loads their files then). */
  tlsObjects: Map<string, TlsObject>;
  tlsCreds?: string;
  tlsAuthz?: string;
  tlsHostname?: string;
  fork: boolean;
  pidFile?: string;
}

/** The options, as qemu-nbd's getopt_long table has them. */
export const NBD_OPTIONS = [
  new Option('-h, --help', 'display this help and exit'),
  new Option('-V, --version', 'output version information and exit'),
  new Option('-p, --port <port>', "port to listen on (default `10809')"),
  new Option('-b, --bind <iface>', "interface to bind to (default `127.0.0.1')"),
  new Option('-k, --socket <path>', 'path to the unix socket'),
  new Option('-e, --shared <num>', "device can be shared by NUM clients (default '1')"),
  new Option('-t, --persistent', "don't exit on the last connection"),
  new Option('-v, --verbose', 'display extra debugging information'),
  new Option('-x, --export-name <name>', 'expose export by name (default is empty string)'),
  new Option('-D, --description <text>', 'export a human-readable description'),
  new Option('-o, --offset <offset>', 'offset into the image'),
  new Option('-A, --allocation-depth', 'expose the allocation depth'),
  new Option('-B, --bitmap <name>', 'expose a persistent dirty bitmap'),
  new Option('-L, --list', 'list exports available from another NBD server'),
  new Option('--object <def>', "define an object such as 'secret' for providing passwords and/or encryption keys"),
  new Option('--tls-creds <id>', 'use id of an earlier --object to provide TLS'),
  new Option('--tls-hostname <name>', 'override the hostname used to check x509 certificates (with -L)'),
  new Option('--tls-authz <id>', 'use id of an earlier --object to provide authorization'),
  new Option('-T, --trace <spec>', 'accepted for compatibility; there are no trace events'),
  new Option('--fork', 'fork off the server process and exit the parent once the server is running'),
  new Option('--pid-file <path>', "store the server's process ID in the given file"),
  new Option('--selinux-label <label>', 'not supported'),
  new Option('-c, --connect <dev>', 'not supported: kernel NBD devices'),
  new Option('-d, --disconnect', 'not supported: kernel NBD devices'),
  new Option('-f, --format <format>', 'set image format (raw, qcow2, ...)'),
  new Option('-r, --read-only', 'export read-only'),
  new Option('-s, --snapshot', 'not supported: a temporary overlay'),
  new Option('-l, --load-snapshot <param>', 'load an internal snapshot inside FILE and export it read-only'),
  new Option('-n, --nocache', 'disable host cache'),
  new Option('--cache <mode>', "set cache mode: 'none', 'writeback' (default), 'writethrough', 'directsync', 'unsafe'"),
  new Option('--aio <mode>', 'set AIO mode (native, io_uring or threads)'),
  new Option('--discard <mode>', 'set discard mode (ignore, unmap)'),
  new Option('--detect-zeroes <mode>', 'set detect-zeroes mode (off, on, unmap)'),
  new Option('--image-opts', 'treat FILE as a full set of image options'),
];

/** What parsing decided besides the config: print help or the version. */
export type ParseOutcome = { kind: 'run'; config: NbdCliConfig } | { kind: 'help' } | { kind: 'version' };

interface ParseState {
  config: NbdCliConfig;
  exportNameGiven: boolean;
  seen: Set<string>;
  device: boolean;
}

/** Parses qemu-nbd's argv (without the program name). */
export function parseNbdArgs(args: readonly string[]): ParseOutcome {
  const st: ParseState = { config: defaults(), exportNameGiven: false, seen: new Set(), device: false };
  const getopt = new GetoptLong([PROG, ...args], NBD_OPTIONS, false, true);
  for (const { key, value } of getopt) {
    if (key === '?') throw new CliError(`${glibcText(value!)}\n${PROG}: Try \`${PROG} --help' for more information.`);
    if (key === 'help') return { kind: 'help' };
    if (key === 'version') return { kind: 'version' };
    applyOption(st, key, value);
  }
  checkOperands(st, getopt.operands());
  checkTls(st.config);
  return { kind: 'run', config: st.config };
}

function defaults(): NbdCliConfig {
  const open = defaultOpenSettings();
  open.unmap = false; // qemu-nbd: discard=ignore unless --discard says otherwise
  open.writethrough = false; // the client flushes as needed
  return {
    list: false,
    bind: DEFAULT_BIND,
    port: String(NBD_DEFAULT_PORT),
    shared: 1,
    persistent: false,
    exportName: '',
    allocationDepth: false,
    bitmaps: [],
    imageOpts: false,
    offsetBytes: 0,
    open,
    detectZeroes: 'off',
    objects: new ObjectRegistry(),
    tlsObjects: new Map(),
    fork: false,
  };
}

function once(st: ParseState, what: string, message: string): void {
  if (st.seen.has(what)) throw new CliError(message);
  st.seen.add(what);
}

/** One option, with the checks qemu-nbd makes while parsing. */
function applyOption(st: ParseState, key: string, value: string | undefined): void {
  const c = st.config;
  const v = value ?? '';
  switch (key) {
    case 'nocache':
    case 'cache': {
      const mode = key === 'nocache' ? 'none' : v;
      once(st, 'cache', '-n and --cache can only be specified once');
      if (!applyCacheMode(c.open, mode)) throw new CliError(`Invalid cache mode \`${mode}'`);
      return;
    }
    case 'aio':
      once(st, 'aio', '--aio can only be specified once');
      if (!applyAioMode(c.open, v)) throw new CliError(`Invalid aio mode '${v}'`);
      return;
    case 'discard':
      once(st, 'discard', '--discard can only be specified once');
      if (!applyDiscardMode(c.open, v)) throw new CliError(`Invalid discard mode \`${v}'`);
      return;
    case 'detectZeroes':
      c.detectZeroes = detectZeroesMode(v, c.open.unmap);
      return;
    default:
      applyPlainOption(st, key, v);
  }
}

function detectZeroesMode(v: string, unmap: boolean): DetectZeroes {
  if (v !== 'off' && v !== 'on' && v !== 'unmap') {
    throw new CliError(`Failed to parse detect_zeroes mode: invalid parameter value: ${v}`);
  }
  if (v === 'unmap' && !unmap) {
    throw new CliError('setting detect-zeroes to unmap is not allowed without setting discard operation to unmap');
  }
  return v;
}

function applyPlainOption(st: ParseState, key: string, v: string): void {
  const c = st.config;
  if (key === 'bind') c.bind = v;
  else if (key === 'port') c.port = v;
  else if (key === 'offset') c.offsetBytes = offsetValue(v);
  else if (key === 'loadSnapshot') ((c.snapshot = snapshotParam(v)), (c.open.readOnly = true));
  else if (key === 'readOnly') c.open.readOnly = true;
  else if (key === 'allocationDepth') c.allocationDepth = true;
  else if (key === 'bitmap') c.bitmaps.unshift(v);
  else if (key === 'socket') c.socket = socketPath(v);
  else if (key === 'shared') c.shared = sharedValue(v);
  else if (key === 'format') c.format = v;
  else if (key === 'persistent') c.persistent = true;
  else if (key === 'exportName') ((c.exportName = boundedString('export name', v)), (st.exportNameGiven = true));
  else if (key === 'description') c.description = boundedString('export description', v);
  else if (key === 'object') addObject(c, v);
  else if (key === 'tlsCreds') c.tlsCreds = v;
  else if (key === 'tlsHostname') c.tlsHostname = v;
  else if (key === 'tlsAuthz') c.tlsAuthz = v;
  else if (key === 'imageOpts') c.imageOpts = true;
  else if (key === 'fork') c.fork = true;
  else if (key === 'list') c.list = true;
  else if (key === 'pidFile') c.pidFile = v;
  else if (key === 'connect' || key === 'disconnect') st.device = true;
  else if (key === 'snapshot') throw new CliError('-s/--snapshot (a temporary overlay) is not supported by qemu-nbd-ts');
  else if (key === 'selinuxLabel') throw new CliError('SELinux support not enabled in this binary');
  // -v and -T change nothing here.
}

/** getopt's message without the program name glibc put in front (reportError adds it back). */
function glibcText(message: string): string {
  return message.startsWith(`${PROG}: `) ? message.slice(PROG.length + 2) : message;
}

/** qemu_strtou64 with base 0 (decimal, 0x hex, 0 octal), the whole word. */
function offsetValue(v: string): number {
  const word = v.trim();
  let n = NaN;
  if (/^0[xX][0-9a-fA-F]+$/.test(word)) n = parseInt(word.slice(2), 16);
  else if (/^0[0-7]*$/.test(word)) n = parseInt(word, 8);
  else if (/^[1-9][0-9]*$/.test(word)) n = Number(word);
  if (!Number.isSafeInteger(n)) throw new CliError(`Invalid offset '${v}'`);
  return n;
}

/** qemu_strtoi with base 0, not negative. */
function sharedValue(v: string): number {
  const m = /^\s*[+-]?(0[xX][0-9a-fA-F]+|[0-9]+)$/.exec(v);
  const n = m ? Number(v.trim()) : NaN;
  if (!Number.isInteger(n) || n < 0 || n > 0x7fffffff) throw new CliError(`Invalid shared device number '${v}'`);
  return n;
}

function socketPath(v: string): string {
  if (!v.startsWith('/')) throw new CliError('socket path must be absolute');
  return v;
}

function boundedString(what: string, v: string): string {
  if (Buffer.byteLength(v) > MAX_STRING_BYTES) throw new CliError(`${what} '${v}' too long`);
  return v;
}

function addObject(c: NbdCliConfig, definition: string): void {
  const help = c.objects.add(definition);
  if (help !== null) {
    process.stdout.write(help);
    throw new CliExit(0);
  }
  const spec = [...c.objects.objects.values()].at(-1)!;
  if (isTlsObjectType(spec.qomType)) c.tlsObjects.set(spec.id, createTlsObject(spec));
}

/** Finds --object's objects by id: TLS ones created, the others as given. */
export function objectLookup(c: NbdCliConfig): ObjectLookup {
  return (id) => c.tlsObjects.get(id) ?? c.objects.objects.get(id);
}

/** The operand count and list-mode conflicts, checked after the options. */
function checkOperands(st: ParseState, operands: string[]): void {
  const c = st.config;
  if (c.list) {
    if (operands.length !== 0) throw new CliError('List mode is incompatible with a file name');
    const perDevice = st.exportNameGiven || c.description !== undefined || c.offsetBytes !== 0 || st.device || c.format !== undefined;
    const more = c.snapshot !== undefined || c.bitmaps.length > 0 || c.allocationDepth || st.seen.size > 0;
    if (perDevice || more) throw new CliError('List mode is incompatible with per-device settings');
    if (c.fork) throw new CliError('List mode is incompatible with forking');
    return;
  }
  if (operands.length !== 1) throw new CliError(`Invalid number of arguments\nTry \`${PROG} --help' for more information.`);
  c.filename = operands[0];
  if (st.device) throw new CliError('Kernel /dev/nbdN support not available');
}

/** qemu-nbd's TLS checks, ending with the lookup of the credentials (nbd_get_tls_creds). */
function checkTls(c: NbdCliConfig): void {
  if (c.tlsCreds === undefined) {
    if (c.tlsAuthz !== undefined) throw new CliError('--tls-authz is not permitted without --tls-creds');
    if (c.tlsHostname !== undefined) throw new CliError('--tls-hostname is not permitted without --tls-creds');
    return;
  }
  if (c.tlsAuthz !== undefined && c.list) throw new CliError('TLS authorization is incompatible with export list');
  if (c.tlsHostname !== undefined && !c.list) throw new CliError('TLS hostname is only supported with export list');
  tlsCredsObject(c);
}

/** nbd_get_tls_creds: the --tls-creds object, credentials for the server end (the client end with -L). */
export function tlsCredsObject(c: NbdCliConfig): TlsCreds {
  try {
    return resolveTlsCreds(objectLookup(c), c.tlsCreds!, c.list ? 'client' : 'server');
  } catch (e) {
    if (e instanceof BlockError) throw new CliError(`Failed to get TLS creds: ${e.message}`);
    throw e;
  }
}
