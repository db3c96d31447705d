/*
 * hostio: the few host-file operations Node's fs module lacks.
 *
 * The file driver needs things fs cannot do: find allocated extents
 * (lseek SEEK_DATA / SEEK_HOLE, for block-status), deallocate or zero a range
 * without writing a buffer (fallocate PUNCH_HOLE / ZERO_RANGE, for discard
 * and write-zeroes), and preallocate (fallocate mode 0). It also reports the
 * size of block devices, for which fstat says 0, hands out memory aligned
 * for O_DIRECT (cache.direct=on), and sets the create-time file attributes
 * nocow and extent_size_hint.
 *
 * Contract, shared with the TypeScript loader drivers/file/host-io.ts:
 *   - seekData(fd, offset) / seekHole(fd, offset) -> number | null, sync.
 *     null means ENXIO: offset at or after EOF, or (SEEK_DATA) no data after
 *     offset. lseek only walks the extent tree, so running it on the JS
 *     thread is cheaper than a trip through the thread pool.
 *   - punchHole / zeroRange / allocate (fd, offset, length) -> Promise<void>,
 *     run on the libuv thread pool: fallocate can take milliseconds on big
 *     ranges or busy disks. zeroRange deliberately lacks KEEP_SIZE so zeroing
 *     past EOF extends the file, as QEMU's file-posix write-zeroes does.
 *   - sizeBytes(fd) -> number: lseek(fd, 0, SEEK_END). This moves the file
 *     position; callers use positioned I/O only, so nothing is restored.
 *   - alignedBuffer(bytes, alignBytes) -> ArrayBuffer: zero-filled memory
 *     from posix_memalign, freed by the ArrayBuffer's finalizer when it is
 *     collected; its size is reported to V8 as external memory so the
 *     collector knows what it holds. bytes in [1, 1 GiB], alignBytes a power
 *     of two up to 1 MiB. O_DIRECT needs the memory itself aligned, which no
 *     JS allocation promises.
 *   - isAligned(view, alignBytes) -> boolean: whether the first byte of a
 *     TypedArray, Buffer, DataView or ArrayBuffer sits at a multiple of
 *     alignBytes (the view's byte offset included).
 *   - logicalBlockBytes(fd) -> number | null: BLKSSZGET, the logical block
 *     size of a block device; null for files (ENOTTY) and on other hosts.
 *   - setNocow(fd): FS_IOC_GETFLAGS, then FS_IOC_SETFLAGS with FS_NOCOW_FL
 *     (btrfs: no copy-on-write for this file).
 *   - setExtentSizeHint(fd, hintBytes): FS_IOC_FSGETXATTR, then
 *     FS_IOC_FSSETXATTR with FS_XFLAG_EXTSIZE and fsx_extsize = hintBytes
 *     (hintBytes at most 2^32 - 1; XFS honours it).
 *   The three ioctl calls are synchronous: they touch one inode's metadata.
 *   - lockKind() -> 'ofd' | 'posix': which byte-range locks fcntl gives,
 *     probed once as QEMU's qemu_probe_lock_ops does (F_OFD_GETLK on
 *     /dev/null; EINVAL means the kernel predates OFD locks, and so does a
 *     build without F_OFD_SETLK). OFD locks belong to the open file
 *     description: two opens of one file conflict even in one process, and
 *     they go when the description is closed. POSIX locks belong to the
 *     process and go when any of its descriptors of the file is closed.
 *   - lockBytes(fd, offset, length): a shared (F_RDLCK) lock on the range,
 *     F_OFD_SETLK (else F_SETLK), retried on EINTR; never waits. Shared
 *     locks only conflict with exclusive ones, which QEMU's image locking
 *     never takes, so this fails only where the file system cannot lock
 *     (ENOLCK, ENOTSUP).
 *   - unlockBytes(fd, offset, length): F_UNLCK on the range.
 *   - lockConflict(fd, offset, length) -> boolean: F_OFD_GETLK (else
 *     F_GETLK) asking for an exclusive lock: true when another open file
 *     description (another process, for POSIX locks) holds any lock on the
 *     range (QEMU's qemu_lock_fd_test).
 *   The lock calls are synchronous: fcntl with F_*SETLK never blocks, and
 *   the block layer's permission refresh that calls them is synchronous.
 *
 * Errors: a JS Error whose `.code` is the errno name and `.syscall` the call.
 * As in QEMU's do_fallocate, fallocate's "this file cannot do that" errnos
 * (EOPNOTSUPP, ENODEV, ENOSYS, ENOTTY) all become 'ENOTSUP', the code the
 * block layer reads as "fall back"; so do the ioctls' (ENOTTY: the file
 * system has no such ioctl). Bad arguments (non-integer, negative, above
 * 2^53, fd outside int range, a non-power-of-two alignment) throw a
 * TypeError before any syscall.
 *
 * Left out: FALLOC_FL_NO_HIDE_STALE, COLLAPSE/INSERT_RANGE, BLKDISCARD and
 * BLKZEROOUT ioctls for block devices (fallocate covers them on Linux >= 4.9),
 * XFS_IOC_DIOINFO and statx(STATX_DIOALIGN) (the driver probes alignment
 * with reads, as QEMU 7.2 does). On hosts without SEEK_DATA, fallocate or
 * the Linux ioctls those calls fail with ENOTSUP.
 */
