/*
 * The name qemu-img shows for a node (QEMU's bdrv_refresh_filename,
 * reduced to what our drivers need).
 *
 * A protocol names itself when its options fit in a file name (`file`:
 * the path; `null-co`: `null-co://` while no size or read-zeroes is set);
 * it leaves `node.filename` empty otherwise. A format or filter whose own
 * options include none of its driver's "strong" options (those that change
 * what the guest sees: raw's offset and size, blkdebug's limits) borrows
 * its primary child's name. Anything else is described by a
 * `json:{...}` pseudo-filename holding the driver, the strong options as
 * the user gave them, and the children's descriptions, in QEMU's compact
 * JSON with QDict key order, so it reads exactly as qemu-img prints it.
 */
import type { BlockNode } from './node.js';
import { ChildRole } from './node.js';
import { toJsonCompact, type QDictValue, type QValue } from './qjson.js';

/** Strong options the node was opened with, as given (strings from key=value syntax, or JSON values). */
function ownStrongOptions(node: BlockNode): Array<[string, QValue]> {
  const strong = node.driver.strongOptions ?? [];
  return strong.filter((k) => node.options[k] !== undefined).map((k) => [k, node.options[k] as QValue]);
}

/** Children that describe the content (not backing files, whose names the image stores itself). */
function describedChildren(node: BlockNode) {
  return node.children.filter((c) => !(c.role & ChildRole.COW));
}

/** QEMU's full_open_options: driver, strong options, children. */
export function fullOpenOptions(node: BlockNode): QDictValue {
  const opts: Record<string, QValue> = { driver: node.driver.name };
  for (const [k, v] of ownStrongOptions(node)) opts[k] = v;
  for (const child of describedChildren(node)) opts[child.name] = fullOpenOptions(child.node);
  return opts;
}

/** The filename qemu-img shows for `node`. */
export function describeFilename(node: BlockNode): string {
  if (node.driver.protocolName !== undefined) {
    return node.filename || `json:${toJsonCompact(fullOpenOptions(node))}`;
  }
  const primary = node.primaryChild ?? node.file;
  const plainChild = primary && !primary.node.filename.startsWith('json:') ? primary.node.filename : '';
  const onlyChild = describedChildren(node).length === 1;
  if (plainChild && onlyChild && ownStrongOptions(node).length === 0) return plainChild;
  return `json:${toJsonCompact(fullOpenOptions(node))}`;
}
