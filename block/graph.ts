/*
 * The node graph: the registry of drivers and of open nodes, and the open,
 * probe, create and close paths (QEMU's block.c, much reduced).
 *
 * Opening takes blockdev-add style options (QEMU's key names, validated by
 * zod): the common keys, then the driver's; children are options objects
 * opened recursively, or names of nodes already in the graph. Children
 * inherit read-only, discard, cache.* and force-share from their parent
 * unless they set them; backing (COW) children are always read-only.
 *
 * Opening by filename, as qemu-img does, picks the protocol from a `proto:`
 * prefix (else `file`), accepts `json:{...}` pseudo-filenames, and probes
 * the format from the first bytes when none is given; a probed raw image
 * restricts writes to its first sector and the graph emits QEMU's warning
 * through `onWarning` when such an image is opened writable.
 *
 * Lifetime: a node lives while something holds an edge to it or the user
 * owns it (`userOwned`, set for nodes added by name, as blockdev-add does).
 * `unref` closes a node that nothing holds: drain, flush, driver close, then
 * its children in turn.
 */
import { BlockError, toBlockError } from './errors.js';
import { Perm, isPowerOfTwo } from './flags.js';
import { normaliseDriver, type BlockDriver, type CreateOptDesc, type NormalisedDriver, type OpenContext } from './driver.js';
import { MAX_ALIGNMENT_BYTES, flush, preadv, refreshLength } from './io.js';
import { JSON_FILENAME_PREFIX, parseJsonFilename, type OptionTree } from './keyval.js';
import { attachChild, BlockNode, ChildRole, detachChild, TransientParent, type ChildRoleFlags, type OpenFlags } from './node.js';
import { parseBaseOptions, parseWith, type BaseOptions, type BlockdevRef } from './options.js';
import { drain } from './drain.js';
import { describeFilename } from './filename.js';

/** Bytes read from an image to probe its format (BLOCK_PROBE_BUF_SIZE). */
export const PROBE_BUF_BYTES = 512;

/** What a parent passes down to the children it opens. */
export interface Inherited {
  readOnly?: boolean;
  unmap?: boolean;
  direct?: boolean;
  noFlush?: boolean;
  forceShare?: boolean;
  /** The format was probed, not given (raw then guards its first sector). */
  probed?: boolean;
  /** Host I/O on the calling thread (see OpenFlags.syncIo). */
  syncIo?: boolean;
  /** Open the top image without its backing file (BDRV_O_NO_BACKING); not passed to children. */
  noBacking?: boolean;
}

export interface OpenImageOptions {
  /** Format driver name (`-f`); probed from the content when absent. */
  format?: string;
  readOnly?: boolean;
  /** Extra options merged into the top node's (e.g. `{ 'detect-zeroes': 'on' }`). */
  options?: OptionTree;
  /** Options for the protocol node under a format (e.g. `{ 'cache': { direct: true } }`). */
  protocolOptions?: OptionTree;
  /** qemu-img -U: share all permissions with other users of the image. */
  forceShare?: boolean;
  /** Do not open the image's backing file (qemu-img info does not). */
  noBacking?: boolean;
  /** Flags every node of the image inherits unless its options say otherwise (qemu-io's -t, -d). */
  inherit?: Omit<Inherited, 'readOnly' | 'forceShare' | 'probed'>;
}

const PROTOCOL_PREFIX = /^([^:/\\]+):/;

export class BlockGraph {
  private readonly drivers = new Map<string, NormalisedDriver>();
  /** Every open node, by node name. */
  readonly nodes = new Map<string, BlockNode>();
  private autoNames = 0;

  /**
   * Receives warnings the block layer prints. Tools print them on stderr as
   * `prog: warning: message`, or as they are when `verbatim` (QEMU prints
   * a few, like raw's probing warning, with fprintf rather than warn_report),
   * or as `prog: message` when `error` (error_report of a failure that does
   * not fail the operation, like qcow2's cache flush at close).
   */
  onWarning: (message: string, opts?: { verbatim?: boolean; error?: boolean }) => void = () => {};
  /**
   * Default of OpenFlags.syncIo for nodes opened in this graph: tools that
   * issue one request at a time turn it on; servers leave it off.
   */
  syncIo = false;
  /**
   * User-created objects by id (`--object`), for drivers that name one in
   * their options (nbd's `tls-creds`). The tools put their registry here.
   */
  objects: ReadonlyMap<string, { qomType: string; id: string; props: Record<string, unknown> }> = new Map();

