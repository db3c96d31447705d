/*
 * qemu-io's command loop (qemu-io.c command_loop).
 *
 * With -c commands, they run in order and stdin is never read; a failing
 * command does not stop the next one, `quit` does. Without -c, lines are
 * read from stdin: when stdin is not a terminal the prompt `qemu-io> ` is
 * written to stdout (no newline) before every read, including the one that
 * meets end of file; on a terminal, readline edits the line and Ctrl-D ends
 * the session with a newline. The result is true when every command
 * succeeded (qemu-io exits 0), else false (exit 1).
 */
import readline from 'node:readline';
import type { CommandTable } from './commands.js';
import { PROG, type IoSession } from './session.js';

export const PROMPT = `${PROG}> `;

/** Runs the -c commands; true if none failed. */
export async function runCommands(s: IoSession, table: CommandTable, commands: readonly string[]): Promise<boolean> {
  let ok = true;
  for (const line of commands) {
    if (s.quit) break;
    if (!(await table.execute(s, line))) ok = false;
  }
  return ok;
}

/** Reads and runs commands from `input` until end of file or `quit`; true if none failed. */
export async function runInteractive(s: IoSession, table: CommandTable, input: NodeJS.ReadableStream, isTerminal: boolean): Promise<boolean> {
  const rl = readline.createInterface(isTerminal ? { input, output: process.stdout, terminal: true, prompt: PROMPT } : { input, terminal: false });
  const lines = rl[Symbol.asyncIterator]();
  let ok = true;
  try {
    while (!s.quit) {
      if (isTerminal) rl.prompt();
      else s.output.stdout(PROMPT);
      const next = await lines.next();
      if (next.done) {
        if (isTerminal) s.output.stdout('\n');
        break;
      }
      if (!(await table.execute(s, next.value))) ok = false;
    }
  } finally {
    rl.close();
  }
  return ok;
}
