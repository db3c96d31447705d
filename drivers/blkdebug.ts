/*
 * `blkdebug`: a pass-through filter for tests and debugging, as QEMU's.
 *
 * Limits: it imposes `align` (request alignment), `max-transfer`,
 * `opt-write-zero` / `max-write-zero` and `opt-discard` / `max-discard` on
 * the node above its `image` child. Like QEMU's, it checks that the gate
 * honoured them and fails a request that breaks them (EIO, with a message
 * naming the broken limit), which makes it an oracle for the gate's
 * alignment and splitting. Also like QEMU's, write-zeroes and discard
 * pieces smaller than their preferred alignment are not passed down
 * (ENOTSUP, resp. ignored), so tests exercise the gate's fallback; such a
 * piece must not cross an alignment boundary.
 *
 * Error injection: `inject-error` and `set-state` rules (from the options
 * and from a `config` file) form a state machine driven by the debug
 * events the node's parent fires on it (`debugEvent`; raw and qcow2 fire
 * read_aio, write_aio, l2_load, cluster_alloc, …; the node itself fires
 * `none` once when it opens). Armed rules fail matching requests of every
 * kind (read, write, write-zeroes, discard, flush, block-status) with
 * their errno, after the limit checks: see blkdebug-rules.ts for the
 * matching, `once` and `immediately`.
 *
 * Permissions (blkdebug_child_perm): QEMU's filter default on `image`, plus
 * what `take-child-perms` lists, minus what `unshare-child-perms` lists
 * (lists of QAPI permission names; QEMU 7.2 no longer knows `graph-mod`).
 *
 * Left out: `suspend` rules (qemu-io's break/resume) and the
 * `blkdebug:config:image` filename syntax.
 */
import { z } from 'zod';
import { BlockError } from '../block/errors.js';
import { Perm, Req, Status, isAligned, isPowerOfTwo } from '../block/flags.js';
import { pdiscard, preadv, pwriteZeroes, pwritev } from '../block/io.js';
import { ChildRole, type BdrvChild, type BlockNode } from '../block/node.js';
import { defaultChildPerms, type ParentPerms, type PermPair } from '../block/perms.js';
import { zBlockdevRef, zSize } from '../block/options.js';
import type { BlockDriver } from '../block/driver.js';
import { BlkdebugRules, injectedError, qapiRulesProblem, readRules, type BlkdebugIoType } from './blkdebug-rules.js';

const optionsSchema = z.object({
  image: zBlockdevRef.optional(),
  config: z.string().optional(),
  'inject-error': z.unknown().optional(),
  'set-state': z.unknown().optional(),
  align: zSize('align').optional(),
  'max-transfer': zSize('max-transfer').optional(),
  'opt-write-zero': zSize('opt-write-zero').optional(),
  'max-write-zero': zSize('max-write-zero').optional(),
  'opt-discard': zSize('opt-discard').optional(),
  'max-discard': zSize('max-discard').optional(),
  // Checked in open, for QEMU's texts.
  'take-child-perms': z.unknown().optional(),
  'unshare-child-perms': z.unknown().optional(),
});
type Options = z.output<typeof optionsSchema>;

interface BlkdebugState {
  image: BdrvChild;
  rules: BlkdebugRules;
  /** take-child-perms and unshare-child-perms as Perm bits. */
  takePerms: number;
  unsharePerms: number;
}

/** QAPI's BlockPermission names. */
const PERM_BY_NAME: ReadonlyMap<string, number> = new Map([
  ['consistent-read', Perm.CONSISTENT_READ],
  ['write', Perm.WRITE],
  ['write-unchanged', Perm.WRITE_UNCHANGED],
  ['resize', Perm.RESIZE],
]);

