/*
 * The client end of NBD_OPT_STARTTLS from QEMU-style client credentials
 * (`--object tls-creds-x509,id=tls0,endpoint=client,dir=DIR` and
 * `tls-creds=tls0` on the nbd driver), with QEMU's checks after the
 * handshake:
 *
 *   x509, verify-peer on   the server's certificate must chain to
 *                          ca-cert.pem and match `hostname` (the TCP host,
 *                          or the driver's tls-hostname). Without a host
 *                          name — a unix socket and no tls-hostname — QEMU
 *                          refuses: "No hostname for certificate
 *                          validation". client-cert.pem + client-key.pem
 *                          are presented when the directory has both.
 *   x509, verify-peer off  nothing is checked.
 *   psk                    identity `username` (default "qemu") with its
 *                          key from keys.psk.
 *   anon                   nothing to check.
 *
 * No SNI is sent (QEMU's GnuTLS session sets none). The upgrade resolves
 * with the encrypted stream or rejects with QEMU's sentence; the socket is
 * destroyed on failure.
 */
import type { Duplex } from 'node:stream';
import type tls from 'node:tls';
import { BlockError } from '../block/errors.js';
import type { ClientTlsUpgrade } from './client-handshake.js';
import { PskCreds, X509Creds, type TlsCreds } from './tls-creds.js';
import { contextOptions, tlsRefused, verifyFailureReason } from './tls-options.js';
import { nodeTls } from './tls.js';

/** A STARTTLS upgrade for the NBD client handshake (client-handshake.ts `tls` option). */
export function clientTls(creds: TlsCreds, hostname?: string): ClientTlsUpgrade {
  if (creds.endpoint !== 'client') throw new BlockError('EINVAL', 'Expected TLS credentials for a client endpoint');
  return { upgrade: (socket) => clientTlsUpgrade(socket, creds, hostname) };
}

/** Runs the TLS handshake as a client over `socket` (after the server acknowledged STARTTLS). */
export function clientTlsUpgrade(socket: Duplex, creds: TlsCreds, hostname?: string): Promise<Duplex> {
  let options: tls.ConnectionOptions;
  try {
    options = { ...contextOptions(creds, 'client'), socket, checkServerIdentity: () => undefined };
  } catch (e) {
    socket.destroy();
    return Promise.reject(e);
  }
  if (creds instanceof PskCreds) {
    const psk = { identity: creds.username!, psk: creds.clientKey! };
    options.pskCallback = () => psk;
  }
  return new Promise<Duplex>((resolve, reject) => {
    const secure = nodeTls().connect(options);
    const fail = (err: BlockError) => {
      secure.destroy();
      socket.destroy();
      reject(err);
    };
    const onError = (e: Error) => fail(tlsRefused(`TLS handshake failed: ${e.message}`, e));
    secure.once('error', onError);
    secure.once('secureConnect', () => {
      secure.off('error', onError);
      const refusal = checkServer(secure, creds, hostname);
      if (refusal !== null) return fail(tlsRefused(refusal));
      resolve(secure);
    });
  });
}

/** qcrypto_tls_session_check_certificate for a client; null when the server is accepted. */
function checkServer(secure: tls.TLSSocket, creds: TlsCreds, hostname: string | undefined): string | null {
  if (!(creds instanceof X509Creds) || !creds.verifyPeer) return null;
  const peer = secure.getPeerCertificate();
  if (!peer || Object.keys(peer).length === 0) return 'No certificate peers';
  const verifyError = secure.authorizationError as unknown as string | undefined;
  if (!secure.authorized && verifyError) return verifyFailureReason(String(verifyError));
  if (hostname === undefined) return 'No hostname for certificate validation';
  if (nodeTls().checkServerIdentity(hostname, peer) !== undefined) return `Certificate does not match the hostname ${hostname}`;
  return null;
}
