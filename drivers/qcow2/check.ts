/*
 * `qemu-img check` for qcow2 (QEMU 7.2's qcow2_co_check_locked and
 * qcow2_check_refcounts), working on the image file directly so that it
 * can examine and repair images the driver would refuse.
 *
 * A check pass, in QEMU's order:
 *   1. the snapshot table is read (check-snapshots.ts);
 *   2. an in-memory refcount table is built from every reference the
 *      metadata makes (calculate_refcounts): the header cluster, the active
 *      L1 table with its L2 tables and clusters (check-tables.ts), each
 *      snapshot's L1 table likewise, the snapshot table, the refcount
 *      table, the bitmaps (check-bitmaps.ts) and the refcount blocks
 *      (check-rebuild.ts);
 *   3. it is compared with the refcounts on disk; with -r all a structure
 *      too broken to repair in place is rebuilt from it, then counted and
 *      compared again, the old structure's clusters being repaired as
 *      leaks;
 *   4. COPIED flags are checked against the refcounts (and repaired);
 *   5. with -r all, a snapshot table step 1 found corruptions in (entries
 *      dropped or incomplete) is written anew (check-snapshots.ts, with
 *      the allocator of check-alloc.ts on the refcounts just repaired);
 *   6. a repairing pass that leaves no corruption and no internal error
 *      clears the dirty and corrupt bits.
 * Every message goes to the `report` callback as QEMU prints it (fprintf
 * lines, or error_report lines the caller prefixes with "prog: "), during
 * the pass; the counters come back as QEMU's BdrvCheckResult. A pass that
 * cannot go on (QEMU's ret < 0) returns the errno qemu-img prints after
 * "Check failed: ".
 *
 * Limits: QEMU refuses files of more than INT_MAX clusters (EFBIG); the
 * in-memory refcount table is refused past IMRT_MAX_BYTES (check-imrt.ts).
 *
 * Left out (see also the notes of each file): external data files,
 * extended L2 entries, compression types other than deflate and encrypted
 * images are refused at open (validate.ts), as the rest of this driver
 * does.
 */
import { BlockError, strerror, type ErrnoCode } from '../../block/errors.js';
import type { BdrvChild } from '../../block/node.js';
import {
  addCheckResult,
  CheckAbort,
  checkFileOf,
  emptyCheckResult,
  errnoOf,
  NO_FIX,
  type CheckFile,
  type CheckFix,
  type CheckReport,
  type CheckResult,
} from './check-io.js';
import { RefcountArray, incRefcounts, type Counting } from './check-imrt.js';
import { bitmapsOpenReason, checkBitmapsRefcounts } from './check-bitmaps.js';
import { checkFixSnapshotTable, checkReadSnapshotTable } from './check-snapshots.js';
import { checkOflagCopied, checkRefcountsL1 } from './check-tables.js';
import { checkRefblocks, compareRefcounts, rebuildRefcountStructure, type RebuildFlag } from './check-rebuild.js';
import { loadCheckState } from './check-load.js';
import type { CheckState } from './check-state.js';
import { hex } from './cursor.js';
import { Incompat, Limits, REFTABLE_ENTRY_BYTES } from './format.js';
import { reasonToError } from './validate.js';

export { checkFileOf, emptyCheckResult, NO_FIX } from './check-io.js';
export type { CheckFile, CheckFix, CheckReport, CheckResult, FragInfo } from './check-io.js';

/** QEMU refuses to check a file of more clusters than a C int holds. */
export const MAX_CHECK_CLUSTERS = 0x7fffffff;

/** The outcome of one check pass: the counters, and the errno when the pass could not finish. */
export interface CheckOutcome {
  result: CheckResult;
  failure: ErrnoCode | null;
}

export interface CheckOpenOptions {
  /** Where QEMU's warn_report warnings go (the tool adds "prog: warning: "). */
  warn?: (message: string) => void;
  /**
   * Do what QEMU's open does before a check: refuse broken bitmaps, and on
   * a writable file rewrite the header to drop unknown autoclear bits and a
   * stale bitmaps extension. Default true; false for a driver that has
   * opened the image itself and repairs it (repairDirtyImage).
   */
  openChecks?: boolean;
}

/**
 * A qcow2 image opened for checking: the state QEMU keeps in its BDS while
 * `qemu-img check` runs, shared by a repairing pass and the pass after it.
 */
export class Qcow2Checker {
  private constructor(readonly state: CheckState) {}

