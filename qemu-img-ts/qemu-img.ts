#!/usr/bin/env node
/*
 * qemu-img-ts: the qemu-img command line (QEMU 7.2's qemu-img.c main()).
 *
 * Global options come first and stop at the command name (getopt "+:hVT:"):
 * -h/--help prints the help, -V/--version the version, both with status 0;
 * -T/--trace is accepted and ignored (there are no trace events here). No
 * command is "Not enough arguments"; an unknown one is "Command not found".
 * Command names are case-sensitive.
 *
 * The commands are declared with commander (program, subcommands, options,
 * help text) and each lives in one file under img/; their arguments are read
 * with GetoptLong so that permutation, prefixes and error texts are
 * qemu-img's. Every message goes out as "qemu-img: …" whatever the
 * program is called, with exit status 1; usage errors add the
 * "Try 'qemu-img --help'" line. Output after the reader of stdout has gone
 * (`| head`) is dropped and the command ends with its own status
 * (cli-common's processOutput).
 */
import './zod-jitless.js';
import fs from 'node:fs';
import { Command, Option } from 'commander';
import { BlockGraph } from '../block/graph.js';
import { builtinDrivers } from '../drivers/index.js';
import { processOutput, runMain, usageError, warningText } from './cli-common.js';
import { amendCommand } from './img/amend.js';
import { bitmapCommand } from './img/bitmap.js';
import { checkCommand } from './img/check.js';
import { commitCommand } from './img/commit.js';
import { compareCommand } from './img/compare.js';
import { convertCommand } from './img/convert.js';
import { PROG, type ImgCommand, type ImgContext } from './img/command.js';
import { createCommand } from './img/create.js';
import { ddCommand } from './img/dd.js';
import { GetoptLong } from './img/getopt.js';
import { infoCommand } from './img/info.js';
import { mapCommand } from './img/map.js';
import { measureCommand } from './img/measure.js';
import { ObjectRegistry } from '../block/objects.js';
import { snapshotCommand } from './img/snapshot.js';
import { rebaseCommand } from './img/rebase.js';
import { resizeCommand } from './img/resize.js';

/** The subcommands, in the order the help lists them. */
const COMMANDS: readonly ImgCommand[] = [amendCommand, bitmapCommand, checkCommand, commitCommand, compareCommand, convertCommand, createCommand, ddCommand, infoCommand, mapCommand, measureCommand, snapshotCommand, rebaseCommand, resizeCommand];

/** Column where the descriptions of the standard options start. */
const HELP_TERM_COLUMNS = 22;

const GLOBAL_OPTIONS = [
  new Option('-h, --help', 'display this help and exit'),
  new Option('-V, --version', 'output version information and exit'),
  new Option('-T, --trace <spec>', 'accepted for compatibility; there are no trace events'),
];

function packageVersion(): string {
  try {
    const pkg = JSON.parse(fs.readFileSync(new URL('../../package.json', import.meta.url), 'utf8')) as { version?: string };
    return pkg.version ?? 'unknown';
  } catch {
    return 'unknown';
  }
}

function versionText(): string {
  return `qemu-img-ts version ${packageVersion()} (compatible with qemu-img 7.2)\n`;
}

function buildProgram(): Command {
  const program = new Command(PROG)
    .usage('[standard options] command [command options]')
    .helpOption(false)
    .helpCommand(false);
  for (const o of GLOBAL_OPTIONS) program.addOption(o);
  for (const c of COMMANDS) program.addCommand(c.command);
  return program;
}

function helpText(program: Command, graph: BlockGraph): string {
  const help = program.createHelp();
  const standard = help
    .visibleOptions(program)
    .map((o) => `  ${help.optionTerm(o).padEnd(HELP_TERM_COLUMNS)}${help.optionDescription(o)}\n`)
    .join('');
  const syntax = COMMANDS.map((c) => `  ${c.command.name()} ${c.command.usage()}\n`).join('');
  const details = COMMANDS.map((c) => c.command.helpInformation()).join('\n');
  return (
    versionText() +
    `usage: ${PROG} ${program.usage()}\nQEMU disk image utility\n\n` +
    `Standard options:\n${standard}\nCommand syntax:\n${syntax}\n${details}\n` +
    `Supported formats: ${graph.driverNames().sort().join(' ')}\n`
  );
}

async function main(args: string[]): Promise<number> {
  const program = buildProgram();
  const graph = new BlockGraph(builtinDrivers);
  // Commands issue one request at a time: host I/O on this thread saves a
  // hand-off per request. A command that overlaps requests turns this off.
  graph.syncIo = true;
  const output = processOutput();
  graph.onWarning = (message, opts) => output.stderr(warningText(PROG, message, opts));
  const out = (text: string) => output.stdout(text);
  const argv = [PROG, ...args];
  const getopt = new GetoptLong(argv, program.options, true);
  for (const opt of getopt) {
    if (opt.key === 'help') return (out(helpText(program, graph)), 0);
    if (opt.key === 'version') return (out(versionText()), 0);
  }
  const [name, ...rest] = getopt.operands();
  if (name === undefined) throw usageError('Not enough arguments');
  const cmd = COMMANDS.find((c) => c.command.name() === name);
  if (!cmd) throw usageError(`Command not found: ${name}`);
  const ctx: ImgContext = { graph, objects: new ObjectRegistry(), out, helpText: () => helpText(program, graph) };
  graph.objects = ctx.objects.objects;
  return cmd.run(ctx, [name, ...rest]);
}

runMain(PROG, main);
