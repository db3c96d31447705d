/*
 * Opening and closing a qcow2 node (QEMU's qcow2_do_open, qcow2_close).
 *
 * Open, in QEMU's order where it shows:
 *   1. the `file` child; cluster 0 decoded and validated (header.ts,
 *      validate.ts: the first reason, with QEMU's errno);
 *   2. a writable open of an image with the corrupt bit is refused, as
 *      QEMU 7.2 does ("qcow2: Image is corrupt; cannot be opened
 *      read/write", EACCES); read-only opens work;
 *   3. runtime options (options.ts);
 *   4. a writable open of a dirty image repairs the refcounts (repair.ts)
 *      and reads cluster 0 again;
 *   5. the L1 table, the refcount table, the snapshot table's extents; the
 *      stale-bitmaps warnings of qcow2_read_extensions;
 *   6. persistent bitmaps loaded (bitmap-load.ts; on a writable open they
 *      are marked in use on disk); writable: unknown autoclear bits are
 *      cleared and a stale bitmaps extension dropped (one header rewrite,
 *      unless loading the bitmaps rewrote the header already), as QEMU
 *      does at open;
 *   7. the backing file: the `backing` option (a node, options, or null
 *      for none), else the name in the header, relative names taken from
 *      the image's directory, opened read-only with the header's format
 *      (probed when there is none), with its own backing chain. A file
 *      that is already being opened further up the chain is refused
 *      ("Backing file '…' creates an infinite loop."): the chain of files
 *      travels down in a symbol-keyed field of the backing's options,
 *      invisible to option parsing and to json: filenames.
 * Close (lock held): store the persistent bitmaps (bitmap-store.ts), write
 * back both caches, clear the dirty bit, flush.
 */
import path from 'node:path';
import { BlockError, strerror, toBlockError } from '../../block/errors.js';
import { Req } from '../../block/flags.js';
import { flush, preadv, pwritev } from '../../block/io.js';
import { ChildRole, type BdrvChild, type BlockNode } from '../../block/node.js';
import { debugEvent } from '../../block/debug-event.js';
import { fullBackingFilename } from '../../block/create.js';
import type { OpenContext } from '../../block/driver.js';
import type { OptionTree } from '../../block/keyval.js';
import { MetadataCache, type CacheEntry } from './cache.js';
import { ByteWriter } from './cursor.js';
import { AUTOCLEAR_KNOWN_MASK, HeaderBytes, Incompat, Qcow2Geometry, Qcow2Version } from './format.js';
import { decodeHeaderCluster, headerClusterBytes, type Qcow2HeaderCluster } from './header.js';
import { flushFile, markClean, updateHeader, writeFile } from './header-io.js';
import { ImageLock } from './lock.js';
import { OverlapCheck, overlapCheck } from './overlap.js';
import { resolveOptions, type RawOptions } from './options.js';
import type { DirtyRepair } from './repair.js';
import { NO_SNAPSHOTS, inactiveL2Tables, readSnapshotExtents } from './snapshots.js';
import { entryOffset } from './l2.js';
import { stateOf, type Qcow2State } from './state.js';
import { invalidForWriting, reasonToError } from './validate.js';
import { loadQcow2Bitmaps } from './bitmap-load.js';
import { storeQcow2Bitmaps } from './bitmap-store.js';

/** The files being opened above a backing file, outermost first (see the note at the top). */
export const BACKING_CHAIN = Symbol('qcow2 backing chain');

async function readFile(file: BdrvChild, offsetBytes: number, bytes: number): Promise<Uint8Array> {
  const buf = new Uint8Array(bytes);
  await preadv(file, offsetBytes, buf);
  return buf;
}

/** Reads and decodes cluster 0, or throws QEMU's reason. */
async function readHeaderCluster(file: BdrvChild): Promise<Qcow2HeaderCluster> {
  const fileBytes = file.node.totalBytes;
  const prefix = await readFile(file, 0, Math.min(HeaderBytes.V3, fileBytes));
  const cluster = await readFile(file, 0, Math.min(headerClusterBytes(prefix), fileBytes));
  const image = decodeHeaderCluster(cluster, fileBytes);
  if (typeof image === 'string') throw reasonToError(image);
  return image;
}

/** Refcount table entries as numbers (bits 9–63; Infinity beyond 2^53, refused when used). */
function decodeReftable(bytes: Uint8Array): Float64Array {
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  const table = new Float64Array(bytes.length / 8);
  for (let i = 0; i < table.length; i++) {
    const hi = view.getUint32(i * 8);
    const lo = view.getUint32(i * 8 + 4) & 0xfffffe00;
    table[i] = hi >= 0x200000 ? Infinity : hi * 2 ** 32 + (lo >>> 0);
  }
  return table;
}

