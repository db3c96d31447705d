/*
 * `null-co`: a protocol driver with no storage (QEMU's block/null.c), for
 * benchmarks and tests. Writes are dropped; reads leave the buffer as it is
 * unless `read-zeroes` is on; every request can be delayed by `latency-ns`.
 * Block status says OFFSET_VALID (ZERO too with read-zeroes) and no DATA,
 * so the content is neither allocated nor known, as QEMU reports it.
 */
import { setTimeout as sleep } from 'node:timers/promises';
import { z } from 'zod';
import { Req, Status } from '../block/flags.js';
import type { BlockDriver } from '../block/driver.js';
import type { BlockNode } from '../block/node.js';
import { zBool, zInt, zSize } from '../block/options.js';

/** Default size when `size` is not given (QEMU: 1 GiB). */
export const NULL_DEFAULT_BYTES = 1 << 30;
const NS_PER_MS = 1_000_000;

interface NullState {
  sizeBytes: number;
  latencyNs: number;
  readZeroes: boolean;
}

const state = (node: BlockNode) => node.opaque as NullState;

const optionsSchema = z.object({
  size: zSize('size').optional(),
  'latency-ns': zInt('latency-ns').optional(),
  'read-zeroes': zBool('read-zeroes').optional(),
  filename: z.literal('null-co://', { error: "The only allowed filename for this driver is 'null-co://'" }).optional(),
});

async function delay(node: BlockNode): Promise<void> {
  const ns = state(node).latencyNs;
  if (ns > 0) await sleep(ns / NS_PER_MS);
}

export const nullDriver: BlockDriver = {
  name: 'null-co',
  protocolName: 'null-co',
  optionsSchema,
  strongOptions: ['size', 'read-zeroes'],
  getAllocatedFileSize: async () => 0,
  async open(node, options) {
    const o = options as z.output<typeof optionsSchema>;
    node.opaque = {
      sizeBytes: o.size ?? NULL_DEFAULT_BYTES,
      latencyNs: o['latency-ns'] ?? 0,
      readZeroes: o['read-zeroes'] ?? false,
    } satisfies NullState;
    node.filename = o.size === undefined && o['read-zeroes'] === undefined ? 'null-co://' : '';
    node.supportedWriteFlags = Req.FUA;
    node.supportedZeroFlags = Req.FUA | Req.MAY_UNMAP | Req.NO_FALLBACK;
  },
  getLength: async (node) => state(node).sizeBytes,
  async coPreadv(node, _offsetBytes, buf) {
    await delay(node);
    if (state(node).readZeroes) buf.fill(0);
  },
  coPwritev: delay,
  coPwriteZeroes: delay,
  coFlushToDisk: delay,
  async coBlockStatus(node, _wantZero, offsetBytes, bytes) {
    await delay(node);
    const zero = state(node).readZeroes ? Status.ZERO : 0;
    return { status: Status.OFFSET_VALID | zero, pnum: bytes, map: offsetBytes, file: node };
  },
};
