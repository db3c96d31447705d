/*
 * Throttle groups (QEMU's block/throttle-groups.c): one set of leaky
 * buckets (block/throttle.ts) shared by several users, each a member with
 * its own queues and timers.
 *
 * A request enters `member.intercept(bytes, isWrite)`. It goes at once
 * unless the group's buckets are full, a timer of the group is already
 * armed for its direction, or older requests of the same member and
 * direction are queued: then it joins the member's FIFO queue for that
 * direction. When a request goes, it is accounted and the next request of
 * the group is scheduled: members take turns (round robin over members
 * with queued requests, starting after the one that holds the direction's
 * token); if the buckets have room the next request is started, else a
 * timer is armed on the chosen member for when they will. At most one
 * timer per direction is armed in a group. Queued requests therefore go
 * in order within a member and direction, and fairly between members.
 *
 * Drain (`drainedBegin`) disables a member's limits until `drainedEnd`:
 * its queued requests are let go, so a drain never waits for the clock,
 * as QEMU's io_limits_disabled. A reconfiguration empties the buckets and
 * restarts every member's queues.
 *
 * Memory: a queued request costs one closure; requests wait only while in
 * flight, so the queues are bounded by the callers' own in-flight limits
 * (NBD exports cap their requests in flight).
 *
 * Groups are named. ThrottleGroups (one per graph, see throttleGroupsOf)
 * holds both groups created as `throttle-group` objects and the implicit
 * groups block_set_io_throttle creates (those disappear with their last
 * member, as QEMU's reference counting does). Time comes from an
 * injectable ThrottleClock, so tests run on a fake clock.
 */
import { setImmediate as setImmediatePromise } from 'node:timers/promises';
import { BlockError } from './errors.js';
import { READ, WRITE, ThrottleState, emptyThrottleConfig, type ThrottleConfig, type ThrottleDirection } from './throttle.js';
import { throttleConfigFromProps } from './throttle-object.js';
import type { BlockGraph } from './graph.js';
import { realThrottleClock, type ThrottleClock } from './throttle-clock.js';

export { realThrottleClock, type ThrottleClock } from './throttle-clock.js';

const DIRECTIONS: readonly ThrottleDirection[] = [READ, WRITE];
/** Event-loop turns a leaving member waits for its released requests to resume (one suffices). */
const LEAVE_WAIT_TURNS_MAX = 16;

export class ThrottleGroup {
  readonly state: ThrottleState;
  /** Round-robin order; new members go first (QLIST_INSERT_HEAD). */
  readonly members: ThrottleGroupMember[] = [];
  /** Per direction: the member whose turn it is. */
  tokens: Array<ThrottleGroupMember | null> = [null, null];
  /** Per direction: whether a timer of some member is armed. */
  anyTimerArmed = [false, false];

  constructor(
    readonly name: string,
    readonly clock: ThrottleClock,
    cfg: ThrottleConfig,
    /** Created as a `throttle-group` object (lives until object-del), not implicitly. */
    readonly isObject: boolean,
  ) {
    this.state = new ThrottleState(clock.nowMs(), cfg);
  }

  config(): ThrottleConfig {
    return this.state.config();
  }

  /** Installs a new (validated) configuration and restarts every member (throttle_group_config). */
  configure(cfg: ThrottleConfig): void {
    this.state.configure(cfg, this.clock.nowMs());
    for (const m of this.members) m.restart();
  }

  /** Adds a member (throttle_group_register_tgm). */
  register(): ThrottleGroupMember {
    const member = new ThrottleGroupMember(this);
    for (const d of DIRECTIONS) this.tokens[d] ??= member;
    this.members.unshift(member);
    return member;
  }

  /** The member after `m` in round-robin order (throttle_group_next_tgm). */
  nextMember(m: ThrottleGroupMember): ThrottleGroupMember {
    const i = this.members.indexOf(m);
    return this.members[(i + 1) % this.members.length]!;
  }
}

