/*
 * The driver interface (QEMU's BlockDriver vtable) and its normalised form.
 *
 * A driver is a plain exported object. It implements the core (`open`,
 * `getLength`, `coPreadv`) and may add capabilities; `normaliseDriver` wraps
 * it once at registration so every method exists and no call site writes
 * `driver.x?.()`. Missing capabilities get the behaviour QEMU's generic layer
 * gives them:
 *
 *   coPwritev        -> EPERM-free ENOTSUP (a read-only driver)
 *   coPwritevCompressed -> ENOTSUP (no compression)
 *   coPwriteZeroes   -> ENOTSUP, so the gate falls back to zero-buffer writes
 *   coPdiscard       -> ENOTSUP, which the gate treats as "ignored" (a hint)
 *   coFlushToOs/Disk -> nothing to do
 *   coBlockStatus    -> everything is DATA (protocols: at the same offset);
 *                       filters defer to their filtered child
 *   coTruncate       -> ENOTSUP
 *   coPreadToHost    -> false (the caller reads the range instead)
 *   makeEmpty, changeBackingFile -> ENOTSUP
 *   getInfo          -> a filter's child's answer, else null (unknown)
 *   debugEvent       -> ignored (only blkdebug listens)
 *
 * Contract: the gate calls drivers only with checked, aligned requests:
 * offsets and lengths are non-negative integers, multiples of the node's
 * `requestAlignment`, lengths at most `maxTransfer`, flags a subset of the
 * node's supported flags. Drivers trust their inputs and never see a request
 * of length zero. Buffers passed to coPwritev are read-only to the driver
 * (the gate may pass one shared zero buffer to many requests).
 */
import type { z } from 'zod';
import { BlockError } from './errors.js';
import { Status, type Prealloc } from './flags.js';
import type { BlockNode, BdrvChild, ChildRoleFlags } from './node.js';
import type { BlockGraph } from './graph.js';
import type { MeasureInfo, MeasureRequest } from './measure.js';
import type { SnapshotCreateRequest, SnapshotInfo, SnapshotReport } from './snapshot.js';
import type { PersistentBitmapHooks } from './dirty-bitmap.js';
import type { BlkdebugEvent } from './debug-event.js';
import { defaultChildPerms, type ParentPerms, type PermPair } from './perms.js';

/** What a driver's block status says about [offset, offset + pnum). */
export interface BlockStatusResult {
  /** Status bits (DATA, ZERO, OFFSET_VALID, RAW, ALLOCATED, EOF, RECURSE). */
  status: number;
  /** Bytes from the request offset with this status; > 0 inside the node. */
  pnum: number;
  /** Offset of the data inside `file`, when OFFSET_VALID (or RAW). */
  map?: number;
  /** The node holding the data, when OFFSET_VALID (or RAW). */
  file?: BlockNode;
}

/**
 * Takes a range of an open host file where a read would fill a buffer:
 * `bytes` bytes of descriptor `fd` from `offsetBytes`. The descriptor is only
 * valid until the returned promise settles; it must not reject.
 */
export type HostRangeSink = (fd: number, offsetBytes: number, bytes: number) => Promise<void>;

/** bdrv_get_info: facts a format knows about itself. */
export interface DriverInfo {
  clusterBytes?: number;
  isDirty?: boolean;
  /** Write-zeroes with MAY_UNMAP leaves the range reading as zeroes (bdi.can_write_zeroes_with_unmap). */
  canWriteZeroesWithUnmap?: boolean;
}

/** qemu-img info's `format-specific` object. */
export interface SpecificInfo {
  type: string;
  data: Record<string, unknown>;
}

/** One `-o` option of `qemu-img create` (QemuOptDesc). */
export interface CreateOptDesc {
  name: string;
  type: 'size' | 'number' | 'bool' | 'string';
  help: string;
  /** Printed in the `Formatting …` line even when the user did not set it. */
  defaultValue?: string;
}

/** Options of a create call, already validated against the create opts. */
export interface CreateRequest {
  filename: string;
  /** Option values by name, as strings, exactly as qemu-img prints them. */
  opts: Map<string, string>;
}