#define _GNU_SOURCE
#define _FILE_OFFSET_BITS 64
#define NAPI_VERSION 8

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#if defined(__linux__)
#include <linux/fs.h>
#include <sys/ioctl.h>
#endif

#include <node_api.h>

#include "hostio.h"

#if defined(SEEK_DATA) && defined(SEEK_HOLE)
#define HOSTIO_HAVE_SEEK_DATA 1
#else
#define HOSTIO_HAVE_SEEK_DATA 0
#define SEEK_DATA 0
#define SEEK_HOLE 0
#endif

#if defined(__linux__) && defined(FALLOC_FL_PUNCH_HOLE) && \
    defined(FALLOC_FL_ZERO_RANGE)
#define HOSTIO_HAVE_FALLOCATE 1
#else
#define HOSTIO_HAVE_FALLOCATE 0
#define FALLOC_FL_KEEP_SIZE 0
#define FALLOC_FL_PUNCH_HOLE 0
#define FALLOC_FL_ZERO_RANGE 0
#endif

#if defined(__linux__) && defined(FS_IOC_GETFLAGS) && \
    defined(FS_IOC_FSSETXATTR) && defined(BLKSSZGET)
#define HOSTIO_HAVE_FS_IOCTLS 1
#ifndef FS_NOCOW_FL
#define FS_NOCOW_FL 0x00800000 /* older kernel headers lack it */
#endif
#else
#define HOSTIO_HAVE_FS_IOCTLS 0
#endif

/* Arguments of the widest call (senderFileRange: sender, id, header, fd,
 * offset, length). */
#define HOSTIO_ARGC_MAX 6
/* Largest alignedBuffer: the block layer's largest request (1 GiB). */
#define HOSTIO_ALIGNED_BUFFER_MAX_BYTES 1073741824.0
/* Largest alignment: the block layer's largest request alignment (1 MiB). */
#define HOSTIO_ALIGN_MAX_BYTES 1048576.0
/* fsx_extsize is a __u32. */
#define HOSTIO_EXTENT_SIZE_HINT_MAX_BYTES 4294967295.0

/* ---- errno names -------------------------------------------------------- */

typedef struct {
  int number;
  const char *name;
} errno_name_t;

