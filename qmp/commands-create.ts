/*
 * blockdev-create (QEMU 7.2's block/create.c, with the drivers' co_create
 * for the `file` and `qcow2` branches of BlockdevCreateOptions).
 *
 * The command itself only checks and starts: the options are visited as
 * QAPI does (the union member of `driver`, with QEMU's texts and the full
 * names `options.size`, …); a driver QEMU has no create branch for (raw,
 * null-co, throttle, …) takes no other key ("Parameter 'options.size' is
 * unexpected") and then gets "Driver does not support blockdev-create";
 * a driver of the schema this project lacks gets "Block driver 'x' not
 * found or not supported". Then a job of type `create` starts (id checked
 * by the registry: "Job ID 'x' already in use"). Like QEMU's, the job is
 * auto-finalized but NOT auto-dismissed: it stays `concluded` until
 * job-dismiss, and being no block job it emits only JOB_STATUS_CHANGE
 * (created, running, then waiting, pending, concluded on success or
 * aborting, concluded on failure). Its progress is 0/1, then 1/1 once the
 * creation ended either way; a failure is the job's `error` (query-jobs)
 * with the driver's text ("Cluster size must be a power of two between
 * 512 and 2048k", "Could not create 'F': No such file or directory").
 *
 * file: creates (or empties) the host file and grows it to `size` with the
 * preallocation, through the file driver's create (drivers/file/create.ts),
 * unless a node of the daemon holds the file in a way QEMU's image locks
 * would refuse ("Failed to get \"write\" lock").
 *
 * qcow2 (qcow2_co_create): `file` is a node name or an inline node
 * definition, opened for the job and released at its end. The size must be
 * a multiple of 512; the other options are checked by the qcow2 driver's
 * own create checks, in QEMU's order (drivers/qcow2/create.ts); then the
 * first three clusters (header, refcount table, refcount block) are
 * written to the file node, a qcow2 node is opened on it and resized with
 * the preallocation — the same steps, hence the same bytes, as
 * `qemu-img create -f qcow2`. The file node is not truncated first, as in
 * QEMU (create it with blockdev-create driver=file, or it keeps any
 * longer old content).
 */
import path from 'node:path';
import { z } from 'zod';
import { BlockBackend } from '../block/backend.js';
import { BlockError } from '../block/errors.js';
import { PERM_NAMES, PREALLOC_MODES, Perm } from '../block/flags.js';
import type { BlockGraph } from '../block/graph.js';
import type { OptionTree } from '../block/keyval.js';
import type { BlockNode } from '../block/node.js';
import { BLOCKDEV_DRIVERS, initialImage, parseCreateSpec } from '../drivers/qcow2/create.js';
import type { Job, JobDriver } from '../jobs/job.js';
import type { JobRegistry } from '../jobs/registry.js';
import { defineCommand, genericError, type QmpCommand } from './command.js';
import { parseQapi, qUint64 } from './qapi-errors.js';

/** What blockdev-create needs from the daemon. */
export interface CreateCommandContext {
  readonly graph: BlockGraph;
  readonly jobs: JobRegistry;
}

/** QEMU requires qcow2 sizes in whole sectors (BDRV_SECTOR_SIZE). */
const SECTOR_BYTES = 512;
/** What creating a file takes and shares (raw_co_create). */
const CREATE_PERM = Perm.WRITE | Perm.RESIZE;
const CREATE_SHARED = Perm.ALL & ~Perm.RESIZE;
/** Drivers with a BlockdevCreateOptions branch in QEMU 7.2 that this project cannot create. */
const FOREIGN_CREATE_BRANCHES = new Set(['gluster', 'luks', 'nfs', 'parallels', 'qcow', 'qed', 'rbd', 'ssh', 'vdi', 'vhdx', 'vmdk', 'vpc']);

