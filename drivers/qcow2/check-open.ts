/*
 * Opening an image for `qemu-img check` (img_open with BDRV_O_CHECK).
 *
 * The format is decided as qemu-img decides it: `-f`, the `driver` of an
 * --image-opts or json: option tree, or probing. A qcow2 image is not
 * opened through a qcow2 driver: its protocol node (`file`) is opened by
 * the graph and the check reads the metadata from it (check-state.ts),
 * read-write only for a repair. Probing recognises qcow2 by its magic
 * first, so this works whether or not a qcow2 driver is registered. Any
 * other format is opened by the graph as usual; it has no check, which
 * the caller reports (exit status 63).
 *
 * Backing files. qemu-img 7.2 opens the backing chain of the image it
 * checks (without BDRV_O_CHECK), so a missing or unusable backing file
 * fails the check: "Could not open 'x': Could not open backing file: …".
 * An empty backing file name means no backing file, as in QEMU.
 * The chain is followed the same way here: each backing file by its full
 * name, with its stored format or probed, read-only; a qcow2 one has its
 * header validated as a normal open would (decodeHeaderCluster) and its
 * own backing file followed; other formats are opened by the graph. QEMU
 * 7.2 loops forever on a chain that comes back to itself (and grows
 * without bound); here the second visit of a file is an error, with
 * qemu-img info's wording: "Backing file 'X' creates an infinite loop.".
 * Each backing node is closed as soon as it has been looked at.
 *
 * Not supported for qcow2 here: options of the qcow2 node itself (cache
 * sizes, overlap checks, `backing`); they are ignored.
 */
import fs from 'node:fs';
import { BlockError, toBlockError } from '../../block/errors.js';
import { fullBackingFilename } from '../../block/create.js';
import { Perm } from '../../block/flags.js';
import type { BlockGraph, Inherited } from '../../block/graph.js';
import { JSON_FILENAME_PREFIX, parseJsonFilename, parseKeyval, type OptionTree } from '../../block/keyval.js';
import { attachChild, detachChild, TransientParent, type BdrvChild, type BlockNode } from '../../block/node.js';
import type { BlockdevRef } from '../../block/options.js';
import { checkFileOf, readAt, type CheckReport } from './check-io.js';
import { Qcow2Checker } from './check.js';
import { ByteReader } from './cursor.js';
import { HeaderBytes, QCOW2_MAGIC, Qcow2Version } from './format.js';
import { decodeHeaderCluster, headerClusterBytes } from './header.js';
import { reasonToError } from './validate.js';

export interface CheckOpenRequest {
  filename: string;
  /** `-f`. */
  format?: string;
  /** `--image-opts`. */
  imageOpts?: boolean;
  /** `-U`. */
  forceShare?: boolean;
  /** `-r`: open read-write. */
  repair: boolean;
  /** `-T`: cache.direct and cache.no-flush. */
  direct?: boolean;
  noFlush?: boolean;
}

export type CheckTarget =
  | { kind: 'qcow2'; checker: Qcow2Checker; close(): Promise<void> }
  | { kind: 'other'; node: BlockNode; close(): Promise<void> };

/** Opens `req.filename` for a check; failures carry qemu-img's "Could not open 'NAME': " prefix. */
export async function openForCheck(graph: BlockGraph, req: CheckOpenRequest, report: CheckReport): Promise<CheckTarget> {
  const inherit: Inherited = { readOnly: !req.repair, forceShare: req.forceShare, direct: req.direct, noFlush: req.noFlush };
  try {
    if (req.forceShare && req.repair) throw new BlockError('EINVAL', 'force-share=on can only be used with read-only images');
    return await openTree(graph, optionTree(graph, req), inherit, req, report);
  } catch (e) {
    if (!(e instanceof BlockError)) throw e;
    throw new BlockError(e.code, `Could not open '${req.filename}': ${e.message}`, { cause: e });
  }
}

/** The options qemu-img's img_open would pass to bdrv_open. */
function optionTree(graph: BlockGraph, req: CheckOpenRequest): OptionTree {
  if (req.imageOpts) return parseKeyval(req.filename, 'file');
  if (req.filename.startsWith(JSON_FILENAME_PREFIX)) {
    const tree = parseJsonFilename(req.filename);
    return req.format === undefined ? tree : { ...tree, driver: req.format };
  }
  const file: OptionTree = { driver: graph.protocolFor(req.filename).name, filename: req.filename };
  if (req.format === file.driver) return file;
  return req.format === undefined ? { file } : { driver: req.format, file };
}

async function openTree(graph: BlockGraph, tree: OptionTree, inherit: Inherited, req: CheckOpenRequest, report: CheckReport): Promise<CheckTarget> {
  if (tree.driver !== undefined && tree.driver !== 'qcow2') return other(graph, await graph.openOptions(tree, inherit));
  if (tree.driver === undefined && tree.file === undefined) return other(graph, await graph.openOptions(tree, inherit));
  // QEMU opens the file child of a format with discard=unmap by default (bdrv_inherited_options).
  const fileNode = await openFileChild(graph, tree.file as BlockdevRef | undefined, { ...inherit, unmap: true });
  try {
    if (tree.driver === undefined && !(await isQcow2(fileNode))) {
      const format = await graph.probeFormat(fileNode, fileNode.filename);
      return other(graph, await graph.openNode({ ...tree, driver: format, file: fileNode.nodeName }, { ...inherit, probed: true }));
    }
    return await openQcow2(graph, fileNode, req, report);
  } catch (e) {
    await graph.unref(fileNode);
    throw e;
  }
}