/** What a driver's `open` may do with the graph. */
export interface OpenContext {
  readonly graph: BlockGraph;
  /**
   * Opens (or references, when the option is a node name) the child under
   * option key `name` and attaches it with the given role. Returns null when
   * the key is absent and `optional` is set; otherwise a missing key is an
   * EINVAL error naming the key. The edge takes what the driver's
   * childPerms derives for the role (block/perms.ts).
   */
  openChild(name: string, role: ChildRoleFlags, opts?: { optional?: boolean }): Promise<BdrvChild | null>;
}

/** Context of a create call. */
export interface CreateContext {
  readonly graph: BlockGraph;
}

export interface BlockDriver {
  /** QEMU's format_name: `file`, `raw`, `null-co`, `qcow2`, `blkdebug`. */
  readonly name: string;
  /** Set on protocol drivers (they talk to storage, not to another node). */
  readonly protocolName?: string;
  /** Further URI schemes this protocol answers to (QEMU registers one driver per scheme: `nbd+unix`, …). */
  readonly protocolAliases?: readonly string[];
  readonly isFilter?: boolean;
  readonly isFormat?: boolean;
  readonly supportsBacking?: boolean;
  /** zod object schema of the driver-specific blockdev-add keys. */
  readonly optionsSchema: z.ZodObject<z.ZodRawShape>;
  /** `qemu-img create -o` options, in the order qemu-img prints them. */
  readonly createOpts?: readonly CreateOptDesc[];
  /** Option keys that change what the guest sees (they must appear in a json: filename). */
  readonly strongOptions?: readonly string[];

