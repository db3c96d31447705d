/*
 * I/O throttling: QEMU's leaky buckets (util/throttle.c, docs/throttle.txt).
 *
 * Six buckets limit bytes and operations per second, in total and per
 * direction: bps-total/read/write and iops-total/read/write. Each bucket has
 * an average rate `avg` (units per second, 0 = unlimited), a burst rate
 * `max` and a burst length in seconds (`*-max-length`). Every request that
 * goes out adds its size (bps buckets) or its unit count (iops buckets;
 * with `iops-size` set, a larger request counts size / iops-size units) to
 * the level of the total bucket and of its direction's bucket. Levels leak
 * at `avg` per second. A request may go when every bucket of its direction
 * is at most `max × burst-length` full; otherwise it waits until enough
 * has leaked (wait = overflow / avg). A bucket without a burst rate gets
 * avg / 10 (100 ms of traffic) as its `max`, which smooths the schedule.
 * With a burst length over one second, a second level (`burstLevel`) leaks
 * at `max` per second and keeps the burst itself at `max` units per second.
 *
 * This file holds the configuration (validated with QEMU's messages, as
 * `throttle_is_valid` and `throttle_limits_to_config` give them), the
 * ThrottleLimits names used by QMP and QOM, and ThrottleState, the pure
 * accounting: it knows nothing of queues or timers and takes the time as
 * an argument, so it is deterministic under a fake clock. Queues, timers
 * and groups shared by several users are in block/throttle-group.ts.
 *
 * Times are milliseconds (fractional), rates per second. QEMU computes
 * waits in whole nanoseconds; so do we (a wait below 1 ns is no wait).
 */
import { BlockError } from './errors.js';

/** Largest rate or burst QEMU accepts (THROTTLE_VALUE_MAX). */
export const THROTTLE_VALUE_MAX = 1e15;
/** Largest burst length in seconds (UINT_MAX). */
export const BURST_LENGTH_MAX = 2 ** 32 - 1;
/** Share of the average rate used as burst when none is given (100 ms worth). */
const DEFAULT_BURST_FRACTION = 10;
const NS_PER_MS = 1e6;
const MS_PER_S = 1000;

/** Bucket indices, in QEMU's BucketType order. */
export const Bucket = { BPS_TOTAL: 0, BPS_READ: 1, BPS_WRITE: 2, OPS_TOTAL: 3, OPS_READ: 4, OPS_WRITE: 5 } as const;
export const BUCKET_COUNT = 6;

/** Request direction (ThrottleDirection). */
export type ThrottleDirection = 0 | 1;
export const READ: ThrottleDirection = 0;
export const WRITE: ThrottleDirection = 1;

/** Buckets a request of each direction fills and waits for (total first). */
const BUCKETS_OF: readonly (readonly number[])[] = [
  [Bucket.BPS_TOTAL, Bucket.OPS_TOTAL, Bucket.BPS_READ, Bucket.OPS_READ],
  [Bucket.BPS_TOTAL, Bucket.OPS_TOTAL, Bucket.BPS_WRITE, Bucket.OPS_WRITE],
];

/** One bucket's settings as the user gave them. */
export interface BucketConfig {
  /** Average rate per second (0: no limit). */
  avg: number;
  /** Burst rate per second (0: none given). */
  max: number;
  /** Seconds the burst rate may last (1 by default). */
  burstLength: number;
}

/** A throttle configuration (ThrottleConfig): six buckets and iops-size. */
export interface ThrottleConfig {
  buckets: BucketConfig[];
  /** Bytes counted as one operation (0: every request is one). */
  opSizeBytes: number;
}

/** An empty configuration: nothing limited (throttle_config_init). */
export function emptyThrottleConfig(): ThrottleConfig {
  return { buckets: Array.from({ length: BUCKET_COUNT }, () => ({ avg: 0, max: 0, burstLength: 1 })), opSizeBytes: 0 };
}

export function cloneThrottleConfig(cfg: ThrottleConfig): ThrottleConfig {
  return { buckets: cfg.buckets.map((b) => ({ ...b })), opSizeBytes: cfg.opSizeBytes };
}

/** Whether any bucket limits anything (throttle_enabled). */
export function throttleEnabled(cfg: ThrottleConfig): boolean {
  return cfg.buckets.some((b) => b.avg > 0);
}

// ---------------------------------------------------------------- names

