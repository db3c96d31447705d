/*
 * Finds and loads the optional N-API addon (build/Release/hostio.node, from
 * native/hostio.c and native/sender.c), once per process.
 *
 * Two layers use it: the file driver's host operations
 * (drivers/file/host-io.ts) and the NBD server's socket sender
 * (nbd/socket-sender.ts). Each checks for the functions it needs and falls
 * back to plain Node when they are missing, so this module only locates the
 * library: walk up from this file to the package root (the package.json
 * naming this package), require build/Release/hostio.node there.
 *
 * null when the addon was not built (the install script warned), fails to
 * load (a warning is emitted), or QEMU_BLOCK_TS_NO_NATIVE=1 was set when it
 * was first asked for (tests of the fallback paths, a misbehaving host).
 */
import fs from 'node:fs';
import { createRequire } from 'node:module';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

const PACKAGE_NAME = 'qemu-block-ts';
const ADDON_PATH_IN_PACKAGE = path.join('build', 'Release', 'hostio.node');
/** Directories walked up from this file; dist/block needs 2. */
const PACKAGE_ROOT_SEARCH_DEPTH_MAX = 8;
const NO_NATIVE_ENV = 'QEMU_BLOCK_TS_NO_NATIVE';

/** Nearest ancestor of `startDir` whose package.json names this package. */
function findPackageRoot(startDir: string): string | null {
  let dir = startDir;
  for (let depth = 0; depth < PACKAGE_ROOT_SEARCH_DEPTH_MAX; depth++) {
    try {
      const manifest = JSON.parse(fs.readFileSync(path.join(dir, 'package.json'), 'utf8')) as { name?: unknown };
      if (manifest.name === PACKAGE_NAME) return dir;
    } catch {
      // no (readable) package.json here; keep walking up
    }
    const parent = path.dirname(dir);
    if (parent === dir) return null;
    dir = parent;
  }
  return null;
}

/** Where the addon would be, or null outside the package. */
export function nativeAddonPath(): string | null {
  const root = findPackageRoot(path.dirname(fileURLToPath(import.meta.url)));
  return root === null ? null : path.join(root, ADDON_PATH_IN_PACKAGE);
}

function tryLoad(): Record<string, unknown> | null {
  if (process.env[NO_NATIVE_ENV] === '1') return null;
  const addonPath = nativeAddonPath();
  if (addonPath === null || !fs.existsSync(addonPath)) return null;
  try {
    const addon: unknown = createRequire(import.meta.url)(addonPath);
    if (typeof addon === 'object' && addon !== null) return addon as Record<string, unknown>;
  } catch (e) {
    process.emitWarning(`${addonPath} failed to load (${(e as Error).message}); using plain I/O`, 'HostIoWarning');
  }
  return null;
}

let loaded: Record<string, unknown> | null | undefined;

/** The addon's exports, or null (see above). */
export function nativeAddon(): Record<string, unknown> | null {
  if (loaded === undefined) loaded = tryLoad();
  return loaded;
}

/** Whether `addon` has every function named. */
export function hasFunctions(addon: Record<string, unknown> | null, names: readonly string[]): boolean {
  return addon !== null && names.every((f) => typeof addon[f] === 'function');
}
