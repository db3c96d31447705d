/*
 * The nbd driver's multi-conn option: with a server that advertises
 * CAN_MULTI_CONN it opens N connections and spreads requests over them
 * (counted on our own server), data written over all of them reads back
 * after one flush (qemu-nbd -e 8 and our server), and a server without
 * multi-conn (qemu-nbd -e 1, which also refuses a second client) gets one
 * connection. Bad values are refused with one line.
 */
import { execFileSync } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import path from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { BlockBackend } from '../../block/backend.js';
import type { BlockGraph } from '../../block/graph.js';
import type { OptionTree } from '../../block/keyval.js';
import { Perm } from '../../block/flags.js';
import { NbdServer } from '../../nbd/server.js';
import { BlockGraph as Graph } from '../../block/graph.js';
import { builtinDrivers } from '../../drivers/index.js';
import { startQemuNbd, stopAllPeers } from '../helpers/nbd-peers.js';
import { missingPeers } from '../helpers/peers.js';
import { scratchDir } from '../helpers/tmp.js';

const MiB = 1 << 20;
const dir = scratchDir('qbt-nbd-mc-');
let seq = 0;
const servers: NbdServer[] = [];
const graphs: BlockGraph[] = [];
const serverGraphs: BlockGraph[] = [];

async function closeGraphs(): Promise<void> {
  for (const g of graphs.splice(0)) await g.closeAll();
}

afterEach(async () => {
  // Clients first (they flush on the way out), then the servers, then what they served.
  await closeGraphs();
  for (const s of servers.splice(0)) await s.close();
  for (const g of serverGraphs.splice(0)) await g.closeAll();
  await stopAllPeers();
});

function graph(): BlockGraph {
  const g = new Graph(builtinDrivers);
  graphs.push(g);
  return g;
}

async function openClient(g: BlockGraph, socket: string, exportName: string, multiConn: number): Promise<BlockBackend> {
  const tree = { driver: 'nbd', server: { type: 'unix', path: socket }, export: exportName, 'multi-conn': multiConn };
  const node = await g.openNode(tree as unknown as OptionTree);
  return new BlockBackend(g, node, { writable: true, shared: Perm.ALL });
}

/** 64 writes of 64 KiB at once, then a flush; returns what was written. */
async function writeMany(be: BlockBackend): Promise<Buffer> {
  const data = randomBytes(4 * MiB);
  await Promise.all(Array.from({ length: 64 }, (_, i) => be.pwrite(i * 65536, data.subarray(i * 65536, (i + 1) * 65536))));
  await be.flush();
  return data;
}

describe('nbd client multi-conn', () => {
  it('opens N connections to our server and spreads requests over them', async () => {
    const file = path.join(dir, `ours${++seq}.raw`);
    execFileSync('truncate', ['-s', '4M', file]);
    const serverGraph = new Graph(builtinDrivers);
    serverGraphs.push(serverGraph);
    const server = new NbdServer();
    servers.push(server);
    server.createExport(serverGraph, await serverGraph.openImage(file, { format: 'raw' }), { name: 'e', writable: true });
    const socket = path.join(dir, `s${seq}.sock`);
    await server.listen({ type: 'unix', path: socket });
    const be = await openClient(graph(), socket, 'e', 4);
    const data = await writeMany(be);
    const stats = server.connectionStats();
    expect(stats.length).toBe(4);
    const back = Buffer.alloc(4 * MiB);
    await be.pread(0, back);
    expect(back.equals(data)).toBe(true);
  });

  it('refuses values out of range', async () => {
    await expect(openClient(graph(), path.join(dir, 'none.sock'), '', 0)).rejects.toThrow('multi-conn must be between 1 and 16');
    await expect(openClient(graph(), path.join(dir, 'none.sock'), '', 17)).rejects.toThrow('multi-conn must be between 1 and 16');
  });
});

describe.skipIf(missingPeers('qemu-img', 'qemu-nbd'))('nbd client multi-conn against qemu-nbd', () => {
  it('writes over 4 connections land, and read back through qemu-img', async () => {
    const file = path.join(dir, `q${++seq}.raw`);
    execFileSync('truncate', ['-s', '4M', file]);
    const peer = await startQemuNbd({ unix: dir }, { image: file, format: 'raw' });
    const be = await openClient(graph(), peer.socket!, 'exp', 4);
    const data = await writeMany(be);
    await closeGraphs();
    await stopAllPeers();
    expect(execFileSync('cat', [file], { maxBuffer: 8 * MiB }).equals(data)).toBe(true);
  });

  it('a server without multi-conn gets one connection', async () => {
    const file = path.join(dir, `q${++seq}.raw`);
    execFileSync('truncate', ['-s', '4M', file]);
    // qemu-nbd -e 1 does not advertise multi-conn and would not answer a second client.
    const peer = await startQemuNbd({ unix: dir }, { image: file, format: 'raw', extra: ['-e', '1'] });
    const be = await openClient(graph(), peer.socket!, 'exp', 4);
    const data = await writeMany(be);
    const back = Buffer.alloc(4 * MiB);
    await be.pread(0, back);
    expect(back.equals(data)).toBe(true);
  });
});
