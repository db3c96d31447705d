/*
 * Graphs made by a test file are closed after each test, so no file handle
 * outlives its test (Node warns when a FileHandle is garbage-collected open).
 * Failures while closing are ignored here: tests that inject faults leave
 * them armed, and tests that care about close errors assert them directly.
 */
import { afterEach } from 'vitest';
import type { BlockDriver } from '../../block/driver.js';
import { BlockGraph } from '../../block/graph.js';
import { builtinDrivers } from '../../drivers/index.js';

const open = new Set<BlockGraph>();

afterEach(async () => {
  const graphs = [...open];
  open.clear();
  for (const g of graphs) await g.closeAll().catch(() => undefined);
});

/** A graph with the given drivers (default: the built-in ones), closed after the test. */
export function testGraph(drivers: readonly BlockDriver[] = builtinDrivers): BlockGraph {
  const g = new BlockGraph(drivers);
  open.add(g);
  return g;
}