/** The `file` child of the image: a node name, or options (a protocol picked from `filename` when no driver is given). */
async function openFileChild(graph: BlockGraph, spec: BlockdevRef | undefined, inherit: Inherited): Promise<BlockNode> {
  if (spec === undefined || spec === null) throw new BlockError('EINVAL', 'A block device must be specified for "file"');
  if (typeof spec === 'string') return graph.openNode(spec, inherit);
  const tree = { ...(spec as OptionTree) };
  if (tree.driver === undefined && typeof tree.filename === 'string') tree.driver = graph.protocolFor(tree.filename).name;
  return graph.openOptions(tree, inherit);
}

function other(graph: BlockGraph, node: BlockNode): CheckTarget {
  return { kind: 'other', node, close: () => graph.unref(node) };
}

/** QEMU's qcow2_probe: the magic and a version of at least 2. */
async function isQcow2(node: BlockNode): Promise<boolean> {
  const head = await readHead(node, 8);
  const r = new ByteReader(head);
  return r.u32() === QCOW2_MAGIC && r.u32() >= Qcow2Version.V2;
}

async function readHead(node: BlockNode, bytes: number): Promise<Uint8Array> {
  const edge = attachChild(new TransientParent('qemu-img check'), 'probe', 0, node, Perm.CONSISTENT_READ, Perm.ALL);
  try {
    const buf = new Uint8Array(bytes);
    await readAt(checkFileOf(edge), 0, buf);
    return buf;
  } finally {
    detachChild(edge);
  }
}

async function openQcow2(graph: BlockGraph, fileNode: BlockNode, req: CheckOpenRequest, report: CheckReport): Promise<CheckTarget> {
  const perm = Perm.CONSISTENT_READ | (req.repair ? Perm.WRITE | Perm.RESIZE : 0);
  const shared = req.forceShare ? Perm.ALL : Perm.CONSISTENT_READ | Perm.WRITE_UNCHANGED;
  const edge: BdrvChild = attachChild(new TransientParent('qemu-img check'), 'file', 0, fileNode, perm, shared);
  const close = async () => {
    detachChild(edge);
    await graph.unref(fileNode);
  };
  try {
    const checker = await Qcow2Checker.open(checkFileOf(edge), report, { warn: (m) => graph.onWarning(m) });
    if (typeof checker === 'string') throw reasonToError(checker);
    const backingName = checker.state.image.backingName;
    if (backingName) {
      const format = checker.state.image.extensions.backingFormat ?? undefined;
      await openBacking(graph, fullBackingFilename(fileNode.filename, backingName), format, req.forceShare, new Set([identity(fileNode.filename)]));
    }
    return {
      kind: 'qcow2',
      checker,
      close: async () => {
        try {
          await checker.close();
        } finally {
          await close();
        }
      },
    };
  } catch (e) {
    detachChild(edge);
    throw e;
  }
}

/** A file's identity for loop detection: its real path when it has one. */
function identity(filename: string): string {
  try {
    return fs.realpathSync(filename);
  } catch {
    return filename;
  }
}

/** Opens (and closes) one backing file and, for qcow2, its own chain; errors get "Could not open backing file: ". */
async function openBacking(graph: BlockGraph, filename: string, format: string | undefined, forceShare: boolean | undefined, seen: Set<string>): Promise<void> {
  const inherit: Inherited = { readOnly: true, forceShare };
  try {
    const id = identity(filename);
    if (seen.has(id)) throw new BlockError('ELOOP', `Backing file '${filename}' creates an infinite loop.`);
    seen.add(id);
    const file = await graph.openImage(filename, { format: graph.protocolFor(filename).name, readOnly: true, forceShare });
    try {
      const qcow2 = format === 'qcow2' || (format === undefined && (await isQcow2(file)));
      if (qcow2) {
        await followQcow2Backing(graph, file, forceShare, seen);
      } else {
        const probed = format ?? (await graph.probeFormat(file, filename));
        const node = await graph.openNode({ driver: probed, file: file.nodeName }, { ...inherit, probed: format === undefined });
        await graph.unref(node);
      }
    } finally {
      await graph.unref(file);
    }
  } catch (e) {
    const err = toBlockError(e);
    throw new BlockError(err.code, `Could not open backing file: ${err.message}`, { cause: e });
  }
}

/** A qcow2 backing file: its header as a normal open validates it, then its own backing file. */
async function followQcow2Backing(graph: BlockGraph, file: BlockNode, forceShare: boolean | undefined, seen: Set<string>): Promise<void> {
  const prefix = await readHead(file, HeaderBytes.V3);
  const cluster = await readHead(file, Math.min(headerClusterBytes(prefix), file.totalBytes));
  const image = decodeHeaderCluster(cluster, file.totalBytes);
  if (typeof image === 'string') throw reasonToError(image);
  if (!image.backingName) return;
  const format = image.extensions.backingFormat ?? undefined;
  await openBacking(graph, fullBackingFilename(file.filename, image.backingName), format, forceShare, seen);
}
