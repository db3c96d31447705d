/*
 * qemu-nbd -L: list another server's exports (qemu_nbd_client_list), in
 * qemu-nbd's text:
 *   exports available: N
 *    export: 'NAME'
 *     description: TEXT            (when not empty)
 *     size:  BYTES                 (when the server answered NBD_OPT_INFO)
 *     flags: 0xHEX ( readonly flush … )
 *     min block: … / opt block: … / max block: …
 *     available meta contexts: N
 *      CONTEXT
 * Our client negotiates extended headers when the server offers them (as
 * newer qemu-nbd does), so against such a server the flags include
 * block-status-payload.
 * The server is -k's socket, or -b (default 127.0.0.1) and -p; TLS comes
 * from --tls-creds (client credentials), the host name checked from
 * --tls-hostname or -b.
 */
import { BlockError } from '../../block/errors.js';
import { clientTls } from '../../nbd/tls-client.js';
import { listExports as listServerExports, type ExportListing } from '../../nbd/client-list.js';
import { TxFlag } from '../../nbd/protocol.js';
import { CliError, type Output } from '../cli-common.js';
import { tlsCredsObject, type NbdCliConfig } from './args.js';
import type { NbdAddress } from '../../nbd/uri.js';

/** Transmission flag names qemu-nbd prints, by bit. */
const FLAG_NAMES: readonly [number, string][] = [
  [TxFlag.READ_ONLY, 'readonly'],
  [TxFlag.SEND_FLUSH, 'flush'],
  [TxFlag.SEND_FUA, 'fua'],
  [TxFlag.ROTATIONAL, 'rotational'],
  [TxFlag.SEND_TRIM, 'trim'],
  [TxFlag.SEND_WRITE_ZEROES, 'zeroes'],
  [TxFlag.SEND_DF, 'df'],
  [TxFlag.CAN_MULTI_CONN, 'multi'],
  [TxFlag.SEND_RESIZE, 'resize'],
  [TxFlag.SEND_CACHE, 'cache'],
  [TxFlag.SEND_FAST_ZERO, 'fast-zero'],
  // Newer qemu-nbd names it; only servers that speak extended headers send it.
  [TxFlag.BLOCK_STATUS_PAYLOAD, 'block-status-payload'],
];

export async function listExports(config: NbdCliConfig, out: Output): Promise<number> {
  const address: NbdAddress = config.socket !== undefined ? { type: 'unix', path: config.socket } : { type: 'inet', host: config.bind, port: config.port };
  try {
    const tls = config.tlsCreds === undefined ? undefined : clientTls(tlsCredsObject(config), config.tlsHostname ?? config.bind);
    const result = await listServerExports(address, { tls });
    out.stdout(listingText(result.exports));
    return 0;
  } catch (e) {
    if (e instanceof BlockError) throw new CliError(e.message);
    throw e;
  }
}

function listingText(exports: readonly ExportListing[]): string {
  let text = `exports available: ${exports.length}\n`;
  for (const e of exports) {
    text += ` export: '${e.name}'\n`;
    if (e.description) text += `  description: ${e.description}\n`;
    const info = e.info;
    if (info && info.flags & TxFlag.HAS_FLAGS) {
      const names = FLAG_NAMES.filter(([bit]) => info.flags & bit).map(([, name]) => ` ${name}`);
      text += `  size:  ${info.sizeBytes}\n  flags: 0x${info.flags.toString(16)} (${names.join('')} )\n`;
    }
    if (info && info.minBlock) {
      text += `  min block: ${info.minBlock}\n  opt block: ${info.optBlock}\n  max block: ${info.maxBlock}\n`;
    }
    if (e.contexts.length > 0) {
      text += `  available meta contexts: ${e.contexts.length}\n${e.contexts.map((c) => `   ${c}\n`).join('')}`;
    }
  }
  return text;
}