/* The errnos these syscalls document, plus the usual suspects. */
static const errno_name_t ERRNO_NAMES[] = {
    {EPERM, "EPERM"},   {EINTR, "EINTR"},     {EIO, "EIO"},
    {ENXIO, "ENXIO"},   {EBADF, "EBADF"},     {EAGAIN, "EAGAIN"},
    {ENOMEM, "ENOMEM"}, {EACCES, "EACCES"},   {EFAULT, "EFAULT"},
    {EBUSY, "EBUSY"},   {ENODEV, "ENODEV"},   {EISDIR, "EISDIR"},
    {EINVAL, "EINVAL"}, {ETXTBSY, "ETXTBSY"}, {EFBIG, "EFBIG"},
    {ENOSPC, "ENOSPC"}, {ESPIPE, "ESPIPE"},   {EROFS, "EROFS"},
    {ENOSYS, "ENOSYS"}, {EOVERFLOW, "EOVERFLOW"},
    {ENOTSUP, "ENOTSUP"}, {EOPNOTSUPP, "ENOTSUP"}, {EDQUOT, "EDQUOT"},
    {ECANCELED, "ECANCELED"}, {ENOLCK, "ENOLCK"},
    {EPIPE, "EPIPE"}, {ECONNRESET, "ECONNRESET"}, {ENOTSOCK, "ENOTSOCK"},
};

static const char *errno_name(int err) {
  size_t count = sizeof(ERRNO_NAMES) / sizeof(ERRNO_NAMES[0]);
  for (size_t i = 0; i < count; i++) {
    if (ERRNO_NAMES[i].number == err) return ERRNO_NAMES[i].name;
  }
  return "EIO"; /* unknown errnos read as I/O errors, like toBlockError */
}

#if HOSTIO_HAVE_FALLOCATE || HOSTIO_HAVE_FS_IOCTLS
/* "Not on this file" answers, folded as QEMU's translate_err does. */
static int unsupported_errno(int err) {
  if (err == EOPNOTSUPP || err == ENODEV || err == ENOSYS || err == ENOTTY) {
    return ENOTSUP;
  }
  return err;
}
#endif

/* ---- errors ------------------------------------------------------------- */

/* Builds Error("<syscall>: <strerror>") with .code and .syscall; main thread. */
static napi_value make_errno_error(napi_env env, int err, const char *syscall) {
  char text[160];
  napi_value code, message, error, syscall_value;
  snprintf(text, sizeof(text), "%s: %s", syscall, strerror(err));
  napi_create_string_utf8(env, errno_name(err), NAPI_AUTO_LENGTH, &code);
  napi_create_string_utf8(env, text, NAPI_AUTO_LENGTH, &message);
  napi_create_error(env, code, message, &error);
  napi_create_string_utf8(env, syscall, NAPI_AUTO_LENGTH, &syscall_value);
  napi_set_named_property(env, error, "syscall", syscall_value);
  return error;
}

static napi_value throw_errno(napi_env env, int err, const char *syscall) {
  napi_throw(env, make_errno_error(env, err, syscall));
  return NULL;
}

const char *hostio_errno_name(int err) { return errno_name(err); }

napi_value hostio_throw_errno(napi_env env, int err, const char *syscall) {
  return throw_errno(env, err, syscall);
}

/* ---- argument parsing --------------------------------------------------- */

/* Fetches exactly `want` arguments; throws TypeError when fewer were given. */
static int get_args(napi_env env, napi_callback_info info, size_t want,
                    napi_value *argv) {
  size_t argc = HOSTIO_ARGC_MAX;
  napi_value all[HOSTIO_ARGC_MAX];
  if (napi_get_cb_info(env, info, &argc, all, NULL, NULL) != napi_ok) return 0;
  if (argc < want) {
    napi_throw_type_error(env, "ERR_MISSING_ARGS", "hostio: too few arguments");
    return 0;
  }
  memcpy(argv, all, want * sizeof(napi_value));
  return 1;
}

/* A JS number that is an integer in [0, max]; else TypeError naming `what`. */
static int get_integer(napi_env env, napi_value value, double max,
                       const char *what, double *out) {
  char text[96];
  double number;
  if (napi_get_value_double(env, value, &number) != napi_ok) {
    snprintf(text, sizeof(text), "hostio: %s must be a number", what);
    napi_throw_type_error(env, "ERR_INVALID_ARG_TYPE", text);
    return 0;
  }
  if (!isfinite(number) || number < 0 || number > max ||
      floor(number) != number) {
    snprintf(text, sizeof(text),
             "hostio: %s must be an integer in [0, %.0f], got %g", what, max,
             number);
    napi_throw_type_error(env, "ERR_OUT_OF_RANGE", text);
    return 0;
  }
  *out = number;
  return 1;
}

