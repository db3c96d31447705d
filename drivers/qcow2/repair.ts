/*
 * Repairing the refcounts of a dirty image at open (QEMU runs
 * qcow2_co_check_locked with BDRV_FIX_ERRORS | BDRV_FIX_LEAKS when a
 * writable open finds the dirty bit, which lazy refcounts leave set after a
 * crash).
 *
 * The driver calls a `DirtyRepair` before it loads any refcount structure,
 * with the image file and the decoded header; afterwards it reads the
 * header again (the refcount table may have moved) and clears the dirty bit
 * when no corruption is left. A repair that reports check errors fails the
 * open ("Could not repair dirty image").
 *
 * The repair itself is `qemu-img check -r all`'s (check.ts
 * `repairDirtyImage`), so a repair at open prints and does exactly what
 * QEMU's does.
 */
import type { BdrvChild } from '../../block/node.js';
import type { Qcow2HeaderCluster } from './header.js';

export interface RepairTarget {
  /** The image file, opened writable. */
  file: BdrvChild;
  /** Cluster 0 as decoded by the driver (dirty bit set). */
  image: Qcow2HeaderCluster;
  warn(message: string, verbatim?: boolean): void;
}

export interface RepairResult {
  /** Problems that kept the repair from completing (QEMU's check_errors): the open fails. */
  checkErrors: number;
  /** Corruptions found and left (the open goes on; the dirty bit stays set). */
  corruptions: number;
}

/** What the driver calls to repair a dirty image; see the note at the top. */
export type DirtyRepair = (target: RepairTarget) => Promise<RepairResult>;

