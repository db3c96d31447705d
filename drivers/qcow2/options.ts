/*
 * The qcow2 blockdev keys (QEMU's qcow2_runtime_opts / BlockdevOptionsQcow2)
 * and how they resolve at open (qcow2_update_options_prepare and
 * read_cache_sizes), with QEMU's messages:
 *   lazy-refcounts           default: the image's compatible bit; v3 only
 *   pass-discard-request     default on (requests reach qcow2 only with
 *                            discard=unmap, so this matches QEMU's default)
 *   pass-discard-snapshot    default on; pass-discard-other default off
 *   overlap-check            none | constant | cached (default) | all, or
 *                            { template, main-header, active-l1, … } booleans
 *   cache-size, l2-cache-size, refcount-cache-size   bytes, as QEMU splits
 *                            them; l2-cache-entry-size is checked and
 *                            otherwise ignored (entries are whole tables)
 *   cache-clean-interval     accepted, not used (no timers)
 * The L2 cache defaults to what maps the whole disk, at most 32 MiB; the
 * refcount cache to 4 clusters; each has QEMU's minimum (2 and 4 entries).
 */
import { z } from 'zod';
import { BlockError } from '../../block/errors.js';
import { isPowerOfTwo } from '../../block/flags.js';
import { zBlockdevRef, zBool, zInt, zSize } from '../../block/options.js';
import { Compat, Qcow2Version } from './format.js';
import type { Qcow2Header } from './header.js';
import { OVERLAP_KEYS, OVERLAP_TEMPLATES, type OverlapTemplate } from './overlap.js';
import { DiscardType, type Qcow2Options } from './state.js';

/** QEMU's DEFAULT_L2_CACHE_MAX_SIZE on Linux. */
export const DEFAULT_L2_CACHE_MAX_BYTES = 32 << 20;
/** MIN_L2_CACHE_SIZE (entries) and MIN_REFCOUNT_CACHE_SIZE (clusters). */
export const MIN_L2_CACHE_ENTRIES = 2;
export const MIN_REFCOUNT_CACHE_ENTRIES = 4;
const MIN_CLUSTER_BYTES = 512;

const overlapFlags = Object.fromEntries(OVERLAP_KEYS.map(([key]) => [key, zBool(`overlap-check.${key}`).optional()]));

export const optionsSchema = z.object({
  file: zBlockdevRef.optional(),
  backing: zBlockdevRef.nullable().optional(),
  'lazy-refcounts': zBool('lazy-refcounts').optional(),
  'pass-discard-request': zBool('pass-discard-request').optional(),
  'pass-discard-snapshot': zBool('pass-discard-snapshot').optional(),
  'pass-discard-other': zBool('pass-discard-other').optional(),
  'overlap-check': z.union([z.string(), z.object({ template: z.string().optional(), ...overlapFlags }).strict()]).optional(),
  'cache-size': zSize('cache-size').optional(),
  'l2-cache-size': zSize('l2-cache-size').optional(),
  'l2-cache-entry-size': zSize('l2-cache-entry-size').optional(),
  'refcount-cache-size': zSize('refcount-cache-size').optional(),
  'cache-clean-interval': zInt('cache-clean-interval', { max: 0xffffffff }).optional(),
});
export type RawOptions = z.output<typeof optionsSchema>;

function overlapMask(value: RawOptions['overlap-check']): number {
  const object = typeof value === 'object' ? value : undefined;
  const template = (typeof value === 'string' ? value : object?.template) ?? 'cached';
  if (!Object.prototype.hasOwnProperty.call(OVERLAP_TEMPLATES, template)) {
    throw new BlockError(
      'EINVAL',
      `Unsupported value '${template}' for qcow2 option 'overlap-check'. Allowed are any of the following: none, constant, cached, all`,
    );
  }
  let mask: number = OVERLAP_TEMPLATES[template as OverlapTemplate];
  for (const [key, bit] of OVERLAP_KEYS) {
    const flag = (object as Record<string, unknown> | undefined)?.[key];
    if (flag === true) mask |= bit;
    if (flag === false) mask &= ~bit;
  }
  return mask;
}

