/*
 * writer: one thread per open host file that does its large buffered
 * writes, one after another, in the order they were queued.
 *
 * Why: a buffered write to tmpfs, ext4 or xfs holds the inode lock
 * exclusively for its whole copy, so a file takes one large write at a time
 * whatever the number of threads. Through libuv's pool the others wait on
 * that lock spinning (rwsem_spin_on_owner), burning the core that reads and
 * the event loop need; with fewer in flight, the file sits idle each time
 * the event loop is slow to hand out the next. Here the writes queue in
 * memory and one thread takes the next the moment the last ends, sleeping
 * only when the queue is empty.
 *
 * Contract with drivers/file/serial-writer.ts (the only caller):
 *   - writerOpen(fd, onDone) -> External. The thread writes to fd itself,
 *     not to a dup(): OFD image locks live as long as any descriptor of
 *     their open file description, so a dup kept by the thread would hold
 *     them past the caller's close. The caller keeps fd open until every
 *     queued write has had its onDone. The thread starts at once and sleeps
 *     until there is work. onDone(id, code)
 *     is called on the JS thread once per queued write, in queue order: code
 *     null when every byte was written, else the errno name (a write that
 *     makes no progress is EINVAL, as in the file driver's plain path).
 *   - writerWrite(writer, id, view, offset) queues a write of every byte of
 *     the TypedArray `view` at `offset`. The view is held by a reference
 *     until its onDone, so its memory stays alive; the caller must not
 *     change the bytes before then (the block layer's buffers are the
 *     request's own until it completes).
 *   - writerClose(writer): no writes after this. Waits (on the JS thread)
 *     for the thread to finish what is queued and exit, then lets go of the
 *     threadsafe function; fd stays open. Callers close once every queued
 *     write has had its onDone, so the wait is for an idle thread to wake.
 * The process stays alive while writes are queued (the threadsafe function
 * is ref'ed from the first queued write until the last onDone), so a
 * program awaiting one never exits under it.
 *
 * Teardown: Node deletes a threadsafe function when its environment is
 * torn down, whether or not threads still hold it, so the thread never
 * releases it (writerClose does, on the JS thread) and calls it only under
 * the writer's lock with `env_gone` clear. An environment cleanup hook,
 * added after the threadsafe function and so run before Node's own hook
 * for it, sets `env_gone`, drops the queue (nothing was acknowledged for
 * it) and joins the thread; a writer left open at exit ends there.
 */
#define _GNU_SOURCE
#define _FILE_OFFSET_BITS 64
#define NAPI_VERSION 8

#include <errno.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <unistd.h>

#include <node_api.h>

#include "hostio.h"


typedef struct job {
  struct job *next;
  double id;
  napi_ref view; /* keeps the memory alive; deleted on the JS thread */
  const unsigned char *data;
  size_t bytes;
  off_t offset;
  int err;
} job_t;

typedef struct {
  pthread_mutex_t lock;
  pthread_cond_t wake;
  job_t *head;
  job_t *tail;
  int closing;
  int env_gone; /* torn down: no more calls into Node */
  int fd;
  pthread_t thread;
  napi_threadsafe_function done;
} writer_t;

/* What the External holds, touched on the JS thread only: `writer` is freed
 * and cleared by writerClose or the teardown hook; `pending` counts queued
 * writes without their onDone yet. */
typedef struct {
  napi_env env;
  writer_t *writer;
  napi_threadsafe_function tsfn;
  size_t pending;
} writer_handle_t;

/* ---- the writing thread ------------------------------------------------- */

static int write_all(int fd, const unsigned char *data, size_t bytes,
                     off_t offset) {
  while (bytes > 0) {
    ssize_t n = pwrite(fd, data, bytes, offset);
    if (n > 0) {
      data += n;
      bytes -= (size_t)n;
      offset += n;
    } else if (n == 0) {
      return EINVAL;
    } else if (errno != EINTR) {
      return errno;
    }
  }
  return 0;
}

/* The next write, or NULL once closing with nothing queued (at teardown,
 * at once: the queue is dropped). */
static job_t *next_job(writer_t *w) {
  pthread_mutex_lock(&w->lock);
  while (!w->head && !w->closing) pthread_cond_wait(&w->wake, &w->lock);
  job_t *j = w->env_gone ? NULL : w->head;
  if (j) {
    w->head = j->next;
    if (!w->head) w->tail = NULL;
  }
  pthread_mutex_unlock(&w->lock);
  return j;
}

