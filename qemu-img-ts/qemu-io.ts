#!/usr/bin/env node
/*
 * qemu-io-ts: QEMU's disk exerciser over this block layer. Same command
 * line, commands, output lines, streams and exit statuses as qemu-io 7.2;
 * the behaviour lives in io/ (see io/cmdline.ts for the command line and
 * io/commands.ts for the command table).
 * Output goes through cli-common's processOutput, so a reader that goes
 * away (`qemu-io-ts … | head`) ends output quietly, as in QEMU.
 */
import './zod-jitless.js';
import { builtinDrivers } from '../drivers/index.js';
import { processOutput, runMain } from './cli-common.js';
import { aioFlushCommand, aioReadCommand, aioWriteCommand } from './io/aio.js';
import { qemuIoMain } from './io/cmdline.js';
import { CommandTable } from './io/commands.js';
import { allocCommand, discardCommand, flushCommand, infoCommand, lengthCommand, mapCommand, sleepCommand, truncateCommand } from './io/misc.js';
import { abortCommand, breakCommand, removeBreakCommand, resumeCommand, sigraiseCommand, waitBreakCommand } from './io/debug.js';
import { closeCommand, openCommand } from './io/open.js';
import { readCommand, writeCommand } from './io/rw.js';
import { PROG } from './io/session.js';
import { readvCommand, writevCommand } from './io/vector.js';

/** Every command qemu-io-ts offers (help, quit are added by the table). */
export const QEMU_IO_COMMANDS = [
  readCommand,
  readvCommand,
  writeCommand,
  writevCommand,
  aioReadCommand,
  aioWriteCommand,
  aioFlushCommand,
  discardCommand,
  flushCommand,
  truncateCommand,
  lengthCommand,
  infoCommand,
  mapCommand,
  allocCommand,
  sleepCommand,
  openCommand,
  closeCommand,
  breakCommand,
  removeBreakCommand,
  resumeCommand,
  waitBreakCommand,
  abortCommand,
  sigraiseCommand,
];

runMain(PROG, (argv) =>
  qemuIoMain(argv, {
    output: processOutput(),
    drivers: builtinDrivers,
    table: new CommandTable(QEMU_IO_COMMANDS),
    stdin: process.stdin,
    stdinIsTerminal: process.stdin.isTTY === true,
  }),
);
