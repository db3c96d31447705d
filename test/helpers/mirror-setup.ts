/*
 * Shared set-up for the mirror tests: a graph with the test-mem drivers, a
 * job registry recording its events, and waits on those events.
 */
import { expect } from 'vitest';
import type { OptionTree } from '../../block/keyval.js';
import type { BlockGraph } from '../../block/graph.js';
import type { BlockNode } from '../../block/node.js';
import { JobRegistry } from '../../jobs/registry.js';
import type { Job } from '../../jobs/job.js';
import { memGraph } from './mem-driver.js';

export interface RecordedEvent {
  event: string;
  data: Record<string, unknown>;
}

export interface JobWorld {
  graph: BlockGraph;
  jobs: JobRegistry;
  events: RecordedEvent[];
  /** Opens a user-owned test-mem node (as blockdev-add would). */
  mem(name: string, sizeBytes: number, options?: OptionTree): Promise<BlockNode>;
  /** Resolves when an event matching name (and status, for JOB_STATUS_CHANGE) was recorded. */
  waitEvent(event: string, status?: string, timeoutMs?: number): Promise<RecordedEvent>;
  /** JOB_STATUS_CHANGE statuses, then other event names, in order. */
  sequence(): string[];
}

const WAIT_MS = 10_000;

export function jobWorld(graph: BlockGraph = memGraph()): JobWorld {
  const events: RecordedEvent[] = [];
  const jobs = new JobRegistry((event, data) => events.push({ event, data }));
  const matches = (e: RecordedEvent, event: string, status?: string) =>
    e.event === event && (status === undefined || e.data.status === status);
  return {
    graph,
    jobs,
    events,
    async mem(name, sizeBytes, options = {}) {
      const node = await graph.openNode({ driver: 'test-mem', 'node-name': name, size: sizeBytes, ...options } as OptionTree);
      node.userOwned = true;
      return node;
    },
    async waitEvent(event, status, timeoutMs = WAIT_MS) {
      const deadline = Date.now() + timeoutMs;
      for (;;) {
        const found = events.find((e) => matches(e, event, status));
        if (found) return found;
        if (Date.now() > deadline) throw new Error(`no ${event} ${status ?? ''} within ${timeoutMs} ms; got ${JSON.stringify(events)}`);
        await new Promise((r) => setTimeout(r, 5));
      }
    },
    sequence() {
      return events.map((e) => (e.event === 'JOB_STATUS_CHANGE' ? String(e.data.status) : e.event));
    },
  };
}

/** Waits until the job is gone (concluded and dismissed). */
export async function finished(job: Job): Promise<void> {
  await job.whenFinished();
  expect(job.isFinished).toBe(true);
}

/** The event sequence of a mirror that completes: QEMU 7.2's (peers/out/06-qmp-transcript.jsonl). */
export const COMPLETED_SEQUENCE = [
  'created',
  'running',
  'ready',
  'BLOCK_JOB_READY',
  'waiting',
  'pending',
  'BLOCK_JOB_COMPLETED',
  'concluded',
  'null',
];
