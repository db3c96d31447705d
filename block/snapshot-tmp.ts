/*
 * Reading an internal snapshot instead of the current content (QEMU's
 * bdrv_snapshot_load_tmp and bdrv_snapshot_load_tmp_by_id_or_name): what
 * qemu-img's `-l` does to a source of measure and convert.
 *
 * The node must be read-only; from then on it reads the snapshot (its
 * length stays the node's). A snapshot is named by ID, by name, or both
 * (both must then match); a bare `-l WORD` tries WORD as an ID, then, when
 * no snapshot has that ID (ENOENT, or EINVAL), as a name. Formats without
 * internal snapshots refuse with QEMU's text; qemu-img names no device, so
 * the device name in it is empty.
 */
import { BlockError, isBlockError } from './errors.js';
import type { BlockNode } from './node.js';

/** Which snapshot: `idOrName` (a bare `-l` value), else `id` and/or `name`. */
export interface SnapshotRef {
  id?: string;
  name?: string;
  idOrName?: string;
}

/** Makes read-only `node` read the snapshot `ref` names (see the note at the top). */
export async function loadSnapshotTmp(node: BlockNode, ref: SnapshotRef): Promise<void> {
  if (ref.idOrName === undefined) return loadOne(node, ref.id ?? null, ref.name ?? null);
  try {
    await loadOne(node, ref.idOrName, null);
  } catch (e) {
    if (!isBlockError(e, 'ENOENT') && !isBlockError(e, 'EINVAL')) throw e;
    await loadOne(node, null, ref.idOrName);
  }
}

/** bdrv_snapshot_load_tmp. */
async function loadOne(node: BlockNode, id: string | null, name: string | null): Promise<void> {
  if (id === null && name === null) throw new BlockError('EINVAL', 'snapshot_id and name are both NULL');
  if (!node.readOnly) throw new BlockError('EINVAL', 'Device is not readonly');
  const load = node.driver.snapshotLoadTmp;
  if (!load) {
    throw new BlockError('ENOTSUP', `Block format '${node.driver.name}' used by device '' does not support temporarily loading internal snapshots`);
  }
  await load(node, id, name);
}
