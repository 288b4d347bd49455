/*
 * The native READ lane of one iSCSI session (docs/native-lane.md).
 *
 * Why: a 4 KiB READ through the Python receive path, the SCSI layer and the
 * Data-In encoder costs the event loop ~17 us of CPU (77% of it in
 * libpython); this answers the plain ones in C, in the loop's own thread,
 * from the connection's receive buffer, before Python parses them.
 *
 * One routing decision: Lane.scan() answers a PDU only when it is a SCSI
 * Command, not immediate, no AHS, no data segment, F=1 R=1 W=0, task
 * attribute SIMPLE, peripheral LUN addressing of a LUN Python published
 * direct (set_lun with the store's fd), an ITT that is not all ones and not
 * one of the session's tasks, CmdSN the next expected with nothing held back
 * and the window open, CDB READ(10)/READ(16) with no RDPROTECT, no NACA, a
 * transfer inside the LU and no longer than the LU's maximum, EDTL equal to
 * that transfer and small enough for one Data-In PDU, and the data comes
 * from the page cache at once (preadv2 RWF_NOWAIT). Whatever fails any of
 * these stops the scan at that PDU, unconsumed: Python parses it exactly as
 * without the lane (it answers with sense whatever deserves sense).
 *
 * A file read is finished before scan returns (one Data-In carrying the
 * status appended to the connection's corked output). RBD reads are in flight
 * across loop turns: queued on the store's submitter thread (its C API,
 * same fence), answered by complete() when GOOD, else handed back to
 * Python as their command; each holds budget credit while in flight.
 *
 * WRITE(10)/WRITE(16) to an RBD LU take the same decision plus: W=1 R=0
 * F=1, no FUA and no WRPROTECT, EDTL = the transfer, immediate data in
 * whole words within FirstBurstLength and MaxRecvDataSegmentLength (none
 * with ImmediateData=No), all-immediate within the command data limit,
 * else (it needs R2Ts) only with MaxOutstandingR2T 1 and up to the eager
 * write size (set_write_params). An all-immediate write whose PDU is in the
 * buffer is copied into its request and queued on the submitter like a
 * read. Any other collects its data: the rest of its immediate data is
 * placed in the request by the connection (placed()), the lane sends its
 * R2Ts one burst at a time and takes the Data-Outs that are exactly the
 * next piece of the burst (destination() / data_out()), then queues it.
 * Whatever else happens to it -- a Data-Out it does not judge, its LUN
 * taken back, the submitter refusing it -- hands it to Python where it
 * stands (give_back; Python's path then answers as it would have).
 * complete() answers GOOD only if librbd took the write and the store is
 * not fenced then, else hands it back too.
 *
 * Sequence numbers: Python owns StatSN, ExpCmdSN and the window; scan
 * takes them in and leaves the advanced ones in the lane's members for
 * Python to take back (all of it runs on the loop's thread).
 */
#define _GNU_SOURCE
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>

#include <errno.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#define BHS_LEN 48
#define N_LUNS 256
#define OP_SCSI_CMD 0x01
#define OP_DATA_IN 0x25
#define OP_SCSI_RSP 0x21
#define OP_R2T 0x31
#define KINDS 2                 /* metrics: 0 READ, 1 WRITE (lane.LANE_KINDS) */
#define N_BOUNDS_MAX 32

/* RBD reads ride the RBD store's own submitter thread and fence: the C API
 * restore_core/stores/_rbdaio.c exports in a capsule. Never librbd on the
 * loop's thread: with rbd_non_blocking_aio=false librbd dispatches in the
 * calling thread and may block there (lock acquisition, image refresh,
 * throttle). The hop costs nothing measurable: tests.bench.rbd_profile
 * LANE=1, 4 KiB random reads QD32, 3 runs each alternating with the spike
 * (rbd_aio_read2 on the loop), load 1.6-4.1: lane 27.6-33.3k vs 24.1-28.4k
 * IOPS, the loop's CPU 6.9-8.1 vs 13.4-16.0 us per read, plus 5.7-6.5 us
 * on the submitter thread (whose batches keep librbd batching). */
#include "../../restore_core/stores/rbdaio_api.h"

struct core;

/* An RBD read or write in flight. A read's Data-In PDU is built in place
 * around the data librbd reads into; until then pdu[0..BHS_LEN) holds the
 * command's BHS (a read that fails goes back to Python as that command). A
 * write holds its command's BHS and then its data, which go back to Python
 * together if it fails. Owned by librbd
 * until its callback, then by the core's done list, then by complete() (or
 * freed by the callback once the lane is gone). */
typedef struct req {
    struct req *next;           /* done list */
    struct req *live_next, *live_prev;   /* the lane's in-flight list (loop only) */
    struct core *core;
    PyObject *aio;              /* the store's submitter (a reference; loop only) */
    long long rc;
    double t0;                  /* submitted (latency of the LU's metrics) */
    uint64_t offset;            /* on the store */
    uint32_t itt, n, cost;
    uint8_t lun, write;
    /* the lane's (or librbd's) reference, plus one per LaneBuf exporting
     * the data to Python: freed by whichever lets go last */
    int refs;
    /* a write collecting its data (loop only): ``imm`` bytes of immediate
     * data (``imm_pending``: still being placed by the connection), ``have``
     * bytes in, solicited up to ``r2t_next``, ``r2tsn`` R2Ts sent; the one
     * outstanding (``r2t_open``) is ``ttt`` for [r_off, r_end), in up to
     * ``r_next`` with DataSN ``r_datasn`` next */
    uint8_t collecting, imm_pending, r2t_open;
    uint32_t imm, have, r2t_next, r2tsn, ttt, r_off, r_end, r_next, r_datasn;
    uint8_t pdu[];              /* BHS_LEN + n */
} req_t;

/* What the completion callback touches: shared by the lane and its reads in
 * flight, freed by whichever lets go last (a session closed with reads in
 * flight frees nothing they will touch). */
typedef struct core {
    pthread_mutex_t mu;
    req_t *done;
    int notified, eventfd, gone, refs;
} core_t;

/* The commands of one kind (READ, WRITE) a LUN's lane answered since the
 * LU's metrics last took them (take_counts): commands, data bytes, seconds
 * and a latency histogram over the bounds set_buckets gave (LuStats'
 * LATENCY_BUCKETS). Allocated at a LUN's first answered command of the
 * kind: a session's lane costs nothing per LUN it never serves. */
typedef struct {
    unsigned long long commands, bytes;
    double seconds;
    unsigned long long buckets[N_BOUNDS_MAX + 1];
} lun_metrics_t;

typedef struct {
    int fd;                     /* -1: not direct (or an RBD LU: aio) */
    PyObject *aio;              /* the RBD store's submitter of an RBD LU published direct */
    uint32_t block_size;
    uint64_t num_blocks, max_blocks;
    unsigned long long reads, bytes;
    unsigned int inflight;      /* RBD reads and writes of this LUN in flight */
    lun_metrics_t *metrics[KINDS];  /* NULL until the LUN's first answered command of a kind */
} lun_t;

