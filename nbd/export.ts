/*
 * An NBD export: one block node served under a name (QEMU's NBDExport and
 * nbd_export_create).
 *
 * The export holds a BlockBackend on the node, with write permission when
 * writable and sharing everything but resize (the size is fixed while the
 * export exists, as in QEMU). Everything a client can learn about it is
 * computed here once: the size (the node's length rounded down to 512),
 * the transmission flags (QEMU's: FLUSH, FUA and CACHE always; TRIM,
 * WRITE_ZEROES and FAST_ZERO when writable, else READ_ONLY; CAN_MULTI_CONN
 * unless the server allows a single connection), the block sizes of
 * NBD_INFO_BLOCK_SIZE, and the metadata contexts: `base:allocation`
 * (HOLE = not DATA, ZERO = ZERO, from block status through the whole
 * backing chain), `qemu:allocation-depth` when enabled (the depth of the
 * layer that allocates each extent, 0 when none does), and any further
 * context a caller supplies (dirty bitmaps, `qemu:dirty-bitmap:NAME`).
 *
 * The export tracks its client connections so a server can refuse a safe
 * removal while clients are connected and drop them on a hard one.
 */
import { BlockBackend } from '../block/backend.js';
import { BlockError } from '../block/errors.js';
import { Perm, Status, alignDown } from '../block/flags.js';
import type { BlockGraph } from '../block/graph.js';
import type { BlockNode } from '../block/node.js';
import { SECTOR_BYTES } from '../block/io.js';
import type { ChainStatusResult } from '../block/status.js';
import {
  collectExtents,
  numberContexts,
  type ExtentLimits,
  type MetaContextSource,
  type NumberedContext,
} from './meta-context.js';
import {
  CONTEXT_ALLOCATION_DEPTH,
  CONTEXT_BASE_ALLOCATION,
  CONTEXT_DIRTY_BITMAP_PREFIX,
  DEFAULT_PREFERRED_BLOCK_BYTES,
  MAX_BUFFER_BYTES,
  MAX_STRING_BYTES,
  StateFlag,
  TxFlag,
} from './protocol.js';
import { DataHint } from './server-data-hint.js';
import type { BlockSizes } from './wire-handshake.js';

export interface NbdExportOptions {
  /** The name clients ask for (default: the node name); at most 4096 bytes. */
  name?: string;
  /** Human description sent in NBD_INFO_DESCRIPTION and NBD_OPT_LIST; at most 4096 bytes. */
  description?: string;
  /** Allow writes (TRIM, WRITE_ZEROES); default read-only. */
  writable?: boolean;
  /** Every write is FUA (QEMU's `writethrough`). */
  writethrough?: boolean;
  /** Offer `qemu:allocation-depth`. */
  allocationDepth?: boolean;
  /**
   * Further contexts, each named `qemu:dirty-bitmap:NAME`: the plug for
   * dirty bitmaps. Their ids are 2, 3, … in this order.
   */
  bitmapContexts?: readonly MetaContextSource[];
  /**
   * Called once when the export closes, before its backend (e.g. releases
   * the bitmaps behind bitmapContexts; see bitmap-context.ts).
   */
  onClose?: () => void;
}

/** What an export needs to know about a connected client. */
export interface ExportClient {
  /** Drops the connection, answering requests in flight with ESHUTDOWN. */
  dropHard(reason: string): void;
}

export class NbdExport {
  readonly name: string;
  readonly description: string | undefined;
  readonly backend: BlockBackend;
  readonly readOnly: boolean;
  /** Export size in bytes: the node's length rounded down to 512. */
  readonly sizeBytes: number;
  readonly contexts: readonly NumberedContext[];
  readonly clients = new Set<ExportClient>();
  private onClose: (() => void) | undefined;
  /** Set once removal began: no new client may attach. */
  removing = false;
  /** Ranges recently seen to hold data (a READ inside one skips block status; see server-data-hint.ts). */
  readonly dataHint = new DataHint();

  private constructor(name: string, opts: NbdExportOptions, backend: BlockBackend) {
    this.name = name;
    this.description = opts.description;
    this.backend = backend;
    this.readOnly = !opts.writable;
    this.sizeBytes = alignDown(backend.getLength(), SECTOR_BYTES);
    const depth = opts.allocationDepth ? allocationDepthContext(backend) : null;
    this.contexts = numberContexts(baseAllocationContext(backend), depth, opts.bitmapContexts ?? []);
    this.onClose = opts.onClose;
  }

