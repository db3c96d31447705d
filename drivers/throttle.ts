/*
 * `throttle`: a filter that delays requests to keep within the limits of a
 * throttle group (QEMU's block/throttle.c): {driver: throttle,
 * throttle-group: G, file: child}.
 *
 * The group must exist (a `throttle-group` object, or a group another user
 * created): "Throttle group 'G' does not exist". The node joins it as a
 * member at open and leaves it at close. Reads wait as reads; writes,
 * write-zeroes and discards wait as writes of their length, then go to
 * `file` unchanged. Flush, truncate and block status pass through (the
 * gate and the normalised driver do that for filters). A drain of the node
 * or of anything below it turns the limits off until it ends, so draining
 * never waits for the clock.
 */
import { z } from 'zod';
import { BlockError } from '../block/errors.js';
import { Req } from '../block/flags.js';
import { pdiscard, preadv, pwriteZeroes, pwritev } from '../block/io.js';
import { ChildRole, type BdrvChild, type BlockNode } from '../block/node.js';
import { zBlockdevRef } from '../block/options.js';
import type { BlockDriver } from '../block/driver.js';
import { throttleGroupsOf, type ThrottleGroupMember, type ThrottleGroups } from '../block/throttle-group.js';

interface ThrottleNodeState {
  file: BdrvChild;
  member: ThrottleGroupMember;
  groups: ThrottleGroups;
}

const state = (node: BlockNode) => node.opaque as ThrottleNodeState;

const optionsSchema = z.object({
  'throttle-group': z.string({
    error: (issue) => (issue.input === undefined ? "Parameter 'throttle-group' is missing" : undefined),
  }),
  file: zBlockdevRef.optional(),
});
type Options = z.output<typeof optionsSchema>;

async function open(node: BlockNode, options: Record<string, unknown>, ctx: Parameters<BlockDriver['open']>[2]) {
  const o = options as Options;
  const file = (await ctx.openChild('file', ChildRole.FILTERED | ChildRole.PRIMARY))!;
  const groups = throttleGroupsOf(ctx.graph);
  if (!groups.find(o['throttle-group'])) {
    throw new BlockError('EINVAL', `Throttle group '${o['throttle-group']}' does not exist`);
  }
  const member = groups.join(o['throttle-group']);
  // Opened under a drain (the hook only fires when the count leaves 0): start with limits off.
  if (node.quiesceCounter > 0) member.drainedBegin();
  node.opaque = { file, member, groups } satisfies ThrottleNodeState;
  node.supportedWriteFlags = Req.FUA & file.node.supportedWriteFlags;
  node.supportedZeroFlags = (Req.FUA | Req.MAY_UNMAP | Req.NO_FALLBACK) & file.node.supportedZeroFlags;
}

export const throttleDriver: BlockDriver = {
  name: 'throttle',
  isFilter: true,
  optionsSchema,
  strongOptions: ['throttle-group'],
  open,
  async close(node) {
    const s = state(node);
    await s.groups.leave(s.member);
  },
  getLength: async (node) => state(node).file.node.totalBytes,
  async coPreadv(node, offsetBytes, buf, flags) {
    await state(node).member.intercept(buf.length, false);
    await preadv(state(node).file, offsetBytes, buf, flags);
  },
  async coPwritev(node, offsetBytes, buf, flags) {
    await state(node).member.intercept(buf.length, true);
    await pwritev(state(node).file, offsetBytes, buf, flags);
  },
  async coPwriteZeroes(node, offsetBytes, bytes, flags) {
    await state(node).member.intercept(bytes, true);
    await pwriteZeroes(state(node).file, offsetBytes, bytes, flags);
  },
  async coPdiscard(node, offsetBytes, bytes) {
    await state(node).member.intercept(bytes, true);
    await pdiscard(state(node).file, offsetBytes, bytes);
  },
  // Not yet opened: open() accounts for a drain already in progress.
  drainBegin: (node) => (node.opaque as ThrottleNodeState | undefined)?.member.drainedBegin(),
  drainEnd: (node) => (node.opaque as ThrottleNodeState | undefined)?.member.drainedEnd(),
};
