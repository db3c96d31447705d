// Drained sections pause the jobs holding the drained node or a node above
// it, as QEMU's child_job edges (blockjob.c child_job_drained_begin/end →
// job_pause/job_resume): the paused/running (standby/ready) pairs, nesting,
// a user pause under a drain, a job started inside a drained section, the
// job's own drain, bdrv_drain_all, and the holds let go when the job ends.
import { afterEach, describe, expect, it } from 'vitest';
import { drainAll, drained, drainedBegin, drainedEnd } from '../../block/drain.js';
import type { BlockGraph } from '../../block/graph.js';
import { attachChild, ChildRole, type BlockNode } from '../../block/node.js';
import { Perm } from '../../block/flags.js';
import { Job, type JobDriver } from '../../jobs/job.js';
import { JobRegistry } from '../../jobs/registry.js';
import { testGraph } from '../helpers/graphs.js';

/** How long the looping driver sleeps between its pause points (ms). */
const LOOP_SLEEP_MS = 5;

let graph: BlockGraph;
afterEach(async () => {
  await graph?.closeAll();
});

async function nodes(...names: string[]): Promise<BlockNode[]> {
  graph = testGraph();
  const out: BlockNode[] = [];
  for (const name of names) out.push(await graph.openNode({ driver: 'null-co', 'node-name': name, size: 1 << 20 }));
  return out;
}

function setup() {
  const statuses: string[] = [];
  const reg = new JobRegistry((event, data) => {
    if (event === 'JOB_STATUS_CHANGE') statuses.push(`${String(data.id)}:${String(data.status)}`);
  });
  return { reg, statuses };
}

/** A job that sleeps and passes pause points until `stop` (READY first when `ready`). */
function loopingDriver(ready = false) {
  let done = false;
  const driver: JobDriver = {
    type: 'mirror',
    async run(job: Job) {
      if (ready) job.transitionToReady();
      while (!done && !job.cancelRequested()) {
        await job.sleep(LOOP_SLEEP_MS);
        await job.pausePoint();
      }
    },
    complete: () => {
      done = true;
    },
  };
  return { driver, stop: () => (done = true) };
}

function startLooping(reg: JobRegistry, id: string, held: BlockNode[], ready = false): Job {
  const job = reg.create(loopingDriver(ready).driver, { id });
  for (const node of held) job.holdNode(node);
  job.start();
  return job;
}

const tick = () => new Promise((r) => setTimeout(r, LOOP_SLEEP_MS * 2));

async function cancelled(...jobs: Job[]): Promise<void> {
  for (const job of jobs) job.cancel(true);
  await Promise.all(jobs.map((j) => j.whenFinished()));
}

describe('drained sections pause the jobs that hold the node', () => {
  it('one paused/running pair per drained section, nested ones included', async () => {
    const [a] = await nodes('a');
    const { reg, statuses } = setup();
    const job = startLooping(reg, 'j', [a!]);
    await drained(a!, async () => {
      expect(job.status).toBe('paused');
      expect(job.blockJobInfo()).toMatchObject({ paused: true, busy: false });
      await drained(a!, () => expect(job.status).toBe('paused'));
      expect(job.status).toBe('paused');
    });
    expect(job.status).toBe('running');
    await cancelled(job);
    expect(statuses).toEqual(['j:created', 'j:running', 'j:paused', 'j:running', 'j:aborting', 'j:concluded', 'j:null']);
  });

  it('a drain of a child reaches the job through the parent edge', async () => {
    const [child, parent] = await nodes('child', 'parent');
    attachChild(parent!, 'file', ChildRole.PRIMARY, child!, Perm.CONSISTENT_READ, Perm.ALL);
    const { reg, statuses } = setup();
    const job = startLooping(reg, 'j', [parent!]);
    await drained(child!, () => expect(job.status).toBe('paused'));
    await cancelled(job);
    expect(statuses.slice(0, 4)).toEqual(['j:created', 'j:running', 'j:paused', 'j:running']);
  });

  it('a READY job goes to standby and back', async () => {
    const [a] = await nodes('a');
    const { reg, statuses } = setup();
    const job = startLooping(reg, 'r', [a!], true);
    await drained(a!, () => expect(job.status).toBe('standby'));
    job.complete();
    await job.whenFinished();
    expect(statuses).toEqual(['r:created', 'r:running', 'r:ready', 'r:standby', 'r:ready', 'r:waiting', 'r:pending', 'r:concluded', 'r:null']);
  });

  it('a job paused by the user shows nothing for a drain and stays paused after it', async () => {
    const [a] = await nodes('a');
    const { reg, statuses } = setup();
    const job = startLooping(reg, 'u', [a!]);
    job.pause();
    await tick();
    await drained(a!, () => undefined);
    await tick();
    expect(job.status).toBe('paused');
    job.resume();
    await tick();
    expect(job.status).toBe('running');
    await cancelled(job);
    expect(statuses.slice(0, 4)).toEqual(['u:created', 'u:running', 'u:paused', 'u:running']);
  });

  it('a job held on a drained node and started inside the section pauses at once, runs when it ends', async () => {
    const [a] = await nodes('a');
    const { reg, statuses } = setup();
    await drainedBegin(a!);
    const job = reg.create(loopingDriver().driver, { id: 'b' });
    job.holdNode(a!);
    job.start();
    expect(statuses).toEqual(['b:created', 'b:running', 'b:paused']);
    drainedEnd(a!);
    expect(statuses).toEqual(['b:created', 'b:running', 'b:paused', 'b:running']);
    await cancelled(job);
  });

  it('drain-all pauses every running job once, in the order of the nodes', async () => {
    const [a, b] = await nodes('a', 'b');
    const { reg, statuses } = setup();
    const second = startLooping(reg, 'on-b', [b!]);
    const first = startLooping(reg, 'on-a', [a!]);
    await tick(); // both asleep, as jobs are when a command comes
    await drainAll([a!, b!]);
    expect(statuses.filter((s) => /paused|running/.test(s)).slice(2)).toEqual(['on-a:paused', 'on-b:paused', 'on-a:running', 'on-b:running']);
    await cancelled(first, second);
  });

  it("the job's own drain neither waits for it nor stops it", async () => {
    const [a] = await nodes('a');
    const { reg, statuses } = setup();
    let passes = 0;
    const driver: JobDriver = {
      type: 'mirror',
      async run(job) {
        await job.ownDrainBegin(() => drainedBegin(a!));
        for (; passes < 3; passes++) await job.rateLimit(0);
        job.ownDrainEnd(() => drainedEnd(a!));
      },
    };
    const job = reg.create(driver, { id: 'o' });
    job.holdNode(a!);
    job.start();
    await job.whenFinished();
    expect(passes).toBe(3);
    expect(statuses).toEqual(['o:created', 'o:running', 'o:waiting', 'o:pending', 'o:concluded', 'o:null']);
  });

  it('lets go of its nodes when it ends, balanced even while they are drained', async () => {
    const [a] = await nodes('a');
    const { reg } = setup();
    const job = startLooping(reg, 'g', [a!]);
    await drainedBegin(a!);
    await cancelled(job);
    expect(a!.holders).toEqual([]);
    drainedEnd(a!);
    expect(a!.quiesceCounter).toBe(0);
  });
});