  /** Opens a backend on `node` and builds the export; throws BlockError on bad options. */
  static create(graph: BlockGraph, node: BlockNode, opts: NbdExportOptions = {}): NbdExport {
    const name = opts.name ?? node.nodeName;
    const reason = invalidExportOptions(name, opts);
    if (reason) throw new BlockError('EINVAL', reason);
    // Unnamed, as QEMU's export backends ("an unnamed block device" in permission errors).
    const backend = new BlockBackend(graph, node, {
      writable: opts.writable ?? false,
      writeCache: !opts.writethrough,
      shared: Perm.ALL & ~Perm.RESIZE,
    });
    return new NbdExport(name, opts, backend);
  }

  /** QEMU's export flags; DF is added per client once structured replies are on. */
  transmissionFlags(multiConn: boolean): number {
    let flags = TxFlag.HAS_FLAGS | TxFlag.SEND_FLUSH | TxFlag.SEND_FUA | TxFlag.SEND_CACHE;
    if (multiConn) flags |= TxFlag.CAN_MULTI_CONN;
    if (this.readOnly) flags |= TxFlag.READ_ONLY;
    else flags |= TxFlag.SEND_TRIM | TxFlag.SEND_WRITE_ZEROES | TxFlag.SEND_FAST_ZERO;
    return flags;
  }

  /** The node's request alignment (what a client that asked for block sizes must respect). */
  get requestAlignment(): number {
    return this.backend.node.limits.requestAlignment;
  }

  /**
   * NBD_INFO_BLOCK_SIZE as QEMU sends it: minimum = the request alignment
   * for clients that will obey it (they asked, or this is NBD_OPT_INFO),
   * else 1; preferred = max(4096, minimum); maximum = min(max transfer, 32 MiB).
   */
  blockSizes(clientObeys: boolean): BlockSizes {
    const minimum = clientObeys ? this.requestAlignment : 1;
    const maxTransfer = this.backend.node.limits.maxTransfer;
    return {
      minimum,
      preferred: Math.max(DEFAULT_PREFERRED_BLOCK_BYTES, minimum),
      maximum: maxTransfer > 0 ? Math.min(maxTransfer, MAX_BUFFER_BYTES) : MAX_BUFFER_BYTES,
    };
  }

  /** Closes the backend (the node closes too when nothing else holds it). */
  async close(): Promise<void> {
    const onClose = this.onClose;
    this.onClose = undefined;
    onClose?.();
    await this.backend.close();
  }
}

/** Why export options are unusable (QEMU's messages), or null. */
export function invalidExportOptions(name: string, opts: NbdExportOptions): string | null {
  if (Buffer.byteLength(name) > MAX_STRING_BYTES) return `export name '${name}' too long`;
  if (opts.description !== undefined && Buffer.byteLength(opts.description) > MAX_STRING_BYTES) {
    return `description '${opts.description}' too long`;
  }
  for (const ctx of opts.bitmapContexts ?? []) {
    if (!ctx.name.startsWith(CONTEXT_DIRTY_BITMAP_PREFIX) || Buffer.byteLength(ctx.name) > MAX_STRING_BYTES) {
      return `invalid bitmap context name '${ctx.name}'`;
    }
  }
  return null;
}

/**
 * A context computed from block status through the whole backing chain
 * (wantZero as QEMU asks it), mapped to extent flags by `flagsOf`.
 */
function chainContext(
  backend: BlockBackend,
  name: string,
  wantZero: boolean,
  flagsOf: (r: ChainStatusResult) => number,
): MetaContextSource {
  return {
    name,
    extents: (offsetBytes: number, bytes: number, limits: ExtentLimits) =>
      collectExtents(offsetBytes, bytes, limits, async (at, n) => {
        const r = await backend.blockStatusAbove(at, n, null, wantZero);
        return { flags: flagsOf(r), bytes: r.pnum };
      }),
  };
}

/** `base:allocation`: HOLE where the chain has no DATA, ZERO where it reads as zeroes. */
function baseAllocationContext(backend: BlockBackend): MetaContextSource {
  return chainContext(backend, CONTEXT_BASE_ALLOCATION, true, (r) =>
    (r.status & Status.DATA ? 0 : StateFlag.HOLE) | (r.status & Status.ZERO ? StateFlag.ZERO : 0),
  );
}

/** `qemu:allocation-depth`: 1 for the top layer, 2 for its backing, …, 0 unallocated. */
function allocationDepthContext(backend: BlockBackend): MetaContextSource {
  return chainContext(backend, CONTEXT_ALLOCATION_DEPTH, false, (r) => (r.status & Status.ALLOCATED ? r.depth : 0));
}
