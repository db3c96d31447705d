/*
 * Small qcow2 chains for job and copy-on-read tests: `qcow2ChainFiles`
 * creates base ← mid ← top image files (backing names and formats
 * stored) and returns the path of each; `failingReadsDriver` is a filter
 * (`test-failing`) whose reads fail with EIO while `failing.failReads` > 0
 * — a stand-in for blkdebug's inject-error — and which passes everything
 * else to its `file`.
 */
import path from 'node:path';
import { z } from 'zod';
import { createImage } from '../../block/create.js';
import type { BlockDriver } from '../../block/driver.js';
import { BlockError } from '../../block/errors.js';
import { flush, preadv, pwritev, truncate } from '../../block/io.js';
import { ChildRole, type BdrvChild } from '../../block/node.js';
import { zBlockdevRef } from '../../block/options.js';
import { testGraph } from './graphs.js';

/** Reads left to fail (set by a test, counted down by the driver). */
export const failing = { failReads: 0 };

export const failingReadsDriver: BlockDriver = {
  name: 'test-failing',
  isFilter: true,
  optionsSchema: z.object({ file: zBlockdevRef }),
  async open(node, _o, ctx) {
    node.opaque = (await ctx.openChild('file', ChildRole.FILTERED | ChildRole.PRIMARY))!;
  },
  getLength: async (node) => (node.opaque as BdrvChild).node.totalBytes,
  async coPreadv(node, offset, buf, flags) {
    if (failing.failReads > 0) {
      failing.failReads--;
      throw new BlockError('EIO');
    }
    await preadv(node.opaque as BdrvChild, offset, buf, flags);
  },
  coPwritev: (node, offset, buf, flags) => pwritev(node.opaque as BdrvChild, offset, buf, flags),
  coFlushToDisk: (node) => flush((node.opaque as BdrvChild).node),
  coTruncate: (node, offset, exact, prealloc, flags) => truncate(node.opaque as BdrvChild, offset, exact, prealloc, flags),
};

/** Creates `<prefix>-base|mid|top.qcow2` in `dir` (base of `sizeBytes`, each backed by the one below); returns the path of a layer. */
export async function qcow2ChainFiles(dir: string, prefix: string, sizeBytes: number): Promise<(name: 'base' | 'mid' | 'top') => string> {
  const file = (name: string) => path.join(dir, `${prefix}-${name}.qcow2`);
  const g = testGraph();
  await createImage(g, { format: 'qcow2', filename: file('base'), sizeBytes, options: [], quiet: true });
  await createImage(g, { format: 'qcow2', filename: file('mid'), options: [], backingFile: file('base'), backingFormat: 'qcow2', quiet: true });
  await createImage(g, { format: 'qcow2', filename: file('top'), options: [], backingFile: file('mid'), backingFormat: 'qcow2', quiet: true });
  return file;
}
