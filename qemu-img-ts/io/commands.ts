/*
 * The command table and dispatcher (qemu-io-cmds.c: cmdinfo_t, command(),
 * qemuio_command(), help).
 *
 * A command line is split on single spaces (runs of spaces are skipped, a
 * tab is part of a word: `breakline`). The first word names a command or its
 * one-letter alias. Before a command runs the dispatcher checks, in QEMU's
 * order and with its texts: an image is open unless the command works without
 * one; the argument count is within [argmin, argmax] (argmax -1: unlimited);
 * the command's permission (write) is available. Each command then parses
 * its own flags with getopt (`parseFlags`) and returns true on success; a
 * false result makes qemu-io exit 1 at the end, but later commands still run.
 *
 * `help` lists the commands sorted by name. The table holds the commands
 * this implementation has: all of qemu-io 7.2's but `reopen`, which needs a
 * graph-level reopen the block layer does not offer yet, so it is "not
 * found" rather than faked.
 */
import { Perm } from '../../block/flags.js';
import { asBlockError } from './request.js';
import { getopt, isGetoptError } from './getopt.js';
import type { IoSession } from './session.js';

export interface IoCommand {
  readonly name: string;
  /** One-letter alias (`r` for read). */
  readonly altname?: string;
  /** Argument synopsis; absent prints nothing, `''` prints an empty field (`map  -- …`). */
  readonly args?: string;
  readonly oneline: string;
  /** Extended help printed by `help <command>` after the synopsis line. */
  readonly help?: string;
  readonly argmin: number;
  /** -1: no limit. */
  readonly argmax: number;
  /** Runs with or without an image, even when its argument count is wrong for others (help, quit). */
  readonly global?: boolean;
  /** Runs without an open image (open). */
  readonly nofileOk?: boolean;
  /** Needs write permission on the image (refused on read-only images). */
  readonly needsWrite?: boolean;
  /** Needs resize permission too, taken when the command first runs (cmdinfo_t.perm: truncate). */
  readonly needsResize?: boolean;
  /** `argv[0]` is the word the user typed (name or alias). True on success. */
  run(s: IoSession, argv: string[]): Promise<boolean>;
}

/** A command's extended help as QEMU prints it: a blank line, the lines, a blank line. */
export function helpText(...lines: string[]): string {
  return ['', ...lines, '', ''].join('\n');
}

/** qemuio_command_usage(): the synopsis line on stdout. */
export function printUsage(s: IoSession, cmd: IoCommand): void {
  s.print(`${cmd.name} ${cmd.args ?? ''} -- ${cmd.oneline}`);
}

/** Prints the usage line and fails the command. */
export function usageFailure(s: IoSession, cmd: IoCommand): false {
  printUsage(s, cmd);
  return false;
}

/**
 * The command's getopt loop: `onOption` handles each flag in order and
 * returns false when it failed (having printed why). A getopt error prints
 * glibc's message and the usage line. Returns the operands, or null.
 */
export function parseFlags(
  s: IoSession,
  cmd: IoCommand,
  argv: string[],
  spec: string,
  onOption: (key: string, arg: string) => boolean,
): string[] | null {
  const { events, operands } = getopt(argv[0]!, argv.slice(1), spec);
  for (const event of events) {
    if (isGetoptError(event)) {
      s.printErr(event.error);
      printUsage(s, cmd);
      return null;
    }
    if (!onOption(event.key, event.arg ?? '')) return null;
  }
  return operands;
}

/** breakline(): words separated by spaces, empty words dropped. */
export function breakline(line: string): string[] {
  return line.split(' ').filter((w) => w !== '');
}

export class CommandTable {
  private readonly commands: IoCommand[];

  constructor(commands: readonly IoCommand[]) {
    this.commands = [...commands, helpCommand(this), quitCommand].sort((a, b) => (a.name < b.name ? -1 : a.name > b.name ? 1 : 0));
  }

  all(): readonly IoCommand[] {
    return this.commands;
  }

  find(word: string): IoCommand | undefined {
    return this.commands.find((c) => c.name === word || c.altname === word);
  }

  /** qemuio_command(): runs one line; true unless it failed. */
  async execute(s: IoSession, line: string): Promise<boolean> {
    const argv = breakline(line);
    if (argv.length === 0) return true;
    const cmd = this.find(argv[0]!);
    if (!cmd) {
      s.printErr(`command "${argv[0]}" not found`);
      return false;
    }
    return this.dispatch(s, cmd, argv);
  }

  /** command(): the checks every command gets before it runs. */
  private async dispatch(s: IoSession, cmd: IoCommand, argv: string[]): Promise<boolean> {
    if (!cmd.global && !cmd.nofileOk && !s.blk) {
      s.printErr("no file open, try 'help open'");
      return false;
    }
    const count = argv.length - 1;
    if (count < cmd.argmin || (cmd.argmax !== -1 && count > cmd.argmax)) {
      s.printErr(argCountMessage(cmd, argv[0]!, count));
      return false;
    }
    if (cmd.needsWrite && s.blk && !s.blk.writable) {
      s.report('Block node is read-only');
      return false;
    }
    if (cmd.needsResize && s.blk && !(s.blk.root.perm & Perm.RESIZE)) {
      try {
        s.blk.setPerm(s.blk.root.perm | Perm.RESIZE, s.blk.root.shared);
      } catch (e) {
        s.report(asBlockError(e).message);
        return false;
      }
    }
    return cmd.run(s, argv);
  }
}

function argCountMessage(cmd: IoCommand, word: string, count: number): string {
  const prefix = `bad argument count ${count} to ${word}, expected`;
  if (cmd.argmax === -1) return `${prefix} at least ${cmd.argmin} arguments`;
  if (cmd.argmin === cmd.argmax) return `${prefix} ${cmd.argmin} arguments`;
  return `${prefix} between ${cmd.argmin} and ${cmd.argmax} arguments`;
}

/** help_oneline(): uses the word the user typed, so `help r` prints `r [-abCqv] …`. */
function helpLine(word: string, cmd: IoCommand): string {
  return `${word} ${cmd.args !== undefined ? `${cmd.args} ` : ''}-- ${cmd.oneline}`;
}

function helpCommand(table: CommandTable): IoCommand {
  return {
    name: 'help',
    altname: '?',
    args: '[command]',
    oneline: 'help for one or all commands',
    argmin: 0,
    argmax: 1,
    global: true,
    async run(s, argv) {
      if (argv.length < 2) {
        for (const cmd of table.all()) s.print(helpLine(cmd.name, cmd));
        s.print("\nUse 'help commandname' for extended help.");
        return true;
      }
      const cmd = table.find(argv[1]!);
      if (!cmd) {
        s.print(`command ${argv[1]} not found`);
        return false;
      }
      s.print(helpLine(argv[1]!, cmd));
      if (cmd.help !== undefined) s.output.stdout(cmd.help);
      return true;
    },
  };
}

const quitCommand: IoCommand = {
  name: 'quit',
  altname: 'q',
  oneline: 'exit the program',
  argmin: 0,
  argmax: -1,
  global: true,
  async run(s) {
    s.quit = true;
    return true;
  },
};
