/*
 * sender: one thread per NBD connection that sends READ replies straight
 * from a host file to the client's socket.
 *
 * Why: answering a large READ the plain way copies every byte twice on
 * Node's threads, pread() into a buffer and writev() from it on the event
 * loop, and the event loop is the server's one thread for everything else.
 * Here the reply header goes out with send() and the data with sendfile(),
 * which splices page-cache pages into the socket (no user-space copy) on a
 * thread of its own, so the event loop only queues the request and hears
 * that it is done. Measured on a tmpfs file over a unix socket: 1 GiB read
 * by nbdcopy costs the server about half the CPU of pread + writev.
 *
 * Contract with nbd/socket-sender.ts (the only caller):
 *   - senderOpen(socketFd, onDone) -> External. dup()s the socket, so the
 *     thread's descriptor stays valid whatever Node does with its own; the
 *     thread starts at once and sleeps until there is work. onDone(id, code)
 *     is called on the JS thread once per queued frame, in queue order: code
 *     null when every byte was handed to the kernel, else the errno name.
 *   - senderFileRange(sender, id, header, fileFd, fileOffset, bytes) queues a
 *     frame: the header bytes (copied, at most SENDER_HEADER_MAX_BYTES), then
 *     `bytes` bytes of the file from fileOffset. The file descriptor is
 *     dup()ed at once, so closing the caller's does not disturb the frame.
 *     Where the file ends early (it shrank), the rest of the frame is zeros:
 *     the reply keeps the length its header announced, as a read past EOF
 *     reads zeros in the block layer.
 *   - senderClose(sender, abort): no frames after this. Without abort the
 *     thread sends what is queued, then closes its descriptor and exits;
 *     with abort it shuts the socket down (a thread blocked on a client that
 *     stopped reading wakes with EPIPE) and fails the rest with ECANCELED.
 *     Either way every queued frame still gets its onDone.
 * Frames are written whole and in queue order; after one fails, the stream
 * is out of step, so every later frame fails with the same code. The caller
 * must not write to the socket itself while frames are queued here.
 *
 * Teardown: Node deletes a threadsafe function when its environment is
 * torn down, whether or not threads still hold it (a worker thread ending,
 * or the main thread leaving its loop), so the thread calls it only under
 * the sender's lock with `env_gone` clear and never releases it: its last
 * message says it has finished, and the JS thread joins it, releases the
 * function and frees the sender. An environment cleanup hook, added after
 * the function and so run before Node's own hook for it, sets `env_gone`,
 * shuts the socket down and joins the thread.
 *
 * A thread per connection rather than the libuv pool: a client that stops
 * reading blocks the thread writing to it (poll() for POLLOUT, no timeout:
 * the connection's owner decides when to give up and aborts), and on the
 * shared pool four such clients would stop every file read of the process.
 *
 * Linux only (sendfile to a socket); elsewhere senderOpen throws ENOTSUP and
 * the server keeps its plain path.
 */
#define _GNU_SOURCE
#define _FILE_OFFSET_BITS 64
#define NAPI_VERSION 8

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#if defined(__linux__)
#include <sys/sendfile.h>
#include <sys/socket.h>
#define SENDER_SUPPORTED 1
#else
#define SENDER_SUPPORTED 0
#endif

#include <node_api.h>

#include "hostio.h"

/* Largest reply header: an extended-header structured chunk is 32 + 8. */
#define SENDER_HEADER_MAX_BYTES 64
/* sendfile() moves at most this much per call (Linux caps at 0x7ffff000). */
#define SENDER_SENDFILE_CHUNK_BYTES (1 << 30)
/* Zeros written per call where the file ends before the frame does. */
#define SENDER_ZERO_CHUNK_BYTES 65536

typedef struct frame {
  struct frame *next;
  double id;
  int file_fd;
  off_t offset;
  off_t bytes;
  size_t header_bytes;
  unsigned char header[SENDER_HEADER_MAX_BYTES];
  int err;
} frame_t;

typedef struct sender_handle sender_handle_t;

typedef struct {
  pthread_mutex_t lock;
  pthread_cond_t wake;
  frame_t *head;
  frame_t *tail;
  int closing;
  int aborted;
  int env_gone; /* torn down: no more calls into Node */
  int sock_fd;
  pthread_t thread;
  napi_threadsafe_function done;
  sender_handle_t *handle; /* the External's until finalized; JS thread */
} sender_t;

/* What the External holds: cleared by senderClose (or the teardown hook),
 * after which the JS side no longer reaches the sender. JS thread only. */
struct sender_handle {
  sender_t *sender;
};

/* The thread's last message through the threadsafe function: it has
 * finished, so the JS thread joins it and frees the sender. */
