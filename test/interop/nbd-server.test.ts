/*
 * Our NBD server (in-process, unix sockets in a scratch directory) beside
 * qemu-nbd 7.2 on the same qcow2 backing chain, queried by the real
 * clients: nbdinfo (--json, --list, --map for each context, --totals,
 * --can/--is), qemu-img (info, map, compare, convert over nbd+unix://),
 * qemu-io (writes with FUA, zeroes with and without unmap, discard, flush,
 * pattern reads), nbdcopy both ways, and libnbd's python binding
 * (structured reads with holes, DF, block status with REQ_ONE, FUA, fast
 * zero, error codes, multi-conn). Outputs are compared with the socket
 * path masked and qemu-io's timing lines dropped.
 *
 * Peers run asynchronously (helpers/run.ts): the server shares this
 * process's event loop.
 */
import { execFileSync } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { beforeAll, describe, expect, it } from 'vitest';
import { missingPeers } from '../helpers/peers.js';
import { run, type RunResult } from '../helpers/run.js';
import { scratchDir } from '../helpers/tmp.js';
import { serveImage, startQemuNbd, type OurServer, type QemuNbd } from '../helpers/nbd-server.js';

const PYTHON = '/usr/bin/python3';

/** stdout and exit status with the server's socket path written as @SOCK@. */
function masked(r: RunResult, socket: string) {
  const m = (t: string) => t.replaceAll(socket, '@SOCK@');
  return { stdout: m(r.stdout), stderr: m(r.stderr), code: r.code };
}

/** qemu-io output without its timing lines. */
const withoutTimings = (text: string) => text.replace(/^.* ops; .*\n/gm, '');

async function both(ours: OurServer | QemuNbd, theirs: OurServer | QemuNbd, cmd: string, args: (uri: string, socket: string) => string[]) {
  const [a, b] = await Promise.all([run(cmd, args(ours.uri(), ours.socket)), run(cmd, args(theirs.uri(), theirs.socket))]);
  return { ours: masked(a, ours.socket), theirs: masked(b, theirs.socket) };
}

