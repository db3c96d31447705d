/*
 * One QMP script, two daemons: the harness for tests that run the same
 * commands against qemu-storage-daemon 7.2 and qemu-storage-daemon-ts and
 * compare what can be observed.
 *
 * A `QsdSession` owns one daemon started in its own scratch directory. It
 * records every command's outcome (the `return` value, or the error's
 * class and text) with the directory replaced by $DIR, keeps every event
 * without its timestamp, and waits for events with a bound. Events are only
 * read off the socket while a command is answered, so a wait polls with
 * `query-version` (cheap, no side effect).
 *
 * Besides: qemu-img/qemu-io wrappers that make the images and read the
 * results (imageFacts: check, info --backing-chain, map). Daemons still
 * running are stopped by PID in `stopAllSessions` (call it in afterEach);
 * qsd-compare.ts runs one script on both daemons and compares.
 */
import fs from 'node:fs';
import path from 'node:path';
import { QmpError, startStorageDaemon, type StorageDaemon } from './qmp-client.js';
import { run } from './run.js';

/** Longest wait for one event. */
export const EVENT_TIMEOUT_MS = 30_000;
const POLL_MS = 10;

export type Outcome = { return: unknown } | { error: { class: string; desc: string } };
export interface SeenEvent {
  event: string;
  data: Record<string, unknown>;
}

const live = new Set<StorageDaemon>();

/** Stops (by PID) every daemon a session started that still runs. */
export async function stopAllSessions(): Promise<void> {
  await Promise.all([...live].map((d) => d.stop()));
  live.clear();
}

export class QsdSession {
  readonly outcomes: Array<[string, Outcome]> = [];
  private constructor(
    readonly dir: string,
    readonly ours: boolean,
    readonly daemon: StorageDaemon,
  ) {}

  static async start(dir: string, ours: boolean, args: string[] = []): Promise<QsdSession> {
    fs.mkdirSync(dir, { recursive: true });
    const d = await startStorageDaemon(dir, args, { ours });
    live.add(d);
    return new QsdSession(dir, ours, d);
  }

  /** `name` inside the session's directory. */
  f(name: string): string {
    return path.join(this.dir, name);
  }

  /** A file protocol reference for blockdev-add. */
  fileRef(name: string): { driver: 'file'; filename: string } {
    return { driver: 'file', filename: this.f(name) };
  }

  scrub<T>(v: T): T {
    return v === undefined ? v : (JSON.parse(JSON.stringify(v).split(this.dir).join('$DIR')) as T);
  }

  /** Runs one command and records its outcome (returned, never thrown). */
  async exec(command: string, args?: Record<string, unknown>, view: (v: unknown) => unknown = (v) => v): Promise<Outcome> {
    let outcome: Outcome;
    try {
      outcome = { return: view(await this.daemon.qmp.execute(command, args)) };
    } catch (e) {
      if (!(e instanceof QmpError)) throw e;
      outcome = { error: { class: e.errorClass, desc: e.message } };
    }
    this.outcomes.push([`${command} ${JSON.stringify(this.scrub(args ?? {}))}`, this.scrub(outcome)]);
    return outcome;
  }

  /** Runs one command that must succeed; its return value (recorded too). */
  async ok<T = unknown>(command: string, args?: Record<string, unknown>): Promise<T> {
    const o = await this.exec(command, args);
    if ('error' in o) throw new Error(`${this.ours ? 'ours' : 'qemu'}: ${command} failed: ${o.error.desc}`);
    return o.return as T;
  }

  /** Every event so far, without timestamps. */
  events(): SeenEvent[] {
    return this.daemon.qmp.events.map((e) => ({ event: e.event, data: (e.data ?? {}) as Record<string, unknown> }));
  }

  /** Events of one job: JOB_STATUS_CHANGE as its status, others as {event, data}. */
  jobEvents(id: string, drop: string[] = []): unknown[] {
    return this.events()
      .filter((e) => e.data.id === id || e.data.device === id)
      .map((e) => (e.event === 'JOB_STATUS_CHANGE' ? e.data.status : { event: e.event, data: omit(e.data, drop) }));
  }

