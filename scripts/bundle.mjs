#!/usr/bin/env node
// Bundles each command-line tool (tsc's output under dist/) into one file
// under dist/bin/, which the package's bins point to: one file instead of
// ~150 modules to resolve, read and compile halves the tools' start-up
// (qemu-img-ts info on a small file: ~0.2 s -> ~0.1 s here). The library
// (dist/index.js) stays unbundled. dist/bin/ sits at the same depth as
// dist/qemu-img-ts/, so paths the code resolves from its own location
// (package.json, the native addon) are the same from either.
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { build } from 'esbuild';

const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');
const TOOLS = {
  'qemu-img-ts': 'dist/qemu-img-ts/qemu-img.js',
  'qemu-io-ts': 'dist/qemu-img-ts/qemu-io.js',
};

// commander is CommonJS and requires Node's modules; an ESM bundle gives it a require.
const banner = "import { createRequire as __createRequire } from 'node:module'; const require = __createRequire(import.meta.url);";

for (const [name, entry] of Object.entries(TOOLS)) {
  await build({
    entryPoints: [path.join(root, entry)],
    outfile: path.join(root, 'dist', 'bin', `${name}.mjs`),
    bundle: true,
    platform: 'node',
    target: 'node20',
    format: 'esm',
    minifySyntax: true,
    minifyWhitespace: true,
    sourcemap: 'linked',
    banner: { js: banner },
    logLevel: 'warning',
  });
}
