/*
 * Model test: random sequences of write, write-zeroes (MAY_UNMAP, FUA,
 * NO_FALLBACK in any mix), discard, read, flush and reopen (close the graph,
 * open the image again) against a plain Uint8Array, over four stacks:
 *
 *   raw-file     raw over file, discard=unmap, detect-zeroes=unmap
 *   raw-window   raw with offset/size over file, writethrough backend
 *   null-co      null-co with read-zeroes=on (the model: always zeroes)
 *   raw-blkdebug raw over blkdebug (align=4096, max-transfer=65536) over
 *                file, discard=unmap: every unaligned request becomes
 *                read-modify-write at the blkdebug layer, which fails any
 *                request that breaks its limits
 *
 * What the model asserts is in test/helpers/block-model.ts (shared with the
 * qcow2 model test); here, in addition, bytes of the file outside a raw
 * window never change.
 *
 * Runs: PROPERTY_RUNS per stack (default below, sized so the file runs in a
 * few seconds on 2 cores), PROPERTY_SEED to replay, PROPERTY_PATH with it to
 * replay one shrunk counterexample. The seed is logged up front and
 * fast-check prints seed and path on failure.
 */
import fs from 'node:fs';
import path from 'node:path';
import fc from 'fast-check';
import { describe, it } from 'vitest';
import { BlockBackend } from '../../block/backend.js';
import type { OptionTree } from '../../block/keyval.js';
import { Model, applyOp, checkRead, opArb, propertyRuns, type ModelDevice, type Op } from '../helpers/block-model.js';
import { memGraph, pattern } from '../helpers/mem-driver.js';
import { scratchDir } from '../helpers/tmp.js';

const PROPERTY = propertyRuns('model.test', 100);
const MAX_OPS = 40;
/** Per-stack time limit: generous per run, so a large PROPERTY_RUNS soak does not time out. */
const TIMEOUT_MS = Math.max(60_000, PROPERTY.runs * 250);
const KiB = 1024;

const dir = scratchDir('qbt-model-');
let images = 0;

interface Stack {
  name: string;
  /** Guest-visible bytes. */
  sizeBytes: number;
  /** Host file bytes (0: no file). */
  fileBytes: number;
  /** Where the guest's byte 0 lives in the file. */
  windowOffset: number;
  /** Reads are always zero, whatever was written (null-co). */
  alwaysZero: boolean;
  writeCache: boolean;
  spec(filename: string): OptionTree;
}

const STACKS: Stack[] = [
  {
    name: 'raw-file', sizeBytes: 256 * KiB, fileBytes: 256 * KiB, windowOffset: 0, alwaysZero: false, writeCache: true,
    spec: (filename) => ({ driver: 'raw', discard: 'unmap', 'detect-zeroes': 'unmap', file: { driver: 'file', filename } }),
  },
  {
    name: 'raw-window', sizeBytes: 128 * KiB, fileBytes: 136 * KiB, windowOffset: 1536, alwaysZero: false, writeCache: false,
    spec: (filename) => ({ driver: 'raw', offset: 1536, size: 128 * KiB, file: { driver: 'file', filename } }),
  },
  {
    name: 'null-co', sizeBytes: 256 * KiB, fileBytes: 0, windowOffset: 0, alwaysZero: true, writeCache: true,
    spec: () => ({ driver: 'null-co', size: 256 * KiB, 'read-zeroes': true, discard: 'unmap' }),
  },
  {
    name: 'raw-blkdebug', sizeBytes: 256 * KiB, fileBytes: 256 * KiB, windowOffset: 0, alwaysZero: false, writeCache: true,
    spec: (filename) => ({
      driver: 'raw', discard: 'unmap',
      file: { driver: 'blkdebug', align: 4096, 'max-transfer': 65536, image: { driver: 'file', filename } },
    }),
  },
];

/** The image under test: a fresh file (when the stack has one) and a backend on the stack. */
class Subject {
  private blk: BlockBackend | null = null;
  readonly filename: string;
  readonly fileInitial: Uint8Array;

  constructor(private readonly stack: Stack) {
    this.filename = path.join(dir, `model-${images++}.img`);
    this.fileInitial = pattern(stack.fileBytes, images);
    if (stack.fileBytes > 0) fs.writeFileSync(this.filename, this.fileInitial);
  }

  async open(): Promise<BlockBackend> {
    const graph = memGraph();
    const node = await graph.openNode(this.stack.spec(this.filename));
    if (node.totalBytes !== this.stack.sizeBytes) throw new Error(`opened with ${node.totalBytes} bytes, expected ${this.stack.sizeBytes}`);
    this.blk = new BlockBackend(graph, node, { writable: true, writeCache: this.stack.writeCache });
    return this.blk;
  }

  async close(): Promise<void> {
    await this.blk?.close();
    this.blk = null;
  }

  /** Bytes of the host file outside the guest's window, which nothing may change. */
  outsideWindowChanged(): string | null {
    if (this.stack.fileBytes === 0) return null;
    const now = fs.readFileSync(this.filename);
    if (now.length !== this.stack.fileBytes) return `host file is ${now.length} bytes, was ${this.stack.fileBytes}`;
    const { windowOffset, sizeBytes } = this.stack;
    for (const [from, to] of [[0, windowOffset], [windowOffset + sizeBytes, now.length]] as const) {
      if (!now.subarray(from, to).equals(this.fileInitial.subarray(from, to))) return `host bytes [${from}, ${to}) changed`;
    }
    return null;
  }
}

/** Runs `ops` on a fresh image of `stack`, failing with a description at the first divergence. */
async function runOps(stack: Stack, ops: Op[]): Promise<void> {
  const subject = new Subject(stack);
  const window = subject.fileInitial.subarray(stack.windowOffset, stack.windowOffset + stack.sizeBytes);
  const model = new Model(stack.fileBytes > 0 ? window : new Uint8Array(stack.sizeBytes), stack.alwaysZero);
  let blk = await subject.open();
  const device: ModelDevice = {
    backend: () => blk,
    reopen: async () => {
      await subject.close();
      blk = await subject.open();
    },
    sizeBytes: stack.sizeBytes,
    discardKeepsModel: stack.alwaysZero,
  };
  try {
    for (const [step, op] of ops.entries()) {
      await applyOp(device, model, op, `${stack.name}: after op ${step} (${JSON.stringify(op)})`);
    }
    await checkRead(device, model, 0, stack.sizeBytes, `${stack.name}: at the end`);
  } finally {
    await subject.close();
  }
  const outside = subject.outsideWindowChanged();
  if (outside) throw new Error(`${stack.name}: ${outside}`);
}

describe('block stacks against a Uint8Array model', () => {
  for (const stack of STACKS) {
    it(`${stack.name}: random write/zero/discard/read/flush/reopen sequences`, async () => {
      await fc.assert(
        fc.asyncProperty(fc.array(opArb(stack.sizeBytes), { maxLength: MAX_OPS }), (ops) => runOps(stack, ops)),
        PROPERTY.parameters,
      );
    }, TIMEOUT_MS);
  }
});