/** ThrottleLimits bucket names, in QAPI member order (iops before bps). */
const LIMIT_BUCKETS = [
  ['iops-total', Bucket.OPS_TOTAL],
  ['iops-read', Bucket.OPS_READ],
  ['iops-write', Bucket.OPS_WRITE],
  ['bps-total', Bucket.BPS_TOTAL],
  ['bps-read', Bucket.BPS_READ],
  ['bps-write', Bucket.BPS_WRITE],
] as const;

export type LimitField = 'avg' | 'max' | 'burstLength' | 'opSize';
export interface LimitKey {
  /** QAPI name: `bps-total`, `bps-total-max`, `bps-total-max-length`, …, `iops-size`. */
  name: string;
  bucket: number;
  field: LimitField;
}

/** Every ThrottleLimits member, in QAPI order. */
export const LIMIT_KEYS: readonly LimitKey[] = [
  ...LIMIT_BUCKETS.flatMap(([name, bucket]) => [
    { name, bucket, field: 'avg' as const },
    { name: `${name}-max`, bucket, field: 'max' as const },
    { name: `${name}-max-length`, bucket, field: 'burstLength' as const },
  ]),
  { name: 'iops-size', bucket: 0, field: 'opSize' },
];

/** A ThrottleLimits object: QAPI names to values (absent: unchanged). */
export type ThrottleLimits = Partial<Record<string, number>>;

/** Sets one limit; returns a reason when the value cannot be stored. */
export function setLimit(cfg: ThrottleConfig, key: LimitKey, value: number, label = key.name): string | null {
  if (key.field === 'opSize') {
    cfg.opSizeBytes = value;
    return null;
  }
  if (key.field === 'burstLength' && value > BURST_LENGTH_MAX) {
    return `${label} value must be in the range [0, ${BURST_LENGTH_MAX}]`;
  }
  cfg.buckets[key.bucket]![key.field] = value;
  return null;
}

/** throttle_limits_to_config: `limits` over `base`, validated (EINVAL with QEMU's text). */
export function limitsToConfig(limits: ThrottleLimits, base: ThrottleConfig = emptyThrottleConfig()): ThrottleConfig {
  const cfg = cloneThrottleConfig(base);
  for (const key of LIMIT_KEYS) {
    const value = limits[key.name];
    if (value === undefined) continue;
    const reason = setLimit(cfg, key, value);
    if (reason) throw new BlockError('EINVAL', reason);
  }
  const reason = invalidThrottleConfig(cfg);
  if (reason) throw new BlockError('EINVAL', reason);
  return cfg;
}

/** throttle_config_to_limits: every member, as qom-get shows `limits`. */
export function configToLimits(cfg: ThrottleConfig): Record<string, number> {
  const out: Record<string, number> = {};
  for (const key of LIMIT_KEYS) {
    out[key.name] = key.field === 'opSize' ? cfg.opSizeBytes : cfg.buckets[key.bucket]![key.field];
  }
  return out;
}

// ---------------------------------------------------------------- validation

/** True when a total bucket and a per-direction bucket both set `field`. */
function totalAndDirection(cfg: ThrottleConfig, total: number, read: number, write: number, field: 'avg' | 'max'): boolean {
  const b = cfg.buckets;
  return b[total]![field] !== 0 && (b[read]![field] !== 0 || b[write]![field] !== 0);
}

/** throttle_is_valid: the first problem with `cfg`, in QEMU's order and words, or null. */
export function invalidThrottleConfig(cfg: ThrottleConfig): string | null {
  const B = Bucket;
  for (const field of ['avg', 'max'] as const) {
    if (
      totalAndDirection(cfg, B.BPS_TOTAL, B.BPS_READ, B.BPS_WRITE, field) ||
      totalAndDirection(cfg, B.OPS_TOTAL, B.OPS_READ, B.OPS_WRITE, field)
    ) {
      return 'bps/iops/max total values and read/write values cannot be used at the same time';
    }
  }
  const b = cfg.buckets;
  if (cfg.opSizeBytes && !b[B.OPS_TOTAL]!.avg && !b[B.OPS_READ]!.avg && !b[B.OPS_WRITE]!.avg) {
    return 'iops size requires an iops value to be set';
  }
  for (const bucket of b) {
    const reason = invalidBucket(bucket);
    if (reason) return reason;
  }
  return null;
}

function invalidBucket({ avg, max, burstLength }: BucketConfig): string | null {
  if (avg < 0 || max < 0 || avg > THROTTLE_VALUE_MAX || max > THROTTLE_VALUE_MAX) {
    return `bps/iops/max values must be within [0, ${THROTTLE_VALUE_MAX}]`;
  }
  if (!burstLength) return 'the burst length cannot be 0';
  if (burstLength > 1 && !max) return 'burst length set without burst rate';
  if (max && !avg) return 'bps_max/iops_max require corresponding bps/iops values';
  if (max && max < avg) return 'bps_max/iops_max cannot be lower than bps/iops';
  return null;
}

