/*
 * qemu-img-ts rebase against qemu-img 7.2 on the same chains: safe rebases
 * onto an unrelated image, onto an image of the chain (only what lies
 * above it can differ), onto a shorter or longer backing file, flattening
 * (`-b ""`), v2 and 512-byte-cluster overlays, relative names from a
 * subdirectory, unsafe renames (-u), cache modes and -U. Each case compares
 * the messages and exit status, then the images (map, info backing keys,
 * check, content; see test/helpers/chain-cases.ts), and, for safe
 * rebases, that the overlay reads as before. Error cases compare messages
 * and status, and the image left behind.
 *
 * Build first (npm run build): the tests run dist/.
 */
import { spawnSync } from 'node:child_process';
import path from 'node:path';
import { describe, expect, it } from 'vitest';
import { runChainCase, type ChainCase } from '../helpers/chain-cases.js';
import { missingPeers } from '../helpers/peers.js';
import { scratchDir } from '../helpers/tmp.js';

const root = scratchDir('qbt-rebase-');
let caseNumber = 0;

/** Copies of the overlays as they were, to check that a safe rebase keeps their content. */
const KEEP = 'for f in *.qcow2; do cp "$f" "$f.before"; done';

function compare(name: string, c: ChainCase, keptContent: string[] = []): void {
  it(name, async () => {
    const dir = path.join(root, String(++caseNumber));
    await runChainCase(dir, c);
    for (const file of keptContent) {
      const r = spawnSync('qemu-img', ['compare', `${file}.before`, file], { cwd: path.join(dir, 'ours'), encoding: 'utf8' });
      expect(`${r.status} ${r.stdout}${r.stderr}`, `${file} reads as before`).toBe('0 Images are identical.\n');
    }
  });
}

const io = (file: string, fmt: string, ...cmds: string[]) => `qemu-io -f ${fmt} ${cmds.map((c) => `-c '${c}'`).join(' ')} ${file} >/dev/null`;
const create = (args: string) => `qemu-img create -q ${args}`;

/**
 * raw base (2 MiB) ← qcow2 mid (3 MiB, 4 KiB clusters) ← qcow2 top (4 MiB),
 * an unrelated qcow2 (5 MiB, 512-byte clusters), a short raw image, and a
 * compat=0.10 copy of the top on mid.
 */
const CHAIN = [
  create('-f raw base.raw 2M'),
  io('base.raw', 'raw', 'write -P 1 0 256k', 'write -P 2 1M 64k', 'write -P 9 1900k 100k'),
  create('-f qcow2 -o cluster_size=4k -b base.raw -F raw mid.qcow2 3M'),
  io('mid.qcow2', 'qcow2', 'write -P 3 64k 4k', 'write -z 1M 64k', 'write -P 4 2M 8k', 'write -P 1 512k 64k'),
  create('-f qcow2 -b mid.qcow2 -F qcow2 top.qcow2 4M'),
  io('top.qcow2', 'qcow2', 'write -P 5 0 4k', 'write -P 6 3M 4k', 'discard 256k 64k'),
  create('-f qcow2 -o cluster_size=512 other.qcow2 5M'),
  io('other.qcow2', 'qcow2', 'write -P 1 0 128k', 'write -P 7 1536k 64k', 'write -P 8 3500k 100k'),
  create('-f raw small.raw 1M'),
  io('small.raw', 'raw', 'write -P 1 0 100k'),
  'qemu-img convert -O qcow2 -o compat=0.10 top.qcow2 v2.qcow2',
  'qemu-img rebase -u -b mid.qcow2 -F qcow2 v2.qcow2',
  KEEP,
].join(' && ');

/** Two images for the error cases. */
const PAIR = [create('-f qcow2 a.qcow2 1M'), create('-f raw n.raw 1M'), create('-f qcow2 -b a.qcow2 -F qcow2 b.qcow2')].join(' && ');
const SUBDIR = `mkdir sub && ${create('-f qcow2 sub/a.qcow2 1M')} && ${create('-f qcow2 -b a.qcow2 -F qcow2 sub/b.qcow2')}`;

