#!/usr/bin/env node
/*
 * qemu-storage-daemon-ts: QEMU 7.2's qemu-storage-daemon — block nodes,
 * NBD exports and jobs, driven by its command line and over QMP monitors
 * (qmp/). The options are read with getopt and acted on in order
 * (qsd/options.ts); then the pid file is written, a --daemonize parent
 * returns, and the daemon runs until `quit` or SIGTERM/SIGINT/SIGHUP,
 * which close everything cleanly (qmp/daemon.ts). Exit status 0 after a
 * clean stop, 1 for a bad command line.
 */
import './zod-jitless.js';
import fs from 'node:fs';
import path from 'node:path';
import { BlockError } from '../block/errors.js';
import { QmpError } from '../qmp/command.js';
import { Daemon } from '../qmp/daemon.js';
import { QapiInputError } from '../qmp/qapi-errors.js';
import { packageVersion } from '../qmp/version.js';
import { Getopt, type LongOption } from './getopt.js';
import { FORKED_ENV, forkServer, reportReady } from './nbd/serve.js';
import { OptionProcessor } from './qsd/options.js';
import { QSD_HELP } from './qsd/help.js';
import { warningText } from './cli-common.js';

const PROG = 'qemu-storage-daemon';
const STOP_SIGNALS = ['SIGTERM', 'SIGINT', 'SIGHUP'] as const;

const LONG_OPTIONS: LongOption[] = [
  { name: 'blockdev', hasArg: true, key: 'blockdev' },
  { name: 'chardev', hasArg: true, key: 'chardev' },
  { name: 'daemonize', hasArg: false, key: 'daemonize' },
  { name: 'export', hasArg: true, key: 'export' },
  { name: 'help', hasArg: false, key: 'h' },
  { name: 'monitor', hasArg: true, key: 'monitor' },
  { name: 'nbd-server', hasArg: true, key: 'nbd-server' },
  { name: 'object', hasArg: true, key: 'object' },
  { name: 'pidfile', hasArg: true, key: 'pidfile' },
  { name: 'trace', hasArg: true, key: 'T' },
  { name: 'version', hasArg: false, key: 'V' },
];

class StartupError extends Error {}

function isUserError(e: unknown): e is Error {
  return e instanceof BlockError || e instanceof QmpError || e instanceof QapiInputError;
}

/** Reads and applies the options; returns an exit status to stop with, or null to run. */
async function processOptions(argv: string[], opts: OptionProcessor, d: Daemon): Promise<number | null> {
  const getopt = new Getopt([PROG, ...argv], '+hT:V', LONG_OPTIONS);
  for (const e of getopt) {
    if (e.kind === 'error') throw new StartupError(e.message.slice(PROG.length + 2));
    if (e.key === 'h') return (process.stdout.write(QSD_HELP), 0);
    if (e.key === 'V') return (process.stdout.write(`${PROG}-ts version ${packageVersion()} (compatible with ${PROG} 7.2)\n`), 0);
    if (e.key === 'daemonize') opts.setup.daemonize = true;
    if (e.key === 'T' || e.arg === undefined) continue;
    try {
      if ((await opts.apply(e.key, e.arg)) === 'exit') return 0;
    } catch (err) {
      if (isUserError(err)) throw new StartupError(`--${e.key} ${e.arg}: ${err.message}`);
      throw err;
    }
  }
  const operand = getopt.operands()[0];
  if (operand !== undefined) throw new StartupError(`${operand}: Unexpected argument`);
  void d;
  return null;
}

function writePidFile(file: string): void {
  try {
    fs.writeFileSync(path.resolve(file), `${process.pid}\n`);
  } catch (e) {
    const reason = (e as NodeJS.ErrnoException).code === 'ENOENT' ? 'No such file or directory' : (e as Error).message;
    throw new StartupError(`cannot create PID file: Could not create '${file}': ${reason}`);
  }
}

async function main(argv: string[]): Promise<number> {
  const forking = argv.includes('--daemonize') && process.env[FORKED_ENV] === undefined;
  if (forking && !argv.some((a) => a === '-h' || a === '--help' || a === '-V' || a === '--version')) return forkServer();
  const d = new Daemon();
  d.log = (message) => process.stderr.write(`${PROG}: ${message}\n`);
  d.graph.onWarning = (message, opts) => process.stderr.write(warningText(PROG, message, opts));
  const opts = new OptionProcessor(d);
  try {
    const status = await processOptions(argv, opts, d);
    if (status !== null) {
      await d.shutdown();
      return status;
    }
    if (opts.setup.pidFile !== undefined) {
      writePidFile(opts.setup.pidFile);
      d.pidFile = opts.setup.pidFile;
    }
  } catch (e) {
    await d.shutdown();
    if (e instanceof StartupError) {
      process.stderr.write(`${PROG}: ${e.message}\n`);
      return 1;
    }
    throw e;
  }
  for (const sig of STOP_SIGNALS) process.on(sig, () => void d.shutdown());
  d.serveMonitors();
  reportReady();
  // As qemu-storage-daemon's os_setup_post: a daemon does not hold its start directory; later relative names resolve from /.
  if (process.env[FORKED_ENV] !== undefined) process.chdir('/');
  await d.stopped;
  return 0;
}

main(process.argv.slice(2)).then(
  (code) => process.exit(code),
  (e: unknown) => {
    process.stderr.write(`${PROG}: internal error: ${(e as Error)?.message ?? String(e)}\n`);
    process.exit(1);
  },
);
