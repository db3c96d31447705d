/*
 * Emulated FUA and flush events beside qemu-io 7.2. With qemu-io's default
 * writethrough cache every write carries FUA; a node without native FUA
 * (qcow2, raw, blkdebug) writes, then flushes inside the request, and only
 * then counts the write as done. So that flush's flush_to_disk event fires
 * only when older writes are unflushed: the first write after a flush does
 * not trigger a flush_to_disk rule, the next one does. Each case runs
 * qemu-io and qemu-io-ts on a fresh image behind blkdebug with the same
 * rules and commands and compares their lines, exit status and qemu-img
 * check of the image. Build first (npm run build).
 */
import fs from 'node:fs';
import path from 'node:path';
import { describe, expect, it } from 'vitest';
import { missingPeers } from '../helpers/peers.js';
import { must, tool } from '../helpers/qsd-script.js';
import { run, runOurs } from '../helpers/run.js';
import { scratchDir } from '../helpers/tmp.js';

const root = scratchDir('qbt-qemu-io-flush-');

interface FlushCase {
  name: string;
  /** The format over blkdebug, or 'blkdebug' for blkdebug itself on top. */
  top: 'qcow2' | 'raw' | 'blkdebug';
  rules: Record<string, unknown>;
  /** qemu-io arguments before the filename (-c commands, -t cache). */
  args: string[];
}

const ONCE_TO_DISK = { 'inject-error': [{ event: 'flush_to_disk', once: true }] };
const FLUSH_ONCE_TO_DISK = { 'inject-error': [{ event: 'flush_to_disk', iotype: 'flush', once: true }] };
const c = (...cmds: string[]) => cmds.flatMap((cmd) => ['-c', cmd]);

const CASES: FlushCase[] = [
  { name: 'qcow2: one FUA write does not reach flush_to_disk', top: 'qcow2', rules: ONCE_TO_DISK, args: c('write 0 4k') },
  { name: 'qcow2: the second FUA write does', top: 'qcow2', rules: ONCE_TO_DISK, args: c('write 0 4k', 'write 64k 4k') },
  { name: 'qcow2: an explicit flush between writes', top: 'qcow2', rules: FLUSH_ONCE_TO_DISK, args: c('write 0 4k', 'flush', 'write 64k 4k') },
  { name: 'qcow2: FUA write-zeroes', top: 'qcow2', rules: ONCE_TO_DISK, args: c('write -z 0 4k', 'write -z 64k 4k', 'flush') },
  { name: 'qcow2: a rule armed until close', top: 'qcow2', rules: { 'inject-error': [{ event: 'flush_to_disk' }] }, args: c('write 0 4k', 'write 64k 4k') },
  { name: 'qcow2: writeback, no FUA', top: 'qcow2', rules: ONCE_TO_DISK, args: ['-t', 'writeback', ...c('write 0 4k', 'write 64k 4k', 'flush')] },
  { name: 'raw: FUA writes', top: 'raw', rules: ONCE_TO_DISK, args: c('write 0 4k', 'write 4k 4k', 'flush') },
  { name: 'raw: flush_to_os', top: 'raw', rules: { 'inject-error': [{ event: 'flush_to_os', once: true }] }, args: c('write 0 4k', 'write 4k 4k') },
  {
    name: 'blkdebug on top: its own flush rule and FUA',
    top: 'blkdebug',
    rules: { 'inject-error': [{ event: 'none', iotype: 'flush' }] },
    args: c('write 0 4k', 'write 4k 4k', 'flush'),
  },
];

/** The json: filename of the case's image: `top` over blkdebug over the file (or blkdebug itself). */
function jsonFilename(top: FlushCase['top'], rules: Record<string, unknown>, filename: string): string {
  const blkdebug = { driver: 'blkdebug', ...rules, image: { driver: 'file', filename } };
  return `json:${JSON.stringify(top === 'blkdebug' ? blkdebug : { driver: top, file: blkdebug })}`;
}

/** One tool's run of the case on a fresh image: status, lines (timings masked), qemu-img check. */
async function runCase(dir: string, k: FlushCase, ours: boolean) {
  const name = k.top === 'qcow2' ? 'f.qcow2' : 'f.raw';
  await must(dir, 'qemu-img', ['create', '-q', '-f', k.top === 'qcow2' ? 'qcow2' : 'raw', name, '1M']);
  const args = [...k.args, jsonFilename(k.top, k.rules, name)];
  const r = ours ? await runOurs('qemu-io-ts', args, { cwd: dir }) : await run('qemu-io', args, { cwd: dir });
  const mask = (text: string) => text.replace(/ \(.*\/sec and .* ops\/sec\)/g, '').replace(/\d+\.\d+ sec/g, 'T');
  const check = k.top === 'qcow2' ? await tool(dir, 'qemu-img', ['check', name]) : null;
  return { code: r.code, stdout: mask(r.stdout), stderr: r.stderr, check };
}

describe.skipIf(missingPeers('qemu-io', 'qemu-img'))('emulated FUA flushes over blkdebug beside qemu-io 7.2', () => {
  it.each(CASES)('$name', async (k) => {
    const dir = path.join(root, k.name.replace(/\W+/g, '-'));
    fs.mkdirSync(dir, { recursive: true });
    const theirs = await runCase(dir, k, false);
    const ours = await runCase(dir, k, true);
    expect(ours).toEqual(theirs);
  }, 30_000);
});
