/*
 * qemu-io's debugging commands: blkdebug breakpoints (break, remove_break,
 * resume, wait_break), abort and sigraise.
 *
 * No driver here supports breakpoints (blkdebug has limits, not rules), so
 * the breakpoint commands answer as QEMU does for a graph without one:
 * `Could not set breakpoint: Operation not supported`. Where QEMU's
 * wait_break would then wait forever for a request that can never stop,
 * this one fails at once with an error_report line instead.
 *
 * abort raises SIGABRT (exit 134, no output, like abort(3)); sigraise raises
 * the signal after stdout and stderr are written (writes here are
 * synchronous), so `sigraise 15` ends the run with status 143.
 */
import { strerror } from '../../block/errors.js';
import { helpText, type IoCommand } from './commands.js';
import type { IoSession } from './session.js';

/** glibc's NSIG: signal numbers above it are refused. */
const NSIG = 65;
/** How long sigraise blocks so a fatal signal ends the run before the next command. */
const SIGNAL_DELIVERY_WAIT_MS = 20;

function unsupported(s: IoSession, text: string): false {
  s.print(`${text}: ${strerror('ENOTSUP')}`);
  return false;
}

export const breakCommand: IoCommand = {
  name: 'break',
  args: 'event tag',
  oneline: 'sets a breakpoint on event and tags the stopped request as tag',
  argmin: 2,
  argmax: 2,
  run: async (s) => unsupported(s, 'Could not set breakpoint'),
};

export const removeBreakCommand: IoCommand = {
  name: 'remove_break',
  args: 'tag',
  oneline: 'remove a breakpoint by tag',
  argmin: 1,
  argmax: 1,
  run: async (s, argv) => unsupported(s, `Could not remove breakpoint ${argv[1]}`),
};

export const resumeCommand: IoCommand = {
  name: 'resume',
  args: 'tag',
  oneline: 'resumes the request tagged as tag',
  argmin: 1,
  argmax: 1,
  run: async (s) => unsupported(s, 'Could not resume request'),
};

export const waitBreakCommand: IoCommand = {
  name: 'wait_break',
  args: 'tag',
  oneline: 'waits for the suspension of a request',
  argmin: 1,
  argmax: 1,
  async run(s, argv) {
    s.report(`request '${argv[1]}' can never be suspended: no node supports breakpoints`);
    return false;
  },
};

export const abortCommand: IoCommand = {
  name: 'abort',
  oneline: 'simulate a program crash using abort(3)',
  argmin: 0,
  argmax: 0,
  nofileOk: true,
  async run() {
    process.kill(process.pid, 'SIGABRT');
    return new Promise<never>(() => undefined);
  },
};

async function sigraiseF(s: IoSession, argv: string[]): Promise<boolean> {
  const sig = s.num(argv[1]!);
  if (sig === null) return false;
  if (sig > NSIG) {
    s.print(`signal argument '${argv[1]}' is too large to be a valid signal`);
    return false;
  }
  try {
    process.kill(process.pid, sig);
  } catch {
    // raise() of a number the kernel refuses fails quietly in QEMU too.
  }
  // raise() acts before it returns; give the kernel time to deliver to one of Node's threads.
  Atomics.wait(new Int32Array(new SharedArrayBuffer(4)), 0, 0, SIGNAL_DELIVERY_WAIT_MS);
  return true;
}

export const sigraiseCommand: IoCommand = {
  name: 'sigraise',
  args: 'signal',
  oneline: 'raises a signal',
  help: helpText(
    ' raises the given signal',
    '',
    ' Example:',
    " 'sigraise 15' - raises SIGTERM",
    '',
    ' Invokes raise(signal), where "signal" is the mandatory integer argument',
    ' given to sigraise.',
  ),
  argmin: 1,
  argmax: 1,
  nofileOk: true,
  run: sigraiseF,
};
