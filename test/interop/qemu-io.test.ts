/*
 * qemu-io-ts against the real qemu-io 7.2.
 *
 * (a) patterns written by one tool verify with the other; (b) every scripted
 * case (notes §5.2–§5.11 and more) runs on both tools, each in its own
 * scratch directory with identical files, and stdout, stderr, the exit
 * status and the resulting files must be identical once the statistics
 * line's timings are masked; (c) discard leaves a hole qemu-img map sees;
 * (d) write -z / -z -u / -f read back identically and allocate alike.
 *
 * The golden transcripts in test/golden/qemu-io/ pin our own output for the
 * same cases, so a change in text shows up even where qemu-io is missing;
 * UPDATE_GOLDEN=1 rewrites them.
 */
import crypto from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { describe, expect, it } from 'vitest';
import { missingPeers } from '../helpers/peers.js';
import { ROOT, run, runOurs, type RunResult } from '../helpers/run.js';
import { scratchDir } from '../helpers/tmp.js';

const MiB = 1 << 20;
const GOLDEN_DIR = path.join(ROOT, 'test/golden/qemu-io');
const UPDATE_GOLDEN = process.env.UPDATE_GOLDEN === '1';
/** Parallel tool runs in one golden section. */
const RUNS_IN_FLIGHT = 8;

// ---------------------------------------------------------------- fixtures

type Setup = (dir: string) => void;

function sparse(name: string, bytes: number): Setup {
  return (dir) => {
    fs.writeFileSync(path.join(dir, name), '');
    fs.truncateSync(path.join(dir, name), bytes);
  };
}

function writeAt(name: string, offset: number, data: Buffer): Setup {
  return (dir) => {
    const fd = fs.openSync(path.join(dir, name), 'r+');
    fs.writeSync(fd, data, 0, data.length, offset);
    fs.closeSync(fd);
  };
}

const X = sparse('x.raw', MiB);
/** §5.4's bytes at 0..63: 16×'A', 16×'z', 8×' ', 8×'\n', 7×0x80, '0', 4×'_', 4×'.'. */
const HEX_DATA = Buffer.concat([
  Buffer.alloc(16, 0x41), Buffer.alloc(16, 0x7a), Buffer.alloc(8, 0x20), Buffer.alloc(8, 0x0a),
  Buffer.alloc(7, 0x80), Buffer.from([0x30]), Buffer.alloc(4, 0x5f), Buffer.alloc(4, 0x2e),
]);
const DATA = [X, writeAt('x.raw', 0, HEX_DATA)];
const ODD = sparse('odd.raw', 1000);
const EMPTY = sparse('e.raw', 0);
const H = [sparse('h.raw', 4 * MiB), writeAt('h.raw', 64 * 1024, Buffer.alloc(64 * 1024, 0x11)), writeAt('h.raw', 2 * MiB, Buffer.alloc(4096, 0x22))];
const DIR: Setup = (dir) => fs.mkdirSync(path.join(dir, 'd'));
const SRC: Setup = (dir) => {
  fs.writeFileSync(path.join(dir, 'src'), 'host\n');
  fs.writeFileSync(path.join(dir, 'ab'), 'ab');
  fs.writeFileSync(path.join(dir, 'empty'), '');
};

interface IoCase {
  args: string[];
  setup: Setup[];
  input?: string;
}

/** A case on x.raw (1 MiB) with `-f raw` and the given -c commands. */
const onX = (...cmds: string[]): IoCase => ({ args: ['-f', 'raw', 'x.raw', ...cmds.flatMap((c) => ['-c', c])], setup: [X] });
const on = (setup: Setup[], args: string[], input?: string): IoCase => (input === undefined ? { args, setup } : { args, setup, input });

