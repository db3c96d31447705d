/*
 * A certificate's distinguished name as GnuTLS's gnutls_x509_crt_get_dn
 * prints it — the identity QEMU hands to its tls-authz object, so an
 * allow-list written for qemu-nbd matches our server too.
 *
 * Format (GnuTLS 3.7, lib/x509/dn.c and common.c, checked against the
 * installed library): RDNs in certificate order (get_dn keeps GnuTLS's
 * "compat" order; get_dn3 would reverse it to RFC 4514 order), separated
 * by ','; the attributes of a multi-valued RDN joined by '+'; each
 * attribute `NAME=value` with GnuTLS's LDAP name (CN, O, OU, C, L, ST, DC,
 * UID, EMAIL, serialNumber, …) or the dotted OID when it has none. Values
 * of known attributes are decoded to UTF-8 (DirectoryString choices,
 * PrintableString, IA5String, …; BMPString converted; a TeletexString
 * only when plain ASCII) and escaped: `, + " \ < > ;` anywhere, '#' or
 * ' ' first, ' ' last get a backslash. A value that does not decode (an
 * unknown OID, an unexpected string type, an empty string, an embedded
 * NUL) is written `#` + the lowercase hex of its whole DER encoding.
 *
 * Example: subject /C=GB/O=Example/CN=client.example.com prints as
 * `C=GB,O=Example,CN=client.example.com`.
 */
import { Tag, type NameAttribute, type RdnSequence } from './tls-der.js';

/** How GnuTLS decodes a known attribute: a DirectoryString choice, or one fixed string type. */
type Decoding = 'directory' | number;

/** GnuTLS's table of printable DN attributes: OID → [LDAP name or null, decoding]. */
const KNOWN_ATTRIBUTES: Record<string, [string | null, Decoding]> = {
  '1.3.6.1.5.5.7.9.2': ['placeOfBirth', 'directory'],
  '1.3.6.1.5.5.7.9.3': ['gender', Tag.PRINTABLE_STRING],
  '1.3.6.1.5.5.7.9.4': ['countryOfCitizenship', Tag.PRINTABLE_STRING],
  '1.3.6.1.5.5.7.9.5': ['countryOfResidence', Tag.PRINTABLE_STRING],
  '2.5.4.6': ['C', Tag.PRINTABLE_STRING],
  '2.5.4.9': ['street', 'directory'],
  '2.5.4.12': ['title', 'directory'],
  '2.5.4.10': ['O', 'directory'],
  '2.5.4.11': ['OU', 'directory'],
  '2.5.4.3': ['CN', 'directory'],
  '2.5.4.7': ['L', 'directory'],
  '2.5.4.8': ['ST', 'directory'],
  '2.5.4.13': ['description', 'directory'],
  '2.5.4.5': ['serialNumber', Tag.PRINTABLE_STRING],
  '2.5.4.20': ['telephoneNumber', Tag.PRINTABLE_STRING],
  '2.5.4.4': ['surName', 'directory'],
  '2.5.4.43': ['initials', 'directory'],
  '2.5.4.44': ['generationQualifier', 'directory'],
  '2.5.4.42': ['givenName', 'directory'],
  '2.5.4.65': ['pseudonym', 'directory'],
  '2.5.4.46': ['dnQualifier', Tag.PRINTABLE_STRING],
  '2.5.4.17': ['postalCode', 'directory'],
  '2.5.4.41': ['name', 'directory'],
  '2.5.4.15': ['businessCategory', 'directory'],
  '0.9.2342.19200300.100.1.25': ['DC', Tag.IA5_STRING],
  '0.9.2342.19200300.100.1.1': ['UID', 'directory'],
  '1.2.840.113556.1.4.656': ['userPrincipalName', 'directory'],
  '1.3.6.1.4.1.311.60.2.1.1': ['jurisdictionOfIncorporationLocalityName', 'directory'],
  '1.3.6.1.4.1.311.60.2.1.2': ['jurisdictionOfIncorporationStateOrProvinceName', 'directory'],
  '1.3.6.1.4.1.311.60.2.1.3': ['jurisdictionOfIncorporationCountryName', Tag.PRINTABLE_STRING],
  '1.2.840.113549.1.9.1': ['EMAIL', Tag.IA5_STRING],
  '1.2.840.113549.1.9.7': [null, 'directory'],
  '1.2.840.113549.1.9.20': [null, Tag.BMP_STRING],
  '1.2.840.113549.1.9.21': [null, Tag.OCTET_STRING],
  '1.2.840.113549.1.9.4': [null, Tag.OCTET_STRING],
  '1.3.6.1.5.5.7.8.5': ['XmppAddr', Tag.UTF8_STRING],
  '1.2.643.100.1': ['OGRN', Tag.NUMERIC_STRING],
  '1.2.643.100.3': ['SNILS', Tag.NUMERIC_STRING],
  '1.2.643.100.5': ['OGRNIP', Tag.NUMERIC_STRING],
  '1.2.643.3.131.1.1': ['INN', Tag.NUMERIC_STRING],
};

