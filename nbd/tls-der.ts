/*
 * The parts of an X.509 certificate QEMU's TLS code looks at, read from
 * its DER bytes: the subject name (as GnuTLS prints it, tls-dn.ts), the
 * validity period, and the basicConstraints, keyUsage and extKeyUsage
 * extensions with their criticality (QEMU's credential sanity checks).
 *
 *   Certificate ::= SEQUENCE { tbsCertificate, signatureAlgorithm, signature }
 *   TBSCertificate ::= SEQUENCE {
 *     [0] version OPTIONAL, serialNumber, signature, issuer Name,
 *     validity SEQUENCE { notBefore Time, notAfter Time }, subject Name,
 *     subjectPublicKeyInfo, [1] issuerUID OPTIONAL, [2] subjectUID OPTIONAL,
 *     [3] extensions SEQUENCE OF Extension OPTIONAL }
 *   Extension ::= SEQUENCE { extnID OID, critical BOOLEAN DEFAULT FALSE, extnValue OCTET STRING }
 *   Name ::= SEQUENCE OF RelativeDistinguishedName (SET OF { type OID, value ANY })
 *
 * Node's X509Certificate does not expose extension criticality, whether
 * basicConstraints is absent or says CA:FALSE (QEMU words those
 * differently), or the subject's exact attribute order and types, hence
 * this reader. It is small and strict: definite lengths only, every length
 * checked against its container. Bytes come from files and peers, so a
 * malformed certificate yields a reason, never an exception.
 */
import type { Decoded } from './wire-util.js';

/** Universal tags used here. */
export const Tag = {
  BOOLEAN: 0x01,
  INTEGER: 0x02,
  BIT_STRING: 0x03,
  OCTET_STRING: 0x04,
  OID: 0x06,
  UTF8_STRING: 0x0c,
  NUMERIC_STRING: 0x12,
  PRINTABLE_STRING: 0x13,
  TELETEX_STRING: 0x14,
  IA5_STRING: 0x16,
  UTC_TIME: 0x17,
  GENERALIZED_TIME: 0x18,
  UNIVERSAL_STRING: 0x1c,
  BMP_STRING: 0x1e,
  SEQUENCE: 0x30,
  SET: 0x31,
  CONTEXT_0: 0xa0,
  CONTEXT_3: 0xa3,
} as const;

/** Longest length field we accept (4 bytes: objects up to 4 GiB, far beyond any certificate). */
const MAX_LENGTH_OCTETS = 4;

/** One DER element: `tag`, its whole encoding `[start, end)` and its contents `[bodyStart, end)`. */
export interface Tlv {
  tag: number;
  start: number;
  bodyStart: number;
  end: number;
}

class DerError extends Error {}

/** Reads the element at `at`, which must end by `limit`. */
function readTlv(der: Uint8Array, at: number, limit: number): Tlv {
  if (at + 2 > limit) throw new DerError('truncated element');
  const tag = der[at]!;
  if ((tag & 0x1f) === 0x1f) throw new DerError('multi-byte tags are not used in certificates');
  let length = der[at + 1]!;
  let bodyStart = at + 2;
  if (length & 0x80) {
    const octets = length & 0x7f;
    if (octets === 0 || octets > MAX_LENGTH_OCTETS) throw new DerError('unsupported length encoding');
    if (bodyStart + octets > limit) throw new DerError('truncated length');
    length = 0;
    for (let i = 0; i < octets; i++) length = length * 256 + der[bodyStart + i]!;
    bodyStart += octets;
  }
  const end = bodyStart + length;
  if (end > limit) throw new DerError('element runs past its container');
  return { tag, start: at, bodyStart, end };
}

/** The elements directly inside `parent`. */
export function children(der: Uint8Array, parent: Tlv): Tlv[] {
  const out: Tlv[] = [];
  for (let at = parent.bodyStart; at < parent.end; ) {
    const tlv = readTlv(der, at, parent.end);
    out.push(tlv);
    at = tlv.end;
  }
  return out;
}

function expectTag(tlv: Tlv | undefined, tag: number, what: string): Tlv {
  if (!tlv || tlv.tag !== tag) throw new DerError(`${what} is missing`);
  return tlv;
}

export function body(der: Uint8Array, tlv: Tlv): Uint8Array {
  return der.subarray(tlv.bodyStart, tlv.end);
}

/** Dotted form of an OBJECT IDENTIFIER's contents. */
export function decodeOid(bytes: Uint8Array): string {
  const arcs: number[] = [];
  let value = 0;
  for (const byte of bytes) {
    value = value * 128 + (byte & 0x7f);
    if (byte & 0x80) continue;
    if (arcs.length === 0) arcs.push(value < 80 ? Math.floor(value / 40) : 2, value < 80 ? value % 40 : value - 80);
    else arcs.push(value);
    value = 0;
  }
  return arcs.join('.');
}

/** UTCTime (YYMMDDHHMMSSZ) or GeneralizedTime (YYYYMMDDHHMMSSZ) as ms since the epoch. */
function decodeTime(der: Uint8Array, tlv: Tlv): number {
  const text = Buffer.from(body(der, tlv)).toString('latin1');
  const m = /^(\d{2}|\d{4})(\d{2})(\d{2})(\d{2})(\d{2})(\d{2})Z$/.exec(text);
  if (!m || (tlv.tag === Tag.UTC_TIME) !== (m[1]!.length === 2)) throw new DerError(`bad time '${text}'`);
  let year = Number(m[1]);
  if (tlv.tag === Tag.UTC_TIME) year += year < 50 ? 2000 : 1900;
  return Date.UTC(year, Number(m[2]) - 1, Number(m[3]), Number(m[4]), Number(m[5]), Number(m[6]));
}