const SECTIONS: Record<string, IoCase[]> = {
  'read-write': [
    onX('write 0 64k'),
    onX('write -P 0xab 0 64k'),
    onX('write -z 0 64k'),
    onX('write -z -u 0 64k'),
    onX('write -f 0 4k'),
    onX('write -P 0xcd 512 1000'),
    onX('read 0 64k'),
    onX('write -P 0xab 0 64k', 'read -P 0xab 0 64k'),
    onX('read -q 0 64k'),
    onX('write -q 0 64k'),
    onX('read -C 0 64k'),
    onX('write -C 0 64k'),
    onX('read 0 0'),
    onX('write 0 0'),
    onX('read 0 1.5k'),
    onX('read 0 0x200'),
    onX('read 0 0x10k'),
    onX('read 0 1088', 'read 0 1.0625k', 'read 0 +1', 'read 0 1.k', 'read 0 0.5k'),
    onX('readv 0 512 512'),
    onX('writev -P 0x11 0 512 1k', 'readv -P 0x11 0 1k 512', 'readv -P 0x12 0 1k'),
    onX('readv 0 abc', 'readv 0 3G', 'readv 0 2147483136 1', 'readv 0', 'writev 0 1 -1', 'readv -q 0 0', 'writev 3M 1', 'readv -C 0 1 1'),
    { ...onX('write -s src 0 4', 'write -s empty 0 4', 'write -s ab 0 5', 'read -v 0 8', 'write -s ab -P 1 0 1', 'write -s . 0 1', 'write -s /nonexistent 0 4', 'write -s src 0 0', 'write -s /dev/zero 0 4', 'read -v 0 8'), setup: [X, SRC] },
    onX('discard 0 64k'),
    onX('discard -q 0 64k'),
    onX('discard -C 0 64k'),
    onX('flush'),
    onX('write -P 0x11 0 256k', 'discard 0 64k', 'write -z 64k 64k', 'write -z -u 128k 64k', 'read -P 0 0 192k', 'read -P 0x11 192k 64k'),
    onX('r 0 1', 'w 0 1', 'l', 'i', 'a 0', 'd 0 512', 'f', 'c', 'c'),
    onX('read 0 1 -q', 'read -- 0 1', 'read -P0 -q 0 1', 'read -qP 0 0 1', 'read -P', 'read 0 1 -P', 'read - 1', 'read -q -- -1 1', 'read --x 0 1'),
    onX('write -P 0x10 0 1', 'write -P 1x 0 1', 'write -P 0x 0 1', 'write -P +5 0 1', 'write -P 0377 0 1', 'write -P 0400 0 1', 'read -v 0 1'),
    onX('read -b 1 512', 'read -b 0 1', 'read -b 0 512', 'write -b 0 1', 'write -c 0 1', 'write -z -c 0 512', 'write -c -z 0 512', 'write -b -c 1 1', 'write -f -c 1 1'),
    onX('write -u -n 0 1', 'write -u -P 1 -z 0 1', 'write -z -n 0 3G', 'write -z -n 0 64k', 'write -n 0 3G', 'read -s 8 abc 64', 'read -s 8 0 3G'),
  ],
  pattern: [
    onX('read -P 0xcd 0 64k'),
    { ...onX('write -P 0x41 0 16', 'read -P 0x41 -s 8 -l 16 0 64'), setup: [X] },
    onX('write -P 0x41 0 16', 'read -P 0x41 -s 8 -l 8 0 64'),
    onX('write -P 0x41 0 16', 'read -P 0x41 -l 8 0 64'),
    onX('write -P 0x41 0 16', 'read -P 0x41 -s 4 0 16'),
    onX('read -P 0x41 -s 60 -l 16 0 64'),
    onX('read -P 0x41 -q 0 64'),
    onX('read -P 0x41 -v 0 32'),
    onX('read -s 8 0 64'),
    onX('read -P 256 0 64'),
    onX('read -P xyz 0 64'),
    onX('read -P -1 0 64'),
    onX('write -P 0x1ff 0 64'),
    onX('read -l 8 -P 1 0 4', 'read -P 1 -s 2 0 1', 'read -P 1 -l abc 0 1', 'read -P 1 -s 99999999999999999999 0 1'),
  ],
  hexdump: [
    on(DATA, ['-f', 'raw', 'x.raw', '-c', 'read -v 0 80']),
    on(DATA, ['-f', 'raw', 'x.raw', '-c', 'read -v 3 20']),
    on(DATA, ['-f', 'raw', 'x.raw', '-c', 'read -v -P 0x41 0 16']),
    onX('read -v 0 0'),
    onX('write -P 010 0 1', 'read -v 0 1'),
    onX('write -P 65 0 1', 'read -v 0 1'),
    onX('read -v 0 1', 'read -C -q 0 1', 'read -q -v 0 1'),
    onX('read -C -v 0 16'),
    on(DATA, ['-f', 'raw', 'x.raw', '-c', 'read -v 1048560 16', '-c', 'readv -v 8 8 8']),
  ],
  'map-alloc-length-info': [
    onX('map'),
    onX('write 64k 64k', 'map'),
    on(H, ['-f', 'raw', 'h.raw', '-c', 'map']),
    on(H, ['-f', 'file', 'h.raw', '-c', 'map']),
    on(H, ['-f', 'raw', 'h.raw', '-c', 'alloc 0 64k', '-c', 'alloc 64k 64k', '-c', 'alloc 0', '-c', 'alloc 4M']),
    onX('alloc 0 1M', 'alloc 1M 1', 'alloc 0 2M', 'alloc abc'),
    onX('alloc 8E', 'alloc 0 8E', 'alloc 0x10k', 'alloc 7E 1', 'alloc 1 2 3'),
    onX('length'),
    on([EMPTY], ['-f', 'raw', 'e.raw', '-c', 'map', '-c', 'length', '-c', 'read 0 0', '-c', 'read 0 1']),
    onX('info'),
    on([X], ['-f', 'file', 'x.raw', '-c', 'info']),
    on([X], ['--image-opts', 'driver=raw,file.driver=file,file.filename=x.raw', '-c', 'info']),
    ...[0, 1000, 1536, 5000, 1048576, 1572864, 2000000, 1073741824, 1099511627776].map((n) =>
      on([sparse('l.raw', n)], ['-f', 'raw', 'l.raw', '-c', 'length']),
    ),
    on([sparse('null.raw', 0)], ['json:{"driver":"null-co","size":1048576,"read-zeroes":true}', '-c', 'length', '-c', 'map', '-c', 'read -P 0 0 1k']),
    on([X], ['--image-opts', 'driver=blkdebug,image.driver=raw,image.file.filename=x.raw', '-c', 'map', '-c', 'length']),
  ],
  'open-close-help': [
    on([X], ['-c', 'open -r x.raw', '-c', 'info', '-c', 'read 0 1']),
    on([X], ['-c', 'open -o driver=raw,file.filename=x.raw', '-c', 'length']),
    on([X], ['-c', 'open -o driver=raw x.raw', '-c', 'length']),
    on([X], ['-c', 'open x.raw', '-c', 'info']),
    on([X], ['-c', 'open -f raw x.raw', '-c', 'info']),
    onX('open x.raw'),
    on([X], ['-c', 'open']),
    on([X], ['-c', 'open -r -o driver=raw']),
    on([X], ['-c', 'open -o driver=raw,file.filename=nosuch.raw']),
    onX('close', 'read 0 1'),
    onX('close', 'close'),
    on([X], ['-c', 'read 0 1']),
    onX('quit', 'read 0 1'),
    onX('read 0 1', 'nosuch', 'read 0 1'),
    on([ODD], ['-f', 'raw', 'odd.raw', '-c', 'length', '-c', 'read 999 1', '-c', 'read 1000 24', '-c', 'read 1023 2', '-c', 'write 1000 24']),
    on([X], ['-f', 'raw', 'x.raw'], 'read 0 1\nlength\n'),
    on([X], ['-f', 'raw', 'x.raw'], 'nosuch\nread 0 1\n'),
    on([X], ['-f', 'raw', 'x.raw', '-c', 'length'], 'read 0 1\n'),
    on([], [], '\n'),
    on([X], ['-f', 'raw', 'x.raw'], 'read 0 1\nquit\nlength\n'),
    on([X], ['-f', 'raw', 'x.raw'], 'length'),
    on([X], ['-c', 'help']),
    on([X], ['-c', 'help read']),
    on([X], ['-c', 'help nosuch']),
    on([X], ['-c', 'help read write']),
    on([X], ['-c', 'help ?', '-c', 'help q', '-c', 'help quit', '-c', 'help map', '-c', 'help close', '-c', 'help open', '-c', 'help r']),
    ...['write', 'readv', 'writev', 'discard', 'alloc', 'length', 'info', 'flush', 'truncate', 'sleep'].map((c) => on([], ['-c', `help ${c}`])),
    on([X], ['-c', 'quit 1 2 3']),
    on([X], ['-c', 'map 1', '-c', 'alloc']),
    on([X], ['-f', 'raw', 'x.raw', '-c', 'open -t bogus x.raw']),
    on([X], ['-c', 'open -t bogus x.raw']),
    on([X], ['-c', 'open -d bogus x.raw']),
    on([X], ['-c', 'open -i bogus x.raw']),
    on([X], ['-c', 'open -r -U x.raw', '-c', 'info']),
    on([X], ['-c', 'open -r x.raw y.raw']),
    on([X], ['-c', 'open -o driver=raw,file.filename=x.raw x.raw']),
    on([X], ['-c', 'open -o driver=raw -o file.filename=x.raw', '-c', 'length']),
    on([X], ['--image-opts', '-c', 'open -o driver=raw']),
    on([X], ['--image-opts', '-c', 'open driver=raw,file.filename=x.raw', '-c', 'length']),
    on([X], ['-c', 'open -r -o nofoo,driver=raw x.raw']),
    on([X], ['-c', 'open -r -o id=x,driver=raw x.raw', '-c', 'length']),
    on([X], ['-c', 'open -r -o =x x.raw']),
    on([X], ['-c', 'open -o bogus x.raw']),
    on([X], ['-c', 'open -r -o driver=raw, x.raw', '-c', 'length']),
    on([X], ['-c', 'open -r', '-c', 'open -r -o file.filename=x.raw', '-c', 'info']),
    on([X], ['-c', 'open -o file.filename=x.raw', '-c', 'info']),
    on([X], ['-c', 'open -r -o driver=file,filename=x.raw', '-c', 'info']),
    on([X], ['-c', 'open -r -o driver=raw,file.filename=x.raw,file.driver=bogus']),
    on([X], ['-c', 'o -r x.raw', '-c', 'c', '-c', 'o -r x.raw', '-c', 'l']),
  ],
  'command-errors': [
    onX('read abc 1'),
    onX('write 0 1x'),
    onX('write 0x 1'),
    onX('read 0 1.5'),
    onX('read 0 -1'),
    onX('read -1 1'),
    onX('read -x 0 1'),
    onX('write -Z 0 1'),
    onX('read 0 99999999999999999999'),
    onX('read 0 16E'),
    onX('read 8E 1'),
    onX('read 0 3G'),
    onX('read 0 2147483137'),
    onX('write -z 0 3G'),
    onX('discard 0 3G'),
    onX('read 0'),
    onX('read'),
    onX('read 0 1 2'),
    onX('discard 0'),
    onX('length 1'),
    onX('nosuch 0 1'),
    onX(''),
    onX('  read   0   1  '),
    onX('write -n 0 64k'),
    onX('write -u 0 64k'),
    onX('write -z -P 1 0 64k'),
    onX('write -c 0 64k'),
    onX('write -b 0 64k'),
    onX('read -b 0 512'),
    onX('read 1M 1'),
    onX('read 1048575 2'),
    onX('write 1M 1'),
    onX('write -z 1048575 2'),
    onX('discard 1048575 2'),
    onX('discard 0 2M'),
    onX('read 7E 1'),
    onX('read 0 2147483136'),
    onX('read\t0 1'),
    onX('sleep 10', 'sleep abc', 'sleep -1', 'sleep 0x10', 'sleep 010', 'sleep 1x'),
    onX('truncate -m metadata 4M', 'truncate -m full 3M', 'length', 'truncate -m falloc 1M', 'truncate 8E', 'length', 'truncate 1 2 3', 'length'),
    onX('truncate 7E'),
    onX('truncate 2M', 'length', 'truncate -m bogus 1M', 'truncate abc', 'truncate -x 1', 'truncate -m off abc', 'truncate -m', 'truncate 1000', 'length', 'truncate 0x10k', 'length'),
  ],
  'modes': [
    on([X], ['-r', '-f', 'raw', 'x.raw', '-c', 'write 0 1']),
    on([X], ['-r', '-f', 'raw', 'x.raw', '-c', 'write -z 0 1']),
    on([X], ['-r', '-f', 'raw', 'x.raw', '-c', 'discard 0 64k']),
    on([X], ['-r', '-f', 'raw', 'x.raw', '-c', 'read 0 1']),
    on([X], ['-r', '-f', 'raw', 'x.raw', '-c', 'writev 0 1', '-c', 'truncate 0', '-c', 'flush', '-c', 'info']),
    on([X], ['-f', 'raw', '-t', 'writeback', 'x.raw', '-c', 'write 0 64k', '-c', 'flush']),
    on([X], ['-f', 'raw', '-t', 'none', 'x.raw', '-c', 'write 0 64k', '-c', 'read -v 0 16']),
    on([X], ['-f', 'raw', '-t', 'none', 'x.raw', '-c', 'write 0 1000']),
    on([X], ['-f', 'raw', '-t', 'none', 'x.raw', '-c', 'read 1 512']),
    on([X], ['-f', 'raw', '-n', 'x.raw', '-c', 'write 0 64k']),
    on([X], ['-f', 'raw', '-t', 'unsafe', 'x.raw', '-c', 'write 0 4k']),
    on([X], ['-f', 'raw', '-t', 'writethrough', 'x.raw', '-c', 'write 0 4k']),
    on([X], ['-f', 'raw', '-t', 'directsync', 'x.raw', '-c', 'write 0 4k']),
    on([X], ['-f', 'raw', '-t', 'bogus', 'x.raw', '-c', 'read 0 1']),
    on([X], ['-f', 'raw', '-d', 'bogus', 'x.raw', '-c', 'read 0 1']),
    on([X], ['-f', 'raw', '-i', 'bogus', 'x.raw', '-c', 'read 0 1']),
    on([X], ['-k', '-f', 'raw', 'x.raw', '-c', 'length']),
    on([X], ['-i', 'native', '-f', 'raw', 'x.raw', '-c', 'length']),
    on([X], ['-i', 'io_uring', '-f', 'raw', 'x.raw', '-c', 'length']),
    on([X], ['-C', '-f', 'raw', 'x.raw', '-c', 'read 0 1']),
    on([X], ['-d', 'ignore', '-f', 'raw', 'x.raw', '-c', 'write -P 1 0 64k', '-c', 'discard 0 4k', '-c', 'read -P 1 0 4k']),
    on([X], ['-d', 'off', '-f', 'raw', 'x.raw', '-c', 'write -P 1 0 64k', '-c', 'write -z -u 0 4k', '-c', 'read -P 0 0 4k']),
    on([X], ['-d', 'on', '-f', 'raw', 'x.raw', '-c', 'length']),
    on([X], ['-d', 'unmap', '-f', 'raw', 'x.raw', '-c', 'length']),
  ],
  opening: [
    on([X], ['-c', 'read 0 1', 'x.raw']),
    on([X], ['-c', 'write 0 1', 'x.raw']),
    on([X], ['-r', '-d', 'unmap', 'x.raw', '-c', 'info']),
    on([X], ['--image-opts', 'driver=raw,file.filename=x.raw', '-c', 'read 0 1']),
    on([X], ['--image-opts', 'x.raw', '-c', 'read 0 1']),
    on([X], ['--image-opts', '-f', 'raw', 'driver=raw,file.filename=x.raw', '-c', 'read 0 1']),
    on([X], ['--image-opts', 'driver=raw,file.filename=nosuch.raw', '-c', 'read 0 1']),
    on([X], ['--image-opts', 'driver=raw,file.filename=x.raw,bogus=1', '-c', 'read 0 1']),
    on([X], ['--image-opts', 'driver=raw,file.filename=x.raw,file.filename=nosuch', '-c', 'length']),
    on([X], ['--image-opts', 'file.filename=x.raw', '-c', 'length']),
    on([X], ['--image-opts', 'driver=raw,file.filename=x.raw,', '-c', 'length']),
    on([X], ['-c', 'read 0 1', 'nosuch.raw']),
    on([X], ['-f', 'raw', '-c', 'read 0 1', 'nosuch.raw']),
    on([X], ['-f', 'nosuch', '-c', 'read 0 1', 'x.raw']),
    on([X, DIR], ['-f', 'raw', '-c', 'read 0 1', '-c', 'read 0 1', 'd']),
    on([X, DIR], ['-r', '-f', 'raw', 'd', '-c', 'read 0 1']),
    on([X], ['-U', '-f', 'raw', 'x.raw', '-c', 'read 0 1']),
    on([X], ['-U', '-r', '-f', 'raw', 'x.raw', '-c', 'read 0 1']),
    on([X], ['json:{"driver":"raw","file":{"driver":"file","filename":"x.raw"}}', '-c', 'length']),
    on([X], ['-f', 'raw', 'json:{"file":{"driver":"file","filename":"x.raw"}}', '-c', 'length']),
    on([X], ['-r', 'json:{"file":{"driver":"file","filename":"x.raw"}}', '-c', 'length']),
    on([X], ['--image-opts', 'json:{"driver":"raw"}']),
  ],
  'aio-debug': [
    onX('aio_write -P 0x22 0 4k', 'aio_flush', 'aio_read -P 0x22 0 4k', 'aio_flush', 'aio_read -P 0x23 0 4k', 'aio_flush', 'aio_read -v 0 16'),
    onX('aio_write 2M 1', 'aio_flush', 'aio_read 2M 1', 'aio_flush', 'aio_read 0 3G', 'aio_read 0 abc', 'aio_read 0', 'aio_read -x'),
    onX('aio_read -i 0 1', 'aio_write -i 0 1', 'aio_read -P 1 -i 0', 'aio_write -u 0 1', 'aio_write -z 0 1 2', 'aio_read -q -C 0 1', 'aio_flush 1'),
    onX('aio_write -C 0 1', 'aio_flush', 'aio_write -f -q 0 1', 'aio_write 0 512 512', 'aio_flush', 'read -P 0xcd 0 1k'),
    onX('aio_write -P 7 0 64k'),
    onX('aio_write -P 7 0 64k', 'close'),
    on([X], ['-r', '-f', 'raw', 'x.raw', '-c', 'aio_write 0 64k']),
    onX('break write_aio A', 'remove_break A', 'resume A', 'sigraise 99', 'sigraise abc', 'sigraise 0', 'length'),
    onX('sigraise 15', 'length'),
    onX('abort', 'length'),
    on([], ['-c', 'abort']),
    on([], ['-c', 'sigraise 9']),
    on([], ['-c', 'break a b', '-c', 'wait_break']),
  ],
  'option-errors': [
    on([X], ['-f', 'raw', 'x.raw', '-q']),
    on([X], ['--bogus', '-f', 'raw', 'x.raw']),
    on([], ['-h']),
    on([], ['-f']),
    on([X], ['-f', 'raw', '-c', 'read 0 1', 'x.raw', 'extra']),
    on([], ['-Z']),
    on([], ['--help=x']),
    on([], ['--format']),
    on([], ['--form']),
    on([X], ['--c', 'x.raw']),
    on([X], ['--cmd=length', '-f', 'raw', 'x.raw']),
    on([X], ['--for', 'raw', 'x.raw', '-c', 'length']),
    on([X], ['--read', '-f', 'raw', 'x.raw', '-c', 'info']),
    on([X], ['-fraw', 'x.raw', '-clength']),
    on([X], ['-rU', '-f', 'raw', 'x.raw', '-c', 'length']),
    on([], ['--', '-f']),
    on([X], ['-f', 'raw', '--', 'x.raw', '-c', 'length']),
    on([X], ['x.raw', '-f', 'raw', '-c', 'length']),
    on([X], ['-h', '-Z']),
    on([X], ['-Z', '-h']),
  ],
};

