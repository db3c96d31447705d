#!/usr/bin/env node
/*
 * qemu-nbd-ts: exports one image over NBD like QEMU 7.2's qemu-nbd, or
 * lists another server's exports (-L). The command line is in nbd/args.ts,
 * the server's life in nbd/serve.ts, the listing in nbd/list.ts; the
 * protocol itself is the library's (../nbd/).
 */
import './zod-jitless.js';
import { CliExit, processOutput, reportFailure } from './cli-common.js';
import { PROG, parseNbdArgs, type NbdCliConfig } from './nbd/args.js';
import { listExports } from './nbd/list.js';
import { serve } from './nbd/serve.js';
import { nbdBitmapContexts, nbdServerTls } from './nbd/wiring.js';
import { helpText, versionText } from './nbd/help.js';

async function main(args: string[]): Promise<number> {
  const out = processOutput();
  const parsed = parseNbdArgs(args);
  if (parsed.kind === 'help') return (out.stdout(helpText()), 0);
  if (parsed.kind === 'version') return (out.stdout(versionText()), 0);
  const config: NbdCliConfig = parsed.config;
  if (config.list) return listExports(config, out);
  return serve(config, out, { serverTls: nbdServerTls, bitmapContexts: nbdBitmapContexts });
}

// A server's sockets and timers may outlive main by design (a client being
// dropped); once main is done the process ends with its status. stdout and
// stderr are synchronous for files, pipes and terminals on Linux, so
// nothing printed is lost.
main(process.argv.slice(2)).then(
  (code) => process.exit(code),
  (e: unknown) => process.exit(e instanceof CliExit ? e.exitCode : reportFailure(PROG, e)),
);
