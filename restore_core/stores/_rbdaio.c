/* An RBD image's aio submitter thread and completion poll, in C.
 *
 * restore_core/stores/rbd_submit.py explains the design (the loop queues
 * each aio call, one thread starts them in order, librbd queues the
 * completions for the loop's eventfd); PySubmitter there is the same in
 * Python over ctypes, the fallback when this extension is not built. Here
 * the thread never takes the GIL: a queued request costs the loop a mutex
 * and (when the thread sleeps) a condition signal instead of the thread's
 * Python bytecode and four ctypes calls, and a completion costs the loop
 * no ctypes calls at all.
 *
 * librbd is not linked: the caller passes the addresses of the librbd
 * functions it loaded (ctypes), so this builds without the Ceph headers
 * and loads without librbd. A call librbd refuses at once is queued in
 * `failed` and the eventfd bumped: the loop takes it with the completions.
 *
 * Other extensions queue reads on the same thread through a C API (a
 * capsule, API below: target/iscsi/_nativelane.c's RBD reads): their
 * completion calls their own callback on librbd's thread instead of
 * queueing a (token, result) for poll, and they obey the same fence: once
 * fence() was called nothing queued is started any more, Python's or
 * theirs (each fails with ESHUTDOWN), and put refuses new ones.
 *
 * Completions come back through a C callback, not librbd's own eventfd
 * notification (rbd_set_image_notification + rbd_poll_io_events, which
 * PySubmitter uses): librbd's thread queues (token, result) in `done` and
 * bumps the eventfd only for the first completion since the loop last
 * polled, where librbd writes the eventfd once per completion. `done` and
 * its lock live in a Core shared by the Aio object and every call in
 * flight (reference-counted), so a callback that comes after the Aio is
 * gone (a close that gave up waiting) touches nothing freed.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <errno.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "rbdaio_api.h"

enum { OP_READ = RBDAIO_READ, OP_WRITE = RBDAIO_WRITE, OP_DISCARD = RBDAIO_DISCARD,
       OP_FLUSH = RBDAIO_FLUSH };

typedef int (*create_fn)(void *arg, void *cb, void **comp);
typedef int (*rw_fn)(void *img, uint64_t off, size_t len, void *buf, void *comp, int flags);
typedef int (*discard_fn)(void *img, uint64_t off, uint64_t len, void *comp);
typedef int (*flush_fn)(void *img, void *comp);
typedef void (*release_fn)(void *comp);
typedef ssize_t (*retval_fn)(void *comp);

typedef struct {
    int op;
    uint64_t offset, length;
    void *addr;
    uintptr_t token;
    rbdaio_done_fn done;        /* NULL: Python's (token polled), else the C API's */
    void *arg;
} Req;

typedef struct {
    Req *items;
    size_t head, len, cap;          /* a ring */
} Queue;

typedef struct {
    uintptr_t token;
    int err;
} Failed;

typedef struct {
    uintptr_t token;
    long long rc;
} Result;

typedef struct {
    Result *items;
    size_t len, cap;
} Results;

/* What librbd's completion callback uses: shared by the Aio object and
 * each call in flight, freed by whichever lets go of it last. */
typedef struct {
    pthread_mutex_t mu;
    Results done;               /* completions the loop has not polled */
    int notified;               /* the eventfd was bumped since the last poll */
    int eventfd;
    int refs;                   /* atomic */
    release_fn release;
    retval_fn retval;
    unsigned long long ext_done;    /* C API calls completed (atomic) */
    int closing;                /* atomic: a close drains; wake it per C API completion */
} Core;

typedef struct {
    Core *core;
    uintptr_t token;
    rbdaio_done_fn done;
    void *arg;
} Call;

typedef struct {
    PyObject_HEAD
    void *image;
    int eventfd;
    create_fn create;
    rw_fn read, write;
    discard_fn discard;
    flush_fn flush;
    release_fn release;
    Core *core;
    Results spare;              /* the loop's: swapped with core->done by poll */
    pthread_mutex_t mu;
    pthread_cond_t cv;
    Queue q;
    Failed *failed;
    size_t nfailed, capfailed;
    int inited, stopping, running, sleeping;
    int fenced;                 /* atomic: nothing queued starts any more */
    unsigned long long started;     /* written by the thread only */
    unsigned long long taken;       /* written by the loop only */
    pthread_t thread;
} Aio;

