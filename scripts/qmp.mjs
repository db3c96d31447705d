#!/usr/bin/env node
// A small QMP client for scripts and the README's walk-throughs (QEMU ships
// qmp-shell; this is the one-shot form). It connects to a QMP unix socket
// (qemu-storage-daemon-ts or qemu-storage-daemon), negotiates, then works
// through its arguments in order:
//   '{"execute": …}'   send a command, wait for its answer
//   --wait EVENT       wait until EVENT arrives (seen earlier counts too)
// and prints every answer and event as one JSON line. Exit status 1 when a
// command got an error or a wait ran out (--timeout SECONDS, default 60).
//
//   node scripts/qmp.mjs qmp.sock '{"execute":"query-jobs"}'
import net from 'node:net';

const DEFAULT_TIMEOUT_SECONDS = 60;

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

function connect(path) {
  return new Promise((resolve, reject) => {
    const s = net.connect(path, () => resolve(s));
    s.once('error', reject);
  });
}

/** Messages from the socket, one JSON value per line, handed to whoever waits for them. */
function reader(socket) {
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
      if (msg.QMP === undefined) console.log(JSON.stringify(msg));
      seen.push(msg);
      for (const w of waiters.splice(0)) w();
    }
  });
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

async function main() {
  const { socket: path, steps, timeoutMs } = parseArgs(process.argv.slice(2));
  const socket = await connect(path);
  const next = reader(socket);
  const answer = (m) => m.return !== undefined || m.error !== undefined;
  if (!(await next((m) => m.QMP !== undefined, timeoutMs))) throw new Error('no QMP greeting');
  socket.write('{"execute": "qmp_capabilities"}\n');
  await next(answer, timeoutMs);
  let failed = false;
  for (const step of steps) {
    if (step.command) {
      socket.write(JSON.stringify(step.command) + '\n');
      const got = await next(answer, timeoutMs);
      if (!got || got.error) failed = true;
    } else if (!(await next((m) => m.event === step.wait, timeoutMs))) {
      console.error(`qmp.mjs: no ${step.wait} event in time`);
      failed = true;
    }
    if (failed) break;
  }
  socket.end();
  process.exitCode = failed ? 1 : 0;
}

main().catch((e) => {
  console.error(`qmp.mjs: ${e.message}`);
  process.exitCode = 1;
});