/** Runs the dirty-bit repair and returns cluster 0 as it is afterwards, the dirty bit cleared if all is well. */
async function repairDirty(file: BdrvChild, image: Qcow2HeaderCluster, repair: DirtyRepair, warn: Qcow2State['warn']) {
  let result;
  try {
    result = await repair({ file, image, warn });
  } catch (e) {
    throw toBlockError(e, 'Could not repair dirty image');
  }
  if (result.checkErrors > 0) throw new BlockError('EIO', 'Could not repair dirty image: Input/output error');
  const repaired = await readHeaderCluster(file);
  if (result.corruptions === 0) {
    repaired.header.incompatibleFeatures &= ~Incompat.DIRTY;
    const buf = new Uint8Array(8);
    new ByteWriter(buf).u64(repaired.header.incompatibleFeatures);
    await pwritev(file, 72, buf);
    await flush(file.node);
  }
  return repaired;
}

function warnStaleBitmaps(image: Qcow2HeaderCluster, warn: Qcow2State['warn']): void {
  if (!image.extensions.staleBitmaps) return;
  warn(
    image.header.version < Qcow2Version.V3
      ? 'This qcow2 v2 image contains bitmaps, but they may have been modified by a program without persistent bitmap support; so now they must all be considered inconsistent'
      : 'a program lacking bitmap support modified this file, so all bitmaps are now considered inconsistent',
  );
  warn("Some clusters may be leaked, run 'qemu-img check -r' on the image file to fix.", true);
}

/** The node's state from the decoded header and the tables read from the file. */
async function buildState(node: BlockNode, ctx: OpenContext, file: BdrvChild, image: Qcow2HeaderCluster, raw: RawOptions): Promise<Qcow2State> {
  const h = image.header;
  const geometry = new Qcow2Geometry(h.clusterBits, h.refcountOrder);
  const c = geometry.clusterBytes;
  const opts = resolveOptions(raw, h, c);
  const l1 = await readFile(file, h.l1TableOffset, h.l1Entries * 8);
  const reftable = decodeReftable(await readFile(file, h.refcountTableOffset, h.refcountTableClusters * c));
  const snapshots = h.snapshotCount === 0 ? NO_SNAPSHOTS : await readSnapshotExtents((o, b) => readFile(file, o, b), h.snapshotsOffset, h.snapshotCount);
  if (typeof snapshots === 'string') throw new BlockError('EFBIG', snapshots);
  let s: Qcow2State;
  const io = (ignore: number) => ({
    read: (offset: number, buf: Uint8Array) => {
      if (ignore === OverlapCheck.ACTIVE_L2) debugEvent(file, 'l2_load');
      return preadv(file, offset, buf);
    },
    write: async (entry: CacheEntry) => {
      await overlapCheck(s, ignore, entry.offset, entry.data.length);
      debugEvent(file, ignore === OverlapCheck.ACTIVE_L2 ? 'l2_update' : 'refblock_update_part');
      await writeFile(s, entry.offset, entry.data);
    },
    flushFile: () => flushFile(s),
  });
  s = {
    node, graph: ctx.graph, file, get backing() { return node.cowChild; }, geometry, clusterBytes: c, image,
    l1, l1View: new DataView(l1.buffer), reftable, maxReftableIndex: -1,
    l2Cache: new MetadataCache('L2', opts.l2CacheEntries, c, io(OverlapCheck.ACTIVE_L2)),
    refcountCache: new MetadataCache('refcount', opts.refcountCacheEntries, c, io(OverlapCheck.REFCOUNT_BLOCK)),
    lock: new ImageLock(), opts, writable: !node.readOnly, usable: true, corruptionSignalled: false,
    freeClusterIndex: 0, freeByteOffset: 0, allocations: new Set(), inplace: new Set(), discards: [], cacheDiscards: false,
    l2Tables: new Set(), refblocks: new Set(), snapshots, inactiveL2Tables: null,
    metadataPreallocation: null, compressedCache: null, assembly: [],
    warn: (message, verbatim) => ctx.graph.onWarning(message, verbatim ? { verbatim: true } : undefined),
  };
  for (let i = 0; i < h.l1Entries; i++) {
    const offset = entryOffset(s.l1View.getUint32(i * 8), s.l1View.getUint32(i * 8 + 4));
    if (offset !== 0) s.l2Tables.add(offset);
  }
  for (let i = 0; i < reftable.length; i++) {
    if (reftable[i]) {
      s.refblocks.add(reftable[i]!);
      s.maxReftableIndex = i;
    }
  }
  if (opts.overlapMask & OverlapCheck.INACTIVE_L2) s.inactiveL2Tables = await inactiveL2Tables(s, (o, b) => readFile(file, o, b));
  return s;
}

