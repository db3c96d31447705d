/*
 * One qemu-img command run by the real qemu-img and by qemu-img-ts, for
 * the interop tests: both in one directory (commands that only read), or
 * each in its own copy of the inputs ({ theirs, ours }). The results are
 * stdout, stderr and the exit status, with each run's directory written as
 * @DIR@ so that paths in messages compare equal.
 *
 * QEMU prints `-p` progress whether or not stdout is a terminal; ours only
 * on a terminal (img/progress.ts). `withoutProgress` drops QEMU's progress
 * output from a text so the rest can be compared.
 *
 * Build first (npm run build): ours runs from dist/.
 */
import { run, runOurs, type RunResult } from './run.js';

/** Where each tool runs: one directory for both, or one each. */
export type BothDirs = string | { theirs: string; ours: string };

/** What a tool printed and its status. */
export interface ToolResult {
  stdout: string;
  stderr: string;
  code: number;
}

function result(r: RunResult, dir: string): ToolResult {
  const mask = (text: string) => text.replaceAll(dir, '@DIR@');
  return { stdout: mask(r.stdout), stderr: mask(r.stderr), code: r.code };
}

/** Runs `qemu-img ARGS` and `qemu-img-ts ARGS` (at the same time) in their directories. */
export async function runBoth(args: string[], dirs: BothDirs): Promise<{ theirs: ToolResult; ours: ToolResult }> {
  const { theirs: theirsDir, ours: oursDir } = typeof dirs === 'string' ? { theirs: dirs, ours: dirs } : dirs;
  const [theirs, ours] = await Promise.all([run('qemu-img', args, { cwd: theirsDir }), runOurs('qemu-img-ts', args, { cwd: oursDir })]);
  return { theirs: result(theirs, theirsDir), ours: result(ours, oursDir) };
}

/**
 * QEMU's progress updates ("    (12.34/100%)\r") removed from `text`, and
 * the newline its progress end adds after the command's own last line.
 */
export function withoutProgress(text: string): string {
  const updates = / {4}\(\d+\.\d\d\/100%\)\r/g;
  const rest = text.replace(updates, '');
  return rest !== text && rest.endsWith('\n\n') ? rest.slice(0, -1) : rest;
}
