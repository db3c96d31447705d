/*
 * Authorization objects (QEMU's authz/): given an identity — the client
 * certificate's distinguished name for x509 TLS — say whether it may
 * connect.
 *
 *   authz-simple     identity=NAME: exactly that identity is allowed.
 *   authz-list       policy=allow|deny (default deny) and rules, each
 *                    {match, policy, format=exact|glob (default exact)};
 *                    the first matching rule decides, else the policy.
 *                    Globs are GLib's g_pattern_match_simple: `*` any run
 *                    of characters, `?` one character, no escapes.
 *   authz-list-file  filename=FILE holding an authz-list as JSON
 *                    ({"policy": …, "rules": […]}); refresh (default on)
 *                    re-reads it when it changes. QEMU watches with
 *                    inotify; we compare the file's identity and mtime at
 *                    each check, which takes effect at the same moment
 *                    for every later connection and needs no watcher to
 *                    clean up. A reload that fails denies everyone until
 *                    the file is fixed, as QEMU's does (its error is kept
 *                    in `reloadError`).
 *
 * QEMU 7.2 note: its QAPI spells the file type `authz-listfile`, which no
 * QOM class implements, so `--object authz-list-file` cannot be created
 * from its command line at all; the behaviour here is the class's.
 */
import fs from 'node:fs';
import path from 'node:path';
import { BlockError, toBlockError } from '../block/errors.js';
import { propError, Props, type ObjectSpec } from './tls-props.js';

export const AUTHZ_TYPES = ['authz-simple', 'authz-list', 'authz-list-file'] as const;
export type AuthzType = (typeof AUTHZ_TYPES)[number];

export type AuthzPolicy = 'allow' | 'deny';
const POLICIES: readonly AuthzPolicy[] = ['deny', 'allow'];
const FORMATS = ['exact', 'glob'] as const;

export interface AuthzRule {
  match: string;
  policy: AuthzPolicy;
  format: 'exact' | 'glob';
}

/** Any authorization object. */
export abstract class Authz {
  abstract readonly qomType: AuthzType;
  constructor(readonly id: string) {}
  abstract isAllowed(identity: string): boolean;
}

export class AuthzSimple extends Authz {
  readonly qomType = 'authz-simple';
  constructor(
    id: string,
    readonly identity: string,
  ) {
    super(id);
  }

  isAllowed(identity: string): boolean {
    return identity === this.identity;
  }
}

export class AuthzList extends Authz {
  readonly qomType = 'authz-list';
  constructor(
    id: string,
    readonly policy: AuthzPolicy,
    readonly rules: readonly AuthzRule[],
  ) {
    super(id);
  }

  isAllowed(identity: string): boolean {
    for (const rule of this.rules) {
      const hit = rule.format === 'glob' ? globMatch(rule.match, identity) : rule.match === identity;
      if (hit) return rule.policy === 'allow';
    }
    return this.policy === 'allow';
  }
}

/** The file's identity and modification time, to notice replacement and rewrites. */
function fileStamp(filename: string): string | null {
  try {
    const st = fs.statSync(filename, { bigint: true });
    return `${st.dev}:${st.ino}:${st.size}:${st.mtimeNs}`;
  } catch {
    return null;
  }
}

export class AuthzListFile extends Authz {
  readonly qomType = 'authz-list-file';
  private list: AuthzList | null;
  private stamp: string | null;
  /** Why the last reload failed (everyone is denied meanwhile), or null. */
  reloadError: string | null = null;

  constructor(
    id: string,
    readonly filename: string,
    readonly refresh: boolean,
  ) {
    super(id);
    this.stamp = fileStamp(filename);
    this.list = loadListFile(id, filename);
  }

  isAllowed(identity: string): boolean {
    if (this.refresh) this.reloadIfChanged();
    return this.list?.isAllowed(identity) ?? false;
  }

  private reloadIfChanged(): void {
    const stamp = fileStamp(this.filename);
    if (stamp === this.stamp || stamp === null) return;
    this.stamp = stamp;
    try {
      this.list = loadListFile(this.id, this.filename);
      this.reloadError = null;
    } catch (e) {
      this.list = null;
      this.reloadError = (e as Error).message;
    }
  }
}

/** g_pattern_match_simple: `*` matches any run of characters, `?` exactly one. */
export function globMatch(pattern: string, text: string): boolean {
  const p = Array.from(pattern);
  const t = Array.from(text);
  let pi = 0;
  let ti = 0;
  let starP = -1;
  let starT = 0;
  while (ti < t.length) {
    if (pi < p.length && (p[pi] === '?' || (p[pi] !== '*' && p[pi] === t[ti]))) {
      pi++;
      ti++;
    } else if (pi < p.length && p[pi] === '*') {
      starP = pi++;
      starT = ti;
    } else if (starP >= 0) {
      pi = starP + 1;
      ti = ++starT;
    } else {
      return false;
    }
  }
  while (pi < p.length && p[pi] === '*') pi++;
  return pi === p.length;
}

function listFromProps(id: string, props: Props): AuthzList {
  props.only(['policy', 'rules']);
  const policy = props.enumOf('policy', POLICIES, 'deny');
  const rules = props.list('rules').map((r) => {
    r.only(['match', 'policy', 'format']);
    return { match: r.requiredStr('match'), policy: r.requiredEnum('policy', POLICIES), format: r.enumOf('format', FORMATS, 'exact') };
  });
  return new AuthzList(id, policy, rules);
}

/** qauthz_list_file_load: the file must hold a JSON object with authz-list's properties. */
function loadListFile(id: string, filename: string): AuthzList {
  let content: string;
  try {
    content = fs.readFileSync(filename, 'utf8');
  } catch (e) {
    throw new BlockError(toBlockError(e).code, `Unable to read '${filename}': Failed to open file “${filename}”: ${toBlockError(e).message}`);
  }
  let parsed: unknown;
  try {
    parsed = JSON.parse(content);
  } catch (e) {
    throw propError(`JSON parse error, ${(e as Error).message}`);
  }
  if (parsed === null || typeof parsed !== 'object' || Array.isArray(parsed)) {
    throw propError(`File '${filename}' must contain a JSON object`);
  }
  return listFromProps(id, new Props(parsed as Record<string, unknown>, '', true));
}

function listFileFromProps(id: string, props: Props): AuthzListFile {
  props.only(['filename', 'refresh']);
  const filename = props.requiredStr('filename');
  const refresh = props.bool('refresh', true);
  const authz = new AuthzListFile(id, filename, refresh);
  if (refresh && path.dirname(filename) === '.') throw propError('Filename must be an absolute path');
  return authz;
}

/** Creates an authz-* object from its specification (QEMU's messages on bad input). */
export function createAuthz(spec: ObjectSpec): Authz {
  const props = new Props(spec.props);
  switch (spec.qomType as AuthzType) {
    case 'authz-simple':
      props.only(['identity']);
      return new AuthzSimple(spec.id, props.requiredStr('identity'));
    case 'authz-list':
      return listFromProps(spec.id, props);
    case 'authz-list-file':
      return listFileFromProps(spec.id, props);
    default:
      throw propError(`Parameter 'qom-type' does not accept value '${spec.qomType}'`);
  }
}
