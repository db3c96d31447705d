/*
 * qemu-img-ts/getopt.ts against the C library's own getopt and
 * getopt_long: a small C harness runs the same command line and prints
 * every result with optind and argv[optind - 1], then optind and the
 * operands (the permuted argv) at the end; glibc's message is what it
 * prints on stderr. Command lines are random words from a pool that covers
 * clusters, attached and separate arguments, `--`, `-`, exact, abbreviated,
 * ambiguous and unknown long options, `=value`, and the ':' and ';'
 * characters; optstrings cover permute and '+' order, with and without the
 * leading ':', optional arguments, and plain getopt. Both tools stop at the
 * first error, so the comparison does too.
 *
 * The messages are glibc 2.36's; on another C library the test is skipped.
 * PROPERTY_RUNS and PROPERTY_SEED replay a run (the seed is logged).
 */
import { execFileSync, spawnSync } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import fc from 'fast-check';
import { beforeAll, describe, expect, it } from 'vitest';
import { Getopt, type LongOption } from '../../qemu-img-ts/getopt.js';
import { hasTool } from '../helpers/peers.js';
import { scratchDir } from '../helpers/tmp.js';

const DEFAULT_RUNS = 400;
const NUM_RUNS = Number(process.env.PROPERTY_RUNS ?? DEFAULT_RUNS);
const SEED = Number(process.env.PROPERTY_SEED ?? Math.floor(Math.random() * 2 ** 31));

/** argv[1]: optstring; argv[2]: long table `name:has_arg:key,…` (`-`: plain getopt); argv[3…]: the parsed argv. */
const HARNESS = String.raw`
#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
int main(int argc, char **argv) {
  static struct option longopts[32];
  static char names[32][64], keys[32][64];
  int nlong = 0, plain = strcmp(argv[2], "-") == 0, c;
  if (!plain && argv[2][0]) {
    for (char *tok = strtok(argv[2], ","); tok; tok = strtok(NULL, ","), nlong++) {
      char *c1 = strchr(tok, ':'), *c2 = strchr(c1 + 1, ':');
      *c1 = *c2 = 0;
      strcpy(names[nlong], tok);
      strcpy(keys[nlong], c2 + 1);
      longopts[nlong].name = names[nlong];
      longopts[nlong].has_arg = atoi(c1 + 1);
      longopts[nlong].val = strlen(keys[nlong]) == 1 ? keys[nlong][0] : 256 + nlong;
    }
  }
  char **av = argv + 3;
  int ac = argc - 3;
  while ((c = plain ? getopt(ac, av, argv[1]) : getopt_long(ac, av, argv[1], longopts, NULL)) != -1) {
    if (c == '?' || c == ':') {
      printf("error\t%c\t%d\t%s\n", c, optind, av[optind - 1]);
      return 0;
    }
    printf("option\t%s\t%d\t%s\n", c >= 256 ? keys[c - 256] : (char[]){(char)c, 0}, optind, optarg ? optarg : "(none)");
  }
  printf("end\t%d", optind);
  for (int i = optind; i < ac; i++) printf("\t%s", av[i]);
  printf("\n");
  return 0;
}
`;

const OPTSTRINGS = ['ab:c', '+ab:c', ':ab:c', '+:ab:c', 'ab:c::x', ':a;b:'];
/** `-` in key: a long-only option (getopt returns 256 + its index). */
const LONG_TABLES: Array<LongOption[] | null> = [
  null,
  [],
  [
    { name: 'alpha', hasArg: false, key: 'a' },
    { name: 'beta', hasArg: true, key: 'b' },
    { name: 'alpine', hasArg: false, key: '--alpine' },
    { name: 'gamma', hasArg: 'optional', key: '--gamma' },
    { name: 'bet', hasArg: true, key: 'b' },
    { name: 'charlie', hasArg: false, key: 'c' },
    { name: 'char', hasArg: false, key: 'c' },
  ],
];
const WORDS = [
  '-a', '-b', '-ab', '-bx', '-c', '-cv', '-x', '-ax', '-', '--', '-:', '-;', '-1', '',
  '--alpha', '--al', '--alp', '--a', '--be', '--bet', '--beta=1', '--beta=', '--alpha=x', '--gamma',
  '--gamma=g', '--g', '--ch', '--cha=1', '--bogus', '--=x', 'op1', 'op2', '-b-1',
];