export class ThrottleGroupMember {
  /** Requests waiting, per direction, oldest first. */
  private readonly queues: Array<Array<() => void>> = [[], []];
  /** Requests between joining a queue and going, per direction. */
  readonly pending = [0, 0];
  private timers: unknown[] = [null, null];
  /** Drains in progress: limits are off while > 0. */
  private limitsDisabled = 0;
  private registered = true;

  constructor(readonly group: ThrottleGroup) {}

  get queued(): number {
    return this.pending[READ]! + this.pending[WRITE]!;
  }

  /** Waits until a request of `bytes` may go, then accounts it (throttle_group_co_io_limits_intercept). */
  async intercept(bytes: number, isWrite: boolean): Promise<void> {
    const d: ThrottleDirection = isWrite ? WRITE : READ;
    const token = nextToken(this, d);
    const mustWait = scheduleTimer(token, d);
    if (mustWait || this.pending[d]! > 0) {
      this.pending[d]!++;
      await new Promise<void>((resolve) => this.queues[d]!.push(resolve));
      this.pending[d]!--;
    }
    this.group.state.account(d, bytes);
    scheduleNextRequest(this, d);
  }

  /** Limits off until drainedEnd; queued requests go now. */
  drainedBegin(): void {
    if (this.limitsDisabled++ === 0) this.restart();
  }

  drainedEnd(): void {
    this.limitsDisabled--;
  }

  get limitsOff(): boolean {
    return this.limitsDisabled > 0;
  }

  /** Starts the oldest queued request of direction `d`; false when none waits. */
  restartQueue(d: ThrottleDirection): boolean {
    const next = this.queues[d]!.shift();
    if (!next) return false;
    next();
    return true;
  }

  /** Fires armed timers now, or starts the next queued request (throttle_group_restart_tgm). */
  restart(): void {
    for (const d of DIRECTIONS) {
      if (this.timers[d] !== null) {
        this.clearTimer(d);
        timerFired(this, d);
      } else {
        restartQueueOrNext(this, d);
      }
    }
  }

  isTimerArmed(d: ThrottleDirection): boolean {
    return this.timers[d] !== null;
  }

  armTimer(d: ThrottleDirection, delayMs: number): void {
    if (this.timers[d] !== null) return;
    this.timers[d] = this.group.clock.setTimer(() => {
      this.timers[d] = null;
      timerFired(this, d);
    }, delayMs);
  }

  private clearTimer(d: ThrottleDirection): void {
    this.group.clock.clearTimer(this.timers[d]);
    this.timers[d] = null;
  }

  /**
   * Leaves the group (throttle_group_unregister_tgm). The caller has let
   * every queued request go first (drainedBegin, then wait for `queued` 0).
   */
  unregister(): void {
    if (!this.registered) return;
    if (this.queued > 0) throw new BlockError('EBUSY', 'throttled requests still queued');
    this.registered = false;
    const g = this.group;
    for (const d of DIRECTIONS) {
      if (this.timers[d] !== null) {
        this.clearTimer(d);
        g.anyTimerArmed[d] = false;
      }
      if (g.tokens[d] === this) {
        const next = g.nextMember(this);
        g.tokens[d] = next === this ? null : next;
      }
    }
    g.members.splice(g.members.indexOf(this), 1);
  }
}

// ---------------------------------------------------------------- scheduling

/**
 * The member whose queued request of direction `d` goes next: the first
 * member after the token holder with requests queued, else `m` itself
 * (next_throttle_token). A draining member with queued requests goes first.
 */
function nextToken(m: ThrottleGroupMember, d: ThrottleDirection): ThrottleGroupMember {
  const g = m.group;
  if (m.pending[d]! > 0 && m.limitsOff) return m;
  const start = g.tokens[d] ?? m;
  let token = g.nextMember(start);
  while (token !== start && token.pending[d] === 0) token = g.nextMember(token);
  if (token === start && token.pending[d] === 0) token = m;
  return token;
}

/** Whether `m`'s next request of direction `d` must wait; arms a timer when it must (throttle_group_schedule_timer). */
function scheduleTimer(m: ThrottleGroupMember, d: ThrottleDirection): boolean {
  const g = m.group;
  if (m.limitsOff) return false;
  if (g.anyTimerArmed[d]) return true;
  const waitMs = g.state.waitMs(d, g.clock.nowMs());
  if (waitMs <= 0) return false;
  m.armTimer(d, waitMs);
  g.tokens[d] = m;
  g.anyTimerArmed[d] = true;
  return true;
}

