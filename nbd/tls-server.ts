/*
 * The server end of NBD_OPT_STARTTLS: an NbdServerTls (tls.ts) from
 * server credentials, with QEMU's checks after the handshake
 * (qcrypto_tls_session_check_credentials):
 *
 *   x509, verify-peer on   the client must present a certificate that
 *                          chains to ca-cert.pem (and is not revoked by
 *                          ca-crl.pem); then, with tls-authz, its subject
 *                          DN as GnuTLS prints it (tls-dn.ts, e.g.
 *                          "C=GB,O=Example,CN=client.example.com") must be
 *                          allowed by the authz object, else "TLS x509
 *                          authz check for DN is denied".
 *   x509, verify-peer off  a certificate is requested, never checked, and
 *                          tls-authz is not consulted (as QEMU).
 *   psk                    the client must know a key from keys.psk; QEMU
 *                          7.2 ignores tls-authz here; `authorizePskIdentity`
 *                          opts in to checking the PSK identity with it.
 *   anon                   no identity at all.
 *
 * The authz object is looked up by id at each connection, as QEMU does,
 * so a missing one refuses clients ("Cannot find QAuthZ object ID x")
 * rather than the server's start. A refused client's upgrade rejects with
 * QEMU's sentence (the server logs "option negotiation failed: …" and
 * drops it); the socket is destroyed here too.
 *
 * Each upgrade feeds the socket (with the bytes already read after
 * STARTTLS pushed back in front) to a private tls.Server through its
 * documented 'connection' event, which gives node's own verification
 * result for that one socket (about a millisecond to set up, beside a
 * handshake that costs more). Session resumption is off (no tickets, no
 * session cache): every connection makes a full handshake, so the checks
 * above, the PSK lookup included, run for each client.
 */
import type net from 'node:net';
import type { Duplex } from 'node:stream';
import type tls from 'node:tls';
import { BlockError } from '../block/errors.js';
import { resolveAuthz, type ObjectLookup } from './tls-objects.js';
import { PskCreds, X509Creds, type TlsCreds } from './tls-creds.js';
import { readCertificate } from './tls-der.js';
import { formatDn } from './tls-dn.js';
import { contextOptions, tlsRefused, verifyFailureReason } from './tls-options.js';
import { nodeTls, type NbdServerTls } from './tls.js';

export interface ServerTlsOptions {
  /** tls-authz: id of the authz object that must allow each client. */
  authzId?: string;
  /** Finds objects by id (needed with authzId). */
  objects?: ObjectLookup;
  /** Also check PSK identities with tls-authz (QEMU 7.2 does not). */
  authorizePskIdentity?: boolean;
}

/** The server side of the STARTTLS upgrade for `creds` (which must be server credentials). */
export function serverTls(creds: TlsCreds, opts: ServerTlsOptions = {}): NbdServerTls {
  if (creds.endpoint !== 'server') throw new BlockError('EINVAL', 'Expected TLS credentials for a server endpoint');
  return new ServerTlsUpgrade(creds, opts);
}

class ServerTlsUpgrade implements NbdServerTls {
  constructor(
    readonly creds: TlsCreds,
    private readonly opts: ServerTlsOptions,
  ) {}

  upgrade(socket: net.Socket, pending: Buffer): Promise<Duplex> {
    const creds = this.creds;
    let pskIdentity: string | null = null;
    let options: tls.TlsOptions;
    try {
      options = { ...contextOptions(creds, 'server'), secureOptions: process.getBuiltinModule('node:crypto').constants.SSL_OP_NO_TICKET };
    } catch (e) {
      socket.destroy();
      return Promise.reject(e);
    }
    if (creds instanceof X509Creds) options.requestCert = true;
    if (creds instanceof PskCreds) {
      options.pskCallback = (_socket, identity) => {
        pskIdentity = identity;
        return creds.serverKey(identity);
      };
    }
    const server = nodeTls().createServer(options);
    return new Promise<Duplex>((resolve, reject) => {
      const refuse = (err: BlockError, secure?: tls.TLSSocket) => {
        secure?.destroy();
        socket.destroy();
        reject(err);
      };
      server.once('secureConnection', (secure: tls.TLSSocket) => {
        let refusal: string | null;
        try {
          refusal = this.check(secure, pskIdentity);
        } catch (e) {
          return refuse(e instanceof BlockError ? tlsRefused(e.message, e) : tlsRefused(String(e)), secure);
        }
        if (refusal !== null) return refuse(tlsRefused(refusal), secure);
        resolve(secure);
      });
      server.once('tlsClientError', (e: Error) => refuse(tlsRefused(`TLS handshake failed: ${e.message}`, e)));
      if (pending.length > 0) socket.unshift(pending);
      server.emit('connection', socket);
    });
  }

  /** QEMU's post-handshake checks; null when the client may proceed. */
  private check(secure: tls.TLSSocket, pskIdentity: string | null): string | null {
    const { creds, opts } = this;
    if (creds instanceof PskCreds) {
      if (!opts.authorizePskIdentity || opts.authzId === undefined) return null;
      const identity = pskIdentity ?? '';
      return this.allowed(identity) ? null : `TLS PSK authz check for ${identity} is denied`;
    }
    if (!(creds instanceof X509Creds) || !creds.verifyPeer) return null;
    const peer = secure.getPeerX509Certificate();
    if (!peer) return 'Verify failed: No certificate was found.';
    const verifyError = secure.authorizationError as unknown as string | undefined;
    if (!secure.authorized && verifyError) return verifyFailureReason(String(verifyError));
    const fields = readCertificate(peer.raw);
    if (!fields.ok) return `Cannot get client distinguished name: ${fields.reason}`;
    const dn = formatDn(fields.value.subject);
    if (opts.authzId === undefined) return null;
    return this.allowed(dn) ? null : `TLS x509 authz check for ${dn} is denied`;
  }

  private allowed(identity: string): boolean {
    const lookup = this.opts.objects ?? (() => undefined);
    return resolveAuthz(lookup, this.opts.authzId!).isAllowed(identity);
  }
}
