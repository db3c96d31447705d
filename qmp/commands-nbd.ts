/*
 * NBD server and block export commands (QEMU 7.2's blockdev-nbd.c and
 * block/export/export.c): nbd-server-start/-stop, block-export-add/-del,
 * query-block-exports, and the deprecated nbd-server-add/-remove.
 *
 * The server (nbd/server.ts) and exports (nbd/export.ts,
 * nbd/bitmap-context.ts) are the library's, as qemu-nbd-ts uses them;
 * this file checks arguments in QEMU's order with its texts:
 *   block-export-add   id well-formed and unused, node found ("Cannot
 *                      find device='' nor node-name='x'"), server running,
 *                      name/description length, name unused, bitmaps
 *                      usable for the export's mode;
 *   block-export-del   "Export 'x' is not found", a safe removal refused
 *                      while clients are connected;
 *   nbd-server-add     the same export with id = name = device by default,
 *                      writethrough, one optional bitmap, silently
 *                      read-only on a read-only node;
 *   nbd-server-remove  by id, which nbd-server-add made the name.
 * `startNbdServer` is also what the command line's --nbd-server runs.
 */
import { z } from 'zod';
import { BlockError } from '../block/errors.js';
import { exportDirtyBitmaps } from '../nbd/bitmap-context.js';
import { NbdExport, type NbdExportOptions } from '../nbd/export.js';
import { NbdServer, type NbdAddress } from '../nbd/server.js';
import { resolveTlsCreds } from '../nbd/tls-objects.js';
import { serverTls } from '../nbd/tls-server.js';
import { listenFailure } from '../nbd/server.js';
import { defineCommand, genericError, type QmpCommand } from './command.js';
import type { BlockExportState, Daemon } from './daemon.js';
import { qUint64 } from './qapi-errors.js';

const EXPORT_ID = /^[A-Za-z][A-Za-z0-9_.-]*$/;

export interface NbdServerStart {
  addr: NbdAddress;
  tlsCreds?: string;
  tlsAuthz?: string;
  maxConnections?: number;
}

/** nbd_server_start. */
export async function startNbdServer(d: Daemon, opts: NbdServerStart): Promise<void> {
  if (d.nbdServer) throw genericError('NBD server already running');
  const tls = opts.tlsCreds === undefined ? null : serverTls(resolveTlsCreds(d.objectLookup, opts.tlsCreds, 'server'), { authzId: opts.tlsAuthz, objects: d.objectLookup });
  const server = new NbdServer({ maxConnections: opts.maxConnections, tls, log: d.log });
  try {
    await server.listen(opts.addr);
  } catch (e) {
    await server.close().catch(() => undefined);
    throw genericError(listenFailure(opts.addr, e));
  }
  d.nbdServer = server;
}

export interface ExportRequest {
  id: string;
  nodeName: string;
  name?: string;
  description?: string;
  writable: boolean;
  writethrough: boolean;
  bitmaps: readonly string[];
  allocationDepth: boolean;
}

/** BlockExportOptions for nbd, as QMP or --export's keyval gives them. */
export interface ExportArgs {
  id: string;
  'node-name': string;
  name?: string;
  description?: string;
  writable?: boolean;
  writethrough?: boolean;
  bitmaps?: string[];
  'allocation-depth'?: boolean;
}

/** QEMU's defaults applied: everything off, no bitmaps. */
export function exportRequestOf(a: ExportArgs): ExportRequest {
  return {
    id: a.id,
    nodeName: a['node-name'],
    name: a.name,
    description: a.description,
    writable: a.writable ?? false,
    writethrough: a.writethrough ?? false,
    bitmaps: a.bitmaps ?? [],
    allocationDepth: a['allocation-depth'] ?? false,
  };
}

/** blk_exp_add + nbd_export_create. */
export function addExport(d: Daemon, r: ExportRequest): void {
  if (!EXPORT_ID.test(r.id)) throw genericError('Invalid block export id');
  if (d.exports.has(r.id)) throw genericError(`Block export id '${r.id}' is already in use`);
  const node = d.graph.nodes.get(r.nodeName);
  if (!node) throw genericError(`Cannot find device='' nor node-name='${r.nodeName}'`);
  if (r.writable && node.readOnly) throw genericError('Cannot export read-only node as writable');
  const server = d.nbdServer;
  if (!server) throw genericError('NBD server not running');
  const nbdName = r.name ?? r.nodeName;
  if (server.getExport(nbdName)) throw genericError(`NBD server already has export named '${nbdName}'`);
  const opts: NbdExportOptions = {
    name: nbdName,
    description: r.description,
    writable: r.writable,
    writethrough: r.writethrough,
    allocationDepth: r.allocationDepth,
  };
  const bitmaps = r.bitmaps.length > 0 ? exportDirtyBitmaps(node, r.bitmaps, { readOnly: !r.writable }) : null;
  let exp: NbdExport;
  try {
    exp = server.addExport(NbdExport.create(d.graph, node, { ...opts, ...(bitmaps ?? {}) }));
  } catch (e) {
    bitmaps?.onClose();
    throw e;
  }
  d.exports.set(r.id, { id: r.id, type: 'nbd', nodeName: node.nodeName, nbdName, exp, shuttingDown: false });
}