// ---------------------------------------------------------------- accounting

/** A bucket in use: its effective burst rate and its levels. */
interface LiveBucket {
  avg: number;
  /** Burst rate, or avg / 10 when none was given (throttle_fix_bucket). */
  max: number;
  burstLength: number;
  /** Units accounted and not yet leaked. */
  level: number;
  /** Units of the current burst not yet leaked at `max` (burst length > 1 only). */
  burstLevel: number;
}

/** Wait in ms for `extra` units at `rate` per second, truncated to whole ns as QEMU does. */
function waitMsFor(extra: number, ratePerS: number): number {
  return Math.trunc((extra * MS_PER_S * NS_PER_MS) / ratePerS) / NS_PER_MS;
}

/**
 * The leaky buckets of one configuration (ThrottleState). Not shared state
 * by itself: a ThrottleGroup owns one and serialises its users through it.
 */
export class ThrottleState {
  private cfg = emptyThrottleConfig();
  private buckets: LiveBucket[] = [];
  private previousLeakMs = 0;

  constructor(nowMs = 0, cfg: ThrottleConfig = emptyThrottleConfig()) {
    this.configure(cfg, nowMs);
  }

  /** Installs a new (valid) configuration; levels start empty (throttle_config). */
  configure(cfg: ThrottleConfig, nowMs: number): void {
    this.cfg = cloneThrottleConfig(cfg);
    this.buckets = cfg.buckets.map((b) => ({
      avg: b.avg,
      max: b.avg && !b.max ? b.avg / DEFAULT_BURST_FRACTION : b.max,
      burstLength: b.burstLength,
      level: 0,
      burstLevel: 0,
    }));
    this.previousLeakMs = nowMs;
  }

  /** The configuration as the user gave it. */
  config(): ThrottleConfig {
    return cloneThrottleConfig(this.cfg);
  }

  get enabled(): boolean {
    return throttleEnabled(this.cfg);
  }

  /** Levels leak in proportion to the time since the last leak (throttle_do_leak). */
  private leak(nowMs: number): void {
    const deltaMs = nowMs - this.previousLeakMs;
    this.previousLeakMs = nowMs;
    if (deltaMs <= 0) return;
    for (const b of this.buckets) {
      b.level = Math.max(b.level - (b.avg * deltaMs) / MS_PER_S, 0);
      if (b.burstLength > 1) b.burstLevel = Math.max(b.burstLevel - (b.max * deltaMs) / MS_PER_S, 0);
    }
  }

  /**
   * How long (ms) a request in `direction` must wait at `nowMs` before it
   * may go; 0: it may go now (throttle_compute_timer). Leaks first.
   */
  waitMs(direction: ThrottleDirection, nowMs: number): number {
    this.leak(nowMs);
    let longest = 0;
    for (const i of BUCKETS_OF[direction]!) longest = Math.max(longest, bucketWaitMs(this.buckets[i]!));
    return longest;
  }

  /** Accounts a request that goes out now (throttle_account). */
  account(direction: ThrottleDirection, bytes: number): void {
    const opSize = this.cfg.opSizeBytes;
    const units = opSize && bytes > opSize ? bytes / opSize : 1;
    const [bpsTotal, opsTotal, bpsDir, opsDir] = BUCKETS_OF[direction]!;
    for (const i of [bpsTotal!, bpsDir!]) fill(this.buckets[i]!, bytes);
    for (const i of [opsTotal!, opsDir!]) fill(this.buckets[i]!, units);
  }

  /** Current level of a bucket (for tests and diagnostics). */
  level(bucket: number): number {
    return this.buckets[bucket]!.level;
  }
}

function fill(b: LiveBucket, units: number): void {
  b.level += units;
  if (b.burstLength > 1) b.burstLevel += units;
}

/** throttle_compute_wait: 0 while the bucket (and the burst) has room. */
function bucketWaitMs(b: LiveBucket): number {
  if (!b.avg) return 0;
  const extra = b.level - b.max * b.burstLength;
  if (extra > 0) return waitMsFor(extra, b.avg);
  if (b.burstLength > 1) {
    const burstExtra = b.burstLevel - b.max / DEFAULT_BURST_FRACTION;
    if (burstExtra > 0) return waitMsFor(burstExtra, b.max);
  }
  return 0;
}
