/*
 * The qcow2 format driver: the plain object the registry lists, wiring the
 * modules of drivers/qcow2/ together.
 *
 *   open.ts        open/close, backing chain       options.ts   blockdev keys
 *   reopen.ts      read-only <-> read-write in place
 *   io.ts          read/write/zero/discard/status  truncate.ts  resize (shrink.ts)
 *   amend.ts       qemu-img amend (refcount-order.ts, zero-expand.ts)
 *   cluster.ts     guest -> host runs (reads)      alloc.ts     write steps, COW, L2 linking
 *   zero.ts        zero/discard in L2 tables       cow.ts       backing, compressed, COW reads
 *   l2.ts          L1/L2 tables                    cache.ts     L2 and refcount block caches
 *   refcount*.ts   refcounts and the allocator     overlap.ts   metadata overlap checks
 *   header-io.ts   header writes, dirty/corrupt    prealloc.ts  preallocation
 *   create.ts      qemu-img create                 repair.ts    dirty-bit repair
 *   snapshots.ts   the snapshot table in memory    lock.ts      the image lock
 *   snapshot-ops.ts  snapshot create/goto/delete/list/load_tmp (snapshot-table.ts, snapshot-refcount.ts)
 *   make-empty.ts  emptying (qemu-img commit)      backing-change.ts  rewriting the backing name
 *   compress-write.ts  compressed writes (convert -c, qemu-io write -c)
 * The on-disk format itself (codecs, geometry, validators) is format.ts,
 * header.ts, extensions.ts, tables.ts, validate.ts and cursor.ts.
 *
 * `makeQcow2Driver` lets the registry choose the dirty-bit repair (e.g. the
 * one of `qemu-img check`); `qcow2Driver` uses the built-in rebuild.
 *
 * What qemu-img info shows: getInfo (cluster size, dirty bit, backing file
 * and format as stored) and getSpecificInfo in qemu-img 7.2's key order
 * (v2 images have fewer keys), with the persistent bitmaps of the
 * directory as on disk (name, granularity, flags in-use/auto).
 */
import type { BlockDriver, DriverInfo, SpecificInfo } from '../../block/driver.js';
import type { DriverBackingInfo } from '../../block/info.js';
import { allocatedFileSize } from '../../block/info.js';
import type { BlockNode } from '../../block/node.js';
import { QCOW2_CREATE_OPTS, coCreate } from './create.js';
import { Compat, HeaderBytes, Incompat, QCOW2_MAGIC, Qcow2Version } from './format.js';
import { coBlockStatus, coFlushToOs, coPdiscard, coPreadToHost, coPreadv, coPwriteZeroes, coPwritev } from './io.js';
import { coPwritevCompressed } from './compress-write.js';
import { closeQcow2, openQcow2 } from './open.js';
import { reopenQcow2 } from './reopen.js';
import { optionsSchema, type RawOptions } from './options.js';
import type { DirtyRepair } from './repair.js';
import { repairDirtyImage } from './check.js';
import { stateOf } from './state.js';
import { measureQcow2 } from './measure.js';
import { coTruncate } from './truncate.js';
import { QCOW2_AMEND_OPTS, amendQcow2 } from './amend.js';
import { makeEmpty } from './make-empty.js';
import { changeBackingFile } from './backing-change.js';
import { qcow2BitmapHooks } from './bitmap-store.js';
import { bitmapInfoList } from './bitmap-dir.js';
import { qcow2HasDirtyBitmaps, qcow2SnapshotCreate, qcow2SnapshotDelete, qcow2SnapshotGoto, qcow2SnapshotList, qcow2SnapshotLoadTmp } from './snapshot-ops.js';

/** qcow2_probe: the magic and a version of at least 2, in a full header's worth of bytes. */
function probe(header: Uint8Array): number {
  if (header.length < HeaderBytes.V3) return 0;
  const view = new DataView(header.buffer, header.byteOffset, header.byteLength);
  return view.getUint32(0) === QCOW2_MAGIC && view.getUint32(4) >= Qcow2Version.V2 ? 100 : 0;
}

