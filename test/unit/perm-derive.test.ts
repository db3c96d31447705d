/*
 * Child permissions derived from parents (block/perms.ts, QEMU's
 * bdrv_child_perm and bdrv_refresh_perms): what a node takes on its
 * children follows its users as they come, go and change; a refusal
 * anywhere below leaves every edge as it was and names the node and both
 * users in QEMU's words.
 */
import fs from 'node:fs';
import path from 'node:path';
import { describe, expect, it } from 'vitest';
import { BlockBackend } from '../../block/backend.js';
import { Perm } from '../../block/flags.js';
import type { BlockGraph } from '../../block/graph.js';
import {
  attachChild,
  detachChild,
  replaceChildNode,
  replaceChildNodes,
  setEdgePerms,
  TransientParent,
  type BdrvChild,
  type BlockNode,
} from '../../block/node.js';
import { refreshPerms } from '../../block/perms.js';
import { testGraph } from '../helpers/graphs.js';
import { scratchDir } from '../helpers/tmp.js';

const dir = scratchDir('qbt-perm-derive-');
const MiB = 1 << 20;
const { CONSISTENT_READ: CR, WRITE: W, WRITE_UNCHANGED: WU, RESIZE, ALL } = Perm;

let files = 0;
function rawFile(): string {
  const p = path.join(dir, `f${++files}.raw`);
  fs.writeFileSync(p, Buffer.alloc(MiB));
  return p;
}

async function qcow2File(g: BlockGraph, backing?: string): Promise<string> {
  const p = path.join(dir, `f${++files}.qcow2`);
  const opts = new Map([['size', String(MiB)]]);
  if (backing) opts.set('backing_file', backing).set('backing_fmt', 'qcow2');
  await g.createImage('qcow2', p, opts);
  return p;
}

/** qcow2 `q` over file `f`, both named. */
async function qcow2OverFile(g: BlockGraph, readOnly = false): Promise<BlockNode> {
  const filename = await qcow2File(g);
  return g.openNode({ driver: 'qcow2', 'node-name': 'q', 'read-only': readOnly, file: { driver: 'file', 'node-name': 'f', filename } });
}

/** A user's edge (an export, a job) taking `perm` and sharing `shared`. */
function user(node: BlockNode, what: string, perm: number, shared: number): BdrvChild {
  return attachChild(new TransientParent(what), 'x', 0, node, perm, shared);
}

const permsOf = (edge: BdrvChild) => ({ perm: edge.perm, shared: edge.shared });

describe('storage child of a format (bdrv_default_perms_for_storage)', () => {
  it('a writable qcow2 takes consistent read, write and resize on its file, shares neither write nor resize', async () => {
    const g = testGraph();
    const q = await qcow2OverFile(g);
    expect(permsOf(q.file!)).toEqual({ perm: CR | W | RESIZE, shared: CR | WU });
    const writer = new BlockBackend(g, q, { writable: true });
    expect(permsOf(q.file!)).toEqual({ perm: CR | W | RESIZE, shared: CR | WU });
    await writer.close();
  });

  it("narrows the file's sharing to what the format's users share, and relaxes when they leave", async () => {
    const g = testGraph();
    const q = await qcow2OverFile(g);
    const exclusive = user(q, 'exclusive writer', CR | W, CR);
    expect(permsOf(q.file!)).toEqual({ perm: CR | W | RESIZE, shared: CR });
    detachChild(exclusive);
    expect(permsOf(q.file!)).toEqual({ perm: CR | W | RESIZE, shared: CR | WU });
  });

  it('a read-only qcow2 takes no write or resize, and refuses writers', async () => {
    const g = testGraph();
    const q = await qcow2OverFile(g, true);
    expect(permsOf(q.file!)).toEqual({ perm: CR, shared: CR | WU });
    expect(() => new BlockBackend(g, q, { writable: true })).toThrow(/^Block node is read-only$/);
    expect(q.parents).toHaveLength(0);
  });

  it('refuses a writable format over a read-only file node', async () => {
    const g = testGraph();
    const filename = await qcow2File(g);
    const f = await g.openNode({ driver: 'file', 'node-name': 'f', filename, 'read-only': true });
    f.userOwned = true;
    await expect(g.openNode({ driver: 'qcow2', 'node-name': 'q', file: 'f' })).rejects.toThrow(/^Block node is read-only$/);
    expect(f.parents).toHaveLength(0);
  });
});

describe('raw (raw_child_perm)', () => {
  it('takes write and resize on its file only while its users do', async () => {
    const g = testGraph();
    const r = await g.openNode({ driver: 'raw', 'node-name': 'r', file: { driver: 'file', filename: rawFile() } });
    expect(permsOf(r.file!)).toEqual({ perm: 0, shared: ALL });
    const writer = user(r, 'writer', CR | W | RESIZE, ALL);
    expect(permsOf(r.file!)).toEqual({ perm: CR | W | RESIZE, shared: ALL });
    detachChild(writer);
    expect(permsOf(r.file!)).toEqual({ perm: 0, shared: ALL });
  });

  it('with an offset the file is data storage: others may not resize it', async () => {
    const g = testGraph();
    const r = await g.openNode({ driver: 'raw', offset: 512, file: { driver: 'file', filename: rawFile() } });
    user(r, 'writer', CR | WU, ALL);
    expect(permsOf(r.file!)).toEqual({ perm: CR | WU, shared: CR | W | WU });
  });
});

