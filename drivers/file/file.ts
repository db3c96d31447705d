/*
 * The `file` protocol driver: host files and block devices (QEMU's
 * file-posix).
 *
 * I/O is positioned (FileHandle read/write at an offset); short reads past
 * the end of the file are zero-filled, because the gate may read the whole
 * last aligned block. Flush is fdatasync. FUA is emulated by the gate.
 *
 * Holes: block status asks SEEK_DATA/SEEK_HOLE (native helper) and reports
 * data as DATA and holes as ZERO, both at the same offset in this node.
 * Write-zeroes with MAY_UNMAP punches a hole (and extends the file if the
 * range runs past its end); without it, FALLOC_FL_ZERO_RANGE keeps the
 * range allocated; where the host cannot do either, ENOTSUP lets the gate
 * write zero buffers. Discard punches holes. Without the native helper the
 * whole file is data and these operations fall back, correctly if slower.
 *
 * Create truncates to zero, then grows to the size (rounded up to a whole
 * sector, as QEMU) with the requested preallocation: off (sparse) and falloc
 * (fallocate) also write zeroes over the first block so that, as with QEMU,
 * alignment probing finds data there; full writes zeroes everywhere.
 *
 * cache.direct (O_DIRECT) needs aligned memory, which Node cannot promise,
 * so it is refused with ENOTSUP rather than silently ignored.
 */
import fs from 'node:fs';
import { z } from 'zod';
import { BlockError, toBlockError } from '../../block/errors.js';
import { Req, Status, alignUp, type Prealloc } from '../../block/flags.js';
import type { BlockDriver, CreateOptDesc } from '../../block/driver.js';
import type { BlockNode } from '../../block/node.js';
import { SECTOR_BYTES } from '../../block/io.js';
import { loadHostIo, type HostIo } from './host-io.js';
import { writeZeroBuffer } from './zero-fill.js';

/** Bytes QEMU writes at the start of a new file so alignment probing sees data (allocate_first_block). */
export const FIRST_BLOCK_BYTES = 4096;

interface FileState {
  fh: fs.promises.FileHandle;
  host: HostIo;
  isBlockDevice: boolean;
}

const state = (node: BlockNode) => node.opaque as FileState;

const optionsSchema = z.object({
  filename: z.string({ error: "Parameter 'filename' is required" }),
});

export const FILE_CREATE_OPTS: readonly CreateOptDesc[] = [
  { name: 'size', type: 'size', help: 'Virtual disk size' },
  { name: 'preallocation', type: 'string', help: 'Preallocation mode (allowed values: off, falloc, full)' },
];

async function open(node: BlockNode, options: Record<string, unknown>): Promise<void> {
  const { filename } = options as z.output<typeof optionsSchema>;
  if (node.openFlags.direct) {
    throw new BlockError('ENOTSUP', `Could not open '${filename}': cache.direct=on is not supported`);
  }
  let fh: fs.promises.FileHandle;
  try {
    fh = await fs.promises.open(filename, node.readOnly ? 'r' : 'r+');
  } catch (e) {
    throw toBlockError(e, `Could not open '${filename}'`);
  }
  const st = await fh.stat();
  if (st.isDirectory()) {
    await fh.close();
    throw new BlockError('EISDIR', `Could not open '${filename}': Is a directory`);
  }
  node.opaque = { fh, host: loadHostIo(), isBlockDevice: st.isBlockDevice() } satisfies FileState;
  node.filename = filename;
  node.supportedZeroFlags = Req.MAY_UNMAP | Req.NO_FALLBACK;
}

async function getLength(node: BlockNode): Promise<number> {
  const s = state(node);
  if (s.isBlockDevice) return s.host.sizeBytes(s.fh.fd);
  return (await s.fh.stat()).size;
}

async function coPreadv(node: BlockNode, offsetBytes: number, buf: Uint8Array): Promise<void> {
  const { fh } = state(node);
  let done = 0;
  while (done < buf.length) {
    const { bytesRead } = await fh.read(buf, done, buf.length - done, offsetBytes + done);
    if (bytesRead === 0) {
      buf.fill(0, done);
      return;
    }
    done += bytesRead;
  }
}

async function coPwritev(node: BlockNode, offsetBytes: number, buf: Uint8Array): Promise<void> {
  const { fh } = state(node);
  let done = 0;
  while (done < buf.length) {
    const { bytesWritten } = await fh.write(buf, done, buf.length - done, offsetBytes + done);
    done += bytesWritten;
  }
}

async function coPwriteZeroes(node: BlockNode, offsetBytes: number, bytes: number, flags: number): Promise<void> {
  const s = state(node);
  if (flags & Req.MAY_UNMAP && !s.isBlockDevice) {
    const length = (await s.fh.stat()).size;
    await s.host.punchHole(s.fh.fd, offsetBytes, bytes);
    if (offsetBytes + bytes > length) await s.fh.truncate(offsetBytes + bytes);
    return;
  }
  await s.host.zeroRange(s.fh.fd, offsetBytes, bytes);
}

