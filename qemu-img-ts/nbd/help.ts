/*
 * qemu-nbd-ts --help and --version: qemu-nbd 7.2's texts, adjusted where
 * ours differs (the default bind address, what is not supported).
 */
import fs from 'node:fs';
import { PROG } from './args.js';

function packageVersion(): string {
  try {
    const pkg = JSON.parse(fs.readFileSync(new URL('../../../package.json', import.meta.url), 'utf8')) as { version?: string };
    return pkg.version ?? 'unknown';
  } catch {
    return 'unknown';
  }
}

export function versionText(): string {
  return `${PROG}-ts version ${packageVersion()} (compatible with qemu-nbd 7.2)\n`;
}

export function helpText(): string {
  return `Usage: ${PROG}-ts [OPTIONS] FILE
  or:  ${PROG}-ts -L [OPTIONS]
QEMU Disk Network Block Device Utility (qemu-block-ts)

  -h, --help                display this help and exit
  -V, --version             output version information and exit

Connection properties:
  -p, --port=PORT           port to listen on (default \`10809')
  -b, --bind=IFACE          interface to bind to (default \`127.0.0.1')
  -k, --socket=PATH         path to the unix socket
  -e, --shared=NUM          device can be shared by NUM clients (default '1')
  -t, --persistent          don't exit on the last connection
  -v, --verbose             display extra debugging information
  -x, --export-name=NAME    expose export by name (default is empty string)
  -D, --description=TEXT    export a human-readable description

Exposing part of the image:
  -o, --offset=OFFSET       offset into the image
  -A, --allocation-depth    expose the allocation depth
  -B, --bitmap=NAME         expose a persistent dirty bitmap

General purpose options:
  -L, --list                list exports available from another NBD server
  --object type,id=ID,...   define an object such as 'secret' for providing
                            passwords and/or encryption keys
  --tls-creds=ID            use id of an earlier --object to provide TLS
  --tls-authz=ID            use id of an earlier --object to provide
                            authorization
  -T, --trace [[enable=]<pattern>][,events=<file>][,file=<file>]
                            accepted; there are no trace events
  --fork                    fork off the server process and exit the parent
                            once the server is running
  --pid-file=PATH           store the server's process ID in the given file

Block device options:
  -f, --format=FORMAT       set image format (raw, qcow2, ...)
  -r, --read-only           export read-only
  -l, --load-snapshot=SNAPSHOT_PARAM
                            load an internal snapshot inside FILE and export it
                            as an read-only device, SNAPSHOT_PARAM format is
                            'snapshot.id=[ID],snapshot.name=[NAME]', or
                            '[ID_OR_NAME]'
  -n, --nocache             disable host cache
      --cache=MODE          set cache mode used to access the disk image, the
                            valid options are: 'none', 'writeback' (default),
                            'writethrough', 'directsync' and 'unsafe'
      --aio=MODE            set AIO mode (native, io_uring or threads)
      --discard=MODE        set discard mode (ignore, unmap)
      --detect-zeroes=MODE  set detect-zeroes mode (off, on, unmap)
      --image-opts          treat FILE as a full set of image options

Not supported: -c/-d (kernel NBD devices), -s (temporary overlay),
--selinux-label.
`;
}
