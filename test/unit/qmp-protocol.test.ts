/*
 * The QMP layer in process: the JSON stream (QEMU's lexer/streamer texts,
 * every split point of a message), the dispatcher's checks and texts, and
 * a Daemon's monitor on a unix socket: greeting, negotiation, ids echoed,
 * events only in command mode, and bad input of every kind answered
 * without stopping the daemon.
 */
import net from 'node:net';
import path from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { z } from 'zod';
import { defineCommand, genericError } from '../../qmp/command.js';
import { Daemon } from '../../qmp/daemon.js';
import { Dispatcher } from '../../qmp/dispatch.js';
import { JsonStream, MAX_NESTING, type JsonValue, type StreamItem } from '../../block/json-stream.js';
import { scratchDir } from '../helpers/tmp.js';

const enc = (s: string) => new TextEncoder().encode(s);

function feedAll(text: string, splitAt?: number): StreamItem[] {
  const s = new JsonStream();
  if (splitAt === undefined) return s.push(enc(text));
  const bytes = enc(text);
  return [...s.push(bytes.subarray(0, splitAt)), ...s.push(bytes.subarray(splitAt))];
}

describe('JsonStream', () => {
  it('cuts values without newlines, at every split point', () => {
    const text = '{"execute": "x", "arguments": {"a": [1, -2.5e3, true, null, "\\u00e9\\n"]}}{\'execute\': \'y\'}';
    const want = [
      { value: { execute: 'x', arguments: { a: [1, -2500, true, null, 'é\n'] } } },
      { value: { execute: 'y' } },
    ];
    for (let i = 0; i <= enc(text).length; i++) expect(feedAll(text, i)).toEqual(want);
  });

  it("gives QEMU's parse error texts and goes on", () => {
    expect(feedAll('{"execute"\n{"execute": "q"}\n}\n')).toEqual([{ error: 'JSON parse error, missing : in object pair' }]);
    expect(feedAll('{"a": tru}')).toEqual([{ error: "JSON parse error, invalid keyword 'tru'" }]);
    expect(feedAll('{"a": 1, "a": 2}')).toEqual([{ error: 'JSON parse error, duplicate key' }]);
    expect(feedAll('{"a" 1}')).toEqual([{ error: 'JSON parse error, missing : in object pair' }]);
    expect(feedAll('{1: 1}')).toEqual([{ error: 'JSON parse error, key is not a string in object' }]);
    expect(feedAll('[1 2]')).toEqual([{ error: 'JSON parse error, expected separator in list' }]);
    expect(feedAll('{"a": 1 "b": 2}')).toEqual([{ error: 'JSON parse error, expected separator in dict' }]);
    expect(feedAll('@ {"ok": 1}')).toEqual([{ error: "JSON parse error, stray '@'" }, { value: { ok: 1 } }]);
    expect(feedAll('"\\q"')).toEqual([{ error: 'JSON parse error, invalid escape sequence in string' }]);
  });

  it('bounds nesting', () => {
    const items = feedAll('['.repeat(MAX_NESTING + 1));
    expect(items[0]).toEqual({ error: 'JSON nesting depth limit exceeded' });
  });

  it('keeps __proto__ as a plain key', () => {
    const [item] = feedAll('{"__proto__": {"x": 1}}');
    expect(Object.getPrototypeOf((item as { value: object }).value)).toBe(Object.prototype);
    expect(Object.keys((item as { value: object }).value)).toEqual(['__proto__']);
  });
});