static frame_t thread_finished;

#if SENDER_SUPPORTED

/* ---- the sending thread ------------------------------------------------- */

/* Waits until the socket takes more bytes (or has failed: the next call says
 * how). */
static void wait_writable(int fd) {
  struct pollfd p = {.fd = fd, .events = POLLOUT, .revents = 0};
  while (poll(&p, 1, -1) < 0 && errno == EINTR) {
  }
}

/* send()s all of buf; 0 or an errno. MSG_MORE: the data follows at once. */
static int send_all(int fd, const unsigned char *buf, size_t len) {
  while (len > 0) {
    ssize_t n = send(fd, buf, len, MSG_NOSIGNAL | MSG_MORE);
    if (n > 0) {
      buf += n;
      len -= (size_t)n;
    } else if (n < 0 && errno == EAGAIN) {
      wait_writable(fd);
    } else if (n < 0 && errno != EINTR) {
      return errno;
    }
  }
  return 0;
}

static int send_zeros(int fd, off_t bytes) {
  static const unsigned char zeros[SENDER_ZERO_CHUNK_BYTES];
  while (bytes > 0) {
    size_t n = bytes < SENDER_ZERO_CHUNK_BYTES ? (size_t)bytes
                                               : SENDER_ZERO_CHUNK_BYTES;
    int err = send_all(fd, zeros, n);
    if (err) return err;
    bytes -= (off_t)n;
  }
  return 0;
}

/* Copies with pread + send, for files sendfile() refuses (EINVAL/ENOSYS). */
static int copy_range(int fd, int file_fd, off_t offset, off_t bytes) {
  unsigned char *buf = malloc(SENDER_ZERO_CHUNK_BYTES);
  if (!buf) return ENOMEM;
  int err = 0;
  while (bytes > 0 && !err) {
    size_t want = bytes < SENDER_ZERO_CHUNK_BYTES ? (size_t)bytes
                                                  : SENDER_ZERO_CHUNK_BYTES;
    ssize_t n = pread(file_fd, buf, want, offset);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) {
      err = errno;
    } else if (n == 0) {
      err = send_zeros(fd, bytes);
      bytes = 0;
    } else {
      err = send_all(fd, buf, (size_t)n);
      offset += n;
      bytes -= n;
    }
  }
  free(buf);
  return err;
}

static int send_file_range(int fd, int file_fd, off_t offset, off_t bytes) {
  while (bytes > 0) {
    size_t want = bytes < SENDER_SENDFILE_CHUNK_BYTES
                      ? (size_t)bytes
                      : SENDER_SENDFILE_CHUNK_BYTES;
    ssize_t n = sendfile(fd, file_fd, &offset, want);
    if (n > 0) {
      bytes -= n;
    } else if (n == 0) {
      return send_zeros(fd, bytes); /* end of file */
    } else if (errno == EAGAIN) {
      wait_writable(fd);
    } else if (errno == EINVAL || errno == ENOSYS) {
      return copy_range(fd, file_fd, offset, bytes);
    } else if (errno != EINTR) {
      return errno;
    }
  }
  return 0;
}

static frame_t *next_frame(sender_t *s, int *aborted) {
  pthread_mutex_lock(&s->lock);
  while (!s->head && !s->closing) pthread_cond_wait(&s->wake, &s->lock);
  frame_t *f = s->head;
  if (f) {
    s->head = f->next;
    if (!s->head) s->tail = NULL;
  }
  *aborted = s->aborted;
  pthread_mutex_unlock(&s->lock);
  return f;
}

/* Hands `f` to the JS thread unless the environment is gone; 0 when it was
 * not delivered. An unlimited queue: a blocking call never waits. */
static int deliver(sender_t *s, frame_t *f) {
  pthread_mutex_lock(&s->lock);
  int sent = !s->env_gone &&
             napi_call_threadsafe_function(s->done, f, napi_tsfn_blocking) ==
                 napi_ok;
  pthread_mutex_unlock(&s->lock);
  return sent;
}

static void *sender_main(void *arg) {
  sender_t *s = arg;
  int broken = 0; /* the errno that put the stream out of step */
  int aborted;
  frame_t *f;
  while ((f = next_frame(s, &aborted)) != NULL) {
    if (aborted) {
      f->err = ECANCELED;
    } else if (broken) {
      f->err = broken;
    } else {
      f->err = send_all(s->sock_fd, f->header, f->header_bytes);
      if (!f->err) f->err = send_file_range(s->sock_fd, f->file_fd, f->offset, f->bytes);
      broken = f->err;
    }
    close(f->file_fd);
    if (!deliver(s, f)) free(f);
  }
  close(s->sock_fd);
  s->sock_fd = -1;
  deliver(s, &thread_finished);
  return NULL;
}

