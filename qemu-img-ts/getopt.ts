/*
 * glibc's getopt and getopt_long (posix/getopt.c of glibc 2.36), the one
 * parser behind qemu-img's and qemu-io's command lines and qemu-io's
 * command flags.
 *
 * Users type these command lines from habit and scripts, so the parse is
 * glibc's to the letter, state for state: options are permuted in front of
 * the operands (`read 0 1 -q` is quiet; operands keep their order), flags
 * cluster (`-qv`), an option's argument is the rest of its word or the next
 * word whatever it looks like (`-P -1`), `--` ends the options, a lone `-`
 * is an operand, long options may be abbreviated to any unambiguous prefix
 * and take `--name=value` or `--name value`. Without a long option table
 * (plain getopt) `--x` is the short option '-' (invalid).
 *
 * The optstring may start with '+' (POSIX order: the first operand ends
 * the options, as qemu-img's global options end at the command name), then
 * ':' (a missing argument is reported as ':' rather than '?', and glibc
 * prints nothing). `optind` and the permuted argv are tracked exactly,
 * because qemu-img names the culprit of an error as argv[optind - 1], which
 * after permutation is not always the offending word (`create -xq` names
 * `create`).
 *
 * `next()` returns one getopt result at a time: an option (with its key and
 * argument) or an error carrying what each tool prints: the result ('?' or
 * ':'), argv[optind - 1] at that moment, and glibc's message (prefixed with
 * argv[0]). Both tools stop at the first error, so nothing after one is
 * defined here.
 *
 * Left out: '-' ordering (RETURN_IN_ORDER), POSIXLY_CORRECT, `-W foo`,
 * getopt_long_only, and glibc's fallback message when it cannot allocate
 * the ambiguity list. Options are UTF-16 code units, not bytes, so a
 * non-ASCII flag is named whole where glibc would name its first byte.
 */
import { invariant } from '../block/errors.js';

/** One entry of getopt_long's table (struct option); `key` is what getopt returns for it. */
export interface LongOption {
  readonly name: string;
  /** true: required (`--x v`, `--x=v`); 'optional': only as `--x=v`. */
  readonly hasArg: boolean | 'optional';
  readonly key: string;
}

export type GetoptEvent =
  | { readonly kind: 'option'; readonly key: string; readonly arg?: string; readonly optind: number }
  | {
      readonly kind: 'error';
      /** getopt's return value: ':' only for a missing argument with a leading ':' in the optstring. */
      readonly result: '?' | ':';
      /** argv[optind - 1] when the error was returned (qemu-img's culprit). */
      readonly element: string;
      /** What glibc prints on stderr when the optstring has no leading ':'. */
      readonly message: string;
      readonly optind: number;
    };

/** A non-option element: not starting with '-', or '-' alone. */
function isOperand(word: string): boolean {
  return word[0] !== '-' || word.length === 1;
}

export class Getopt implements Iterable<GetoptEvent> {
  private readonly argv: string[];
  /** The short options (the optstring after its '+'). */
  private readonly shorts: string;
  private readonly requireOrder: boolean;
  /** glibc's optind: the next element to scan; after the end, the first operand. */
  optind = 1;
  /** The rest of a cluster of short options being read ('' between elements). */
  private nextchar = '';
  private firstNonopt = 1;
  private lastNonopt = 1;
  private ended = false;

  /** `argv[0]` is the program (or command) name; `longopts` null is plain getopt. */
  constructor(
    argv: readonly string[],
    optstring: string,
    private readonly longopts: readonly LongOption[] | null = null,
  ) {
    invariant(!optstring.startsWith('-'), "RETURN_IN_ORDER ('-') is not supported");
    this.argv = [...argv];
    this.requireOrder = optstring.startsWith('+');
    this.shorts = this.requireOrder ? optstring.slice(1) : optstring;
  }

  /** The elements from optind on: the operands once next() has returned null. */
  operands(): string[] {
    return this.argv.slice(this.optind);
  }

  *[Symbol.iterator](): Generator<GetoptEvent> {
    for (let e = this.next(); e !== null; e = this.next()) yield e;
  }

  /** getopt's next result; null (getopt's -1) at the end of the options. */
  next(): GetoptEvent | null {
    if (this.nextchar === '') {
      if (this.ended || !this.advance()) {
        this.ended = true;
        return null;
      }
      const word = this.argv[this.optind]!;
      if (this.longopts !== null && word.startsWith('--')) return this.longOption(word.slice(2));
      this.nextchar = word.slice(1);
    }
    return this.shortOption();
  }

