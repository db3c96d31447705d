/*
 * qemu-nbd's server life (QEMU 7.2's qemu-nbd.c main after parsing): open
 * the image, export it, listen, and run until told to stop.
 *
 * Order, as qemu-nbd: open the image ("Failed to blk_new_open 'F': …"),
 * wrap it in a raw window for -o, load -l's snapshot, export it
 * (name, description, writable unless -r, writethrough for the cache modes
 * that ask for it, allocation depth, bitmaps), listen (TCP or -k's unix
 * socket), write --pid-file, then serve.
 *
 * Stopping: without -t the server stops when the last client that
 * finished negotiation disconnects (with -e 1, the default, after the
 * first client); SIGTERM, SIGINT and SIGHUP stop it too. Stopping closes
 * the export (flushing the image) and removes the unix socket; the status
 * is 0.
 *
 * --fork: the parent starts the server as a detached child (its own
 * session, stdout to /dev/null, stderr shared) and waits for it to report
 * ready or to exit; it then exits 0, or 1 if the child failed (the child
 * printed why). qemu-nbd's parent relays the child's stderr through a pipe
 * to learn the same.
 */
import fs from 'node:fs';
import path from 'node:path';
import type { OptionTree } from '../../block/keyval.js';
import { BlockError } from '../../block/errors.js';
import { BlockGraph } from '../../block/graph.js';
import { parseKeyval } from '../../block/keyval.js';
import type { BlockNode } from '../../block/node.js';
import { loadSnapshotTmp } from '../../block/snapshot-tmp.js';
import { builtinDrivers } from '../../drivers/index.js';
import type { NbdExportOptions } from '../../nbd/export.js';
import { NbdServer, listenFailure, type NbdAddress } from '../../nbd/server.js';
import type { NbdServerTls } from '../../nbd/tls.js';
import { CliError, warningText, type Output } from '../cli-common.js';
import { PROG, type NbdCliConfig } from './args.js';

/** Set in a --fork child's environment; its value is unused. */
export const FORKED_ENV = 'QEMU_NBD_TS_FORKED';
/** Signals that stop the server cleanly. */
const STOP_SIGNALS = ['SIGTERM', 'SIGINT', 'SIGHUP'] as const;
const MAX_PORT = 65535;

/** What the command line needs besides the config: TLS and bitmaps come from other layers. */
export interface ServeHooks {
  /** Server TLS from --tls-creds/--tls-authz, or null without --tls-creds. */
  serverTls(config: NbdCliConfig): Promise<NbdServerTls | null>;
  /** The export's `qemu:dirty-bitmap:NAME` contexts for -B, and what releases their bitmaps when it closes. */
  bitmapContexts(node: BlockNode, names: readonly string[], readOnly: boolean): Pick<NbdExportOptions, 'bitmapContexts' | 'onClose'>;
}

/** Runs the server until it stops; resolves with the exit status. */
export async function serve(config: NbdCliConfig, out: Output, hooks: ServeHooks): Promise<number> {
  if (config.fork && process.env[FORKED_ENV] === undefined) return forkServer();
  const tls = await hooks.serverTls(config);
  const graph = new BlockGraph(builtinDrivers);
  graph.onWarning = (message, opts) => out.stderr(warningText(PROG, message, opts));
  const stopped = new Deferred();
  const server = new NbdServer({
    maxConnections: config.shared,
    tls,
    log: (message) => out.stderr(`${PROG}: ${message}\n`),
    onClientClosed: ({ negotiated, remaining }) => {
      if (negotiated && remaining === 0 && !config.persistent) stopped.resolve();
    },
  });
  try {
    const node = await openExported(graph, config);
    server.createExport(graph, node, exportOptions(config, node, hooks));
    await listen(server, config);
    if (config.pidFile !== undefined) writePidFile(config.pidFile);
  } catch (e) {
    // qemu-nbd's atexit handler closes the image even when it fails: its bitmaps are stored, not left in use.
    await server.close().catch(() => undefined);
    await graph.closeAll().catch(() => undefined);
    throw e;
  }
  for (const sig of STOP_SIGNALS) process.on(sig, () => stopped.resolve());
  reportReady();
  await stopped.promise;
  await server.close();
  await graph.closeAll();
  return 0;
}

