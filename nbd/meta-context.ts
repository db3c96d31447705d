/*
 * Metadata contexts of an export and the query rules of
 * NBD_OPT_LIST_META_CONTEXT / NBD_OPT_SET_META_CONTEXT, as QEMU's server
 * applies them (nbd_negotiate_meta_queries):
 *
 *   - contexts are, in this order and with these ids: `base:allocation`
 *     (0), `qemu:allocation-depth` (1, when the export enables it),
 *     `qemu:dirty-bitmap:NAME` (2 + i for the export's i-th bitmap);
 *   - LIST with no query lists every context; `base:`, `qemu:` and
 *     `qemu:dirty-bitmap:` are wildcards in LIST only; exact names select
 *     one context; anything else (other namespaces, unknown leaves, names
 *     longer than 4096 bytes) is ignored;
 *   - SET replaces the selection, even when it then fails.
 *
 * A context is a `MetaContextSource`: its name and a function that
 * describes a range as extents. `base:allocation` and
 * `qemu:allocation-depth` are built in (export.ts); dirty bitmaps plug in
 * later through the export's `contexts` option, so the negotiation and the
 * BLOCK_STATUS command need no change when they arrive.
 */
import {
  CONTEXT_ALLOCATION_DEPTH,
  CONTEXT_BASE_ALLOCATION,
  CONTEXT_DIRTY_BITMAP_PREFIX,
  ContextId,
} from './protocol.js';
import type { Extent } from './wire-transmission.js';

/** Limits a context must respect when describing a range. */
export interface ExtentLimits {
  /** At most this many extents (1 for REQ_ONE). */
  maxExtents: number;
  /** Largest length of one extent (2^32 - 1 with compact replies). */
  maxExtentBytes: number;
}

/**
 * A metadata context an export offers. `extents` describes
 * [offset, offset + length) from `offset` on, contiguously, merging
 * neighbours with equal flags; it may stop early (at maxExtents) but must
 * return at least one extent of non-zero length, none past the range.
 */
export interface MetaContextSource {
  readonly name: string;
  extents(offsetBytes: number, bytes: number, limits: ExtentLimits): Promise<Extent[]>;
}

/** A context with the id QEMU gives it. */
export interface NumberedContext {
  id: number;
  source: MetaContextSource;
}

/** The contexts an export offers, numbered as QEMU numbers them. */
export function numberContexts(
  baseAllocation: MetaContextSource,
  allocationDepth: MetaContextSource | null,
  bitmaps: readonly MetaContextSource[],
): NumberedContext[] {
  const out: NumberedContext[] = [{ id: ContextId.BASE_ALLOCATION, source: baseAllocation }];
  if (allocationDepth) out.push({ id: ContextId.ALLOCATION_DEPTH, source: allocationDepth });
  bitmaps.forEach((source, i) => out.push({ id: ContextId.DIRTY_BITMAP + i, source }));
  return out;
}

/**
 * The contexts selected by `queries` (QEMU's nbd_meta_base_query and
 * nbd_meta_qemu_query), in export order. `list` enables the wildcards and
 * the "no query means everything" rule.
 */
export function selectContexts(available: readonly NumberedContext[], queries: readonly string[], list: boolean): NumberedContext[] {
  if (list && queries.length === 0) return [...available];
  const chosen = new Set<NumberedContext>();
  for (const query of queries) {
    for (const ctx of available) if (matches(ctx.source.name, query, list)) chosen.add(ctx);
  }
  return available.filter((ctx) => chosen.has(ctx));
}

function matches(name: string, query: string, list: boolean): boolean {
  if (query === name) return true;
  if (!list) return false;
  if (query === 'base:') return name.startsWith('base:');
  if (query === 'qemu:') return name === CONTEXT_ALLOCATION_DEPTH || name.startsWith(CONTEXT_DIRTY_BITMAP_PREFIX);
  if (query === CONTEXT_DIRTY_BITMAP_PREFIX) return name.startsWith(CONTEXT_DIRTY_BITMAP_PREFIX);
  return false;
}

/** Names of the built-in contexts, re-exported for callers. */
export { CONTEXT_ALLOCATION_DEPTH, CONTEXT_BASE_ALLOCATION, CONTEXT_DIRTY_BITMAP_PREFIX };

/**
 * Collects extents by calling `probe` from `offset` until the range is
 * covered or `limits.maxExtents` extents exist; neighbours with equal
 * flags merge while their sum fits `maxExtentBytes`. `probe` returns the
 * flags of the bytes at `offset` and how many bytes share them (> 0).
 */
export async function collectExtents(
  offsetBytes: number,
  bytes: number,
  limits: ExtentLimits,
  probe: (offsetBytes: number, bytes: number) => Promise<{ flags: number; bytes: number }>,
): Promise<Extent[]> {
  const out: Extent[] = [];
  let at = offsetBytes;
  const end = offsetBytes + bytes;
  while (at < end) {
    const r = await probe(at, end - at);
    const length = Math.min(r.bytes, end - at, limits.maxExtentBytes);
    if (!(length > 0)) break;
    at += length;
    const last = out[out.length - 1];
    if (last && last.flags === r.flags && last.length + length <= limits.maxExtentBytes) {
      last.length += length;
      continue;
    }
    if (out.length >= limits.maxExtents) break;
    out.push({ length, flags: r.flags });
  }
  return out;
}