function hasArgCode(o: LongOption): number {
  return o.hasArg === true ? 1 : o.hasArg === 'optional' ? 2 : 0;
}

function tableArg(table: LongOption[] | null): string {
  return table === null ? '-' : table.map((o) => `${o.name}:${hasArgCode(o)}:${o.key}`).join(',');
}

interface Run {
  lines: string[];
  stderr: string;
}

function glibc(harness: string, optstring: string, table: LongOption[] | null, argv: string[]): Run {
  const r = spawnSync(harness, [optstring, tableArg(table), ...argv], { encoding: 'utf8' });
  return { lines: r.stdout.replace(/\n$/, '').split('\n'), stderr: r.stderr };
}

function ours(optstring: string, table: LongOption[] | null, argv: string[]): Run {
  const parser = new Getopt(argv, optstring, table);
  const lines: string[] = [];
  let stderr = '';
  for (const e of parser) {
    if (e.kind === 'error') {
      lines.push(`error\t${e.result}\t${e.optind}\t${e.element}`);
      if (!optstring.replace(/^\+/, '').startsWith(':')) stderr = `${e.message}\n`;
      return { lines, stderr };
    }
    lines.push(`option\t${e.key}\t${e.optind}\t${e.arg ?? '(none)'}`);
  }
  lines.push(['end', parser.optind, ...parser.operands()].join('\t'));
  return { lines, stderr };
}

/** glibc 2.36's texts are what the core copies; another libc words them differently. */
function isGlibc(): boolean {
  const r = spawnSync('ldd', ['--version'], { encoding: 'utf8' });
  return /GLIBC|GNU libc/i.test(`${r.stdout}${r.stderr}`);
}

describe.skipIf(!hasTool('cc') || !isGlibc())('getopt core vs glibc getopt_long', () => {
  let harness = '';
  beforeAll(() => {
    const dir = scratchDir('getopt-');
    fs.writeFileSync(path.join(dir, 'harness.c'), HARNESS);
    harness = path.join(dir, 'harness');
    execFileSync('cc', ['-O', '-o', harness, path.join(dir, 'harness.c')]);
  });

  it('gives the same results, optind, culprits, messages and operands on random command lines', () => {
    console.log(`getopt-glibc.test: seed=${SEED} runs=${NUM_RUNS} (replay: PROPERTY_SEED=${SEED})`);
    fc.assert(
      fc.property(
        fc.constantFrom(...OPTSTRINGS),
        fc.constantFrom(...LONG_TABLES),
        fc.array(fc.constantFrom(...WORDS), { maxLength: 8 }),
        (optstring, table, words) => {
          const argv = ['prog', ...words];
          expect(ours(optstring, table, argv)).toEqual(glibc(harness, optstring, table, argv));
        },
      ),
      { seed: SEED, numRuns: NUM_RUNS },
    );
  });

  it.each([
    ['create -xq (qemu-img names argv[optind - 1])', ':F:b:f:ho:qu', ['create', '-xq', 'x.raw']],
    ['permutation before an error', ':f:q', ['info', 'a', 'b', '-q', 'c', '-x']],
    ['+ order stops at the command name', '+:hVT:', ['qemu-img', '-T', 't', 'info', '-h']],
    ['-- after operands', 'q', ['read', '0', '--', '-1', '-q']],
  ])('%s', (_name, optstring, argv) => {
    expect(ours(optstring, [], argv)).toEqual(glibc(harness, optstring, [], argv));
  });
});
