#!/usr/bin/env node
// The README's demo: create a raw image, write to it with qemu-io-ts and the
// library, then show `qemu-img-ts info` and `qemu-img-ts map`. Runs in a
// temporary directory that is removed at the end.
import { spawnSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');
const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'qemu-block-ts-demo-'));
const image = path.join(dir, 'disk.raw');

function tool(name, args) {
  const bin = path.join(root, 'dist', 'bin', `${name}-ts.mjs`);
  console.log(`\n$ ${name}-ts ${args.map((a) => (/\s/.test(a) ? `'${a}'` : a)).join(' ')}`);
  const r = spawnSync(process.execPath, [bin, ...args], { cwd: dir, encoding: 'utf8' });
  process.stdout.write(r.stdout);
  process.stderr.write(r.stderr);
  if (r.status !== 0) throw new Error(`${name}-ts exited with ${r.status}`);
}

try {
  tool('qemu-img', ['create', '-f', 'raw', 'disk.raw', '64M']);
  tool('qemu-io', ['-f', 'raw', '-c', 'write -P 0xab 0 1M', '-c', 'write -P 0xcd 32M 64k', '-c', 'read -P 0xab 0 1M', 'disk.raw']);

  console.log('\n# the same image through the library (import { openImage } from "qemu-block-ts")');
  const { openImage } = await import(path.join(root, 'dist', 'index.js'));
  const img = await openImage(image, { format: 'raw', discard: 'unmap' });
  await img.write(16 << 20, new Uint8Array(4096).fill(0x5a));
  await img.discard(0, 512 << 10);
  for await (const e of img.extents()) console.log(JSON.stringify(e));
  await img.close();

  tool('qemu-img', ['info', 'disk.raw']);
  tool('qemu-img', ['map', '--output=json', '-f', 'raw', 'disk.raw']);
} finally {
  fs.rmSync(dir, { recursive: true, force: true });
}
