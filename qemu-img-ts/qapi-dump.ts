/*
 * The human dump of format-specific image information (block/qapi.c:
 * bdrv_image_info_specific_dump, dump_qobject, dump_qdict, dump_qlist),
 * which qemu-img info and qemu-io's `info` both print after the line
 * "Format specific information:".
 *
 * Members come in QDict order (qjson's qdictEntries: QEMU's hash buckets,
 * not insertion order), dashes in keys are shown as spaces, each level is
 * indented four more spaces, and list elements are named `[i]`. A
 * composite value (object or list) follows its name on the next lines; a
 * scalar follows on the same line: numbers as a QNum prints them, booleans
 * as true/false, strings as they are.
 */
import type { SpecificInfo } from '../block/driver.js';
import { formatNumber, qdictEntries, type QDictValue, type QValue } from '../block/qjson.js';

/** The "Format specific information:" section of `qemu-img info` and qemu-io's `info`. */
export function formatSpecificInformation(specific: SpecificInfo): string {
  // The data is plain JSON-like data; SpecificInfo types it loosely (unknown).
  return `Format specific information:\n${dumpQObject(1, specific.data as QValue)}`;
}

/** dump_qobject: a value at `indent` levels (the lines of a composite, a scalar's text). */
export function dumpQObject(indent: number, value: QValue): string {
  if (Array.isArray(value)) return dumpMembers(indent, value.map((v: QValue, i) => [`[${i}]`, v]));
  if (value !== null && typeof value === 'object') {
    const entries = qdictEntries(value as QDictValue).map(([k, v]): [string, QValue] => [k.replaceAll('-', ' '), v]);
    return dumpMembers(indent, entries);
  }
  if (typeof value === 'number' || typeof value === 'bigint') return formatNumber(value);
  return String(value);
}

function dumpMembers(indent: number, entries: Array<[string, QValue]>): string {
  const pad = ' '.repeat(indent * 4);
  return entries
    .map(([name, v]) => {
      const composite = v !== null && typeof v === 'object';
      return composite ? `${pad}${name}:\n${dumpQObject(indent + 1, v)}` : `${pad}${name}: ${dumpQObject(indent + 1, v)}\n`;
    })
    .join('');
}