/* Frees a sender whose thread has ended. */
static void free_sender(sender_t *s) {
  for (frame_t *f = s->head; f;) { /* left by a teardown */
    frame_t *next = f->next;
    close(f->file_fd);
    free(f);
    f = next;
  }
  if (s->sock_fd >= 0) close(s->sock_fd);
  pthread_cond_destroy(&s->wake);
  pthread_mutex_destroy(&s->lock);
  free(s);
}

/* Environment teardown, run before Node's own hook for the threadsafe
 * function (hooks run in reverse order of registration): the thread must
 * make no call into it from here on, so it is stopped (the socket shut
 * down, so no client can hold it) and joined. */
static void teardown_hook(void *arg) {
  sender_t *s = arg;
  pthread_mutex_lock(&s->lock);
  s->env_gone = 1;
  s->closing = 1;
  s->aborted = 1;
  if (s->sock_fd >= 0) shutdown(s->sock_fd, SHUT_RDWR);
  pthread_cond_signal(&s->wake);
  pthread_mutex_unlock(&s->lock);
  pthread_join(s->thread, NULL);
  if (s->handle) s->handle->sender = NULL;
  free_sender(s);
}

/* JS thread: the thread has ended; the sender goes. */
static void finish(napi_env env, sender_t *s) {
  pthread_join(s->thread, NULL);
  napi_remove_env_cleanup_hook(env, teardown_hook, s);
  if (s->handle) s->handle->sender = NULL;
  napi_release_threadsafe_function(s->done, napi_tsfn_release);
  free_sender(s);
}

/* JS thread: delivers one frame's outcome to onDone. */
static void call_done(napi_env env, napi_value on_done, void *context,
                      void *data) {
  frame_t *f = data;
  if (f == &thread_finished) {
    /* Torn down with this still queued: the teardown hook freed it. */
    if (env != NULL) finish(env, context);
    return;
  }
  if (env != NULL && on_done != NULL) {
    napi_value argv[2], undefined;
    napi_create_double(env, f->id, &argv[0]);
    if (f->err) {
      napi_create_string_utf8(env, hostio_errno_name(f->err), NAPI_AUTO_LENGTH,
                              &argv[1]);
    } else {
      napi_get_null(env, &argv[1]);
    }
    napi_get_undefined(env, &undefined);
    napi_call_function(env, undefined, on_done, 2, argv, NULL);
  }
  free(f);
}

#endif /* SENDER_SUPPORTED */

/* ---- JS entry points ---------------------------------------------------- */

static void free_handle(napi_env env, void *data, void *hint) {
  (void)env;
  (void)hint;
  sender_handle_t *h = data;
  /* Never closed (the connection object was dropped): let the thread go. */
  sender_t *s = h->sender;
  if (s) {
    s->handle = NULL;
    pthread_mutex_lock(&s->lock);
    s->closing = 1;
    pthread_cond_signal(&s->wake);
    pthread_mutex_unlock(&s->lock);
  }
  free(h);
}

static sender_handle_t *get_handle(napi_env env, napi_value value) {
  return hostio_get_external(env, value, "sender: not a sender");
}

static napi_value sender_open(napi_env env, napi_callback_info info) {
  napi_value argv[2];
  double fd_number;
  if (!hostio_get_args(env, info, 2, argv)) return NULL;
  if (!hostio_get_integer(env, argv[0], (double)INT32_MAX, "socket fd", &fd_number))
    return NULL;
#if SENDER_SUPPORTED
  sender_t *s = calloc(1, sizeof(*s));
  sender_handle_t *h = calloc(1, sizeof(*h));
  if (!s || !h) {
    free(s);
    free(h);
    return hostio_throw_errno(env, ENOMEM, "senderOpen");
  }
  s->sock_fd = fcntl((int)fd_number, F_DUPFD_CLOEXEC, 0);
  if (s->sock_fd < 0) {
    int err = errno;
    free(s);
    free(h);
    return hostio_throw_errno(env, err, "dup");
  }
  napi_value name;
  napi_create_string_utf8(env, "nbd-sender", NAPI_AUTO_LENGTH, &name);
  if (napi_create_threadsafe_function(env, argv[1], NULL, name, 0, 1, NULL,
                                      NULL, s, call_done,
                                      &s->done) != napi_ok) {
    close(s->sock_fd);
    free(s);
    free(h);
    return NULL; /* napi threw: onDone is not a function */
  }
  /* Frames in flight never keep the process alive; the socket does. */
  napi_unref_threadsafe_function(env, s->done);
  pthread_mutex_init(&s->lock, NULL);
  pthread_cond_init(&s->wake, NULL);
  /* Joined by finish or teardown_hook. */
  int err = hostio_start_thread(&s->thread, sender_main, s);
  if (err) {
    napi_release_threadsafe_function(s->done, napi_tsfn_release);
    close(s->sock_fd);
    pthread_cond_destroy(&s->wake);
    pthread_mutex_destroy(&s->lock);
    free(s);
    free(h);
    return hostio_throw_errno(env, err, "pthread_create");
  }
  h->sender = s;
  s->handle = h;
  napi_add_env_cleanup_hook(env, teardown_hook, s);
  napi_value external;
  if (napi_create_external(env, h, free_handle, NULL, &external) != napi_ok) {
    return NULL;
  }
  return external;
#else
  return hostio_throw_errno(env, ENOTSUP, "senderOpen");
#endif
}

