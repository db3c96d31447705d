/*
 * Asking a server what it exports without entering transmission (QEMU's
 * nbd_receive_export_list, behind `qemu-nbd -L`): NBD_OPT_LIST for the
 * names and descriptions, then per export NBD_OPT_INFO (size, flags, block
 * sizes) and, when structured replies are available,
 * NBD_OPT_LIST_META_CONTEXT with no query (all contexts; if the answer has
 * contexts but none in `qemu:`, a second query for `qemu:` works around
 * qemu 3.0 servers that forgot them). Ends with NBD_OPT_ABORT.
 */
import { connectSocket } from './client-socket.js';
import {
  META_CONTEXT_TEXTS,
  OptionChannel,
  decodeContextReply,
  handshakeError,
  infoOrGo,
  listExportNames,
  startNegotiate,
  type ClientTlsUpgrade,
  type NbdExportInfo,
  type TransmissionMode,
} from './client-handshake.js';
import { Opt, Rep } from './protocol.js';
import type { NbdAddress } from './uri.js';
import { encodeMetaContextRequest } from './wire-handshake.js';

export interface ExportListing {
  name: string;
  description: string;
  /** NBD_OPT_INFO's answer; null when the server does not support NBD_OPT_INFO. */
  info: NbdExportInfo | null;
  /** Every metadata context the export offers (empty without structured replies). */
  contexts: string[];
}

export interface ListResult {
  mode: TransmissionMode;
  exports: ExportListing[];
}

/** LIST_META_CONTEXT with one query or none: the context names (empty if unsupported). */
async function listContextsOnce(channel: OptionChannel, exportName: string, query: string | null): Promise<string[]> {
  channel.send(Opt.LIST_META_CONTEXT, encodeMetaContextRequest({ exportName, queries: query === null ? [] : [query] }));
  const names: string[] = [];
  const onItem = (data: Buffer) => names.push(decodeContextReply(data).name);
  return (await channel.collect(Opt.LIST_META_CONTEXT, Rep.META_CONTEXT, false, onItem, META_CONTEXT_TEXTS)) ? names : [];
}

async function listContexts(channel: OptionChannel, exportName: string): Promise<string[]> {
  const names = await listContextsOnce(channel, exportName, null);
  if (names.length > 0 && !names.some((n) => n.startsWith('qemu:'))) {
    names.push(...(await listContextsOnce(channel, exportName, 'qemu:')));
  }
  return names;
}

function emptyInfo(name: string, mode: TransmissionMode): NbdExportInfo {
  return { name, sizeBytes: 0, flags: 0, minBlock: 0, optBlock: 0, maxBlock: 0, mode, contexts: new Map() };
}

async function describeExports(channel: OptionChannel, mode: TransmissionMode): Promise<ExportListing[]> {
  const listed = (await listExportNames(channel)) ?? [];
  const out: ExportListing[] = listed.map((e) => ({ ...e, info: null, contexts: [] }));
  for (const entry of out) {
    const info = emptyInfo(entry.name, mode);
    if (!(await infoOrGo(channel, Opt.INFO, info, true))) break;
    entry.info = info;
    if (mode === 'structured' || mode === 'extended') entry.contexts = await listContexts(channel, entry.name);
  }
  return out;
}

/** Lists the exports of the server at `address`. */
export async function listExports(address: NbdAddress, opts: { tls?: ClientTlsUpgrade } = {}): Promise<ListResult> {
  const socket = await connectSocket(address);
  try {
    const started = await startNegotiate(socket, opts);
    if (started.oldstyle) {
      // The lone export is implied; its size and flags came with the greeting.
      const info = { ...emptyInfo('', 'oldstyle'), sizeBytes: started.oldstyle.sizeBytes, flags: started.oldstyle.transmissionFlags };
      return { mode: 'oldstyle', exports: [{ name: '', description: '', info, contexts: [] }] };
    }
    if (!started.fixedNewstyle) throw handshakeError('Server does not support export lists');
    const exports = await describeExports(started.channel, started.mode);
    started.channel.abort();
    return { mode: started.mode, exports };
  } finally {
    socket.end();
    socket.destroy();
  }
}
