/*
 * The storage daemon's state (qemu-storage-daemon's globals, gathered in
 * one object): the block graph, user-created objects, jobs, the NBD
 * server with its block exports, and the QMP monitors. Command modules
 * get the Daemon as their context.
 *
 * Exports: block-export-add (and the deprecated nbd-server-add) make an
 * NBD export of a node on the running NBD server, known by an id (the
 * name for nbd-server-add). Removing one — by command, or because the
 * NBD server stops — emits BLOCK_EXPORT_DELETED {id} once it is gone.
 * `shutting-down` is true while a removal waits for its clients.
 *
 * Events: `emit` stamps the time (seconds and microseconds since the
 * epoch) and sends the event to every monitor client in command mode.
 *
 * Shutdown (`quit`, SIGTERM, SIGINT; `shutdown()`): jobs are cancelled,
 * the NBD server stops (its exports close, BLOCK_EXPORT_DELETED each),
 * every node is closed top-down (flushed, persistent bitmaps stored in
 * their images), the monitors close and the pid file is removed; then
 * `stopped` resolves. A second call waits for the first.
 */
import fs from 'node:fs';
import type { BlockBackend } from '../block/backend.js';
import { BlockGraph } from '../block/graph.js';
import type { BlockNode } from '../block/node.js';
import { throttleGroupsOf } from '../block/throttle-group.js';
import { builtinDrivers } from '../drivers/index.js';
import { JobRegistry } from '../jobs/registry.js';
import type { NbdExport } from '../nbd/export.js';
import { NbdServer } from '../nbd/server.js';
import { createTlsObject, isTlsObjectType, type ObjectLookup, type TlsObject } from '../nbd/tls-objects.js';
import { ObjectRegistry } from '../block/objects.js';
import type { QValue } from '../block/qjson.js';
import { allCommands } from './commands-all.js';
import { Dispatcher } from './dispatch.js';
import { QmpMonitor, itemRunner, type Greeting } from './monitor.js';
import { QEMU_VERSION, versionInfo } from './version.js';

/** One block export (QEMU's BlockExport). */
export interface BlockExportState {
  id: string;
  type: 'nbd';
  nodeName: string;
  /** The name NBD clients ask for. */
  nbdName: string;
  exp: NbdExport;
  shuttingDown: boolean;
}

export class Daemon {
  readonly graph = new BlockGraph(builtinDrivers);
  readonly objects = new ObjectRegistry();
  /** TLS credentials and authz objects, instantiated (object-add and --object). */
  readonly tlsObjects = new Map<string, TlsObject>();
  readonly jobs: JobRegistry = new JobRegistry((name, data) => this.emit(name, data));
  nbdServer: NbdServer | null = null;
  readonly exports = new Map<string, BlockExportState>();
  readonly monitors: QmpMonitor[] = [];
  /** When each node added through blockdev-add finished opening (commands-block.ts orders queries by it). */
  readonly nodeOpenSeq = new WeakMap<BlockNode, number>();
  nodeOpenCount = 0;
  readonly dispatcher = new Dispatcher<Daemon>(allCommands);
  /** Removed on shutdown when set. */
  pidFile: string | undefined;
  /** Where the daemon prints diagnostics (stderr). */
  log: (message: string) => void = () => {};
  private stopping: Promise<void> | null = null;
  private resolveStopped!: () => void;
  /** Resolves once shutdown finished. */
  readonly stopped = new Promise<void>((resolve) => (this.resolveStopped = resolve));

  constructor() {
    this.graph.objects = this.objects.objects;
  }

  // ------------------------------------------------------------ objects

  /** Adds an --object / object-add definition (keyval); returns help text instead when asked. */
  addObject(definition: string): string | null {
    const help = this.objects.add(definition);
    if (help !== null) return help;
    const spec = [...this.objects.objects.values()].at(-1)!;
    if (isTlsObjectType(spec.qomType)) this.tlsObjects.set(spec.id, createTlsObject(spec));
    // A group from the start, so that object-del can refuse it while in use.
    if (spec.qomType === 'throttle-group') throttleGroupsOf(this.graph).createObject(spec.id, spec.props);
    return null;
  }

