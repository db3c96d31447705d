/*
 * Resizing a regular host file with a preallocation mode, as QEMU's
 * handle_aiocb_truncate does it (create uses it too, after truncating to 0).
 *
 *   off    ftruncate; the new range is a hole.
 *   falloc fallocate the new range. Where the file system (or a missing
 *          native addon) cannot, the range is written with zeroes, as
 *          glibc's posix_fallocate does.
 *   full   ftruncate, write zeroes over the new range, fsync.
 * Anything else is "Unsupported preallocation mode: <mode>" (metadata is a
 * format-level mode, not a file one). Preallocating while shrinking is
 * refused. When falloc or full fails, the file is cut back to its old
 * length; a failure of that is ignored (QEMU prints it and carries on).
 *
 * A file that grows from empty with off or falloc gets zeroes written over
 * its first block (allocate_first_block), so that O_DIRECT alignment probing
 * later reads real data there; failures are ignored, it is an optimisation.
 */
import { BlockError, toBlockError } from '../../block/errors.js';
import type { Prealloc } from '../../block/flags.js';
import { SECTOR_BYTES } from '../../block/io.js';
import { MAX_BLOCK_BYTES, type HostFile } from './direct-io.js';
import type { HostIo } from './host-io.js';
import { writeZeroes } from './zero-fill.js';

/** Awaits `work`; a failure becomes a BlockError prefixed with `context`. */
async function step<T>(work: Promise<T>, context: string): Promise<T> {
  try {
    return await work;
  } catch (e) {
    throw toBlockError(e, context);
  }
}

/** allocate_first_block: 4 KiB of zeroes at 0 (one sector for smaller files). */
async function allocateFirstBlock(file: HostFile, sizeBytes: number): Promise<void> {
  const bytes = sizeBytes < MAX_BLOCK_BYTES ? SECTOR_BYTES : MAX_BLOCK_BYTES;
  await writeZeroes(file, 0, bytes).catch(() => undefined);
}

/** Runs `grow`; on failure cuts the file back to `oldBytes` and rethrows. */
async function restoringLength(file: HostFile, oldBytes: number, grow: () => Promise<void>): Promise<void> {
  try {
    await grow();
  } catch (e) {
    await file.fh.truncate(oldBytes).catch(() => undefined);
    throw e;
  }
}

/** fallocate, or zeroes where the host cannot (posix_fallocate's emulation). */
async function preallocate(file: HostFile, host: HostIo, offsetBytes: number, bytes: number): Promise<void> {
  try {
    await host.allocate(file.fh.fd, offsetBytes, bytes);
  } catch (e) {
    if (!(e instanceof BlockError && e.code === 'ENOTSUP')) throw e;
    await writeZeroes(file, offsetBytes, bytes);
  }
}

/** Grows or shrinks a regular file to `sizeBytes` with preallocation `prealloc`. */
export async function resizeFile(file: HostFile, host: HostIo, sizeBytes: number, prealloc: Prealloc): Promise<void> {
  const { fh } = file;
  const oldBytes = (await step(fh.stat(), 'Could not stat file')).size;
  if (oldBytes > sizeBytes && prealloc !== 'off') {
    throw new BlockError('ENOTSUP', 'Cannot use preallocation for shrinking files');
  }
  switch (prealloc) {
    case 'off':
      await step(fh.truncate(sizeBytes), 'Could not resize file');
      break;
    case 'falloc':
      if (sizeBytes === oldBytes) return;
      await restoringLength(file, oldBytes, () =>
        step(preallocate(file, host, oldBytes, sizeBytes - oldBytes), 'Could not preallocate new data'),
      );
      break;
    case 'full':
      await restoringLength(file, oldBytes, async () => {
        await step(fh.truncate(sizeBytes), 'Could not resize file');
        await step(writeZeroes(file, oldBytes, sizeBytes - oldBytes), 'Could not write zeros for preallocation');
        await step(fh.sync(), 'Could not flush file to disk');
      });
      return;
    default:
      throw new BlockError('ENOTSUP', `Unsupported preallocation mode: ${String(prealloc)}`);
  }
  if (oldBytes === 0 && sizeBytes > 0) await allocateFirstBlock(file, sizeBytes);
}
