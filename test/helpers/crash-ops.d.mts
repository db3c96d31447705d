// Types of crash-ops.mjs (plain JavaScript so the writer process can load it).
export declare const CRASH_IMAGE_BYTES: number;
export declare const CRASH_OPS: number;
export declare const CRASH_BATCH_OPS: number;
export declare const CRASH_FLUSH_EVERY_BATCHES: number;
export type CrashOp =
  | { kind: 'write'; offset: number; length: number; data: Uint8Array }
  | { kind: 'zero'; offset: number; length: number; unmap: boolean }
  | { kind: 'discard'; offset: number; length: number };
export declare function prng(seed: number): () => number;
export declare function crashOps(seed: number): CrashOp[];