/** blkdebug_parse_perms for one option: a list of permission names, in QEMU's texts when it is not. */
function parsePerms(value: unknown, key: string): number {
  if (value === undefined) return 0;
  if (!Array.isArray(value)) throw new BlockError('EINVAL', `Block protocol 'blkdebug' doesn't support the option '${key}'`);
  let perms = 0;
  for (const name of value) {
    const bit = typeof name === 'string' ? PERM_BY_NAME.get(name) : undefined;
    // QEMU's list visitor names the element 'null'.
    if (bit === undefined) throw new BlockError('EINVAL', `Parameter 'null' does not accept value '${String(name)}'`);
    perms |= bit;
  }
  return perms;
}

/** blkdebug_child_perm (see the note at the top); before open has set the state, the default alone. */
function childPerms(node: BlockNode, role: number, users: ParentPerms): PermPair {
  const { perm, shared } = defaultChildPerms(node, role, users);
  const s = node.opaque as Partial<BlkdebugState> | undefined;
  return { perm: perm | (s?.takePerms ?? 0), shared: shared & ~(s?.unsharePerms ?? 0) };
}

const stateOf = (node: BlockNode) => node.opaque as BlkdebugState;
const image = (node: BlockNode) => stateOf(node).image;

/** A turn of the event loop: where QEMU reschedules a request before failing it (not `immediately`). */
const nextTurn = () => new Promise<void>((resolve) => setImmediate(resolve));

/**
 * rule_check: fails the request when an armed rule matches it; returns
 * true when a rule with a negative errno completes it without I/O.
 */
async function ruleCheck(node: BlockNode, offsetBytes: number, bytes: number, type: BlkdebugIoType): Promise<boolean> {
  const hit = stateOf(node).rules.check(offsetBytes, bytes, type);
  if (hit === null) return false;
  if (!hit.immediately) await nextTurn();
  if (hit.errno < 0) return true;
  throw injectedError(hit.errno);
}

/** A reason the limits cannot be met, or null (QEMU's blkdebug_open checks). */
function invalidLimits(o: Options): string | null {
  const align = o.align ?? 1;
  if (!isPowerOfTwo(align)) return `Cannot meet constraints with align ${align}`;
  const multiples: Array<[string, number | undefined]> = [
    ['max-transfer', o['max-transfer']],
    ['opt-write-zero', o['opt-write-zero']],
    ['max-write-zero', o['max-write-zero']],
    ['opt-discard', o['opt-discard']],
    ['max-discard', o['max-discard']],
  ];
  for (const [key, value] of multiples) {
    if (value !== undefined && (value === 0 || !isAligned(value, align))) {
      return `Cannot meet constraints with ${key} ${value}`;
    }
  }
  return null;
}

function checkRequest(
  node: BlockNode,
  what: string,
  offsetBytes: number,
  bytes: number,
  maxBytes: number,
  align = node.limits.requestAlignment,
): void {
  if (!isAligned(offsetBytes, align) || !isAligned(bytes, align)) {
    throw new BlockError('EIO', `blkdebug: ${what} ${offsetBytes}+${bytes} breaks alignment ${align}`);
  }
  if (maxBytes > 0 && bytes > maxBytes) {
    throw new BlockError('EIO', `blkdebug: ${what} of ${bytes} bytes exceeds the limit ${maxBytes}`);
  }
}

/**
 * True for a piece smaller than `align` (which blkdebug does not pass down);
 * such a piece must stay inside one aligned block, else the gate erred.
 */
function smallPiece(node: BlockNode, what: string, offsetBytes: number, bytes: number, align: number): boolean {
  if (bytes >= align) return false;
  const end = offsetBytes + bytes;
  const inOneBlock = Math.floor(offsetBytes / align) === Math.floor((end - 1) / align);
  if (!inOneBlock) {
    throw new BlockError('EIO', `blkdebug: ${what} piece ${offsetBytes}+${bytes} crosses alignment ${align}`);
  }
  checkRequest(node, what, offsetBytes, bytes, 0);
  return true;
}

