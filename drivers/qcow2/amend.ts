/*
 * qemu-img amend for qcow2 (QEMU 7.2's qcow2_amend_options, qcow2_upgrade,
 * qcow2_downgrade).
 *
 * The options (`QCOW2_AMEND_OPTS`, QEMU's qcow2_amend_opts) arrive checked
 * by type; only the ones the user gave count. They are read in the list's
 * order, which decides which refusal comes first: encryption options
 * (there is no encryption here: "encryption not present"), the size, the
 * compat level ("Unknown compatibility level X"), the backing file and
 * format (checked later), the external data file options (there are none
 * here, so data_file and data_file_raw=on are refused), lazy_refcounts and
 * refcount_bits (a power of two up to 64).
 *
 * Then, in QEMU's order, each step a durable change of its own:
 *   1. upgrade to v3 (compat=1.1): snapshot table entries too short for v3
 *      are rewritten in full (snapshots.ts), then the header;
 *   2. the refcount width (refcount-order.ts), v3 only unless 16 bits;
 *   3. the header is rewritten (whatever changed);
 *   4. backing_file/backing_fmt: refused unless equal to what the image
 *      has ("Cannot amend the backing file", and a hint to use rebase);
 *   5. lazy refcounts: on needs v3; off writes the caches back and clears
 *      the dirty bit first (an image dirty when opened was repaired then);
 *   6. size: a resize through the caller's BlockBackend (it may shrink:
 *      amend passes no --shrink);
 *   7. downgrade to v2 (compat=0.10): needs 16-bit refcounts and snapshots
 *      of the current size with small VM states; the dirty bit is cleared,
 *      zero clusters expanded (zero-expand.ts), compatible and autoclear
 *      features dropped, the header rewritten as v2. Persistent bitmaps
 *      cannot exist in v2: QEMU leaves their clusters leaked and their
 *      extension stale; here the extension goes with the v2 header and
 *      their clusters are freed after it.
 * Progress is reported over the steps that take time (upgrade, refcount
 * width, downgrade), each an equal share.
 */
import { BlockError } from '../../block/errors.js';
import type { AmendRequest, CreateOptDesc } from '../../block/driver.js';
import { Req } from '../../block/flags.js';
import type { BlockNode } from '../../block/node.js';
import { parseWith, zBool } from '../../block/options.js';
import { loadBitmapDirectory } from './check-bitmaps.js';
import { checkFileOf, readAt } from './check-io.js';
import { QCOW2_CREATE_OPTS } from './create.js';
import { Compat, Incompat, Qcow2Version, TABLE_ENTRY_BYTES } from './format.js';
import { checkUsable, flushFile, markClean, updateHeader } from './header-io.js';
import { entryOffset } from './l2.js';
import { freeClusters } from './refcount.js';
import { changeRefcountOrder, type ProgressReport } from './refcount-order.js';
import { errnoError } from './failure-words.js';
import { writeSnapshotTable } from './snapshots.js';
import { DiscardType, stateOf, type Qcow2State } from './state.js';
import { expandZeroClusters } from './zero-expand.js';

const crypto = (name: string, help: string, type: CreateOptDesc['type'] = 'string'): CreateOptDesc => ({ name: `encrypt.${name}`, type, help });

/** QEMU's QCOW_COMMON_OPTIONS: what create and amend share (in create's list, in this order). */
const COMMON_OPTION_NAMES = new Set(['size', 'compat', 'backing_file', 'backing_fmt', 'data_file', 'data_file_raw', 'lazy_refcounts', 'refcount_bits']);

/** qcow2_amend_opts, in QEMU's order (which is also the order options are acted on). */
export const QCOW2_AMEND_OPTS: readonly CreateOptDesc[] = [
  crypto('state', 'Select new state of affected keyslots (active/inactive)'),
  crypto('keyslot', 'Select a single keyslot to modify explicitly', 'number'),
  crypto('old-secret', 'Select all keyslots that match this password'),
  crypto('new-secret', 'New secret to set in the matching keyslots. Empty string to erase'),
  crypto('iter-time', 'Time to spend in PBKDF in milliseconds', 'number'),
  ...QCOW2_CREATE_OPTS.filter((d) => COMMON_OPTION_NAMES.has(d.name)),
];

/** The 16-bit refcounts v2 images have. */
const V2_REFCOUNT_BITS = 16;
const MAX_REFCOUNT_BITS = 64;
const SECTOR_BYTES = 512n;
const U32_MAX = 0xffffffffn;
/** Snapshot extra data v3 requires: the 64-bit VM state size and the disk size. */
const V3_SNAPSHOT_EXTRA_BYTES = 16;

/** What the options ask for; unset fields keep the image's value. */
interface AmendPlan {
  version: number;
  /** 0: no resize (QEMU treats size=0 as not given). */
  sizeBytes: bigint;
  backing: { file: string | null; format: string | null } | null;
  lazyRefcounts: boolean;
  refcountBits: number;
}