  open(node: BlockNode, options: Record<string, unknown>, ctx: OpenContext): Promise<void>;
  close?(node: BlockNode): Promise<void>;
  getLength(node: BlockNode): Promise<number>;
  coPreadv(node: BlockNode, offsetBytes: number, buf: Uint8Array, flags: number): Promise<void>;
  /**
   * Hands `bytes` bytes at `offsetBytes` to `sink` as a range of an open host
   * file instead of reading them into memory (block/io.ts preadvToHost, for
   * the NBD server's zero-copy READ replies): raw forwards to its file
   * child, qcow2 a run of contiguous data clusters to its data file, file
   * answers with its descriptor. Resolves false, having done nothing, where
   * the range is not one plain run of a host file.
   */
  coPreadToHost?(node: BlockNode, offsetBytes: number, bytes: number, sink: HostRangeSink): Promise<boolean>;
  coPwritev?(node: BlockNode, offsetBytes: number, buf: Uint8Array, flags: number): Promise<void>;
  /**
   * Writes `buf` compressed (bdrv_co_pwritev_compressed; Req.WRITE_COMPRESSED
   * requests). The driver checks its own alignment rules (qcow2: whole
   * clusters, a partial one only at the image end; EINVAL otherwise). A
   * zero-length call marks the end of a compressed stream (qcow2 pads its
   * file to whole sectors). Absent: ENOTSUP.
   */
  coPwritevCompressed?(node: BlockNode, offsetBytes: number, buf: Uint8Array): Promise<void>;
  coPwriteZeroes?(node: BlockNode, offsetBytes: number, bytes: number, flags: number): Promise<void>;
  coPdiscard?(node: BlockNode, offsetBytes: number, bytes: number): Promise<void>;
  coFlushToOs?(node: BlockNode): Promise<void>;
  coFlushToDisk?(node: BlockNode): Promise<void>;
  coBlockStatus?(node: BlockNode, wantZero: boolean, offsetBytes: number, bytes: number): Promise<BlockStatusResult>;
  coTruncate?(node: BlockNode, offsetBytes: number, exact: boolean, prealloc: Prealloc, flags: number): Promise<void>;
  coCreate?(ctx: CreateContext, request: CreateRequest): Promise<void>;
  /** Score 0–100 of how sure the driver is that `header` is its format. */
  probe?(header: Uint8Array, filename: string): number;
  /** bdrv_get_info; null when the driver cannot tell (QEMU's -ENOTSUP). */
  getInfo?(node: BlockNode): DriverInfo | null;
  getSpecificInfo?(node: BlockNode): SpecificInfo | undefined;
  /** Bytes the image occupies on the host (`actual-size`); undefined if unknown. */
  getAllocatedFileSize?(node: BlockNode): Promise<number | undefined>;
  /** bdrv_has_zero_init: whether a new image reads as zeroes where nothing was written (absent: no). */
  hasZeroInit?(node: BlockNode): boolean;
  /**
   * bdrv_measure: the host bytes a new image of this format needs, from the
   * checked `-o` values and, when given, a source image to copy (absent:
   * "does not support size measurement"; see block/measure.ts).
   */
  measure?(request: MeasureRequest): Promise<MeasureInfo>;
  /**
   * bdrv_snapshot_load_tmp: a read-only node reads the internal snapshot
   * with this ID and/or name from now on (ENOENT "Can't find snapshot";
   * absent: refused, see block/snapshot-tmp.ts).
   */
  snapshotLoadTmp?(node: BlockNode, id: string | null, name: string | null): Promise<void>;
  /** bdrv_snapshot_create: a new internal snapshot of the current content; returns it with its ID. */
  snapshotCreate?(node: BlockNode, request: SnapshotCreateRequest): Promise<SnapshotInfo>;
  /**
   * bdrv_snapshot_goto: the content becomes the snapshot's (found by ID,
   * else by name). Throws the errno QEMU returns; lines QEMU prints first go
   * to `report`. Wrapper and fallbacks: block/snapshot.ts.
   */
  snapshotGoto?(node: BlockNode, idOrName: string, report: SnapshotReport): Promise<void>;
  /** bdrv_snapshot_delete: the snapshot matching `id` and `name` (null: any); message and errno as QEMU. */
  snapshotDelete?(node: BlockNode, id: string | null, name: string | null): Promise<void>;
  /** bdrv_snapshot_list: the internal snapshots, in table order. */
  snapshotList?(node: BlockNode): Promise<SnapshotInfo[]>;
  /** Whether the node carries dirty bitmaps (QEMU then refuses snapshot goto). Absent: none. */
  hasDirtyBitmaps?(node: BlockNode): boolean;
  /**
   * The node's quiesce count went from 0 to 1 (bdrv_drain_begin): a driver
   * holding requests back (throttle) lets them go. drainEnd: back to 0.
   * Absent: nothing to do.
   */
  drainBegin?(node: BlockNode): void;
  drainEnd?(node: BlockNode): void;
  /**
   * The driver's part of a read-only/read-write reopen in place (QEMU's
   * bdrv_reopen_prepare + commit for BDRV_O_RDWR; only block/reopen.ts
   * calls it). The node is drained. Going read-only it is called while the
   * node and its children still take writes (a format writes its clean
   * state); going read-write, after its children and edges are writable.
   * It switches the driver's own state (file: a descriptor with the new
   * access mode on the same file) or throws, leaving the state as it was.
   * Absent: nothing to do (raw, filters: their children are reopened too).
   */
  reopen?(node: BlockNode, readOnly: boolean): Promise<void>;
  /**
   * bdrv_child_perm: what the node takes and shares on a child in `role`,
   * given its parents' cumulative permissions (block/perms.ts calls it on
   * every refresh). Absent: QEMU's bdrv_default_perms (defaultChildPerms).
   */
  childPerms?(node: BlockNode, role: ChildRoleFlags, parents: ParentPerms): PermPair;
  /**
   * bdrv_check_perm / bdrv_set_perm / bdrv_abort_perm_update: the node's
   * cumulative parent permissions are about to become `perm` (or'ed) and
   * `shared` (and'ed). block/perms.ts calls checkPerm for every node a
   * refresh visits, parents first; it throws to refuse. Then either
   * setPerm commits each checked node, or abortPerm undoes each, newest
   * first. All synchronous. Absent: nothing to do (the file driver locks
   * host bytes, drivers/file/lock.ts).
   */
  checkPerm?(node: BlockNode, perm: number, shared: number): void;
  setPerm?(node: BlockNode, perm: number, shared: number): void;
  abortPerm?(node: BlockNode): void;
  /**
   * bdrv_make_empty: drops every cluster the image itself allocates, so it
   * reads through to its backing file (or as zeroes). Called drained, by a
   * parent holding write permission (block/make-empty.ts). Absent: ENOTSUP
   * ("<format> does not support emptying nodes").
   */
  makeEmpty?(node: BlockNode): Promise<void>;
  /**
   * bdrv_change_backing_file: rewrites the backing file name and format the
   * image stores (null: none), durably, after everything written before it.
   * The graph is left as it is (the open backing child does not change).
   * Absent: ENOTSUP.
   */
  changeBackingFile?(node: BlockNode, backingFile: string | null, backingFormat: string | null): Promise<void>;
  /** `qemu-img amend -o` options (amend_opts), in the order `-o help` lists them. Absent: no amendment. */
  readonly amendOpts?: readonly CreateOptDesc[];
  /**
   * bdrv_amend_options: changes the image's format options in place. The
   * options were checked against `amendOpts` (values as strings, sizes and
   * numbers in decimal). Throws with QEMU's message. Absent: "Format driver
   * '<name>' does not support option amendment".
   */
  amend?(node: BlockNode, request: AmendRequest): Promise<void>;
  /** Persistent dirty bitmaps stored in the image (qcow2); only block/dirty-bitmap-ops.ts calls them. Absent: none. */
  readonly persistentBitmaps?: PersistentBitmapHooks;
  /**
   * bdrv_debug_event: a parent announces `event` on this node (see
   * block/debug-event.ts; blkdebug acts on it). Synchronous, never throws.
   * Absent: ignored.
   */
  debugEvent?(node: BlockNode, event: BlkdebugEvent): void;
  /**
   * QAPI's checks of the driver's own keys for blockdev-add over QMP
   * (`typed`: JSON as sent) or for qemu-storage-daemon's --blockdev in
   * keyval form (every value text), with `prefix` the path of its node
   * (e.g. `file.`), beyond the key names and integer keys the monitor
   * checks itself: QAPI's message, or null. Absent: nothing more to check.
   */
  qapiProblem?(tree: Record<string, unknown>, prefix: string, typed: boolean): string | null;
}

