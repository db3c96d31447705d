/*
 * The copy loop that stream and intermediate commit share (QEMU's
 * stream_run and commit_run): walk the device's length in chunks of at most
 * CHAIN_CHUNK_BYTES, ask the kind which stretch at `offset` needs copying (block
 * status through the chain, so the cost grows with the allocated data, not
 * with the virtual size), copy it from `read` to `write` one request at a
 * time, and account progress for every stretch, copied or not, so the total
 * is the device's length as in QEMU.
 *
 * Between stretches the job sleeps as long as the speed limit says for the
 * bytes just copied (a stretch that was skipped costs nothing) and passes a
 * pause point; a hard cancel ends the loop. A failed stretch goes through
 * the job's error policy: `stop` pauses the job and retries the stretch
 * after resume; `report` fails the job at once; `ignore` either retries the
 * stretch (commit, as QEMU's commit_run does) or moves past it and fails
 * the job at the end (stream: "do not remove the backing file if an error
 * was there but ignored"). Errors of the write half count as write errors
 * (BLOCK_JOB_ERROR operation "write"), everything else as reads.
 *
 * Without a `write` edge (stream) the copy is a read with `readFlags`
 * (Req.PREFETCH through the copy-on-read filter): the read itself writes
 * the data into the device (block/copy-on-read-io.ts), and every failure is
 * a read failure, as in QEMU's stream_populate.
 */
import { BlockError, toBlockError } from '../block/errors.js';
import { preadv, pwritev } from '../block/io.js';
import type { BdrvChild } from '../block/node.js';
import type { Job, OnErrorPolicy } from './job.js';

/** Largest stretch copied at once (QEMU's STREAM_CHUNK and COMMIT_BUFFER_SIZE). */
export const CHAIN_CHUNK_BYTES = 512 * 1024;

export interface ChainCopyPlan {
  /** Whether the stretch at `offset` (at most `maxBytes`) needs copying, and its length (> 0). */
  decide(offsetBytes: number, maxBytes: number): Promise<{ copy: boolean; bytes: number }>;
  /** Edge reads go through (the top of the chain). */
  read: BdrvChild;
  /** Flags of the reads (Req.PREFETCH when the read itself copies). */
  readFlags?: number;
  /** Edge writes go through (the base for commit); null: the read copies (stream). */
  write: BdrvChild | null;
  lengthBytes: number;
  onError: OnErrorPolicy;
  /** What `ignore` does with a failed stretch. */
  ignoreMeans: 'retry' | 'skip';
}

/** A write-side failure, so the error policy reports operation "write". */
class WriteFailure extends Error {
  constructor(readonly failure: BlockError) {
    super(failure.message);
  }
}

/** Runs the loop of the note at the top; throws the job's failure. */
export async function runChainCopy(job: Job, plan: ChainCopyPlan): Promise<void> {
  job.progressSetRemaining(plan.lengthBytes);
  const buf = new Uint8Array(CHAIN_CHUNK_BYTES);
  let delayBytes = 0;
  let ignored: BlockError | null = null;
  for (let offset = 0; offset < plan.lengthBytes; ) {
    await job.rateLimit(delayBytes);
    if (job.isCancelled()) break;
    const maxBytes = Math.min(CHAIN_CHUNK_BYTES, plan.lengthBytes - offset);
    let step = { copy: false, bytes: maxBytes };
    try {
      step = await plan.decide(offset, maxBytes);
      step.bytes = Math.min(step.bytes, maxBytes);
      if (!(step.bytes > 0)) throw new BlockError('EIO', `Block status made no progress at offset ${offset}`);
      if (step.copy) await copyStretch(plan, offset, buf.subarray(0, step.bytes));
    } catch (e) {
      const isWrite = e instanceof WriteFailure;
      const err = isWrite ? e.failure : toBlockError(e);
      const action = job.errorAction(err, !isWrite, plan.onError);
      if (action === 'report') throw err;
      delayBytes = 0;
      if (action === 'stop' || plan.ignoreMeans === 'retry') continue;
      ignored ??= err;
    }
    job.progressUpdate(step.bytes);
    offset += step.bytes;
    delayBytes = step.copy ? step.bytes : 0;
  }
  if (ignored) throw ignored;
}

async function copyStretch(plan: ChainCopyPlan, offsetBytes: number, buf: Uint8Array): Promise<void> {
  await preadv(plan.read, offsetBytes, buf, plan.readFlags ?? 0);
  if (!plan.write) return;
  try {
    await pwritev(plan.write, offsetBytes, buf);
  } catch (e) {
    throw new WriteFailure(toBlockError(e));
  }
}
