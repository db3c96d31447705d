/*
 * What a job holds on its nodes (jobs/block-job.ts JobEdges, QEMU's
 * block_job_add_bdrv) and mirror_top's `stop` (drivers/mirror-top.ts):
 * a child_job edge takes nothing, shares only what it says, names the job
 * in a refusal, stays where it is when a node's other parents move, and
 * goes when the job concludes; a stopped mirror_top passes nothing of its
 * users on. The daemon-level behaviour is compared with
 * qemu-storage-daemon in test/interop/qsd-ts-job-perms.test.ts.
 */
import fs from 'node:fs';
import path from 'node:path';
import { describe, expect, it } from 'vitest';
import { Perm } from '../../block/flags.js';
import { attachChild, TransientParent, type BlockNode } from '../../block/node.js';
import { moveParents } from '../../block/replace.js';
import { insertMirrorTop, mirrorTopChild, stopMirrorTop } from '../../drivers/mirror-top.js';
import { JobEdges } from '../../jobs/block-job.js';
import type { Job } from '../../jobs/job.js';
import { JobRegistry } from '../../jobs/registry.js';
import { testGraph } from '../helpers/graphs.js';
import { scratchDir } from '../helpers/tmp.js';

const dir = scratchDir('qbt-job-perms-');
const MiB = 1 << 20;
const { CONSISTENT_READ: CR, WRITE: W, WRITE_UNCHANGED: WU, ALL } = Perm;

let files = 0;
async function rawNode(name: string): Promise<BlockNode> {
  const filename = path.join(dir, `f${++files}.raw`);
  fs.writeFileSync(filename, Buffer.alloc(MiB));
  return testGraph().openNode({ driver: 'raw', 'node-name': name, file: { driver: 'file', filename } });
}

/** A job in status created that never runs. */
function idleJob(id: string): Job {
  const jobs = new JobRegistry(() => undefined);
  return jobs.create({ type: 'stream', run: async () => undefined }, { id });
}

describe("a job's child_job edges", () => {
  it("take nothing, share what they say, and name the job in QEMU's words", async () => {
    const node = await rawNode('mid');
    const job = idleJob('j');
    const edges = new JobEdges(job);
    edges.add('intermediate node', node, CR | WU);
    expect(edges.all.map((e) => [e.perm, e.shared])).toEqual([[0, CR | WU]]);
    expect(() => attachChild(new TransientParent('an unnamed block device'), 'root', 0, node, CR | W, ALL)).toThrow(
      "Permission conflict on node 'mid': permissions 'write' are both required by an unnamed block device (uses node 'mid' as 'root' child) " +
        "and unshared by stream job 'j' (uses node 'mid' as 'intermediate node' child).",
    );
    edges.removeAll();
    expect(node.parents).toEqual([]);
  });

  it("stay at their node when the node's other parents move (QEMU's stay_at_node)", async () => {
    const [from, to] = [await rawNode('a'), await rawNode('b')];
    const edges = new JobEdges(idleJob('j'));
    edges.add('source', from, CR | W | WU);
    const user = attachChild(new TransientParent('user'), 'root', 0, from, CR, ALL);
    expect(moveParents(from, to, edges.all)).toEqual([user]);
    expect(from.parents).toEqual([...edges.all]);
  });
});

describe("mirror_top's stop", () => {
  it("passes its users' permissions on until stopped, then takes nothing and shares everything", async () => {
    const source = await rawNode('src');
    const filter = await insertMirrorTop(testGraph(), source, null);
    attachChild(new TransientParent('writer'), 'root', 0, filter, CR | W, CR | W | WU);
    expect([mirrorTopChild(filter).perm, mirrorTopChild(filter).shared]).toEqual([CR | W, CR | W | WU]);
    stopMirrorTop(filter);
    expect([mirrorTopChild(filter).perm, mirrorTopChild(filter).shared]).toEqual([0, ALL]);
  });
});
