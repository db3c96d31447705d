/*
 * qemu-io's statistics lines (qemu-io-cmds.c print_report, cvtstr, timestr),
 * byte for byte as 7.2 prints them:
 *
 *   wrote 65536/65536 bytes at offset 0
 *   64 KiB, 1 ops; 00.00 sec (51.570 MiB/sec and 825.1274 ops/sec)
 *
 * or with -C the CSV line `65536,1,0:00:00.00,84516560.015,1289.620`.
 *
 * Numbers go through printf's %f in C, which rounds the exact binary value
 * of a double half to even; JS toFixed rounds ties up and is wrong for values
 * like 1.0625 ("1.062" in C). `printfFixed` does the exact decimal
 * expansion with BigInt instead. Elapsed time is measured in nanoseconds
 * (CLOCK_MONOTONIC in QEMU, process.hrtime here).
 */

const NS_PER_SEC = 1_000_000_000n;
const SEC_PER_MIN = 60n;
const SEC_PER_HOUR = 3600n;

/** cvtstr's units, largest first. */
const UNITS: ReadonlyArray<readonly [number, string]> = [
  [2 ** 60, ' EiB'],
  [2 ** 50, ' PiB'],
  [2 ** 40, ' TiB'],
  [2 ** 30, ' GiB'],
  [2 ** 20, ' MiB'],
  [2 ** 10, ' KiB'],
];

/** printf("%.<decimals>f", x) as glibc prints it (exact value, ties to even). */
export function printfFixed(x: number, decimals: number): string {
  if (Number.isNaN(x)) return '-nan';
  if (!Number.isFinite(x)) return x > 0 ? 'inf' : '-inf';
  let scaledDen = 1n;
  let mantissa = Math.abs(x);
  while (!Number.isInteger(mantissa)) {
    mantissa *= 2;
    scaledDen *= 2n;
  }
  const num = BigInt(mantissa) * 10n ** BigInt(decimals);
  let q = num / scaledDen;
  const twiceRest = (num % scaledDen) * 2n;
  if (twiceRest > scaledDen || (twiceRest === scaledDen && q % 2n === 1n)) q += 1n;
  const digits = q.toString().padStart(decimals + 1, '0');
  const sign = x < 0 || Object.is(x, -0) ? '-' : '';
  if (decimals === 0) return sign + digits;
  return `${sign}${digits.slice(0, -decimals)}.${digits.slice(-decimals)}`;
}

/** cvtstr(): `64 KiB`, `1.500 KiB`, `1000 bytes`, `753.138942 bytes`. */
export function cvtstr(value: number): string {
  const unit = UNITS.find(([bytes]) => value >= bytes);
  const text = unit ? printfFixed(value / unit[0], 3) : printfFixed(value, 6);
  const suffix = unit ? unit[1] : ' bytes';
  const trim = text.indexOf('.000');
  return trim >= 0 ? text.slice(0, trim) + suffix : text + suffix;
}

/** timestr(): `00.00 sec` under a second, else (or with -C) `H:MM:SS.ss`. */
export function timestr(elapsedNs: bigint, verbose: boolean): string {
  const sec = elapsedNs / NS_PER_SEC;
  const fracSec = Number(elapsedNs % NS_PER_SEC) / 1e9;
  if (!verbose && sec === 0n) return `${printfFixed(fracSec, 2).padStart(5, '0')} sec`;
  const hours = sec / SEC_PER_HOUR;
  const minutes = (sec % SEC_PER_HOUR) / SEC_PER_MIN;
  const seconds = Number(sec % SEC_PER_MIN) + fracSec;
  return `${hours}:${String(minutes).padStart(2, '0')}:${printfFixed(seconds, 2).padStart(5, '0')}`;
}

/** value per second over the elapsed time (tdiv). */
function perSecond(value: number, elapsedNs: bigint): number {
  const seconds = Number(elapsedNs / NS_PER_SEC) + Number(elapsedNs % NS_PER_SEC) / 1e9;
  return value / seconds;
}

export interface IoReport {
  /** `read`, `wrote` or `discard`. */
  op: string;
  elapsedNs: bigint;
  offsetBytes: number;
  /** Requested bytes. */
  countBytes: number;
  /** Bytes done (equal to countBytes on success). */
  totalBytes: number;
  ops: number;
  /** -C: one CSV line. */
  csv: boolean;
}

/** print_report(): the two statistics lines, or the CSV line; with trailing newline. */
export function formatReport(r: IoReport): string {
  const time = timestr(r.elapsedNs, r.csv);
  const bytesPerSec = perSecond(r.totalBytes, r.elapsedNs);
  const opsPerSec = perSecond(r.ops, r.elapsedNs);
  if (r.csv) {
    return `${r.totalBytes},${r.ops},${time},${printfFixed(bytesPerSec, 3)},${printfFixed(opsPerSec, 3)}\n`;
  }
  return (
    `${r.op} ${r.totalBytes}/${r.countBytes} bytes at offset ${r.offsetBytes}\n` +
    `${cvtstr(r.totalBytes)}, ${r.ops} ops; ${time} (${cvtstr(bytesPerSec)}/sec and ${printfFixed(opsPerSec, 4)} ops/sec)\n`
  );
}

/** Nanoseconds since `startNs` (a process.hrtime.bigint() value). */
export function elapsedSince(startNs: bigint): bigint {
  return process.hrtime.bigint() - startNs;
}