  constructor(drivers: readonly BlockDriver[]) {
    for (const d of drivers) this.drivers.set(d.name, normaliseDriver(d));
  }

  /**
   * A name for a node the user did not name (QEMU's id_generate(ID_BLOCK)):
   * `#block` and a counter shared by every such node, job filters included.
   * '#' cannot start a user's name, so only an earlier implicit node can
   * hold it.
   */
  implicitNodeName(): string {
    for (;;) {
      const name = `#block${String(++this.autoNames).padStart(3, '0')}`;
      if (!this.nodes.has(name)) return name;
    }
  }

  driverNames(): string[] {
    return [...this.drivers.keys()];
  }

  findDriver(name: string): NormalisedDriver | undefined {
    return this.drivers.get(name);
  }

  driver(name: string): NormalisedDriver {
    const d = this.drivers.get(name);
    if (!d) throw new BlockError('EINVAL', `Unknown driver '${name}'`);
    return d;
  }

  /**
   * Protocol driver for a filename (bdrv_find_protocol): a `proto:` prefix
   * (a colon before any slash) names it, else `file`.
   */
  protocolFor(filename: string): NormalisedDriver {
    const m = PROTOCOL_PREFIX.exec(filename);
    if (!m) return this.driver('file');
    for (const d of this.drivers.values()) if (d.protocolName === m[1] || d.protocolAliases.includes(m[1]!)) return d;
    throw new BlockError('EINVAL', `Unknown protocol '${m[1]}'`);
  }

  node(name: string): BlockNode {
    const n = this.nodes.get(name);
    if (!n) throw new BlockError('ENOENT', `Cannot find device='${name}' nor node-name='${name}'`);
    return n;
  }

  // ------------------------------------------------------------ open

  /** Opens a node from blockdev-add style options (or returns a named one). */
  async openNode(spec: BlockdevRef, inherit: Inherited = {}): Promise<BlockNode> {
    if (typeof spec === 'string') return this.node(spec);
    const options = spec as Record<string, unknown>;
    const driver = this.driver(typeof options.driver === 'string' ? options.driver : parseBaseOptions(options).base.driver);
    const unknownKey = (key: string) =>
      driver.protocolName !== undefined
        ? `Block protocol '${driver.name}' doesn't support the option '${key}'`
        : `Block format '${driver.name}' does not support the option '${key}'`;
    const { base, rest } = parseBaseOptions(options, unknownKey);
    const driverOptions = parseWith(driver.optionsSchema.strict(), rest, unknownKey) as Record<string, unknown>;
    const node = this.newNode(driver, base, inherit);
    node.options = spec as Record<string, unknown>;
    try {
      await driver.open(node, driverOptions, this.openContext(node, driverOptions, base, inherit));
      this.checkLimits(node);
      await refreshLength(node);
      node.filename = describeFilename(node);
    } catch (e) {
      await this.abandon(node);
      throw e;
    }
    return node;
  }

  private newNode(driver: NormalisedDriver, base: BaseOptions, inherit: Inherited): BlockNode {
    const name = base['node-name'];
    if (name !== undefined && this.nodes.has(name)) {
      throw new BlockError('EEXIST', `Duplicate nodes with node-name='${name}'`);
    }
    const discard = base.discard;
    const unmap = discard === undefined ? (inherit.unmap ?? false) : discard === 'unmap' || discard === 'on';
    const detectZeroes = base['detect-zeroes'] ?? 'off';
    if (detectZeroes === 'unmap' && !unmap) {
      throw new BlockError('EINVAL', 'setting detect-zeroes to unmap is not allowed without setting discard operation to unmap');
    }
    const flags: OpenFlags = {
      unmap,
      detectZeroes,
      direct: base.cache?.direct ?? inherit.direct ?? false,
      noFlush: base.cache?.['no-flush'] ?? inherit.noFlush ?? false,
      syncIo: inherit.syncIo ?? this.syncIo,
    };
    const readOnly = base['read-only'] ?? inherit.readOnly ?? false;
    const forceShare = base['force-share'] ?? inherit.forceShare ?? false;
    if (forceShare && !readOnly) {
      throw new BlockError('EINVAL', 'force-share=on can only be used with read-only images');
    }
    const nodeName = name ?? this.implicitNodeName();
    const node = new BlockNode(driver, nodeName, name === undefined, readOnly, flags);
    node.forceShare = forceShare;
    node.probed = inherit.probed ?? false;
    node.noBacking = inherit.noBacking ?? false;
    this.nodes.set(nodeName, node);
    return node;
  }