  /** Objects by id: TLS ones instantiated, the others as given. */
  readonly objectLookup: ObjectLookup = (id) => this.tlsObjects.get(id) ?? this.objects.objects.get(id);

  // ------------------------------------------------------------ monitors and events

  /**
   * Starts a QMP monitor on a unix socket; with `serve` false its clients
   * wait until `serveMonitors()` (the command line calls it once every
   * option is done).
   */
  async addMonitor(path: string, opts: { serve?: boolean } = {}): Promise<QmpMonitor> {
    const monitor = new QmpMonitor(path, () => this.greeting(), itemRunner(this.dispatcher, this));
    await monitor.listen();
    this.monitors.push(monitor);
    if (opts.serve ?? true) monitor.serve();
    return monitor;
  }

  serveMonitors(): void {
    for (const m of this.monitors) m.serve();
  }

  greeting(): Greeting {
    return { version: versionInfo(), capabilities: ['oob'] };
  }

  /** Sends a timestamped event to every monitor client in command mode. */
  emit(event: string, data?: Record<string, unknown>): void {
    const micros = Math.floor((performance.timeOrigin + performance.now()) * 1000);
    const message = {
      timestamp: { seconds: Math.floor(micros / 1e6), microseconds: micros % 1e6 },
      event,
      ...(data === undefined ? {} : { data }),
    } as unknown as QValue;
    for (const m of this.monitors) m.commandClient?.send(message);
  }

  // ------------------------------------------------------------ exports

  /** The export's backend (block_set_io_throttle on an export id). */
  findBackendForThrottle(idOrDevice: string): BlockBackend | undefined {
    return this.exports.get(idOrDevice)?.exp.backend;
  }

  /** Whether any export serves `node`. */
  exportOf(node: BlockNode): BlockExportState | undefined {
    for (const e of this.exports.values()) if (e.exp.backend.node === node) return e;
    return undefined;
  }

  /** Removes an export (safe: refused while clients are connected); BLOCK_EXPORT_DELETED once gone. */
  async removeExport(e: BlockExportState, mode: 'safe' | 'hard'): Promise<void> {
    const server = this.nbdServer!;
    e.shuttingDown = true;
    try {
      await server.removeExport(e.nbdName, mode);
    } catch (err) {
      e.shuttingDown = false;
      throw err;
    }
    this.exports.delete(e.id);
    this.emit('BLOCK_EXPORT_DELETED', { id: e.id });
  }

  /** nbd-server-stop: every export goes (hard), then the listener. */
  async stopNbdServer(): Promise<void> {
    const server = this.nbdServer;
    if (!server) return;
    this.nbdServer = null;
    const gone = [...this.exports.values()];
    this.exports.clear();
    for (const e of gone) e.shuttingDown = true;
    await server.close();
    for (const e of gone) this.emit('BLOCK_EXPORT_DELETED', { id: e.id });
  }

  // ------------------------------------------------------------ shutdown

  /** Stops everything (see the file comment); resolves when done. */
  shutdown(): Promise<void> {
    this.stopping ??= this.doShutdown();
    return this.stopping;
  }

  private async doShutdown(): Promise<void> {
    const failures: unknown[] = [];
    const attempt = async (what: () => Promise<unknown>) => {
      await what().catch((e: unknown) => failures.push(e));
    };
    await attempt(() => this.jobs.cancelAll());
    await attempt(() => this.stopNbdServer());
    await attempt(() => this.graph.closeAll());
    for (const m of this.monitors.splice(0)) await attempt(() => m.close());
    if (this.pidFile !== undefined) fs.rmSync(this.pidFile, { force: true });
    for (const e of failures) this.log(e instanceof Error ? e.message : String(e));
    this.resolveStopped();
  }
}

export { QEMU_VERSION };
