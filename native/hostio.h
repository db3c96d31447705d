/*
 * What native/hostio.c, sender.c and writer.c share: errno names and errors in
 * one shape (a JS Error with .code = the errno name and .syscall), argument
 * checks, and the sender's and writer's registration on the module's exports.
 */
#ifndef HOSTIO_H
#define HOSTIO_H

#include <pthread.h>
#include <stddef.h>

#include <node_api.h>

/* Largest offset or length a JS number carries exactly: 2^53. */
#define HOSTIO_OFFSET_MAX_BYTES 9007199254740992.0
/* The stack of the addon's own threads (sender, writer): they only loop
 * over system calls (no large locals), so the default 8 MiB of address
 * space per thread is not needed. */
#define HOSTIO_THREAD_STACK_BYTES (256 * 1024)

/* "EPIPE", "ENOSPC", ...; unknown errnos read as "EIO". */
const char *hostio_errno_name(int err);
/* Throws Error("<syscall>: <strerror>") with .code and .syscall; returns NULL. */
napi_value hostio_throw_errno(napi_env env, int err, const char *syscall);
/* Fetches exactly `want` (at most 6) arguments; throws TypeError when fewer
 * were given. 0 on failure. */
int hostio_get_args(napi_env env, napi_callback_info info, size_t want,
                    napi_value *argv);
/* A JS number that is an integer in [0, max]; else a TypeError naming
 * `what`. 0 on failure. */
int hostio_get_integer(napi_env env, napi_value value, double max,
                       const char *what, double *out);
/* Starts a joinable thread with a HOSTIO_THREAD_STACK_BYTES stack; 0 or an
 * errno. */
int hostio_start_thread(pthread_t *thread, void *(*main)(void *),
                        void *arg);
/* The pointer an External holds; NULL after throwing a TypeError saying
 * `what` (a wrong or empty value). */
void *hostio_get_external(napi_env env, napi_value value, const char *what);
/* Adds senderOpen, senderFileRange and senderClose to exports; 0 on failure. */
int sender_define(napi_env env, napi_value exports);
/* Adds writerOpen, writerWrite and writerClose to exports; 0 on failure. */
int writer_define(napi_env env, napi_value exports);

#endif
