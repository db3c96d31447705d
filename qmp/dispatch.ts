/*
 * The QMP dispatcher (QEMU 7.2's qapi/qmp-dispatch.c and the
 * negotiation part of monitor/qmp.c): one parsed input in, one response
 * object out. It never throws for anything a client sends.
 *
 * Checks in QEMU's order: the input must be an object; its members may be
 * only `execute` (a string), `arguments` (an object) and `id` (anything,
 * echoed in the response, error or not); `execute` must be present. In
 * negotiation mode only commands marked `allowInNegotiation` run, any
 * other gets CommandNotFound "Expecting capabilities negotiation with
 * 'qmp_capabilities'"; in command mode `qmp_capabilities` gets
 * "Capabilities negotiation is already complete, command ignored" and an
 * unknown name "The command NAME has not been found". Arguments are
 * checked with the command's zod schema (qapi-errors.ts gives QEMU's
 * texts), then the handler runs: its value is `return` (undefined becomes
 * {}), a QmpError its class and text, a BlockError a GenericError with
 * its message. Anything else thrown is a bug in a handler: it is answered
 * as a GenericError too, so the daemon keeps serving.
 *
 * Commands come in arrays from their modules (qmp/commands-all.ts lists
 * them); registering a name twice is a programmer error.
 */
import { BlockError, invariant } from '../block/errors.js';
import { QmpError, type QmpCommand, type QmpErrorClass } from './command.js';
import type { JsonValue } from '../block/json-stream.js';
import { QapiInputError, parseQapi } from './qapi-errors.js';

export const QMP_CAPABILITIES = 'qmp_capabilities';

export type QmpResponse = { return: unknown; id?: JsonValue } | { error: { class: QmpErrorClass; desc: string }; id?: JsonValue };

/** Where a monitor is: before or after qmp_capabilities. */
export type MonitorMode = 'negotiation' | 'command';

/** What a command sees of the monitor that runs it, besides the daemon. */
export interface MonitorSession {
  mode: MonitorMode;
}

const INPUT_MEMBERS = new Set(['execute', 'arguments', 'id']);

export class Dispatcher<Ctx> {
  private readonly commands = new Map<string, QmpCommand<Ctx>>();

  constructor(lists: ReadonlyArray<readonly QmpCommand<Ctx, any>[]> = []) {
    for (const list of lists) this.register(list);
  }

  register(list: readonly QmpCommand<Ctx, any>[]): void {
    for (const c of list) {
      invariant(!this.commands.has(c.name), `QMP command ${c.name} registered twice`);
      this.commands.set(c.name, c);
    }
  }

  names(): string[] {
    return [...this.commands.keys()];
  }

  /** Runs one input for a monitor in `session.mode`; resolves with the response to send. */
  async dispatch(ctx: Ctx, session: MonitorSession, input: JsonValue): Promise<QmpResponse> {
    if (typeof input !== 'object' || input === null || Array.isArray(input)) {
      return errorResponse('GenericError', 'QMP input must be a JSON object');
    }
    const id = Object.prototype.hasOwnProperty.call(input, 'id') ? input.id : undefined;
    const withId = (r: QmpResponse): QmpResponse => (id === undefined ? r : { ...r, id });
    try {
      const command = this.lookup(session, checkInput(input));
      const args = parseQapi(command.args, input.arguments ?? {});
      const value = await command.run(ctx, args);
      if (command.name === QMP_CAPABILITIES) session.mode = 'command';
      return withId({ return: value === undefined ? {} : value });
    } catch (e) {
      return withId(errorOf(e));
    }
  }

  private lookup(session: MonitorSession, name: string): QmpCommand<Ctx> {
    const command = this.commands.get(name);
    if (session.mode === 'negotiation') {
      if (!command?.allowInNegotiation) {
        throw new QmpError('CommandNotFound', `Expecting capabilities negotiation with '${QMP_CAPABILITIES}'`);
      }
      return command;
    }
    if (name === QMP_CAPABILITIES) {
      throw new QmpError('CommandNotFound', 'Capabilities negotiation is already complete, command ignored');
    }
    if (!command) throw new QmpError('CommandNotFound', `The command ${name} has not been found`);
    return command;
  }
}

/** qmp_dispatch_check_obj: the command name, or QEMU's complaint. */
function checkInput(input: { [key: string]: JsonValue }): string {
  for (const [key, value] of Object.entries(input)) {
    if (!INPUT_MEMBERS.has(key)) throw new QmpError('GenericError', `QMP input member '${key}' is unexpected`);
    if (key === 'execute' && typeof value !== 'string') {
      throw new QmpError('GenericError', "QMP input member 'execute' must be a string");
    }
    if (key === 'arguments' && (typeof value !== 'object' || value === null || Array.isArray(value))) {
      throw new QmpError('GenericError', "QMP input member 'arguments' must be an object");
    }
  }
  if (typeof input.execute !== 'string') throw new QmpError('GenericError', "QMP input lacks member 'execute'");
  return input.execute;
}

export function errorResponse(errorClass: QmpErrorClass, desc: string): QmpResponse {
  return { error: { class: errorClass, desc } };
}

/**
 * A block error's text as QMP gives it: its first line. Further lines are
 * QEMU's hints (error_append_hint: "Is another process using the image
 * [F]?", "Try cache.direct=off"), which the tools print and QMP leaves out.
 */
function qmpDesc(e: BlockError): string {
  const newline = e.message.indexOf('\n');
  return newline < 0 ? e.message : e.message.slice(0, newline);
}

function errorOf(e: unknown): QmpResponse {
  if (e instanceof QmpError) return errorResponse(e.errorClass, e.message);
  if (e instanceof BlockError) return errorResponse('GenericError', qmpDesc(e));
  if (e instanceof QapiInputError) return errorResponse('GenericError', e.message);
  return errorResponse('GenericError', e instanceof Error ? e.message : String(e));
}