/** What bdrv_amend_options gets besides the node. */
export interface AmendRequest {
  /** The options the user set, by name (only those: QEMU changes only explicitly given ones). */
  options: ReadonlyMap<string, string>;
  /** `--force` (LUKS key-slot operations in QEMU). */
  force: boolean;
  /** Reports progress: `done` of `total` work units (amend_status_cb). */
  progress(done: number, total: number): void;
  /** Resizes the image through a parent holding resize permission (exact, no preallocation). */
  resize(sizeBytes: number): Promise<void>;
}

/** Optional members only block/snapshot.ts calls (it supplies what a driver lacks). */
type SnapshotMember = 'snapshotCreate' | 'snapshotGoto' | 'snapshotDelete' | 'snapshotList' | 'hasDirtyBitmaps';
/** Optional members only qemu-img amend uses (it reports what a driver lacks). */
type AmendMember = 'amend' | 'amendOpts';
/** Optional members only block/dirty-bitmap-ops.ts uses (it supplies what a driver lacks). */
type BitmapMember = 'persistentBitmaps';

/** A driver with every method present (see the note at the top). */
export type NormalisedDriver = Required<
  Omit<BlockDriver, 'protocolName' | 'createOpts' | 'strongOptions' | 'probe' | 'coCreate' | 'getAllocatedFileSize' | 'measure' | 'snapshotLoadTmp' | SnapshotMember | AmendMember | BitmapMember>
> &
  Pick<BlockDriver, 'protocolName' | 'createOpts' | 'strongOptions' | 'probe' | 'coCreate' | 'getAllocatedFileSize' | 'measure' | 'snapshotLoadTmp' | SnapshotMember | AmendMember | BitmapMember> & {
    readonly has: {
      readonly pwritev: boolean;
      /** block_driver_can_compress: the driver takes Req.WRITE_COMPRESSED writes. */
      readonly pwritevCompressed: boolean;
      readonly pwriteZeroes: boolean;
      readonly pdiscard: boolean;
      readonly blockStatus: boolean;
      readonly truncate: boolean;
      readonly preadToHost: boolean;
    };
  };

const notSupported = (what: string) => async (): Promise<never> => {
  throw new BlockError('ENOTSUP', `${what}: Operation not supported`);
};
const nothing = async (): Promise<void> => {};
const declineHostRange = async (): Promise<boolean> => false;
/** One shared no-op, so firing an event at a node that does not listen stays a monomorphic empty call. */
const ignoreDebugEvent = (): void => {};
/** Drivers that keep no state for their permissions. */
const ignorePerms = (): void => {};