static void *writer_main(void *arg) {
  writer_t *w = arg;
  job_t *j;
  while ((j = next_job(w)) != NULL) {
    j->err = write_all(w->fd, j->data, j->bytes, j->offset);
    pthread_mutex_lock(&w->lock);
    /* An unlimited queue: a blocking call never waits. */
    int sent = !w->env_gone &&
               napi_call_threadsafe_function(w->done, j, napi_tsfn_blocking) ==
                   napi_ok;
    pthread_mutex_unlock(&w->lock);
    if (!sent) free(j); /* nobody is left to hear */
  }
  return NULL;
}

/* JS thread: delivers one write's outcome to onDone. */
static void call_done(napi_env env, napi_value on_done, void *context,
                      void *data) {
  writer_handle_t *h = context;
  job_t *j = data;
  if (env == NULL) { /* torn down: the references went with it */
    free(j);
    return;
  }
  napi_delete_reference(env, j->view);
  if (--h->pending == 0) napi_unref_threadsafe_function(env, h->tsfn);
  napi_value argv[2], undefined;
  napi_create_double(env, j->id, &argv[0]);
  if (j->err) {
    napi_create_string_utf8(env, hostio_errno_name(j->err), NAPI_AUTO_LENGTH,
                            &argv[1]);
  } else {
    napi_get_null(env, &argv[1]);
  }
  free(j);
  napi_get_undefined(env, &undefined);
  napi_call_function(env, undefined, on_done, 2, argv, NULL);
}

/* ---- JS entry points ---------------------------------------------------- */

static void free_writer(writer_t *w) {
  pthread_cond_destroy(&w->wake);
  pthread_mutex_destroy(&w->lock);
  free(w);
}

/* Stops the thread (after the queue, or at once when env_gone is set) and
 * frees the writer. JS thread. */
static void stop_writer(writer_t *w, int env_gone) {
  pthread_mutex_lock(&w->lock);
  w->closing = 1;
  if (env_gone) w->env_gone = 1;
  pthread_cond_signal(&w->wake);
  pthread_mutex_unlock(&w->lock);
  pthread_join(w->thread, NULL);
  for (job_t *j = w->head; j; ) { /* left by a teardown */
    job_t *next = j->next;
    free(j);
    j = next;
  }
  free_writer(w);
}

/* The environment's teardown, before Node's own hook for the threadsafe
 * function: the thread must be gone before that deletes it. */
static void teardown_hook(void *arg) {
  writer_handle_t *h = arg;
  if (!h->writer) return;
  stop_writer(h->writer, 1);
  h->writer = NULL;
}

/* The External's finalizer. onDone holds the JS object that holds the
 * External, and the threadsafe function holds onDone until writerClose
 * releases it, so before teardown this runs only for closed writers; during
 * teardown the hook has run already (call_done then no longer reads the
 * handle). */
static void free_handle(napi_env env, void *data, void *hint) {
  (void)env;
  (void)hint;
  writer_handle_t *h = data;
  if (h->writer) {
    napi_remove_env_cleanup_hook(h->env, teardown_hook, h);
    teardown_hook(h);
  }
  free(h);
}

static writer_handle_t *get_handle(napi_env env, napi_value value) {
  return hostio_get_external(env, value, "writer: not a writer");
}

/* The writer and its threadsafe function; NULL after throwing. */
static writer_t *new_writer(napi_env env, int fd, napi_value on_done,
                            writer_handle_t *h) {
  writer_t *w = calloc(1, sizeof(*w));
  if (!w) {
    hostio_throw_errno(env, ENOMEM, "writerOpen");
    return NULL;
  }
  pthread_mutex_init(&w->lock, NULL);
  pthread_cond_init(&w->wake, NULL);
  w->fd = fd;
  napi_value name;
  napi_create_string_utf8(env, "file-writer", NAPI_AUTO_LENGTH, &name);
  if (napi_create_threadsafe_function(env, on_done, NULL, name, 0, 1, NULL,
                                      NULL, h, call_done,
                                      &w->done) != napi_ok) {
    free_writer(w);
    return NULL; /* napi threw: onDone is not a function */
  }
  napi_unref_threadsafe_function(env, w->done);
  /* Joined by stop_writer. */
  int err = hostio_start_thread(&w->thread, writer_main, w);
  if (err) {
    napi_release_threadsafe_function(w->done, napi_tsfn_release);
    free_writer(w);
    hostio_throw_errno(env, err, "pthread_create");
    return NULL;
  }
  return w;
}

