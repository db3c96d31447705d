/*
 * bdrv_make_empty: make an image drop everything it allocates itself, so it
 * reads through to its backing file (qemu-img commit empties the top image
 * this way once its data is in the base).
 *
 * The caller holds an edge with write permission on the node. The node is
 * drained around the driver call, so no request of another user runs
 * while the driver rewrites its tables. Errors carry QEMU's texts: a driver
 * without the capability gives ENOTSUP "<format> does not support emptying
 * nodes" (qemu-img commit ignores that one), any other failure "Failed to
 * empty <filename>: <strerror>".
 */
import { BlockError, strerror, toBlockError } from './errors.js';
import { drained } from './drain.js';
import { Perm } from './flags.js';
import type { BdrvChild } from './node.js';

export async function makeEmpty(child: BdrvChild): Promise<void> {
  const node = child.node;
  if (!(child.perm & (Perm.WRITE | Perm.WRITE_UNCHANGED))) {
    throw new BlockError('EPERM', `${child.describe()} has no write permission on ${node.describe()}`);
  }
  try {
    await drained(node, () => node.driver.makeEmpty(node));
  } catch (e) {
    const err = toBlockError(e);
    if (err.code === 'ENOTSUP') throw new BlockError('ENOTSUP', `${node.driver.name} does not support emptying nodes`, { cause: e });
    throw new BlockError(err.code, `Failed to empty ${node.filename}: ${strerror(err.code)}`, { cause: e });
  }
}