/**
 * Cases where qemu-io-ts is known to differ, with the reason; the test checks
 * they still differ, so a fix shows up as a failure asking to drop the entry.
 */
const KNOWN_DIFFERENCES: Record<string, string> = {
  "qemu-io -f raw x.raw -c 'truncate 7E'":
    'block/io.ts refuses lengths past MAX_LENGTH_BYTES (2^53 - 2^30: "Required too big image size"); QEMU\'s limit is near 2^63, so 7 EiB reaches ftruncate: "Could not resize file: File too large"',
  "qemu-io -c help": 'no `reopen` command: the block graph has no reopen (bdrv_reopen) to build it on',
  "qemu-io -c 'open -o bogus x.raw'":
    "the graph checks a format's options before its driver opens, so raw never prints the probing WARNING; QEMU opens raw first (warning) and refuses the left-over option after",
};

// ---------------------------------------------------------------- running and comparing

/** Masks the timings of statistics lines (the byte counts stay). */
export function maskTimings(text: string): string {
  return text
    .replace(/^(.*, \d+ ops; )(?:\d\d\.\d\d sec|\d+:\d\d:\d\d\.\d\d) \(.*\/sec and .* ops\/sec\)$/gm, '$1TIME (RATE/sec and RATE ops/sec)')
    .replace(/^(\d+,\d+),\d+:\d\d:\d\d\.\d\d,[^,]+,[^,]+$/gm, '$1,TIME,RATE,RATE');
}