describe('blkdebug (blkdebug_child_perm)', () => {
  it('adds take-child-perms and removes unshare-child-perms on its image edge', async () => {
    const g = testGraph();
    const b = await g.openNode({
      driver: 'blkdebug',
      'take-child-perms': ['consistent-read'],
      'unshare-child-perms': ['resize', 'write'],
      image: { driver: 'file', 'node-name': 'f', filename: rawFile() },
    });
    expect(permsOf(b.child('image')!)).toEqual({ perm: CR, shared: CR | WU });
    expect(() => user(g.node('f'), 'resizer', RESIZE, ALL)).toThrow(
      "Permission conflict on node 'f': permissions 'resize' are both required by resizer (uses node 'f' as 'x' child) " +
        `and unshared by node '${b.nodeName}' (uses node 'f' as 'image' child).`,
    );
  });

  it('taking write on a read-only image is refused', async () => {
    const g = testGraph();
    const image = { driver: 'file', filename: rawFile(), 'read-only': true };
    await expect(g.openNode({ driver: 'blkdebug', 'take-child-perms': ['write'], image })).rejects.toThrow(/^Block node is read-only$/);
  });
});

describe('backing child (bdrv_default_perms_for_cow)', () => {
  it('reads when the overlay is read, and shares write only while the overlay does', async () => {
    const g = testGraph();
    const top = await g.openImage(await qcow2File(g, await qcow2File(g)), { format: 'qcow2' });
    expect(permsOf(top.backing!)).toEqual({ perm: 0, shared: ALL });
    const reader = user(top, 'reader', CR, CR | WU);
    expect(permsOf(top.backing!)).toEqual({ perm: CR, shared: CR | WU });
    setEdgePerms(reader, CR, ALL);
    expect(permsOf(top.backing!)).toEqual({ perm: CR, shared: ALL });
  });
});

describe('refresh (bdrv_refresh_perms)', () => {
  it('a conflict two levels below refuses the new user and puts every edge back', async () => {
    const g = testGraph();
    const q = await qcow2OverFile(g);
    const r = await g.openNode({ driver: 'raw', 'node-name': 'r', file: 'q' });
    const f = g.node('f');
    user(f, 'reader of f', CR, ALL);
    const before = [r.file!, q.file!].map(permsOf);
    expect(() => user(r, 'reader unsharing reads', CR, W | WU | RESIZE)).toThrow(
      "Permission conflict on node 'f': permissions 'consistent read' are both required by reader of f (uses node 'f' as 'x' child) " +
        "and unshared by node 'q' (uses node 'f' as 'file' child).",
    );
    expect([r.file!, q.file!].map(permsOf)).toEqual(before);
    expect(r.parents).toHaveLength(0);
  });

  it('tightening a user is refused as attaching would be; loosening never fails', async () => {
    const g = testGraph();
    const q = await qcow2OverFile(g);
    user(g.node('f'), 'reader of f', CR, ALL);
    const edge = user(q, 'reader', CR, ALL);
    expect(() => setEdgePerms(edge, CR, WU)).toThrow(/^Permission conflict on node 'f': permissions 'consistent read'/);
    expect(permsOf(edge)).toEqual({ perm: CR, shared: ALL });
    expect(permsOf(q.file!)).toEqual({ perm: CR | W | RESIZE, shared: CR | WU });
    setEdgePerms(edge, 0, ALL);
    expect(permsOf(edge)).toEqual({ perm: 0, shared: ALL });
  });

  it('checks a planned read-only switch without changing anything (a reopen checking first)', async () => {
    const g = testGraph();
    const q = await qcow2OverFile(g);
    const writer = user(q, 'writer', CR | W, ALL);
    const toReadOnly = new Map([[q, true]]);
    expect(() => refreshPerms([q], { readOnlyAfter: toReadOnly })).toThrow("Read-only block node 'q' cannot support read-write users");
    detachChild(writer);
    const undo = refreshPerms([q], { readOnlyAfter: toReadOnly });
    expect(permsOf(q.file!)).toEqual({ perm: CR, shared: CR | WU });
    undo();
    expect(permsOf(q.file!)).toEqual({ perm: CR | W | RESIZE, shared: CR | WU });
  });
});

describe('moving parents (bdrv_replace_node)', () => {
  /** Two writers on raw `src`, and a copy-before-write filter above it, copying to raw `tgt`. */
  async function cbwSetUp() {
    const g = testGraph();
    const src = await g.openNode({ driver: 'raw', 'node-name': 'src', file: { driver: 'file', filename: rawFile() } });
    await g.openNode({ driver: 'raw', 'node-name': 'tgt', file: { driver: 'file', filename: rawFile() } });
    const writers = [user(src, 'writer 1', CR | W, ALL), user(src, 'writer 2', CR | W, ALL)];
    const filter = await g.openNode({ driver: 'copy-before-write', 'node-name': 'cbw', file: 'src', target: 'tgt' });
    return { src, writers, filter };
  }

  it('moves a batch and checks once: the filter guards its source only when all its users sit above it', async () => {
    const { src, writers, filter } = await cbwSetUp();
    replaceChildNodes(writers, filter);
    expect(src.parents.map((e) => e.parent)).toEqual([filter]);
    expect(permsOf(filter.file!)).toEqual({ perm: CR | W, shared: CR | WU });
  });

  it('one edge at a time, the first move conflicts with the writer left behind, and is undone', async () => {
    const { src, writers, filter } = await cbwSetUp();
    expect(() => replaceChildNode(writers[0]!, filter)).toThrow(
      "Permission conflict on node 'src': permissions 'write' are both required by writer 2 (uses node 'src' as 'x' child) " +
        "and unshared by node 'cbw' (uses node 'src' as 'file' child).",
    );
    expect(src.parents.map((e) => e.parent.describe())).toEqual(['writer 1', 'writer 2', "node 'cbw'"]);
    expect(filter.parents).toHaveLength(0);
    expect(permsOf(filter.file!)).toEqual({ perm: 0, shared: ALL });
  });
});
