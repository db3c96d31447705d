/*
 * qemu-io's own command line (qemu-io.c main): options, the image, then the
 * command loop.
 *
 * Options are glibc getopt_long's (permuted, clustered, abbreviable long
 * names). A bad option prints glibc's message on stderr and the usage text
 * on stdout and exits 1, as does more than one image argument; -h prints the
 * usage and exits 0; -V the version. Settings errors (-t, -d, -i) and
 * `--image-opts` with `-f` are `qemu-io: …` errors, exit 1. An image that
 * does not open ends the run with exit 1 before any command. Afterwards the
 * image is closed (flushed) and the status is 1 if any command failed.
 */
import type { BlockDriver } from '../../block/driver.js';
import type { CommandTable } from './commands.js';
import { getopt, isGetoptError, type LongOption } from './getopt.js';
import { runCommands, runInteractive } from './loop.js';
import { applyOpenFlag, defaultOpenSettings, openFile, parseQemuOpts, type OpenSettings } from './open.js';
import { IoSession, PROG, type Output } from './session.js';

const SHORT_OPTIONS = 'hVc:d:f:rsnCmki:t:T:U';
const OBJECT_KEY = 'object';
const IMAGE_OPTS_KEY = 'image-opts';

/** The long options in QEMU's table order (ambiguity messages list them in this order). */
const LONG_OPTIONS: readonly LongOption[] = [
  { name: 'help', hasArg: false, key: 'h' },
  { name: 'version', hasArg: false, key: 'V' },
  { name: 'cmd', hasArg: true, key: 'c' },
  { name: 'format', hasArg: true, key: 'f' },
  { name: 'read-only', hasArg: false, key: 'r' },
  { name: 'snapshot', hasArg: false, key: 's' },
  { name: 'nocache', hasArg: false, key: 'n' },
  { name: 'copy-on-read', hasArg: false, key: 'C' },
  { name: 'misalign', hasArg: false, key: 'm' },
  { name: 'native-aio', hasArg: false, key: 'k' },
  { name: 'aio', hasArg: true, key: 'i' },
  { name: 'discard', hasArg: true, key: 'd' },
  { name: 'cache', hasArg: true, key: 't' },
  { name: 'trace', hasArg: true, key: 'T' },
  { name: 'object', hasArg: true, key: OBJECT_KEY },
  { name: 'image-opts', hasArg: false, key: IMAGE_OPTS_KEY },
  { name: 'force-share', hasArg: false, key: 'U' },
];

const USAGE = `Usage: ${PROG} [OPTIONS]... [-c STRING]... [file]
QEMU Disk exerciser

  --object OBJECTDEF   define an object such as 'secret' for
                       passwords and/or encryption keys
  --image-opts         treat file as option string
  -c, --cmd STRING     execute command with its arguments
                       from the given string
  -f, --format FMT     specifies the block driver to use
  -r, --read-only      export read-only
  -s, --snapshot       use snapshot file
  -n, --nocache        disable host cache, short for -t none
  -C, --copy-on-read   enable copy-on-read
  -m, --misalign       misalign allocations for O_DIRECT
  -k, --native-aio     use kernel AIO implementation
                       (Linux only, prefer use of -i)
  -i, --aio=MODE       use AIO mode (threads, native or io_uring)
  -t, --cache=MODE     use the given cache mode for the image
  -d, --discard=MODE   use the given discard mode for the image
  -T, --trace [[enable=]<pattern>][,events=<file>][,file=<file>]
                       specify tracing options
                       see qemu-img(1) man page for full description
  -U, --force-share    force shared permissions
  -h, --help           display this help and exit
  -V, --version        output version information and exit

See '${PROG} -c help' for information on available commands.

See <https://qemu.org/contribute/report-a-bug> for how to report bugs.
More information on the QEMU project at <https://qemu.org>.
`;

/** The QEMU release whose qemu-io this one copies. */
export const QEMU_IO_COMPAT_VERSION = '7.2.0';
const VERSION = `${PROG} version ${QEMU_IO_COMPAT_VERSION} (qemu-block-ts)
Copyright (c) 2003-2022 Fabrice Bellard and the QEMU Project developers
`;

interface Invocation {
  settings: OpenSettings;
  format: string | null;
  commands: string[];
  objects: string[];
  operands: string[];
}

export interface IoEnvironment {
  output: Output;
  drivers: readonly BlockDriver[];
  table: CommandTable;
  stdin: NodeJS.ReadableStream;
  stdinIsTerminal: boolean;
}

/** Parses argv into the session's settings; a number is the exit status to stop with (after printing). */
function parseCommandLine(s: IoSession, argv: readonly string[]): Invocation | number {
  const inv: Invocation = { settings: defaultOpenSettings(), format: null, commands: [], objects: [], operands: [] };
  const { events, operands } = getopt(PROG, argv, SHORT_OPTIONS, LONG_OPTIONS);
  for (const event of events) {
    if (isGetoptError(event)) {
      s.printErr(event.error);
      s.output.stdout(USAGE);
      return 1;
    }
    const arg = event.arg ?? '';
    if (event.key === 'h' || event.key === 'V') {
      s.output.stdout(event.key === 'h' ? USAGE : VERSION);
      return 0;
    }
    if (event.key === 'c') inv.commands.push(arg);
    else if (event.key === 'f') inv.format = arg;
    else if (event.key === OBJECT_KEY) inv.objects.push(arg);
    else if (event.key === IMAGE_OPTS_KEY) s.imageOpts = true;
    else if (!applyOpenFlag(s, inv.settings, event.key, arg)) return 1;
  }
  inv.operands = operands;
  return checkInvocation(s, inv);
}

/** The checks main() makes after getopt. */
function checkInvocation(s: IoSession, inv: Invocation): Invocation | number {
  if (inv.operands.length > 1) {
    s.output.stdout(USAGE);
    return 1;
  }
  const problem =
    inv.format !== null && s.imageOpts ? '--image-opts and -f are mutually exclusive'
    : inv.objects.length > 0 ? '--object is not supported by qemu-block-ts'
    : null;
  if (problem) {
    s.report(problem);
    return 1;
  }
  return inv;
}

/** Opens the image named on the command line, if any; false when it did not open. */
async function openFromCommandLine(s: IoSession, inv: Invocation): Promise<boolean> {
  const image = inv.operands[0];
  if (image === undefined) return true;
  const pairs = new Map<string, string>();
  if (s.imageOpts) {
    return parseQemuOpts(s, image, pairs, false) && openFile(s, null, inv.settings, pairs);
  }
  if (inv.format !== null) pairs.set('driver', inv.format);
  return openFile(s, image, inv.settings, pairs);
}

/** qemu-io's main: returns the exit status. */
export async function qemuIoMain(argv: readonly string[], env: IoEnvironment): Promise<number> {
  const s = new IoSession(env.output, env.drivers);
  const inv = parseCommandLine(s, argv);
  if (typeof inv === 'number') return inv;
  if (!(await openFromCommandLine(s, inv))) return 1;
  try {
    const ok = inv.commands.length > 0
      ? await runCommands(s, env.table, inv.commands)
      : await runInteractive(s, env.table, env.stdin, env.stdinIsTerminal);
    return ok ? 0 : 1;
  } finally {
    await s.closeImage().catch(() => undefined);
  }
}
