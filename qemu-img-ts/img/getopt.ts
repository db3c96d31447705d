/*
 * qemu-img's use of getopt_long (../getopt.ts): the options come from
 * commander `Option` objects, the same ones that declare the command and
 * print its help (`-f <fmt>` short with an argument, `--output <ofmt>`
 * long, `-U, --force-share` both), and the optstring starts with ':' as in
 * every qemu-img command, so glibc prints nothing and qemu-img reports
 * errors itself, naming argv[optind - 1]:
 *   unrecognized option '<argv[optind-1]>'       (getopt returned '?')
 *   missing argument for option '<argv[optind-1]>' (getopt returned ':')
 * both as usage errors (with the "Try … --help" line).
 *
 * Commander's own parser is not used because it cannot reproduce getopt
 * (it takes `-1` as an operand, knows no prefixes, and names options
 * differently in its errors).
 */
import type { Option } from 'commander';
import { usageError } from '../cli-common.js';
import { Getopt, type LongOption } from '../getopt.js';

/** One option occurrence, in command-line order. */
export interface ParsedOption {
  /** The option's attribute name (`format`, `f`, `output`, `forceShare`, …). */
  key: string;
  /** The argument, for options that take one. */
  value?: string;
}

/** Parses `argv` (argv[0] is the command name) against `options`; yields options in order. */
export class GetoptLong implements Iterable<ParsedOption> {
  private readonly getopt: Getopt;
  /** getopt's key (the short letter, or `--name` for a long-only option) to the attribute name. */
  private readonly keys = new Map<string, string>();

  /**
   * `stopAtOperand` is getopt's leading '+' (POSIX order): the first operand
   * ends the options, as qemu-img's global options end at the command name.
   * `glibcErrors` drops the leading ':' (qemu-img measure): an error is
   * yielded as the option `?` whose value is glibc's message.
   */
  constructor(argv: readonly string[], options: readonly Option[], stopAtOperand = false, private readonly glibcErrors = false) {
    let optstring = (stopAtOperand ? '+' : '') + (glibcErrors ? '' : ':');
    const longopts: LongOption[] = [];
    for (const o of options) {
      const hasArg = o.required || o.optional;
      const key = o.short ? o.short.slice(1) : o.long!;
      this.keys.set(key, o.attributeName());
      if (o.short) optstring += `${key}${hasArg ? ':' : ''}`;
      if (o.long) longopts.push({ name: o.long.slice(2), hasArg, key });
    }
    this.getopt = new Getopt(argv, optstring, longopts);
  }

  /** The operands, in order, once every option has been read. */
  operands(): string[] {
    return this.getopt.operands();
  }

  *[Symbol.iterator](): Generator<ParsedOption> {
    for (const e of this.getopt) {
      if (e.kind === 'error' && this.glibcErrors) {
        yield { key: '?', value: e.message };
        continue;
      }
      if (e.kind === 'error' && e.result === ':') throw usageError(`missing argument for option '${e.element}'`);
      if (e.kind === 'error') throw usageError(`unrecognized option '${e.element}'`);
      yield { key: this.keys.get(e.key)!, value: e.arg };
    }
  }
}
