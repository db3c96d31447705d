/*
 * What qemu-img info reports about an image (QEMU's bdrv_query_image_info
 * in block/qapi.c, and collect_image_info_list in qemu-img.c).
 *
 * `queryImageInfo` builds QAPI's ImageInfo for one node: virtual size (the
 * node's length), filename, format, the bytes the image occupies on the host
 * (`actual-size`, absent when unknown), and what the driver knows about
 * itself (cluster size, dirty flag, backing file, format-specific data).
 *
 * Key order. qemu-img's JSON lists members in QDict hash-bucket order (see
 * block/qjson.ts), not in schema order. The object is built in that
 * order — for every key ImageInfo can have — so that a program printing it
 * with JSON.stringify sees what qemu-img prints:
 *   snapshots, backing-filename-format, virtual-size, filename,
 *   cluster-size, format, actual-size, format-specific,
 *   full-backing-filename, encrypted, backing-filename, dirty-flag.
 *
 * `dirty-flag` is present whenever the driver answers get_info; QEMU leaves
 * it out for drivers that cannot (null-co, and raw over null-co). `encrypted` waits for drivers that
 * have it. `snapshots` (block/snapshot.ts) is present when the image has
 * internal snapshots.
 *
 * Backing files: a format with a backing file reports, through getInfo(),
 * the name stored in the image and its format (`DriverBackingInfo`); the
 * full name is resolved against the image's own directory. The chain walker
 * opens each image by itself (the opener decides how, e.g. qemu-img's
 * img_open without backing files) and follows full names, refusing loops.
 */
import { BlockError } from './errors.js';
import type { DriverInfo, SpecificInfo } from './driver.js';
import { ChildRole, type BlockNode } from './node.js';
import { fullBackingFilename } from './create.js';
import { querySnapshotInfoList, type SnapshotInfoQapi } from './snapshot.js';

/** QAPI ImageInfo, members in qemu-img 7.2's JSON order (absent = not reported). */
export interface ImageInfo {
  snapshots?: SnapshotInfoQapi[];
  'backing-filename-format'?: string;
  'virtual-size': number;
  filename: string;
  'cluster-size'?: number;
  format: string;
  'actual-size'?: number;
  'format-specific'?: SpecificInfo;
  'full-backing-filename'?: string;
  encrypted?: boolean;
  'backing-filename'?: string;
  'dirty-flag'?: boolean;
}

/** What a format with a backing file adds to its getInfo() answer (QEMU's bs->backing_file/format). */
export interface DriverBackingInfo {
  /** The backing file name as stored in the image ('' or absent: none). */
  backingFile?: string;
  /** The backing format stored in the image, if any. */
  backingFormat?: string;
}

/** bdrv_query_image_info for one node. */
export async function queryImageInfo(node: BlockNode): Promise<ImageInfo> {
  const answer: (DriverInfo & DriverBackingInfo) | null = node.driver.getInfo(node);
  const driverInfo = answer ?? {};
  // A filter answers for its child, but has no backing file name of its own (bs->backing_file).
  const backing = driverInfo.backingFile && !node.driver.isFilter ? driverInfo : undefined;
  const info: ImageInfo = {
    snapshots: await querySnapshotInfoList(node),
    'backing-filename-format': backing?.backingFormat || undefined,
    'virtual-size': node.totalBytes,
    filename: node.filename,
    'cluster-size': driverInfo.clusterBytes || undefined,
    format: node.driver.name,
    'actual-size': await allocatedFileSize(node),
    'format-specific': node.driver.getSpecificInfo(node),
    'full-backing-filename': backing ? fullBackingFilename(node.filename, backing.backingFile!) : undefined,
    encrypted: undefined,
    'backing-filename': backing?.backingFile,
    'dirty-flag': answer ? (answer.isDirty ?? false) : undefined,
  };
  return dropAbsent(info);
}

function dropAbsent<T extends object>(obj: T): T {
  for (const key of Object.keys(obj) as Array<keyof T>) if (obj[key] === undefined) delete obj[key];
  return obj;
}

/**
 * Bytes the node occupies on the host (bdrv_get_allocated_file_size): the
 * driver's answer; unknown for protocols without one; a filter's child's;
 * else the sum over the children holding data or metadata (unknown if any
 * of them is unknown).
 */
export async function allocatedFileSize(node: BlockNode): Promise<number | undefined> {
  if (node.driver.getAllocatedFileSize) return node.driver.getAllocatedFileSize(node);
  if (node.driver.protocolName !== undefined) return undefined;
  if (node.driver.isFilter) {
    const filtered = node.filteredChild;
    return filtered ? allocatedFileSize(filtered.node) : undefined;
  }
  let sumBytes = 0;
  for (const child of node.children) {
    if (!(child.role & (ChildRole.DATA | ChildRole.METADATA | ChildRole.FILTERED))) continue;
    const childBytes = await allocatedFileSize(child.node);
    if (childBytes === undefined) return undefined;
    sumBytes += childBytes;
  }
  return sumBytes;
}

/** An open image the chain walker may query and must close. */
export interface OpenedImage {
  node: BlockNode;
  close(): Promise<void>;
}

/** Opens one image of a chain; `top` is true for the image the user named. */
export type ChainOpener = (filename: string, format: string | undefined, top: boolean) => Promise<OpenedImage>;

/**
 * collect_image_info_list: the info of `filename` and, with `chain`, of each
 * backing file in turn, each opened on its own.
 */
export async function collectImageInfoList(
  open: ChainOpener,
  filename: string,
  format: string | undefined,
  chain: boolean,
): Promise<ImageInfo[]> {
  const seen = new Set<string>();
  const list: ImageInfo[] = [];
  let next: { filename: string; format: string | undefined } | null = { filename, format };
  while (next) {
    if (seen.has(next.filename)) {
      throw new BlockError('ELOOP', `Backing file '${next.filename}' creates an infinite loop.`);
    }
    seen.add(next.filename);
    const image = await open(next.filename, next.format, list.length === 0);
    try {
      list.push(await queryImageInfo(image.node));
    } finally {
      await image.close();
    }
    next = chain ? backingOf(list[list.length - 1]!) : null;
  }
  return list;
}

function backingOf(info: ImageInfo): { filename: string; format: string | undefined } | null {
  const full = info['full-backing-filename'];
  if (full !== undefined) return { filename: full, format: info['backing-filename-format'] };
  if (info['backing-filename'] !== undefined) {
    throw new BlockError(
      'EINVAL',
      `Could not determine absolute backing filename, but backing filename '${info['backing-filename']}' present`,
    );
  }
  return null;
}
