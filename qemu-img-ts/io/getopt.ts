/*
 * qemu-io's use of getopt (../getopt.ts): getopt_long for its command line,
 * plain getopt for every command's flags, with glibc's own error messages.
 *
 * The parse is a list of events in the order getopt returns them. A parse
 * error is the last event: qemu-io handles each option as getopt returns it
 * and may give up on an earlier one (a bad pattern byte) before getopt would
 * have complained about a later one, so the caller walks the events and
 * prints the error only when it reaches it. Messages are glibc 2.36's,
 * prefixed with `prog` (the command name, or `qemu-io`).
 */
import { Getopt, type LongOption } from '../getopt.js';

export type { LongOption };

export type GetoptEvent = { key: string; arg?: string } | { error: string };

export interface GetoptResult {
  /** Options in the order getopt returns them; an error event is always last. */
  events: GetoptEvent[];
  /** Non-option words in order (empty after an error). */
  operands: string[];
}

/** True for an event that is a parse error. */
export function isGetoptError(e: GetoptEvent): e is { error: string } {
  return 'error' in e;
}

/**
 * getopt_long(argv, spec, longopts) over `args` (argv without argv[0]).
 * `longopts` empty gives plain getopt.
 */
export function getopt(prog: string, args: readonly string[], spec: string, longopts: readonly LongOption[] = []): GetoptResult {
  const parser = new Getopt([prog, ...args], spec, longopts.length > 0 ? longopts : null);
  const events: GetoptEvent[] = [];
  for (const e of parser) {
    if (e.kind === 'error') return { events: [...events, { error: e.message }], operands: [] };
    events.push(e.arg === undefined ? { key: e.key } : { key: e.key, arg: e.arg });
  }
  return { events, operands: parser.operands() };
}
