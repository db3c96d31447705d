/*
 * Model test for the qcow2 driver: random sequences of write, write-zeroes
 * (MAY_UNMAP, FUA, NO_FALLBACK in any mix), discard, read, flush and reopen
 * against a plain Uint8Array (test/helpers/block-model.ts), over qcow2
 * images made by our own create:
 *
 *   c512         512-byte clusters, 64-bit refcounts, no backing
 *   c4k-raw      4 KiB clusters over a raw backing file holding a pattern
 *   c64k-qcow2   64 KiB clusters over a qcow2 backing (partly written,
 *                shorter than the overlay), lazy refcounts
 *   v2-c4k       compat=0.10, 4 KiB clusters, no backing
 *
 * Every sequence ends with `qemu-img check` (exit 0: no corruption, no leak)
 * and `qemu-img compare` of the image against the bytes we read back (which
 * the model has accepted), so QEMU reads what we read.
 *
 * Runs: PROPERTY_RUNS per stack (default below), PROPERTY_SEED to replay,
 * PROPERTY_PATH with it for one shrunk counterexample; the seed is logged.
 */
import { spawnSync } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import fc from 'fast-check';
import { describe, it } from 'vitest';
import { BlockBackend } from '../../block/backend.js';
import { BlockGraph } from '../../block/graph.js';
import { createImage } from '../../block/create.js';
import { builtinDrivers } from '../../drivers/index.js';
import { Model, applyOp, checkRead, opArb, propertyRuns, type ModelDevice, type Op } from '../helpers/block-model.js';
import { pattern } from '../helpers/mem-driver.js';
import { missingPeers } from '../helpers/peers.js';
import { scratchDir } from '../helpers/tmp.js';

const PROPERTY = propertyRuns('qcow2-model.test', 25);
const MAX_OPS = 30;
const TIMEOUT_MS = Math.max(120_000, PROPERTY.runs * 2000);
const KiB = 1024;

const dir = scratchDir('qbt-qcow2-model-');
let images = 0;

interface Stack {
  name: string;
  sizeBytes: number;
  /** `-o` options of the image. */
  options: Array<[string, string]>;
  /** Makes the backing file (its name, relative to dir) and returns its content, or null for none. */
  backing?: (graph: BlockGraph, base: string) => Promise<{ file: string; format: string; content: Uint8Array }>;
}

async function rawBacking(_graph: BlockGraph, base: string) {
  const content = pattern(256 * KiB, 7);
  fs.writeFileSync(path.join(dir, `${base}.raw`), content);
  return { file: `${base}.raw`, format: 'raw', content };
}

/** A qcow2 backing of 384 KiB (the overlay is larger), written at a few places. */
async function qcow2Backing(graph: BlockGraph, base: string) {
  const file = `${base}.base.qcow2`;
  await createImage(graph, { format: 'qcow2', filename: path.join(dir, file), sizeBytes: 384 * KiB, options: [['cluster_size', '65536']] });
  const node = await graph.openImage(path.join(dir, file), { format: 'qcow2' });
  const blk = new BlockBackend(graph, node, { writable: true });
  const content = new Uint8Array(384 * KiB);
  for (const [offset, bytes, seed] of [[0, 70 * KiB, 3], [200 * KiB, 100 * KiB, 4]] as const) {
    const data = pattern(bytes, seed);
    await blk.pwrite(offset, data);
    content.set(data, offset);
  }
  await blk.close();
  return { file, format: 'qcow2', content };
}

const STACKS: Stack[] = [
  { name: 'c512', sizeBytes: 256 * KiB, options: [['cluster_size', '512'], ['refcount_bits', '64']] },
  { name: 'c4k-raw', sizeBytes: 320 * KiB, options: [['cluster_size', '4096']], backing: rawBacking },
  { name: 'c64k-qcow2', sizeBytes: 512 * KiB, options: [['lazy_refcounts', 'on']], backing: qcow2Backing },
  { name: 'v2-c4k', sizeBytes: 256 * KiB, options: [['compat', '0.10'], ['cluster_size', '4096']] },
];

/** A fresh image of `stack` and what it reads as. */
async function makeImage(stack: Stack): Promise<{ filename: string; initial: Uint8Array }> {
  const base = `${stack.name}-${images++}`;
  const filename = path.join(dir, `${base}.qcow2`);
  const graph = new BlockGraph(builtinDrivers);
  const initial = new Uint8Array(stack.sizeBytes);
  const options = [...stack.options];
  let backing: { file: string; format: string } | undefined;
  if (stack.backing) {
    const b = await stack.backing(graph, base);
    initial.set(b.content.subarray(0, Math.min(b.content.length, stack.sizeBytes)));
    backing = b;
  }
  await createImage(graph, {
    format: 'qcow2', filename, sizeBytes: stack.sizeBytes, options, backingFile: backing?.file, backingFormat: backing?.format,
  });
  await graph.closeAll();
  return { filename, initial };
}

class Device implements ModelDevice {
  private graph: BlockGraph | null = null;
  private blk: BlockBackend | null = null;
  constructor(private readonly filename: string, readonly sizeBytes: number) {}

  backend(): BlockBackend {
    return this.blk!;
  }

  async open(): Promise<void> {
    this.graph = new BlockGraph(builtinDrivers);
    const node = await this.graph.openImage(this.filename, { format: 'qcow2', options: { discard: 'unmap' } });
    this.blk = new BlockBackend(this.graph, node, { writable: true });
  }

  async close(): Promise<void> {
    await this.blk?.close();
    await this.graph?.closeAll();
    this.blk = null;
    this.graph = null;
  }

  async reopen(): Promise<void> {
    await this.close();
    await this.open();
  }
}

function peer(cmd: string, args: string[]): { status: number | null; out: string } {
  const r = spawnSync(cmd, args, { encoding: 'utf8' });
  return { status: r.status, out: `${r.stdout}${r.stderr}` };
}

async function runOps(stack: Stack, ops: Op[]): Promise<void> {
  const { filename, initial } = await makeImage(stack);
  const model = new Model(initial);
  const device = new Device(filename, stack.sizeBytes);
  await device.open();
  const final = new Uint8Array(stack.sizeBytes);
  try {
    for (const [step, op] of ops.entries()) await applyOp(device, model, op, `${stack.name}: after op ${step} (${JSON.stringify(op)})`);
    await checkRead(device, model, 0, stack.sizeBytes, `${stack.name}: at the end`);
    await device.backend().pread(0, final);
  } finally {
    await device.close();
  }
  const check = peer('qemu-img', ['check', '-f', 'qcow2', filename]);
  if (check.status !== 0) throw new Error(`${stack.name}: qemu-img check exit ${check.status}: ${check.out}`);
  fs.writeFileSync(`${filename}.expected`, final);
  const compare = peer('qemu-img', ['compare', '-f', 'qcow2', '-F', 'raw', filename, `${filename}.expected`]);
  if (compare.status !== 0) throw new Error(`${stack.name}: qemu-img compare exit ${compare.status}: ${compare.out}`);
}

describe.skipIf(missingPeers('qemu-img'))('qcow2 against a Uint8Array model', () => {
  for (const stack of STACKS) {
    it(`${stack.name}: random write/zero/discard/read/flush/reopen sequences, then qemu-img check and compare`, async () => {
      await fc.assert(
        fc.asyncProperty(fc.array(opArb(stack.sizeBytes), { maxLength: MAX_OPS }), (ops) => runOps(stack, ops)),
        PROPERTY.parameters,
      );
    }, TIMEOUT_MS);
  }
});
