#!/usr/bin/env node
// A small QMP client for scripts, benchmarks and the README's walk-throughs
// (QEMU ships qmp-shell; this is the one-shot form). As a program it
// connects to a QMP unix socket (qemu-storage-daemon-ts or
// qemu-storage-daemon), negotiates, then works through its arguments in
// order:
//   '{"execute": …}'   send a command, wait for its answer
//   --wait EVENT       wait until EVENT arrives (seen earlier counts too)
// and prints every answer and event as one JSON line. Exit status 1 when a
// command got an error or a wait ran out (--timeout SECONDS, default 60).
//
//   node scripts/qmp.mjs qmp.sock '{"execute":"query-jobs"}'
//
// As a module it exports `connectQmp(path, { timeoutMs, onMessage })`
// (bench/mirror.mjs uses it): execute(command, args) resolves with the
// `return` value or rejects with the error's desc; event(name) resolves with
// the first such event, earlier ones included.
import net from 'node:net';
import { pathToFileURL } from 'node:url';

const DEFAULT_TIMEOUT_SECONDS = 60;
/** Pause between attempts while the monitor socket does not accept yet. */
const RETRY_MS = 20;

function connectSocket(path) {
  return new Promise((resolve, reject) => {
    const s = net.connect(path, () => resolve(s));
    s.once('error', reject);
  });
}

/** Messages from the socket, one JSON value per line, kept until someone takes them. */
function reader(socket, onMessage) {
  const seen = [];
  const waiters = [];
  let buffer = '';
  socket.setEncoding('utf8');
  socket.on('data', (d) => {
    buffer += d;
    for (let nl = buffer.indexOf('\n'); nl >= 0; nl = buffer.indexOf('\n')) {
      const line = buffer.slice(0, nl).trim();
      buffer = buffer.slice(nl + 1);
      if (!line) continue;
      const msg = JSON.parse(line);
      onMessage?.(msg);
      seen.push(msg);
      for (const w of waiters.splice(0)) w();
    }
  });
  /** The first message matching, taken out of the queue; null when none came in time. */
  return async function next(match, timeoutMs) {
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      const i = seen.findIndex(match);
      if (i >= 0) return seen.splice(i, 1)[0];
      const left = deadline - Date.now();
      if (left <= 0) return null;
      await new Promise((resolve) => {
        const timer = setTimeout(resolve, left);
        waiters.push(() => (clearTimeout(timer), resolve()));
      });
    }
  };
}

const isAnswer = (m) => m.return !== undefined || m.error !== undefined;

/** Connects (retrying until the socket accepts or the timeout), reads the greeting, negotiates. */
export async function connectQmp(path, { timeoutMs = DEFAULT_TIMEOUT_SECONDS * 1000, onMessage } = {}) {
  const deadline = Date.now() + timeoutMs;
  let socket;
  for (;;) {
    try {
      socket = await connectSocket(path);
      break;
    } catch (e) {
      if (Date.now() > deadline) throw e;
      await new Promise((r) => setTimeout(r, RETRY_MS));
    }
  }
  const next = reader(socket, onMessage);
  if (!(await next((m) => m.QMP !== undefined, timeoutMs))) throw new Error('no QMP greeting');
  const qmp = {
    /** The raw answer ({return} or {error}), or null when none came in time. */
    async send(command) {
      socket.write(JSON.stringify(command) + '\n');
      return next(isAnswer, timeoutMs);
    },
    async execute(name, args) {
      const got = await qmp.send(args ? { execute: name, arguments: args } : { execute: name });
      if (!got) throw new Error(`${name}: no answer in time`);
      if (got.error) throw new Error(`${name}: ${got.error.desc}`);
      return got.return;
    },
    /** The first event named `name`, or null when none came within `waitMs`. */
    event: (name, waitMs = timeoutMs) => next((m) => m.event === name, waitMs),
    close: () => socket.end(),
  };
  await qmp.execute('qmp_capabilities');
  return qmp;
}

function parseArgs(argv) {
  const steps = [];
  let timeoutMs = DEFAULT_TIMEOUT_SECONDS * 1000;
  const [socket, ...rest] = argv;
  for (let i = 0; i < rest.length; i++) {
    if (rest[i] === '--wait') steps.push({ wait: rest[++i] });
    else if (rest[i] === '--timeout') timeoutMs = Number(rest[++i]) * 1000;
    else steps.push({ command: JSON.parse(rest[i]) });
  }
  if (!socket || steps.some((s) => 'wait' in s && !s.wait)) {
    throw new Error("usage: qmp.mjs SOCKET ['{\"execute\": …}' | --wait EVENT | --timeout SECONDS]…");
  }
  return { socket, steps, timeoutMs };
}

async function main() {
  const { socket, steps, timeoutMs } = parseArgs(process.argv.slice(2));
  const print = (m) => {
    if (m.QMP === undefined && m.return === undefined) console.log(JSON.stringify(m));
  };
  const qmp = await connectQmp(socket, { timeoutMs, onMessage: print });
  let failed = false;
  for (const step of steps) {
    if (step.command) {
      const got = await qmp.send(step.command);
      if (got?.return !== undefined) console.log(JSON.stringify(got));
      failed = !got || got.error !== undefined;
    } else if (!(await qmp.event(step.wait))) {
      console.error(`qmp.mjs: no ${step.wait} event in time`);
      failed = true;
    }
    if (failed) break;
  }
  qmp.close();
  process.exitCode = failed ? 1 : 0;
}

if (process.argv[1] && import.meta.url === pathToFileURL(process.argv[1]).href) {
  main().catch((e) => {
    console.error(`qmp.mjs: ${e.message}`);
    process.exitCode = 1;
  });
}
