/*
 * Block graph commands: blockdev-add, blockdev-del, query-named-block-nodes,
 * query-block (QEMU 7.2's blockdev.c and block/qapi.c).
 *
 * blockdev-add takes a whole BlockdevOptions tree. QMP is typed, so before
 * the graph opens anything the tree is checked the way QAPI's visitor
 * would: `driver` present and known ("Parameter 'driver' does not accept
 * value 'x'"), the common keys of the right JSON type, no key the driver
 * does not take ("Parameter 'file.bar' is unexpected", with the full
 * name), nested node definitions checked the same. Then the root must have
 * a node-name ("'node-name' must be specified for the root node"), and the
 * graph opens it (its errors are QEMU's: "Could not open 'F': …",
 * "Duplicate nodes with node-name='a'"). The new node belongs to the
 * monitor until blockdev-del, which refuses nodes the monitor did not add
 * and nodes something still uses (an export, a parent node, a job).
 *
 * block_resize (qmp_block_resize): the node by node name (the daemon has
 * no named devices, so `device` never matches: "Cannot find device='x'
 * nor node-name='y'"), a size above -1 ("Parameter 'size' expects a >0
 * size"), no job holding it ("Device '(null)' is in use", QEMU printing
 * its NULL device name), then a BlockBackend taking resize alone (an
 * export, which shares no resize, refuses it with the permission conflict)
 * truncates it, drained, to the size (not exact, no preallocation).
 *
 * query-named-block-nodes gives each node's BlockDeviceInfo with the keys
 * qemu-storage-daemon reports (I/O limits are 0: a node itself is never
 * throttled); without `flat`, `image` carries the backing chain as nested
 * `backing-image`. query-block lists devices: the daemon has none.
 */
import { z } from 'zod';
import { BlockBackend } from '../block/backend.js';
import { drained } from '../block/drain.js';
import { Perm } from '../block/flags.js';
import type { BlockGraph } from '../block/graph.js';
import { truncate } from '../block/io.js';
import { queryImageInfo, type ImageInfo } from '../block/info.js';
import type { OptionTree } from '../block/keyval.js';
import { BlockNode } from '../block/node.js';
import { opBlockedError } from '../block/op-blockers.js';
import { baseOptionsSchema, isKeyvalInteger, qapiJsonType } from '../block/options.js';
import { defineCommand, genericError, type QmpCommand } from './command.js';
import type { Daemon } from './daemon.js';
import { QapiInputError } from './qapi-errors.js';

/** Keys holding a child node (a node name or a nested definition). */
const CHILD_KEYS = new Set(['file', 'backing', 'data-file', 'image']);
const BASE_KEYS = Object.keys(baseOptionsSchema.shape);

/** The common BlockdevOptions keys, typed as QMP sends them. */
const blockdevBase = z.looseObject({
  driver: z.string(),
  'node-name': z.string().optional(),
  discard: z.enum(['ignore', 'unmap']).optional(),
  cache: z.strictObject({ direct: z.boolean().optional(), 'no-flush': z.boolean().optional() }).optional(),
  'read-only': z.boolean().optional(),
  'auto-read-only': z.boolean().optional(),
  'force-share': z.boolean().optional(),
  'detect-zeroes': z.enum(['off', 'on', 'unmap']).optional(),
});

const blockdevDriver = z.looseObject({ driver: z.string() });

/** The JSON type a typed (QMP, JSON) driver option should have had, when `value` has another. */
function typeMismatch(schema: z.ZodType | undefined, value: unknown): string | null {
  const type = qapiJsonType(schema);
  if (type === 'boolean') return typeof value === 'boolean' ? null : 'boolean';
  if (type === 'integer') return typeof value === 'number' ? null : 'integer';
  return null;
}

/** QAPI's keyval visitor on an integer key given as text (--blockdev a=b): "Parameter 'a' expects integer", or null. */
function keyvalMismatch(schema: z.ZodType | undefined, value: unknown, name: string): string | null {
  if (qapiJsonType(schema) !== 'integer' || typeof value !== 'string' || isKeyvalInteger(value)) return null;
  return `Parameter '${name}' expects integer`;
}