export function normaliseDriver(d: BlockDriver): NormalisedDriver {
  return {
    ...d,
    protocolAliases: d.protocolAliases ?? [],
    isFilter: d.isFilter ?? false,
    isFormat: d.isFormat ?? false,
    supportsBacking: d.supportsBacking ?? false,
    close: d.close ?? nothing,
    coPwritev: d.coPwritev ?? notSupported(`driver '${d.name}' cannot write`),
    coPwritevCompressed: d.coPwritevCompressed ?? notSupported('Compressed write'),
    coPwriteZeroes: d.coPwriteZeroes ?? notSupported('write zeroes'),
    coPdiscard: d.coPdiscard ?? notSupported('discard'),
    coFlushToOs: d.coFlushToOs ?? nothing,
    coFlushToDisk: d.coFlushToDisk ?? nothing,
    coBlockStatus: d.coBlockStatus ?? defaultBlockStatus(d),
    coTruncate: d.coTruncate ?? notSupported(`Image format driver '${d.name}' does not support resize`),
    getInfo: d.getInfo ?? defaultGetInfo(d),
    getSpecificInfo: d.getSpecificInfo ?? (() => undefined),
    hasZeroInit: d.hasZeroInit ?? defaultHasZeroInit(d),
    makeEmpty: d.makeEmpty ?? notSupported(`${d.name} does not support emptying nodes`),
    changeBackingFile: d.changeBackingFile ?? notSupported(`Driver '${d.name}' cannot change the backing file`),
    drainBegin: d.drainBegin ?? (() => {}),
    drainEnd: d.drainEnd ?? (() => {}),
    reopen: d.reopen ?? nothing,
    childPerms: d.childPerms ?? defaultChildPerms,
    checkPerm: d.checkPerm ?? ignorePerms,
    setPerm: d.setPerm ?? ignorePerms,
    abortPerm: d.abortPerm ?? ignorePerms,
    debugEvent: d.debugEvent ?? ignoreDebugEvent,
    coPreadToHost: d.coPreadToHost ?? declineHostRange,
    qapiProblem: d.qapiProblem ?? (() => null),
    has: {
      pwritev: d.coPwritev !== undefined,
      pwritevCompressed: d.coPwritevCompressed !== undefined,
      pwriteZeroes: d.coPwriteZeroes !== undefined,
      pdiscard: d.coPdiscard !== undefined,
      blockStatus: d.coBlockStatus !== undefined,
      truncate: d.coTruncate !== undefined,
      preadToHost: d.coPreadToHost !== undefined,
    },
  };
}

/** Drivers without has_zero_init: a filter answers for its child, anything else says no. */
function defaultHasZeroInit(d: BlockDriver): NonNullable<BlockDriver['hasZeroInit']> {
  return (node) => {
    const filtered = d.isFilter ? node.filteredChild : null;
    return filtered ? filtered.node.driver.hasZeroInit(filtered.node) : false;
  };
}

/** Drivers without get_info: a filter answers for its child, anything else cannot tell. */
function defaultGetInfo(d: BlockDriver): NonNullable<BlockDriver['getInfo']> {
  return (node) => {
    const filtered = d.isFilter ? node.filteredChild : null;
    return filtered ? filtered.node.driver.getInfo(filtered.node) : null;
  };
}

/**
 * QEMU's answer for drivers without block status: everything is data;
 * a protocol holds it at the same offset; a filter defers to its child.
 */
function defaultBlockStatus(d: BlockDriver): NonNullable<BlockDriver['coBlockStatus']> {
  return async (node, _wantZero, offsetBytes, bytes) => {
    const filtered = d.isFilter ? node.filteredChild : null;
    if (filtered) {
      return { status: Status.RAW | Status.OFFSET_VALID, pnum: bytes, map: offsetBytes, file: filtered.node };
    }
    if (d.protocolName !== undefined) {
      return { status: Status.DATA | Status.OFFSET_VALID, pnum: bytes, map: offsetBytes, file: node };
    }
    return { status: Status.DATA, pnum: bytes };
  };
}
