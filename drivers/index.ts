/*
 * The registry of built-in drivers: one array, no import-time side effects.
 * A BlockGraph is built from it (or from any other list).
 */
import type { BlockDriver } from '../block/driver.js';
import { blkdebugDriver } from './blkdebug.js';
import { copyBeforeWriteDriver } from '../block/copy-before-write.js';
import { copyOnReadDriver } from './copy-on-read.js';
import { fileDriver } from './file/file.js';
import { nbdDriver } from './nbd.js';
import { nullDriver } from './null.js';
import { qcow2Driver } from './qcow2/qcow2.js';
import { rawDriver } from './raw.js';
import { throttleDriver } from './throttle.js';

export const builtinDrivers: readonly BlockDriver[] = [fileDriver, rawDriver, qcow2Driver, nullDriver, blkdebugDriver, nbdDriver, throttleDriver, copyBeforeWriteDriver, copyOnReadDriver];

export { blkdebugDriver, fileDriver, nullDriver, qcow2Driver, rawDriver, throttleDriver };
