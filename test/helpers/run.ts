/*
 * Running our CLIs (the compiled bins in dist/) and the peer tools.
 */
import { spawn } from 'node:child_process';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

export const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../..');

const BINS: Record<string, string> = {
  'qemu-img-ts': 'dist/bin/qemu-img-ts.mjs',
  'qemu-io-ts': 'dist/bin/qemu-io-ts.mjs',
  'qemu-nbd-ts': 'dist/bin/qemu-nbd-ts.mjs',
  'qemu-storage-daemon-ts': 'dist/bin/qemu-storage-daemon-ts.mjs',
};

/** The command line that runs one of our tools (`[node, bin]`). */
export function oursCommand(tool: string): [string, string] {
  const bin = BINS[tool];
  if (!bin) throw new Error(`unknown tool ${tool}`);
  return [process.execPath, path.join(ROOT, bin)];
}

export interface RunResult {
  stdout: string;
  stderr: string;
  /** Exit status; 128 + signal number when a signal ended the process (as a shell reports it). */
  code: number;
  /** The signal that ended the process, if any. */
  signal?: NodeJS.Signals;
}

export interface RunOptions {
  cwd?: string;
  input?: string | Buffer;
  env?: NodeJS.ProcessEnv;
  /** Kill after this many ms (default 60 s). */
  timeoutMs?: number;
}

/** Runs a command to completion and captures its output. */
export function run(cmd: string, args: string[], opts: RunOptions = {}): Promise<RunResult> {
  return new Promise((resolve, reject) => {
    const child = spawn(cmd, args, { cwd: opts.cwd, env: { ...process.env, ...opts.env }, stdio: 'pipe' });
    const out: Buffer[] = [];
    const err: Buffer[] = [];
    const timer = setTimeout(() => child.kill('SIGKILL'), opts.timeoutMs ?? 60_000);
    child.stdout.on('data', (d: Buffer) => out.push(d));
    child.stderr.on('data', (d: Buffer) => err.push(d));
    child.on('error', (e) => {
      clearTimeout(timer);
      reject(e);
    });
    child.on('close', (code, signal) => {
      clearTimeout(timer);
      resolve({
        stdout: Buffer.concat(out).toString(),
        stderr: Buffer.concat(err).toString(),
        code: code ?? 128 + (signal ? (os.constants.signals[signal] ?? 0) : 0),
        ...(signal ? { signal } : {}),
      });
    });
    // The tool may exit before reading its stdin; that EPIPE is not a test failure.
    child.stdin.on('error', () => undefined);
    child.stdin.end(opts.input ?? '');
  });
}

/** Runs one of our tools (`qemu-img-ts`, `qemu-io-ts`, …) from dist/. */
export function runOurs(tool: string, args: string[], opts: RunOptions = {}): Promise<RunResult> {
  const [node, bin] = oursCommand(tool);
  return run(node, [bin, ...args], opts);
}