  /**
   * Opens `file` as QEMU opens an image for a check (BDRV_O_CHECK): the
   * corrupt and dirty bits are no obstacle, the snapshot table is not read
   * and a missing refcount table is allowed. Returns QEMU's reason when
   * even that open fails ("Could not open 'x': <reason>").
   */
  static async open(file: CheckFile, report: CheckReport, opts: CheckOpenOptions = {}): Promise<Qcow2Checker | string> {
    const openChecks = opts.openChecks ?? true;
    const warn = opts.warn ?? ((m: string) => report(`warning: ${m}`, 'error'));
    const state = await loadCheckState(file, report, openChecks ? warn : null);
    if (typeof state === 'string') return state;
    const bitmaps = openChecks ? await bitmapsOpenReason(state) : null;
    return bitmaps ?? new Qcow2Checker(state);
  }

  /** Writes the cached refcount blocks back (qcow2_cache_flush), unless a fatal corruption made the image unusable. */
  async flush(): Promise<void> {
    const s = this.state;
    if (s.unusable || !s.file.writable) return;
    await s.refcounts.flush();
    await s.file.flush();
  }

  /**
   * What closing a writable image does (qcow2_close, qcow2_inactivate): the
   * cached refcount blocks are written and, if that worked, the dirty bit
   * is cleared — even when the check left the refcounts wrong, as QEMU
   * does. Nothing is written once a fatal corruption made the image
   * unusable (QEMU no longer has a driver to close).
   */
  async close(): Promise<void> {
    const s = this.state;
    if (s.unusable || !s.file.writable) return;
    try {
      await s.refcounts.flush();
    } catch (e) {
      s.report(`Failed to flush the refcount block cache: ${strerror(errnoOf(e))}`, 'error');
      return;
    }
    await s.clearIncompatible(Incompat.DIRTY).catch(() => undefined);
    await s.file.flush();
  }

  /** qcow2_co_check_locked: one pass, repairing what `fix` allows. */
  async check(fix: CheckFix = NO_FIX): Promise<CheckOutcome> {
    const s = this.state;
    const result = emptyCheckResult();
    if (s.unusable) return { result, failure: 'ENOMEDIUM' };
    const snapshotRes = emptyCheckResult();
    const refcountRes = emptyCheckResult();
    try {
      await checkReadSnapshotTable(s, snapshotRes, fix);
    } catch (e) {
      addCheckResult(result, snapshotRes, false);
      return { result, failure: errnoOf(e) };
    }
    try {
      await checkRefcounts(s, refcountRes, fix);
    } catch (e) {
      addCheckResult(result, refcountRes, true);
      addCheckResult(result, snapshotRes, false);
      return { result, failure: errnoOf(e) };
    }
    addCheckResult(result, refcountRes, true);
    try {
      await checkFixSnapshotTable(s, snapshotRes, fix);
    } catch (e) {
      addCheckResult(result, snapshotRes, false);
      return { result, failure: errnoOf(e) };
    }
    addCheckResult(result, snapshotRes, false);
    if ((fix.leaks || fix.errors) && result.checkErrors === 0 && result.corruptions === 0) {
      try {
        await s.clearIncompatible(Incompat.DIRTY);
        await s.clearIncompatible(Incompat.CORRUPT);
      } catch (e) {
        return { result, failure: errnoOf(e) };
      }
    }
    return { result, failure: null };
  }
}

/**
 * The repair a qcow2 driver runs when a writable open finds the dirty bit
 * (QEMU's qcow2_do_open: qcow2_co_check_locked with BDRV_FIX_ERRORS |
 * BDRV_FIX_LEAKS). Call it with the image file before loading any
 * refcount structure (or after dropping the caches), then read the header
 * again: the refcount table may have moved, and the dirty and corrupt bits
 * are cleared when nothing is left to repair. A pass that cannot finish
 * throws its errno as a BlockError (QEMU: "Could not repair dirty image:
 * <strerror>"); check errors in the result must fail the open too. The
 * check's messages go to `warn`, verbatim, one line each.
 */
export async function repairDirtyImage(target: { file: BdrvChild; warn(message: string, verbatim?: boolean): void }): Promise<{
  checkErrors: number;
  corruptions: number;
}> {
  const report: CheckReport = (line, kind) => target.warn(kind === 'unterminated' ? line : `${line}\n`, true);
  const checker = await Qcow2Checker.open(checkFileOf(target.file), report, { openChecks: false });
  if (typeof checker === 'string') throw reasonToError(checker);
  const outcome = await checker.check({ leaks: true, errors: true });
  await checker.flush();
  if (outcome.failure !== null) throw new BlockError(outcome.failure);
  return { checkErrors: outcome.result.checkErrors, corruptions: outcome.result.corruptions };
}

/** Opens, checks once and closes `file` (see Qcow2Checker); a reason string when it cannot be opened. */
export async function checkImage(file: CheckFile, opts: { repair?: 'leaks' | 'all' }, report: CheckReport): Promise<CheckOutcome | string> {
  const checker = await Qcow2Checker.open(file, report);
  if (typeof checker === 'string') return checker;
  try {
    return await checker.check({ leaks: opts.repair !== undefined, errors: opts.repair === 'all' });
  } finally {
    await checker.close();
  }
}

