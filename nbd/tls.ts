/*
 * The TLS seam of the NBD server.
 *
 * A server given an `NbdServerTls` requires TLS, as QEMU's does when it has
 * tls-creds: before STARTTLS every option but STARTTLS and ABORT is
 * answered NBD_REP_ERR_TLS_REQD, EXPORT_NAME drops the connection, and
 * STARTTLS is acknowledged and followed by `upgrade`. Without one, STARTTLS
 * is answered NBD_REP_ERR_POLICY "TLS not configured", as qemu-nbd without
 * --tls-creds does.
 *
 * `upgrade` receives the plain socket (no longer read by the server) and
 * any bytes already received after the STARTTLS option (the start of the
 * client's TLS handshake). It resolves with the encrypted stream once the
 * handshake and the authorization (tls-authz) succeeded, or rejects to drop
 * the client. x509 and PSK credentials (node:tls) implement it elsewhere.
 */
import type net from 'node:net';
import type { Duplex } from 'node:stream';

export interface NbdServerTls {
  upgrade(socket: net.Socket, pending: Buffer): Promise<Duplex>;
}

/** node:tls, loaded on first use: the tools start ~10 ms faster when no TLS is involved. */
export function nodeTls(): typeof import('node:tls') {
  return process.getBuiltinModule('node:tls');
}