  /** Moves optind to the next option element, permuting skipped operands behind it; false at the end. */
  private advance(): boolean {
    const argc = this.argv.length;
    this.lastNonopt = Math.min(this.lastNonopt, this.optind);
    this.firstNonopt = Math.min(this.firstNonopt, this.optind);
    if (!this.requireOrder) {
      if (this.firstNonopt !== this.lastNonopt && this.lastNonopt !== this.optind) this.exchange();
      else if (this.lastNonopt !== this.optind) this.firstNonopt = this.optind;
      while (this.optind < argc && isOperand(this.argv[this.optind]!)) this.optind++;
      this.lastNonopt = this.optind;
    }
    if (this.optind !== argc && this.argv[this.optind] === '--') {
      this.optind++;
      if (this.firstNonopt !== this.lastNonopt && this.lastNonopt !== this.optind) this.exchange();
      else if (this.firstNonopt === this.lastNonopt) this.firstNonopt = this.optind;
      this.lastNonopt = argc;
      this.optind = argc;
    }
    if (this.optind === argc) {
      if (this.firstNonopt !== this.lastNonopt) this.optind = this.firstNonopt;
      return false;
    }
    return !isOperand(this.argv[this.optind]!);
  }

  /** glibc's exchange(): moves the options just read in front of the operands skipped before them. */
  private exchange(): void {
    const operands = this.argv.slice(this.firstNonopt, this.lastNonopt);
    const options = this.argv.slice(this.lastNonopt, this.optind);
    this.argv.splice(this.firstNonopt, this.optind - this.firstNonopt, ...options, ...operands);
    this.firstNonopt += this.optind - this.lastNonopt;
    this.lastNonopt = this.optind;
  }

  private shortOption(): GetoptEvent {
    const c = this.nextchar[0]!;
    this.nextchar = this.nextchar.slice(1);
    if (this.nextchar === '') this.optind++;
    const at = this.shorts.indexOf(c);
    if (at < 0 || c === ':' || c === ';') return this.error('?', `invalid option -- '${c}'`);
    if (this.shorts[at + 1] !== ':') return this.option(c);
    const rest = this.nextchar;
    this.nextchar = '';
    if (rest !== '') {
      this.optind++;
      return this.option(c, rest);
    }
    if (this.shorts[at + 2] === ':') return this.option(c);
    if (this.optind === this.argv.length) return this.error(this.missingResult(), `option requires an argument -- '${c}'`);
    return this.option(c, this.argv[this.optind++]!);
  }

  /** process_long_option for `--text` (text without the dashes). */
  private longOption(text: string): GetoptEvent {
    const eq = text.indexOf('=');
    const found = this.findLong(eq < 0 ? text : text.slice(0, eq));
    this.optind++;
    if (found === null) return this.error('?', `unrecognized option '--${text}'`);
    if (Array.isArray(found)) {
      const list = found.map((o) => ` '--${o.name}'`).join('');
      return this.error('?', `option '--${text}' is ambiguous; possibilities:${list}`);
    }
    if (eq >= 0) {
      if (found.hasArg === false) return this.error('?', `option '--${found.name}' doesn't allow an argument`);
      return this.option(found.key, text.slice(eq + 1));
    }
    if (found.hasArg !== true) return this.option(found.key);
    if (this.optind === this.argv.length) return this.error(this.missingResult(), `option '--${found.name}' requires an argument`);
    return this.option(found.key, this.argv[this.optind++]!);
  }

  /**
   * The exact name, else the first option the prefix abbreviates; an array
   * (the first one and every later one that differs from it) when the
   * prefix is ambiguous; null when nothing matches.
   */
  private findLong(name: string): LongOption | LongOption[] | null {
    const table = this.longopts ?? [];
    const exact = table.find((o) => o.name === name);
    if (exact) return exact;
    const matches = table.filter((o) => o.name.startsWith(name));
    const first = matches[0];
    if (first === undefined) return null;
    const differing = matches.filter((o) => o === first || o.hasArg !== first.hasArg || o.key !== first.key);
    return differing.length > 1 ? differing : first;
  }

  private missingResult(): '?' | ':' {
    return this.shorts.startsWith(':') ? ':' : '?';
  }

  private option(key: string, arg?: string): GetoptEvent {
    return arg === undefined ? { kind: 'option', key, optind: this.optind } : { kind: 'option', key, arg, optind: this.optind };
  }

  private error(result: '?' | ':', text: string): GetoptEvent {
    return { kind: 'error', result, element: this.argv[this.optind - 1]!, message: `${this.argv[0]}: ${text}`, optind: this.optind };
  }
}
