/*
 * hostio: the few host-file operations Node's fs module lacks.
 *
 * The file driver needs three things fs cannot do: find allocated extents
 * (lseek SEEK_DATA / SEEK_HOLE, for block-status), deallocate or zero a range
 * without writing a buffer (fallocate PUNCH_HOLE / ZERO_RANGE, for discard
 * and write-zeroes), and preallocate (fallocate mode 0). It also reports the
 * size of block devices, for which fstat says 0.
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
 *
 * Errors: a JS Error whose `.code` is the errno name and `.syscall` the call.
 * As in QEMU's do_fallocate, fallocate's "this file cannot do that" errnos
 * (EOPNOTSUPP, ENODEV, ENOSYS, ENOTTY) all become 'ENOTSUP', the code the
 * block layer reads as "fall back". Bad arguments (non-integer, negative,
 * above 2^53, fd outside int range) throw a TypeError before any syscall.
 *
 * Left out: FALLOC_FL_NO_HIDE_STALE, COLLAPSE/INSERT_RANGE, BLKDISCARD and
 * BLKZEROOUT ioctls for block devices (fallocate covers them on Linux >= 4.9).
 * On hosts without SEEK_DATA or fallocate every call fails with ENOTSUP.
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

#include <node_api.h>

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

/* Largest offset or length a JS number carries exactly: 2^53. */
#define HOSTIO_OFFSET_MAX_BYTES 9007199254740992.0
/* Arguments of the widest call (fd, offset, length). */
#define HOSTIO_ARGC_MAX 3

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
    {ECANCELED, "ECANCELED"},
};

static const char *errno_name(int err) {
  size_t count = sizeof(ERRNO_NAMES) / sizeof(ERRNO_NAMES[0]);
  for (size_t i = 0; i < count; i++) {
    if (ERRNO_NAMES[i].number == err) return ERRNO_NAMES[i].name;
  }
  return "EIO"; /* unknown errnos read as I/O errors, like toBlockError */
}

#if HOSTIO_HAVE_FALLOCATE
/* fallocate's "not on this file" answers, folded as QEMU's do_fallocate does. */
static int fallocate_errno(int err) {
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
  napi_value argv[1], result;
  int fd;
  if (!get_args(env, info, 1, argv) || !get_fd(env, argv[0], &fd)) return NULL;
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
  req->err = rc < 0 ? fallocate_errno(errno) : 0;
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

/* ---- module ------------------------------------------------------------- */

NAPI_MODULE_INIT() {
  napi_property_descriptor functions[] = {
      {"seekData", NULL, seek_data, NULL, NULL, NULL, napi_enumerable, NULL},
      {"seekHole", NULL, seek_hole, NULL, NULL, NULL, napi_enumerable, NULL},
      {"punchHole", NULL, punch_hole, NULL, NULL, NULL, napi_enumerable, NULL},
      {"zeroRange", NULL, zero_range, NULL, NULL, NULL, napi_enumerable, NULL},
      {"allocate", NULL, allocate, NULL, NULL, NULL, napi_enumerable, NULL},
      {"sizeBytes", NULL, size_bytes, NULL, NULL, NULL, napi_enumerable, NULL},
  };
  size_t count = sizeof(functions) / sizeof(functions[0]);
  if (napi_define_properties(env, exports, count, functions) != napi_ok) {
    return NULL;
  }
  return exports;
}
