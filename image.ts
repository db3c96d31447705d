/*
 * The friendly face of the library: open an image by file name and read,
 * write, zero, discard, flush, ask block status, resize and close it, with
 * byte offsets and lengths and no graph plumbing. Everything here is a thin
 * layer over BlockGraph (open/probe), BlockBackend (checked requests) and
 * blockStatusAbove; programs that need the graph use those directly.
 */
import { BlockBackend } from './block/backend.js';
import { Req, Status, type Prealloc } from './block/flags.js';
import { BlockGraph } from './block/graph.js';
import type { OptionTree } from './block/keyval.js';
import type { BlockNode } from './block/node.js';
import { builtinDrivers } from './drivers/index.js';
import { createImage as imgCreate } from './block/create.js';
import { queryImageInfo, type ImageInfo } from './block/info.js';
import { mapImage, type MapEntry } from './block/map.js';

export interface ImageOpenOptions {
  /** Format driver (`raw`, `qcow2`, …); probed from the content when absent. */
  format?: string;
  readOnly?: boolean;
  /** true (default): writes may sit in caches until flush. false: every write is FUA (writethrough). */
  writeback?: boolean;
  /** `unmap` lets discard and zero-with-unmap deallocate (QEMU's discard=unmap); default `ignore`. */
  discard?: 'ignore' | 'unmap';
  detectZeroes?: 'off' | 'on' | 'unmap';
  /** Share write permissions with other users of the same node (qemu-img -U). */
  forceShare?: boolean;
  /** Extra blockdev options for the top node, QEMU's key names. */
  options?: OptionTree;
  /** The graph to open in (default: a new one with the built-in drivers). */
  graph?: BlockGraph;
}

/** One run of bytes with the same status. */
export interface Extent {
  offset: number;
  length: number;
  /** Reads come from stored data. */
  data: boolean;
  /** Reads return zeroes. */
  zero: boolean;
  /** Some layer of the chain decides the content. */
  allocated: boolean;
  /** Layer that holds it: 1 = this image, 2 = its backing file, …; 0 = none. */
  depth: number;
  /** Offset in the host file holding the data, when known. */
  hostOffset?: number;
}

export class Image {
  private constructor(
    readonly graph: BlockGraph,
    readonly backend: BlockBackend,
  ) {}

  static async open(filename: string, opts: ImageOpenOptions = {}): Promise<Image> {
    const graph = opts.graph ?? new BlockGraph(builtinDrivers);
    const options: OptionTree = { ...opts.options };
    if (opts.discard) options.discard = opts.discard;
    if (opts.detectZeroes) options['detect-zeroes'] = opts.detectZeroes;
    const node = await graph.openImage(filename, {
      format: opts.format,
      readOnly: opts.readOnly ?? false,
      forceShare: opts.forceShare,
      options,
    });
    const backend = new BlockBackend(graph, node, {
      writable: !opts.readOnly,
      resizable: !opts.readOnly,
      writeCache: opts.writeback ?? true,
    });
    return new Image(graph, backend);
  }

  get node(): BlockNode {
    return this.backend.node;
  }

  /** Virtual size in bytes. */
  get size(): number {
    return this.backend.getLength();
  }

  async read(offsetBytes: number, lengthBytes: number): Promise<Uint8Array> {
    const buf = new Uint8Array(lengthBytes);
    await this.backend.pread(offsetBytes, buf);
    return buf;
  }

  readInto(offsetBytes: number, buf: Uint8Array): Promise<void> {
    return this.backend.pread(offsetBytes, buf);
  }

  /**
   * Writes `data`. `compressed` (qcow2): whole clusters from a cluster
   * boundary (a partial one only at the end of the image) into unallocated
   * clusters, each stored deflated unless that does not make it smaller; an
   * empty `data` ends a compressed stream (pads the file to whole sectors).
   */
  write(offsetBytes: number, data: Uint8Array, opts: { fua?: boolean; compressed?: boolean } = {}): Promise<void> {
    const flags = (opts.fua ? Req.FUA : 0) | (opts.compressed ? Req.WRITE_COMPRESSED : 0);
    return this.backend.pwrite(offsetBytes, data, flags);
  }

