/*
 * Editing qcow2 bitmap metadata by hand, for interop tests: what a crash
 * or another program leaves in an image. Byte offsets follow
 * docs/interop/qcow2.rst (header extension 0x23852875, directory entries
 * of 24 bytes plus the name, padded to 8).
 */
import fs from 'node:fs';

const BITMAPS_EXTENSION = 0x23852875;
const HEADER_LENGTH_AT = 100;
const DIR_ENTRY_HEADER_BYTES = 24;

interface DirEntryPlace {
  /** File offset of the directory entry. */
  at: number;
  tableOffset: number;
  tableEntries: number;
}

/** Finds bitmap `name` in the image's directory. */
export function findDirEntry(fd: number, name: string): DirEntryPlace {
  const header = Buffer.alloc(65536);
  fs.readSync(fd, header, 0, header.length, 0);
  let at = header.readUInt32BE(HEADER_LENGTH_AT);
  for (;;) {
    const type = header.readUInt32BE(at);
    const length = header.readUInt32BE(at + 4);
    if (type === 0) throw new Error('no bitmaps extension');
    if (type === BITMAPS_EXTENSION) break;
    at += 8 + Math.ceil(length / 8) * 8;
  }
  const dirBytes = Number(header.readBigUInt64BE(at + 16));
  const dirOffset = Number(header.readBigUInt64BE(at + 24));
  const dir = Buffer.alloc(dirBytes);
  fs.readSync(fd, dir, 0, dirBytes, dirOffset);
  for (let e = 0; e < dirBytes; ) {
    const nameBytes = dir.readUInt16BE(e + 18);
    if (dir.toString('utf8', e + DIR_ENTRY_HEADER_BYTES, e + DIR_ENTRY_HEADER_BYTES + nameBytes) === name) {
      return { at: dirOffset + e, tableOffset: Number(dir.readBigUInt64BE(e)), tableEntries: dir.readUInt32BE(e + 8) };
    }
    e += Math.ceil((DIR_ENTRY_HEADER_BYTES + nameBytes) / 8) * 8;
  }
  throw new Error(`no bitmap ${name}`);
}

function withFile<T>(filename: string, body: (fd: number) => T): T {
  const fd = fs.openSync(filename, 'r+');
  try {
    return body(fd);
  } finally {
    fs.closeSync(fd);
  }
}

/** Sets the in-use flag of bitmap `name` (what a crash while the image was open for writing leaves). */
export function markInUse(filename: string, name: string): void {
  withFile(filename, (fd) => {
    const { at } = findDirEntry(fd, name);
    const flags = Buffer.alloc(4);
    fs.readSync(fd, flags, 0, 4, at + 12);
    flags.writeUInt32BE(flags.readUInt32BE(0) | 1);
    fs.writeSync(fd, flags, 0, 4, at + 12);
  });
}

/** Overwrites entry `index` of bitmap `name`'s table with `raw` (e.g. 1: all ones, no cluster). */
export function setTableEntry(filename: string, name: string, index: number, raw: bigint): void {
  withFile(filename, (fd) => {
    const { tableOffset, tableEntries } = findDirEntry(fd, name);
    if (index >= tableEntries) throw new Error(`bitmap ${name} has ${tableEntries} table entries`);
    const entry = Buffer.alloc(8);
    entry.writeBigUInt64BE(raw);
    fs.writeSync(fd, entry, 0, 8, tableOffset + index * 8);
  });
}
