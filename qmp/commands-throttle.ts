/*
 * block_set_io_throttle: I/O limits on a BlockBackend (QEMU's
 * qmp_block_set_io_throttle in block/qapi-sysemu.c), in QEMU's key names
 * (bps, bps_rd, bps_wr, iops, iops_rd, iops_wr, the *_max bursts, their
 * *_max_length in seconds, iops_size, group) and with its messages.
 *
 * Design choice. qemu-storage-daemon 7.2 has no such command (it answers
 * CommandNotFound): it has no guest devices, and the command addresses a
 * device's BlockBackend by `device` (legacy drive name) or `id` (qdev id).
 * We offer it anyway, and the BlockBackends a daemon owns are those of its
 * block exports, so both `device` and `id` name a block export by its id
 * (for an NBD export added with nbd-server-add, its name), and everything
 * that export serves is throttled. The daemon supplies the lookup
 * (ThrottleCommandContext.findBackendForThrottle).
 *
 * Semantics as in QEMU: exactly one of `device` and `id` ("Need exactly one
 * of 'device' and 'id'"); an unknown one is DeviceNotFound ("Device 'x'
 * not found"); the configuration is validated with throttle_is_valid's
 * messages. Non-zero limits put the backend in a throttle group (`group`,
 * else the device/id name; created empty if it does not exist) and set
 * that whole group's limits; `group` on a throttled backend moves it to
 * that group. All limits zero takes the backend out of its group, first
 * letting its queued requests go.
 */
import { z } from 'zod';
import { QmpError, defineCommand, genericError, type QmpCommand } from './command.js';
import type { BlockBackend } from '../block/backend.js';
import type { BlockGraph } from '../block/graph.js';
import { BURST_LENGTH_MAX, Bucket, emptyThrottleConfig, invalidThrottleConfig, throttleEnabled, type ThrottleConfig } from '../block/throttle.js';
import { ThrottleGroupMember, throttleGroupsOf } from '../block/throttle-group.js';

/** What block_set_io_throttle needs from the daemon. */
export interface ThrottleCommandContext {
  readonly graph: BlockGraph;
  /** The BlockBackend of the block export with this id, if there is one (see the note at the top). */
  findBackendForThrottle(idOrDevice: string): BlockBackend | undefined;
}

const zInt = z.number().int();

/** QMP argument name prefix of each bucket, with its bucket index. */
const BUCKET_ARGS = [
  ['bps', Bucket.BPS_TOTAL],
  ['bps_rd', Bucket.BPS_READ],
  ['bps_wr', Bucket.BPS_WRITE],
  ['iops', Bucket.OPS_TOTAL],
  ['iops_rd', Bucket.OPS_READ],
  ['iops_wr', Bucket.OPS_WRITE],
] as const;

/** BlockIOThrottle. */
const blockIoThrottle = z.strictObject({
  device: z.string().optional(),
  id: z.string().optional(),
  bps: zInt,
  bps_rd: zInt,
  bps_wr: zInt,
  iops: zInt,
  iops_rd: zInt,
  iops_wr: zInt,
  bps_max: zInt.optional(),
  bps_rd_max: zInt.optional(),
  bps_wr_max: zInt.optional(),
  iops_max: zInt.optional(),
  iops_rd_max: zInt.optional(),
  iops_wr_max: zInt.optional(),
  bps_max_length: zInt.optional(),
  bps_rd_max_length: zInt.optional(),
  bps_wr_max_length: zInt.optional(),
  iops_max_length: zInt.optional(),
  iops_rd_max_length: zInt.optional(),
  iops_wr_max_length: zInt.optional(),
  iops_size: zInt.optional(),
  group: z.string().optional(),
});
type BlockIoThrottleArgs = z.infer<typeof blockIoThrottle>;

/** A QAPI int stored in QEMU's unsigned burst_length (truncated to 32 bits, as C does). */
function toBurstLength(value: number): number {
  const modulus = BURST_LENGTH_MAX + 1;
  return ((value % modulus) + modulus) % modulus;
}

/** The ThrottleConfig the arguments describe (not yet validated). */
export function configFromArgs(args: BlockIoThrottleArgs): ThrottleConfig {
  const cfg = emptyThrottleConfig();
  const values = args as Record<string, number | string | undefined>;
  for (const [name, bucket] of BUCKET_ARGS) {
    const b = cfg.buckets[bucket]!;
    b.avg = values[name] as number;
    const max = values[`${name}_max`];
    const length = values[`${name}_max_length`];
    if (typeof max === 'number') b.max = max;
    if (typeof length === 'number') b.burstLength = toBurstLength(length);
  }
  if (args.iops_size !== undefined) cfg.opSizeBytes = args.iops_size;
  return cfg;
}

/** qmp_get_blk. */
function backendFor(ctx: ThrottleCommandContext, args: BlockIoThrottleArgs): BlockBackend {
  const name = args.device ?? args.id;
  if ((args.device === undefined) === (args.id === undefined) || name === undefined) {
    throw genericError("Need exactly one of 'device' and 'id'");
  }
  const backend = ctx.findBackendForThrottle(name);
  if (!backend) throw new QmpError('DeviceNotFound', `Device '${name}' not found`);
  return backend;
}

/** blk_io_limits_disable: lets queued requests go, leaves the group. */
async function removeThrottle(ctx: ThrottleCommandContext, backend: BlockBackend, member: ThrottleGroupMember) {
  await throttleGroupsOf(ctx.graph).leave(member);
  if (backend.throttle === member) backend.setThrottle(null);
}

/** blk_io_limits_enable, or blk_io_limits_update_group when already throttled. */
async function memberFor(ctx: ThrottleCommandContext, backend: BlockBackend, groupName: string, moving: boolean) {
  const current = backend.throttle instanceof ThrottleGroupMember ? backend.throttle : null;
  if (current && (!moving || current.group.name === groupName)) return current;
  if (current) await removeThrottle(ctx, backend, current);
  const member = throttleGroupsOf(ctx.graph).join(groupName);
  backend.setThrottle(member);
  return member;
}

export const throttleCommands: QmpCommand<ThrottleCommandContext>[] = [
  defineCommand({
    name: 'block_set_io_throttle',
    args: blockIoThrottle,
    async run(ctx: ThrottleCommandContext, args) {
      const backend = backendFor(ctx, args);
      const cfg = configFromArgs(args);
      const reason = invalidThrottleConfig(cfg);
      if (reason) throw genericError(reason);
      const current = backend.throttle instanceof ThrottleGroupMember ? backend.throttle : null;
      if (throttleEnabled(cfg)) {
        const groupName = args.group ?? args.device ?? args.id!;
        const member = await memberFor(ctx, backend, groupName, args.group !== undefined);
        member.group.configure(cfg);
      } else if (current) {
        await removeThrottle(ctx, backend, current);
      }
      return {};
    },
  }),
];