int hostio_get_args(napi_env env, napi_callback_info info, size_t want,
                    napi_value *argv) {
  return get_args(env, info, want, argv);
}

int hostio_get_integer(napi_env env, napi_value value, double max,
                       const char *what, double *out) {
  return get_integer(env, value, max, what, out);
}

int hostio_start_thread(pthread_t *thread, void *(*main)(void *), void *arg) {
  pthread_attr_t attr;
  int err = pthread_attr_init(&attr);
  if (err) return err;
  err = pthread_attr_setstacksize(&attr, HOSTIO_THREAD_STACK_BYTES);
  if (!err) err = pthread_create(thread, &attr, main, arg);
  pthread_attr_destroy(&attr);
  return err;
}

void *hostio_get_external(napi_env env, napi_value value, const char *what) {
  void *data = NULL;
  if (napi_get_value_external(env, value, &data) != napi_ok || !data) {
    napi_throw_type_error(env, "ERR_INVALID_ARG_TYPE", what);
    return NULL;
  }
  return data;
}

static int get_fd(napi_env env, napi_value value, int *fd) {
  double number;
  if (!get_integer(env, value, (double)INT_MAX, "fd", &number)) return 0;
  *fd = (int)number;
  return 1;
}

static int get_bytes(napi_env env, napi_value value, const char *what,
                     off_t *bytes) {
  double number;
  if (!get_integer(env, value, HOSTIO_OFFSET_MAX_BYTES, what, &number)) {
    return 0;
  }
  *bytes = (off_t)number;
  return 1;
}

/* Parses a call whose only argument is an fd. */
static int get_fd_arg(napi_env env, napi_callback_info info, int *fd) {
  napi_value argv[1];
  return get_args(env, info, 1, argv) && get_fd(env, argv[0], fd);
}

/* Parses (fd, offset[, length]) into the out-parameters; length may be NULL. */
static int get_range(napi_env env, napi_callback_info info, int *fd,
                     off_t *offset_bytes, off_t *length_bytes) {
  napi_value argv[HOSTIO_ARGC_MAX];
  size_t want = length_bytes ? 3 : 2;
  if (!get_args(env, info, want, argv)) return 0;
  if (!get_fd(env, argv[0], fd)) return 0;
  if (!get_bytes(env, argv[1], "offset", offset_bytes)) return 0;
  return !length_bytes || get_bytes(env, argv[2], "length", length_bytes);
}

/* ---- seekData / seekHole / sizeBytes (synchronous) ---------------------- */

/* lseek with SEEK_DATA or SEEK_HOLE; ENXIO (nothing found) becomes null. */
static napi_value seek(napi_env env, napi_callback_info info, int whence,
                       const char *syscall) {
  int fd;
  off_t offset_bytes;
  napi_value result;
  if (!get_range(env, info, &fd, &offset_bytes, NULL)) return NULL;
  if (!HOSTIO_HAVE_SEEK_DATA) return throw_errno(env, ENOTSUP, syscall);
  off_t found = lseek(fd, offset_bytes, whence);
  if (found < 0 && errno == ENXIO) {
    napi_get_null(env, &result);
    return result;
  }
  if (found < 0) return throw_errno(env, errno, syscall);
  napi_create_double(env, (double)found, &result);
  return result;
}

static napi_value seek_data(napi_env env, napi_callback_info info) {
  return seek(env, info, SEEK_DATA, "lseek(SEEK_DATA)");
}

static napi_value seek_hole(napi_env env, napi_callback_info info) {
  return seek(env, info, SEEK_HOLE, "lseek(SEEK_HOLE)");
}