async function coPdiscard(node: BlockNode, offsetBytes: number, bytes: number): Promise<void> {
  const s = state(node);
  const length = (await s.fh.stat()).size;
  if (offsetBytes >= length) return;
  await s.host.punchHole(s.fh.fd, offsetBytes, Math.min(bytes, length - offsetBytes));
}

async function coFlushToDisk(node: BlockNode): Promise<void> {
  await state(node).fh.datasync();
}

/** SEEK_DATA/SEEK_HOLE answer (QEMU's find_allocation). */
async function coBlockStatus(node: BlockNode, wantZero: boolean, offsetBytes: number, bytes: number) {
  const base = { map: offsetBytes, file: node };
  if (!wantZero) return { status: Status.DATA | Status.OFFSET_VALID, pnum: bytes, ...base };
  const { fh, host } = state(node);
  let dataAt: number | null;
  try {
    dataAt = host.seekData(fh.fd, offsetBytes);
  } catch {
    return { status: Status.DATA | Status.OFFSET_VALID, pnum: bytes, ...base };
  }
  if (dataAt === null) return { status: Status.ZERO | Status.OFFSET_VALID, pnum: bytes, ...base };
  if (dataAt > offsetBytes) {
    return { status: Status.ZERO | Status.OFFSET_VALID, pnum: Math.min(bytes, dataAt - offsetBytes), ...base };
  }
  const holeAt = host.seekHole(fh.fd, offsetBytes) ?? offsetBytes + bytes;
  return { status: Status.DATA | Status.OFFSET_VALID, pnum: Math.min(bytes, Math.max(holeAt - offsetBytes, 1)), ...base };
}

async function coTruncate(node: BlockNode, offsetBytes: number, _exact: boolean, prealloc: Prealloc): Promise<void> {
  const s = state(node);
  if (s.isBlockDevice) {
    const length = s.host.sizeBytes(s.fh.fd);
    if (offsetBytes > length) throw new BlockError('EINVAL', 'Cannot grow device files');
    return;
  }
  await resizeFile(s.fh, s.host, offsetBytes, prealloc);
}

/** Grows or shrinks an open file with a preallocation mode (handle_aiocb_truncate). */
async function resizeFile(fh: fs.promises.FileHandle, host: HostIo, sizeBytes: number, prealloc: Prealloc) {
  const current = (await fh.stat()).size;
  if (prealloc === 'metadata') {
    throw new BlockError('ENOTSUP', "Unsupported preallocation mode 'metadata'");
  }
  if (prealloc === 'off' || sizeBytes <= current) {
    await fh.truncate(sizeBytes);
    return;
  }
  if (prealloc === 'falloc') {
    try {
      await host.allocate(fh.fd, current, sizeBytes - current);
    } catch (e) {
      throw toBlockError(e, 'Could not preallocate new data');
    }
    return;
  }
  await fh.truncate(sizeBytes);
  await writeZeroBuffer(fh, current, sizeBytes - current);
}

async function coCreate(_ctx: unknown, request: { filename: string; opts: Map<string, string> }): Promise<void> {
  const sizeBytes = alignUp(Number(request.opts.get('size') ?? '0'), SECTOR_BYTES);
  const prealloc = (request.opts.get('preallocation') ?? 'off') as Prealloc;
  if (!['off', 'falloc', 'full'].includes(prealloc)) {
    throw new BlockError('EINVAL', `Invalid parameter '${prealloc}'`);
  }
  let fh: fs.promises.FileHandle;
  try {
    fh = await fs.promises.open(request.filename, fs.constants.O_RDWR | fs.constants.O_CREAT, 0o644);
  } catch (e) {
    throw toBlockError(e, `Could not create '${request.filename}'`);
  }
  try {
    await fh.truncate(0);
    await resizeFile(fh, loadHostIo(), sizeBytes, prealloc);
    if (prealloc !== 'full' && sizeBytes > 0) {
      await writeZeroBuffer(fh, 0, sizeBytes < FIRST_BLOCK_BYTES ? SECTOR_BYTES : FIRST_BLOCK_BYTES);
    }
  } catch (e) {
    throw toBlockError(e, `Could not resize file`);
  } finally {
    await fh.close();
  }
}

async function getAllocatedFileSize(node: BlockNode): Promise<number | undefined> {
  const st = await state(node).fh.stat();
  return st.blocks * 512;
}

async function close(node: BlockNode): Promise<void> {
  await state(node).fh.close();
}

export const fileDriver: BlockDriver = {
  name: 'file',
  protocolName: 'file',
  optionsSchema,
  createOpts: FILE_CREATE_OPTS,
  open,
  close,
  getLength,
  coPreadv,
  coPwritev,
  coPwriteZeroes,
  coPdiscard,
  coFlushToDisk,
  coBlockStatus,
  coTruncate,
  coCreate,
  getAllocatedFileSize,
};