describe('Dispatcher', () => {
  const echo = defineCommand({
    name: 'echo',
    args: z.strictObject({ s: z.string(), n: z.number().int().optional(), l: z.array(z.strictObject({ k: z.boolean() })).optional() }),
    run: (_ctx: null, a: { s: string }) => a.s,
  });
  const fail = defineCommand({ name: 'fail', args: z.strictObject({}), run: () => { throw genericError('nope'); } });
  const crash = defineCommand({ name: 'crash', args: z.strictObject({}), run: () => { throw new TypeError('bug'); } });
  const caps = defineCommand({ name: 'qmp_capabilities', args: z.strictObject({}), allowInNegotiation: true, run: () => undefined });
  const d = new Dispatcher<null>([[echo, fail, crash, caps]]);
  const cmd = { mode: 'command' as const };
  const err = (desc: string, cls = 'GenericError') => ({ error: { class: cls, desc } });

  it("checks the input in QEMU's order with its texts", async () => {
    expect(await d.dispatch(null, cmd, [1])).toEqual(err('QMP input must be a JSON object'));
    expect(await d.dispatch(null, cmd, { foo: 1 })).toEqual(err("QMP input member 'foo' is unexpected"));
    expect(await d.dispatch(null, cmd, { execute: 1 })).toEqual(err("QMP input member 'execute' must be a string"));
    expect(await d.dispatch(null, cmd, { execute: 'echo', arguments: [] })).toEqual(err("QMP input member 'arguments' must be an object"));
    expect(await d.dispatch(null, cmd, { id: 3 })).toEqual({ ...err("QMP input lacks member 'execute'"), id: 3 });
    expect(await d.dispatch(null, cmd, { execute: 'nosuch' })).toEqual(err('The command nosuch has not been found', 'CommandNotFound'));
  });

  it('maps schema violations to the QAPI visitor texts', async () => {
    const run = (args: { [key: string]: JsonValue }) => d.dispatch(null, cmd, { execute: 'echo', arguments: args });
    expect(await run({})).toEqual(err("Parameter 's' is missing"));
    expect(await run({ s: 1 })).toEqual(err("Invalid parameter type for 's', expected: string"));
    expect(await run({ s: 'a', n: 'x' })).toEqual(err("Parameter 'n' expects integer"));
    expect(await run({ s: 'a', x: 1 })).toEqual(err("Parameter 'x' is unexpected"));
    expect(await run({ s: 'a', l: [{ k: true }, { k: 1 }] })).toEqual(err("Invalid parameter type for 'l[1].k', expected: boolean"));
    expect(await run({ s: 'a', l: [{ k: true, z: 0 }] })).toEqual(err("Parameter 'l[0].z' is unexpected"));
  });

  it('answers results, errors and handler bugs, echoing the id', async () => {
    expect(await d.dispatch(null, cmd, { execute: 'echo', arguments: { s: 'hi' }, id: { a: [1] } })).toEqual({ return: 'hi', id: { a: [1] } });
    expect(await d.dispatch(null, cmd, { execute: 'fail', id: 'x' })).toEqual({ ...err('nope'), id: 'x' });
    expect(await d.dispatch(null, cmd, { execute: 'crash' })).toEqual(err('bug'));
  });

  it('allows only qmp_capabilities during negotiation, and it only once', async () => {
    const session = { mode: 'negotiation' as 'negotiation' | 'command' };
    expect(await d.dispatch(null, session, { execute: 'echo', arguments: { s: 'a' } })).toEqual(
      err("Expecting capabilities negotiation with 'qmp_capabilities'", 'CommandNotFound'),
    );
    expect(await d.dispatch(null, session, { execute: 'qmp_capabilities' })).toEqual({ return: {} });
    expect(session.mode).toBe('command');
    expect(await d.dispatch(null, session, { execute: 'qmp_capabilities' })).toEqual(
      err('Capabilities negotiation is already complete, command ignored', 'CommandNotFound'),
    );
  });
});