  /** Zeroes a range; `unmap` lets it be deallocated, `noFallback` fails (ENOTSUP) unless it is fast. */
  writeZeroes(
    offsetBytes: number,
    lengthBytes: number,
    opts: { unmap?: boolean; fua?: boolean; noFallback?: boolean } = {},
  ): Promise<void> {
    const flags = (opts.unmap ? Req.MAY_UNMAP : 0) | (opts.fua ? Req.FUA : 0) | (opts.noFallback ? Req.NO_FALLBACK : 0);
    return this.backend.pwriteZeroes(offsetBytes, lengthBytes, flags);
  }

  discard(offsetBytes: number, lengthBytes: number): Promise<void> {
    return this.backend.pdiscard(offsetBytes, lengthBytes);
  }

  flush(): Promise<void> {
    return this.backend.flush();
  }

  resize(sizeBytes: number, prealloc: Prealloc = 'off'): Promise<void> {
    return this.backend.truncate(sizeBytes, true, prealloc);
  }

  /** Status of the run of bytes starting at `offsetBytes` (at most `lengthBytes`). */
  async status(offsetBytes: number, lengthBytes: number): Promise<Extent> {
    const r = await this.backend.blockStatusAbove(offsetBytes, lengthBytes);
    return {
      offset: offsetBytes,
      length: r.pnum,
      data: (r.status & Status.DATA) !== 0,
      zero: (r.status & Status.ZERO) !== 0,
      allocated: (r.status & Status.ALLOCATED) !== 0,
      depth: r.depth,
      ...(r.status & Status.OFFSET_VALID && r.map !== undefined ? { hostOffset: r.map } : {}),
    };
  }

  /** Every extent of [offset, offset + length); cost grows with the number of extents, not the size. */
  async *extents(offsetBytes = 0, lengthBytes = this.size - offsetBytes): AsyncGenerator<Extent> {
    const end = offsetBytes + lengthBytes;
    for (let at = offsetBytes; at < end; ) {
      const e = await this.status(at, end - at);
      if (e.length === 0) return;
      yield e;
      at += e.length;
    }
  }

  /** What `qemu-img info --output=json` reports for the image. */
  info(): Promise<ImageInfo> {
    return queryImageInfo(this.node);
  }

  /** What `qemu-img map --output=json` reports (merged entries, depth 0 = this image). */
  map(opts: { startOffset?: number; maxLength?: number } = {}): AsyncGenerator<MapEntry> {
    return mapImage(this.node, { ...opts, mode: 'json' });
  }

  /** Flushes and closes the image (and everything it opened). */
  async close(): Promise<void> {
    await this.backend.close();
  }
}

/** Opens an image file (see ImageOpenOptions). */
export function openImage(filename: string, opts: ImageOpenOptions = {}): Promise<Image> {
  return Image.open(filename, opts);
}

export interface ImageCreateOptions {
  /** Format driver (default `raw`). */
  format?: string;
  /** Virtual size in bytes. */
  sizeBytes: number;
  /** `qemu-img create -o` options by name (e.g. `{ preallocation: 'falloc' }`). */
  options?: Record<string, string | number | boolean>;
  graph?: BlockGraph;
}

/** Creates an image file, as `qemu-img create -q` does. */
export async function createImage(filename: string, opts: ImageCreateOptions): Promise<void> {
  const graph = opts.graph ?? new BlockGraph(builtinDrivers);
  const options = Object.entries(opts.options ?? {}).map(
    ([k, v]) => [k, typeof v === 'boolean' ? (v ? 'on' : 'off') : String(v)] as const,
  );
  await imgCreate(graph, { format: opts.format ?? 'raw', filename, sizeBytes: opts.sizeBytes, options, quiet: true });
}
