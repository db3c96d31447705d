/*
 * JSON options read by QEMU 7.2's JSON parser, beside the real tools:
 * `json:{...}` filenames of qemu-img (every error of the lexer, the parser
 * and qobject_from_json has its own text) and qemu-storage-daemon's JSON
 * forms of --blockdev, --export, --monitor, --nbd-server and --object
 * (typed: a string where a boolean or an integer belongs is refused).
 * stderr and exit status must be equal; daemons that start are stopped by
 * the timeout (both sides alike), so the cases are ones that fail at once.
 *
 * Build first (npm run build): the tests run dist/.
 */
import fs from 'node:fs';
import path from 'node:path';
import { describe, expect, it } from 'vitest';
import { missingPeers } from '../helpers/peers.js';
import { run, runOurs } from '../helpers/run.js';
import { scratchDir } from '../helpers/tmp.js';

const root = scratchDir('qbt-json-');
/** A daemon that fails does so within this; one that does not is stopped then. */
const DAEMON_TIMEOUT_MS = 3_000;

/** json: texts, one per lexer/parser/streamer error kind (and a few that parse). */
const JSON_TEXTS = [
  '{bad', '{', '{"a"', '{"a":', '{"a":1', '{"a":1,', '{"a" 1}', '{1:2}', '[', '{"a":[1 2]}', '{"a":tru}',
  '{"a":"\\q"}', '{"a":"\\u12"}', '{"a":@}', '{"a":1}}', '{"a":1} x', '', '"str"', '[1]', '{"a":01}', "{'a':1}",
  '{"a":1.}', '{"a":-}', '{"a":[}', '{"a":[1,]}', '{"a":1,}', '{,}', '{"a":"x', '{"a":1e}', '{"a":1e+}',
  '{"a":0x}', '{"a":"\\ud800"}', '{"a":"\\ud800\\u0041"}', '{"a":"\\udc00"}', '{"a":"\\ud83d\\ude00"}',
  '{"driver":"raw","driver":"raw"}', '{"x":{"y":1}:2}', '{"a":true,"b":"c"', '{"a":1}{"b":2}', "{\"a\":'x\"y'}",
];

describe.skipIf(missingPeers('qemu-img'))('qemu-img json: filenames beside qemu-img 7.2', () => {
  it.each(JSON_TEXTS)('info json:%s', async (text) => {
    const args = ['info', `json:${text}`];
    const [theirs, ours] = await Promise.all([run('qemu-img', args), runOurs('qemu-img-ts', args)]);
    expect({ stderr: ours.stderr, code: ours.code }).toEqual({ stderr: theirs.stderr, code: theirs.code });
  });
});

/** Daemon command lines (`@DIR@`: a scratch directory of the case). */
const DAEMON_CASES: string[][] = [
  ['--blockdev', '{bad'],
  ['--blockdev', '{"driver":"null-co","node-name":"a"} x'],
  ['--blockdev', '{"driver":"null-co","node-name":"a","size":"x"}'],
  ['--blockdev', '{"driver":"null-co","node-name":"a","read-zeroes":"on"}'],
  ['--blockdev', '{"driver":"null-co","node-name":"a","size":1.}'],
  ['--blockdev', 'null-co,node-name=n0', '--nbd-server', '{"addr":{"type":"unix","path":"@DIR@/s"},"max-connections":"2"}'],
  ['--blockdev', 'null-co,node-name=n0', '--nbd-server', '{"addr":{"type":"unix","path":"@DIR@/s"}}',
    '--export', '{"type":"nbd","id":"e","node-name":"n0","writable":"yes"}'],
  ['--blockdev', 'null-co,node-name=n0', '--nbd-server', '{"addr":{"type":"unix","path":"@DIR@/s"}}',
    '--export', '{"type":"nbd","id":"e","node-name":"n0"}', '--export', '{"type":"nbd","id":"e","node-name":"n0"}'],
  ['--chardev', 'socket,path=@DIR@/m,server=on,wait=off,id=c0', '--monitor', '{"chardev":"c0","pretty":"on"}'],
  ['--object', '{"qom-type":"secret","id":"s0"}'],
  ['--object', '{"qom-type":"secret","id":"s0","data":"x"}', '--object', '{"qom-type":"secret","id":"s0","data":"x"}'],
  // Keyval --blockdev goes through QAPI's keyval visitor, not QemuOpts: its enum and integer texts.
  ['--blockdev', 'driver=file,node-name=f,filename=@DIR@/x,locking=bad'],
  ['--blockdev', 'driver=file,node-name=f,filename=@DIR@/x,aio=bad'],
  ['--blockdev', 'driver=file,node-name=f,filename=@DIR@/x,aio-max-batch=x'],
  ['--blockdev', 'driver=qcow2,node-name=q,file.driver=file,file.filename=@DIR@/x,cache-clean-interval=x'],
  ['--blockdev', 'driver=qcow2,node-name=q,file.driver=file,file.filename=@DIR@/x,l2-cache-size=1M'],
];

let caseNumber = 0;

/** The case's arguments for one side, in a fresh directory; and back from it for comparing. */
function caseArgs(args: string[], side: string): { args: string[]; dir: string } {
  const dir = path.join(root, String(++caseNumber), side);
  fs.mkdirSync(dir, { recursive: true });
  return { args: args.map((a) => a.replaceAll('@DIR@', dir)), dir };
}

describe.skipIf(missingPeers('qemu-storage-daemon'))('qemu-storage-daemon JSON options beside qsd 7.2', () => {
  it.each(DAEMON_CASES.map((c) => [c.join(' '), c] as const))('%s', async (_name, args) => {
    const t = caseArgs(args, 'theirs');
    const o = caseArgs(args, 'ours');
    const [theirs, ours] = await Promise.all([
      run('qemu-storage-daemon', t.args, { timeoutMs: DAEMON_TIMEOUT_MS }),
      runOurs('qemu-storage-daemon-ts', o.args, { timeoutMs: DAEMON_TIMEOUT_MS }),
    ]);
    expect({ stderr: ours.stderr.replaceAll(o.dir, '@DIR@'), code: ours.code }).toEqual({
      stderr: theirs.stderr.replaceAll(t.dir, '@DIR@'),
      code: theirs.code,
    });
  });
});
