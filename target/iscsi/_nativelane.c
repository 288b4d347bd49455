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
 * F=1, no FUA and no WRPROTECT, all the data immediate (DataSegmentLength
 * = EDTL = the transfer, within FirstBurstLength, MaxRecvDataSegmentLength
 * and the command data limit: set_write_params) and the whole PDU already
 * in the buffer. The data is copied into the request and queued on the
 * submitter like a read; complete() answers GOOD only if librbd took it and
 * the store is not fenced then, else it goes back to Python as its command
 * with its data. A write that needs R2Ts is Python's.
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
    uint32_t itt, n, cost;
    uint8_t lun, write;
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
    /* writes: the largest all-immediate one the lane takes (0: none; the
     * negotiated FirstBurstLength and MaxRecvDataSegmentLength, the command
     * data limit), those in flight and those answered GOOD */
    uint32_t max_write;
    unsigned int writes_inflight;
    unsigned long long written;
} Lane;

static void core_put(core_t *c) {
    if (__atomic_sub_fetch(&c->refs, 1, __ATOMIC_ACQ_REL) == 0) {
        pthread_mutex_destroy(&c->mu);
        if (c->eventfd >= 0)
            close(c->eventfd);
        free(c);
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
        free(r);
        core_put(c);
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

/* A SCSI Response GOOD (no sense, no residual; ExpDataSN 0: no R2T was
 * sent) into the BHS_LEN bytes at ``p``, as Python's _send_result packs it. */
static void good_status(uint8_t *p, uint32_t itt, uint32_t statsn, uint32_t exp, uint32_t maxsn) {
    memset(p, 0, BHS_LEN);
    p[0] = OP_SCSI_RSP;
    p[1] = 0x80;
    put32(p + 16, itt);
    put32(p + 24, statsn);
    put32(p + 28, exp);
    put32(p + 32, maxsn);
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
    /* the callback never touches ->aio: drop the references here, under the GIL */
    for (req_t *r = self->live; r != NULL; r = r->live_next)
        Py_CLEAR(r->aio);
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
            free(d);
            core_put(c);
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
 * carry; ``avail``: the bytes buffered from the PDU's start (a write's data
 * must all be in). */
static lun_t *plain_io(Lane *self, const uint8_t *b, uint32_t room_bytes, Py_ssize_t avail,
                       uint64_t *offset, uint32_t *bytes, int *write) {
    if ((b[0] & 0x7F) != OP_SCSI_CMD || b[4])
        return NULL;            /* immediate, AHS */
    uint32_t dlen = (uint32_t)b[5] << 16 | (uint32_t)b[6] << 8 | b[7];
    int w;
    if ((b[1] & 0xE7) == 0xC1 && dlen == 0)         /* F R !W, attr SIMPLE */
        w = 0;
    else if ((b[1] & 0xE7) == 0xA1 && dlen)         /* F !R W, attr SIMPLE, data with it */
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
         * all of the data immediate, within the session's limits, here */
        if (l->aio == NULL || (c[1] & 0x08) || dlen != n || n > self->max_write
                || avail < BHS_LEN + (Py_ssize_t)n)
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

/* Queue an RBD read (into a new request's PDU) or write (of a copy of the
 * command's data, which follows ``bhs``) on the store's submitter thread; 1
 * if it took it. ``bhs``: the command (kept for Python until the command
 * succeeds). Each holds its memory's worth of budget credit until
 * complete() frees it. */
static int start_io(Lane *self, lun_t *l, const uint8_t *bhs, uint32_t itt, uint64_t offset,
                    uint32_t n, int write) {
    long long cost = (long long)sizeof(req_t) + BHS_LEN + n;
    if (self->credit < cost && !take_credit(self, cost))
        return 0;
    req_t *r = malloc(sizeof *r + BHS_LEN + n);
    if (r == NULL)
        return 0;
    memcpy(r->pdu, bhs, write ? BHS_LEN + (size_t)n : BHS_LEN);
    r->write = (uint8_t)write;
    r->core = self->core;
    r->t0 = now_s();
    r->itt = itt;
    r->n = n;
    r->cost = (uint32_t)cost;
    r->lun = bhs[9];
    r->aio = l->aio;
    r->live_prev = NULL;
    r->live_next = self->live;
    __atomic_add_fetch(&self->core->refs, 1, __ATOMIC_ACQ_REL);
    /* from here on io_done may run on another thread: it touches only
     * rc and next, and frees nothing while the lane lives */
    if (self->api->put(l->aio, write ? RBDAIO_WRITE : RBDAIO_READ, offset, n, r->pdu + BHS_LEN,
                       io_done, r) < 0) {
        free(r);
        core_put(self->core);
        return 0;               /* fenced, stopped: Python's path says why */
    }
    Py_INCREF(r->aio);
    if (self->live != NULL)
        self->live->live_prev = r;
    self->live = r;
    self->credit -= cost;
    l->inflight++;
    self->inflight++;
    self->writes_inflight += write;
    return 1;
}

/* set_write_params(first_burst, max_recv, max_cmd): the session's
 * FirstBurstLength (0: ImmediateData=No, no lane writes), its
 * MaxRecvDataSegmentLength and the command data limit; the lane takes
 * all-immediate writes up to the smallest. */
static PyObject *Lane_set_write_params(Lane *self, PyObject *args) {
    unsigned int fb, mr, mc;
    if (!PyArg_ParseTuple(args, "III", &fb, &mr, &mc))
        return NULL;
    uint32_t m = fb < mr ? fb : mr;
    self->max_write = m < mc ? m : mc;
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
 * NOT answered; its command PDU (the BHS, and a write's data) is in
 * ``retry`` (a list, or None) for Python to run as a task (the SCSI layer
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
        if (r->live_prev) r->live_prev->live_next = r->live_next;
        else self->live = r->live_next;
        if (r->live_next) r->live_next->live_prev = r->live_prev;
        self->luns[r->lun].inflight--;
        self->inflight--;
        self->writes_inflight -= r->write;
        self->credit += r->cost;
        self->starved = 0;
        Py_CLEAR(r->aio);
        if (!err && out != Py_None && r->rc != 0) {
            PyObject *bhs = PyBytes_FromStringAndSize(
                (char *)r->pdu, r->write ? BHS_LEN + (Py_ssize_t)r->n : BHS_LEN);
            if (retry == NULL && bhs != NULL)
                retry = PyList_New(0);
            if (bhs == NULL || retry == NULL || PyList_Append(retry, bhs) < 0)
                err = 1;
            Py_XDECREF(bhs);
        } else if (!err && out != Py_None) {
            uint32_t n = r->n, sent = r->write ? 0 : n;
            if (r->write)
                good_status(r->pdu, r->itt, statsn++, exp, maxsn);
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
        free(r);
        core_put(c);
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
 *   -> (start, nbytes, ncmds, nasync, bytes_in)
 * Answers the plain READs at the head of buf[start:end], appending one
 * bytes object (Data-In with status) per file read to ``out`` (``ncmds``,
 * ``nbytes``), and starts the RBD reads and writes (``nasync``; a write's
 * data, ``bytes_in``, is consumed with its command); stops at the first
 * PDU it does not take. ``room``: commands the window may still
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
    unsigned long long nbytes = 0, ncmds = 0, nasync = 0, bytes_in = 0;
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
        if (l->aio != NULL) {
            if (!start_io(self, l, b, itt, offset, n, write))
                break;          /* fenced, or the budget's end: Python's path */
            exp += 1;           /* in flight: the window's count grows, MaxCmdSN stays */
            room -= 1;
            nasync++;
            /* (a write's data is whole blocks: no padding follows it) */
            s += BHS_LEN + (write ? (Py_ssize_t)n : 0);
            bytes_in += write ? n : 0;
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
    return Py_BuildValue("nKKKK", s, nbytes, ncmds, nasync, bytes_in);
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
     "FirstBurstLength (0: no writes), MaxRecvDataSegmentLength, command data limit"},
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
    {"writes_inflight", T_UINT, offsetof(Lane, writes_inflight), READONLY, NULL},
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
    if (PyType_Ready(&LaneType) < 0)
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