describe.skipIf(missingPeers('qemu-img', 'qemu-io', 'qemu-nbd', 'nbdinfo', 'nbdcopy'))('our NBD server beside qemu-nbd 7.2', () => {
  const dir = scratchDir('qbt-nbd-interop-');
  const sh = (cmd: string, ...args: string[]) => execFileSync(cmd, args, { cwd: dir, encoding: 'utf8' });

  /** base.qcow2 <- top.qcow2 as in the peers' oracle; copies for writable runs. */
  beforeAll(() => {
    sh('qemu-img', 'create', '-q', '-f', 'qcow2', 'base.qcow2', '4M');
    sh('qemu-io', '-f', 'qcow2', '-c', 'write -P 0xab 0 1M', '-c', 'write -z 1M 512k', 'base.qcow2');
    sh('qemu-img', 'create', '-q', '-f', 'qcow2', '-b', 'base.qcow2', '-F', 'qcow2', 'top.qcow2');
    sh('qemu-io', '-f', 'qcow2', '-c', 'write -P 0xef 512k 128k', '-c', 'write -z 3M 64k', 'top.qcow2');
    for (const who of ['o', 't']) {
      fs.copyFileSync(path.join(dir, 'base.qcow2'), path.join(dir, `${who}-base.qcow2`));
      sh('qemu-img', 'create', '-q', '-f', 'qcow2', '-b', `${who}-base.qcow2`, '-F', 'qcow2', `${who}-top.qcow2`);
    }
    sh('qemu-img', 'create', '-q', '-f', 'raw', 'sparse.raw', '8M');
    sh('qemu-io', '-f', 'raw', '-c', 'write -P 0x5a 1M 64k', '-c', 'write -P 0x11 5M 1M', 'sparse.raw');
  });

  const readOnlyChain = async () => {
    const ours = await serveImage(dir, 'top.qcow2', {
      format: 'qcow2',
      name: 'exp',
      description: 'top of chain',
      allocationDepth: true,
      server: { maxConnections: 2 },
    });
    const theirs = await startQemuNbd(dir, ['-t', '-r', '-e', '2', '-f', 'qcow2', '-x', 'exp', '-D', 'top of chain', '--allocation-depth', 'top.qcow2'], 'qemu.sock', 'exp');
    return { ours, theirs };
  };

  it('nbdinfo prints the same for both: --json, --list, maps of each context, --totals, --can, --is', async () => {
    const { ours, theirs } = await readOnlyChain();
    const listUri = (_: string, socket: string) => `nbd+unix:///?socket=${socket}`;
    const runs: Array<(uri: string, socket: string) => string[]> = [
      (u) => [u],
      (u) => ['--json', u],
      (u, s) => ['--list', listUri(u, s)],
      (u, s) => ['--list', '--json', listUri(u, s)],
      (u) => ['--map', u],
      (u) => ['--map', '--json', u],
      (u) => ['--map=qemu:allocation-depth', u],
      (u) => ['--map=qemu:allocation-depth', '--json', u],
      (u) => ['--map', '--totals', u],
      (u) => ['--size', u],
      (u) => ['--is', 'read-only', u],
      (_, s) => [`nbd+unix:///nosuchexport?socket=${s}`],
      ...['connect', 'read', 'write', 'trim', 'zero', 'fast-zero', 'fua', 'flush', 'df', 'multi-conn', 'cache'].map(
        (c) => (u: string) => ['--can', c, u],
      ),
    ];
    const seen: string[] = [];
    for (const args of runs) {
      const r = await both(ours, theirs, 'nbdinfo', args);
      expect(r.ours, `nbdinfo ${args('URI', 'SOCK').join(' ')}`).toEqual(r.theirs);
      seen.push(r.ours.stdout);
    }
    expect(seen).toContain('         0      524288    2  backing depth 2\n    524288      131072    1  local\n' +
      '    655360      917504    2  backing depth 2\n   1572864     1572864    0  absent\n' +
      '   3145728       65536    1  local\n   3211264      983040    0  absent\n');
    expect(seen.join('')).toContain('"can_multi_conn": true');
    expect(ours.logs).toEqual([]);
  });

  it('qemu-img info, map, compare and convert over nbd+unix:// agree', async () => {
    const { ours, theirs } = await readOnlyChain();
    for (const args of [
      (u: string) => ['info', u],
      (u: string) => ['map', '--output=json', '-f', 'raw', u],
      (u: string) => ['map', '-f', 'raw', u],
      (u: string) => ['compare', '-f', 'qcow2', '-F', 'raw', 'top.qcow2', u],
    ]) {
      const r = await both(ours, theirs, 'qemu-img', (u) => args(u));
      expect(r.ours, args('URI').join(' ')).toEqual(r.theirs);
    }
    const conv = await run('qemu-img', ['convert', '-f', 'raw', '-O', 'qcow2', ours.uri(), 'conv.qcow2'], { cwd: dir });
    expect(conv.code).toBe(0);
    expect((await run('qemu-img', ['compare', '-f', 'qcow2', '-F', 'qcow2', 'top.qcow2', 'conv.qcow2'], { cwd: dir })).stdout).toBe('Images are identical.\n');
    const map = await run('qemu-img', ['map', '--output=json', 'conv.qcow2'], { cwd: dir });
    expect(map.stdout).toContain('"start": 1048576, "length": 3145728, "depth": 0, "present": false, "zero": true, "data": false');
  });

  it('qemu-io writes, zeroes, discards and reads the same through both; the images stay identical and clean', async () => {
    const ours = await serveImage(dir, 'o-top.qcow2', { format: 'qcow2', name: 'exp', writable: true, allocationDepth: true, server: { maxConnections: 1 } });
    const theirs = await startQemuNbd(dir, ['-t', '-f', 'qcow2', '-x', 'exp', '--allocation-depth', 't-top.qcow2'], 'qemu-w.sock', 'exp');
    const io = [
      '-t', 'writeback', '-f', 'raw',
      '-c', 'write -f -P 0x11 0 64k', '-c', 'write -z 64k 64k', '-c', 'write -z -u 128k 64k', '-c', 'discard 192k 64k',
      '-c', 'write -P 0x22 2M 4k', '-c', 'flush', '-c', 'read -P 0x11 0 64k', '-c', 'read -P 0 64k 128k',
      '-c', 'read -P 0xab 192k 64k', '-c', 'read -P 0 3M 64k',
    ];
    const r = await both(ours, theirs, 'qemu-io', (u) => [...io.slice(0, 4), u, ...io.slice(4)]);
    expect(withoutTimings(r.ours.stdout)).toEqual(withoutTimings(r.theirs.stdout));
    expect(r.ours.code).toBe(0);
    expect(r.ours.stdout).toContain('read 65536/65536 bytes at offset 196608');
    expect(r.ours.stderr).toBe('');
    for (const args of [(u: string) => ['--map', u], (u: string) => ['--map=qemu:allocation-depth', u]]) {
      const m = await both(ours, theirs, 'nbdinfo', args);
      expect(m.ours).toEqual(m.theirs);
    }
    const fua = await both(ours, theirs, 'qemu-io', (u) => ['-f', 'raw', u, '-c', 'write -P 0x33 3M 4k']);
    expect(withoutTimings(fua.ours.stdout)).toEqual(withoutTimings(fua.theirs.stdout));
    await ours.stop();
    await theirs.stop();
    expect((await run('qemu-img', ['compare', '-f', 'qcow2', '-F', 'qcow2', 'o-top.qcow2', 't-top.qcow2'], { cwd: dir })).stdout).toBe('Images are identical.\n');
    const check = await run('qemu-img', ['check', 'o-top.qcow2'], { cwd: dir });
    expect(check.stdout).toContain('No errors were found on the image.');
  });

  it('nbdcopy copies out of both servers identically and into ours losslessly (multi-conn)', async () => {
    const { ours, theirs } = await readOnlyChain();
    expect((await run('nbdcopy', [ours.uri(), path.join(dir, 'out-ours.raw')])).code).toBe(0);
    expect((await run('nbdcopy', [theirs.uri(), path.join(dir, 'out-theirs.raw')])).code).toBe(0);
    expect(fs.readFileSync(path.join(dir, 'out-ours.raw')).equals(fs.readFileSync(path.join(dir, 'out-theirs.raw')))).toBe(true);

    sh('qemu-img', 'create', '-q', '-f', 'qcow2', 'target.qcow2', '8M');
    const target = await serveImage(dir, 'target.qcow2', { format: 'qcow2', name: 't', writable: true }, 'target.sock');
    const into = await run('nbdcopy', ['--connections=4', path.join(dir, 'sparse.raw'), target.uri()]);
    expect(into.code).toBe(0);
    expect((await run('nbdcopy', [target.uri(), path.join(dir, 'back.raw')])).code).toBe(0);
    expect(fs.readFileSync(path.join(dir, 'back.raw')).equals(fs.readFileSync(path.join(dir, 'sparse.raw')))).toBe(true);
    const map = await run('nbdinfo', ['--map', target.uri()]);
    expect(map.stdout).toBe(
      ['         0     1048576    3  hole,zero', '   1048576       65536    0  data', '   1114112     4128768    3  hole,zero',
        '   5242880     1048576    0  data', '   6291456     2097152    3  hole,zero', ''].join('\n'),
    );
    await target.stop();
    expect((await run('qemu-img', ['check', 'target.qcow2'], { cwd: dir })).code).toBe(0);
  });

  it('python libnbd: structured reads with holes, DF, REQ_ONE, FUA, fast zero, errors, multi-conn', async () => {
    sh('qemu-img', 'create', '-q', '-f', 'qcow2', 'py.qcow2', '4M');
    sh('qemu-io', '-f', 'qcow2', '-c', 'write -P 0x61 1M 64k', 'py.qcow2');
    const rw = await serveImage(dir, 'py.qcow2', { format: 'qcow2', writable: true, allocationDepth: true }, 'py-rw.sock');
    const r = await run(PYTHON, ['-c', PY_PROBE, rw.uri(), 'rw']);
    expect(r.stderr).toBe('');
    expect(JSON.parse(r.stdout)).toEqual({
      flags: { is_read_only: false, can_flush: true, can_fua: true, can_trim: true, can_zero: true, can_fast_zero: true, can_df: true, can_multi_conn: true, can_cache: true },
      chunks: [[0, 1048576, 2], [1048576, 65536, 1], [1114112, 3080192, 2]],
      df_chunks: [[1048576, 131072, 1]],
      req_one: { 'base:allocation': [[1048576, 3]], 'qemu:allocation-depth': [[1048576, 0]] },
      status: {
        'base:allocation': [[1048576, 3], [65536, 0], [3080192, 3]],
        'qemu:allocation-depth': [[1048576, 0], [65536, 1], [3080192, 0]],
      },
      read_past_end: 22,
      fua_roundtrip: true,
      zero_no_hole: true,
      fast_zero: 0,
      write_past_end: 28,
      zero_past_end: 28,
      multi_conn_visible: true,
    });
    await rw.stop();
    const ro = await serveImage(dir, 'py.qcow2', { format: 'qcow2' }, 'py-ro.sock');
    const r2 = await run(PYTHON, ['-c', PY_PROBE, ro.uri(), 'ro']);
    const out = JSON.parse(r2.stdout);
    expect([out.write_ro, out.zero_ro, out.trim_ro, out.read_past_end]).toEqual([1, 1, 1, 22]);
  });
});

