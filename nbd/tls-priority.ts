/*
 * The `priority` property of TLS credentials: a GnuTLS priority string
 * (gnutls_priority_init), which QEMU hands to GnuTLS as is ("NORMAL" by
 * default; PSK and anon credentials append their key exchanges). We run
 * OpenSSL, so only the part that has an OpenSSL equivalent is honoured:
 *
 *   - the protocol versions: `+VERS-TLS1.2`, `-VERS-TLS1.3`, `-VERS-ALL`,
 *     `-VERS-TLS-ALL`, `+VERS-TLS-ALL` (and `!` for `-`) on top of the
 *     initial keyword, which enables every version except `NONE`. The
 *     result is clamped to TLS 1.2 and later (the NBD spec's minimum and
 *     node's); QEMU's iotests use exactly this to force TLS 1.2.
 *   - the initial keyword must be one GnuTLS knows (NORMAL, PERFORMANCE,
 *     SECURE128, …, NONE, or an @system keyword), else the session fails
 *     as QEMU's does ("… The request is invalid.").
 *
 * Cipher, key-exchange, MAC, group and signature tokens are accepted and
 * leave OpenSSL's defaults in place.
 */
import type tls from 'node:tls';

const KEYWORDS = ['NORMAL', 'PFS', 'PERFORMANCE', 'SECURE128', 'SECURE192', 'SECURE256', 'SUITEB128', 'SUITEB192', 'LEGACY', 'NONE'];
const VERSIONS: readonly tls.SecureVersion[] = ['TLSv1', 'TLSv1.1', 'TLSv1.2', 'TLSv1.3'];
const VERSION_TOKENS: Record<string, number> = { 'VERS-TLS1.0': 0, 'VERS-TLS1.1': 1, 'VERS-TLS1.2': 2, 'VERS-TLS1.3': 3 };
/** The oldest version we negotiate (index into VERSIONS): TLS 1.2. */
const MIN_VERSION_INDEX = 2;

export type VersionRange = { ok: true; minVersion: tls.SecureVersion; maxVersion: tls.SecureVersion } | { ok: false; reason: string };

/** GnuTLS's text for an unusable priority string. */
export const PRIORITY_INVALID = 'The request is invalid.';
export const PRIORITY_NO_VERSIONS = 'No or insufficient priorities were set.';

/** The TLS versions a priority string allows (undefined: QEMU's default, NORMAL). */
export function priorityVersions(priority: string | undefined): VersionRange {
  const tokens = (priority ?? 'NORMAL').split(':');
  const first = tokens[0]!;
  if (!first.startsWith('@') && !KEYWORDS.includes(first)) return { ok: false, reason: PRIORITY_INVALID };
  const enabled = VERSIONS.map(() => first !== 'NONE');
  for (const token of tokens.slice(1)) {
    const sign = token[0];
    if (sign !== '+' && sign !== '-' && sign !== '!') continue;
    const name = token.slice(1);
    const on = sign === '+';
    if (name === 'VERS-ALL' || name === 'VERS-TLS-ALL') enabled.fill(on);
    else if (VERSION_TOKENS[name] !== undefined) enabled[VERSION_TOKENS[name]!] = on;
  }
  const usable = enabled.map((on, i) => on && i >= MIN_VERSION_INDEX);
  const lo = usable.indexOf(true);
  const hi = usable.lastIndexOf(true);
  if (lo < 0) return { ok: false, reason: PRIORITY_NO_VERSIONS };
  return { ok: true, minVersion: VERSIONS[lo]!, maxVersion: VERSIONS[hi]! };
}
