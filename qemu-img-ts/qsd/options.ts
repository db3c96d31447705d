/*
 * qemu-storage-daemon 7.2's command line (storage-daemon/qemu-storage-daemon.c
 * process_options), acted on option by option in order, as qsd does: a
 * --blockdev opens its node before the next option is read, an --export
 * needs the --nbd-server and node given before it.
 *
 *   --blockdev JSON | [driver=]D,…   blockdev-add (JSON typed, keyval strings)
 *   --object [qom-type=]T,id=…       user-creatable object (help lists types)
 *   --chardev socket,path=P,server=on,wait=off,id=X   a socket chardev
 *   --monitor [chardev=]X[,mode=control][,pretty=on|off]   QMP on chardev X
 *   --nbd-server addr.type=inet,addr.host=H,addr.port=P | addr.type=unix,addr.path=P
 *                [,tls-creds=ID][,tls-authz=ID][,max-connections=N]
 *   --export [type=]nbd,id=…,node-name=…[,name=…][,description=…][,writable=on]
 *            [,writethrough=on][,bitmaps.0=…][,allocation-depth=on]
 *   --pidfile P, --daemonize, -T/--trace (accepted, no tracing), -h, -V
 *
 * An error in an option is "qemu-storage-daemon: --opt ARG: message", exit
 * 1; getopt's own errors are glibc's; an operand is "ARG: Unexpected
 * argument". Keyval values are strings: booleans take on/off (yes/no…),
 * numbers QemuOpts' forms, with the keyval visitor's texts. --blockdev,
 * --export, --monitor, --nbd-server and --object also take JSON (an
 * argument starting with `{`, as qobject_input_visitor_new_str decides),
 * read by QEMU's JSON parser (block/json-stream.ts) and typed: a string
 * where a boolean belongs is "Invalid parameter type for 'x', expected:
 * boolean".
 */
import { z } from 'zod';
import { parseJsonOption, parseKeyval, type OptionTree } from '../../block/keyval.js';
import { zBool, zInt } from '../../block/options.js';
import { genericError } from '../../qmp/command.js';
import { blockdevAdd } from '../../qmp/commands-block.js';
import { addExport, exportAddArgs, exportRequestOf, inetAddress, startNbdServer } from '../../qmp/commands-nbd.js';
import type { Daemon } from '../../qmp/daemon.js';
import { parseQapi, qUint64 } from '../../qmp/qapi-errors.js';

/** A chardev QEMU would create: only unix socket servers are supported here. */
interface Chardev {
  path: string;
}

/** What the options leave for after they are processed. */
export interface DaemonSetup {
  pidFile?: string;
  daemonize: boolean;
}

const chardevArgs = z.strictObject({
  backend: z.literal('socket'),
  id: z.string(),
  path: z.string(),
  server: zBool('server').optional(),
  wait: zBool('wait').optional(),
});

/** MonitorOptions; keyval (strings) or JSON (typed). */
const monitorArgs = (typed: boolean) =>
  z.strictObject({
    chardev: z.string(),
    mode: z.enum(['control']).optional(),
    pretty: (typed ? z.boolean() : zBool('pretty')).optional(),
    id: z.string().optional(),
  });

/** NbdServerOptions (a flat SocketAddress, unlike nbd-server-start's legacy one); keyval or JSON. */
const nbdServerArgs = (typed: boolean) =>
  z.strictObject({
    addr: z.discriminatedUnion('type', [
      z.strictObject({ type: z.literal('inet'), host: z.string(), port: z.string() }),
      z.strictObject({ type: z.literal('unix'), path: z.string() }),
    ]),
    'tls-creds': z.string().optional(),
    'tls-authz': z.string().optional(),
    'max-connections': (typed ? qUint64().max(2 ** 32 - 1) : zInt('max-connections', { max: 2 ** 32 - 1 })).optional(),
  });

/** An option argument as QEMU's qobject_input_visitor_new_str reads it: JSON when it starts with `{`. */
function optionInput(arg: string, impliedKey?: string): { tree: OptionTree; typed: boolean } {
  const typed = arg.startsWith('{');
  return { tree: typed ? parseJsonOption(arg) : parseKeyval(arg, impliedKey), typed };
}

const exportArgs = z.strictObject({
  type: z.enum(['nbd']),
  id: z.string(),
  'node-name': z.string(),
  name: z.string().optional(),
  description: z.string().optional(),
  writable: zBool('writable').optional(),
  writethrough: zBool('writethrough').optional(),
  bitmaps: z.array(z.string()).optional(),
  'allocation-depth': zBool('allocation-depth').optional(),
  'fixed-iothread': zBool('fixed-iothread').optional(),
  iothread: z.string().optional(),
});

/** Processes the options one at a time; state lands in the daemon. */
export class OptionProcessor {
  private readonly chardevs = new Map<string, Chardev>();
  readonly setup: DaemonSetup = { daemonize: false };

  constructor(private readonly d: Daemon) {}

  /** Runs one option (its long name without dashes and its argument); may print help and ask to exit 0. */
  async apply(key: string, arg: string): Promise<'exit' | void> {
    switch (key) {
      case 'blockdev':
        return this.blockdev(arg);
      case 'object':
        return this.object(arg);
      case 'chardev':
        return this.chardev(arg);
      case 'monitor':
        return this.monitor(arg);
      case 'nbd-server':
        return this.nbdServer(arg);
      case 'export':
        return this.export(arg);
      case 'pidfile':
        this.setup.pidFile = arg;
        return;
    }
  }

  private async blockdev(arg: string): Promise<void> {
    const { tree, typed } = optionInput(arg, 'driver');
    await blockdevAdd(this.d, tree, typed);
  }

  private object(arg: string): 'exit' | void {
    const help = this.d.addObject(arg);
    if (help === null) return;
    process.stdout.write(help);
    return 'exit';
  }

  private chardev(arg: string): void {
    const a = parseQapi(chardevArgs, parseKeyval(arg, 'backend'));
    if (!a.server) throw genericError(`Failed to connect to '${a.path}': No such file or directory`);
    if (this.chardevs.has(a.id)) throw genericError('duplicate yank instance');
    this.chardevs.set(a.id, { path: a.path });
  }

  private async monitor(arg: string): Promise<void> {
    const { tree, typed } = optionInput(arg, 'chardev');
    const a = parseQapi(monitorArgs(typed), tree);
    const chardev = this.chardevs.get(a.chardev);
    if (!chardev) throw genericError(`chardev "${a.chardev}" not found`);
    await this.d.addMonitor(chardev.path, { serve: false });
  }

  private async nbdServer(arg: string): Promise<void> {
    const { tree, typed } = optionInput(arg);
    const a = parseQapi(nbdServerArgs(typed), tree);
    const addr = a.addr.type === 'unix' ? { type: 'unix' as const, path: a.addr.path } : inetAddress(a.addr.host, a.addr.port);
    await startNbdServer(this.d, { addr, tlsCreds: a['tls-creds'], tlsAuthz: a['tls-authz'], maxConnections: a['max-connections'] });
  }

  private export(arg: string): void {
    const { tree, typed } = optionInput(arg, 'type');
    addExport(this.d, exportRequestOf(typed ? parseQapi(exportAddArgs, tree) : parseQapi(exportArgs, tree)));
  }
}
