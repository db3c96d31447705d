/*
 * A tracing filter (nbdkit's test-layers idea): a pass-through filter that
 * records every call it passes down, on the way in and on the way out, in a
 * log shared by all the trace nodes of a graph. Stack several, each with its
 * own `label`, and the log shows the exact order and offsets of the calls
 * through the layers.
 *
 * The log is not module state: `traceFilter(log)` makes a driver bound to
 * one log, so each test builds its own. Options: `file` (the filtered child),
 * `label` (shown in the log) and `align` (a request alignment for this
 * layer, so a test can watch the gate's read-modify-write above it).
 * Flushes are logged when the gate asks this node to flush to disk (it only
 * does so when something was written since the last flush); the gate then
 * flushes the child itself. `open` is logged once the node (and so its
 * child) is open, `close` when the graph closes it; both as one `enter`.
 */
import { z } from 'zod';
import { Req, Status } from '../../block/flags.js';
import { pdiscard, preadv, pwriteZeroes, pwritev } from '../../block/io.js';
import { ChildRole, type BdrvChild, type BlockNode } from '../../block/node.js';
import { zBlockdevRef, zInt } from '../../block/options.js';
import type { BlockDriver } from '../../block/driver.js';

export type TraceOp = 'open' | 'close' | 'read' | 'write' | 'write-zeroes' | 'discard' | 'flush' | 'block-status';

export interface TraceEntry {
  layer: string;
  phase: 'enter' | 'leave';
  op: TraceOp;
  offset: number;
  bytes: number;
  flags: number;
}

interface TraceState {
  child: BdrvChild;
  label: string;
}

const optionsSchema = z.object({
  file: zBlockdevRef,
  label: z.string(),
  align: zInt('align', { min: 1 }).optional(),
});

const state = (node: BlockNode) => node.opaque as TraceState;

/** A driver named `name` (default `trace`) whose nodes all log into `log`. */
export function traceFilter(log: TraceEntry[], name = 'trace'): BlockDriver {
  async function traced<T>(node: BlockNode, op: TraceOp, offset: number, bytes: number, flags: number, pass: () => Promise<T>): Promise<T> {
    const layer = state(node).label;
    log.push({ layer, phase: 'enter', op, offset, bytes, flags });
    const result = await pass();
    log.push({ layer, phase: 'leave', op, offset, bytes, flags });
    return result;
  }

  return {
    name,
    isFilter: true,
    optionsSchema,
    async open(node, options, ctx) {
      const o = options as z.output<typeof optionsSchema>;
      const child = (await ctx.openChild('file', ChildRole.FILTERED | ChildRole.PRIMARY))!;
      node.opaque = { child, label: o.label } satisfies TraceState;
      node.limits.requestAlignment = o.align ?? 1;
      node.supportedWriteFlags = Req.FUA & child.node.supportedWriteFlags;
      node.supportedZeroFlags = (Req.FUA | Req.MAY_UNMAP | Req.NO_FALLBACK) & child.node.supportedZeroFlags;
      log.push({ layer: o.label, phase: 'enter', op: 'open', offset: 0, bytes: 0, flags: 0 });
    },
    async close(node) {
      log.push({ layer: state(node).label, phase: 'enter', op: 'close', offset: 0, bytes: 0, flags: 0 });
    },
    getLength: async (node) => state(node).child.node.totalBytes,
    coPreadv: (node, offset, buf, flags) =>
      traced(node, 'read', offset, buf.length, flags, () => preadv(state(node).child, offset, buf, flags)),
    coPwritev: (node, offset, buf, flags) =>
      traced(node, 'write', offset, buf.length, flags, () => pwritev(state(node).child, offset, buf, flags)),
    coPwriteZeroes: (node, offset, bytes, flags) =>
      traced(node, 'write-zeroes', offset, bytes, flags, () => pwriteZeroes(state(node).child, offset, bytes, flags)),
    coPdiscard: (node, offset, bytes) =>
      traced(node, 'discard', offset, bytes, 0, () => pdiscard(state(node).child, offset, bytes)),
    coFlushToDisk: (node) => traced(node, 'flush', 0, 0, 0, async () => undefined),
    coBlockStatus: (node, _wantZero, offset, bytes) =>
      traced(node, 'block-status', offset, bytes, 0, async () => ({
        status: Status.RAW | Status.OFFSET_VALID,
        pnum: bytes,
        map: offset,
        file: state(node).child.node,
      })),
  };
}
