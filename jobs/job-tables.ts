/*
 * QEMU's job tables (job.c JobSTT and JobVerbTable): which status may follow
 * which, and in which statuses a user verb is accepted. The job code asks
 * these two questions and nothing else decides them, so the state machine
 * reads like QEMU's and a wrong transition is a programmer error (assert),
 * while a verb in the wrong status is a user error with QEMU's text.
 */

export const JOB_STATUSES = [
  'undefined',
  'created',
  'running',
  'paused',
  'ready',
  'standby',
  'waiting',
  'pending',
  'aborting',
  'concluded',
  'null',
] as const;
export type JobStatus = (typeof JOB_STATUSES)[number];

export const JOB_VERBS = ['cancel', 'pause', 'resume', 'set-speed', 'complete', 'finalize', 'dismiss', 'change'] as const;
export type JobVerb = (typeof JOB_VERBS)[number];

/** Allowed transitions: status → statuses that may follow it. */
const TRANSITIONS: Record<JobStatus, readonly JobStatus[]> = {
  undefined: ['created'],
  created: ['running', 'aborting', 'null'],
  running: ['paused', 'ready', 'waiting', 'aborting'],
  paused: ['running'],
  ready: ['standby', 'waiting', 'aborting'],
  standby: ['ready'],
  waiting: ['pending', 'aborting'],
  pending: ['aborting', 'concluded'],
  aborting: ['aborting', 'concluded'],
  concluded: ['null'],
  null: [],
};

/** Statuses in which a verb is accepted. */
const VERBS: Record<JobVerb, readonly JobStatus[]> = {
  cancel: ['created', 'running', 'paused', 'ready', 'standby', 'waiting', 'pending'],
  pause: ['created', 'running', 'paused', 'ready', 'standby'],
  resume: ['created', 'running', 'paused', 'ready', 'standby'],
  'set-speed': ['created', 'running', 'paused', 'ready', 'standby'],
  change: ['created', 'running', 'paused', 'ready', 'standby'],
  complete: ['ready', 'standby'],
  finalize: ['pending'],
  dismiss: ['concluded'],
};

export function canTransition(from: JobStatus, to: JobStatus): boolean {
  return TRANSITIONS[from].includes(to);
}

export function verbAllowed(verb: JobVerb, status: JobStatus): boolean {
  return VERBS[verb].includes(status);
}

/** QEMU's id_wellformed: a letter, then letters, digits, '-', '.', '_'. */
export function idWellformed(id: string): boolean {
  return /^[A-Za-z][A-Za-z0-9_.-]*$/.test(id);
}

/** Job types (QAPI JobType) this project runs. */
export type JobType = 'commit' | 'stream' | 'mirror' | 'backup' | 'create' | 'amend';