export const blkdebugDriver: BlockDriver = {
  name: 'blkdebug',
  isFilter: true,
  optionsSchema,
  strongOptions: ['config', 'inject-error', 'set-state', 'align', 'max-transfer', 'opt-write-zero', 'max-write-zero', 'opt-discard', 'max-discard'],
  // Opened like a protocol in QEMU, so it reports no allocated size.
  getAllocatedFileSize: async () => undefined,
  async open(node, options, ctx) {
    const o = options as Options;
    const rules = new BlkdebugRules(await readRules(o.config, o));
    const takePerms = parsePerms(o['take-child-perms'], 'take-child-perms');
    const unsharePerms = parsePerms(o['unshare-child-perms'], 'unshare-child-perms');
    const reason = invalidLimits(o);
    if (reason) throw new BlockError('EINVAL', reason);
    // Set before the child is attached: its edge is derived with them.
    node.opaque = { takePerms, unsharePerms } satisfies Partial<BlkdebugState>;
    const child = (await ctx.openChild('image', ChildRole.FILTERED | ChildRole.PRIMARY))!;
    node.opaque = { image: child, rules, takePerms, unsharePerms } satisfies BlkdebugState;
    node.limits.requestAlignment = o.align ?? 1;
    node.limits.maxTransfer = o['max-transfer'] ?? 0;
    node.limits.pwriteZeroesAlignment = o['opt-write-zero'] ?? 0;
    node.limits.maxPwriteZeroes = o['max-write-zero'] ?? 0;
    node.limits.pdiscardAlignment = o['opt-discard'] ?? 0;
    node.limits.maxPdiscard = o['max-discard'] ?? 0;
    node.supportedWriteFlags = Req.FUA & child.node.supportedWriteFlags;
    node.supportedZeroFlags = (Req.FUA | Req.MAY_UNMAP | Req.NO_FALLBACK) & child.node.supportedZeroFlags;
    rules.event('none');
  },
  childPerms,
  getLength: async (node) => image(node).node.totalBytes,
  debugEvent: (node, event) => stateOf(node).rules.event(event),
  qapiProblem: qapiRulesProblem,
  async coPreadv(node, offsetBytes, buf, flags) {
    checkRequest(node, 'read', offsetBytes, buf.length, node.limits.maxTransfer);
    if (await ruleCheck(node, offsetBytes, buf.length, 'read')) return;
    await preadv(image(node), offsetBytes, buf, flags);
  },
  async coPwritev(node, offsetBytes, buf, flags) {
    checkRequest(node, 'write', offsetBytes, buf.length, node.limits.maxTransfer);
    if (await ruleCheck(node, offsetBytes, buf.length, 'write')) return;
    await pwritev(image(node), offsetBytes, buf, flags);
  },
  async coPwriteZeroes(node, offsetBytes, bytes, flags) {
    const align = Math.max(node.limits.requestAlignment, node.limits.pwriteZeroesAlignment);
    if (smallPiece(node, 'write-zeroes', offsetBytes, bytes, align)) {
      throw new BlockError('ENOTSUP', 'blkdebug: write-zeroes piece smaller than opt-write-zero');
    }
    checkRequest(node, 'write-zeroes', offsetBytes, bytes, node.limits.maxPwriteZeroes, align);
    if (await ruleCheck(node, offsetBytes, bytes, 'write-zeroes')) return;
    await pwriteZeroes(image(node), offsetBytes, bytes, flags);
  },
  async coPdiscard(node, offsetBytes, bytes) {
    const align = Math.max(node.limits.requestAlignment, node.limits.pdiscardAlignment);
    if (smallPiece(node, 'discard', offsetBytes, bytes, align)) return;
    checkRequest(node, 'discard', offsetBytes, bytes, node.limits.maxPdiscard, align);
    if (await ruleCheck(node, offsetBytes, bytes, 'discard')) return;
    await pdiscard(image(node), offsetBytes, bytes);
  },
  // The gate flushes the image child afterwards.
  async coFlushToDisk(node) {
    await ruleCheck(node, 0, 0, 'flush');
  },
  async coBlockStatus(node, _wantZero, offsetBytes, bytes) {
    await ruleCheck(node, offsetBytes, bytes, 'block-status');
    return { status: Status.RAW | Status.OFFSET_VALID, pnum: bytes, map: offsetBytes, file: image(node).node };
  },
};