/** QAPI's checks of one (nested) node definition at `prefix`. */
function checkBlockdevTree(graph: BlockGraph, tree: Record<string, unknown>, prefix: string, typed: boolean): void {
  const at = (key: string) => `${prefix}${key}`;
  if (typeof tree.driver !== 'string' && !typed) throw new QapiInputError(`Parameter '${at('driver')}' is missing`);
  const parsed = (typed ? blockdevBase : blockdevDriver).safeParse(tree, { reportInput: true });
  if (!parsed.success) {
    const issue = parsed.error.issues[0]!;
    const name = at(issue.path.map(String).join('.'));
    if (issue.code === 'invalid_type' && issue.input === undefined) throw new QapiInputError(`Parameter '${name}' is missing`);
    if (issue.code === 'invalid_value' && typeof issue.input === 'string') {
      throw new QapiInputError(`Parameter '${name}' does not accept value '${issue.input}'`);
    }
    if (issue.code === 'unrecognized_keys') throw new QapiInputError(`Parameter '${name}.${issue.keys[0]}' is unexpected`);
    throw new QapiInputError(`Invalid parameter type for '${name}', expected: ${issue.code === 'invalid_type' ? issue.expected : 'string'}`);
  }
  const driver = graph.findDriver(parsed.data.driver);
  if (!driver) throw new QapiInputError(`Parameter '${at('driver')}' does not accept value '${parsed.data.driver}'`);
  const shape = driver.optionsSchema.shape as Record<string, z.ZodType>;
  const allowed = new Set([...BASE_KEYS, ...Object.keys(shape)]);
  for (const [key, value] of Object.entries(tree)) {
    if (!allowed.has(key)) throw new QapiInputError(`Parameter '${at(key)}' is unexpected`);
    const mistyped = typed ? typeMismatch(shape[key], value) : null;
    if (mistyped) throw new QapiInputError(`Invalid parameter type for '${at(key)}', expected: ${mistyped}`);
    const notInteger = typed ? null : keyvalMismatch(shape[key], value, at(key));
    if (notInteger) throw new QapiInputError(notInteger);
    if (CHILD_KEYS.has(key) && typeof value === 'object' && value !== null && !Array.isArray(value)) {
      checkBlockdevTree(graph, value as Record<string, unknown>, `${at(key)}.`, typed);
    }
  }
  const problem = driver.qapiProblem(tree, prefix, typed);
  if (problem) throw new QapiInputError(problem);
}

/**
 * blockdev-add; `typed` false for --blockdev's keyval form, whose values
 * are strings the graph's option schemas convert.
 */
export async function blockdevAdd(d: Daemon, args: Record<string, unknown>, typed = true): Promise<void> {
  checkBlockdevTree(d.graph, args, '', typed);
  if (args['node-name'] === undefined) throw genericError("'node-name' must be specified for the root node");
  const node = await d.graph.openNode(structuredClone(args) as OptionTree);
  node.userOwned = true;
  recordOpened(d, node);
}

/**
 * Notes the order nodes finished opening (children before their parent),
 * for query-named-block-nodes: QEMU inserts each node at the head of its
 * list as it opens, so the newest comes first and a parent before the
 * children opened with it.
 */
function recordOpened(d: Daemon, node: BlockNode): void {
  if (d.nodeOpenSeq.has(node)) return;
  for (const edge of node.children) recordOpened(d, edge.node);
  d.nodeOpenSeq.set(node, ++d.nodeOpenCount);
}

/** The graph's nodes in QEMU's order: newest first (nodes opened by jobs, not recorded here, count as newest). */
function namedNodesInOrder(d: Daemon): BlockNode[] {
  const seq = (n: BlockNode) => d.nodeOpenSeq.get(n) ?? Number.MAX_SAFE_INTEGER;
  return [...d.graph.nodes.values()].sort((a, b) => seq(b) - seq(a));
}

/**
 * qmp_blockdev_del's checks, in its order: a BlockBackend (an export, a
 * job's own) uses it; a job holds it (op blockers); the monitor did not add
 * it; another node or a job edge still refers to it (QEMU's refcount).
 */
async function blockdevDel(d: Daemon, nodeName: string): Promise<void> {
  const node = d.graph.nodes.get(nodeName);
  if (!node) throw genericError(`Failed to find node with node-name='${nodeName}'`);
  if (node.parents.some((e) => !(e.parent instanceof BlockNode) && !e.parent.isJob)) throw genericError(`Node ${nodeName} is in use`);
  const blocked = opBlockedError(node);
  if (blocked) throw genericError(blocked.message);
  if (!node.userOwned) throw genericError(`Node ${nodeName} is not owned by the monitor`);
  if (node.parents.length > 0) throw genericError(`Block device ${nodeName} is in use`);
  node.userOwned = false;
  await d.graph.closeNode(node);
}