/** qcow2_do_open (see the note at the top). */
export async function openQcow2(node: BlockNode, raw: RawOptions, ctx: OpenContext, repair: DirtyRepair): Promise<void> {
  const file = (await ctx.openChild('file', ChildRole.DATA | ChildRole.METADATA | ChildRole.PRIMARY))!;
  const warn: Qcow2State['warn'] = (message, verbatim) => ctx.graph.onWarning(message, verbatim ? { verbatim: true } : undefined);
  let image = await readHeaderCluster(file);
  const writable = !node.readOnly;
  const refusal = writable ? invalidForWriting(image.header) : null;
  if (refusal) throw reasonToError(refusal);
  resolveOptions(raw, image.header, 2 ** image.header.clusterBits);
  warnStaleBitmaps(image, warn);
  if (writable && image.header.incompatibleFeatures & Incompat.DIRTY) image = await repairDirty(file, image, repair, warn);
  const s = await buildState(node, ctx, file, image, raw);
  node.opaque = s;
  const h = image.header;
  const fixHeader = writable && (h.autoclearFeatures & ~AUTOCLEAR_KNOWN_MASK || image.extensions.staleBitmaps);
  if (fixHeader) {
    h.autoclearFeatures &= AUTOCLEAR_KNOWN_MASK;
    image.extensions.staleBitmaps = false;
  }
  const headerWritten = await loadQcow2Bitmaps(s);
  if (fixHeader && !headerWritten) await updateHeader(s);
  node.limits.requestAlignment = 1;
  node.limits.pwriteZeroesAlignment = s.clusterBytes;
  node.limits.pdiscardAlignment = s.clusterBytes;
  node.supportedZeroFlags = h.version >= Qcow2Version.V3 ? Req.MAY_UNMAP | Req.NO_FALLBACK : 0;
  await openBacking(node, s, raw, ctx);
}

/** Attaches the backing child: from the options, else from the header (see the note at the top). */
async function openBacking(node: BlockNode, s: Qcow2State, raw: RawOptions, ctx: OpenContext): Promise<void> {
  if (raw.backing !== undefined) {
    if (raw.backing !== null) await ctx.openChild('backing', ChildRole.COW);
    return;
  }
  if (node.noBacking) return;
  const name = s.image.backingName;
  if (name === null) return;
  const filename = fullBackingFilename(s.file.node.filename, name);
  const ancestors = ((node.options as Record<symbol, unknown>)[BACKING_CHAIN] as string[] | undefined) ?? [path.resolve(s.file.node.filename)];
  const resolved = path.resolve(filename);
  try {
    if (ancestors.includes(resolved)) throw new BlockError('ELOOP', `Backing file '${name}' creates an infinite loop.`);
    const options: OptionTree & Record<symbol, unknown> = { [BACKING_CHAIN]: [...ancestors, resolved] };
    const child = await ctx.graph.openImage(filename, {
      format: s.image.extensions.backingFormat ?? undefined,
      readOnly: true,
      forceShare: node.forceShare || undefined,
      options,
      inherit: { unmap: node.openFlags.unmap, direct: node.openFlags.direct, noFlush: node.openFlags.noFlush },
    });
    try {
      ctx.graph.attach(node, 'backing', ChildRole.COW, child);
    } catch (e) {
      await ctx.graph.unref(child);
      throw e;
    }
  } catch (e) {
    throw toBlockError(e, 'Could not open backing file');
  }
}

/**
 * qcow2_close (qcow2_inactivate): persistent bitmaps stored, caches
 * written, dirty bit cleared, file flushed (writable, usable images). When
 * the bitmaps cannot be stored the rest still happens but the image is not
 * marked clean, and the close fails with QEMU's "Lost persistent bitmaps"
 * message. A cache that cannot be written back is reported as QEMU's
 * error_report does ("Failed to flush the L2 table cache: …", through the
 * graph's warning channel), leaves the image dirty, and does not fail the
 * close (qcow2_close ignores it).
 */
export async function closeQcow2(node: BlockNode): Promise<void> {
  const s = stateOf(node);
  if (!s || !s.writable || !s.usable) return;
  await s.lock.run(async () => {
    const lost = await storeQcow2Bitmaps(s).then(
      () => null,
      (e: unknown) => toBlockError(e, `Lost persistent bitmaps during inactivation of node '${node.nodeName}'`),
    );
    const l2Written = await flushCacheAtClose(s, s.l2Cache, 'L2 table');
    const refcountsWritten = await flushCacheAtClose(s, s.refcountCache, 'refcount block');
    if (l2Written && refcountsWritten) {
      if (!lost) await markClean(s);
      await flushFile(s);
    }
    if (lost) throw lost;
  });
}

/** qcow2_cache_flush at close: a failure is reported, not thrown; returns whether the cache reached the disk. */
async function flushCacheAtClose(s: Qcow2State, cache: MetadataCache, what: string): Promise<boolean> {
  try {
    await cache.flush();
    return true;
  } catch (e) {
    s.graph.onWarning(`Failed to flush the ${what} cache: ${strerror(toBlockError(e).code)}`, { error: true });
    return false;
  }
}
