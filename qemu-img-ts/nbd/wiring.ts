/*
 * What qemu-nbd-ts takes from other layers: server TLS from --object
 * credentials (--tls-creds, --tls-authz) and the dirty-bitmap contexts
 * of -B.
 */
import { BlockError } from '../../block/errors.js';
import type { BlockNode } from '../../block/node.js';
import { exportDirtyBitmaps } from '../../nbd/bitmap-context.js';
import type { NbdExportOptions } from '../../nbd/export.js';
import type { NbdServerTls } from '../../nbd/tls.js';
import { CliError } from '../cli-common.js';
import { serverTls } from '../../nbd/tls-server.js';
import { objectLookup, tlsCredsObject, type NbdCliConfig } from './args.js';

export async function nbdServerTls(config: NbdCliConfig): Promise<NbdServerTls | null> {
  if (config.tlsCreds === undefined) return null;
  return serverTls(tlsCredsObject(config), { authzId: config.tlsAuthz, objects: objectLookup(config) });
}

/**
 * -B's bitmaps (nbd/bitmap-context.ts), busy until the export closes.
 * qemu-nbd exits on the first refusal with its first line only (the
 * error is fatal before QEMU appends a hint).
 */
export function nbdBitmapContexts(node: BlockNode, names: readonly string[], readOnly: boolean): Pick<NbdExportOptions, 'bitmapContexts' | 'onClose'> {
  try {
    return exportDirtyBitmaps(node, names, { readOnly });
  } catch (e) {
    if (e instanceof BlockError) throw new CliError(e.message.split('\n')[0]!);
    throw e;
  }
}
