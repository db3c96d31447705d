/*
 * Dirty bitmap commands (QEMU 7.2's block/monitor/bitmap-qmp-cmds.c):
 * block-dirty-bitmap-add/-remove/-clear/-enable/-disable/-merge over the
 * block layer's operations (block/dirty-bitmap-ops.ts, which has QEMU's
 * checks and texts), and x-debug-block-dirty-bitmap-sha256.
 *
 * The sha256 is QEMU's hbitmap_sha256: the digest of the bitmap's lowest
 * level, one bit per granule, least significant bit first, in whole
 * 64-bit words (at least one). Our serialised form has the same bit
 * order, so the digest is taken over it in chunks of SHA_CHUNK_BYTES,
 * zero-padded to the word; memory stays bounded for any bitmap size.
 */
import { z } from 'zod';
import { bitmapAdd, bitmapClear, bitmapMerge, bitmapRemove, bitmapSetEnabled, lookupDirtyBitmap } from '../block/dirty-bitmap-ops.js';
import type { DirtyBitmap } from '../block/dirty-bitmap.js';
import { defineCommand, type QmpCommand } from './command.js';
import type { Daemon } from './daemon.js';
import { qUint64 } from './qapi-errors.js';

/** Serialised bytes hashed at a time (a multiple of 8 so chunks start on a granule byte). */
export const SHA_CHUNK_BYTES = 1 << 20;
const WORD_BYTES = 8;

/** hbitmap_sha256 of a bitmap, hex. */
export function bitmapSha256(bm: DirtyBitmap): string {
  const hash = process.getBuiltinModule('node:crypto').createHash('sha256');
  const totalBytes = bm.serializationBytes();
  const paddedBytes = Math.max(WORD_BYTES, Math.ceil(totalBytes / WORD_BYTES) * WORD_BYTES);
  const chunk = new Uint8Array(Math.min(SHA_CHUNK_BYTES, paddedBytes));
  const coverage = bm.serializationCoverage(SHA_CHUNK_BYTES);
  for (let done = 0; done < paddedBytes; done += chunk.length) {
    const n = Math.min(chunk.length, paddedBytes - done);
    const view = chunk.subarray(0, n);
    view.fill(0);
    const offsetBytes = (done / SHA_CHUNK_BYTES) * coverage;
    if (offsetBytes < bm.sizeBytes) bm.serialize(offsetBytes, Math.min(coverage, bm.sizeBytes - offsetBytes), view);
    hash.update(view);
  }
  return hash.digest('hex');
}

const nodeAndName = z.strictObject({ node: z.string(), name: z.string() });

function simple(name: string, op: (d: Daemon, node: string, bitmap: string) => void | Promise<void>): QmpCommand<Daemon> {
  return defineCommand({
    name,
    args: nodeAndName,
    run: (d: Daemon, a: z.infer<typeof nodeAndName>) => op(d, a.node, a.name),
  });
}

const addArgs = z.strictObject({
  node: z.string(),
  name: z.string(),
  granularity: qUint64().optional(),
  persistent: z.boolean().optional(),
  disabled: z.boolean().optional(),
});

const mergeArgs = z.strictObject({
  node: z.string(),
  target: z.string(),
  bitmaps: z.array(z.union([z.string(), z.strictObject({ node: z.string(), name: z.string() })])),
});

export const bitmapCommands: QmpCommand<Daemon>[] = [
  defineCommand({
    name: 'block-dirty-bitmap-add',
    args: addArgs,
    async run(d: Daemon, a: z.infer<typeof addArgs>) {
      await bitmapAdd(d.graph.node(a.node), { name: a.name, granularityBytes: a.granularity, persistent: a.persistent, disabled: a.disabled });
    },
  }),
  simple('block-dirty-bitmap-remove', (d, node, name) => bitmapRemove(d.graph.node(node), name)),
  simple('block-dirty-bitmap-clear', (d, node, name) => bitmapClear(d.graph.node(node), name)),
  simple('block-dirty-bitmap-enable', (d, node, name) => bitmapSetEnabled(d.graph.node(node), name, true)),
  simple('block-dirty-bitmap-disable', (d, node, name) => bitmapSetEnabled(d.graph.node(node), name, false)),
  defineCommand({
    name: 'block-dirty-bitmap-merge',
    args: mergeArgs,
    run(d: Daemon, a: z.infer<typeof mergeArgs>) {
      const node = d.graph.node(a.node);
      const sources = a.bitmaps.map((b) => (typeof b === 'string' ? { node, name: b } : { node: d.graph.node(b.node), name: b.name }));
      bitmapMerge(node, a.target, sources);
    },
  }),
  defineCommand({
    name: 'x-debug-block-dirty-bitmap-sha256',
    args: nodeAndName,
    run: (d: Daemon, a: z.infer<typeof nodeAndName>) => ({ sha256: bitmapSha256(lookupDirtyBitmap(d.graph.node(a.node), a.name)) }),
  }),
];