typedef struct {
    PyObject_HEAD
    lun_t luns[N_LUNS];
    int published;              /* LUNs published (a file fd or an RBD submitter) */
    int nowait;
    unsigned int statsn, exp_cmdsn, max_cmdsn;
    unsigned long long commands, bytes, would_block;
    core_t *core;
    const RbdAioApi *api;
    /* the session's memory budget: bytes of it the lane holds and has not
     * lent to a read in flight; credit_fn(n) -> bytes granted (n or more,
     * or 0: the budget's end) tops it up, one Python call per block */
    long long credit;
    PyObject *credit_fn;
    unsigned long long credit_calls;
    unsigned int starved;       /* commands left to Python before asking again */
    req_t *live;
    unsigned int inflight;
    double bounds[N_BOUNDS_MAX];    /* latency buckets' upper bounds (s) */
    int n_bounds;
    unsigned long long answered;    /* READs answered GOOD, file and RBD */
    /* writes (set_write_params): immediate data up to ``max_imm`` (0:
     * ImmediateData=No), all-immediate ones up to ``max_cmd`` bytes, those
     * that need R2Ts up to ``max_r2t_write`` (0: none) solicited
     * ``max_burst`` at a time; a command whose immediate data is not all
     * in is taken if it has at least ``direct_min`` (the rest is placed in
     * the request), else left until it is */
    uint32_t max_imm, max_cmd, max_r2t_write, max_burst, direct_min;
    uint32_t next_ttt;          /* the lane's R2Ts' TTTs: TTT_LANE | a counter */
    unsigned int writes_inflight;   /* writes in librbd's hands */
    unsigned int collecting;        /* writes collecting their data */
    unsigned long long written, r2ts;
} Lane;

/* The TTTs of the lane's R2Ts: Python's own are below 0x80000000 (R2Ts)
 * or 0x80000000 | below 0x40000000 in practice (Text) */
#define TTT_LANE 0xC0000000u

static void req_put(req_t *r);

/* A window on a request's data that Python may hold (a payload being
 * placed, a write given back to Python): it keeps the request's memory. */
typedef struct {
    PyObject_HEAD
    req_t *r;
    uint32_t off, len;
} LaneBuf;

static int LaneBuf_getbuffer(LaneBuf *self, Py_buffer *view, int flags) {
    return PyBuffer_FillInfo(view, (PyObject *)self, self->r->pdu + BHS_LEN + self->off,
                             self->len, 0, flags);
}

static void LaneBuf_dealloc(LaneBuf *self) {
    req_put(self->r);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyBufferProcs LaneBuf_as_buffer = { (getbufferproc)LaneBuf_getbuffer, NULL };

static PyTypeObject LaneBufType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "target.iscsi._nativelane.LaneBuf",
    .tp_basicsize = sizeof(LaneBuf),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_dealloc = (destructor)LaneBuf_dealloc,
    .tp_as_buffer = &LaneBuf_as_buffer,
};

/* A writable memoryview of ``len`` bytes of the request's data at ``off``. */
static PyObject *data_view(req_t *r, uint32_t off, uint32_t len) {
    LaneBuf *b = PyObject_New(LaneBuf, &LaneBufType);
    if (b == NULL)
        return NULL;
    __atomic_add_fetch(&r->refs, 1, __ATOMIC_ACQ_REL);
    b->r = r;
    b->off = off;
    b->len = len;
    PyObject *mv = PyMemoryView_FromObject((PyObject *)b);
    Py_DECREF(b);
    return mv;
}

static void core_put(core_t *c) {
    if (__atomic_sub_fetch(&c->refs, 1, __ATOMIC_ACQ_REL) == 0) {
        pthread_mutex_destroy(&c->mu);
        if (c->eventfd >= 0)
            close(c->eventfd);
        free(c);
    }
}

static void req_put(req_t *r) {
    if (__atomic_sub_fetch(&r->refs, 1, __ATOMIC_ACQ_REL) == 0) {
        core_t *c = r->core;
        free(r);
        core_put(c);
    }
}

/* librbd's thread (or the submitter's, for a start refused): queue the
 * read or write for the loop, wake it once per batch */
static void io_done(void *arg, long long rc) {
    req_t *r = arg;
    core_t *c = r->core;
    r->rc = rc;
    pthread_mutex_lock(&c->mu);
    if (c->gone) {
        pthread_mutex_unlock(&c->mu);
        req_put(r);
        return;
    }
    r->next = c->done;
    c->done = r;
    int wake = !c->notified;
    c->notified = 1;
    pthread_mutex_unlock(&c->mu);
    if (wake) {
        uint64_t one = 1;
        ssize_t w = write(c->eventfd, &one, sizeof one);
        (void)w;
    }
}

static inline uint32_t be32(const uint8_t *p) {
    return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
}
static inline uint64_t be64(const uint8_t *p) { return (uint64_t)be32(p) << 32 | be32(p + 4); }
static inline void put32(uint8_t *p, uint32_t v) {
    p[0] = v >> 24; p[1] = v >> 16; p[2] = v >> 8; p[3] = v;
}

/* A Data-In PDU's header carrying the whole of a READ's ``n`` bytes and its
 * status GOOD (phase-collapsed), into the BHS_LEN bytes at ``p``. */
static void good_data_in(uint8_t *p, uint32_t itt, uint32_t n, uint32_t statsn, uint32_t exp,
                         uint32_t maxsn) {
    memset(p, 0, BHS_LEN);
    p[0] = OP_DATA_IN;
    p[1] = 0x81;                /* F, S: phase-collapsed status GOOD */
    p[5] = n >> 16; p[6] = n >> 8; p[7] = n;
    put32(p + 16, itt);
    put32(p + 20, 0xFFFFFFFFu);
    put32(p + 24, statsn);
    put32(p + 28, exp);
    put32(p + 32, maxsn);
}

/* A SCSI Response GOOD (no sense, no residual; ExpDataSN: the R2Ts sent)
 * into the BHS_LEN bytes at ``p``, as Python's _send_result packs it. */
static void good_status(uint8_t *p, uint32_t itt, uint32_t statsn, uint32_t exp, uint32_t maxsn,
                        uint32_t r2tsn) {
    memset(p, 0, BHS_LEN);
    p[0] = OP_SCSI_RSP;
    p[1] = 0x80;
    put32(p + 16, itt);
    put32(p + 24, statsn);
    put32(p + 28, exp);
    put32(p + 32, maxsn);
    put32(p + 36, r2tsn);
}

/* MaxCmdSN once ``room`` more commands fit the window after ExpCmdSN
 * ``exp``: it only ever moves forward (serial arithmetic). */
static uint32_t advanced_maxsn(uint32_t exp, long room, uint32_t maxsn) {
    uint32_t cand = exp + (uint32_t)room - 1;
    if ((uint32_t)(cand - maxsn) && (uint32_t)(cand - maxsn) < 0x80000000u)
        return cand;
    return maxsn;
}

static inline double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

/* A command answered GOOD with ``n`` data bytes after ``secs`` in the
 * target: the lane's running totals and the LU's metrics (folded by
 * take_counts). */