/** After a request went: start or time the group's next one (schedule_next_request). */
function scheduleNextRequest(m: ThrottleGroupMember, d: ThrottleDirection): void {
  const g = m.group;
  let token = nextToken(m, d);
  if (token.pending[d] === 0) return;
  if (scheduleTimer(token, d)) return;
  if (m.restartQueue(d)) {
    token = m;
  } else {
    token.armTimer(d, 0);
    g.anyTimerArmed[d] = true;
  }
  g.tokens[d] = token;
}

function timerFired(m: ThrottleGroupMember, d: ThrottleDirection): void {
  m.group.anyTimerArmed[d] = false;
  restartQueueOrNext(m, d);
}

/** throttle_group_restart_queue_entry: the member's next request, else the group's. */
function restartQueueOrNext(m: ThrottleGroupMember, d: ThrottleDirection): void {
  if (!m.restartQueue(d)) scheduleNextRequest(m, d);
}

// ---------------------------------------------------------------- registry

/** The throttle groups of one graph (QEMU's global throttle_groups list). */
export class ThrottleGroups {
  private readonly groups = new Map<string, ThrottleGroup>();

  constructor(
    readonly clock: ThrottleClock = realThrottleClock,
    /** `throttle-group` object specifications not created yet (a tool's --object table). */
    private readonly objectSpecs: () => ReadonlyMap<string, { qomType: string; props: Record<string, unknown> }> = () => new Map(),
  ) {}

  /** The group of that name, creating it from an object specification when one is pending. */
  find(name: string): ThrottleGroup | undefined {
    const known = this.groups.get(name);
    if (known) return known;
    const spec = this.objectSpecs().get(name);
    return spec?.qomType === 'throttle-group' ? this.createObject(name, spec.props) : undefined;
  }

  /** A `throttle-group` object (--object / object-add): properties checked with QEMU's messages. */
  createObject(id: string, props: Readonly<Record<string, unknown>>): ThrottleGroup {
    const cfg = throttleConfigFromProps(props);
    if (this.groups.has(id)) throw new BlockError('EEXIST', 'A group with this name already exists');
    const group = new ThrottleGroup(id, this.clock, cfg, true);
    this.groups.set(id, group);
    return group;
  }

  /** object-del of a `throttle-group`: refused while members use it (user_creatable_del). */
  deleteObject(id: string): void {
    const group = this.groups.get(id);
    if (!group?.isObject) return;
    if (group.members.length > 0) throw new BlockError('EBUSY', `object '${id}' is in use, can not be deleted`);
    this.groups.delete(id);
  }

  /** A member of the named group, created empty when it does not exist (throttle_group_incref). */
  join(name: string): ThrottleGroupMember {
    let group = this.find(name);
    if (!group) {
      group = new ThrottleGroup(name, this.clock, emptyThrottleConfig(), false);
      this.groups.set(name, group);
    }
    return group.register();
  }

  /**
   * Removes a member, first letting its queued requests go (they resume on
   * the next turns of the event loop); an implicit group goes with its last
   * member (throttle_group_unref).
   */
  async leave(member: ThrottleGroupMember): Promise<void> {
    member.drainedBegin();
    for (let turn = 0; member.queued > 0 && turn < LEAVE_WAIT_TURNS_MAX; turn++) await setImmediatePromise();
    member.unregister();
    const g = member.group;
    if (!g.isObject && g.members.length === 0 && this.groups.get(g.name) === g) this.groups.delete(g.name);
  }
}

const registries = new WeakMap<BlockGraph, ThrottleGroups>();

/** The graph's throttle groups; `throttle-group` objects in `graph.objects` are created on first use. */
export function throttleGroupsOf(graph: BlockGraph, clock?: ThrottleClock): ThrottleGroups {
  let r = registries.get(graph);
  if (!r) {
    r = new ThrottleGroups(clock, () => graph.objects);
    registries.set(graph, r);
  }
  return r;
}
