/*
 * The shape of a QMP command, shared by every command module.
 *
 * A command is a name, a zod schema of its `arguments` in QEMU's key names
 * (strict: an unknown key is an error, as QAPI's visitor says "Parameter
 * 'x' is unexpected"), and a handler that gets the daemon and the parsed
 * arguments and returns the value of `return` (QEMU returns {} for commands
 * without a result). A handler reports a user error by throwing QmpError
 * with QEMU's error class and text; a BlockError becomes a GenericError
 * with its message. Modules export arrays of commands; the dispatcher
 * (qmp/dispatch.ts) registers them by name.
 */
import type { z } from 'zod';
import { BlockNode } from '../block/node.js';

/** QMP error classes (QAPI's QapiErrorClass). */
export type QmpErrorClass =
  | 'GenericError'
  | 'CommandNotFound'
  | 'DeviceNotActive'
  | 'DeviceNotFound'
  | 'KVMMissingCap';

/** A user error a command reports as {"error": {"class", "desc"}}. */
export class QmpError extends Error {
  constructor(
    readonly errorClass: QmpErrorClass,
    desc: string,
  ) {
    super(desc);
  }
}

/** Shorthand for the common case. */
export function genericError(desc: string): QmpError {
  return new QmpError('GenericError', desc);
}

/**
 * qmp_get_root_bs's check: `bs` has only BlockBackends (exports) as users —
 * no parent node (a job's filter included) and no job holding it (QEMU's
 * child_job edges) — else "Need a root block node".
 */
export function requireRootNode(bs: BlockNode): BlockNode {
  if (bs.parents.some((e) => e.parent instanceof BlockNode) || bs.holders.length > 0) {
    throw genericError('Need a root block node');
  }
  return bs;
}

export interface QmpCommand<Ctx, S extends z.ZodType = z.ZodType> {
  readonly name: string;
  readonly args: S;
  /** Allowed before qmp_capabilities (only qmp_capabilities and query-version-like commands). */
  readonly allowInNegotiation?: boolean;
  run(ctx: Ctx, args: z.infer<S>): unknown;
}

/** Declares a command with its argument types inferred from the schema. */
export function defineCommand<Ctx, S extends z.ZodType>(c: QmpCommand<Ctx, S>): QmpCommand<Ctx, S> {
  return c;
}
