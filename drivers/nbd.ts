/*
 * `nbd`: the NBD client as a protocol driver (QEMU's block/nbd.c), so any
 * tool opens `nbd://HOST[:PORT]/EXPORT`, `nbd+unix:///EXPORT?socket=PATH`
 * (also `nbd+tcp://`, `nbds://`, `nbds+unix://`, the legacy `nbd:…`
 * names) or `driver=nbd,server.type=…` options, usually under `raw`.
 *
 * Open (nbd_open): the options become an address and an export name
 * (nbd-options.ts); one NbdClient connects with structured replies and the
 * `base:allocation` context (or the one `x-dirty-bitmap` names), honouring
 * reconnect-delay and open-timeout. A read-only export opened for writing
 * fails as in QEMU ("Could not open image: Permission denied"; with
 * auto-read-only=on the node just becomes read-only). Limits
 * (nbd_refresh_limits): request alignment = the server's minimum block size,
 * else 1 when the size is not sector-aligned or block status is available,
 * else 512; max transfer and max write-zeroes = the server's maximum payload
 * (32 MiB at most); max discard = 2^31 - 1 aligned down (unlimited for
 * both with extended headers). FUA, MAY_UNMAP and NO_FALLBACK are native
 * when the export advertises FUA, WRITE_ZEROES and FAST_ZERO.
 *
 * Requests map one to one: write-zeroes sends NO_HOLE unless MAY_UNMAP
 * (block/nbd.c), and is ENOTSUP when the export has no WRITE_ZEROES (the
 * gate then writes zeroes); discard and flush do nothing when the export
 * lacks TRIM/FLUSH. Reads past the export's end (the block layer rounds the
 * length up to 512) return zeroes. Block status asks one extent
 * (REQ_ONE) of the negotiated context: HOLE clear = DATA, ZERO = ZERO,
 * always OFFSET_VALID at the same offset, so `qemu-img map` and convert see
 * what the server sees; without a context everything is DATA.
 *
 * Multi-conn (`multi-conn=N`, not in QEMU 7.2): when the export advertises
 * CAN_MULTI_CONN, N-1 more connections open with the same settings and
 * every request goes to the connection with the fewest outstanding ones.
 * The spec makes a FLUSH on any connection cover the writes completed on
 * all of them, and the block layer only flushes what has completed, so
 * flush goes to one connection. A server without multi-conn gets one.
 *
 * Reopen (nbd_client_reopen_prepare): going read-write on an export the
 * server marked read-only fails ("Can't reopen read-only NBD mount as
 * read/write", EACCES); anything else needs nothing of the connection.
 *
 * The node's name is nbd_refresh_filename's (`nbd://127.0.0.1:10809/exp`).
 * `qemu-img create` on an NBD URI reuses an existing export (nbd-create.ts).
 */
import { BlockError } from '../block/errors.js';
import { Req, Status, alignDown } from '../block/flags.js';
import type { BlockDriver, BlockStatusResult } from '../block/driver.js';
import type { BlockGraph } from '../block/graph.js';
import type { BlockNode } from '../block/node.js';
import { NbdClient, COMPACT_LENGTH_MAX_BYTES } from '../nbd/client.js';
import { CONTEXT_ALLOCATION_DEPTH, CONTEXT_BASE_ALLOCATION, MAX_BUFFER_BYTES, StateFlag, TxFlag } from '../nbd/protocol.js';
import { nbdExactFilename } from '../nbd/uri.js';
import { clientTlsFor } from '../nbd/client-tls.js';
import { NBD_CREATE_OPTS, nbdCoCreate } from './nbd-create.js';
import { nbdConfig, nbdOptionsSchema, type NbdOptions } from './nbd-options.js';
import { SECTOR_BYTES } from '../block/io.js';

interface NbdState {
  /** The first connection: export info, block status. */
  client: NbdClient;
  /** Every connection (the first included) and its outstanding requests. */
  conns: NbdClient[];
  outstanding: number[];
  /** The context block status asks about, when negotiated. */
  context: string | null;
  /** x-dirty-bitmap=qemu:allocation-depth: depths above 2 read as 2 (QEMU's hack). */
  allocDepthHack: boolean;
}

const state = (node: BlockNode) => node.opaque as NbdState;

function isOn(value: unknown): boolean {
  return value === true || value === 'on' || value === 'yes' || value === 'true';
}