static napi_value writer_open(napi_env env, napi_callback_info info) {
  napi_value argv[2];
  double fd_number;
  if (!hostio_get_args(env, info, 2, argv)) return NULL;
  if (!hostio_get_integer(env, argv[0], (double)INT32_MAX, "fd", &fd_number))
    return NULL;
  writer_handle_t *h = calloc(1, sizeof(*h));
  if (!h) return hostio_throw_errno(env, ENOMEM, "writerOpen");
  writer_t *w = new_writer(env, (int)fd_number, argv[1], h);
  if (!w) {
    free(h);
    return NULL;
  }
  h->env = env;
  h->writer = w;
  h->tsfn = w->done;
  napi_add_env_cleanup_hook(env, teardown_hook, h);
  napi_value external;
  if (napi_create_external(env, h, free_handle, NULL, &external) != napi_ok) {
    return NULL;
  }
  return external;
}

static napi_value writer_write(napi_env env, napi_callback_info info) {
  napi_value argv[4];
  double id, offset;
  if (!hostio_get_args(env, info, 4, argv)) return NULL;
  writer_handle_t *h = get_handle(env, argv[0]);
  if (!h) return NULL;
  if (!hostio_get_integer(env, argv[1], HOSTIO_OFFSET_MAX_BYTES, "id", &id) ||
      !hostio_get_integer(env, argv[3], HOSTIO_OFFSET_MAX_BYTES, "offset",
                          &offset)) {
    return NULL;
  }
  napi_typedarray_type type;
  size_t length;
  void *data;
  bool is_typed = false;
  napi_is_typedarray(env, argv[2], &is_typed);
  if (!is_typed || napi_get_typedarray_info(env, argv[2], &type, &length,
                                            &data, NULL, NULL) != napi_ok ||
      type != napi_uint8_array) {
    napi_throw_type_error(env, "ERR_INVALID_ARG_TYPE",
                          "writer: view must be a Uint8Array");
    return NULL;
  }
  if (!h->writer) return hostio_throw_errno(env, EBADF, "writerWrite");
  job_t *j = calloc(1, sizeof(*j));
  if (!j) return hostio_throw_errno(env, ENOMEM, "writerWrite");
  if (napi_create_reference(env, argv[2], 1, &j->view) != napi_ok) {
    free(j);
    return NULL;
  }
  j->id = id;
  j->data = data;
  j->bytes = length;
  j->offset = (off_t)offset;
  if (h->pending++ == 0) napi_ref_threadsafe_function(env, h->tsfn);
  writer_t *w = h->writer;
  pthread_mutex_lock(&w->lock);
  if (w->tail) {
    w->tail->next = j;
  } else {
    w->head = j;
  }
  w->tail = j;
  pthread_cond_signal(&w->wake);
  pthread_mutex_unlock(&w->lock);
  return NULL; /* undefined */
}

static napi_value writer_close(napi_env env, napi_callback_info info) {
  napi_value argv[1];
  if (!hostio_get_args(env, info, 1, argv)) return NULL;
  writer_handle_t *h = get_handle(env, argv[0]);
  if (!h) return NULL;
  writer_t *w = h->writer;
  if (!w) return NULL; /* closed already */
  h->writer = NULL;
  napi_remove_env_cleanup_hook(env, teardown_hook, h);
  stop_writer(w, 0);
  /* Outcomes still queued for call_done are delivered before it goes. */
  napi_release_threadsafe_function(h->tsfn, napi_tsfn_release);
  return NULL;
}

int writer_define(napi_env env, napi_value exports) {
  napi_property_descriptor functions[] = {
      {"writerOpen", NULL, writer_open, NULL, NULL, NULL, napi_enumerable,
       NULL},
      {"writerWrite", NULL, writer_write, NULL, NULL, NULL, napi_enumerable,
       NULL},
      {"writerClose", NULL, writer_close, NULL, NULL, NULL, napi_enumerable,
       NULL},
  };
  size_t count = sizeof(functions) / sizeof(functions[0]);
  return napi_define_properties(env, exports, count, functions) == napi_ok;
}