const driverEnum = z.enum([...BLOCKDEV_DRIVERS] as [string, ...string[]]);
const preallocEnum = z.enum(PREALLOC_MODES as [string, ...string[]]);
/** A BlockdevRef member (a node name or a node definition); QEMU names a wrong one without the `options.` prefix. */
function blockdevRef(key: string) {
  return z.custom<string | Record<string, unknown>>(
    (v) => typeof v === 'string' || (typeof v === 'object' && v !== null && !Array.isArray(v)),
    {
      error: (issue) =>
        issue.input === undefined ? `Parameter 'options.${key}' is missing` : `Invalid parameter type for '${key}', expected: BlockdevRef`,
    },
  );
}

/** BlockdevCreateOptionsFile. */
const fileOptions = z.strictObject({
  driver: z.literal('file'),
  filename: z.string(),
  size: qUint64(),
  preallocation: preallocEnum.optional(),
  nocow: z.boolean().optional(),
  'extent-size-hint': qUint64().optional(),
});

/** BlockdevCreateOptionsQcow2. */
const qcow2Options = z.strictObject({
  driver: z.literal('qcow2'),
  file: blockdevRef('file'),
  'data-file': blockdevRef('data-file').optional(),
  'data-file-raw': z.boolean().optional(),
  'extended-l2': z.boolean().optional(),
  size: qUint64(),
  version: z.enum(['v2', 'v3']).optional(),
  'backing-file': z.string().optional(),
  'backing-fmt': driverEnum.optional(),
  encrypt: z.looseObject({ format: z.enum(['luks', 'qcow']) }).optional(),
  'cluster-size': qUint64().optional(),
  preallocation: preallocEnum.optional(),
  'lazy-refcounts': z.boolean().optional(),
  'refcount-bits': z.number().int().optional(),
  'compression-type': z.enum(['zlib', 'zstd']).optional(),
});

type FileOptions = z.infer<typeof fileOptions>;
type Qcow2Options = z.infer<typeof qcow2Options>;
type CreateOptions = FileOptions | Qcow2Options;

const onOff = (b: boolean | undefined) => (b === undefined ? undefined : b ? 'on' : 'off');

/** Drops the unset entries of a create option list. */
function optionMap(entries: Array<[string, string | number | undefined]>): Map<string, string> {
  return new Map(entries.filter((e): e is [string, string | number] => e[1] !== undefined).map(([k, v]) => [k, String(v)]));
}

// ------------------------------------------------------------ file

/**
 * raw_co_create's lock check against the nodes of this daemon: creating
 * takes write and resize and shares everything but resize, so a node on
 * the same file whose users do not share write, or use resize, refuses it
 * (QEMU's OFD locks conflict within one process too). Other processes'
 * locks are not seen: this project does not lock host files.
 */
function checkFileLocks(graph: BlockGraph, filename: string): void {
  const target = path.resolve(filename);
  for (const node of graph.nodes.values()) {
    if (node.driver.name !== 'file' || typeof node.options.filename !== 'string' || path.resolve(node.options.filename) !== target) continue;
    const perm = node.parents.reduce((acc, e) => acc | e.perm, 0);
    const shared = node.parents.reduce((acc: number, e) => acc & e.shared, Perm.ALL);
    for (const [bit, name] of PERM_NAMES) {
      if ((bit & CREATE_PERM) !== 0 && !(shared & bit)) throw new BlockError('EAGAIN', `Failed to get "${name}" lock`);
    }
    for (const [bit, name] of PERM_NAMES) {
      if ((bit & ~CREATE_SHARED & perm) !== 0) throw new BlockError('EAGAIN', `Failed to get shared "${name}" lock`);
    }
  }
}

async function createFile(graph: BlockGraph, o: FileOptions): Promise<void> {
  checkFileLocks(graph, o.filename);
  const opts = optionMap([
    ['size', o.size],
    ['preallocation', o.preallocation],
    ['nocow', onOff(o.nocow)],
    ['extent_size_hint', o['extent-size-hint']],
  ]);
  await graph.createImage('file', o.filename, opts);
}

// ------------------------------------------------------------ qcow2