/** A libnbd probe printing one JSON object (argv: URI, rw|ro). */
const PY_PROBE = String.raw`
import json, sys, nbd
uri, mode = sys.argv[1], sys.argv[2]
out = {}
def errnum(f):
    try:
        f()
        return 0
    except nbd.Error as e:
        return e.errnum
def connect():
    h = nbd.NBD()
    h.add_meta_context('base:allocation')
    h.add_meta_context('qemu:allocation-depth')
    h.connect_uri(uri)
    return h
h = connect()
size = h.get_size()
def status(flags=0, count=None):
    res = {}
    def cb(ctx, offset, entries, err):
        res.setdefault(ctx, []).extend([[entries[i], entries[i + 1]] for i in range(0, len(entries), 2)])
        return 0
    h.block_status(count or size, 0, cb, flags)
    return res
if mode == 'rw':
    out['flags'] = {f: bool(getattr(h, f)()) for f in ['is_read_only', 'can_flush', 'can_fua', 'can_trim', 'can_zero', 'can_fast_zero', 'can_df', 'can_multi_conn', 'can_cache']}
    chunks = []
    h.pread_structured(size, 0, lambda b, o, s, e: chunks.append([o, len(b), s]) or 0)
    out['chunks'] = sorted(chunks)
    df = []
    h.pread_structured(131072, 1048576, lambda b, o, s, e: df.append([o, len(b), s]) or 0, nbd.CMD_FLAG_DF)
    out['df_chunks'] = df
    out['req_one'] = status(nbd.CMD_FLAG_REQ_ONE)
    out['status'] = status()
h.set_strict_mode(0)
out['read_past_end'] = errnum(lambda: h.pread(512, size))
if mode == 'rw':
    data = b'\x5a' * 4096
    h.pwrite(data, 0, nbd.CMD_FLAG_FUA)
    out['fua_roundtrip'] = h.pread(4096, 0) == data
    h.zero(65536, 1048576, nbd.CMD_FLAG_NO_HOLE)
    out['zero_no_hole'] = h.pread(65536, 1048576) == bytes(65536)
    out['fast_zero'] = errnum(lambda: h.zero(65536, 2097152, nbd.CMD_FLAG_FAST_ZERO))
    out['write_past_end'] = errnum(lambda: h.pwrite(b'x' * 512, size))
    out['zero_past_end'] = errnum(lambda: h.zero(512, size))
    h.trim(65536, 131072)
    h.cache(65536, 0)
    h2 = connect()
    h2.pwrite(b'\x77' * 512, 3 * 1048576)
    h2.flush()
    out['multi_conn_visible'] = h.pread(512, 3 * 1048576) == b'\x77' * 512
    h2.shutdown()
else:
    out['write_ro'] = errnum(lambda: h.pwrite(b'x' * 512, 0))
    out['zero_ro'] = errnum(lambda: h.zero(512, 0))
    out['trim_ro'] = errnum(lambda: h.trim(512, 0))
h.shutdown()
print(json.dumps(out))
`;
