/*
 * Side-by-side cases for commands that change images in a backing chain
 * (qemu-img commit and rebase): the same setup script builds the same
 * chain in two directories with the real qemu-img/qemu-io, the real
 * qemu-img runs the command in one and qemu-img-ts in the other, and then
 * everything must agree:
 *   - stdout, stderr and the exit status (`-p` progress filtered out of
 *     qemu-img's stdout: ours prints it on a terminal only);
 *   - for each listed file, as the real qemu-img reports it: the map (JSON;
 *     qcow2 host offsets left out, since where a cluster lands in the file
 *     depends on the order concurrent writes complete), the info keys that
 *     describe size and backing file, and the check (JSON, fragmentation
 *     left out for the same reason);
 *   - `qemu-img compare` of their file and ours: identical content;
 *   - our qcow2 files check clean.
 * `@DIR@` in arguments stands for the case's directory.
 */
import { execFileSync, spawnSync } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { expect } from 'vitest';
import { runBoth, withoutProgress } from './side-by-side.js';

export interface ChainCase {
  /** bash run in both directories first (qemu-img and qemu-io are the real ones). */
  setup: string;
  args: string[];
  /** Files to compare afterwards. */
  files?: string[];
}

/** Info keys compared (the rest depends on the host: disk usage, paths). */
const INFO_KEYS = ['virtual-size', 'format', 'cluster-size', 'backing-filename', 'backing-filename-format', 'full-backing-filename', 'format-specific', 'dirty-flag'];

function qemuImgJson(dir: string, args: string[]): Record<string, unknown> {
  const r = spawnSync('qemu-img', args, { cwd: dir, encoding: 'utf8' });
  return JSON.parse(r.stdout || 'null') ?? { failed: r.stderr.replaceAll(dir, '@DIR@') };
}

function formatOf(dir: string, file: string): string {
  return String(qemuImgJson(dir, ['info', '-U', '--output=json', file]).format);
}

/** What the real qemu-img says about `file` in `dir`, with the host-dependent parts left out. */
export function imageFacts(dir: string, file: string): unknown {
  if (!fs.existsSync(path.join(dir, file))) return 'absent';
  const fmt = formatOf(dir, file);
  const mapJson = qemuImgJson(dir, ['map', '-U', '-f', fmt, '--output=json', file]) as unknown;
  const map = Array.isArray(mapJson) ? mapJson.map((e: Record<string, unknown>) => (fmt === 'qcow2' ? { ...e, offset: undefined } : e)) : mapJson;
  const info = qemuImgJson(dir, ['info', '-U', '-f', fmt, '--output=json', file]);
  const facts: Record<string, unknown> = { map, info: JSON.parse(JSON.stringify(Object.fromEntries(INFO_KEYS.map((k) => [k, info[k]]))).replaceAll(dir, '@DIR@')) };
  if (fmt === 'qcow2') facts.check = { ...qemuImgJson(dir, ['check', '-U', '--output=json', file]), filename: undefined, 'fragmented-clusters': undefined };
  return facts;
}

/** qemu-img's stdout without -p output; its progress end leaves a newline before the command's own text. */
function dropProgress(stdout: string): string {
  const text = withoutProgress(stdout);
  return text !== stdout && text.startsWith('\n') ? text.slice(1) : text;
}

/** Runs one case (see the note at the top) under `root`. */
export async function runChainCase(root: string, c: ChainCase): Promise<void> {
  const dirs = { theirs: path.join(root, 'theirs'), ours: path.join(root, 'ours') };
  for (const dir of Object.values(dirs)) {
    fs.mkdirSync(dir, { recursive: true });
    execFileSync('bash', ['-euc', c.setup], { cwd: dir, stdio: 'pipe' });
  }
  const { theirs, ours } = await runBoth(c.args, dirs);
  expect({ ...ours }).toEqual({ ...theirs, stdout: dropProgress(theirs.stdout) });
  for (const file of c.files ?? []) {
    expect(imageFacts(dirs.ours, file), file).toEqual(imageFacts(dirs.theirs, file));
    const fmt = formatOf(dirs.ours, file);
    // Files the real qemu-img cannot open (a backing file renamed with -u) were compared by their error above.
    if (!fs.existsSync(path.join(dirs.ours, file)) || spawnSync('qemu-img', ['info', '-U', '--backing-chain', file], { cwd: dirs.theirs }).status !== 0) continue;
    const same = spawnSync('qemu-img', ['compare', '-U', '-f', fmt, '-F', fmt, path.join(dirs.theirs, file), path.join(dirs.ours, file)], { encoding: 'utf8' });
    expect(`${same.status} ${same.stdout}${same.stderr}`, `${file}: content`).toBe('0 Images are identical.\n');
    if (fmt === 'qcow2') {
      const check = spawnSync('qemu-img', ['check', '-U', file], { cwd: dirs.ours, encoding: 'utf8' });
      expect(check.status, `${file}: ${check.stdout}${check.stderr}`).toBe(0);
    }
  }
}