/** One attribute of a name, in certificate order. */
export interface NameAttribute {
  oid: string;
  /** The value's whole DER encoding (tag, length, contents). */
  value: Uint8Array;
}

/** A Name: its RDNs in certificate order, each a list of attributes. */
export type RdnSequence = NameAttribute[][];

function decodeName(der: Uint8Array, name: Tlv): RdnSequence {
  return children(der, expectTag(name, Tag.SEQUENCE, 'name')).map((rdn) =>
    children(der, expectTag(rdn, Tag.SET, 'relative distinguished name')).map((ava) => {
      const [type, value] = children(der, expectTag(ava, Tag.SEQUENCE, 'attribute'));
      if (!value) throw new DerError('attribute value is missing');
      return { oid: decodeOid(body(der, expectTag(type, Tag.OID, 'attribute type'))), value: der.subarray(value.start, value.end) };
    }),
  );
}

export interface Extension<T> {
  critical: boolean;
  value: T;
}

export interface CertificateFields {
  subject: RdnSequence;
  notBeforeMs: number;
  notAfterMs: number;
  /** basicConstraints; absent when the certificate has none. */
  basicConstraints?: Extension<{ ca: boolean }>;
  /** keyUsage bits as GnuTLS numbers them (digitalSignature = 0x80, keyEncipherment = 0x20, keyCertSign = 0x04, …). */
  keyUsage?: Extension<number>;
  /** extKeyUsage purpose OIDs. */
  extKeyUsage?: Extension<string[]>;
}

export const OID = {
  BASIC_CONSTRAINTS: '2.5.29.19',
  KEY_USAGE: '2.5.29.15',
  EXT_KEY_USAGE: '2.5.29.37',
  KP_SERVER_AUTH: '1.3.6.1.5.5.7.3.1',
  KP_CLIENT_AUTH: '1.3.6.1.5.5.7.3.2',
  KP_ANY: '2.5.29.37.0',
} as const;

/** KeyUsage BIT STRING → GnuTLS's GNUTLS_KEY_* mask (first octet, then the decipherOnly bit as 0x8000). */
function decodeKeyUsage(der: Uint8Array, tlv: Tlv): number {
  const bits = body(der, expectTag(tlv, Tag.BIT_STRING, 'key usage'));
  if (bits.length < 1) throw new DerError('empty key usage');
  return (bits[1] ?? 0) | ((bits[2] ?? 0) << 8);
}

function decodeExtension(der: Uint8Array, ext: Tlv, out: CertificateFields): void {
  const parts = children(der, expectTag(ext, Tag.SEQUENCE, 'extension'));
  const oid = decodeOid(body(der, expectTag(parts[0], Tag.OID, 'extension id')));
  const hasCritical = parts[1]?.tag === Tag.BOOLEAN;
  const critical = hasCritical && body(der, parts[1]!)[0] !== 0;
  const octets = expectTag(parts[hasCritical ? 2 : 1], Tag.OCTET_STRING, 'extension value');
  const inner = octets.bodyStart < octets.end ? readTlv(der, octets.bodyStart, octets.end) : undefined;
  if (!inner) return;
  if (oid === OID.BASIC_CONSTRAINTS) {
    const first = children(der, expectTag(inner, Tag.SEQUENCE, 'basic constraints'))[0];
    const ca = first?.tag === Tag.BOOLEAN && body(der, first)[0] !== 0;
    out.basicConstraints = { critical, value: { ca } };
  } else if (oid === OID.KEY_USAGE) {
    out.keyUsage = { critical, value: decodeKeyUsage(der, inner) };
  } else if (oid === OID.EXT_KEY_USAGE) {
    const oids = children(der, expectTag(inner, Tag.SEQUENCE, 'extended key usage')).map((p) => decodeOid(body(der, expectTag(p, Tag.OID, 'key purpose'))));
    out.extKeyUsage = { critical, value: oids };
  }
}

/** The fields QEMU checks, or why the DER is not a certificate we can read. */
export function readCertificate(der: Uint8Array): Decoded<CertificateFields> {
  try {
    const cert = readTlv(der, 0, der.length);
    const [tbs] = children(der, expectTag(cert, Tag.SEQUENCE, 'certificate'));
    const fields = children(der, expectTag(tbs, Tag.SEQUENCE, 'tbsCertificate'));
    const f = fields[0]?.tag === Tag.CONTEXT_0 ? fields.slice(1) : fields;
    // f: serialNumber, signature, issuer, validity, subject, subjectPublicKeyInfo, …
    const [notBefore, notAfter] = children(der, expectTag(f[3], Tag.SEQUENCE, 'validity'));
    const out: CertificateFields = {
      subject: decodeName(der, f[4]!),
      notBeforeMs: decodeTime(der, notBefore ?? fail('notBefore')),
      notAfterMs: decodeTime(der, notAfter ?? fail('notAfter')),
    };
    const extensions = f.slice(6).find((t) => t.tag === Tag.CONTEXT_3);
    if (extensions) {
      const list = children(der, extensions)[0];
      for (const ext of children(der, expectTag(list, Tag.SEQUENCE, 'extensions'))) decodeExtension(der, ext, out);
    }
    return { ok: true, value: out };
  } catch (e) {
    if (e instanceof DerError) return { ok: false, reason: e.message };
    throw e;
  }
}

function fail(what: string): never {
  throw new DerError(`${what} is missing`);
}
