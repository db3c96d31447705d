/*
 * What every command-line tool here shares: where text goes and how errors
 * and warnings reach the user.
 *
 * QEMU's tools print `prog: message` on stderr and exit 1 (usage errors add
 * "Try 'prog --help' for more information"). A user error is never a stack
 * trace: `runMain` turns CliError and BlockError into that one line with the
 * right exit status; anything else is a bug and is reported as one line too,
 * with the stack only when QEMU_BLOCK_TS_DEBUG=1. Block-layer warnings are
 * warn_report's `prog: warning: message`, except the few QEMU prints with
 * fprintf (raw's probing WARNING), which come verbatim.
 *
 * Both tools ignore SIGPIPE in QEMU and never check printf, so when the
 * reader of stdout goes away (`| head`) the command runs to its end and
 * exits with its own status. `processOutput` does the same: after a failed
 * write to stdout (EPIPE, or any other error) stdout output is dropped.
 */
import { BlockError } from '../block/errors.js';

/** A user-facing failure with QEMU's exit status. */
export class CliError extends Error {
  constructor(
    message: string,
    readonly exitCode = 1,
    /** Append "Try 'prog --help' for more information". */
    readonly usage = false,
  ) {
    super(message);
  }
}

/** Thrown to end the program quietly with a status (e.g. after printing help). */
export class CliExit extends Error {
  constructor(readonly exitCode: number) {
    super(`exit ${exitCode}`);
  }
}

export function usageError(message: string): CliError {
  return new CliError(message, 1, true);
}

/**
 * A failure of a command's work on an open image, printed at once as
 * qemu-img's error_report does, before the image is closed (the close may
 * print its own reports after it). Returns what to throw instead: a
 * CliExit with the status. Usage errors and anything that is not a
 * CliError or BlockError pass through. `text` words a BlockError (default:
 * its message).
 */
export function reportedNow(
  warn: (message: string, opts: { error: true }) => void,
  e: unknown,
  text: (e: BlockError) => string = (b) => b.message,
): unknown {
  if (e instanceof CliError && !e.usage) {
    warn(e.message, { error: true });
    return new CliExit(e.exitCode);
  }
  if (e instanceof BlockError) {
    warn(text(e), { error: true });
    return new CliExit(1);
  }
  return e;
}

/**
 * Closes after the work. When the work failed, a failed close (often the
 * same ENOSPC) is not raised again: the close printed its own reports, and
 * the work's failure, reported already, sets the exit status.
 */
export async function closeAfterWork(workFailed: boolean, close: () => Promise<void>): Promise<void> {
  try {
    await close();
  } catch (e) {
    if (!workFailed) throw e;
  }
}

/** Where a tool's text goes (injected, so tests can capture it). */
export interface Output {
  stdout(text: string): void;
  stderr(text: string): void;
}

/** The process's stdout and stderr; stdout output stops quietly once a write to it has failed. */
export function processOutput(): Output {
  let stdoutFailed = false;
  process.stdout.on('error', () => {
    stdoutFailed = true;
  });
  return {
    stdout(text) {
      if (!stdoutFailed) process.stdout.write(text);
    },
    stderr(text) {
      process.stderr.write(text);
    },
  };
}

/** A block-layer warning (BlockGraph.onWarning) as printed: verbatim, `prog: message` (error), or `prog: warning: message`. */
export function warningText(prog: string, message: string, opts?: { verbatim?: boolean; error?: boolean }): string {
  if (opts?.verbatim) return message;
  return opts?.error ? `${prog}: ${message}\n` : `${prog}: warning: ${message}\n`;
}

/** Writes `prog: message` to stderr (QEMU's error_report). */
export function reportError(prog: string, message: string): void {
  process.stderr.write(`${prog}: ${message}\n`);
}

/** Runs a tool's main, mapping failures to QEMU's messages and exit codes. */
export function runMain(prog: string, main: (argv: string[]) => Promise<number>): void {
  main(process.argv.slice(2)).then(
    (code) => {
      process.exitCode = code;
    },
    (e: unknown) => {
      process.exitCode = reportFailure(prog, e);
    },
  );
}

/** Prints a failure and returns the exit status for it. */
export function reportFailure(prog: string, e: unknown): number {
  if (e instanceof CliExit) return e.exitCode;
  if (e instanceof CliError) {
    reportError(prog, e.message);
    if (e.usage) process.stderr.write(`Try '${prog} --help' for more information\n`);
    return e.exitCode;
  }
  if (e instanceof BlockError) {
    reportError(prog, e.message);
    return 1;
  }
  const err = e as Error;
  reportError(prog, `internal error: ${err?.message ?? String(e)}`);
  if (process.env.QEMU_BLOCK_TS_DEBUG === '1' && err?.stack) process.stderr.write(`${err.stack}\n`);
  return 1;
}
