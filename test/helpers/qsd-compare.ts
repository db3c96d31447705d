/*
 * Comparing what one QMP script gave on qemu-storage-daemon and on ours:
 * a runner that runs the script on both (theirs first, each in its own
 * directory under `root`, results kept per name so a later case can look
 * at a known difference of the same run; QSD_JOBS_DUMP=<dir> writes both
 * results as JSON for diffing), and views that leave out what legitimately
 * differs (host offsets in qemu-img map, timing-dependent job fields).
 */
import fs from 'node:fs';
import path from 'node:path';
import { expect } from 'vitest';
import { QsdSession } from './qsd-script.js';

/** qemu-img compare's answer for equal images. */
export const IDENTICAL = { code: 0, out: 'Images are identical.\n' };

export type PairRunner = <T>(name: string, script: (s: QsdSession) => Promise<T>) => Promise<[T, T]>;

export function pairRunner(root: string): PairRunner {
  const cache = new Map<string, unknown>();
  /**
   * Runs `script` against qemu's daemon, then ours, each in its own
   * directory; the pair is kept so that a later case can look at a known
   * difference of the same run.
   */
  return async function both<T>(name: string, script: (s: QsdSession) => Promise<T>): Promise<[T, T]> {
    const cached = cache.get(name) as [T, T] | undefined;
    if (cached) return cached;
    const results: T[] = [];
    for (const ours of [false, true]) {
      const s = await QsdSession.start(path.join(root, `${name}-${ours ? 'ours' : 'theirs'}`), ours);
      results.push(await script(s));
    }
    if (process.env.QSD_JOBS_DUMP) {
      fs.mkdirSync(process.env.QSD_JOBS_DUMP, { recursive: true });
      results.forEach((r, i) => fs.writeFileSync(path.join(process.env.QSD_JOBS_DUMP!, `${name}-${i ? 'ours' : 'theirs'}.json`), JSON.stringify(r, null, 1)));
    }
    const pair: [T, T] = [results[0]!, results[1]!];
    cache.set(name, pair);
    return pair;
  };
}

/** A job listing without what depends on timing (busy). */
export function stableJobs(list: unknown): unknown {
  return (list as Array<Record<string, unknown>>).map(({ busy: _busy, ...rest }) => rest);
}

type MapExtent = Record<string, unknown> & { start: number; length: number };

/**
 * A qemu-img map without host offsets (where a cluster landed is the
 * allocator's business) and, for extents that read as zeroes, without
 * `present` and `offset`: whether a zeroed range is left unallocated,
 * a zero cluster or a preallocated zero cluster is compared apart (see
 * zeroAllocation). Adjacent extents that then look alike are merged.
 */
function stableMap(map: unknown): MapExtent[] {
  const out: MapExtent[] = [];
  for (const e of map as MapExtent[]) {
    const { offset: _offset, ...rest } = e;
    const view: MapExtent = rest.zero ? (({ present: _present, ...z }) => z as MapExtent)(rest) : rest;
    const prev = out[out.length - 1];
    const same = prev && prev.start + prev.length === view.start && JSON.stringify({ ...prev, start: 0, length: 0 }) === JSON.stringify({ ...view, start: 0, length: 0 });
    if (same) prev.length += view.length;
    else out.push({ ...view });
  }
  return out;
}

/** How the zero extents of a map are stored: [start, length, present, has a host offset]. */
export function zeroAllocation(map: unknown): unknown[] {
  return (map as MapExtent[]).filter((e) => e.zero).map((e) => [e.start, e.length, e.present, 'offset' in e]);
}

const PROGRESS_KEYS = ['len', 'offset', 'current-progress', 'total-progress'];

/** `v` with job progress numbers replaced by a marker (for the sync=full difference). */
export function hideProgress(v: unknown): unknown {
  return JSON.parse(JSON.stringify(v), (k, x: unknown) => (PROGRESS_KEYS.includes(k) && typeof x === 'number' ? '<progress>' : x)) as unknown;
}

/** The result with image maps made stable (stableMap); `progress` false hides job progress numbers. */
function comparable(r: Record<string, unknown>, opts: { progress?: boolean } = {}): Record<string, unknown> {
  const v = JSON.parse(JSON.stringify(r), (k, x: unknown) => (k === 'map' ? stableMap(x) : x)) as Record<string, unknown>;
  return opts.progress === false ? (hideProgress(v) as Record<string, unknown>) : v;
}

/** Compares outcomes one by one (so a failure names the command), then the rest. */
export function expectSame(theirsRaw: Record<string, unknown>, oursRaw: Record<string, unknown>, opts: { progress?: boolean } = {}): void {
  const [theirs, ours] = [comparable(theirsRaw, opts), comparable(oursRaw, opts)] as Array<{ outcomes: unknown[] }>;
  for (let i = 0; i < theirs.outcomes.length; i++) {
    const t = theirs.outcomes[i] as [string, unknown];
    expect(ours.outcomes[i], t[0]).toEqual(t);
  }
  expect(ours).toEqual(theirs);
}


