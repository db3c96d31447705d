/*
 * `test-mem`: a RAM-backed protocol driver for tests of the request gate.
 *
 * Storage is one Uint8Array per node (lost on close). Every limit the gate
 * honours and every supported-flag set is an open option, so a test can
 * build the node it needs:
 *
 *   size            bytes (default 1 MiB; need not be a multiple of 512)
 *   fill            initial byte value (default 0; non-zero makes it all data)
 *   align, max-transfer, opt-write-zero, max-write-zero, opt-discard,
 *   max-discard     BlockLimits, as blkdebug names them
 *   write-flags     Req bits coPwritev honours natively (e.g. Req.FUA)
 *   zero-flags      Req bits coPwriteZeroes honours natively
 *   write-zeroes    'native' (default) or 'enotsup' (the method exists but
 *                   always fails with ENOTSUP)
 *   pdiscard        likewise for discard
 *
 * A driver *without* write-zeroes, discard and block status is another
 * driver object (`memDriverBare`, name `test-mem-bare`), because the gate
 * reads capabilities from the driver, not the node.
 *
 * The driver is also an oracle: it checks the gate's contract (requests
 * aligned to `requestAlignment`, within `maxTransfer` / `maxPwriteZeroes` /
 * `maxPdiscard`, unaligned write-zeroes not crossing the write-zeroes
 * alignment, flags a subset of the supported ones, lengths non-zero) and
 * throws an AssertionError when the gate breaks it. Every driver call is
 * appended to the node's call log with its offset, length and flags.
 *
 * Block status reports, per byte, DATA for bytes written with data and ZERO
 * for bytes never written (fill 0), zeroed with MAY_UNMAP, or discarded —
 * always OFFSET_VALID at the same offset in this node.
 *
 * Tests reach the state with `memOf(node)`: `data`, `log`, and `beforeCall`,
 * an async hook awaited before each call (to delay, hold or reorder calls).
 */
import assert from 'node:assert/strict';
import { z } from 'zod';
import { BlockError } from '../../block/errors.js';
import { Req, Status, alignDown, isAligned } from '../../block/flags.js';
import type { BlockDriver } from '../../block/driver.js';
import type { BlockLimits, BlockNode } from '../../block/node.js';
import { zEnum, zInt, zSize } from '../../block/options.js';
import { BlockBackend, type BackendOptions } from '../../block/backend.js';
import type { BlockGraph } from '../../block/graph.js';
import type { OptionTree } from '../../block/keyval.js';
import { builtinDrivers } from '../../drivers/index.js';
import { testGraph } from './graphs.js';

export const MEM_DEFAULT_BYTES = 1 << 20;

export type MemOp = 'read' | 'write' | 'write-zeroes' | 'discard' | 'flush' | 'block-status' | 'truncate';

export interface MemCall {
  op: MemOp;
  offset: number;
  bytes: number;
  flags: number;
}

export interface MemState {
  data: Uint8Array;
  /** 1 where the byte holds data, 0 where it reads as a hole. */
  allocated: Uint8Array;
  readonly log: MemCall[];
  zeroesEnotsup: boolean;
  discardEnotsup: boolean;
  /** Awaited before every driver call (after it is logged). */
  beforeCall: ((call: MemCall) => Promise<void> | void) | null;
}

export function memOf(node: BlockNode): MemState {
  return node.opaque as MemState;
}

const optionsSchema = z.object({
  size: zSize('size').optional(),
  fill: zInt('fill', { max: 255 }).optional(),
  align: zInt('align', { min: 1 }).optional(),
  'max-transfer': zInt('max-transfer').optional(),
  'opt-write-zero': zInt('opt-write-zero').optional(),
  'max-write-zero': zInt('max-write-zero').optional(),
  'opt-discard': zInt('opt-discard').optional(),
  'max-discard': zInt('max-discard').optional(),
  'write-flags': zInt('write-flags').optional(),
  'zero-flags': zInt('zero-flags').optional(),
  'write-zeroes': zEnum('write-zeroes', ['native', 'enotsup'] as const).optional(),
  pdiscard: zEnum('pdiscard', ['native', 'enotsup'] as const).optional(),
  filename: z.string().optional(),
});
type Options = z.output<typeof optionsSchema>;

