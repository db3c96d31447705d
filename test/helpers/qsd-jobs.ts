/*
 * Small helpers for tests that run block jobs beside qemu-storage-daemon:
 * a command that must succeed, and a bounded wait until the daemon has no
 * job left (query-jobs empty).
 */
import { expect } from 'vitest';
import type { StorageDaemon } from './qmp-client.js';
import { run } from './run.js';

/** Bound on polling the daemon for its jobs' end (× POLL_MS). */
const POLL_ROUNDS = 500;
const POLL_MS = 20;

/** Runs a peer tool in `cwd`; its stdout, or an error with its stderr. */
export async function sh(cmd: string, args: string[], cwd: string): Promise<string> {
  const r = await run(cmd, args, { cwd });
  if (r.code !== 0) throw new Error(`${cmd} ${args.join(' ')}: ${r.stderr}`);
  return r.stdout;
}

/** Waits (bounded) until query-jobs is empty, then quits the daemon cleanly. */
export async function finishJobsAndQuit(qsd: StorageDaemon): Promise<void> {
  for (let i = 0; i < POLL_ROUNDS && (await qsd.qmp.execute<unknown[]>('query-jobs')).length > 0; i++) {
    await new Promise((r) => setTimeout(r, POLL_MS));
  }
  expect(await qsd.qmp.execute('query-jobs')).toEqual([]);
  expect(await qsd.quit()).toBe(0);
}