static int queue_push(Queue *q, const Req *r)
{
    if (q->len == q->cap) {
        size_t cap = q->cap ? q->cap * 2 : 64;
        Req *n = malloc(cap * sizeof(Req));
        if (n == NULL)
            return -1;
        for (size_t i = 0; i < q->len; i++)
            n[i] = q->items[(q->head + i) % q->cap];
        free(q->items);
        q->items = n;
        q->cap = cap;
        q->head = 0;
    }
    q->items[(q->head + q->len) % q->cap] = *r;
    q->len++;
    return 0;
}

static void bump(int fd)
{
    uint64_t one = 1;
    ssize_t r = write(fd, &one, sizeof one);
    (void)r;                    /* a full counter still wakes the loop */
}

static void core_put(Core *c)
{
    if (__atomic_sub_fetch(&c->refs, 1, __ATOMIC_ACQ_REL) == 0) {
        pthread_mutex_destroy(&c->mu);
        free(c->done.items);
        free(c);
    }
}

static int results_push(Results *r, uintptr_t token, long long rc)
{
    if (r->len == r->cap) {
        size_t cap = r->cap ? r->cap * 2 : 64;
        Result *n = realloc(r->items, cap * sizeof(Result));
        if (n == NULL)
            return -1;
        r->items = n;
        r->cap = cap;
    }
    r->items[r->len].token = token;
    r->items[r->len].rc = rc;
    r->len++;
    return 0;
}

/* A C API call ended (completed, or refused at its start): its owner's
 * callback, then counted, so a close that drains sees it (``taken``). */
static void ext_finished(Core *c, rbdaio_done_fn done, void *arg, long long rc)
{
    done(arg, rc);
    __atomic_add_fetch(&c->ext_done, 1, __ATOMIC_ACQ_REL);
    if (__atomic_load_n(&c->closing, __ATOMIC_ACQUIRE))
        bump(c->eventfd);       /* the drain waits on the eventfd */
}

/* On a librbd thread: one call completed. */
static void completed(void *comp, void *arg)
{
    Call *call = arg;
    Core *c = call->core;
    long long rc = c->retval(comp);
    uintptr_t token = call->token;
    rbdaio_done_fn done = call->done;
    void *done_arg = call->arg;
    c->release(comp);
    free(call);
    if (done != NULL) {
        ext_finished(c, done, done_arg, rc);
        core_put(c);
        return;
    }
    pthread_mutex_lock(&c->mu);
    /* no memory for it (cannot happen in practice): its waiter waits out the close */
    (void)results_push(&c->done, token, rc);
    int wake = !c->notified;
    c->notified = 1;
    pthread_mutex_unlock(&c->mu);
    if (wake)
        bump(c->eventfd);
    core_put(c);
}

/* On the thread, mutex not held: start one call. */
static void start(Aio *a, const Req *r)
{
    void *comp = NULL;
    Call *call = NULL;
    int rc = -ESHUTDOWN;
    if (!__atomic_load_n(&a->fenced, __ATOMIC_ACQUIRE)) {
        call = malloc(sizeof *call);
        rc = -ENOMEM;
    }
    if (call != NULL) {
        call->core = a->core;
        call->token = r->token;
        call->done = r->done;
        call->arg = r->arg;
        __atomic_add_fetch(&a->core->refs, 1, __ATOMIC_RELAXED);
        rc = a->create(call, (void *)completed, &comp);
        if (rc < 0) {
            free(call);
            core_put(a->core);
        }
    }
    if (rc >= 0) {
        switch (r->op) {
        case OP_READ:
            rc = a->read(a->image, r->offset, r->length, r->addr, comp, 0);
            break;
        case OP_WRITE:
            rc = a->write(a->image, r->offset, r->length, r->addr, comp, 0);
            break;
        case OP_DISCARD:
            rc = a->discard(a->image, r->offset, r->length, comp);
            break;
        default:
            rc = a->flush(a->image, comp);
        }
        if (rc < 0) {           /* never started: no callback comes */
            a->release(comp);
            free(call);
            core_put(a->core);
        }
    }
    if (rc >= 0) {
        __atomic_add_fetch(&a->started, 1, __ATOMIC_RELEASE);
        return;
    }
    if (r->done != NULL) {      /* counted as started and ended: ``taken`` stays consistent */
        __atomic_add_fetch(&a->started, 1, __ATOMIC_RELEASE);
        ext_finished(a->core, r->done, r->arg, rc);
        return;
    }
    pthread_mutex_lock(&a->mu);
    if (a->nfailed == a->capfailed) {
        size_t cap = a->capfailed ? a->capfailed * 2 : 16;
        Failed *n = realloc(a->failed, cap * sizeof(Failed));
        if (n == NULL) {        /* cannot happen in practice; the waiter waits out the close */
            pthread_mutex_unlock(&a->mu);
            return;
        }
        a->failed = n;
        a->capfailed = cap;
    }
    a->failed[a->nfailed].token = r->token;
    a->failed[a->nfailed].err = -rc;
    a->nfailed++;
    pthread_mutex_unlock(&a->mu);
    bump(a->eventfd);
}

