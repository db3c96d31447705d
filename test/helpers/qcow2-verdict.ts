/*
 * Our qcow2 checker's verdict on an image file, for tests that assert a
 * file is clean after an operation (without needing qemu-img).
 */
import { openForCheck } from '../../drivers/qcow2/check-open.js';
import { NO_FIX } from '../../drivers/qcow2/check.js';
import { testGraph } from './graphs.js';

export interface CheckVerdict {
  corruptions: number;
  leaks: number;
  checkErrors: number;
}

/** What a clean image gives. */
export const CLEAN: CheckVerdict = { corruptions: 0, leaks: 0, checkErrors: 0 };

/** Our qcow2 check of a file: corruptions, leaks and check errors (all 0 when clean). */
export async function checkOf(filename: string): Promise<CheckVerdict> {
  const target = await openForCheck(testGraph(), { filename, repair: false }, () => undefined);
  if (target.kind !== 'qcow2') throw new Error(`${filename}: not qcow2`);
  try {
    const { result } = await target.checker.check(NO_FIX);
    return { corruptions: result.corruptions, leaks: result.leaks, checkErrors: result.checkErrors };
  } finally {
    await target.close();
  }
}