/** bdrv_amend_options for qcow2 (see the note at the top). */
export async function amendQcow2(node: BlockNode, request: AmendRequest): Promise<void> {
  const s = stateOf(node);
  checkUsable(s);
  const oldVersion = s.image.header.version;
  const plan = readPlan(s, request.options);
  const refcountChange = plan.refcountBits !== s.geometry.refcountBits;
  const progress = stepProgress(request.progress, Number(plan.version !== oldVersion) + Number(refcountChange));
  if (plan.version > oldVersion) await s.lock.run(() => upgrade(s, progress()));
  if (refcountChange) {
    if (plan.version < Qcow2Version.V3 && plan.refcountBits !== V2_REFCOUNT_BITS) {
      throw new BlockError('EINVAL', 'Refcount widths other than 16 bits require compatibility level 1.1 or above (use compat=1.1 or greater)');
    }
    await s.lock.run(() => changeRefcountOrder(s, Math.log2(plan.refcountBits), progress()));
  }
  await s.lock.run(() => rewriteHeader(s));
  checkBacking(s, plan);
  if (plan.lazyRefcounts !== s.opts.lazyRefcounts) await s.lock.run(() => setLazyRefcounts(s, plan));
  if (plan.sizeBytes !== 0n) await request.resize(checkedSize(plan.sizeBytes));
  if (plan.version < oldVersion) await s.lock.run(() => downgrade(s, progress()));
  node.supportedZeroFlags = s.image.header.version >= Qcow2Version.V3 ? Req.MAY_UNMAP | Req.NO_FALLBACK : 0;
}

/** The options in QCOW2_AMEND_OPTS order, with the refusals QEMU makes while reading them. */
function readPlan(s: Qcow2State, options: ReadonlyMap<string, string>): AmendPlan {
  const h = s.image.header;
  const plan: AmendPlan = { version: h.version, sizeBytes: 0n, backing: null, lazyRefcounts: s.opts.lazyRefcounts, refcountBits: s.geometry.refcountBits };
  for (const desc of QCOW2_AMEND_OPTS) {
    const value = options.get(desc.name);
    if (value === undefined) continue;
    if (desc.name.startsWith('encrypt.')) throw new BlockError('EINVAL', "Can't amend encryption options - encryption not present");
    switch (desc.name) {
      case 'size':
        plan.sizeBytes = BigInt(value);
        break;
      case 'compat':
        plan.version = compatVersion(value);
        break;
      case 'backing_file':
      case 'backing_fmt':
        plan.backing ??= { file: null, format: null };
        if (desc.name === 'backing_file') plan.backing.file = value;
        else plan.backing.format = value;
        break;
      case 'data_file':
        throw new BlockError('EINVAL', 'data-file can only be set for images that use an external data file');
      case 'data_file_raw':
        if (parseWith(zBool(desc.name), value)) throw new BlockError('EINVAL', 'data-file-raw cannot be set on existing images');
        break;
      case 'lazy_refcounts':
        plan.lazyRefcounts = parseWith(zBool(desc.name), value);
        break;
      case 'refcount_bits':
        plan.refcountBits = refcountBits(value);
        break;
    }
  }
  return plan;
}

function compatVersion(value: string): number {
  if (value === '0.10' || value === 'v2') return Qcow2Version.V2;
  if (value === '1.1' || value === 'v3') return Qcow2Version.V3;
  throw new BlockError('EINVAL', `Unknown compatibility level ${value}`);
}

function refcountBits(value: string): number {
  const bits = Number(value);
  if (!(bits > 0 && bits <= MAX_REFCOUNT_BITS && Number.isInteger(Math.log2(bits)))) {
    throw new BlockError('EINVAL', 'Refcount width must be a power of two and may not exceed 64 bits');
  }
  return bits;
}

/** A new size qcow2_co_truncate would accept, with its refusals for sizes a number cannot hold. */
function checkedSize(sizeBytes: bigint): number {
  if (sizeBytes % SECTOR_BYTES !== 0n) throw new BlockError('EINVAL', `The new size must be a multiple of ${SECTOR_BYTES}`);
  if (sizeBytes > BigInt(Number.MAX_SAFE_INTEGER)) throw errnoError(new BlockError('EFBIG'), 'Failed to grow the L1 table');
  return Number(sizeBytes);
}

/** Hands out the progress reporter of each timed step in turn (qcow2_amend_helper_cb, simplified). */
function stepProgress(report: AmendRequest['progress'], steps: number): () => ProgressReport {
  let index = -1;
  return () => {
    const step = ++index;
    return (done, total) => report(step + (total > 0 ? done / total : 1), Math.max(steps, 1));
  };
}

/** Runs `work`; its failure becomes QEMU's error_setg_errno with `context`. */
async function withContext<T>(context: string, work: () => Promise<T>): Promise<T> {
  try {
    return await work();
  } catch (e) {
    throw errnoError(e, context);
  }
}

async function rewriteHeader(s: Qcow2State): Promise<void> {
  await withContext('Failed to update the image header', async () => {
    await updateHeader(s);
    await flushFile(s);
  });
}