/** The string types a DirectoryString may hold (GnuTLS's pkix.asn also admits IA5String). */
const DIRECTORY_STRING_TAGS: readonly number[] = [Tag.TELETEX_STRING, Tag.PRINTABLE_STRING, Tag.UNIVERSAL_STRING, Tag.UTF8_STRING, Tag.BMP_STRING, Tag.IA5_STRING];

const hex = (bytes: Uint8Array) => '#' + Buffer.from(bytes).toString('hex');

/** The contents of a short-form or long-form DER string whose tag is `tag`, or null. */
function stringContents(der: Uint8Array, tag: number): Uint8Array | null {
  if (der.length < 2 || der[0] !== tag) return null;
  let length = der[1]!;
  let at = 2;
  if (length & 0x80) {
    const octets = length & 0x7f;
    if (octets === 0 || octets > 4 || der.length < 2 + octets) return null;
    length = 0;
    for (let i = 0; i < octets; i++) length = length * 256 + der[2 + i]!;
    at += octets;
  }
  return at + length === der.length ? der.subarray(at) : null;
}

const isPrintableAscii = (bytes: Uint8Array) => bytes.every((b) => b >= 0x20 && b < 0x7f);

/** UCS-2 (big-endian) to UTF-8 text, or null if it is not valid UCS-2. */
function fromBmp(bytes: Uint8Array): string | null {
  if (bytes.length % 2) return null;
  let text = '';
  for (let i = 0; i < bytes.length; i += 2) {
    const unit = (bytes[i]! << 8) | bytes[i + 1]!;
    if (unit >= 0xd800 && unit <= 0xdfff) return null;
    text += String.fromCharCode(unit);
  }
  return text;
}

/** A DirectoryString value as GnuTLS's decode_complex_string leaves it (before escaping), or null. */
function directoryString(value: Uint8Array): string | null {
  const tag = value[0]!;
  if (!DIRECTORY_STRING_TAGS.includes(tag)) return null;
  const contents = stringContents(value, tag);
  if (!contents || contents.length === 0) return null; // SIZE (1..MAX)
  if (tag === Tag.BMP_STRING) return fromBmp(contents);
  // Teletex that is not plain ASCII, and UniversalString, become hex of their contents (then escaped).
  if (tag === Tag.UNIVERSAL_STRING || (tag === Tag.TELETEX_STRING && !isPrintableAscii(contents))) return hex(contents);
  return Buffer.from(contents).toString('utf8');
}

function fixedString(value: Uint8Array, tag: number): string | null {
  const contents = stringContents(value, tag);
  if (!contents) return null;
  return tag === Tag.BMP_STRING ? fromBmp(contents) : Buffer.from(contents).toString('utf8');
}

/** RFC 4514 escaping as GnuTLS's str_escape does it. */
function escapeValue(text: string): string {
  let out = '';
  for (let i = 0; i < text.length; i++) {
    const c = text[i]!;
    const special = ',+"\\<>;'.includes(c) || (i === 0 && (c === '#' || c === ' ')) || (i === text.length - 1 && c === ' ');
    out += special ? '\\' + c : c;
  }
  return out;
}

function formatAttribute(attr: NameAttribute): string {
  const known = KNOWN_ATTRIBUTES[attr.oid];
  const name = known?.[0] ?? attr.oid;
  if (!known) return `${name}=${hex(attr.value)}`;
  const decoding = known[1];
  const text = decoding === 'directory' ? directoryString(attr.value) : fixedString(attr.value, decoding);
  if (text === null || text.includes('\0')) return `${name}=${hex(attr.value)}`;
  return `${name}=${escapeValue(text)}`;
}

/** The DN string gnutls_x509_crt_get_dn gives for `name`. */
export function formatDn(name: RdnSequence): string {
  return name.map((rdn) => rdn.map(formatAttribute).join('+')).join(',');
}
