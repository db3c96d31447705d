/*
 * Regression tests for server bugs the fuzzer (test/property/nbd-fuzz*.test.ts)
 * found, each reduced to the smallest client that shows it.
 */
import { once } from 'node:events';
import net from 'node:net';
import path from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import type { OptionTree } from '../../block/keyval.js';
import { ClientFlag, Cmd, CmdFlag, Opt } from '../../nbd/protocol.js';
import { encodeClientFlags, encodeOption } from '../../nbd/wire-handshake.js';
import { MAX_QUEUED_INPUT_BYTES } from '../../nbd/server-connection.js';
import { NbdServer } from '../../nbd/server.js';
import { encodeRequest } from '../../nbd/wire-transmission.js';
import { memGraph } from '../helpers/mem-driver.js';
import { RawNbdClient } from '../helpers/nbd-raw-client.js';
import { scratchDir } from '../helpers/tmp.js';

const MiB = 1024 * 1024;
const dir = scratchDir('qbt-nbd-robust-');
let seq = 0;
const servers: NbdServer[] = [];
const clients: RawNbdClient[] = [];

afterEach(async () => {
  for (const c of clients.splice(0)) c.close();
  for (const s of servers.splice(0)) await s.close();
});

async function setup(node: Record<string, unknown> = { driver: 'test-mem', size: MiB }) {
  const graph = memGraph();
  const server = new NbdServer();
  servers.push(server);
  server.createExport(graph, await graph.openNode(node as OptionTree), { name: '', writable: true });
  const socket = path.join(dir, `r${++seq}.sock`);
  await server.listen({ type: 'unix', path: socket });
  const client = await RawNbdClient.connect(socket);
  clients.push(client);
  await client.negotiate({ structured: true });
  return { server, client, socket };
}

async function waitFor(cond: () => boolean, timeoutMs = 5000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!cond()) {
    if (Date.now() > deadline) throw new Error('condition not reached');
    await new Promise((r) => setTimeout(r, 5));
  }
}

describe('NBD server robustness (fuzzer findings)', () => {
  it('a client that half-closes after its requests still gets every reply', async () => {
    // Node ended the server's side as soon as the client's ended (allowHalfOpen off): replies in flight were lost.
    const { client } = await setup({ driver: 'null-co', size: MiB, 'read-zeroes': true, 'latency-ns': 20_000_000 });
    const cookies = [0, 1, 2].map((i) => client.request({ type: Cmd.READ, offset: i * 4096, length: 4096, flags: CmdFlag.DF }));
    client.socket.end();
    const answered = new Set<bigint>();
    for (let i = 0; i < cookies.length; i++) {
      const f = await client.frame();
      if (f.kind === 'chunk') answered.add(f.header.cookie);
    }
    expect([...answered].sort()).toEqual(cookies);
    expect(await client.closedWithin()).toBe(true);
  });

  it('bytes a client sends while the server closes its connection are dropped, not queued', async () => {
    // Once the connection had ended its side (graceful shutdown), it kept reading into the parser until the 5 s cut-off.
    const { server, socket } = await setup();
    // A client that keeps its side open after the server's FIN (RawNbdClient's socket would close with it).
    const raw = net.connect({ path: socket, allowHalfOpen: true });
    raw.on('error', () => undefined);
    await once(raw, 'connect');
    raw.write(Buffer.concat([encodeClientFlags(ClientFlag.FIXED_NEWSTYLE | ClientFlag.NO_ZEROES), encodeOption(Opt.EXPORT_NAME)]));
    await waitFor(() => server.getExport('')!.clients.size === 2); // setup's client and this one
    const closing = server.close();
    let peak = 0;
    const junk = encodeRequest({ flags: 0, type: Cmd.FLUSH, cookie: 1n, offset: 0, length: 0 }, false);
    const burst = Buffer.concat(Array.from({ length: (4 * MiB) / junk.length }, () => junk));
    for (let i = 0; i < 12 && !raw.destroyed; i++) {
      raw.write(burst);
      await new Promise((r) => setTimeout(r, 20));
      for (const s of server.connectionStats()) peak = Math.max(peak, s.queuedInputBytes);
    }
    raw.destroy();
    await closing;
    expect(peak).toBeLessThanOrEqual(MAX_QUEUED_INPUT_BYTES);
  });
});