static void *run(void *arg)
{
    Aio *a = arg;
    Req batch[64];
    pthread_mutex_lock(&a->mu);
    for (;;) {
        while (a->q.len == 0 && !a->stopping) {
            a->sleeping = 1;
            pthread_cond_wait(&a->cv, &a->mu);
        }
        a->sleeping = 0;
        if (a->q.len == 0)      /* stopping, and everything queued was started */
            break;
        size_t n = 0;
        while (a->q.len && n < 64) {
            batch[n++] = a->q.items[a->q.head];
            a->q.head = (a->q.head + 1) % a->q.cap;
            a->q.len--;
        }
        pthread_mutex_unlock(&a->mu);
        for (size_t i = 0; i < n; i++)
            start(a, &batch[i]);
        pthread_mutex_lock(&a->mu);
    }
    pthread_mutex_unlock(&a->mu);
    return NULL;
}

static void *address(PyObject *seq, Py_ssize_t i)
{
    return PyLong_AsVoidPtr(PyTuple_GET_ITEM(seq, i));
}

static int Aio_init(Aio *a, PyObject *args, PyObject *kw)
{
    unsigned long long image;
    int fd;
    PyObject *fns;
    if (!PyArg_ParseTuple(args, "KiO!", &image, &fd, &PyTuple_Type, &fns))
        return -1;
    if (a->inited) {
        PyErr_SetString(PyExc_RuntimeError, "already started");
        return -1;
    }
    if (PyTuple_GET_SIZE(fns) != 7) {
        PyErr_SetString(PyExc_ValueError, "7 function addresses expected");
        return -1;
    }
    a->image = (void *)(uintptr_t)image;
    a->eventfd = fd;
    a->create = (create_fn)address(fns, 0);
    a->read = (rw_fn)address(fns, 1);
    a->write = (rw_fn)address(fns, 2);
    a->discard = (discard_fn)address(fns, 3);
    a->flush = (flush_fn)address(fns, 4);
    a->release = (release_fn)address(fns, 5);
    retval_fn retval = (retval_fn)address(fns, 6);
    if (PyErr_Occurred())
        return -1;
    a->core = calloc(1, sizeof(Core));
    if (a->core == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    pthread_mutex_init(&a->core->mu, NULL);
    a->core->eventfd = fd;
    a->core->refs = 1;
    a->core->release = a->release;
    a->core->retval = retval;
    pthread_mutex_init(&a->mu, NULL);
    pthread_cond_init(&a->cv, NULL);
    a->inited = 1;
    int rc = pthread_create(&a->thread, NULL, run, a);
    if (rc != 0) {
        errno = rc;
        PyErr_SetFromErrno(PyExc_OSError);
        return -1;
    }
    a->running = 1;
    return 0;
}

static void stop_thread(Aio *a)
{
    if (a->core != NULL)        /* a close drains next: C API completions wake it */
        __atomic_store_n(&a->core->closing, 1, __ATOMIC_RELEASE);
    if (!a->running)
        return;
    pthread_mutex_lock(&a->mu);
    a->stopping = 1;
    pthread_cond_signal(&a->cv);
    pthread_mutex_unlock(&a->mu);
    Py_BEGIN_ALLOW_THREADS
    pthread_join(a->thread, NULL);
    Py_END_ALLOW_THREADS
    a->running = 0;
}

/* Queue one request (on the loop's thread); 0, or -errno: the submitter
 * is stopped (ESHUTDOWN), fenced (ESHUTDOWN) or out of memory. */
static int queue(Aio *a, const Req *r)
{
    int rc = -ESHUTDOWN;
    pthread_mutex_lock(&a->mu);
    if (a->running && !a->stopping && !__atomic_load_n(&a->fenced, __ATOMIC_ACQUIRE)) {
        rc = queue_push(&a->q, r) == 0 ? 0 : -ENOMEM;
        if (rc == 0 && a->sleeping) {
            a->sleeping = 0;    /* one signal per sleep */
            pthread_cond_signal(&a->cv);
        }
    }
    pthread_mutex_unlock(&a->mu);
    return rc;
}

static PyObject *Aio_put(Aio *a, PyObject *args)
{
    Req r = {0};
    unsigned long long offset, length, addr, token;
    if (!PyArg_ParseTuple(args, "iKKKK", &r.op, &offset, &length, &addr, &token))
        return NULL;
    r.offset = offset;
    r.length = length;
    r.addr = (void *)(uintptr_t)addr;
    r.token = (uintptr_t)token;
    int rc = queue(a, &r);
    if (rc == -ENOMEM)
        return PyErr_NoMemory();
    if (rc < 0) {
        PyErr_SetString(PyExc_RuntimeError, "submitter stopped");
        return NULL;
    }
    Py_RETURN_NONE;
}

static PyTypeObject AioType;

/* The C API's put: ``aio`` is an Aio (api_is_aio); its caller holds a
 * reference. ``done`` runs exactly once when this returns 0, never when it
 * returns -errno. Holds no GIL-protected state: any thread may call it. */
static int api_put(PyObject *aio, int op, uint64_t offset, uint64_t length, void *addr,
                   rbdaio_done_fn done, void *arg)
{
    Req r = {.op = op, .offset = offset, .length = length, .addr = addr, .token = 0,
             .done = done, .arg = arg};
    if (done == NULL || op < OP_READ || op > OP_FLUSH)
        return -EINVAL;
    return queue((Aio *)aio, &r);
}

static int api_is_aio(PyObject *obj)
{
    return PyObject_TypeCheck(obj, &AioType);
}

static int api_fenced(PyObject *aio)
{
    return __atomic_load_n(&((Aio *)aio)->fenced, __ATOMIC_ACQUIRE);
}

static const RbdAioApi api = {RBDAIO_API_VERSION, api_is_aio, api_put, api_fenced};

/* The store lost the image (rbd.RbdStore._fence): nothing queued starts any
 * more and nothing new is queued, for Python or the C API alike. */
static PyObject *Aio_fence(Aio *a, PyObject *unused)
{
    __atomic_store_n(&a->fenced, 1, __ATOMIC_RELEASE);
    Py_RETURN_NONE;
}

static PyObject *Aio_stop(Aio *a, PyObject *unused)
{
    stop_thread(a);
    Py_RETURN_NONE;
}

static int append_pair(PyObject *out, unsigned long long token, long long rc)
{
    PyObject *t = Py_BuildValue("(KL)", token, rc);
    if (t == NULL)
        return -1;
    int r = PyList_Append(out, t);
    Py_DECREF(t);
    return r;
}

/* Every completion queued so far and every refused start, as (token,
 * return value); clears the eventfd first, so a completion queued
 * meanwhile wakes it again (it finds `notified` still set until the swap
 * below, which then takes it). */
static PyObject *Aio_poll(Aio *a, PyObject *unused)
{
    uint64_t v;
    ssize_t r = read(a->eventfd, &v, sizeof v);
    (void)r;
    Core *c = a->core;
    pthread_mutex_lock(&c->mu);
    Results got = c->done;
    c->done = a->spare;         /* empty: the buffer the last poll read */
    c->notified = 0;
    pthread_mutex_unlock(&c->mu);
    a->taken += got.len;
    PyObject *out = PyList_New(0);
    int lost = out == NULL;
    for (size_t i = 0; i < got.len && !lost; i++)
        lost = append_pair(out, got.items[i].token, got.items[i].rc) < 0;
    got.len = 0;
    a->spare = got;             /* for the next swap */
    if (lost) {                 /* (no memory) the rest are lost; their waiters see the close */
        Py_XDECREF(out);
        return NULL;
    }
    pthread_mutex_lock(&a->mu);
    Failed *failed = a->failed;
    size_t nfailed = a->nfailed;
    a->failed = NULL;
    a->nfailed = a->capfailed = 0;
    pthread_mutex_unlock(&a->mu);
    for (size_t i = 0; i < nfailed; i++) {
        if (append_pair(out, failed[i].token, -(long long)failed[i].err) < 0) {
            free(failed);
            Py_DECREF(out);
            return NULL;
        }
    }
    free(failed);
    return out;
}

static PyObject *Aio_get_started(Aio *a, void *unused)
{
    return PyLong_FromUnsignedLongLong(__atomic_load_n(&a->started, __ATOMIC_ACQUIRE));
}

static PyObject *Aio_get_taken(Aio *a, void *unused)
{
    /* C API calls are released by their own callback: taken when they end */
    return PyLong_FromUnsignedLongLong(
        a->taken + (a->core ? __atomic_load_n(&a->core->ext_done, __ATOMIC_ACQUIRE) : 0));
}

static PyObject *Aio_get_fenced(Aio *a, void *unused)
{
    return PyBool_FromLong(__atomic_load_n(&a->fenced, __ATOMIC_ACQUIRE));
}

static void Aio_dealloc(Aio *a)
{
    stop_thread(a);             /* starts what was queued: librbd owns those buffers */
    if (a->inited) {
        pthread_mutex_destroy(&a->mu);
        pthread_cond_destroy(&a->cv);
    }
    if (a->core != NULL)
        core_put(a->core);      /* freed now, or by the last call's callback */
    free(a->spare.items);
    free(a->q.items);
    free(a->failed);
    Py_TYPE(a)->tp_free((PyObject *)a);
}

static PyMethodDef Aio_methods[] = {
    {"put", (PyCFunction)Aio_put, METH_VARARGS,
     "put(op, offset, length, address, token): queue one call (on the loop)"},
    {"stop", (PyCFunction)Aio_stop, METH_NOARGS, "start what is queued, then end the thread"},
    {"fence", (PyCFunction)Aio_fence, METH_NOARGS,
     "the image is lost: start nothing more (queued calls fail with ESHUTDOWN)"},
    {"poll", (PyCFunction)Aio_poll, METH_NOARGS,
     "[(token, return value)] of the completions and refused starts so far"},
    {NULL}
};

static PyGetSetDef Aio_getset[] = {
    {"started", (getter)Aio_get_started, NULL, "aio calls librbd accepted", NULL},
    {"taken", (getter)Aio_get_taken, NULL, "completions polled and released", NULL},
    {"fenced", (getter)Aio_get_fenced, NULL, "fence() was called", NULL},
    {NULL}
};

static PyTypeObject AioType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "restore_core.stores._rbdaio.Aio",
    .tp_basicsize = sizeof(Aio),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Aio(image handle, eventfd, (librbd function addresses)): a submitter thread",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Aio_init,
    .tp_dealloc = (destructor)Aio_dealloc,
    .tp_methods = Aio_methods,
    .tp_getset = Aio_getset,
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_rbdaio", "An RBD image's aio submitter thread in C.", -1, NULL,
};

PyMODINIT_FUNC PyInit__rbdaio(void)
{
    if (PyType_Ready(&AioType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m == NULL)
        return NULL;
    Py_INCREF(&AioType);
    if (PyModule_AddObject(m, "Aio", (PyObject *)&AioType) < 0) {
        Py_DECREF(&AioType);
        Py_DECREF(m);
        return NULL;
    }
    PyObject *cap = PyCapsule_New((void *)&api, RBDAIO_API_NAME, NULL);
    if (cap == NULL || PyModule_AddObject(m, "API", cap) < 0) {
        Py_XDECREF(cap);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
