/*
 * qemu-block-ts — QEMU's block layer as a TypeScript library.
 *
 * Most programs need `openImage` / `Image` (read, write, zero, discard,
 * flush, block status, resize). The graph-level API (BlockGraph, BlockNode,
 * BlockBackend, drivers, the gate's flags) is exported for programs that
 * build node graphs themselves, as qemu-storage-daemon users do.
 */
export { createImage, Image, openImage, type Extent, type ImageCreateOptions, type ImageOpenOptions } from './image.js';
export { createImage as imgCreate, type CreateImageRequest } from './block/create.js';
export { allocatedFileSize, collectImageInfoList, queryImageInfo, type ImageInfo } from './block/info.js';
export { mapImage, type MapEntry, type MapOptions } from './block/map.js';
export { BlockError, ERRNO, isBlockError, strerror, type ErrnoCode } from './block/errors.js';
export { Perm, Req, Status, type Prealloc } from './block/flags.js';
export { BlockGraph, type Inherited, type OpenImageOptions } from './block/graph.js';
export { BlockBackend, type BackendOptions } from './block/backend.js';
export { BdrvChild, BlockNode, ChildRole, type BlockLimits, type OpenFlags } from './block/node.js';
export type {
  BlockDriver,
  BlockStatusResult,
  CreateOptDesc,
  DriverInfo,
  OpenContext,
  SpecificInfo,
} from './block/driver.js';
export { blockStatus, blockStatusAbove, type ChainStatusResult } from './block/status.js';
export { drain, drained, drainedBegin, drainedEnd } from './block/drain.js';
export { parseJsonFilename, parseKeyval, type OptionTree } from './block/keyval.js';
export { parseSize, sizeToStr } from './block/units.js';
export { blkdebugDriver, builtinDrivers, fileDriver, nullDriver, rawDriver } from './drivers/index.js';
