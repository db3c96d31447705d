/*
 * qemu-img-ts dd against qemu-img 7.2: each case runs the same command line
 * through both tools, each in its own directory holding the same inputs,
 * and requires the same stdout, stderr and exit status; when an output
 * image was made, both outputs must exist, have the same format and
 * virtual size, hold the same content (`qemu-img compare`), and a qcow2
 * output (named *.qcow2) must pass `qemu-img check`. Ours may be sparser:
 * zero ranges of the input are not written to an output that reads as
 * zeroes.
 */
import { execFileSync, spawnSync } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { beforeAll, describe, expect, it } from 'vitest';
import { missingPeers } from '../helpers/peers.js';
import { runBoth } from '../helpers/side-by-side.js';
import { scratchDir } from '../helpers/tmp.js';

const MiB = 1 << 20;
const INPUTS = ['odd.bin', 'sparse.qcow2', 'sparse.raw', 'c4.qcow2', 'overlay.qcow2'];

describe.skipIf(missingPeers('qemu-img', 'qemu-io'))('qemu-img-ts dd against qemu-img 7.2', () => {
  const root = scratchDir('qbt-dd-');
  const inputs = path.join(root, 'inputs');
  const qemuImg = (...args: string[]) => execFileSync('qemu-img', args, { cwd: inputs, encoding: 'utf8' });
  const qemuIo = (fmt: string, name: string, ...commands: string[]) =>
    execFileSync('qemu-io', ['-f', fmt, ...commands.flatMap((c) => ['-c', c]), name], { cwd: inputs, encoding: 'utf8' });
  let caseNumber = 0;

  beforeAll(() => {
    fs.mkdirSync(inputs);
    const odd = Buffer.alloc(MiB - 1000);
    for (let i = 0; i < odd.length; i++) odd[i] = (i * 31 + 7) & 0xff;
    fs.writeFileSync(path.join(inputs, 'odd.bin'), odd);
    qemuImg('create', '-q', '-f', 'qcow2', 'sparse.qcow2', '64M');
    qemuIo('qcow2', 'sparse.qcow2', 'write -P 7 1M 1M', 'write -P 9 40M 512k', 'write -z 50M 1M');
    qemuImg('create', '-q', '-f', 'raw', 'sparse.raw', '8M');
    qemuIo('raw', 'sparse.raw', 'write -P 5 3M 100k');
    qemuImg('create', '-q', '-f', 'qcow2', '-o', 'cluster_size=4k', 'c4.qcow2', '3M');
    qemuIo('qcow2', 'c4.qcow2', 'write -P 1 1000 5000', 'write -P 2 2M 300k');
    qemuImg('create', '-q', '-f', 'qcow2', '-b', 'c4.qcow2', '-F', 'qcow2', 'overlay.qcow2');
    qemuIo('qcow2', 'overlay.qcow2', 'write -P 4 2100k 64k');
  });

  /** A directory per tool with the inputs (hard links: dd only reads them). */
  const caseDirs = () => {
    const base = path.join(root, String(++caseNumber));
    const dirs = { theirs: path.join(base, 'theirs'), ours: path.join(base, 'ours') };
    for (const d of Object.values(dirs)) {
      fs.mkdirSync(d, { recursive: true });
      for (const f of INPUTS) fs.linkSync(path.join(inputs, f), path.join(d, f));
    }
    return dirs;
  };

  const info = (file: string) => {
    const j = JSON.parse(execFileSync('qemu-img', ['info', '--output=json', file], { encoding: 'utf8' })) as Record<string, unknown>;
    return { format: j.format, size: j['virtual-size'] };
  };

  const expectSameOutput = (theirs: string, ours: string) => {
    expect(fs.existsSync(ours)).toBe(fs.existsSync(theirs));
    if (!fs.existsSync(theirs)) return;
    expect(info(ours)).toEqual(info(theirs));
    const cmp = spawnSync('qemu-img', ['compare', theirs, ours], { encoding: 'utf8' });
    expect(cmp.stdout + cmp.stderr).toBe('Images are identical.\n');
    if (ours.endsWith('.qcow2')) expect(spawnSync('qemu-img', ['check', '-f', 'qcow2', ours]).status).toBe(0);
  };

  /** Runs dd in both directories; `output` is the image both should (or should not) have made. */
  const expectSame = async (args: string[], output?: string) => {
    const dirs = caseDirs();
    const { theirs, ours } = await runBoth(['dd', ...args], dirs);
    expect(ours).toEqual(theirs);
    if (output) expectSameOutput(path.join(dirs.theirs, output), path.join(dirs.ours, output));
  };

  const COPIES: Array<[string[], string]> = [
    [['if=odd.bin', 'of=out.raw'], 'out.raw'],
    [['-O', 'qcow2', 'if=odd.bin', 'of=out.qcow2', 'bs=4k', 'count=10', 'skip=3'], 'out.qcow2'],
    [['-O', 'qcow2', 'if=sparse.qcow2', 'of=out.qcow2'], 'out.qcow2'],
    [['if=sparse.qcow2', 'of=out.raw', 'bs=1M', 'skip=1', 'count=45'], 'out.raw'],
    [['if=sparse.raw', 'of=out.raw', 'bs=1000', 'skip=3'], 'out.raw'],
    [['-f', 'raw', 'if=sparse.qcow2', 'of=out.raw', 'count=100'], 'out.raw'],
    [['if=overlay.qcow2', 'of=out.raw', 'bs=3000', 'skip=100'], 'out.raw'],
    [['-O', 'qcow2', 'if=c4.qcow2', 'of=out.qcow2', 'bs=64k', 'count=40'], 'out.qcow2'],
    [['if=odd.bin', 'of=out.raw', 'count=0'], 'out.raw'],
    [['if=odd.bin', 'of=out.raw', 'bs=3', 'count=5'], 'out.raw'],
    [['if=odd.bin', 'of=out.raw', 'count=9223372036854775807', 'bs=4'], 'out.raw'],
    [['if=odd.bin', 'of=out.raw', 'skip=1000000'], 'out.raw'],
    [['if=odd.bin', 'of=out.raw', 'skip=2046'], 'out.raw'],
    [['if=odd.bin', 'of=out.raw', 'skip=2047'], 'out.raw'],
    [['if=odd.bin', 'of=out.raw', 'skip=9223372036854775807', 'bs=4'], 'out.raw'],
    [['if=odd.bin', 'of=first.raw', 'of=out.raw', 'if=sparse.raw'], 'out.raw'],
    [['if=odd.bin', 'of=out.raw', 'count=0x10'], 'out.raw'],
    [['-O', 'file', 'if=odd.bin', 'of=out.raw'], 'out.raw'],
    [['--image-opts', 'if=driver=raw,file.filename=odd.bin', 'of=out.raw'], 'out.raw'],
    [['-U', 'if=odd.bin', 'of=out.qcow2', '-O', 'qcow2'], 'out.qcow2'],
  ];
  for (const [args, output] of COPIES) it(`dd ${args.join(' ')}`, () => expectSame(args, output));

  const ERRORS: Array<[string[], string?]> = [
    [[]],
    [['if=odd.bin']],
    [['of=x'], 'x'],
    [['foo']],
    [['foo=bar', 'if=x']],
    [['if=odd.bin', 'of=out.raw', 'bs=0'], 'out.raw'],
    [['if=odd.bin', 'of=out.raw', 'bs=2G'], 'out.raw'],
    [['if=odd.bin', 'of=out.raw', 'bs=1x'], 'out.raw'],
    [['if=odd.bin', 'of=out.raw', 'count=-1'], 'out.raw'],
    [['if=odd.bin', 'of=out.raw', 'bs=9223372036854775807'], 'out.raw'],
    [['if=odd.bin', 'of=out.raw', '=x'], 'out.raw'],
    [['if=odd.bin', 'of=out.raw', 'if'], 'out.raw'],
    [['if=nonexistent', 'of=out.raw'], 'out.raw'],
    [['-O', 'foo', 'if=odd.bin', 'of=out.raw'], 'out.raw'],
    [['-O', 'null-co', 'if=odd.bin', 'of=out.raw'], 'out.raw'],
    [['if=odd.bin', 'of=nonexistent-dir/out.raw']],
    [['if=odd.bin', 'of=foo:bar']],
    [['-f', 'qcow2', 'if=odd.bin', 'of=out.raw'], 'out.raw'],
    [['--image-opts', '-f', 'raw', 'if=odd.bin', 'of=out.raw'], 'out.raw'],
    [['-X']],
    [['-f']],
    [['--object', 'foo,id=x', 'if=odd.bin', 'of=out.raw'], 'out.raw'],
  ];
  for (const [args, output] of ERRORS) it(`dd ${args.join(' ')} (error)`, () => expectSame(args, output));
});