/** The qemu-img create options the qcow2 checks take (data-file and encrypt only to be refused). */
function qcow2CreateOpts(o: Qcow2Options): Map<string, string> {
  return optionMap([
    ['size', o.size],
    ['compat', o.version],
    ['backing_file', o['backing-file']],
    ['backing_fmt', o['backing-fmt']],
    ['cluster_size', o['cluster-size']],
    ['preallocation', o.preallocation],
    ['lazy_refcounts', onOff(o['lazy-refcounts'])],
    ['refcount_bits', o['refcount-bits']],
    ['compression_type', o['compression-type']],
    ['extended_l2', onOff(o['extended-l2'])],
    // Only its presence matters: external data files are refused.
    ['data_file', o['data-file'] === undefined ? undefined : 'data-file'],
    ['data_file_raw', onOff(o['data-file-raw'])],
    ['encrypt.format', o.encrypt?.format],
  ]);
}

/** bdrv_open_blockdev_ref: a named node, or one opened from its definition. */
function openRef(graph: BlockGraph, ref: string | Record<string, unknown>): Promise<BlockNode> {
  return typeof ref === 'string' ? Promise.resolve(graph.node(ref)) : graph.openNode(structuredClone(ref) as OptionTree);
}

async function createQcow2(graph: BlockGraph, o: Qcow2Options): Promise<void> {
  const fileNode = await openRef(graph, o.file);
  // Holds an inline node open for the whole creation (reads only, everything shared).
  const anchor = new BlockBackend(graph, fileNode);
  try {
    if (o.size % SECTOR_BYTES !== 0) throw new BlockError('EINVAL', `Image size must be a multiple of ${SECTOR_BYTES} bytes`);
    const spec = parseCreateSpec(qcow2CreateOpts(o));
    const raw = new BlockBackend(graph, fileNode, { writable: true, allowWriteBeyondEof: true });
    try {
      await raw.pwrite(0, initialImage(spec));
    } finally {
      await raw.close();
    }
    const node = await graph.openNode({ driver: 'qcow2', file: fileNode.nodeName, backing: null });
    const blk = new BlockBackend(graph, node, { writable: true, resizable: true });
    try {
      await blk.truncate(spec.sizeBytes, false, spec.prealloc);
    } finally {
      await blk.close();
    }
  } finally {
    await anchor.close();
  }
}

// ------------------------------------------------------------ the command

/** The branch of BlockdevCreateOptions for `driver`, checked as QAPI would (see the note at the top). */
function visitOptions(graph: BlockGraph, options: { driver: string }): CreateOptions {
  const { driver } = options;
  if (driver === 'file') return parseQapi(z.strictObject({ options: fileOptions }), { options }).options;
  if (driver === 'qcow2') return parseQapi(z.strictObject({ options: qcow2Options }), { options }).options;
  if (FOREIGN_CREATE_BRANCHES.has(driver) || !graph.findDriver(driver)) {
    throw genericError(`Block driver '${driver}' not found or not supported`);
  }
  parseQapi(z.strictObject({ options: z.strictObject({ driver: z.string() }) }), { options });
  throw genericError('Driver does not support blockdev-create');
}

/** The job's hooks: one unit of progress, counted whether the creation succeeded or not. */
function createJobDriver(graph: BlockGraph, options: CreateOptions): JobDriver {
  return {
    type: 'create',
    async run(job: Job) {
      job.progressSetRemaining(1);
      try {
        await (options.driver === 'file' ? createFile(graph, options) : createQcow2(graph, options));
      } finally {
        job.progressUpdate(1);
      }
    },
  };
}

export const createCommands: QmpCommand<CreateCommandContext>[] = [
  defineCommand({
    name: 'blockdev-create',
    args: z.strictObject({ 'job-id': z.string(), options: z.looseObject({ driver: z.string() }) }),
    run(ctx: CreateCommandContext, args) {
      // The union's discriminator: QEMU names it without the `options.` prefix.
      if (!BLOCKDEV_DRIVERS.has(args.options.driver)) {
        throw genericError(`Parameter 'driver' does not accept value '${args.options.driver}'`);
      }
      const options = visitOptions(ctx.graph, args.options);
      const job = ctx.jobs.create(createJobDriver(ctx.graph, options), { id: args['job-id'], autoDismiss: false });
      job.start();
      return {};
    },
  }),
];