/** read_cache_sizes: bytes of L2 cache and refcount cache. */
function cacheSizes(o: RawOptions, clusterBytes: number, virtualBytes: number): { l2Bytes: number; refcountBytes: number } {
  const minRefcount = MIN_REFCOUNT_CACHE_ENTRIES * clusterBytes;
  const maxL2 = Math.ceil((Math.ceil(virtualBytes / clusterBytes) * 8) / clusterBytes) * clusterBytes;
  const l2Setting = o['l2-cache-size'] ?? DEFAULT_L2_CACHE_MAX_BYTES;
  let l2Bytes = Math.min(maxL2, l2Setting);
  let refcountBytes = o['refcount-cache-size'] ?? 0;
  const combined = o['cache-size'];
  if (combined !== undefined) {
    const l2Set = o['l2-cache-size'] !== undefined;
    const refcountSet = o['refcount-cache-size'] !== undefined;
    if (l2Set && refcountSet) throw new BlockError('EINVAL', 'cache-size, l2-cache-size and refcount-cache-size may not be set at the same time');
    if (l2Set && l2Setting > combined) throw new BlockError('EINVAL', 'l2-cache-size may not exceed cache-size');
    if (refcountBytes > combined) throw new BlockError('EINVAL', 'refcount-cache-size may not exceed cache-size');
    if (l2Set) refcountBytes = combined - l2Bytes;
    else if (refcountSet) l2Bytes = combined - refcountBytes;
    else if (combined >= maxL2 + minRefcount) {
      l2Bytes = maxL2;
      refcountBytes = combined - l2Bytes;
    } else {
      refcountBytes = Math.min(combined, minRefcount);
      l2Bytes = combined - refcountBytes;
    }
  }
  const entrySize = o['l2-cache-entry-size'];
  if (entrySize !== undefined && (entrySize < MIN_CLUSTER_BYTES || entrySize > clusterBytes || !isPowerOfTwo(entrySize))) {
    throw new BlockError('EINVAL', `L2 cache entry size must be a power of two between ${MIN_CLUSTER_BYTES} and the cluster size (${clusterBytes})`);
  }
  return { l2Bytes, refcountBytes };
}

/** The runtime options of an image with this header (qcow2_update_options_prepare). */
export function resolveOptions(o: RawOptions, header: Qcow2Header, clusterBytes: number): Qcow2Options {
  const { l2Bytes, refcountBytes } = cacheSizes(o, clusterBytes, header.virtualBytes);
  const lazyRefcounts = o['lazy-refcounts'] ?? (header.compatibleFeatures & Compat.LAZY_REFCOUNTS) !== 0n;
  if (lazyRefcounts && header.version < Qcow2Version.V3) {
    throw new BlockError('EINVAL', 'Lazy refcounts require a qcow2 image with at least qemu 1.1 compatibility level');
  }
  const passDiscard: boolean[] = [];
  passDiscard[DiscardType.NEVER] = false;
  passDiscard[DiscardType.ALWAYS] = true;
  passDiscard[DiscardType.REQUEST] = o['pass-discard-request'] ?? true;
  passDiscard[DiscardType.SNAPSHOT] = o['pass-discard-snapshot'] ?? true;
  passDiscard[DiscardType.OTHER] = o['pass-discard-other'] ?? false;
  return {
    lazyRefcounts,
    passDiscard,
    overlapMask: overlapMask(o['overlap-check']),
    l2CacheEntries: Math.max(MIN_L2_CACHE_ENTRIES, Math.floor(l2Bytes / clusterBytes)),
    refcountCacheEntries: Math.max(MIN_REFCOUNT_CACHE_ENTRIES, Math.floor(refcountBytes / clusterBytes)),
  };
}
