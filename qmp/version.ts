/*
 * What the daemon says about its version: the greeting's and query-version's
 * {"qemu": {major, minor, micro}, "package"} (QEMU's VersionInfo) and the
 * -V text. We speak QEMU 7.2's QMP; micro 0 and the package string say
 * which build this is.
 */
import fs from 'node:fs';

/** The QEMU release whose behaviour we follow. */
export const QEMU_VERSION = { major: 7, minor: 2, micro: 0 } as const;

export function packageVersion(): string {
  try {
    const pkg = JSON.parse(fs.readFileSync(new URL('../../package.json', import.meta.url), 'utf8')) as { version?: string };
    return pkg.version ?? 'unknown';
  } catch {
    return 'unknown';
  }
}

/** QAPI VersionInfo, members in QEMU's order. */
export function versionInfo(): { qemu: { micro: number; minor: number; major: number }; package: string } {
  return { qemu: { micro: QEMU_VERSION.micro, minor: QEMU_VERSION.minor, major: QEMU_VERSION.major }, package: `qemu-block-ts ${packageVersion()}` };
}
