// The seeded operation sequence shared by the crash writer (which issues it)
// and the crash test (which replays it to know what must read back). Plain
// JavaScript so the writer process can load it without a TypeScript step.

export const CRASH_IMAGE_BYTES = 8 << 20;
export const CRASH_OPS = 4000;
/** Requests issued together (in flight at once) by the writer. */
export const CRASH_BATCH_OPS = 8;
export const CRASH_FLUSH_EVERY_BATCHES = 4;
const MAX_OP_BYTES = 160 << 10;
const SECTOR = 512;

/** A small deterministic PRNG (mulberry32). */
export function prng(seed) {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

/**
 * The ops of one run. Requests inside a batch never overlap each other, so
 * the outcome of a completed batch does not depend on completion order.
 */
export function crashOps(seed) {
  const rand = prng(seed);
  const ops = [];
  let batch = [];
  for (let i = 0; i < CRASH_OPS; i++) {
    if (i % CRASH_BATCH_OPS === 0) batch = [];
    let op;
    for (let tries = 0; tries < 20; tries++) {
      const length = Math.max(1, Math.floor((rand() * MAX_OP_BYTES) / SECTOR)) * SECTOR;
      const offset = Math.floor((rand() * (CRASH_IMAGE_BYTES - length)) / SECTOR) * SECTOR;
      if (batch.some((b) => offset < b.offset + b.length && b.offset < offset + length)) continue;
      const r = rand();
      if (r < 0.7) {
        const data = new Uint8Array(length).fill((i % 251) + 1);
        op = { kind: 'write', offset, length, data };
      } else if (r < 0.9) {
        op = { kind: 'zero', offset, length, unmap: rand() < 0.5 };
      } else {
        op = { kind: 'discard', offset, length };
      }
      break;
    }
    op ??= { kind: 'zero', offset: 0, length: 0, unmap: false };
    batch.push(op);
    ops.push(op);
  }
  return ops;
}
