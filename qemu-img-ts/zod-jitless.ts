/*
 * Imported first by each tool's entry, for its side effect: zod parses
 * without generating code. By default an object schema compiles a parser
 * (new Function) on its first parse; a tool parses a handful of options
 * and exits, so the compiling costs more than it saves: zod's share of a
 * qemu-img-ts convert's start-up profile went from ~7.8 ms to ~4-5.6 ms.
 * Object schemas read the setting when they are built, so this must run
 * before any module that builds one (ES modules run in import order).
 */
import { z } from 'zod';

z.config({ jitless: true });
