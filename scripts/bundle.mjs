#!/usr/bin/env node
// Bundles each command-line tool (tsc's output under dist/) into one file
// under dist/bin/, which the package's bins point to: one file instead of
// ~150 modules to resolve, read and compile halves the tools' start-up
// (qemu-img-ts info on a small file: ~0.2 s -> ~0.1 s here). The library
// (dist/index.js) stays unbundled. dist/bin/ sits at the same depth as
// dist/qemu-img-ts/, so paths the code resolves from its own location
// (package.json, the native addon) are the same from either.
//
// Each bundle is CommonJS (NAME.cjs) behind a small ESM launcher (NAME.mjs,
// the bin) that compiles it with a V8 code cache (bin-launcher.mjs): parsing
// and compiling the ~1 MB bundle was the largest part of what start-up
// still cost. The cache is written by a tool's first run, so the build
// makes that first run a typical one (warmUp): the cache then holds what
// convert and qemu-io's read/write need, not just --version.
import { execFileSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { build } from 'esbuild';

const here = path.dirname(fileURLToPath(import.meta.url));
const root = path.resolve(here, '..');
const TOOLS = {
  'qemu-img-ts': 'dist/qemu-img-ts/qemu-img.js',
  'qemu-io-ts': 'dist/qemu-img-ts/qemu-io.js',
  'qemu-nbd-ts': 'dist/qemu-img-ts/qemu-nbd.js',
  'qemu-storage-daemon-ts': 'dist/qemu-img-ts/qemu-storage-daemon.js',
};
const binDir = path.join(root, 'dist', 'bin');

// The sources use import.meta.url (package.json, the native addon); in a
// CommonJS bundle it is the bundle's own file URL.
const banner = "const __importMetaUrl = require('node:url').pathToFileURL(__filename).href;";

// commander requires node:child_process at load, for executable
// subcommands no tool here has; loading it costs ~9 ms of every start. The
// bundle gives commander a stand-in that loads the module on first use.
const lazyChildProcess = {
  name: 'lazy-child-process',
  setup(b) {
    b.onResolve({ filter: /^(node:)?child_process$/ }, (args) =>
      /[\\/]node_modules[\\/]commander[\\/]/.test(args.importer) ? { path: 'child_process', namespace: 'lazy-builtin' } : undefined,
    );
    b.onLoad({ filter: /.*/, namespace: 'lazy-builtin' }, () => ({
      contents: "let loaded; module.exports = new Proxy({}, { get: (_, key) => (loaded ??= require('node:child_process'))[key] });",
      loader: 'js',
    }));
  },
};

fs.mkdirSync(binDir, { recursive: true });
fs.copyFileSync(path.join(here, 'bin-launcher.mjs'), path.join(binDir, 'bin-launcher.mjs'));
for (const [name, entry] of Object.entries(TOOLS)) {
  await build({
    entryPoints: [path.join(root, entry)],
    outfile: path.join(binDir, `${name}.cjs`),
    bundle: true,
    platform: 'node',
    target: 'node20',
    format: 'cjs',
    minifySyntax: true,
    minifyWhitespace: true,
    sourcemap: 'linked',
    banner: { js: banner },
    define: { 'import.meta.url': '__importMetaUrl' },
    logLevel: 'warning',
    plugins: [lazyChildProcess],
  });
  const launcher = path.join(binDir, `${name}.mjs`);
  fs.writeFileSync(
    launcher,
    `#!/usr/bin/env node\nimport { launch } from './bin-launcher.mjs';\nlaunch(new URL('./${name}.cjs', import.meta.url));\n`,
  );
  fs.chmodSync(launcher, 0o755);
  // Stale caches of the previous build are rejected by V8 anyway; drop them.
  for (const f of fs.readdirSync(binDir)) if (f.startsWith(`${name}.cjs.`) && f.endsWith('.v8cache')) fs.rmSync(path.join(binDir, f));
}

/** Runs each tool once on a scratch image so that its code cache covers a typical run. */
function warmUp() {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'bundle-warm-'));
  try {
    const raw = path.join(dir, 'in.raw');
    fs.writeFileSync(raw, Buffer.alloc(1 << 20, 1));
    const tool = (name, args) => execFileSync(process.execPath, [path.join(binDir, `${name}.mjs`), ...args], { stdio: 'ignore' });
    tool('qemu-img-ts', ['convert', '-f', 'raw', '-O', 'qcow2', raw, path.join(dir, 'out.qcow2')]);
    tool('qemu-io-ts', ['-f', 'raw', '-c', 'write -P 7 0 64k', '-c', 'read -P 7 0 64k', raw]);
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
}

warmUp();
