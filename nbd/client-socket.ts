/*
 * Opening the transport of an NBD client: a TCP connection (TCP_NODELAY,
 * as the spec asks) or a unix socket, with QEMU's messages for failures:
 *
 *   Failed to connect to '127.0.0.1:1': Connection refused
 *   Failed to connect to '/tmp/x.sock': No such file or directory
 *   address resolution failed for nosuchhost:10809: Name or service not known
 *
 * The attempt can be abandoned through an AbortSignal (client closed, open
 * timeout); the socket is destroyed and the promise rejects.
 */
import type net from 'node:net';
import { BlockError, isErrnoCode, strerror } from '../block/errors.js';
import { describeAddress, type NbdAddress } from './uri.js';

/** getaddrinfo failures Node reports, with glibc's gai_strerror texts. */
const RESOLUTION_ERRORS: Record<string, string> = {
  ENOTFOUND: 'Name or service not known',
  EAI_AGAIN: 'Temporary failure in name resolution',
  EAI_FAIL: 'Non-recoverable failure in name resolution',
  EAI_NODATA: 'No address associated with hostname',
};

function connectError(address: NbdAddress, e: unknown): BlockError {
  const code = (e as { code?: string } | null)?.code ?? '';
  if (address.type === 'inet' && RESOLUTION_ERRORS[code]) {
    return new BlockError('EIO', `address resolution failed for ${address.host}:${address.port}: ${RESOLUTION_ERRORS[code]}`);
  }
  const errno = isErrnoCode(code) ? code : 'EIO';
  const text = isErrnoCode(code) ? strerror(code) : String((e as Error)?.message ?? e);
  return new BlockError(errno, `Failed to connect to '${describeAddress(address)}': ${text}`, { cause: e });
}

function portNumber(address: NbdAddress & { type: 'inet' }): number | null {
  if (!/^[0-9]+$/.test(address.port)) return null;
  const port = Number(address.port);
  return port <= 65535 ? port : null;
}

/** Connects to `address`; resolves with the connected socket. */
/** node:net's connect, loaded on first use: the tools start faster when no NBD is involved. */
const netConnect = (options: net.NetConnectOpts): net.Socket => process.getBuiltinModule('node:net').connect(options);

export function connectSocket(address: NbdAddress, signal?: AbortSignal): Promise<net.Socket> {
  return new Promise((resolve, reject) => {
    if (signal?.aborted) {
      reject(new BlockError('ECANCELED', 'Connection attempt cancelled'));
      return;
    }
    let socket: net.Socket;
    if (address.type === 'unix') {
      socket = netConnect({ path: address.path });
    } else {
      const port = portNumber(address);
      if (port === null) {
        reject(new BlockError('EINVAL', `address resolution failed for ${address.host}:${address.port}: Servname not supported for ai_socktype`));
        return;
      }
      socket = netConnect({ host: address.host, port });
    }
    const onAbort = () => {
      socket.destroy();
      reject(new BlockError('ECANCELED', 'Connection attempt cancelled'));
    };
    const onError = (e: Error) => {
      signal?.removeEventListener('abort', onAbort);
      socket.destroy();
      reject(connectError(address, e));
    };
    signal?.addEventListener('abort', onAbort, { once: true });
    socket.once('error', onError);
    socket.once('connect', () => {
      signal?.removeEventListener('abort', onAbort);
      socket.off('error', onError);
      if (address.type === 'inet') socket.setNoDelay(true);
      resolve(socket);
    });
  });
}