static napi_value size_bytes(napi_env env, napi_callback_info info) {
  napi_value result;
  int fd;
  if (!get_fd_arg(env, info, &fd)) return NULL;
  off_t end = lseek(fd, 0, SEEK_END);
  if (end < 0) return throw_errno(env, errno, "lseek(SEEK_END)");
  napi_create_double(env, (double)end, &result);
  return result;
}

/* ---- punchHole / zeroRange / allocate (thread pool) --------------------- */

/* One fallocate request; owned by the async work from queue to complete. */
typedef struct {
  napi_async_work work;
  napi_deferred deferred;
  const char *syscall;
  int fd;
  int mode;
  off_t offset_bytes;
  off_t length_bytes;
  int err; /* 0 on success; written on the pool thread, read on main */
} fallocate_req_t;

/* Pool thread: no N-API calls allowed here. */
static void fallocate_execute(napi_env env, void *data) {
  fallocate_req_t *req = data;
  (void)env;
#if HOSTIO_HAVE_FALLOCATE
  int rc;
  do {
    rc = fallocate(req->fd, req->mode, req->offset_bytes, req->length_bytes);
  } while (rc < 0 && errno == EINTR);
  req->err = rc < 0 ? unsupported_errno(errno) : 0;
#else
  req->err = ENOTSUP;
#endif
}

/* Main thread: settle the promise and free the request. */
static void fallocate_complete(napi_env env, napi_status status, void *data) {
  fallocate_req_t *req = data;
  napi_value undefined;
  if (status == napi_cancelled) req->err = ECANCELED;
  if (req->err == 0) {
    napi_get_undefined(env, &undefined);
    napi_resolve_deferred(env, req->deferred, undefined);
  } else {
    napi_reject_deferred(env, req->deferred,
                         make_errno_error(env, req->err, req->syscall));
  }
  napi_delete_async_work(env, req->work);
  free(req);
}

/* Validates (fd, offset, length), queues the work, returns its promise. */
static napi_value queue_fallocate(napi_env env, napi_callback_info info,
                                  int mode, const char *syscall) {
  napi_value promise, resource_name;
  fallocate_req_t *req = calloc(1, sizeof(*req));
  if (!req) return throw_errno(env, ENOMEM, syscall);
  req->mode = mode;
  req->syscall = syscall;
  if (!get_range(env, info, &req->fd, &req->offset_bytes,
                 &req->length_bytes)) {
    free(req);
    return NULL;
  }
  napi_create_promise(env, &req->deferred, &promise);
  napi_create_string_utf8(env, syscall, NAPI_AUTO_LENGTH, &resource_name);
  napi_create_async_work(env, NULL, resource_name, fallocate_execute,
                         fallocate_complete, req, &req->work);
  napi_queue_async_work(env, req->work);
  return promise;
}

static napi_value punch_hole(napi_env env, napi_callback_info info) {
  return queue_fallocate(env, info, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
                         "fallocate(PUNCH_HOLE)");
}

static napi_value zero_range(napi_env env, napi_callback_info info) {
  return queue_fallocate(env, info, FALLOC_FL_ZERO_RANGE,
                         "fallocate(ZERO_RANGE)");
}

static napi_value allocate(napi_env env, napi_callback_info info) {
  return queue_fallocate(env, info, 0, "fallocate");
}

/* ---- alignedBuffer / isAligned (memory for O_DIRECT) -------------------- */

/* A power of two in [1, HOSTIO_ALIGN_MAX_BYTES]; else TypeError. */
static int get_alignment(napi_env env, napi_value value, size_t *align_bytes) {
  double number;
  if (!get_integer(env, value, HOSTIO_ALIGN_MAX_BYTES, "alignBytes", &number)) {
    return 0;
  }
  size_t align = (size_t)number;
  if (align == 0 || (align & (align - 1)) != 0) {
    napi_throw_type_error(env, "ERR_OUT_OF_RANGE",
                          "hostio: alignBytes must be a power of two");
    return 0;
  }
  *align_bytes = align;
  return 1;
}

