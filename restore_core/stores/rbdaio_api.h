/* The C API of an RBD image's submitter thread (restore_core/stores/_rbdaio.c),
 * which other extensions (target/iscsi/_nativelane.c) get from the capsule
 * RBDAIO_API_NAME, the module attribute restore_core.stores._rbdaio.API.
 * They queue aio on the same thread as the store's Python requests and obey
 * the same fence. Bump RBDAIO_API_VERSION with any change here. */
#ifndef LIVERESTORE_RBDAIO_API_H
#define LIVERESTORE_RBDAIO_API_H

#include <Python.h>
#include <stdint.h>

#define RBDAIO_API_NAME "restore_core.stores._rbdaio.API"
#define RBDAIO_API_VERSION 1

enum { RBDAIO_READ, RBDAIO_WRITE, RBDAIO_DISCARD, RBDAIO_FLUSH };

/* A call's end: its return value (bytes, or -errno), on librbd's thread, or
 * on the submitter's for a start refused (fenced: -ESHUTDOWN). */
typedef void (*rbdaio_done_fn)(void *arg, long long rc);

typedef struct {
    int version;
    /* is ``obj`` a submitter (restore_core.stores._rbdaio.Aio)? */
    int (*is_aio)(PyObject *obj);
    /* queue one call on ``aio`` (the caller holds a reference); 0: ``done``
     * runs exactly once later, -errno (stopped or fenced: -ESHUTDOWN): never */
    int (*put)(PyObject *aio, int op, uint64_t offset, uint64_t length, void *addr,
               rbdaio_done_fn done, void *arg);
    /* has the store fenced it (its image lost to another client)? */
    int (*fenced)(PyObject *aio);
} RbdAioApi;

#endif