/** qcow2_upgrade to v3 (lock held). */
async function upgrade(s: Qcow2State, progress: ProgressReport): Promise<void> {
  progress(0, 2);
  const list = s.snapshots.list;
  if (list.some((sn) => sn.extraDataBytes < V3_SNAPSHOT_EXTRA_BYTES)) {
    await withContext('Failed to update the snapshot table', () => writeSnapshotTable(s, list));
  }
  progress(1, 2);
  const h = s.image.header;
  h.version = Qcow2Version.V3;
  try {
    await rewriteHeader(s);
  } catch (e) {
    h.version = Qcow2Version.V2;
    throw e;
  }
  progress(2, 2);
}

function checkBacking(s: Qcow2State, plan: AmendPlan): void {
  if (plan.backing === null) return;
  if (plan.backing.file !== s.image.backingName || plan.backing.format !== s.image.extensions.backingFormat) {
    throw new BlockError('EINVAL', "Cannot amend the backing file\nYou can use 'qemu-img rebase' instead.");
  }
}

/** Turns lazy refcounts on (v3 only) or off (after making the image clean); lock held. */
async function setLazyRefcounts(s: Qcow2State, plan: AmendPlan): Promise<void> {
  const h = s.image.header;
  if (plan.lazyRefcounts && plan.version < Qcow2Version.V3) {
    throw new BlockError('EINVAL', 'Lazy refcounts only supported with compatibility level 1.1 and above (use compat=1.1 or greater)');
  }
  if (!plan.lazyRefcounts) await withContext('Failed to make the image clean', () => markClean(s));
  const old = h.compatibleFeatures;
  h.compatibleFeatures = plan.lazyRefcounts ? old | Compat.LAZY_REFCOUNTS : old & ~Compat.LAZY_REFCOUNTS;
  try {
    await rewriteHeader(s);
  } catch (e) {
    h.compatibleFeatures = old;
    throw e;
  }
  s.opts.lazyRefcounts = plan.lazyRefcounts;
}

/** Why qcow2_downgrade refuses, before it changes anything; null when it may go on. */
function downgradeRefusal(s: Qcow2State): string | null {
  if (s.geometry.refcountBits !== V2_REFCOUNT_BITS) return 'compat=0.10 requires refcount_bits=16';
  const sizeBytes = BigInt(s.image.header.virtualBytes);
  for (const sn of s.snapshots.list) {
    if (sn.vmStateBytes > U32_MAX || (sn.diskBytes ?? sizeBytes) !== sizeBytes) return 'Internal snapshots prevent downgrade of image';
  }
  return null;
}

/** qcow2_downgrade to v2 (lock held). */
async function downgrade(s: Qcow2State, progress: ProgressReport): Promise<void> {
  const refusal = downgradeRefusal(s);
  if (refusal !== null) throw new BlockError('ENOTSUP', refusal);
  const h = s.image.header;
  if (h.incompatibleFeatures & Incompat.DIRTY) await withContext('Failed to make the image clean', () => markClean(s));
  const left = h.incompatibleFeatures & ~Incompat.COMPRESSION;
  if (left !== 0n) throw new BlockError('ENOTSUP', `Cannot downgrade an image with incompatible features 0x${left.toString(16)} set`);
  h.compatibleFeatures = 0n;
  h.autoclearFeatures = 0n;
  s.opts.lazyRefcounts = false;
  await withContext('Failed to turn zero into data clusters', () => expandZeroClusters(s, progress));
  const bitmapClusters = await bitmapExtents(s);
  const saved = { bitmaps: s.image.extensions.bitmaps };
  s.image.extensions.bitmaps = null;
  h.version = Qcow2Version.V2;
  try {
    await rewriteHeader(s);
  } catch (e) {
    h.version = Qcow2Version.V3;
    s.image.extensions.bitmaps = saved.bitmaps;
    throw e;
  }
  for (const extent of bitmapClusters) await freeClusters(s, extent.offset, extent.bytes, DiscardType.OTHER);
}

/**
 * The clusters persistent bitmaps hold: directory, tables, data. A
 * directory that does not load gives none (its clusters stay leaked, as
 * QEMU leaves them).
 */
async function bitmapExtents(s: Qcow2State): Promise<Array<{ offset: number; bytes: number }>> {
  const ext = s.image.extensions.bitmaps;
  if (ext === null) return [];
  const file = checkFileOf(s.file);
  const list = await loadBitmapDirectory({ image: s.image, file, geometry: s.geometry, header: s.image.header });
  if (typeof list === 'string') return [];
  const extents = [{ offset: ext.directoryOffset, bytes: ext.directoryBytes }];
  for (const bm of list) {
    const table = new Uint8Array(bm.tableEntries * TABLE_ENTRY_BYTES);
    await readAt(file, bm.tableOffset, table);
    const view = new DataView(table.buffer);
    extents.push({ offset: bm.tableOffset, bytes: table.length });
    for (let i = 0; i < bm.tableEntries; i++) {
      const offset = entryOffset(view.getUint32(i * 8), view.getUint32(i * 8 + 4));
      if (offset !== 0 && offset % s.clusterBytes === 0) extents.push({ offset, bytes: s.clusterBytes });
    }
  }
  return extents;
}