/** The image as qemu-nbd opens it, with -o's window and -l's snapshot. */
async function openExported(graph: BlockGraph, c: NbdCliConfig): Promise<BlockNode> {
  const filename = c.filename!;
  const flags = { direct: c.open.direct, noFlush: c.open.noFlush, unmap: c.open.unmap };
  const options: OptionTree = { 'detect-zeroes': c.detectZeroes };
  let node: BlockNode;
  try {
    if (c.imageOpts) {
      if (c.format !== undefined) throw new CliError('--image-opts and -f are mutually exclusive');
      node = await graph.openOptions({ ...parseKeyval(filename, 'file'), ...options }, { ...flags, readOnly: c.open.readOnly });
    } else {
      node = await graph.openImage(filename, { format: c.format, readOnly: c.open.readOnly, inherit: flags, options });
    }
  } catch (e) {
    if (e instanceof BlockError) throw new CliError(`Failed to blk_new_open '${filename}': ${e.message}`);
    throw e;
  }
  if (c.offsetBytes !== 0) {
    node = await graph.openOptions({ driver: 'raw', file: node.nodeName, offset: String(c.offsetBytes) }, { readOnly: c.open.readOnly });
  }
  if (c.snapshot !== undefined) {
    try {
      await loadSnapshotTmp(node, c.snapshot);
    } catch (e) {
      if (e instanceof BlockError) throw new CliError(`Failed to load snapshot: ${e.message}`);
      throw e;
    }
  }
  return node;
}

function exportOptions(c: NbdCliConfig, node: BlockNode, hooks: ServeHooks): NbdExportOptions {
  return {
    name: c.exportName,
    description: c.description,
    writable: !c.open.readOnly,
    writethrough: c.open.writethrough,
    allocationDepth: c.allocationDepth,
    ...(c.bitmaps.length > 0 ? hooks.bitmapContexts(node, c.bitmaps, c.open.readOnly) : {}),
  };
}

/** Where qemu-nbd listens: -k's socket, else TCP on -b:-p. */
export function listenAddress(c: NbdCliConfig): NbdAddress {
  if (c.socket !== undefined) return { type: 'unix', path: c.socket };
  const port = Number(c.port);
  return { type: 'inet', host: c.bind, port };
}

async function listen(server: NbdServer, c: NbdCliConfig): Promise<void> {
  const addr = listenAddress(c);
  if (addr.type === 'inet' && !(/^[0-9]+$/.test(c.port) && addr.port! <= MAX_PORT)) {
    throw new CliError(`address resolution failed for ${c.bind}:${c.port}: Servname not supported for ai_socktype`);
  }
  try {
    await server.listen(addr);
  } catch (e) {
    throw new CliError(listenFailure(addr, e));
  }
}

/** qemu_write_pidfile: the pid and a newline. */
function writePidFile(file: string): void {
  try {
    fs.writeFileSync(path.resolve(file), `${process.pid}\n`);
  } catch (e) {
    throw new CliError(`Cannot open pid file: ${(e as Error).message}`);
  }
}

/** In a --fork child: tell the parent the server runs, then stop talking to it. */
export function reportReady(): void {
  if (process.env[FORKED_ENV] === undefined || !process.send) return;
  process.send('ready', () => process.disconnect());
}

/** The --fork parent: start the child and wait for it to be ready or to fail. */
export function forkServer(): Promise<number> {
  const child = process.getBuiltinModule('node:child_process').spawn(process.execPath, [...process.execArgv, process.argv[1]!, ...process.argv.slice(2)], {
    detached: true,
    stdio: ['ignore', 'ignore', 'inherit', 'ipc'],
    env: { ...process.env, [FORKED_ENV]: '1' },
  });
  return new Promise((resolve) => {
    let settled = false;
    const settle = (status: number) => {
      if (settled) return;
      settled = true;
      child.unref();
      child.channel?.unref();
      resolve(status);
    };
    child.on('message', (m) => settle(m === 'ready' ? 0 : 1));
    child.on('exit', () => settle(1));
    child.on('error', (e) => {
      process.stderr.write(`${PROG}: Failed to fork: ${e.message}\n`);
      settle(1);
    });
  });
}

class Deferred {
  resolve!: () => void;
  readonly promise = new Promise<void>((resolve) => (this.resolve = resolve));
}