/** Which option sets which limit (unset limits keep the defaults: alignment 1, no maximum). */
type LimitOption = 'align' | 'max-transfer' | 'opt-write-zero' | 'max-write-zero' | 'opt-discard' | 'max-discard';
const LIMIT_OPTIONS: ReadonlyArray<readonly [LimitOption, keyof BlockLimits]> = [
  ['align', 'requestAlignment'],
  ['max-transfer', 'maxTransfer'],
  ['opt-write-zero', 'pwriteZeroesAlignment'],
  ['max-write-zero', 'maxPwriteZeroes'],
  ['opt-discard', 'pdiscardAlignment'],
  ['max-discard', 'maxPdiscard'],
];

async function open(node: BlockNode, options: Record<string, unknown>): Promise<void> {
  const o = options as Options;
  const sizeBytes = o.size ?? MEM_DEFAULT_BYTES;
  const fill = o.fill ?? 0;
  node.opaque = {
    data: new Uint8Array(sizeBytes).fill(fill),
    allocated: new Uint8Array(sizeBytes).fill(fill === 0 ? 0 : 1),
    log: [],
    zeroesEnotsup: o['write-zeroes'] === 'enotsup',
    discardEnotsup: o.pdiscard === 'enotsup',
    beforeCall: null,
  } satisfies MemState;
  node.filename = o.filename ?? `test-mem:${node.nodeName}`;
  for (const [key, field] of LIMIT_OPTIONS) {
    const value = o[key];
    if (value !== undefined) node.limits[field] = value;
  }
  node.supportedWriteFlags = o['write-flags'] ?? 0;
  node.supportedZeroFlags = o['zero-flags'] ?? 0;
}

/** Logs the call, checks the gate's contract, then runs the test hook. */
async function enter(node: BlockNode, call: MemCall, maxBytes: number, allowedFlags: number): Promise<MemState> {
  const s = memOf(node);
  s.log.push(call);
  const align = node.limits.requestAlignment;
  const what = `${call.op} ${call.offset}+${call.bytes}`;
  assert.ok(call.bytes > 0, `gate sent an empty ${what}`);
  assert.ok(isAligned(call.offset, align) && isAligned(call.bytes, align), `gate sent ${what} unaligned to ${align}`);
  assert.ok(maxBytes === 0 || call.bytes <= maxBytes, `gate sent ${what} over the limit ${maxBytes}`);
  assert.equal(call.flags & ~allowedFlags, 0, `gate sent ${what} with unsupported flags 0x${call.flags.toString(16)}`);
  if (s.beforeCall) await s.beforeCall(call);
  return s;
}

/** Grows the storage to at least `endBytes` (writes past the end through a resizable edge). */
function ensureSize(s: MemState, endBytes: number): void {
  if (endBytes <= s.data.length) return;
  resize(s, endBytes);
}

function resize(s: MemState, sizeBytes: number): void {
  const data = new Uint8Array(sizeBytes);
  const allocated = new Uint8Array(sizeBytes);
  data.set(s.data.subarray(0, sizeBytes));
  allocated.set(s.allocated.subarray(0, sizeBytes));
  s.data = data;
  s.allocated = allocated;
}

function zeroRange(s: MemState, offset: number, bytes: number, unmap: boolean): void {
  const end = Math.min(offset + bytes, s.data.length);
  if (end <= offset) return;
  s.data.fill(0, offset, end);
  s.allocated.fill(unmap ? 0 : 1, offset, end);
}

