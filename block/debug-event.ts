/*
 * Debug events (QEMU's BlkdebugEvent and BLKDBG_EVENT): named points in a
 * format driver's work — "about to write guest data", "loading an L2
 * table", "allocating a cluster" — that a driver announces to the node it
 * is about to use, normally its `file` child.
 *
 * Only a node whose driver listens (blkdebug, which turns events into
 * state changes and armed error-injection rules) does anything with one;
 * every other driver's `debugEvent` is the shared no-op that
 * normaliseDriver supplies, so firing costs one property load and one
 * empty call on the hot paths (raw and qcow2 reads and writes). Events are
 * synchronous: they never wait and never fail.
 *
 * Which events fire where follows QEMU 7.2: raw fires read_aio and
 * write_aio on its file before passing a read or write down (nothing for
 * write-zeroes or discard); qcow2 fires its data and metadata events on its
 * file (see the drivers); the gate fires flush_to_os and flush_to_disk on
 * the primary child of a node it flushes, as bdrv_co_flush does. The
 * generic write events (pwritev*, pwritev_rmw_*) are not fired.
 */
import type { BdrvChild } from './node.js';

/** QAPI's BlkdebugEvent values, in QEMU 7.2's order. */
export const BLKDEBUG_EVENTS = [
  'l1_update', 'l1_grow_alloc_table', 'l1_grow_write_table', 'l1_grow_activate_table',
  'l2_load', 'l2_update', 'l2_update_compressed', 'l2_alloc_cow_read', 'l2_alloc_write',
  'read_aio', 'read_backing_aio', 'read_compressed',
  'write_aio', 'write_compressed',
  'vmstate_load', 'vmstate_save',
  'cow_read', 'cow_write',
  'reftable_load', 'reftable_grow', 'reftable_update',
  'refblock_load', 'refblock_update', 'refblock_update_part', 'refblock_alloc',
  'refblock_alloc_hookup', 'refblock_alloc_write', 'refblock_alloc_write_blocks',
  'refblock_alloc_write_table', 'refblock_alloc_switch_table',
  'cluster_alloc', 'cluster_alloc_bytes', 'cluster_free',
  'flush_to_os', 'flush_to_disk',
  'pwritev_rmw_head', 'pwritev_rmw_after_head', 'pwritev_rmw_tail', 'pwritev_rmw_after_tail',
  'pwritev', 'pwritev_zero', 'pwritev_done',
  'empty_image_prepare', 'l1_shrink_write_table', 'l1_shrink_free_l2_clusters',
  'cor_write', 'cluster_alloc_space', 'none',
] as const;

export type BlkdebugEvent = (typeof BLKDEBUG_EVENTS)[number];

/** BLKDBG_EVENT(child, event): tells the child's node (if any) that `event` is happening. */
export function debugEvent(child: BdrvChild | null, event: BlkdebugEvent): void {
  if (child !== null) child.node.driver.debugEvent(child.node, event);
}