  private openContext(node: BlockNode, driverOptions: Record<string, unknown>, base: BaseOptions, inherit: Inherited): OpenContext {
    return {
      graph: this,
      openChild: async (name, role, opts = {}) => {
        const spec = driverOptions[name] as BlockdevRef | undefined | null;
        if (spec === undefined || spec === null) {
          if (opts.optional) return null;
          throw new BlockError('EINVAL', `A block device must be specified for "${name}"`);
        }
        const childInherit: Inherited = {
          readOnly: role & ChildRole.COW ? true : node.readOnly,
          // bdrv_inherited_options: children default to discard=unmap, whatever the
          // parent says (the parent's gate applies its own policy to its requests).
          unmap: true,
          direct: node.openFlags.direct,
          noFlush: node.openFlags.noFlush,
          syncIo: node.openFlags.syncIo,
          forceShare: base['force-share'] ?? inherit.forceShare,
        };
        const child = await this.openNode(spec, childInherit);
        try {
          return attachChild(node, name, role, child);
        } catch (e) {
          await this.unref(child);
          throw e;
        }
      },
    };
  }

  /** Attaches `child` under `parent`; the edge takes what the parent's driver derives for the role (block/perms.ts). */
  attach(parent: BlockNode, name: string, role: ChildRoleFlags, child: BlockNode) {
    return attachChild(parent, name, role, child);
  }

  private checkLimits(node: BlockNode): void {
    const align = node.limits.requestAlignment;
    if (!isPowerOfTwo(align) || align > MAX_ALIGNMENT_BYTES) {
      throw new BlockError('EINVAL', `Invalid request alignment ${align} (must be a power of two up to ${MAX_ALIGNMENT_BYTES})`);
    }
  }

  /** Undoes a failed open: children and registration. */
  private async abandon(node: BlockNode): Promise<void> {
    this.nodes.delete(node.nodeName);
    node.closed = true;
    for (const edge of [...node.children]) {
      detachChild(edge);
      await this.unref(edge.node);
    }
  }

  // ------------------------------------------------------------ open by filename

  /** Opens an image the way qemu-img and qemu-io do: filename, optional format. */
  async openImage(filename: string, opts: OpenImageOptions = {}): Promise<BlockNode> {
    const inherit: Inherited = {
      ...opts.inherit,
      readOnly: opts.readOnly ?? false,
      forceShare: opts.forceShare,
      noBacking: opts.noBacking,
    };
    if (filename.startsWith(JSON_FILENAME_PREFIX)) {
      const tree: OptionTree = { ...parseJsonFilename(filename), ...opts.options };
      if (opts.format !== undefined) tree.driver = opts.format;
      return this.openOptions(tree, inherit);
    }
    const protocol = this.protocolFor(filename);
    const protocolSpec: OptionTree = { driver: protocol.name, filename, ...opts.protocolOptions };
    if (opts.format === protocol.name) return this.openNode({ ...protocolSpec, ...opts.options }, inherit);
    if (opts.format !== undefined) {
      this.driver(opts.format);
      return this.openNode({ driver: opts.format, file: protocolSpec, ...opts.options }, inherit);
    }
    return this.openOptions({ ...opts.options, file: protocolSpec }, inherit);
  }

  /**
   * Opens an option tree as QEMU's bdrv_open does (`--image-opts`, json:):
   * children given by `filename` alone get the protocol their name implies,
   * and a tree without `driver` is probed from its `file` child.
   */
  async openOptions(tree: OptionTree, inherit: Inherited = {}): Promise<BlockNode> {
    this.fillChildDrivers(tree);
    if (tree.driver !== undefined) return this.openNode(tree, inherit);
    if (tree.file === undefined) throw new BlockError('EINVAL', 'Must specify either driver or file');
    // The protocol node becomes the format's `file` child: it inherits as one (discard=unmap).
    const file = await this.openNode(tree.file as BlockdevRef, { ...inherit, unmap: true });
    try {
      const format = await this.probeFormat(file, file.filename);
      return await this.openNode({ ...tree, driver: format, file: file.nodeName }, { ...inherit, probed: true });
    } catch (e) {
      await this.unref(file);
      throw e;
    }
  }

  /** bdrv_fill_options for children: `filename` without `driver` picks the protocol. */
  private fillChildDrivers(tree: OptionTree): void {
    for (const value of Object.values(tree)) {
      if (typeof value !== 'object' || value === null || Array.isArray(value)) continue;
      if (value.driver === undefined && typeof value.filename === 'string') {
        value.driver = this.protocolFor(value.filename).name;
      }
      this.fillChildDrivers(value);
    }
  }