const fullDriver: BlockDriver = {
  name: 'test-mem',
  protocolName: 'test-mem',
  optionsSchema,
  open,
  getLength: async (node) => memOf(node).data.length,

  async coPreadv(node, offset, buf, flags) {
    const s = await enter(node, { op: 'read', offset, bytes: buf.length, flags }, node.limits.maxTransfer, ~0);
    buf.fill(0);
    if (offset < s.data.length) buf.set(s.data.subarray(offset, Math.min(offset + buf.length, s.data.length)));
  },

  async coPwritev(node, offset, buf, flags) {
    const s = await enter(node, { op: 'write', offset, bytes: buf.length, flags }, node.limits.maxTransfer, node.supportedWriteFlags);
    ensureSize(s, offset + buf.length);
    s.data.set(buf, offset);
    s.allocated.fill(1, offset, offset + buf.length);
  },

  async coPwriteZeroes(node, offset, bytes, flags) {
    const call: MemCall = { op: 'write-zeroes', offset, bytes, flags };
    const s = await enter(node, call, node.limits.maxPwriteZeroes, node.supportedZeroFlags);
    const zeroAlign = node.limits.pwriteZeroesAlignment;
    if (zeroAlign > 1 && !(isAligned(offset, zeroAlign) && isAligned(bytes, zeroAlign))) {
      assert.ok(
        alignDown(offset, zeroAlign) === alignDown(offset + bytes - 1, zeroAlign),
        `gate sent unaligned write-zeroes ${offset}+${bytes} across a ${zeroAlign}-byte boundary`,
      );
    }
    if (s.zeroesEnotsup) throw new BlockError('ENOTSUP');
    ensureSize(s, offset + bytes);
    zeroRange(s, offset, bytes, (flags & Req.MAY_UNMAP) !== 0);
  },

  async coPdiscard(node, offset, bytes) {
    const s = await enter(node, { op: 'discard', offset, bytes, flags: 0 }, node.limits.maxPdiscard, 0);
    if (s.discardEnotsup) throw new BlockError('ENOTSUP');
    zeroRange(s, offset, bytes, true);
  },

  async coFlushToDisk(node) {
    const s = memOf(node);
    s.log.push({ op: 'flush', offset: 0, bytes: 0, flags: 0 });
    if (s.beforeCall) await s.beforeCall(s.log.at(-1)!);
  },

  async coBlockStatus(node, _wantZero, offset, bytes) {
    const s = await enter(node, { op: 'block-status', offset, bytes, flags: 0 }, 0, 0);
    const end = Math.min(offset + bytes, s.data.length);
    const base = { map: offset, file: node };
    if (offset >= s.data.length) return { status: Status.ZERO | Status.OFFSET_VALID, pnum: bytes, ...base };
    const kind = s.allocated[offset]!;
    let run = offset + 1;
    while (run < end && s.allocated[run] === kind) run++;
    // Past the storage (inside the last sector) reads as zeroes: part of a hole run.
    const pnum = run === s.data.length && kind === 0 ? bytes : run - offset;
    return { status: (kind ? Status.DATA : Status.ZERO) | Status.OFFSET_VALID, pnum, ...base };
  },

  async coTruncate(node, offset) {
    const s = memOf(node);
    s.log.push({ op: 'truncate', offset, bytes: 0, flags: 0 });
    resize(s, offset);
  },
};

/** The full driver: write-zeroes, discard and block status present. */
export const memDriver: BlockDriver = fullDriver;

/** The same storage without write-zeroes, discard or block status (the gate's fallbacks). */
export const memDriverBare: BlockDriver = {
  ...fullDriver,
  name: 'test-mem-bare',
  protocolName: 'test-mem-bare',
  coPwriteZeroes: undefined,
  coPdiscard: undefined,
  coBlockStatus: undefined,
};

/** Both variants, to append to the builtin driver list. */
export const memDrivers: readonly BlockDriver[] = [memDriver, memDriverBare];

// ------------------------------------------------------------ test conveniences

/** A graph with the builtin drivers and both test-mem variants (plus `extra`). */
export function memGraph(...extra: BlockDriver[]): BlockGraph {
  return testGraph([...builtinDrivers, ...memDrivers, ...extra]);
}

export interface MemSetup {
  graph: BlockGraph;
  node: BlockNode;
  blk: BlockBackend;
  mem: MemState;
}

/**
 * Opens a test-mem node named `mem` (driver `test-mem`, or `driver` in
 * `options`) with a writable, resizable backend on it.
 */
export async function openMem(options: Record<string, unknown> = {}, backend: BackendOptions = {}): Promise<MemSetup> {
  const graph = memGraph();
  const node = await graph.openNode({ driver: 'test-mem', 'node-name': 'mem', ...options } as OptionTree);
  const blk = new BlockBackend(graph, node, { writable: true, resizable: true, ...backend });
  return { graph, node, blk, mem: memOf(node) };
}

/** `bytes` bytes of a pattern that differs per `seed` and never contains a zero byte. */
export function pattern(bytes: number, seed: number): Uint8Array {
  const out = new Uint8Array(bytes);
  for (let i = 0; i < bytes; i++) out[i] = ((seed * 131 + i * 7) % 255) + 1;
  return out;
}

/** The calls of the log, as compact `op offset+bytes[/flags]` strings. */
export function calls(log: readonly MemCall[], ops?: readonly MemOp[]): string[] {
  return log
    .filter((c) => !ops || ops.includes(c.op))
    .map((c) => `${c.op} ${c.offset}+${c.bytes}${c.flags ? `/0x${c.flags.toString(16)}` : ''}`);
}