describe.skipIf(missingPeers('qemu-img', 'qemu-io'))('qemu-img-ts rebase vs qemu-img 7.2', () => {
  describe.concurrent('safe mode', () => {
    const safe = (name: string, args: string[], files: string[]) => compare(name, { setup: CHAIN, args, files }, files.filter((f) => f.endsWith('.qcow2')));
    safe('onto an unrelated image', ['rebase', '-b', 'other.qcow2', '-F', 'qcow2', 'top.qcow2'], ['top.qcow2']);
    safe('onto the base of its backing file', ['rebase', '-b', 'base.raw', '-F', 'raw', 'top.qcow2'], ['top.qcow2']);
    safe('onto its own backing file, with another format name', ['rebase', '-b', 'mid.qcow2', '-F', 'qcow2', 'top.qcow2'], ['top.qcow2']);
    safe('onto a shorter raw image', ['rebase', '-b', 'small.raw', '-F', 'raw', 'top.qcow2'], ['top.qcow2']);
    safe('the middle image onto a shorter one', ['rebase', '-b', 'small.raw', '-F', 'raw', 'mid.qcow2'], ['mid.qcow2', 'top.qcow2']);
    safe('flatten the top', ['rebase', '-b', '', 'top.qcow2'], ['top.qcow2']);
    safe('flatten the middle image, -p', ['rebase', '-p', '-b', '', 'mid.qcow2'], ['mid.qcow2']);
    safe('a longer image onto the top', ['rebase', '-b', 'top.qcow2', '-F', 'qcow2', 'other.qcow2'], ['other.qcow2']);
    safe('compat=0.10 onto an unrelated image', ['rebase', '-b', 'other.qcow2', '-F', 'qcow2', 'v2.qcow2'], ['v2.qcow2']);
    safe('compat=0.10 onto the base', ['rebase', '-b', 'base.raw', '-F', 'raw', 'v2.qcow2'], ['v2.qcow2']);
    safe('flatten compat=0.10', ['rebase', '-b', '', 'v2.qcow2'], ['v2.qcow2']);
    safe('-U -T none -t writethrough -q', ['rebase', '-U', '-T', 'none', '-t', 'writethrough', '-q', '-b', 'other.qcow2', '-F', 'qcow2', 'top.qcow2'], ['top.qcow2']);
    safe('--image-opts', ['rebase', '--image-opts', '-b', 'other.qcow2', '-F', 'qcow2', 'driver=qcow2,file.filename=top.qcow2'], ['top.qcow2']);
    compare(
      'relative names from a subdirectory (chain in sub/)',
      { setup: `mkdir sub && cd sub && ${CHAIN}`, args: ['rebase', '-b', 'other.qcow2', '-F', 'qcow2', 'sub/top.qcow2'], files: ['sub/top.qcow2'] },
      ['sub/top.qcow2'],
    );
  });

  describe.concurrent('unsafe mode', () => {
    compare('-u renames', { setup: CHAIN, args: ['rebase', '-u', '-b', 'other.qcow2', '-F', 'qcow2', 'top.qcow2'], files: ['top.qcow2'] });
    compare('-u to a missing file', { setup: CHAIN, args: ['rebase', '-u', '-b', 'gone.qcow2', '-F', 'qcow2', 'top.qcow2'], files: ['top.qcow2'] });
    compare('-u with a missing backing file', { setup: `${CHAIN} && mv mid.qcow2 moved.qcow2`, args: ['rebase', '-u', '-b', 'moved.qcow2', '-F', 'qcow2', 'top.qcow2'], files: ['top.qcow2'] });
    compare('-u -b ""', { setup: PAIR, args: ['rebase', '-u', '-b', '', 'b.qcow2'], files: ['b.qcow2'] });
    compare('-u without -b', { setup: PAIR, args: ['rebase', '-u', 'b.qcow2'], files: ['b.qcow2'] });
    compare('-u -F raw over a qcow2', { setup: PAIR, args: ['rebase', '-u', '-b', 'a.qcow2', '-F', 'raw', 'b.qcow2'], files: ['b.qcow2'] });
    compare('-u -F without -b', { setup: PAIR, args: ['rebase', '-F', 'qcow2', '-u', 'b.qcow2'], files: ['b.qcow2'] });
  });

  describe.concurrent('errors', () => {
    const e = (name: string, args: string[], setup = PAIR) => compare(name, { setup, args, files: setup === PAIR ? ['b.qcow2'] : [] });
    e('neither -b nor -u', ['rebase', 'b.qcow2']);
    e('no -F', ['rebase', '-b', 'n.raw', 'b.qcow2']);
    e('-u without -F', ['rebase', '-u', '-b', 'a.qcow2', 'b.qcow2']);
    e('missing new backing file', ['rebase', '-b', 'nonexist', '-F', 'raw', 'b.qcow2']);
    e('unknown -F', ['rebase', '-b', 'n.raw', '-F', 'foo', 'b.qcow2']);
    e('raw overlay', ['rebase', '-f', 'raw', '-b', 'a.qcow2', '-F', 'qcow2', 'n.raw']);
    e('raw overlay without -F', ['rebase', '-f', 'raw', '-b', 'a.qcow2', 'n.raw']);
    e('raw overlay, -u without -b', ['rebase', '-f', 'raw', '-u', 'n.raw']);
    e('probed raw overlay', ['rebase', '-b', 'n.raw', '-F', 'raw', 'n.raw']);
    e('bad -T', ['rebase', '-T', 'foo', '-b', '', 'b.qcow2']);
    e('bad -t', ['rebase', '-t', 'foo', '-b', '', 'b.qcow2']);
    e('unknown option', ['rebase', '-x', 'b.qcow2']);
    e('missing argument', ['rebase', '-b']);
    e('two file names', ['rebase', '-b', '', 'b.qcow2', 'a.qcow2']);
    e('missing image', ['rebase', '-u', '-b', 'a.qcow2', '-F', 'qcow2', 'nonexist.qcow2']);
    e('json: backing file without -F', ['rebase', '-b', 'json:{"driver":"qcow2","file":{"driver":"file","filename":"a.qcow2"}}', 'b.qcow2']);
    e('missing file next to the image', ['rebase', '-b', 'nonexist', '-F', 'raw', 'sub/b.qcow2'], SUBDIR);
    e('a name taken from the current directory', ['rebase', '-b', 'sub/a.qcow2', '-F', 'qcow2', 'sub/b.qcow2'], SUBDIR);
    e('name too long', ['rebase', '-u', '-b', 'x'.repeat(1024), '-F', 'raw', 'b.qcow2']);
    e(
      'no room in the header',
      ['rebase', '-u', '-b', 'y'.repeat(500), '-F', 'raw', 'c.qcow2'],
      `${PAIR} && ${create('-f qcow2 -o cluster_size=512 c.qcow2 1M')}`,
    );
  });

  describe.concurrent('failing I/O (blkdebug): the failed step is reported first, then what the close could not write', () => {
    // Flattening b.qcow2 copies a.qcow2's data into it; a3.qcow2 holds other data, so a rebase onto it reads both sides.
    // c.qcow2's backing file is a json: name relative to the directory: only messages and status are compared for it.
    const setup = `${PAIR} && ${io('a.qcow2', 'qcow2', 'write -P 1 0 512k')} && ${create('-f qcow2 a3.qcow2 1M')} && ${io('a3.qcow2', 'qcow2', 'write -P 2 0 512k')}`;
    const failing = (file: string, rule: string) =>
      ['driver=qcow2', 'file.driver=blkdebug', `file.image.filename=${file}`, ...rule.split(' ').map((r) => `file.inject-error.0.${r}`)].join(',');
    const failingJson = (file: string, event: string) =>
      `json:${JSON.stringify({ driver: 'qcow2', file: { driver: 'blkdebug', image: { driver: 'file', filename: file }, 'inject-error': [{ event, errno: 5 }] } })}`;
    const f = (name: string, args: string[], extra = '', files = ['b.qcow2']) => compare(name, { setup: extra ? `${setup} && ${extra}` : setup, args, files });
    f('every write after the first fails with ENOSPC', ['rebase', '--image-opts', '-b', '', failing('b.qcow2', 'event=write_aio errno=28 immediately=on')]);
    f('the first write fails with EIO', ['rebase', '--image-opts', '-b', '', failing('b.qcow2', 'event=write_aio errno=5 once=on immediately=on')]);
    f('the new backing file cannot be read', ['rebase', '-b', failingJson('a3.qcow2', 'read_aio'), '-F', 'qcow2', 'b.qcow2']);
    f('the old backing file cannot be read', ['rebase', '-b', 'a3.qcow2', '-F', 'qcow2', 'c.qcow2'], create(`-f qcow2 -b '${failingJson('a.qcow2', 'read_aio')}' -F qcow2 c.qcow2`), []);
  });
});
