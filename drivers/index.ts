/*
 * The registry of built-in drivers: one array, no import-time side effects.
 * A BlockGraph is built from it (or from any other list).
 */
import type { BlockDriver } from '../block/driver.js';
import { blkdebugDriver } from './blkdebug.js';
import { fileDriver } from './file/file.js';
import { nullDriver } from './null.js';
import { rawDriver } from './raw.js';

export const builtinDrivers: readonly BlockDriver[] = [fileDriver, rawDriver, nullDriver, blkdebugDriver];

export { blkdebugDriver, fileDriver, nullDriver, rawDriver };