async function connect(node: BlockNode, o: NbdOptions, graph: BlockGraph): Promise<NbdState> {
  const config = nbdConfig(o);
  const context = config.xDirtyBitmap ?? CONTEXT_BASE_ALLOCATION;
  const tls = clientTlsFor(config, graph.objects);
  const open = () =>
    NbdClient.connect({
      address: config.address,
      exportName: config.exportName ?? '',
      metaContexts: [context],
      reconnectDelaySeconds: config.reconnectDelaySeconds,
      openTimeoutSeconds: config.openTimeoutSeconds,
      ...(tls ? { tls } : {}),
    });
  const client = await open();
  const negotiated = client.info.contexts.has(context);
  if (config.xDirtyBitmap !== undefined && !negotiated) {
    await client.disconnect();
    // QEMU's "requested x-dirty-bitmap … not found" is dropped (NULL errp); the open reports the errno.
    throw new BlockError('EINVAL', 'Could not open image: Invalid argument');
  }
  node.filename = nbdExactFilename(config.address, config.exportName, config.uriTls !== undefined);
  const conns = [client, ...(await moreConnections(client, config.multiConn ?? 1, open))];
  return {
    client,
    conns,
    outstanding: conns.map(() => 0),
    context: negotiated ? context : null,
    allocDepthHack: config.xDirtyBitmap === CONTEXT_ALLOCATION_DEPTH,
  };
}

/** The extra connections multi-conn asks for, when the server allows them. */
async function moreConnections(first: NbdClient, wanted: number, open: () => Promise<NbdClient>): Promise<NbdClient[]> {
  if (wanted <= 1 || !first.can(TxFlag.CAN_MULTI_CONN)) return [];
  const settled = await Promise.allSettled(Array.from({ length: wanted - 1 }, open));
  const more = settled.flatMap((r) => (r.status === 'fulfilled' ? [r.value] : []));
  const failed = settled.find((r): r is PromiseRejectedResult => r.status === 'rejected');
  if (failed) {
    for (const c of [first, ...more]) c.close();
    throw failed.reason;
  }
  return more;
}

/** Runs a request on the least busy connection. */
async function onConnection<T>(s: NbdState, request: (client: NbdClient) => Promise<T>): Promise<T> {
  let i = 0;
  for (let j = 1; j < s.conns.length; j++) if (s.outstanding[j]! < s.outstanding[i]!) i = j;
  s.outstanding[i]!++;
  try {
    return await request(s.conns[i]!);
  } finally {
    s.outstanding[i]!--;
  }
}

/** bdrv_apply_auto_read_only for a read-only export. */
async function checkWritable(node: BlockNode, client: NbdClient): Promise<void> {
  if (!client.readOnly || node.readOnly) return;
  if (isOn(node.options['auto-read-only'])) {
    node.setReadOnlyFlag(true);
    return;
  }
  await client.disconnect();
  // QEMU drops its "NBD export is read-only" text and reports the open's errno.
  throw new BlockError('EACCES', 'Could not open image: Permission denied');
}

function setLimits(node: BlockNode, s: NbdState): void {
  const { client } = s;
  const info = client.info;
  const sectorAligned = info.sizeBytes % SECTOR_BYTES === 0;
  const align = info.minBlock || (!sectorAligned || s.context !== null ? 1 : SECTOR_BYTES);
  const maxBytes = info.maxBlock > 0 ? Math.min(info.maxBlock, MAX_BUFFER_BYTES) : MAX_BUFFER_BYTES;
  node.limits.requestAlignment = align;
  node.limits.maxTransfer = maxBytes;
  node.limits.maxPwriteZeroes = client.extended ? 0 : maxBytes;
  node.limits.maxPdiscard = client.extended ? 0 : alignDown(COMPACT_LENGTH_MAX_BYTES, align);
  if (info.optBlock > node.limits.optTransfer) node.limits.optTransfer = info.optBlock;
  node.supportedWriteFlags = client.can(TxFlag.SEND_FUA) ? Req.FUA : 0;
  node.supportedZeroFlags =
    (client.can(TxFlag.SEND_FUA) ? Req.FUA : 0) |
    (client.can(TxFlag.SEND_WRITE_ZEROES) ? Req.MAY_UNMAP : 0) |
    (client.can(TxFlag.SEND_WRITE_ZEROES) && client.can(TxFlag.SEND_FAST_ZERO) ? Req.NO_FALLBACK : 0);
}