static napi_value sender_file_range(napi_env env, napi_callback_info info) {
  napi_value argv[6];
  double id, fd_number, offset, bytes;
  void *header;
  size_t header_bytes;
  if (!hostio_get_args(env, info, 6, argv)) return NULL;
  sender_handle_t *h = get_handle(env, argv[0]);
  if (!h) return NULL;
  if (!hostio_get_integer(env, argv[1], HOSTIO_OFFSET_MAX_BYTES, "id", &id) ||
      !hostio_get_integer(env, argv[3], (double)INT32_MAX, "file fd", &fd_number) ||
      !hostio_get_integer(env, argv[4], HOSTIO_OFFSET_MAX_BYTES, "offset", &offset) ||
      !hostio_get_integer(env, argv[5], HOSTIO_OFFSET_MAX_BYTES, "bytes", &bytes)) {
    return NULL;
  }
  if (napi_get_buffer_info(env, argv[2], &header, &header_bytes) != napi_ok ||
      header_bytes > SENDER_HEADER_MAX_BYTES) {
    napi_throw_type_error(env, "ERR_INVALID_ARG_TYPE",
                          "sender: header must be a Buffer of at most 64 bytes");
    return NULL;
  }
  if (!h->sender) return hostio_throw_errno(env, EBADF, "senderFileRange");
  frame_t *f = calloc(1, sizeof(*f));
  if (!f) return hostio_throw_errno(env, ENOMEM, "senderFileRange");
  f->file_fd = fcntl((int)fd_number, F_DUPFD_CLOEXEC, 0);
  if (f->file_fd < 0) {
    int err = errno;
    free(f);
    return hostio_throw_errno(env, err, "dup");
  }
  f->id = id;
  f->offset = (off_t)offset;
  f->bytes = (off_t)bytes;
  f->header_bytes = header_bytes;
  memcpy(f->header, header, header_bytes);
  sender_t *s = h->sender;
  pthread_mutex_lock(&s->lock);
  if (s->tail) {
    s->tail->next = f;
  } else {
    s->head = f;
  }
  s->tail = f;
  pthread_cond_signal(&s->wake);
  pthread_mutex_unlock(&s->lock);
  return NULL; /* undefined */
}

static napi_value sender_close(napi_env env, napi_callback_info info) {
  napi_value argv[2];
  bool abort_queued = false;
  if (!hostio_get_args(env, info, 2, argv)) return NULL;
  sender_handle_t *h = get_handle(env, argv[0]);
  if (!h) return NULL;
  napi_get_value_bool(env, argv[1], &abort_queued);
  sender_t *s = h->sender;
  if (!s) return NULL; /* closed already */
  h->sender = NULL; /* freed once the thread has finished (finish) */
  s->handle = NULL;
  pthread_mutex_lock(&s->lock);
  s->closing = 1;
  if (abort_queued) {
    s->aborted = 1;
#if SENDER_SUPPORTED
    shutdown(s->sock_fd, SHUT_RDWR);
#endif
  }
  pthread_cond_signal(&s->wake);
  pthread_mutex_unlock(&s->lock);
  return NULL;
}

int sender_define(napi_env env, napi_value exports) {
  napi_property_descriptor functions[] = {
      {"senderOpen", NULL, sender_open, NULL, NULL, NULL, napi_enumerable,
       NULL},
      {"senderFileRange", NULL, sender_file_range, NULL, NULL, NULL,
       napi_enumerable, NULL},
      {"senderClose", NULL, sender_close, NULL, NULL, NULL, napi_enumerable,
       NULL},
  };
  size_t count = sizeof(functions) / sizeof(functions[0]);
  return napi_define_properties(env, exports, count, functions) == napi_ok;
}