function prepare(setup: Setup[], root: string, name: string): string {
  const dir = fs.mkdtempSync(path.join(root, `${name}-`));
  for (const s of setup) s(dir);
  return dir;
}

/** Bytes of each file the snapshot digests (fixtures may be huge sparse files). */
const SNAPSHOT_DIGEST_BYTES = 64 * MiB;

/** Every regular file in `dir`: its size and a digest of its first bytes. */
function snapshot(dir: string): Record<string, string> {
  const out: Record<string, string> = {};
  for (const entry of fs.readdirSync(dir, { withFileTypes: true })) {
    if (!entry.isFile()) continue;
    const file = path.join(dir, entry.name);
    const size = fs.statSync(file).size;
    const data = Buffer.alloc(Math.min(size, SNAPSHOT_DIGEST_BYTES));
    const fd = fs.openSync(file, 'r');
    fs.readSync(fd, data, 0, data.length, 0);
    fs.closeSync(fd);
    out[entry.name] = `${size}:${crypto.createHash('sha256').update(data).digest('hex').slice(0, 16)}`;
  }
  return out;
}

function masked(r: RunResult) {
  return { stdout: maskTimings(r.stdout), stderr: maskTimings(r.stderr), code: r.code };
}

function shellQuote(arg: string): string {
  return /^[\w@%+=:,./-]+$/.test(arg) ? arg : `'${arg.replace(/'/g, `'\\''`)}'`;
}

/** A case as the notes write transcripts. */
function transcript(c: IoCase, r: RunResult): string {
  const m = masked(r);
  const input = c.input === undefined ? '' : `printf ${shellQuote(c.input.replace(/\n/g, '\\n'))} | `;
  let out = `$ ${input}qemu-io ${c.args.map(shellQuote).join(' ')}\n`;
  if (m.stdout) out += `--- stdout\n${m.stdout}${m.stdout.endsWith('\n') ? '' : '<no trailing newline>\n'}`;
  if (m.stderr) out += `--- stderr\n${m.stderr}`;
  return `${out}--- exit ${m.code}\n`;
}

async function inPool<T, R>(items: readonly T[], limit: number, fn: (item: T) => Promise<R>): Promise<R[]> {
  const results: R[] = new Array(items.length);
  let next = 0;
  const worker = async () => {
    while (next < items.length) {
      const i = next++;
      results[i] = await fn(items[i]!);
    }
  };
  await Promise.all(Array.from({ length: Math.min(limit, items.length) }, worker));
  return results;
}

const root = scratchDir('qemu-io-');
const runOpts = (cwd: string, c: IoCase) => (c.input === undefined ? { cwd } : { cwd, input: c.input });

/**
 * Runs a tool through sh so a death by signal (abort, sigraise) shows as the
 * shell's 128+N exit status rather than the helper's bare 128.
 */
function runViaShell(cmd: string, args: string[], opts: { cwd: string; input?: string }): Promise<RunResult> {
  return run('sh', ['-c', '"$@"; exit $?', 'sh', cmd, ...args], opts);
}
const OUR_BIN = path.join(ROOT, 'dist/bin/qemu-io-ts.mjs');
const runQemuIo = (c: IoCase, cwd: string) => runViaShell('qemu-io', c.args, runOpts(cwd, c));
const runQemuIoTs = (c: IoCase, cwd: string) => runViaShell(process.execPath, [OUR_BIN, ...c.args], runOpts(cwd, c));

// ---------------------------------------------------------------- golden transcripts (ours only)

describe('qemu-io-ts golden transcripts', () => {
  for (const [section, cases] of Object.entries(SECTIONS)) {
    it(`${section} matches test/golden/qemu-io/${section}.txt`, async () => {
      const texts = await inPool(cases, RUNS_IN_FLIGHT, async (c) => {
        const dir = prepare(c.setup, root, 'golden');
        return transcript(c, await runQemuIoTs(c, dir));
      });
      const text = texts.join('\n');
      const file = path.join(GOLDEN_DIR, `${section}.txt`);
      if (UPDATE_GOLDEN) {
        fs.mkdirSync(GOLDEN_DIR, { recursive: true });
        fs.writeFileSync(file, text);
      }
      expect(text).toBe(fs.readFileSync(file, 'utf8'));
    });
  }
});

// ---------------------------------------------------------------- against qemu-io

describe.skipIf(missingPeers('qemu-io', 'qemu-img'))('qemu-io-ts against qemu-io 7.2', () => {
  for (const [section, cases] of Object.entries(SECTIONS)) {
    describe(section, () => {
      it.concurrent.each(cases.map((c, i) => [`${i}: ${transcriptTitle(c)}`, c] as const))('%s', async (title, c) => {
        const theirs = prepare(c.setup, root, 'qemu');
        const ours = prepare(c.setup, root, 'ours');
        const [q, o] = await Promise.all([runQemuIo(c, theirs), runQemuIoTs(c, ours)]);
        const known = KNOWN_DIFFERENCES[title.slice(title.indexOf(': ') + 2)];
        if (known) {
          expect(transcript(c, o), `known difference fixed? remove it from KNOWN_DIFFERENCES: ${known}`).not.toBe(transcript(c, q));
          return;
        }
        expect(transcript(c, o)).toBe(transcript(c, q));
        expect(snapshot(ours)).toEqual(snapshot(theirs));
      });
    });
  }

  it('(a) patterns written by qemu-io-ts verify in qemu-io, and the other way round', async () => {
    const dir = prepare([X], root, 'pattern');
    const writes = ['write -P 0x5a 0 64k', 'write -P 0xa5 1000 3000', 'writev -P 0x33 128k 512 4k', 'write -z 4k 4k', 'write -P 0x77 1048575 1'];
    const reads = ['read -P 0x5a 0 1000', 'read -P 0xa5 1000 3000', 'read -P 0x5a 4000 96', 'read -P 0 4k 4k', 'read -P 0x5a 8k 56k', 'read -P 0x33 128k 4608', 'read -P 0x77 1048575 1'];
    const cmds = (list: string[]) => list.flatMap((c) => ['-c', c]);
    const wrote = await runOurs('qemu-io-ts', ['-f', 'raw', 'x.raw', ...cmds(writes)], { cwd: dir });
    expect(wrote.code).toBe(0);
    const verified = await run('qemu-io', ['-f', 'raw', 'x.raw', ...cmds(reads)], { cwd: dir });
    expect(verified.stdout).not.toContain('Pattern verification failed');
    expect(verified.code).toBe(0);
    const dir2 = prepare([X], root, 'pattern2');
    expect((await run('qemu-io', ['-f', 'raw', 'x.raw', ...cmds(writes)], { cwd: dir2 })).code).toBe(0);
    const back = await runOurs('qemu-io-ts', ['-f', 'raw', 'x.raw', ...cmds(reads), '-c', 'read -P 0x5a 0 64k'], { cwd: dir2 });
    expect(back.stdout.match(/Pattern verification failed.*/g)).toEqual(['Pattern verification failed at offset 0, 65536 bytes']);
    expect(back.code).toBe(1);
  });

  it('(c) discard punches a hole that qemu-img map shows', async () => {
    const dir = prepare([X], root, 'discard');
    const r = await runOurs('qemu-io-ts', ['-f', 'raw', 'x.raw', '-c', 'write -P 0x11 0 256k', '-c', 'discard 0 64k'], { cwd: dir });
    expect(r.code).toBe(0);
    const map = JSON.parse((await run('qemu-img', ['map', '-f', 'raw', '--output=json', 'x.raw'], { cwd: dir })).stdout);
    expect(map[0]).toMatchObject({ start: 0, length: 65536, zero: true, data: false });
    expect(map[1]).toMatchObject({ start: 65536, length: 196608, zero: false, data: true });
  });

  it('(d) write -z, -z -u and -f read back and allocate as with qemu-io', async () => {
    const script = ['write -P 0x11 0 256k', 'write -z 0 64k', 'write -z -u 64k 64k', 'write -f -P 0x22 128k 64k', 'write -z -u 250k 6k'];
    const check = ['read -P 0 0 128k', 'read -P 0x22 128k 64k', 'read -P 0x11 192k 58k', 'read -P 0 250k 6k'];
    const results = [];
    for (const tool of ['ours', 'qemu'] as const) {
      const dir = prepare([X], root, `zero-${tool}`);
      const args = ['-f', 'raw', 'x.raw', ...script.flatMap((c) => ['-c', c])];
      const w = tool === 'ours' ? await runOurs('qemu-io-ts', args, { cwd: dir }) : await run('qemu-io', args, { cwd: dir });
      expect(w.code).toBe(0);
      const v = await run('qemu-io', ['-f', 'raw', 'x.raw', ...check.flatMap((c) => ['-c', c])], { cwd: dir });
      expect(v.stdout).not.toContain('Pattern verification failed');
      const map = (await run('qemu-img', ['map', '-f', 'raw', '--output=json', 'x.raw'], { cwd: dir })).stdout;
      results.push({ map, blocks: fs.statSync(path.join(dir, 'x.raw')).blocks });
    }
    expect(results[0]).toEqual(results[1]);
  });
});

function transcriptTitle(c: IoCase): string {
  const input = c.input === undefined ? '' : ` <<< ${JSON.stringify(c.input)}`;
  return `qemu-io ${c.args.map(shellQuote).join(' ')}${input}`;
}