static void count_io(Lane *self, lun_t *l, int write, uint32_t n, double secs) {
    if (write)
        self->written++;
    else {
        self->answered++;
        l->reads++;
        l->bytes += n;
    }
    lun_metrics_t **mp = &l->metrics[write];
    if (*mp == NULL && (*mp = calloc(1, sizeof **mp)) == NULL)
        return;                 /* out of memory: the metrics miss it, the command does not */
    lun_metrics_t *m = *mp;
    int b = 0;
    while (b < self->n_bounds && secs > self->bounds[b])
        b++;
    m->commands++;
    m->bytes += n;
    m->seconds += secs;
    m->buckets[b]++;
}

static void free_metrics(Lane *self) {
    for (int i = 0; i < N_LUNS; i++)
        for (int k = 0; k < KINDS; k++) {
            free(self->luns[i].metrics[k]);
            self->luns[i].metrics[k] = NULL;
        }
}

static int Lane_init(Lane *self, PyObject *args, PyObject *kw) {
    if (self->core != NULL) {
        PyErr_SetString(PyExc_RuntimeError, "already initialised");
        return -1;
    }
    for (int i = 0; i < N_LUNS; i++)
        self->luns[i].fd = -1;
    self->published = 0;
    self->nowait = 1;
    core_t *c = calloc(1, sizeof *c);
    if (c == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    c->eventfd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (c->eventfd < 0) {
        free(c);
        PyErr_SetFromErrno(PyExc_OSError);
        return -1;
    }
    pthread_mutex_init(&c->mu, NULL);
    c->refs = 1;
    self->core = c;
    return 0;
}

static void Lane_dealloc(Lane *self) {
    free_metrics(self);
    core_t *c = self->core;
    /* the callback never touches ->aio: drop the references here, under the
     * GIL; a write still collecting its data was never librbd's: freed */
    for (req_t *r = self->live, *nx; r != NULL; r = nx) {
        nx = r->live_next;
        Py_CLEAR(r->aio);
        if (r->collecting)
            req_put(r);
    }
    for (int i = 0; i < N_LUNS; i++)
        Py_CLEAR(self->luns[i].aio);
    Py_CLEAR(self->credit_fn);
    if (c != NULL) {
        pthread_mutex_lock(&c->mu);
        c->gone = 1;            /* reads still in flight free themselves */
        req_t *d = c->done;
        c->done = NULL;
        pthread_mutex_unlock(&c->mu);
        while (d != NULL) {
            req_t *nx = d->next;
            req_put(d);
            d = nx;
        }
        core_put(c);
    }
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* set_rbd(api, credit_fn): the RBD submitters' C API (the capsule
 * restore_core.stores._rbdaio.API) and the budget's top-up, credit_fn(n) ->
 * bytes granted (it must not hold the lane: no reference cycle) */
static PyObject *Lane_set_rbd(Lane *self, PyObject *args) {
    PyObject *cap, *fn;
    if (!PyArg_ParseTuple(args, "OO", &cap, &fn))
        return NULL;
    const RbdAioApi *api = PyCapsule_GetPointer(cap, RBDAIO_API_NAME);
    if (api == NULL)
        return NULL;
    if (api->version != RBDAIO_API_VERSION) {
        PyErr_SetString(PyExc_ValueError, "RBD submitter API version mismatch");
        return NULL;
    }
    if (!PyCallable_Check(fn)) {
        PyErr_SetString(PyExc_TypeError, "credit_fn must be callable");
        return NULL;
    }
    self->api = api;
    Py_INCREF(fn);
    Py_XSETREF(self->credit_fn, fn);
    Py_RETURN_NONE;
}

/* set_lun(lun, fd, block_size=512, num_blocks=0, max_blocks=0): publish the
 * LUN direct on ``fd`` (the caller keeps it open while published), or take
 * it back with fd -1. */
static PyObject *Lane_set_lun(Lane *self, PyObject *args) {
    int lun, fd;
    unsigned int bs = 512;
    unsigned long long nb = 0, mb = 0;
    PyObject *aio = NULL;       /* an RBD store's submitter; 0 / None: none */
    if (!PyArg_ParseTuple(args, "ii|IKKO", &lun, &fd, &bs, &nb, &mb, &aio))
        return NULL;
    if (aio != NULL && !PyObject_IsTrue(aio))
        aio = NULL;
    if (aio != NULL && (self->api == NULL || !self->api->is_aio(aio))) {
        PyErr_SetString(PyExc_TypeError, "not an RBD submitter (set_rbd first)");
        return NULL;
    }
    if (lun < 0 || lun >= N_LUNS) {
        PyErr_SetString(PyExc_ValueError, "LUN out of the lane's range");
        return NULL;
    }
    lun_t *l = &self->luns[lun];
    int on = fd >= 0 || aio != NULL;
    if (on && (bs < 512 || (bs & 3) || nb == 0 || mb == 0)) {
        PyErr_SetString(PyExc_ValueError, "bad geometry");
        return NULL;
    }
    self->published += on - (l->fd >= 0 || l->aio != NULL);
    l->fd = aio ? -1 : fd;
    Py_XINCREF(aio);
    Py_XSETREF(l->aio, aio);
    l->block_size = bs;
    l->num_blocks = nb;
    l->max_blocks = mb;
    Py_RETURN_NONE;
}

static PyObject *Lane_lun_counts(Lane *self, PyObject *arg) {
    long lun = PyLong_AsLong(arg);
    if (lun < 0 || lun >= N_LUNS) {
        if (!PyErr_Occurred())
            PyErr_SetString(PyExc_ValueError, "LUN out of the lane's range");
        return NULL;
    }
    return Py_BuildValue("KKI", self->luns[lun].reads, self->luns[lun].bytes,
                         self->luns[lun].inflight);
}

/* set_buckets(bounds): the upper bounds (seconds, ascending) of the latency
 * histogram take_counts returns; a read slower than the last is counted in
 * one more bucket (+Inf). */
static PyObject *Lane_set_buckets(Lane *self, PyObject *arg) {
    PyObject *seq = PySequence_Fast(arg, "bounds must be a sequence");
    if (seq == NULL)
        return NULL;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    if (n > N_BOUNDS_MAX) {
        Py_DECREF(seq);
        PyErr_SetString(PyExc_ValueError, "too many buckets");
        return NULL;
    }
    double b[N_BOUNDS_MAX];
    for (Py_ssize_t i = 0; i < n; i++) {
        b[i] = PyFloat_AsDouble(PySequence_Fast_GET_ITEM(seq, i));
        if (b[i] == -1.0 && PyErr_Occurred()) {
            Py_DECREF(seq);
            return NULL;
        }
        if (i && !(b[i] > b[i - 1])) {
            Py_DECREF(seq);
            PyErr_SetString(PyExc_ValueError, "bounds must ascend");
            return NULL;
        }
    }
    Py_DECREF(seq);
    /* counts taken over other bounds would land in the wrong buckets */
    free_metrics(self);
    memcpy(self->bounds, b, sizeof b[0] * (size_t)n);
    self->n_bounds = (int)n;
    Py_RETURN_NONE;
}

/* take_counts() -> [(lun, kind, commands, bytes, seconds, buckets)]: the
 * commands answered since the last call, per LUN and kind (0 READ, 1
 * WRITE) that had any (the caller folds them
 * into the LUs' metrics); the counts start again from zero (not when it
 * fails: the next call hands them over). */
static PyObject *Lane_take_counts(Lane *self, PyObject *unused) {
    PyObject *out = PyList_New(0);
    if (out == NULL)
        return NULL;
    for (int i = 0; i < N_LUNS * KINDS; i++) {
        lun_metrics_t *m = self->luns[i / KINDS].metrics[i % KINDS];
        if (m == NULL || m->commands == 0)
            continue;
        PyObject *b = PyList_New(self->n_bounds + 1);
        if (b == NULL)
            goto fail;
        for (int k = 0; k <= self->n_bounds; k++) {
            PyObject *v = PyLong_FromUnsignedLongLong(m->buckets[k]);
            if (v == NULL) {
                Py_DECREF(b);
                goto fail;
            }
            PyList_SET_ITEM(b, k, v);
        }
        PyObject *t = Py_BuildValue("(iiKKdN)", i / KINDS, i % KINDS, m->commands, m->bytes,
                                    m->seconds, b);
        if (t == NULL || PyList_Append(out, t) < 0) {
            Py_XDECREF(t);
            goto fail;
        }
        Py_DECREF(t);
    }
    for (int i = 0; i < N_LUNS * KINDS; i++)    /* handed over whole, or kept whole */
        if (self->luns[i / KINDS].metrics[i % KINDS] != NULL)
            memset(self->luns[i / KINDS].metrics[i % KINDS], 0, sizeof(lun_metrics_t));
    return out;
fail:
    Py_DECREF(out);
    return NULL;
}

/* The READ or WRITE this PDU is, if the lane may answer it: its LUN, range
 * and direction. ``room_bytes``: the most one Data-In (and the output) may
 * carry; ``avail``: the bytes buffered from the PDU's start. */
static lun_t *plain_io(Lane *self, const uint8_t *b, uint32_t room_bytes, Py_ssize_t avail,
                       uint64_t *offset, uint32_t *bytes, int *write) {
    if ((b[0] & 0x7F) != OP_SCSI_CMD || b[4])
        return NULL;            /* immediate, AHS */
    uint32_t dlen = (uint32_t)b[5] << 16 | (uint32_t)b[6] << 8 | b[7];
    int w;
    if ((b[1] & 0xE7) == 0xC1 && dlen == 0)         /* F R !W, attr SIMPLE */
        w = 0;
    else if ((b[1] & 0xE7) == 0xA1)                 /* F !R W, attr SIMPLE */
        w = 1;
    else
        return NULL;
    if (b[8] || b[10] || b[11] || be32(b + 12))
        return NULL;            /* not peripheral addressing of LUN < 256 */
    lun_t *l = &self->luns[b[9]];
    if (l->fd < 0 && l->aio == NULL)
        return NULL;
    const uint8_t *c = b + 32;
    uint64_t lba, blocks;
    switch (c[0]) {
    case 0x28: case 0x2A:
        if (c[9] & 0x04) return NULL;                  /* NACA */
        lba = be32(c + 2); blocks = (uint64_t)c[7] << 8 | c[8];
        break;
    case 0x88: case 0x8A:
        if (c[15] & 0x04) return NULL;
        lba = be64(c + 2); blocks = be32(c + 10);
        break;
    default:
        return NULL;
    }
    if ((c[0] == 0x2A || c[0] == 0x8A) != w)
        return NULL;            /* a READ with W set, a WRITE without: Python's */
    if (c[1] & 0xE0)                                   /* RD/WRPROTECT */
        return NULL;
    if (blocks == 0 || blocks > l->max_blocks || lba >= l->num_blocks
            || blocks > l->num_blocks - lba)
        return NULL;
    uint64_t n = blocks * l->block_size;
    if (n != be32(b + 20))
        return NULL;            /* a residual */
    if (w) {
        /* RBD only (a file write would block the loop); FUA is Python's;
         * the immediate data within the session's limits and whole words;
         * the rest solicited by R2Ts only where the session lets the lane */
        if (l->aio == NULL || (c[1] & 0x08) || dlen > n || dlen > self->max_imm || (dlen & 3)
                || n > (dlen == n ? self->max_cmd : self->max_r2t_write))
            return NULL;
        /* the rest of a small PDU: Python's framing waits for it whole
         * (as it places only big payloads in their buffer) */
        if (avail < BHS_LEN + (Py_ssize_t)dlen && dlen < self->direct_min)
            return NULL;
    } else if (n > room_bytes)
        return NULL;            /* more than one Data-In / the output room */
    *offset = lba * l->block_size;
    *bytes = (uint32_t)n;
    *write = w;
    return l;
}

static int live_itt(Lane *self, uint32_t itt) {
    for (req_t *r = self->live; r != NULL; r = r->live_next)
        if (r->itt == itt)
            return 1;
    return 0;
}

/* After the budget said no, this many RBD reads go to Python before the
 * lane asks again (unless its own reads give credit back first): one Python
 * call per STARVED_SKIP commands at the budget's end too. */
#define STARVED_SKIP 32

/* Top the budget credit up to at least ``need`` (one Python call); 0 at
 * the budget's end (then the command is Python's: it answers BUSY / TASK
 * SET FULL or waits, as for any command the budget cannot take). */
static int take_credit(Lane *self, long long need) {
    if (self->credit_fn == NULL)
        return 0;
    if (self->starved) {
        self->starved--;
        return 0;
    }
    self->credit_calls++;
    PyObject *got = PyObject_CallFunction(self->credit_fn, "L", need - self->credit);
    long long n = got == NULL ? -1 : PyLong_AsLongLong(got);
    Py_XDECREF(got);
    if (n < 0 && PyErr_Occurred()) {
        PyErr_WriteUnraisable(self->credit_fn);   /* never expected; the lane stops */
        return 0;
    }
    if (n > 0)
        self->credit += n;
    if (self->credit < need) {
        self->starved = STARVED_SKIP;
        return 0;
    }
    return 1;
}

/* A request for ``n`` bytes at ``offset`` of the LUN, holding its
 * command's BHS and the first ``copy`` bytes of its data (they follow
 * ``bhs``), on the lane's in-flight list and holding its memory's worth of
 * budget credit until it is freed; NULL: the budget's end, or no memory. */
static req_t *new_req(Lane *self, lun_t *l, const uint8_t *bhs, uint32_t itt, uint64_t offset,
                      uint32_t n, size_t copy, int write) {
    long long cost = (long long)sizeof(req_t) + BHS_LEN + n;
    if (self->credit < cost && !take_credit(self, cost))
        return NULL;
    req_t *r = malloc(sizeof *r + BHS_LEN + n);
    if (r == NULL)
        return NULL;
    memset(r, 0, sizeof *r);
    memcpy(r->pdu, bhs, BHS_LEN + copy);
    r->write = (uint8_t)write;
    r->core = self->core;
    r->offset = offset;
    r->itt = itt;
    r->n = n;
    r->cost = (uint32_t)cost;
    r->lun = bhs[9];
    r->refs = 1;
    r->aio = l->aio;
    Py_INCREF(r->aio);
    __atomic_add_fetch(&self->core->refs, 1, __ATOMIC_ACQ_REL);
    r->live_next = self->live;
    if (self->live != NULL)
        self->live->live_prev = r;
    self->live = r;
    self->credit -= cost;
    return r;
}

static void unlink_req(Lane *self, req_t *r) {
    if (r->live_prev) r->live_prev->live_next = r->live_next;
    else self->live = r->live_next;
    if (r->live_next) r->live_next->live_prev = r->live_prev;
    r->live_prev = r->live_next = NULL;
}

/* Drop a request librbd never had: off the list, its credit back. */
static void drop_req(Lane *self, req_t *r) {
    unlink_req(self, r);
    self->credit += r->cost;
    Py_CLEAR(r->aio);
    req_put(r);
}

/* Queue the request's read or write on its store's submitter thread; 1 if
 * it took it (else the request is still the lane's). */
static int submit(Lane *self, req_t *r) {
    r->t0 = now_s();
    /* from here on io_done may run on another thread: it touches only
     * rc and next, and frees nothing while the lane lives */
    if (self->api->put(r->aio, r->write ? RBDAIO_WRITE : RBDAIO_READ, r->offset, r->n,
                       r->pdu + BHS_LEN, io_done, r) < 0)
        return 0;               /* fenced, stopped: Python's path says why */
    self->luns[r->lun].inflight++;
    self->inflight++;
    self->writes_inflight += r->write;
    return 1;
}

/* Queue an RBD read (into a new request's PDU) or an all-immediate write
 * (of a copy of the command's data, which follows ``bhs``); 1 if it took
 * it. */
static int start_io(Lane *self, lun_t *l, const uint8_t *bhs, uint32_t itt, uint64_t offset,
                    uint32_t n, int write) {
    req_t *r = new_req(self, l, bhs, itt, offset, n, write ? n : 0, write);
    if (r == NULL)
        return 0;
    if (!submit(self, r)) {
        drop_req(self, r);
        return 0;
    }
    return 1;
}

/* An R2T soliciting write ``r``'s next burst, appended to ``out`` (its
 * StatSN the next one, not advanced); BHS_LEN, or -1 (a Python error). */
static int send_r2t(Lane *self, req_t *r, PyObject *out, uint32_t statsn, uint32_t exp,
                    uint32_t maxsn) {
    uint32_t len = r->n - r->r2t_next;
    if (len > self->max_burst)
        len = self->max_burst;
    uint32_t ttt = TTT_LANE | (self->next_ttt++ & 0x3FFFFFFFu);
    if (ttt == 0xFFFFFFFFu)
        ttt = TTT_LANE | (self->next_ttt++ & 0x3FFFFFFFu);
    PyObject *pdu = PyBytes_FromStringAndSize(NULL, BHS_LEN);
    if (pdu == NULL)
        return -1;
    uint8_t *p = (uint8_t *)PyBytes_AS_STRING(pdu);
    memset(p, 0, BHS_LEN);
    p[0] = OP_R2T;
    p[1] = 0x80;
    memcpy(p + 8, r->pdu + 8, 8);           /* the command's LUN */
    put32(p + 16, r->itt);
    put32(p + 20, ttt);
    put32(p + 24, statsn);
    put32(p + 28, exp);
    put32(p + 32, maxsn);
    put32(p + 36, r->r2tsn);
    put32(p + 40, r->r2t_next);
    put32(p + 44, len);
    int rc = PyList_Append(out, pdu);
    Py_DECREF(pdu);
    if (rc < 0)
        return -1;
    r->ttt = ttt;
    r->r_off = r->r_next = r->r2t_next;
    r->r_end = r->r2t_next + len;
    r->r_datasn = 0;
    r->r2t_open = 1;
    r->r2t_next += len;
    r->r2tsn++;
    self->r2ts++;
    return BHS_LEN;
}

/* Write ``r`` handed to Python as it stands (SessionLane._adopt makes it a
 * task): (command BHS, its data -- a view: the memory stays the request's
 * --, bytes in, solicited up to, R2Ts sent, the outstanding R2T (TTT,
 * offset, end, next offset, next DataSN) or None, the budget bytes it
 * holds, which go with it). The lane lets go of it; NULL: a Python error,
 * and it is still the lane's. */
static PyObject *give_back(Lane *self, req_t *r) {
    PyObject *bhs = PyBytes_FromStringAndSize((char *)r->pdu, BHS_LEN);
    PyObject *buf = bhs == NULL ? NULL : data_view(r, 0, r->n);
    if (buf == NULL) {
        Py_XDECREF(bhs);
        return NULL;
    }
    PyObject *t;
    if (r->r2t_open)
        t = Py_BuildValue("(NNIII(IIIII)I)", bhs, buf, r->have, r->r2t_next, r->r2tsn, r->ttt,
                          r->r_off, r->r_end, r->r_next, r->r_datasn, r->cost);
    else
        t = Py_BuildValue("(NNIIIOI)", bhs, buf, r->collecting ? r->have : r->n,
                          r->collecting ? r->r2t_next : r->n, r->r2tsn, Py_None, r->cost);
    if (t == NULL)
        return NULL;
    if (r->collecting) {
        r->collecting = 0;
        self->collecting--;
    }
    unlink_req(self, r);
    Py_CLEAR(r->aio);
    req_put(r);
    return t;
}

/* Write ``r`` got more of its data: its next burst solicited once the
 * last one is in, or queued on the submitter once it has all of it. The
 * bytes appended to ``out`` (an R2T), or -1 (a Python error); *back: the
 * write handed to Python instead, if its LUN is no longer published on
 * the same store (the route was taken back while its immediate data was
 * placed: demote skips those) or the submitter refuses it (fenced). */
static int advance(Lane *self, req_t *r, PyObject *out, uint32_t statsn, uint32_t exp,
                   uint32_t maxsn, PyObject **back) {
    *back = NULL;
    if (self->luns[r->lun].aio == r->aio) {
        if (r->have < r->n)
            return r->r2t_open ? 0 : send_r2t(self, r, out, statsn, exp, maxsn);
        r->collecting = 0;
        self->collecting--;
        if (submit(self, r))
            return 0;
        r->collecting = 1;
        self->collecting++;
    }
    *back = give_back(self, r);
    return *back == NULL ? -1 : 0;
}

static req_t *collecting_itt(Lane *self, uint32_t itt, int imm_pending) {
    for (req_t *r = self->live; r != NULL; r = r->live_next)
        if (r->collecting && r->itt == itt && r->imm_pending == imm_pending)
            return r;
    return NULL;
}

/* Is this Data-Out (header ``b``, ``n`` bytes of data) exactly the next
 * piece of the burst the lane solicited? Anything else (another TTT,
 * offset or DataSN, too long, F early, unsolicited, empty) is Python's to
 * judge: the write goes back to Python first. */
static int expected_data_out(const req_t *r, const uint8_t *b, Py_ssize_t n) {
    uint32_t off = be32(b + 40);
    return r->r2t_open && n > 0 && be32(b + 20) == r->ttt && off == r->r_next
        && (uint64_t)n <= r->r_end - off && be32(b + 36) == r->r_datasn
        && (!(b[1] & 0x80) || off + (uint32_t)n == r->r_end);
}

/* What data_out and placed return: the bytes of R2T appended, the write
 * handed back, or NULL on a Python error. */
static PyObject *outcome(int k, PyObject *back) {
    if (k < 0)
        return NULL;
    if (back != NULL)
        return back;
    return PyLong_FromLong(k);
}

/* destination(bhs, dlen) -> memoryview | None: where the payload of this
 * Data-Out goes, if it is exactly the next piece of a lane write's burst
 * (its data then lands in the request; data_out follows when it is in). */
static PyObject *Lane_destination(Lane *self, PyObject *args) {
    Py_buffer b;
    Py_ssize_t dlen;
    if (!PyArg_ParseTuple(args, "y*n", &b, &dlen))
        return NULL;
    const uint8_t *h = b.buf;
    req_t *r = b.len >= BHS_LEN ? collecting_itt(self, be32(h + 16), 0) : NULL;
    PyObject *res;
    if (r != NULL && expected_data_out(r, h, dlen))
        res = data_view(r, be32(h + 40), (uint32_t)dlen);
    else {
        res = Py_None;
        Py_INCREF(res);
    }
    PyBuffer_Release(&b);
    return res;
}

/* data_out(bhs, data, out, statsn, exp_cmdsn, max_cmdsn) -> None | int |
 * tuple: a Data-Out for a write the lane collects: None if it collects
 * none with this ITT (Python drops the PDU as for an unknown task); the
 * bytes of R2T appended to ``out`` once taken (the data copied unless it
 * was placed in the request already); else the write handed back
 * (give_back: Python then handles this PDU as its task's). */
static PyObject *Lane_data_out(Lane *self, PyObject *args) {
    Py_buffer b, d;
    PyObject *out;
    unsigned int statsn, exp, maxsn;
    if (!PyArg_ParseTuple(args, "y*y*O!III", &b, &d, &PyList_Type, &out, &statsn, &exp, &maxsn))
        return NULL;
    PyObject *res = NULL, *back = NULL;
    const uint8_t *h = b.buf;
    req_t *r = b.len >= BHS_LEN ? collecting_itt(self, be32(h + 16), 0) : NULL;
    if (r == NULL) {
        res = Py_None;
        Py_INCREF(res);
    } else if (!expected_data_out(r, h, d.len)) {
        res = give_back(self, r);
    } else {
        uint8_t *dst = r->pdu + BHS_LEN + r->r_next;
        if (d.buf != dst)
            memcpy(dst, d.buf, (size_t)d.len);
        r->r_next += (uint32_t)d.len;
        r->r_datasn++;
        r->have += (uint32_t)d.len;
        if (r->r_next == r->r_end)
            r->r2t_open = 0;
        int k = advance(self, r, out, statsn, exp, maxsn, &back);
        res = outcome(k, back);
    }
    PyBuffer_Release(&b);
    PyBuffer_Release(&d);
    return res;
}

/* placed(itt, out, statsn, exp_cmdsn, max_cmdsn) -> None | int | tuple:
 * the immediate data of a write scan took before it was all in has been
 * placed in the request: as data_out. */
static PyObject *Lane_placed(Lane *self, PyObject *args) {
    unsigned int itt, statsn, exp, maxsn;
    PyObject *out, *back = NULL;
    if (!PyArg_ParseTuple(args, "IO!III", &itt, &PyList_Type, &out, &statsn, &exp, &maxsn))
        return NULL;
    req_t *r = collecting_itt(self, itt, 1);
    if (r == NULL)
        Py_RETURN_NONE;
    r->imm_pending = 0;
    r->have = r->imm;
    int k = advance(self, r, out, statsn, exp, maxsn, &back);
    return outcome(k, back);
}

/* demote(lun) -> [tuple]: the writes of the LUN (-1: of every LUN)
 * collecting their data, handed back to Python (give_back): its route
 * was taken back. Not one whose immediate data is still being placed:
 * placed() hands that back once it is in. */
static PyObject *Lane_demote(Lane *self, PyObject *arg) {
    long lun = PyLong_AsLong(arg);
    if (lun == -1 && PyErr_Occurred())
        return NULL;
    PyObject *res = PyList_New(0);
    if (res == NULL)
        return NULL;
    for (req_t *r = self->live, *nx; r != NULL; r = nx) {
        nx = r->live_next;
        if (!r->collecting || r->imm_pending || (lun >= 0 && r->lun != lun))
            continue;
        PyObject *t = give_back(self, r);
        if (t == NULL || PyList_Append(res, t) < 0) {
            Py_XDECREF(t);
            Py_DECREF(res);
            return NULL;
        }
        Py_DECREF(t);
    }
    return res;
}

/* drop_collecting(): the connection is gone: the writes still collecting
 * their data are dropped (nothing of them was written). */
static PyObject *Lane_drop_collecting(Lane *self, PyObject *unused) {
    for (req_t *r = self->live, *nx; r != NULL; r = nx) {
        nx = r->live_next;
        if (r->collecting) {
            r->collecting = 0;
            self->collecting--;
            drop_req(self, r);
        }
    }
    Py_RETURN_NONE;
}

/* set_write_params(max_imm, max_cmd, max_r2t_write, max_burst, direct_min):
 * the most immediate data a command may carry (0: ImmediateData=No),
 * the command data limit (all-immediate writes), the largest write the
 * lane solicits with R2Ts (0: none), MaxBurstLength, and the smallest
 * payload the connection places in its buffer (a command with less
 * immediate data waits in the receive buffer until it is whole). */
static PyObject *Lane_set_write_params(Lane *self, PyObject *args) {
    unsigned int mi, mc, mr, mb, dm;
    if (!PyArg_ParseTuple(args, "IIIII", &mi, &mc, &mr, &mb, &dm))
        return NULL;
    if (mr && mb == 0) {
        PyErr_SetString(PyExc_ValueError, "R2T writes need a burst length");
        return NULL;
    }
    self->max_imm = mi;
    self->max_cmd = mc;
    self->max_r2t_write = mr;
    self->max_burst = mb;
    self->direct_min = dm;
    Py_RETURN_NONE;
}

static PyObject *Lane_fileno(Lane *self, PyObject *unused) {
    return PyLong_FromLong(self->core->eventfd);
}

static PyObject *Lane_busy(Lane *self, PyObject *arg) {
    unsigned long itt = PyLong_AsUnsignedLong(arg);
    if (itt == (unsigned long)-1 && PyErr_Occurred())
        return NULL;
    return PyBool_FromLong(live_itt(self, (uint32_t)itt));
}

/* complete(out, statsn, exp_cmdsn, max_cmdsn, room) -> (nbytes, ncmds, retry):
 * answer the RBD reads that finished with a Data-In carrying status GOOD and
 * the writes with a SCSI Response GOOD, appending the PDUs to ``out``
 * (None: the connection is gone, drop them). C answers only a read that
 * returned all its bytes, or a write librbd took, from a store not fenced
 * now (checked here, on the loop, where the store fences): any other is
 * NOT answered; its command is in ``retry`` (a list, or None) for Python
 * to run as a task -- a read's BHS, a write as give_back hands it -- (the SCSI layer
 * gives the sense, NOT READY with the reason once fenced, and the store
 * sees the error). ``room``: depth - in flight before these complete;
 * ``ncmds`` counts the answered ones only (a retried command stays in the
 * window until its task ends). */
static PyObject *Lane_complete(Lane *self, PyObject *args) {
    PyObject *out;
    unsigned int statsn, exp, maxsn;
    long room;
    if (!PyArg_ParseTuple(args, "OIIIl", &out, &statsn, &exp, &maxsn, &room))
        return NULL;
    core_t *c = self->core;
    uint64_t cnt;
    ssize_t rd = read(c->eventfd, &cnt, sizeof cnt);
    (void)rd;
    pthread_mutex_lock(&c->mu);
    req_t *d = c->done;
    c->done = NULL;
    c->notified = 0;
    pthread_mutex_unlock(&c->mu);
    unsigned long long nbytes = 0, ncmds = 0;
    double t_done = now_s();
    for (req_t *r = d; r != NULL; r = r->next)
        r->rc = (r->write ? r->rc >= 0 : r->rc == (long long)r->n)
                && !self->api->fenced(r->aio) ? 0 : -1;
    for (req_t *r = d; r != NULL; r = r->next)
        ncmds += r->rc == 0;
    room += (long)ncmds;
    maxsn = advanced_maxsn(exp, room, maxsn);
    PyObject *retry = NULL;
    int err = 0;
    while (d != NULL) {
        req_t *r = d;
        d = r->next;
        self->luns[r->lun].inflight--;
        self->inflight--;
        self->writes_inflight -= r->write;
        self->starved = 0;
        if (!err && out != Py_None && r->rc != 0) {
            /* a read goes back as its command; a write as give_back's
             * tuple (with its data and its budget credit) */
            PyObject *x = r->write ? give_back(self, r)
                : PyBytes_FromStringAndSize((char *)r->pdu, BHS_LEN);
            if (retry == NULL && x != NULL)
                retry = PyList_New(0);
            if (x == NULL || retry == NULL || PyList_Append(retry, x) < 0)
                err = 1;
            Py_XDECREF(x);
            if (x != NULL && r->write)
                continue;       /* Python's now */
        } else if (!err && out != Py_None) {
            uint32_t n = r->n, sent = r->write ? 0 : n;
            if (r->write)
                good_status(r->pdu, r->itt, statsn++, exp, maxsn, r->r2tsn);
            else
                good_data_in(r->pdu, r->itt, n, statsn++, exp, maxsn);
            PyObject *pdu = PyBytes_FromStringAndSize((char *)r->pdu, BHS_LEN + sent);
            if (pdu == NULL || PyList_Append(out, pdu) < 0)
                err = 1;
            else {
                nbytes += BHS_LEN + sent;
                count_io(self, &self->luns[r->lun], r->write, n, t_done - r->t0);
            }
            Py_XDECREF(pdu);
        }
        unlink_req(self, r);
        self->credit += r->cost;
        Py_CLEAR(r->aio);
        req_put(r);
    }
    if (err) {
        Py_XDECREF(retry);
        return NULL;
    }
    self->statsn = statsn;
    self->max_cmdsn = maxsn;
    if (retry == NULL) {
        retry = Py_None;
        Py_INCREF(retry);
    }
    return Py_BuildValue("KKN", nbytes, ncmds, retry);
}

/* scan(buf, start, end, tasks, out, statsn, exp_cmdsn, max_cmdsn, room,
 *      held_back, single_data_in, out_room)
 *   -> (start, nbytes, ncmds, nasync, bytes_in, nr2t, placing)
 * Answers the plain READs at the head of buf[start:end], appending one
 * bytes object (Data-In with status) per file read to ``out`` (``ncmds``,
 * ``nbytes``), and starts the RBD reads and writes (``nasync``; a write's
 * immediate data, ``bytes_in``, is consumed with its command): an
 * all-immediate one whose data is in goes to the submitter, another
 * collects its data, with an R2T appended to ``out`` (``nr2t``, in
 * ``nbytes``) once its immediate data is in. ``placing``: None, or
 * (ITT, memoryview) when the last command's immediate data is still
 * arriving (the rest is to be placed there, then placed(ITT) called; the
 * scan stopped there). Stops at the first PDU it does not take. ``room``: commands the window may still
 * take (depth - in flight); ``held_back``: commands wait ahead of ExpCmdSN.
 * The sequence numbers after the scan are in statsn/exp_cmdsn/max_cmdsn. */
static PyObject *Lane_scan(Lane *self, PyObject *args) {
    Py_buffer view;
    Py_ssize_t start, end;
    PyObject *tasks, *out;
    unsigned int statsn, exp, maxsn;
    long room;
    int held_back;
    unsigned int single, out_room;
    if (!PyArg_ParseTuple(args, "y*nnO!O!IIIlpII", &view, &start, &end, &PyDict_Type, &tasks,
                          &PyList_Type, &out, &statsn, &exp, &maxsn, &room, &held_back,
                          &single, &out_room))
        return NULL;
    const uint8_t *buf = view.buf;
    Py_ssize_t s = start;
    unsigned long long nbytes = 0, ncmds = 0, nasync = 0, bytes_in = 0, nr2t = 0;
    PyObject *placing = NULL;
    double t0 = now_s();
    if (end > view.len)
        end = view.len;
    while (!held_back && room > 0 && end - s >= BHS_LEN) {
        const uint8_t *b = buf + s;
        uint64_t offset;
        uint32_t n;
        int write;
        uint32_t left = nbytes < out_room ? out_room - (uint32_t)nbytes : 0;
        uint32_t limit = single < left ? single : left;
        lun_t *l = plain_io(self, b, limit, end - s, &offset, &n, &write);
        if (l == NULL || be32(b + 24) != exp)
            break;
        uint32_t itt = be32(b + 16);
        if (itt == 0xFFFFFFFFu)
            break;
        PyObject *key = PyLong_FromUnsignedLong(itt);
        if (key == NULL)
            goto fail;
        int busy = PyDict_Contains(tasks, key);
        Py_DECREF(key);
        if (busy != 0) {
            if (busy < 0)
                goto fail;
            break;              /* ITT in use: Python rejects it */
        }
        if (live_itt(self, itt))
            break;
        uint32_t dlen = write ? (uint32_t)b[5] << 16 | (uint32_t)b[6] << 8 | b[7] : 0;
        Py_ssize_t have = end - s - BHS_LEN < (Py_ssize_t)dlen ? end - s - BHS_LEN : dlen;
        if (l->aio != NULL && (!write || (dlen == n && have == dlen))) {
            if (!start_io(self, l, b, itt, offset, n, write))
                break;          /* fenced, or the budget's end: Python's path */
            exp += 1;           /* in flight: the window's count grows, MaxCmdSN stays */
            room -= 1;
            nasync++;
            /* (a write's data is whole words: no padding follows it) */
            s += BHS_LEN + (write ? (Py_ssize_t)n : 0);
            bytes_in += write ? n : 0;
            continue;
        }
        if (write) {
            /* it collects its data: the immediate data placed or copied,
             * the rest solicited */
            req_t *r = new_req(self, l, b, itt, offset, n, (size_t)have, 1);
            if (r == NULL)
                break;
            r->collecting = 1;
            self->collecting++;
            r->imm = dlen;
            r->have = (uint32_t)have;
            r->r2t_next = dlen;
            if (have < (Py_ssize_t)dlen) {
                r->imm_pending = 1;
                PyObject *view = data_view(r, (uint32_t)have, dlen - (uint32_t)have);
                placing = view == NULL ? NULL : Py_BuildValue("(IN)", itt, view);
                if (placing == NULL) {
                    self->collecting--;
                    drop_req(self, r);
                    goto fail;
                }
            } else {
                int k = send_r2t(self, r, out, statsn, exp + 1, maxsn);
                if (k < 0) {
                    self->collecting--;
                    drop_req(self, r);
                    goto fail;
                }
                nbytes += (unsigned)k;
                nr2t++;
            }
            exp += 1;
            room -= 1;
            nasync++;
            bytes_in += dlen;
            s += BHS_LEN + have;
            if (placing != NULL)
                break;          /* all that is buffered is its */
            continue;
        }
        PyObject *pdu = PyBytes_FromStringAndSize(NULL, BHS_LEN + n);
        if (pdu == NULL)
            goto fail;
        uint8_t *p = (uint8_t *)PyBytes_AS_STRING(pdu);
        struct iovec iov = { p + BHS_LEN, n };
        ssize_t got;
        do {
            if (self->nowait) {
                got = preadv2(l->fd, &iov, 1, (off_t)offset, RWF_NOWAIT);
                if (got < 0 && (errno == EOPNOTSUPP || errno == EINVAL)) {
                    self->nowait = 0;
                    errno = EINTR;
                }
            } else
                got = preadv(l->fd, &iov, 1, (off_t)offset);
        } while (got < 0 && errno == EINTR);
        if (got != (ssize_t)n) {
            /* not in the page cache (or an error): Python's path reads it
             * off the loop, and reports an error with sense */
            if (got < 0 && errno == EAGAIN)
                self->would_block++;
            Py_DECREF(pdu);
            break;
        }
        /* the command is taken: ExpCmdSN moves on; it completes here, so
         * the window's in-flight count is unchanged and MaxCmdSN moves on */
        exp += 1;
        maxsn = advanced_maxsn(exp, room, maxsn);
        good_data_in(p, itt, n, statsn++, exp, maxsn);
        int rc = PyList_Append(out, pdu);
        Py_DECREF(pdu);
        if (rc < 0)
            goto fail;
        count_io(self, l, 0, n, now_s() - t0);
        nbytes += BHS_LEN + n;
        ncmds++;
        s += BHS_LEN;
    }
    PyBuffer_Release(&view);
    self->statsn = statsn;
    self->exp_cmdsn = exp;
    self->max_cmdsn = maxsn;
    self->commands += ncmds;
    self->bytes += nbytes;
    if (placing == NULL) {
        placing = Py_None;
        Py_INCREF(placing);
    }
    return Py_BuildValue("nKKKKKN", s, nbytes, ncmds, nasync, bytes_in, nr2t, placing);
fail:
    PyBuffer_Release(&view);
    return NULL;
}

static PyMethodDef Lane_methods[] = {
    {"set_lun", (PyCFunction)Lane_set_lun, METH_VARARGS, "publish a LUN direct (fd) or take it back (-1)"},
    {"scan", (PyCFunction)Lane_scan, METH_VARARGS,
     "answer or start the plain READs and WRITEs at the head of the buffer"},
    {"lun_counts", (PyCFunction)Lane_lun_counts, METH_O, "(reads, bytes, in flight) of a LUN"},
    {"set_rbd", (PyCFunction)Lane_set_rbd, METH_VARARGS, "the RBD submitters' C API and the budget's top-up"},
    {"fileno", (PyCFunction)Lane_fileno, METH_NOARGS, "the eventfd finished RBD reads bump"},
    {"busy", (PyCFunction)Lane_busy, METH_O, "is this ITT one of the lane's in flight"},
    {"complete", (PyCFunction)Lane_complete, METH_VARARGS, "answer the finished RBD reads and writes"},
    {"set_buckets", (PyCFunction)Lane_set_buckets, METH_O, "the latency histogram's bounds"},
    {"set_write_params", (PyCFunction)Lane_set_write_params, METH_VARARGS,
     "immediate data, command data, R2T write limits; MaxBurstLength; placement threshold"},
    {"destination", (PyCFunction)Lane_destination, METH_VARARGS,
     "where a lane write's Data-Out payload goes (None: the receive buffer)"},
    {"data_out", (PyCFunction)Lane_data_out, METH_VARARGS, "a Data-Out for a lane write"},
    {"placed", (PyCFunction)Lane_placed, METH_VARARGS, "a lane write's immediate data is in"},
    {"demote", (PyCFunction)Lane_demote, METH_O,
     "hand the writes collecting data on a LUN (-1: all) back to Python"},
    {"drop_collecting", (PyCFunction)Lane_drop_collecting, METH_NOARGS,
     "drop the writes collecting data (the connection is gone)"},
    {"take_counts", (PyCFunction)Lane_take_counts, METH_NOARGS,
     "the commands answered since, per LUN and kind"},
    {NULL}
};

static PyMemberDef Lane_members[] = {
    {"statsn", T_UINT, offsetof(Lane, statsn), READONLY, NULL},
    {"exp_cmdsn", T_UINT, offsetof(Lane, exp_cmdsn), READONLY, NULL},
    {"max_cmdsn", T_UINT, offsetof(Lane, max_cmdsn), READONLY, NULL},
    {"published", T_INT, offsetof(Lane, published), READONLY, NULL},
    {"commands", T_ULONGLONG, offsetof(Lane, commands), READONLY, NULL},
    {"bytes", T_ULONGLONG, offsetof(Lane, bytes), READONLY, NULL},
    {"would_block", T_ULONGLONG, offsetof(Lane, would_block), READONLY, NULL},
    {"inflight", T_UINT, offsetof(Lane, inflight), READONLY, NULL},
    {"credit", T_LONGLONG, offsetof(Lane, credit), 0,
     "budget bytes held and not lent to a read in flight (Python gives the excess back)"},
    {"credit_calls", T_ULONGLONG, offsetof(Lane, credit_calls), READONLY, NULL},
    {"answered", T_ULONGLONG, offsetof(Lane, answered), READONLY, NULL},
    {"written", T_ULONGLONG, offsetof(Lane, written), READONLY, "WRITEs answered GOOD"},
    {"writes_inflight", T_UINT, offsetof(Lane, writes_inflight), READONLY,
     "writes in librbd's hands"},
    {"collecting", T_UINT, offsetof(Lane, collecting), READONLY, "writes collecting their data"},
    {"r2ts", T_ULONGLONG, offsetof(Lane, r2ts), READONLY, "R2Ts sent"},
    {NULL}
};

static PyTypeObject LaneType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "target.iscsi._nativelane.Lane",
    .tp_basicsize = sizeof(Lane),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Lane_init,
    .tp_dealloc = (destructor)Lane_dealloc,
    .tp_methods = Lane_methods,
    .tp_members = Lane_members,
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_nativelane", "the native iSCSI READ lane", -1, NULL
};

PyMODINIT_FUNC PyInit__nativelane(void) {
    if (PyType_Ready(&LaneType) < 0 || PyType_Ready(&LaneBufType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m == NULL)
        return NULL;
    Py_INCREF(&LaneType);
    if (PyModule_AddObject(m, "Lane", (PyObject *)&LaneType) < 0) {
        Py_DECREF(&LaneType);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