  /** Waits (bounded) for an event named `event` matching `pred`, counting from the start. */
  async waitEvent(event: string, pred: (data: Record<string, unknown>) => boolean = () => true, timeoutMs = EVENT_TIMEOUT_MS): Promise<SeenEvent> {
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      const found = this.events().find((e) => e.event === event && pred(e.data));
      if (found) return found;
      if (Date.now() > deadline) {
        const last = JSON.stringify(this.outcomes.slice(-3));
        throw new Error(`${this.ours ? 'ours' : 'qemu'}: no ${event} within ${timeoutMs} ms; last outcomes ${last}; events ${JSON.stringify(this.events())}`);
      }
      await new Promise((r) => setTimeout(r, POLL_MS));
      await this.daemon.qmp.execute('query-version');
    }
  }

  /** Waits for the job's status event. */
  waitStatus(id: string, status: string, timeoutMs?: number): Promise<SeenEvent> {
    return this.waitEvent('JOB_STATUS_CHANGE', (d) => d.id === id && d.status === status, timeoutMs);
  }

  /** Waits until query-jobs is empty (bounded). */
  async waitNoJobs(timeoutMs = EVENT_TIMEOUT_MS): Promise<void> {
    const deadline = Date.now() + timeoutMs;
    while ((await this.daemon.qmp.execute<unknown[]>('query-jobs')).length > 0) {
      if (Date.now() > deadline) throw new Error(`${this.ours ? 'ours' : 'qemu'}: jobs left after ${timeoutMs} ms`);
      await new Promise((r) => setTimeout(r, POLL_MS));
    }
  }

  /** Cancels (force) every job left and waits until none is listed. */
  async stopJobs(): Promise<void> {
    for (const j of await this.daemon.qmp.execute<Array<{ id: string }>>('query-jobs')) {
      await this.daemon.qmp.execute('job-cancel', { id: j.id }).catch(() => undefined);
    }
    await this.waitNoJobs();
  }

  /** `quit`, then the exit status. */
  async quit(): Promise<number | null> {
    const code = await this.daemon.quit();
    live.delete(this.daemon);
    return code;
  }
}

export function omit(o: Record<string, unknown>, keys: string[]): Record<string, unknown> {
  return Object.fromEntries(Object.entries(o).filter(([k]) => !keys.includes(k)));
}

/** Runs a peer tool in `cwd`; stdout+stderr and exit status, `cwd` replaced by $DIR. */
export async function tool(cwd: string, cmd: string, args: string[]): Promise<{ code: number | null; out: string }> {
  const r = await run(cmd, args, { cwd });
  return { code: r.code, out: (r.stdout + r.stderr).split(cwd).join('$DIR') };
}

/** Runs a peer tool that must succeed. */
export async function must(cwd: string, cmd: string, args: string[]): Promise<string> {
  const r = await tool(cwd, cmd, args);
  if (r.code !== 0) throw new Error(`${cmd} ${args.join(' ')}: ${r.out}`);
  return r.out;
}

/** qemu-img create of a qcow2 (optionally with a backing file) or raw image. */
export function createImage(cwd: string, name: string, size: string, opts: { fmt?: 'qcow2' | 'raw'; backing?: string } = {}): Promise<string> {
  const fmt = opts.fmt ?? 'qcow2';
  const backing = opts.backing ? ['-b', opts.backing, '-F', 'qcow2'] : [];
  return must(cwd, 'qemu-img', ['create', '-q', '-f', fmt, ...backing, name, ...(opts.backing ? [] : [size])]);
}

/** qemu-io commands on a qcow2 image. */
export function qemuIo(cwd: string, name: string, ...cmds: string[]): Promise<string> {
  return must(cwd, 'qemu-io', ['-f', 'qcow2', ...cmds.flatMap((c) => ['-c', c]), name]);
}

/**
 * What qemu-img says about result images after the daemon quit: check,
 * info --backing-chain (JSON without actual-size and dirty-flag), map.
 */
export async function imageFacts(cwd: string, name: string, fmt = 'qcow2'): Promise<Record<string, unknown>> {
  const info = JSON.parse(await must(cwd, 'qemu-img', ['info', '-f', fmt, '--backing-chain', '--output=json', name])) as Array<Record<string, unknown>>;
  const map = await must(cwd, 'qemu-img', ['map', '-f', fmt, '--output=json', name]);
  const check = fmt === 'qcow2' ? await tool(cwd, 'qemu-img', ['check', '-q', '-f', fmt, name]) : { code: 0, out: '' };
  return {
    info: info.map((i) => omit(i, ['actual-size', 'dirty-flag'])),
    map: JSON.parse(map) as unknown,
    check,
  };
}

/** qemu-img compare of two images (formats given), output and status. */
export function compareImages(cwd: string, a: string, fa: string, b: string, fb: string): Promise<{ code: number | null; out: string }> {
  return tool(cwd, 'qemu-img', ['compare', '-f', fa, '-F', fb, a, b]);
}