/* Finalizer of alignedBuffer's ArrayBuffer; `hint` carries its size. */
static void free_aligned(napi_env env, void *data, void *hint) {
  int64_t external_bytes;
  free(data);
  napi_adjust_external_memory(env, -(int64_t)(uintptr_t)hint, &external_bytes);
}

static napi_value aligned_buffer(napi_env env, napi_callback_info info) {
  napi_value argv[2], result;
  double number;
  size_t align_bytes;
  void *data = NULL;
  int64_t external_bytes;
  bool pending = false;
  if (!get_args(env, info, 2, argv)) return NULL;
  if (!get_integer(env, argv[0], HOSTIO_ALIGNED_BUFFER_MAX_BYTES, "bytes",
                   &number)) {
    return NULL;
  }
  if (number < 1) {
    napi_throw_type_error(env, "ERR_OUT_OF_RANGE",
                          "hostio: bytes must be at least 1");
    return NULL;
  }
  if (!get_alignment(env, argv[1], &align_bytes)) return NULL;
  size_t bytes = (size_t)number;
  /* posix_memalign wants a multiple of sizeof(void *). */
  size_t memalign_bytes =
      align_bytes < sizeof(void *) ? sizeof(void *) : align_bytes;
  int err = posix_memalign(&data, memalign_bytes, bytes);
  if (err != 0) return throw_errno(env, err, "posix_memalign");
  memset(data, 0, bytes);
  if (napi_create_external_arraybuffer(env, data, bytes, free_aligned,
                                       (void *)(uintptr_t)bytes,
                                       &result) != napi_ok) {
    free(data);
    napi_is_exception_pending(env, &pending);
    if (pending) return NULL;
    return throw_errno(env, ENOTSUP, "napi_create_external_arraybuffer");
  }
  napi_adjust_external_memory(env, (int64_t)bytes, &external_bytes);
  return result;
}

/* The address of a view's first byte; TypeError for anything else. */
static int view_data(napi_env env, napi_value value, void **data) {
  bool is = false;
  if (napi_is_typedarray(env, value, &is) == napi_ok && is) {
    return napi_get_typedarray_info(env, value, NULL, NULL, data, NULL,
                                    NULL) == napi_ok;
  }
  if (napi_is_dataview(env, value, &is) == napi_ok && is) {
    return napi_get_dataview_info(env, value, NULL, data, NULL, NULL) ==
           napi_ok;
  }
  if (napi_is_arraybuffer(env, value, &is) == napi_ok && is) {
    return napi_get_arraybuffer_info(env, value, data, NULL) == napi_ok;
  }
  napi_throw_type_error(
      env, "ERR_INVALID_ARG_TYPE",
      "hostio: view must be a TypedArray, Buffer, DataView or ArrayBuffer");
  return 0;
}

static napi_value is_aligned(napi_env env, napi_callback_info info) {
  napi_value argv[2], result;
  size_t align_bytes;
  void *data = NULL;
  if (!get_args(env, info, 2, argv)) return NULL;
  if (!view_data(env, argv[0], &data)) return NULL;
  if (!get_alignment(env, argv[1], &align_bytes)) return NULL;
  napi_get_boolean(env, ((uintptr_t)data & (align_bytes - 1)) == 0, &result);
  return result;
}

/* ---- logicalBlockBytes / setNocow / setExtentSizeHint (ioctls) ---------- */

static napi_value logical_block_bytes(napi_env env, napi_callback_info info) {
  napi_value result;
  int fd;
  if (!get_fd_arg(env, info, &fd)) return NULL;
#if HOSTIO_HAVE_FS_IOCTLS
  int sector_bytes = 0;
  if (ioctl(fd, BLKSSZGET, &sector_bytes) == 0 && sector_bytes > 0) {
    napi_create_double(env, (double)sector_bytes, &result);
    return result;
  }
  /* Files and character devices answer ENOTTY (some drivers EINVAL). */
  if (unsupported_errno(errno) != ENOTSUP && errno != EINVAL) {
    return throw_errno(env, errno, "ioctl(BLKSSZGET)");
  }
#endif
  napi_get_null(env, &result);
  return result;
}