function getInfo(node: BlockNode): DriverInfo & DriverBackingInfo {
  const s = stateOf(node);
  const h = s.image.header;
  return {
    clusterBytes: s.clusterBytes,
    isDirty: (h.incompatibleFeatures & Incompat.DIRTY) !== 0n,
    canWriteZeroesWithUnmap: h.version >= Qcow2Version.V3,
    backingFile: s.image.backingName ?? undefined,
    backingFormat: s.image.extensions.backingFormat ?? undefined,
  };
}

function getSpecificInfo(node: BlockNode): SpecificInfo {
  const h = stateOf(node).image.header;
  const data: Record<string, unknown> =
    h.version < Qcow2Version.V3
      ? { compat: '0.10', 'compression-type': 'zlib', 'refcount-bits': 2 ** h.refcountOrder }
      : {
          compat: '1.1',
          'compression-type': h.compressionType === 0 ? 'zlib' : 'zstd',
          'lazy-refcounts': (h.compatibleFeatures & Compat.LAZY_REFCOUNTS) !== 0n,
          'refcount-bits': 2 ** h.refcountOrder,
          corrupt: (h.incompatibleFeatures & Incompat.CORRUPT) !== 0n,
          'extended-l2': (h.incompatibleFeatures & Incompat.EXTL2) !== 0n,
          bitmaps: bitmapInfoList(stateOf(node)),
        };
  if (data.bitmaps === undefined) delete data.bitmaps;
  return { type: 'qcow2', data };
}

export function makeQcow2Driver(opts: { repairDirty?: DirtyRepair } = {}): BlockDriver {
  const repair = opts.repairDirty ?? repairDirtyImage;
  return {
    name: 'qcow2',
    isFormat: true,
    supportsBacking: true,
    optionsSchema,
    createOpts: QCOW2_CREATE_OPTS,
    open: (node, options, ctx) => openQcow2(node, options as RawOptions, ctx, repair),
    close: closeQcow2,
    reopen: reopenQcow2,
    getLength: async (node) => Math.floor(stateOf(node).image.header.virtualBytes / 512) * 512,
    coPreadv,
    coPreadToHost,
    coPwritev,
    coPwritevCompressed,
    coPwriteZeroes,
    coPdiscard,
    coFlushToOs,
    coBlockStatus,
    coTruncate,
    coCreate,
    probe,
    getInfo,
    getSpecificInfo,
    getAllocatedFileSize: (node) => allocatedFileSize(stateOf(node).file.node),
    hasZeroInit,
    measure: measureQcow2,
    makeEmpty,
    changeBackingFile,
    snapshotCreate: qcow2SnapshotCreate,
    snapshotGoto: qcow2SnapshotGoto,
    snapshotDelete: qcow2SnapshotDelete,
    snapshotList: qcow2SnapshotList,
    snapshotLoadTmp: qcow2SnapshotLoadTmp,
    hasDirtyBitmaps: qcow2HasDirtyBitmaps,
    amendOpts: QCOW2_AMEND_OPTS,
    amend: amendQcow2,
    persistentBitmaps: qcow2BitmapHooks,
  };
}

export const qcow2Driver: BlockDriver = makeQcow2Driver();

/**
 * qcow2_has_zero_init: an image without preallocated metadata reads as
 * zeroes where nothing was written; a preallocated one (its first L1 entry
 * is set) only if its file does.
 */
function hasZeroInit(node: BlockNode): boolean {
  const s = stateOf(node);
  const preallocated = s.image.header.l1Entries > 0 && (s.l1View.getUint32(0) !== 0 || s.l1View.getUint32(4) !== 0);
  return !preallocated || s.file.node.driver.hasZeroInit(s.file.node);
}