/** A raw line-reading client of a monitor socket. */
class RawClient {
  private buffer = '';
  private readonly lines: string[] = [];
  private wake: (() => void) | null = null;
  private constructor(readonly socket: net.Socket) {
    socket.setEncoding('utf8');
    socket.on('data', (d: string) => {
      this.buffer += d;
      let nl: number;
      while ((nl = this.buffer.indexOf('\n')) >= 0) {
        this.lines.push(this.buffer.slice(0, nl));
        this.buffer = this.buffer.slice(nl + 1);
      }
      this.wake?.();
    });
  }
  static connect(p: string): Promise<RawClient> {
    return new Promise((resolve, reject) => {
      const s = net.connect(p, () => resolve(new RawClient(s)));
      s.once('error', reject);
    });
  }
  async next(): Promise<Record<string, unknown>> {
    const deadline = Date.now() + 5000;
    while (this.lines.length === 0) {
      if (Date.now() > deadline) throw new Error('no line');
      await new Promise<void>((r) => {
        this.wake = r;
        setTimeout(r, 100);
      });
    }
    return JSON.parse(this.lines.shift()!) as Record<string, unknown>;
  }
  async send(text: string): Promise<Record<string, unknown>> {
    this.socket.write(text);
    return this.next();
  }
}

describe('Daemon monitor', () => {
  const dir = scratchDir('qbt-qmp-unit-');
  const daemons: Daemon[] = [];
  afterEach(async () => {
    await Promise.all(daemons.splice(0).map((d) => d.shutdown()));
  });

  /** A daemon with a monitor on `<dir>/<name>.sock`. */
  async function startDaemon(name: string): Promise<{ d: Daemon; sock: string }> {
    const d = new Daemon();
    daemons.push(d);
    const sock = path.join(dir, `${name}.sock`);
    await d.addMonitor(sock);
    return { d, sock };
  }

  it('greets, negotiates, and survives every kind of bad input', async () => {
    const { sock } = await startDaemon('m1');
    const c = await RawClient.connect(sock);
    const greeting = (await c.next()) as { QMP: { version: { qemu: object; package: string }; capabilities: string[] } };
    expect(Object.keys(greeting.QMP.version.qemu).sort()).toEqual(['major', 'micro', 'minor']);
    expect(greeting.QMP.capabilities).toEqual(['oob']);
    expect(await c.send('{"execute": "query-version"}')).toMatchObject({ error: { class: 'CommandNotFound' } });
    expect(await c.send('{"execute": "qmp_capabilities", "id": 1}')).toEqual({ return: {}, id: 1 });
    const bad = ['}', '{"a": x}', '[1]', '"s"', '{"execute": "nosuch"}', '{"execute": "blockdev-del"}', '\u00ff', '{"execute": "blockdev-add", "arguments": {"driver": "nope", "node-name": "n"}}'];
    for (const text of bad) expect(await c.send(text)).toHaveProperty('error');
    expect(await c.send('{"execute": "query-block"}')).toEqual({ return: [] });
    c.socket.destroy();
  });

  it('sends events only to clients in command mode, timestamped', async () => {
    const { d, sock } = await startDaemon('m2');
    const c = await RawClient.connect(sock);
    await c.next();
    d.emit('EARLY', { x: 1 });
    expect(await c.send('{"execute": "qmp_capabilities"}')).toEqual({ return: {} });
    d.emit('LATE', { x: 2 });
    const ev = (await c.next()) as { event: string; data: unknown; timestamp: { seconds: number; microseconds: number } };
    expect(ev.event).toBe('LATE');
    expect(ev.data).toEqual({ x: 2 });
    expect(Math.abs(ev.timestamp.seconds - Date.now() / 1000)).toBeLessThan(5);
    expect(ev.timestamp.microseconds).toBeGreaterThanOrEqual(0);
    expect(ev.timestamp.microseconds).toBeLessThan(1e6);
    c.socket.destroy();
  });

  it('serves a second client once the first one leaves', async () => {
    const { sock } = await startDaemon('m3');
    const a = await RawClient.connect(sock);
    await a.next();
    const b = await RawClient.connect(sock);
    a.socket.destroy();
    expect(await b.next()).toHaveProperty('QMP');
    b.socket.destroy();
  });
});
