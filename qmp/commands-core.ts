/*
 * The monitor's own commands: qmp_capabilities (the only one allowed during
 * negotiation; the dispatcher switches the monitor to command mode once it
 * succeeds), query-version, query-commands and quit. `enable` may ask for
 * the `oob` capability, which the greeting offers; commands still run in
 * order. quit answers first, then the daemon shuts down (daemon.ts).
 */
import { z } from 'zod';
import { defineCommand, type QmpCommand } from './command.js';
import type { Daemon } from './daemon.js';
import { QMP_CAPABILITIES } from './dispatch.js';
import { versionInfo } from './version.js';

export const coreCommands: QmpCommand<Daemon>[] = [
  defineCommand({
    name: QMP_CAPABILITIES,
    args: z.strictObject({ enable: z.array(z.enum(['oob'])).optional() }),
    allowInNegotiation: true,
    run: () => ({}),
  }),
  defineCommand({
    name: 'query-version',
    args: z.strictObject({}),
    run: () => versionInfo(),
  }),
  defineCommand({
    name: 'query-commands',
    args: z.strictObject({}),
    run: (d: Daemon) => d.dispatcher.names().map((name) => ({ name })),
  }),
  defineCommand({
    name: 'quit',
    args: z.strictObject({}),
    run(d: Daemon) {
      setImmediate(() => void d.shutdown());
      return {};
    },
  }),
];