/** One extent of the negotiated context from `offset`, made safe as QEMU's client does. */
async function extentAt(node: BlockNode, s: NbdState, offsetBytes: number, bytes: number): Promise<{ length: number; flags: number }> {
  const { client } = s;
  const align = node.limits.requestAlignment;
  let length = Math.min(bytes, client.sizeBytes - offsetBytes);
  if (!client.extended) length = Math.min(length, alignDown(COMPACT_LENGTH_MAX_BYTES, align));
  const reply = await client.blockStatus(offsetBytes, length, { reqOne: true });
  const extent = reply.get(s.context!)?.[0];
  if (!extent) throw new BlockError('EIO', 'Server did not reply with any status extents');
  let { length: got, flags } = extent;
  const minBlock = client.info.minBlock;
  // A server answering unaligned extents (qemu-nbd 3.1 at an unaligned EOF): round safely.
  if (minBlock > 1 && got % minBlock !== 0) {
    if (got > minBlock) got = alignDown(got, minBlock);
    else [got, flags] = [minBlock, 0];
  }
  if (s.allocDepthHack && flags > 2) flags = 2;
  return { length: Math.min(got, bytes), flags };
}

export const nbdDriver: BlockDriver = {
  name: 'nbd',
  protocolName: 'nbd',
  protocolAliases: ['nbd+tcp', 'nbd+unix', 'nbds', 'nbds+tcp', 'nbds+unix'],
  optionsSchema: nbdOptionsSchema,
  strongOptions: ['path', 'host', 'port', 'export', 'tls-creds', 'tls-hostname', 'server'],
  createOpts: NBD_CREATE_OPTS,
  coCreate: nbdCoCreate,

  async open(node, options, ctx) {
    const s = await connect(node, options as NbdOptions, ctx.graph);
    try {
      await checkWritable(node, s.client);
    } catch (e) {
      for (const c of s.conns) c.close();
      throw e;
    }
    node.opaque = s;
    setLimits(node, s);
  },

  async close(node) {
    await Promise.all(state(node).conns.map((c) => c.disconnect()));
  },

  async reopen(node, readOnly) {
    if (!readOnly && state(node).client.readOnly) throw new BlockError('EACCES', "Can't reopen read-only NBD mount as read/write");
  },

  getLength: async (node) => state(node).client.sizeBytes,

  async coPreadv(node, offsetBytes, buf) {
    const size = state(node).client.sizeBytes;
    // The block layer counts whole sectors; the export may end inside the last one.
    const inside = Math.max(0, Math.min(buf.length, size - offsetBytes));
    if (inside < buf.length) buf.fill(0, inside);
    if (inside > 0) await onConnection(state(node), (c) => c.read(offsetBytes, buf.subarray(0, inside)));
  },

  async coPwritev(node, offsetBytes, buf, flags) {
    await onConnection(state(node), (c) => c.write(offsetBytes, buf, { fua: (flags & Req.FUA) !== 0 }));
  },

  async coPwriteZeroes(node, offsetBytes, bytes, flags) {
    const s = state(node);
    if (!s.client.can(TxFlag.SEND_WRITE_ZEROES)) throw new BlockError('ENOTSUP');
    const opts = { fua: (flags & Req.FUA) !== 0, noHole: (flags & Req.MAY_UNMAP) === 0, fastZero: (flags & Req.NO_FALLBACK) !== 0 };
    await onConnection(s, (c) => c.writeZeroes(offsetBytes, bytes, opts));
  },

  async coPdiscard(node, offsetBytes, bytes) {
    const s = state(node);
    if (s.client.can(TxFlag.SEND_TRIM)) await onConnection(s, (c) => c.trim(offsetBytes, bytes));
  },

  async coFlushToOs(node) {
    const { client } = state(node);
    if (client.can(TxFlag.SEND_FLUSH)) await client.flush();
  },

  async coBlockStatus(node, _wantZero, offsetBytes, bytes): Promise<BlockStatusResult> {
    const s = state(node);
    if (s.context === null) return { status: Status.DATA | Status.OFFSET_VALID, pnum: bytes, map: offsetBytes, file: node };
    // Past the export's end, inside the last sector the block layer added: a hole, no offset.
    if (offsetBytes >= s.client.sizeBytes) return { status: Status.ZERO, pnum: bytes };
    const extent = await extentAt(node, s, offsetBytes, bytes);
    const status =
      (extent.flags & StateFlag.HOLE ? 0 : Status.DATA) | (extent.flags & StateFlag.ZERO ? Status.ZERO : 0) | Status.OFFSET_VALID;
    return { status, pnum: extent.length, map: offsetBytes, file: node };
  },

  async coTruncate(node, offsetBytes, exact) {
    const size = state(node).client.sizeBytes;
    if (offsetBytes !== size && exact) throw new BlockError('ENOTSUP', 'Cannot resize NBD nodes');
    if (offsetBytes > size) throw new BlockError('EINVAL', 'Cannot grow NBD nodes');
  },
};