  /** Picks the format driver whose probe scores highest on the first bytes of `file`. */
  async probeFormat(file: BlockNode, filename: string): Promise<string> {
    const header = new Uint8Array(Math.min(PROBE_BUF_BYTES, file.totalBytes));
    const reader = attachChild(new TransientParent('format probe'), 'probe', 0, file, Perm.CONSISTENT_READ, Perm.ALL);
    try {
      await preadv(reader, 0, header);
    } catch (e) {
      throw toBlockError(e, `Could not read image for determining its format`);
    } finally {
      detachChild(reader);
    }
    return this.bestProbe(header, filename);
  }

  /** The format whose probe scores highest for `header` (raw always scores 1). */
  bestProbe(header: Uint8Array, filename: string): string {
    let best = '';
    let bestScore = 0;
    for (const d of this.drivers.values()) {
      const score = d.probe ? d.probe(header, filename) : 0;
      if (score > bestScore) {
        best = d.name;
        bestScore = score;
      }
    }
    if (!best) throw new BlockError('ENOTSUP', 'Could not determine image format: No compatible format found');
    return best;
  }

  // ------------------------------------------------------------ lifetime

  /** Closes `node` if nothing holds it any more: drain, flush, close, then its children. */
  async unref(node: BlockNode): Promise<void> {
    if (node.closed || node.parents.length > 0 || node.userOwned) return;
    await this.closeNode(node);
  }

  /** Closes a node no parent holds (blockdev-del and unref). */
  async closeNode(node: BlockNode): Promise<void> {
    if (node.parents.length > 0) {
      const e = node.parents[0]!;
      throw new BlockError('EBUSY', `Node '${node.nodeName}' is busy: node is used as ${e.name} of ${e.parent.describe()}`);
    }
    if (node.closed) return;
    await drain(node);
    let failure: unknown = null;
    try {
      await flush(node);
    } catch (e) {
      failure = e;
    }
    try {
      await node.driver.close(node);
    } catch (e) {
      failure ??= e;
    }
    node.closed = true;
    this.nodes.delete(node.nodeName);
    for (const edge of [...node.children]) {
      detachChild(edge);
      await this.unref(edge.node);
    }
    if (failure) throw failure;
  }

  /**
   * Closes every node (bdrv_close_all, as a daemon does on quit): users'
   * edges are dropped first, then nodes are closed from the top down, so
   * each is flushed before the nodes under it. Returns the first failure
   * after closing everything.
   */
  async closeAll(): Promise<void> {
    let failure: unknown = null;
    for (let round = 0; this.nodes.size > 0 && round <= this.nodes.size + 1; round++) {
      const roots = [...this.nodes.values()].filter((n) => n.parents.every((e) => !(e.parent instanceof BlockNode)));
      for (const node of roots) {
        for (const edge of [...node.parents]) detachChild(edge);
        node.userOwned = false;
        await this.closeNode(node).catch((e: unknown) => (failure ??= e));
      }
    }
    if (failure) throw failure;
  }

  // ------------------------------------------------------------ create

  /** The `-o` options qemu-img create accepts for a format on a filename. */
  createOptsFor(format: string, filename: string): CreateOptDesc[] {
    const fmt = this.driver(format);
    const merged = [...(fmt.createOpts ?? [])];
    if (fmt.protocolName === undefined && !filename.startsWith(JSON_FILENAME_PREFIX)) {
      for (const o of this.protocolFor(filename).createOpts ?? []) {
        if (!merged.some((m) => m.name === o.name)) merged.push(o);
      }
    }
    return merged;
  }

  /** Creates an image (bdrv_create): the format driver's create, with its options by name. */
  async createImage(format: string, filename: string, opts: Map<string, string>): Promise<void> {
    const drv = this.driver(format);
    if (!drv.coCreate) throw new BlockError('ENOTSUP', `Format driver '${format}' does not support image creation`);
    await drv.coCreate({ graph: this }, { filename, opts });
  }

  /** Creates the protocol-level file under a format (bdrv_create_file). */
  async createFile(filename: string, opts: Map<string, string>): Promise<void> {
    const proto = this.protocolFor(filename);
    if (!proto.coCreate) throw new BlockError('ENOTSUP', `Protocol driver '${proto.name}' does not support image creation`);
    const own = new Set((proto.createOpts ?? []).map((o) => o.name));
    const filtered = new Map([...opts].filter(([k]) => own.has(k)));
    await proto.coCreate({ graph: this }, { filename, opts: filtered });
  }
}
