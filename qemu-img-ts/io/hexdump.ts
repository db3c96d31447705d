/*
 * `read -v` output (qemu-io-cmds.c dump_buffer): 16 bytes a line,
 *
 *   00000003:  41 41 41 41 41 41 41 41 41 41 41 41 41 7a 7a 7a  AAAAAAAAAAAAAzzz
 *   00000013:  7a 7a 7a 7a  zzzz
 *
 * addresses are absolute offsets (%08x, wider when needed), a short last line
 * is not padded, and only [0-9A-Za-z] (C-locale isalnum) is printed as text.
 * Lines are produced in batches so a large dump is written as it goes.
 */

export const HEXDUMP_BYTES_PER_LINE = 16;
/** Lines per batch handed to the writer (about 64 KiB of output). */
const LINES_PER_BATCH = 1024;

function isAlnum(byte: number): boolean {
  return (byte >= 0x30 && byte <= 0x39) || (byte >= 0x41 && byte <= 0x5a) || (byte >= 0x61 && byte <= 0x7a);
}

function dumpLine(line: Uint8Array, offset: number): string {
  let hex = '';
  let text = '';
  for (const byte of line) {
    hex += `${byte.toString(16).padStart(2, '0')} `;
    text += isAlnum(byte) ? String.fromCharCode(byte) : '.';
  }
  return `${offset.toString(16).padStart(8, '0')}:  ${hex} ${text}\n`;
}

/** Writes the dump of `buf`, read from `offsetBytes`, through `write`. */
export function dumpBuffer(buf: Uint8Array, offsetBytes: number, write: (text: string) => void): void {
  const batchBytes = HEXDUMP_BYTES_PER_LINE * LINES_PER_BATCH;
  for (let batch = 0; batch < buf.length; batch += batchBytes) {
    let out = '';
    const end = Math.min(batch + batchBytes, buf.length);
    for (let i = batch; i < end; i += HEXDUMP_BYTES_PER_LINE) {
      out += dumpLine(buf.subarray(i, Math.min(i + HEXDUMP_BYTES_PER_LINE, end)), offsetBytes + i);
    }
    write(out);
  }
}
