/*
 * NBD servers for tests: ours in-process on a unix socket in a scratch
 * directory, and qemu-nbd as a child process on another socket, both
 * stopped at the end of the test (ours closed, qemu-nbd killed by PID).
 *
 * Tests that talk to an in-process server must run peers asynchronously
 * (helpers/run.ts `run`), never with execFileSync: a blocked event loop
 * would block the server too.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { afterEach } from 'vitest';
import type { BlockGraph } from '../../block/graph.js';
import { NbdServer, type NbdServerOptions } from '../../nbd/server.js';
import type { NbdExportOptions } from '../../nbd/export.js';
import { testGraph } from './graphs.js';
import { run } from './run.js';

/** How long a started server may take to accept connections. */
const START_TIMEOUT_MS = 10_000;
const POLL_MS = 50;

export interface OurServer {
  server: NbdServer;
  graph: BlockGraph;
  socket: string;
  logs: string[];
  uri(exportName?: string): string;
  stop(): Promise<void>;
}

export interface ServeOptions extends NbdExportOptions {
  format?: string;
  server?: NbdServerOptions;
  /** node options merged into the top node's (e.g. { discard: 'unmap' }). */
  nodeOptions?: Record<string, unknown>;
}

const started: Array<() => Promise<void>> = [];

afterEach(async () => {
  for (const stop of started.splice(0).reverse()) await stop().catch(() => undefined);
});

export function nbdUnixUri(socket: string, exportName = ''): string {
  return `nbd+unix:///${exportName}?socket=${socket}`;
}

/** Serves `image` with our server on `<dir>/<socketName>`. */
export async function serveImage(dir: string, image: string, opts: ServeOptions = {}, socketName = 'ours.sock'): Promise<OurServer> {
  const graph = testGraph();
  graph.syncIo = false;
  const logs: string[] = [];
  const server = new NbdServer({ log: (m) => logs.push(m), ...opts.server });
  const node = await graph.openImage(path.join(dir, image), {
    format: opts.format,
    readOnly: !opts.writable,
    options: opts.nodeOptions as never,
  });
  server.createExport(graph, node, { name: opts.name ?? '', ...opts });
  const socket = path.join(dir, socketName);
  await server.listen({ type: 'unix', path: socket });
  const stop = async () => {
    await server.close();
    await graph.closeAll();
  };
  started.push(stop);
  return { server, graph, socket, logs, uri: (e = opts.name ?? '') => nbdUnixUri(socket, e), stop };
}

export interface QemuNbd {
  child: ChildProcess;
  socket: string;
  stderr: () => string;
  uri(exportName?: string): string;
  stop(): Promise<void>;
}

/** Starts `qemu-nbd ARGS -k <dir>/<socketName>` and waits until it answers. */
export async function startQemuNbd(dir: string, args: string[], socketName = 'qemu.sock', exportName = ''): Promise<QemuNbd> {
  const socket = path.join(dir, socketName);
  fs.rmSync(socket, { force: true });
  const child = spawn('qemu-nbd', ['-k', socket, ...args], { cwd: dir, stdio: ['ignore', 'ignore', 'pipe'] });
  let err = '';
  child.stderr!.on('data', (d: Buffer) => (err += d.toString()));
  const exited = new Promise<void>((resolve) => child.once('exit', () => resolve()));
  const stop = async () => {
    if (child.exitCode === null && child.signalCode === null) child.kill('SIGTERM');
    await Promise.race([exited, new Promise((r) => setTimeout(r, 5000))]);
    if (child.exitCode === null && child.signalCode === null) child.kill('SIGKILL');
  };
  started.push(stop);
  await waitForNbd(nbdUnixUri(socket, exportName), () => child.exitCode !== null);
  return { child, socket, stderr: () => err, uri: (e = exportName) => nbdUnixUri(socket, e), stop };
}

/** Polls with nbdinfo --size until the server answers (bounded). */
export async function waitForNbd(uri: string, gaveUp: () => boolean = () => false): Promise<void> {
  const deadline = Date.now() + START_TIMEOUT_MS;
  while (Date.now() < deadline && !gaveUp()) {
    const r = await run('nbdinfo', ['--size', uri], { timeoutMs: 5000 });
    if (r.code === 0) return;
    await new Promise((resolve) => setTimeout(resolve, POLL_MS));
  }
  throw new Error(`NBD server at ${uri} did not come up`);
}
