/*
 * `qemu-img create` for the file protocol (raw_co_create_opts and
 * raw_co_create in QEMU's file-posix).
 *
 * Options, in the order qemu-img prints them: size (rounded up to a whole
 * sector), nocow, preallocation (off, falloc, full; metadata parses but the
 * resize refuses it), extent_size_hint (default 1 MiB, at most 2^32 - 1).
 * They are read before anything touches the disk, so a bad value leaves no
 * file behind: "invalid parameter value: <mode>", "Extent size hint is too
 * large". Then the file is created (or truncated to 0 when it exists), nocow
 * is applied (any failure ignored: it only matters on btrfs), the extent
 * size hint is set (a failure warns through the graph, and only when the
 * user gave a non-zero hint: "Failed to set extent size hint: <strerror>";
 * QEMU prints it as `qemu-img: warning: …`), and the file grows to its size
 * with the preallocation (resize.ts).
 *
 * Before the file is emptied it is locked as raw_co_create locks it (write
 * and resize held, resize not shared; lock.ts), so an image another process
 * (ours or QEMU's) has open is refused ("Failed to get "write" lock" and
 * QEMU's hint) rather than destroyed; the locks go before the file closes.
 *
 * Left out: stripping a `file:` prefix from the name (the graph passes
 * names on as given, for open as for create).
 */
import fs from 'node:fs';
import { BlockError, toBlockError } from '../../block/errors.js';
import { PREALLOC_MODES, alignUp, type Prealloc } from '../../block/flags.js';
import type { CreateContext, CreateOptDesc, CreateRequest } from '../../block/driver.js';
import { SECTOR_BYTES } from '../../block/io.js';
import { parseWith, zBool, zSize } from '../../block/options.js';
import { EXTENT_SIZE_HINT_MAX_BYTES, loadHostIo } from './host-io.js';
import { lockForCreate, unlockAfterCreate } from './lock.js';
import { resizeFile } from './resize.js';

/** `file:x` names the host file `x` (QEMU strips the protocol prefix). */
export function stripFilePrefix(filename: string): string {
  return filename.startsWith('file:') ? filename.slice('file:'.length) : filename;
}

/** QEMU's default extent size hint when the option is absent. */
export const DEFAULT_EXTENT_SIZE_HINT_BYTES = 1 << 20;
/** Mode bits of a new file (before the umask). */
const NEW_FILE_MODE = 0o644;

export const FILE_CREATE_OPTS: readonly CreateOptDesc[] = [
  { name: 'size', type: 'size', help: 'Virtual disk size' },
  { name: 'nocow', type: 'bool', help: 'Turn off copy-on-write (valid only on btrfs)' },
  { name: 'preallocation', type: 'string', help: 'Preallocation mode (allowed values: off, falloc, full)' },
  { name: 'extent_size_hint', type: 'size', help: 'Extent size hint for the image file, 0 to disable' },
];

interface FileCreateOptions {
  sizeBytes: number;
  nocow: boolean;
  prealloc: Prealloc;
  extentSizeHintBytes: number;
  /** The user gave extent_size_hint (only then does a failure to set it warn). */
  hasExtentSizeHint: boolean;
}

/** Reads and checks the options, in QEMU's order; throws EINVAL with QEMU's text. */
function parseCreateOptions(opts: Map<string, string>): FileCreateOptions {
  const sizeBytes = alignUp(parseWith(zSize('size'), opts.get('size') ?? '0'), SECTOR_BYTES);
  const hintText = opts.get('extent_size_hint');
  const extentSizeHintBytes =
    hintText === undefined ? DEFAULT_EXTENT_SIZE_HINT_BYTES : parseWith(zSize('extent_size_hint'), hintText);
  const nocow = parseWith(zBool('nocow'), opts.get('nocow') ?? 'off');
  const prealloc = opts.get('preallocation') ?? 'off';
  if (!(PREALLOC_MODES as readonly string[]).includes(prealloc)) {
    throw new BlockError('EINVAL', `invalid parameter value: ${prealloc}`);
  }
  if (extentSizeHintBytes > EXTENT_SIZE_HINT_MAX_BYTES) {
    throw new BlockError('EINVAL', 'Extent size hint is too large');
  }
  return { sizeBytes, nocow, prealloc: prealloc as Prealloc, extentSizeHintBytes, hasExtentSizeHint: hintText !== undefined };
}

/** Creates (or empties) the file, sets its attributes, grows it to its size. */
export async function createFile(ctx: CreateContext, request: CreateRequest): Promise<void> {
  const options = parseCreateOptions(request.opts);
  const host = loadHostIo();
  const filename = stripFilePrefix(request.filename);
  let fh: fs.promises.FileHandle;
  try {
    fh = await fs.promises.open(filename, fs.constants.O_RDWR | fs.constants.O_CREAT, NEW_FILE_MODE);
  } catch (e) {
    throw toBlockError(e, `Could not create '${filename}'`);
  }
  try {
    lockForCreate(host, fh.fd, filename);
  } catch (e) {
    await fh.close();
    throw e;
  }
  let failed = true;
  try {
    await resizeFile({ fh, direct: null, syncIo: false }, host, 0, 'off');
    if (options.nocow) {
      try {
        host.setNocow(fh.fd);
      } catch {
        // An optimisation for btrfs; QEMU ignores failures too.
      }
    }
    try {
      host.setExtentSizeHint(fh.fd, options.extentSizeHintBytes);
    } catch (e) {
      if (options.hasExtentSizeHint && options.extentSizeHintBytes !== 0) {
        ctx.graph.onWarning(`Failed to set extent size hint: ${toBlockError(e).message}`);
      }
    }
    await resizeFile({ fh, direct: null, syncIo: false }, host, options.sizeBytes, options.prealloc);
    failed = false;
  } finally {
    unlockAfterCreate(host, fh.fd);
    await fh.close().catch((e: unknown) => {
      if (!failed) throw toBlockError(e, 'Could not close the new file');
    });
  }
}
