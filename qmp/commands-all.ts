/*
 * Every QMP command the daemon knows, as one list of module arrays: a new
 * module adds its array here (the Daemon is every module's context).
 */
import type { QmpCommand } from './command.js';
import { backupCommands } from './commands-backup.js';
import { bitmapCommands } from './commands-bitmap.js';
import { blockCommands } from './commands-block.js';
import { coreCommands } from './commands-core.js';
import { createCommands } from './commands-create.js';
import { jobCommands } from './commands-jobs.js';
import { mirrorCommands } from './commands-mirror.js';
import { nbdCommands } from './commands-nbd.js';
import { objectCommands } from './commands-object.js';
import { streamCommitCommands } from './commands-stream-commit.js';
import { throttleCommands } from './commands-throttle.js';
import type { Daemon } from './daemon.js';

export const allCommands: ReadonlyArray<readonly QmpCommand<Daemon, any>[]> = [
  coreCommands,
  blockCommands,
  bitmapCommands,
  nbdCommands,
  jobCommands,
  mirrorCommands,
  streamCommitCommands,
  backupCommands,
  throttleCommands,
  createCommands,
  objectCommands,
];