/** qmp_block_resize (see the note at the top). */
async function blockResize(d: Daemon, a: { device?: string; 'node-name'?: string; size: number }): Promise<void> {
  const node = a['node-name'] === undefined ? undefined : d.graph.nodes.get(a['node-name']);
  if (!node) throw genericError(`Cannot find device='${a.device ?? ''}' nor node-name='${a['node-name'] ?? ''}'`);
  if (a.size < 0) throw genericError("Parameter 'size' expects a >0 size");
  if (opBlockedError(node)) throw genericError(`Device '${a.device ?? '(null)'}' is in use`);
  const blk = new BlockBackend(d.graph, node, { perm: Perm.RESIZE, shared: Perm.ALL });
  try {
    await drained(node, () => truncate(blk.root, a.size, false, 'off'));
  } finally {
    await blk.close();
  }
}

// ------------------------------------------------------------ query-named-block-nodes

type ImageInfoTree = ImageInfo & { 'backing-image'?: ImageInfoTree };

async function imageInfoChain(node: BlockNode, flat: boolean): Promise<ImageInfoTree> {
  const info: ImageInfoTree = await queryImageInfo(node);
  const next = flat ? null : node.filterOrCowNode;
  if (next) info['backing-image'] = await imageInfoChain(next, flat);
  return info;
}

/** The nodes below `node` through filters and backing images (QEMU counts filters too). */
function backingDepth(node: BlockNode): number {
  let depth = 0;
  for (let n = node.filterOrCowNode; n; n = n.filterOrCowNode) depth++;
  return depth;
}

function dirtyBitmapsInfo(node: BlockNode): Record<string, unknown>[] | undefined {
  if (node.dirtyBitmaps.length === 0) return undefined;
  return node.dirtyBitmaps
    .filter((bm) => bm.name !== null)
    .map((bm) => ({
      name: bm.name,
      recording: bm.recording,
      persistent: bm.persistent,
      busy: bm.busy,
      granularity: bm.granularityBytes,
      count: bm.dirtyBytes,
      ...(bm.inconsistent ? { inconsistent: true } : {}),
    }));
}

/** bdrv_block_device_info. */
export async function blockDeviceInfo(node: BlockNode, flat: boolean): Promise<Record<string, unknown>> {
  const backingFile = node.cowChild?.node.filename;
  const info: Record<string, unknown> = {
    file: node.filename,
    'node-name': node.nodeName,
    ro: node.readOnly,
    drv: node.driver.name,
    ...(backingFile ? { backing_file: backingFile } : {}),
    backing_file_depth: flat ? 0 : backingDepth(node),
    encrypted: false,
    detect_zeroes: node.openFlags.detectZeroes,
    bps: 0,
    bps_rd: 0,
    bps_wr: 0,
    iops: 0,
    iops_rd: 0,
    iops_wr: 0,
    image: await imageInfoChain(node, flat),
    cache: { writeback: true, direct: node.openFlags.direct, 'no-flush': node.openFlags.noFlush },
    write_threshold: 0,
  };
  const bitmaps = dirtyBitmapsInfo(node);
  if (bitmaps) info['dirty-bitmaps'] = bitmaps;
  return info;
}

export const blockCommands: QmpCommand<Daemon>[] = [
  defineCommand({
    name: 'blockdev-add',
    args: z.record(z.string(), z.unknown()),
    run: (d: Daemon, args: Record<string, unknown>) => blockdevAdd(d, args),
  }),
  defineCommand({
    name: 'blockdev-del',
    args: z.strictObject({ 'node-name': z.string() }),
    run: (d: Daemon, args: { 'node-name': string }) => blockdevDel(d, args['node-name']),
  }),
  defineCommand({
    name: 'block_resize',
    args: z.strictObject({ device: z.string().optional(), 'node-name': z.string().optional(), size: z.number().int() }),
    run: (d: Daemon, args: { device?: string; 'node-name'?: string; size: number }) => blockResize(d, args),
  }),
  defineCommand({
    name: 'query-named-block-nodes',
    args: z.strictObject({ flat: z.boolean().optional() }),
    async run(d: Daemon, args: { flat?: boolean }) {
      const list = [];
      for (const node of namedNodesInOrder(d)) list.push(await blockDeviceInfo(node, args.flat ?? false));
      return list;
    },
  }),
  defineCommand({
    name: 'query-block',
    args: z.strictObject({}),
    run: () => [],
  }),
];
