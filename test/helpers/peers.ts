/*
 * Peer tools (qemu-img, qemu-io, nbdinfo, …) for interop tests.
 *
 * Without REQUIRE_PEERS=1 a test needing a missing peer is skipped with a
 * loud warning; with it (CI) the test runs and fails, because a skipped
 * interop test proves nothing.
 */
import { spawnSync } from 'node:child_process';

export const REQUIRE_PEERS = process.env.REQUIRE_PEERS === '1';

const found = new Map<string, boolean>();

export function hasTool(cmd: string): boolean {
  let ok = found.get(cmd);
  if (ok === undefined) {
    ok = spawnSync('sh', ['-c', `command -v ${cmd}`], { stdio: 'ignore' }).status === 0;
    found.set(cmd, ok);
  }
  return ok;
}

/** True when the tests needing `cmds` should be skipped (never under REQUIRE_PEERS). */
export function missingPeers(...cmds: string[]): boolean {
  const missing = cmds.filter((c) => !hasTool(c));
  if (missing.length === 0 || REQUIRE_PEERS) return false;
  console.warn(`\n*** SKIPPING interop tests: peer tool(s) not installed: ${missing.join(', ')} ***\n*** (set REQUIRE_PEERS=1 to make this a failure)\n`);
  return true;
}