static napi_value set_nocow(napi_env env, napi_callback_info info) {
  int fd;
  if (!get_fd_arg(env, info, &fd)) return NULL;
#if HOSTIO_HAVE_FS_IOCTLS
  int attr = 0;
  if (ioctl(fd, FS_IOC_GETFLAGS, &attr) < 0) {
    return throw_errno(env, unsupported_errno(errno), "ioctl(FS_IOC_GETFLAGS)");
  }
  attr |= FS_NOCOW_FL;
  if (ioctl(fd, FS_IOC_SETFLAGS, &attr) < 0) {
    return throw_errno(env, unsupported_errno(errno), "ioctl(FS_IOC_SETFLAGS)");
  }
#else
  return throw_errno(env, ENOTSUP, "ioctl(FS_IOC_SETFLAGS)");
#endif
  return NULL; /* undefined */
}

static napi_value set_extent_size_hint(napi_env env, napi_callback_info info) {
  napi_value argv[2];
  int fd;
  double hint_bytes;
  if (!get_args(env, info, 2, argv) || !get_fd(env, argv[0], &fd)) return NULL;
  if (!get_integer(env, argv[1], HOSTIO_EXTENT_SIZE_HINT_MAX_BYTES,
                   "hintBytes", &hint_bytes)) {
    return NULL;
  }
#if HOSTIO_HAVE_FS_IOCTLS
  struct fsxattr attr;
  memset(&attr, 0, sizeof(attr));
  if (ioctl(fd, FS_IOC_FSGETXATTR, &attr) < 0) {
    return throw_errno(env, unsupported_errno(errno),
                       "ioctl(FS_IOC_FSGETXATTR)");
  }
  attr.fsx_xflags |= FS_XFLAG_EXTSIZE;
  attr.fsx_extsize = (__u32)hint_bytes;
  if (ioctl(fd, FS_IOC_FSSETXATTR, &attr) < 0) {
    return throw_errno(env, unsupported_errno(errno),
                       "ioctl(FS_IOC_FSSETXATTR)");
  }
#else
  (void)hint_bytes;
  return throw_errno(env, ENOTSUP, "ioctl(FS_IOC_FSSETXATTR)");
#endif
  return NULL; /* undefined */
}

/* ---- lockKind / lockBytes / unlockBytes / lockConflict (fcntl) ---------- */

#if defined(F_OFD_SETLK) && defined(F_OFD_GETLK)
#define HOSTIO_HAVE_OFD_LOCKS 1
#else
#define HOSTIO_HAVE_OFD_LOCKS 0
#define F_OFD_SETLK F_SETLK
#define F_OFD_GETLK F_GETLK
#endif

/* -1 until probed, then 1 for OFD locks, 0 for POSIX locks. */
static int ofd_locks_probed = -1;

/* qemu_probe_lock_ops: only EINVAL from F_OFD_GETLK says "no OFD locks". */
static int have_ofd_locks(void) {
  if (ofd_locks_probed >= 0) return ofd_locks_probed;
  ofd_locks_probed = HOSTIO_HAVE_OFD_LOCKS;
  if (HOSTIO_HAVE_OFD_LOCKS) {
    int fd = open("/dev/null", O_RDWR);
    if (fd >= 0) {
      struct flock fl;
      memset(&fl, 0, sizeof(fl));
      fl.l_whence = SEEK_SET;
      fl.l_type = F_WRLCK;
      if (fcntl(fd, F_OFD_GETLK, &fl) < 0 && errno == EINVAL) {
        ofd_locks_probed = 0;
      }
      close(fd);
    }
  }
  return ofd_locks_probed;
}

static napi_value lock_kind(napi_env env, napi_callback_info info) {
  napi_value result;
  (void)info;
  napi_create_string_utf8(env, have_ofd_locks() ? "ofd" : "posix",
                          NAPI_AUTO_LENGTH, &result);
  return result;
}