/** qmp_block_export_del. */
async function deleteExport(d: Daemon, id: string, mode: 'safe' | 'hard'): Promise<void> {
  const e = d.exports.get(id);
  if (!e) throw genericError(`Export '${id}' is not found`);
  if (e.shuttingDown) throw genericError(`Export '${id}' is already shutting down`);
  try {
    await d.removeExport(e, mode);
  } catch (err) {
    if (err instanceof BlockError && err.code === 'EBUSY') throw genericError(`export '${id}' still in use`);
    throw err;
  }
}

const zMode = z.enum(['safe', 'hard']);

const inetData = z.strictObject({
  host: z.string(),
  port: z.string(),
  numeric: z.boolean().optional(),
  to: z.number().int().optional(),
  ipv4: z.boolean().optional(),
  ipv6: z.boolean().optional(),
  'keep-alive': z.boolean().optional(),
});
const unixData = z.strictObject({ path: z.string(), abstract: z.boolean().optional(), tight: z.boolean().optional() });
const legacyAddr = z.discriminatedUnion('type', [
  z.strictObject({ type: z.literal('inet'), data: inetData }),
  z.strictObject({ type: z.literal('unix'), data: unixData }),
]);

/** A TCP port as QEMU's inet_parse takes it (a number here; service names are not looked up). */
export function inetAddress(host: string, port: string): NbdAddress {
  const n = Number(port);
  if (!/^[0-9]+$/.test(port) || n > 65535) throw genericError(`address resolution failed for ${host}:${port}: Servname not supported for ai_socktype`);
  return { type: 'inet', host, port: n };
}

const serverStartArgs = z.strictObject({
  addr: legacyAddr,
  'tls-creds': z.string().optional(),
  'tls-authz': z.string().optional(),
  'max-connections': qUint64().optional(),
});

/** BlockExportOptions (block-export-add, and qemu-storage-daemon's --export given as JSON). */
export const exportAddArgs = z.strictObject({
  type: z.enum(['nbd']),
  id: z.string(),
  'fixed-iothread': z.boolean().optional(),
  iothread: z.string().optional(),
  'node-name': z.string(),
  writable: z.boolean().optional(),
  writethrough: z.boolean().optional(),
  name: z.string().optional(),
  description: z.string().optional(),
  bitmaps: z.array(z.string()).optional(),
  'allocation-depth': z.boolean().optional(),
});

const serverAddArgs = z.strictObject({
  device: z.string(),
  name: z.string().optional(),
  description: z.string().optional(),
  writable: z.boolean().optional(),
  bitmap: z.string().optional(),
});

export const nbdCommands: QmpCommand<Daemon>[] = [
  defineCommand({
    name: 'nbd-server-start',
    args: serverStartArgs,
    run: (d: Daemon, a: z.infer<typeof serverStartArgs>) =>
      startNbdServer(d, {
        addr: a.addr.type === 'unix' ? { type: 'unix', path: a.addr.data.path } : inetAddress(a.addr.data.host, a.addr.data.port),
        tlsCreds: a['tls-creds'],
        tlsAuthz: a['tls-authz'],
        maxConnections: a['max-connections'],
      }),
  }),
  defineCommand({
    name: 'nbd-server-stop',
    args: z.strictObject({}),
    async run(d: Daemon) {
      if (!d.nbdServer) throw genericError('NBD server not running');
      await d.stopNbdServer();
    },
  }),
  defineCommand({
    name: 'block-export-add',
    args: exportAddArgs,
    run: (d: Daemon, a: z.infer<typeof exportAddArgs>) => addExport(d, exportRequestOf(a)),
  }),
  defineCommand({
    name: 'block-export-del',
    args: z.strictObject({ id: z.string(), mode: zMode.optional() }),
    run: (d: Daemon, a: { id: string; mode?: 'safe' | 'hard' }) => deleteExport(d, a.id, a.mode ?? 'safe'),
  }),
  defineCommand({
    name: 'query-block-exports',
    args: z.strictObject({}),
    // QEMU keeps exports newest first (QLIST_INSERT_HEAD).
    run: (d: Daemon) =>
      [...d.exports.values()].reverse().map((e) => ({ 'node-name': exportedNodeName(e), 'shutting-down': e.shuttingDown, type: e.type, id: e.id })),
  }),
  defineCommand({
    name: 'nbd-server-add',
    args: serverAddArgs,
    run(d: Daemon, a: z.infer<typeof serverAddArgs>) {
      if (!d.nbdServer) throw genericError('NBD server not running');
      const name = a.name ?? a.device;
      const node = d.graph.nodes.get(a.device);
      addExport(d, {
        id: name,
        nodeName: a.device,
        name,
        description: a.description,
        writable: (a.writable ?? false) && !(node?.readOnly ?? false),
        writethrough: true,
        bitmaps: a.bitmap === undefined ? [] : [a.bitmap],
        allocationDepth: false,
      });
    },
  }),
  defineCommand({
    name: 'nbd-server-remove',
    args: z.strictObject({ name: z.string(), mode: zMode.optional() }),
    run: (d: Daemon, a: { name: string; mode?: 'safe' | 'hard' }) => deleteExport(d, a.name, a.mode ?? 'safe'),
  }),
];

/**
 * The node an export serves now (bdrv_get_node_name(blk_bs(exp->blk))): after a
 * mirror pivot that is the target; while a job's filter sits above the
 * exported node, the filter — its automatic name too, as qemu-storage-daemon 7.2 answers.
 */
function exportedNodeName(e: BlockExportState): string {
  return e.exp.backend.node.nodeName;
}