/** qcow2_check_refcounts. Throws CheckAbort (or a BlockError) when the pass cannot go on. */
async function checkRefcounts(s: CheckState, res: CheckResult, fix: CheckFix): Promise<void> {
  const g = s.geometry;
  const clusters = g.clustersFor(s.file.lengthBytes);
  if (clusters > MAX_CHECK_CLUSTERS) {
    res.checkErrors++;
    throw new CheckAbort('EFBIG');
  }
  res.bfi.totalClusters = g.clustersFor(Math.floor(s.header.virtualBytes / 512) * 512);
  const c: Counting = { s, imrt: new RefcountArray(g, s.report), res };
  const flag: RebuildFlag = { rebuild: false };
  await calculateRefcounts(c, fix, flag, clusters);
  const preCompare = cloneResult(res);
  let highest = await compareRefcounts(c, NO_FIX, flag);
  if (flag.rebuild && fix.errors) {
    highest = await rebuildAndRecount(c, fix, flag, highest);
  } else if (fix.leaks || fix.errors) {
    if (flag.rebuild) {
      s.report('ERROR need to rebuild refcount structures');
      res.checkErrors++;
      throw new CheckAbort('EIO');
    }
    if (res.leaks || res.corruptions) {
      Object.assign(res, cloneResult(preCompare));
      highest = await compareRefcounts(c, fix, flag);
    }
  }
  await checkOflagCopied(s, res, fix);
  res.imageEndOffset = (highest + 1) * g.clusterBytes;
}

/** The -r all path of qcow2_check_refcounts once a rebuild is needed. */
async function rebuildAndRecount(c: Counting, fix: CheckFix, flag: RebuildFlag, highest: number): Promise<number> {
  const { s, res } = c;
  const old = cloneResult(res);
  let freshLeaks = 0;
  s.report('Rebuilding refcount structure');
  await rebuildRefcountStructure(c);
  res.corruptions = 0;
  res.leaks = 0;
  flag.rebuild = false;
  c.imrt.clear();
  await calculateRefcounts(c, NO_FIX, flag, c.imrt.entries);
  if (fix.leaks) {
    const saved = cloneResult(res);
    Object.assign(res, emptyCheckResult());
    highest = await compareRefcounts(c, { leaks: true, errors: false }, flag);
    if (flag.rebuild) s.report('ERROR rebuilt refcount structure is still broken');
    freshLeaks = res.leaks;
    Object.assign(res, saved);
  }
  if (res.corruptions < old.corruptions) res.corruptionsFixed += old.corruptions - res.corruptions;
  if (res.leaks < old.leaks) res.leaksFixed += old.leaks - res.leaks;
  res.leaks += freshLeaks;
  return highest;
}

/** calculate_refcounts: every reference the metadata makes, counted into `c.imrt`. */
async function calculateRefcounts(c: Counting, fix: CheckFix, flag: RebuildFlag, clusters: number): Promise<void> {
  const { s, res } = c;
  const h = s.header;
  if (c.imrt.entries === 0) {
    try {
      c.imrt.resize(clusters);
    } catch (e) {
      res.checkErrors++;
      throw e;
    }
  }
  incRefcounts(c, 0n, s.geometry.clusterBytes);
  await checkRefcountsL1(c, { offset: BigInt(h.l1TableOffset), entries: h.l1Entries, active: true, fix });
  for (const sn of s.snapshots) {
    if (sn.l1TableOffset % BigInt(s.geometry.clusterBytes) !== 0n) {
      s.report(
        `ERROR snapshot ${sn.idStr} (${sn.name}) l1_offset=${hex(sn.l1TableOffset)}: L1 table is not cluster aligned; snapshot table entry corrupted`,
      );
      res.corruptions++;
      continue;
    }
    if (sn.l1Entries > Limits.MAX_L1_BYTES / 8) {
      s.report(
        `ERROR snapshot ${sn.idStr} (${sn.name}) l1_size=${hex(sn.l1Entries)}: L1 table is too large; snapshot table entry corrupted`,
      );
      res.corruptions++;
      continue;
    }
    await checkRefcountsL1(c, { offset: sn.l1TableOffset, entries: sn.l1Entries, active: false, fix });
  }
  incRefcounts(c, BigInt(h.snapshotsOffset), s.snapshotsBytes);
  incRefcounts(c, BigInt(h.refcountTableOffset), s.reftableEntries * REFTABLE_ENTRY_BYTES);
  await checkBitmapsRefcounts(c);
  await checkRefblocks(c, fix, flag);
}

function cloneResult(r: CheckResult): CheckResult {
  return { ...r, bfi: { ...r.bfi } };
}