/* Parses (fd, offset, length) into `fd` and a whole-range lock of `type`. */
static int get_lock_range(napi_env env, napi_callback_info info, short type,
                          int *fd, struct flock *fl) {
  off_t offset_bytes, length_bytes;
  if (!get_range(env, info, fd, &offset_bytes, &length_bytes)) return 0;
  memset(fl, 0, sizeof(*fl));
  fl->l_whence = SEEK_SET;
  fl->l_start = offset_bytes;
  fl->l_len = length_bytes;
  fl->l_type = type;
  return 1;
}

/* Sets (F_RDLCK) or clears (F_UNLCK) the lock on (fd, offset, length). */
static napi_value set_lock(napi_env env, napi_callback_info info, short type) {
  int fd, rc;
  struct flock fl;
  if (!get_lock_range(env, info, type, &fd, &fl)) return NULL;
  int op = have_ofd_locks() ? F_OFD_SETLK : F_SETLK;
  do {
    rc = fcntl(fd, op, &fl);
  } while (rc < 0 && errno == EINTR);
  if (rc < 0) return throw_errno(env, errno, "fcntl(F_SETLK)");
  return NULL; /* undefined */
}

static napi_value lock_bytes(napi_env env, napi_callback_info info) {
  return set_lock(env, info, F_RDLCK);
}

static napi_value unlock_bytes(napi_env env, napi_callback_info info) {
  return set_lock(env, info, F_UNLCK);
}

/* Asks for an exclusive lock: any lock held elsewhere on the range answers. */
static napi_value lock_conflict(napi_env env, napi_callback_info info) {
  int fd;
  struct flock fl;
  napi_value result;
  if (!get_lock_range(env, info, F_WRLCK, &fd, &fl)) return NULL;
  int op = have_ofd_locks() ? F_OFD_GETLK : F_GETLK;
  if (fcntl(fd, op, &fl) < 0) return throw_errno(env, errno, "fcntl(F_GETLK)");
  napi_get_boolean(env, fl.l_type != F_UNLCK, &result);
  return result;
}

/* ---- module ------------------------------------------------------------- */

NAPI_MODULE_INIT() {
  napi_property_descriptor functions[] = {
      {"seekData", NULL, seek_data, NULL, NULL, NULL, napi_enumerable, NULL},
      {"seekHole", NULL, seek_hole, NULL, NULL, NULL, napi_enumerable, NULL},
      {"punchHole", NULL, punch_hole, NULL, NULL, NULL, napi_enumerable, NULL},
      {"zeroRange", NULL, zero_range, NULL, NULL, NULL, napi_enumerable, NULL},
      {"allocate", NULL, allocate, NULL, NULL, NULL, napi_enumerable, NULL},
      {"sizeBytes", NULL, size_bytes, NULL, NULL, NULL, napi_enumerable, NULL},
      {"alignedBuffer", NULL, aligned_buffer, NULL, NULL, NULL, napi_enumerable,
       NULL},
      {"isAligned", NULL, is_aligned, NULL, NULL, NULL, napi_enumerable, NULL},
      {"logicalBlockBytes", NULL, logical_block_bytes, NULL, NULL, NULL,
       napi_enumerable, NULL},
      {"setNocow", NULL, set_nocow, NULL, NULL, NULL, napi_enumerable, NULL},
      {"setExtentSizeHint", NULL, set_extent_size_hint, NULL, NULL, NULL,
       napi_enumerable, NULL},
      {"lockKind", NULL, lock_kind, NULL, NULL, NULL, napi_enumerable, NULL},
      {"lockBytes", NULL, lock_bytes, NULL, NULL, NULL, napi_enumerable, NULL},
      {"unlockBytes", NULL, unlock_bytes, NULL, NULL, NULL, napi_enumerable,
       NULL},
      {"lockConflict", NULL, lock_conflict, NULL, NULL, NULL, napi_enumerable,
       NULL},
  };
  size_t count = sizeof(functions) / sizeof(functions[0]);
  if (napi_define_properties(env, exports, count, functions) != napi_ok ||
      !sender_define(env, exports) || !writer_define(env, exports)) {
    return NULL;
  }
  return exports;
}
