/*
 * Live mirror on files: a qcow2 source exported by our NBD server, a
 * client writing random data through the export for the whole job (the
 * writer keeps a raw model of the final content), mirror sync full to a
 * new qcow2, to a raw file, and to an NBD client node whose server (a
 * second graph, standing in for a second daemon) exports a qcow2. After
 * READY, job-complete, the export keeps serving (its backend now on the
 * target), the writer stops, and qemu-img compare says the model and the
 * target are identical; qemu-img check is clean on qcow2 targets. Both
 * copy modes.
 */
import fs from 'node:fs';
import path from 'node:path';
import { describe, expect, it } from 'vitest';
import type { OptionTree } from '../../block/keyval.js';
import type { BlockNode } from '../../block/node.js';
import { startMirror, type CopyMode } from '../../jobs/mirror.js';
import { NbdClient } from '../../nbd/client.js';
import { NbdServer } from '../../nbd/server.js';
import { testGraph } from '../helpers/graphs.js';
import { missingPeers } from '../helpers/peers.js';
import { run } from '../helpers/run.js';
import { scratchDir } from '../helpers/tmp.js';
import { COMPLETED_SEQUENCE, finished, jobWorld } from '../helpers/mirror-setup.js';

const MiB = 1024 * 1024;
const SIZE_BYTES = 16 * MiB;
/** Upper bound on writer iterations (it normally stops when told). */
const WRITES_MAX = 200_000;
const root = scratchDir('qbt-mirror-live-');
let seq = 0;

async function sh(cmd: string, args: string[], cwd: string): Promise<string> {
  const r = await run(cmd, args, { cwd });
  if (r.code !== 0) throw new Error(`${cmd} ${args.join(' ')}: ${r.stdout}${r.stderr}`);
  return r.stdout;
}

/** Writes random 4–16 KiB blocks through `client` until stopped; mirrors them into `model`. */
function startWriter(client: NbdClient, model: Buffer) {
  let stop = false;
  let writes = 0;
  const done = (async () => {
    for (let i = 0; !stop && i < WRITES_MAX; i++) {
      const bytes = 4096 * (1 + (i % 4));
      const offset = Math.floor(Math.random() * ((SIZE_BYTES - bytes) / 512)) * 512;
      const data = Buffer.alloc(bytes, (i % 251) + 1);
      data.writeUInt32LE(i, 0);
      await client.write(offset, data);
      data.copy(model, offset);
      writes++;
    }
  })();
  return {
    async stop(): Promise<number> {
      stop = true;
      await done;
      return writes;
    },
  };
}

type TargetKind = 'qcow2' | 'raw' | 'nbd';

/** Opens the target; for nbd, a second server exporting a fresh qcow2. */
async function openTarget(kind: TargetKind, dir: string, graph: ReturnType<typeof testGraph>, servers: NbdServer[]) {
  const file = path.join(dir, kind === 'raw' ? 't.raw' : 't.qcow2');
  await sh('qemu-img', ['create', '-q', '-f', kind === 'raw' ? 'raw' : 'qcow2', file, String(SIZE_BYTES)], dir);
  if (kind !== 'nbd') return { node: await graph.openImage(file, { format: kind }), file, format: kind };
  const remote = testGraph();
  const remoteNode = await remote.openImage(file, { format: 'qcow2' });
  const server = new NbdServer();
  servers.push(server);
  server.createExport(remote, remoteNode, { name: 'tgt', writable: true });
  const socket = path.join(dir, 'remote.sock');
  await server.listen({ type: 'unix', path: socket });
  const node = await graph.openNode({ driver: 'nbd', server: { type: 'unix', path: socket }, export: 'tgt' } as OptionTree);
  return { node, file, format: 'qcow2' };
}

async function liveMirror(kind: TargetKind, copyMode: CopyMode): Promise<void> {
  const dir = path.join(root, `l${++seq}`);
  fs.mkdirSync(dir);
  await sh('qemu-img', ['create', '-q', '-f', 'qcow2', 'src.qcow2', String(SIZE_BYTES)], dir);
  await sh('qemu-io', ['-f', 'qcow2', '-c', 'write -P 0x11 0 3M', '-c', 'write -P 0x22 9M 1M', 'src.qcow2'], dir);
  const model = Buffer.alloc(SIZE_BYTES);
  model.fill(0x11, 0, 3 * MiB).fill(0x22, 9 * MiB, 10 * MiB);
  const w = jobWorld(testGraph());
  const servers: NbdServer[] = [];
  const src = await w.graph.openImage(path.join(dir, 'src.qcow2'), { format: 'qcow2' });
  src.userOwned = true;
  const target = await openTarget(kind, dir, w.graph, servers);
  target.node.userOwned = true;
  const server = new NbdServer();
  servers.push(server);
  const exp = server.createExport(w.graph, src, { name: 'disk', writable: true });
  const socket = path.join(dir, 'disk.sock');
  await server.listen({ type: 'unix', path: socket });
  const client = await NbdClient.connect({ address: { type: 'unix', path: socket }, exportName: 'disk' });
  const writer = startWriter(client, model);
  try {
    await new Promise((r) => setTimeout(r, 50));
    const job = await startMirror(w, { jobId: 'live', source: src, target: target.node, sync: 'full', copyMode });
    await w.waitEvent('BLOCK_JOB_READY');
    await new Promise((r) => setTimeout(r, 100));
    job.complete();
    await finished(job);
    expect(w.sequence()).toEqual(COMPLETED_SEQUENCE);
    expect(exp.backend.node).toBe(target.node as BlockNode);
    await new Promise((r) => setTimeout(r, 50));
    expect(await writer.stop()).toBeGreaterThan(20);
    await client.flush();
  } finally {
    await writer.stop().catch(() => 0);
    await client.disconnect().catch(() => undefined);
    // Our export first, then the graph (the nbd node says goodbye), then the remote server.
    for (const s of servers.reverse()) {
      await s.close();
      if (s === server) await w.graph.closeAll();
    }
  }
  fs.writeFileSync(path.join(dir, 'model.raw'), model);
  const cmp = await run('qemu-img', ['compare', '-f', 'raw', '-F', target.format, 'model.raw', target.file], { cwd: dir });
  expect(cmp.stdout + cmp.stderr).toBe('Images are identical.\n');
  if (target.format === 'qcow2') expect((await run('qemu-img', ['check', target.file], { cwd: dir })).code).toBe(0);
}

describe.skipIf(missingPeers('qemu-img', 'qemu-io'))('live mirror through an NBD export', () => {
  for (const kind of ['qcow2', 'raw', 'nbd'] as const) {
    for (const copyMode of ['background', 'write-blocking'] as const) {
      it(`to ${kind}, ${copyMode}: nothing lost across the pivot`, () => liveMirror(kind, copyMode), 60_000);
    }
  }
});
