/*
 * The TCMU command ring of one device, run by a native thread.
 *
 * Why native: in Python a 4 KiB READ costs ~28 us of handler CPU per
 * command (bytecodes alone ~19 us), which caps LIO + our handler at about
 * two thirds of tcmu-runner's IOPS. This thread runs the ring (mailbox,
 * cmd_head / cmd_tail, PAD and TMR entries, iovecs in the data area, the
 * response layout, the uio kick) with the GIL released and executes the
 * commands the routing decision sends straight to the store (READ/WRITE
 * 10/16 of an LU published "direct") with preadv/pwritev on the store's fd.
 * Every other command is copied out and handed to the Python handler
 * (a queue plus an eventfd its asyncio loop watches), which answers it with
 * the SCSI layer and completes it through ring_complete here.
 *
 * One owner of the ring's state: every parse, slot and tail change happens
 * under ring_mu, whichever thread completes. One routing decision: a
 * command goes direct only when Python published the LU direct (store fd
 * >= 0) and the command is a plain READ/WRITE inside the LU; whatever
 * Python would answer with sense (range, protection, FUA, transfer length)
 * is handed to Python, which decides everything about it as it does for
 * any command. Publishing "not direct" (nr_set_direct with fd -1) takes
 * direct_mu, which the thread holds while it executes a direct command: when
 * it returns no direct command is running and none will start.
 *
 * The layout is target_core_user.h's (see abi.py for the offsets and why
 * req.cdb_off sits at 24 and req.iov[] at 48).
 */
#define _GNU_SOURCE             /* preadv2, RWF_NOWAIT */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>

#include <errno.h>
#include <poll.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdint.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#define MB_VERSION 0
#define MB_FLAGS 2
#define MB_CMDR_OFF 4
#define MB_CMDR_SIZE 8
#define MB_CMD_HEAD 12
#define MB_CMD_TAIL 64
#define OP_PAD 0
#define OP_CMD 1
#define OP_TMR 2
#define OP_MASK 7u
#define ALIGN 8u
#define CAP_OOOC 1u
#define CAP_READ_LEN 2u
#define UFLAG_UNKNOWN_OP 1u
#define UFLAG_READ_LEN 2u
#define REQ_IOV_CNT 8
#define REQ_BIDI_CNT 12
#define REQ_DIF_CNT 16
#define REQ_CDB_OFF 24
#define REQ_IOV 48
#define RSP_STATUS 8
#define RSP_READ_LEN 12
#define RSP_SENSE 16
#define SENSE_SIZE 96
#define CHECK_CONDITION 2
#define MAX_DIRECT_IOVS 64
#define N_BUCKETS_MAX 32

/* Python's view of a handed-off command, copied out of the ring: once the
 * tail passes its entry the kernel may reuse that space. */
typedef struct handed {
    struct handed *next;
    uint32_t slot;
    uint16_t cmd_id;
    uint8_t kflags;
    uint32_t n_iov, n_bidi;
    uint32_t cdb_len;
    uint64_t *iov;          /* 2 * (n_iov + n_bidi): base, len */
    uint8_t cdb[];
} handed;

typedef struct { uint32_t off, end; int done; } slot_t;

/* per-kind counters of the commands done here, for the LU's metrics */
typedef struct {
    uint64_t commands, bytes;
    double seconds;
    uint64_t buckets[N_BUCKETS_MAX + 1];
} kind_stats;

typedef struct {
    PyObject_HEAD
    Py_buffer view;
    uint8_t *map;
    size_t map_len;
    uint32_t cmdr_off, cmdr_size;
    int ooo, cap_read_len;
    int uio_fd, stop_fd, handoff_fd;
    PyObject *error_class;

    pthread_mutex_t ring_mu;      /* parse, slots, tail, responses */
    uint32_t parse;
    slot_t *slots;                /* pending CMD entries in ring order (a circular deque) */
    uint32_t slot_cap, slot_first, slot_n;
    uint64_t out_of_order;

    pthread_mutex_t direct_mu;    /* held while a direct command runs */
    int store_fd;                 /* -1: nothing is direct */
    int nowait;                   /* reads try RWF_NOWAIT */
    uint64_t would_block;         /* reads handed over because they would wait */
    uint32_t block_size;
    uint64_t num_blocks, max_blocks;

    pthread_mutex_t q_mu;         /* handed-off commands and stats */
    handed *q_head, *q_tail;
    char error[160];              /* why the thread stopped: ring corrupt / uio gone */
    int gone;
    uint64_t handed_n, tmr, writes_done;
    uint64_t wakeups, notifies;   /* atomics: the thread's own counters */
    kind_stats kinds[2];          /* 0 read, 1 write */
    double bounds[N_BUCKETS_MAX];
    int n_bounds;

    pthread_t thread;
    int running;
} NativeRing;

static inline uint32_t ld32(const uint8_t *p) { uint32_t v; memcpy(&v, p, 4); return v; }
static inline uint64_t ld64(const uint8_t *p) { uint64_t v; memcpy(&v, p, 8); return v; }
static inline void st32(uint8_t *p, uint32_t v) { memcpy(p, &v, 4); }
static inline uint32_t be32(const uint8_t *p) {
    return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
}
static inline uint64_t be64(const uint8_t *p) { return (uint64_t)be32(p) << 32 | be32(p + 4); }

static uint32_t cdb_length(uint8_t op, uint8_t seventh) {
    static const uint8_t by_group[8] = {6, 10, 10, 16, 16, 12, 16, 16};
    return op == 0x7F ? 8u + seventh : by_group[op >> 5];
}

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

static void signal_fd(int fd) {
    uint64_t one = 1;
    ssize_t r;
    do { r = write(fd, &one, 8); } while (r < 0 && errno == EINTR);
}

static void kick(NativeRing *r) {
    uint32_t zero = 0;
    ssize_t n;
    do { n = write(r->uio_fd, &zero, 4); } while (n < 0 && errno == EINTR);
    __atomic_fetch_add(&r->notifies, 1, __ATOMIC_RELAXED);
}

static void set_tail(NativeRing *r, uint32_t tail) {
    __atomic_store_n((uint32_t *)(r->map + MB_CMD_TAIL), tail, __ATOMIC_RELEASE);
}

/* -- responses (under ring_mu) ------------------------------------------------ */
static void respond(NativeRing *r, uint32_t off, uint16_t cmd_id, uint8_t status,
                    const uint8_t *sense, size_t sense_len, long long read_len, int unknown_op) {
    uint8_t *p = r->map + r->cmdr_off + off;
    uint8_t uflags = p[7] & ~(UFLAG_UNKNOWN_OP | UFLAG_READ_LEN);
    uint32_t rl = 0;
    if (unknown_op)
        uflags |= UFLAG_UNKNOWN_OP;
    if (read_len >= 0 && r->cap_read_len) {
        uflags |= UFLAG_READ_LEN;
        rl = (uint32_t)read_len;
    }
    p[RSP_STATUS] = status;
    p[RSP_STATUS + 1] = p[RSP_STATUS + 2] = p[RSP_STATUS + 3] = 0;
    st32(p + RSP_READ_LEN, rl);
    if (sense_len || status == CHECK_CONDITION) {
        /* the kernel reads the sense buffer only with CHECK CONDITION */
        if (sense_len > SENSE_SIZE)
            sense_len = SENSE_SIZE;
        memcpy(p + RSP_SENSE, sense, sense_len);
        memset(p + RSP_SENSE + sense_len, 0, SENSE_SIZE - sense_len);
    }
    /* the header last: cmd_id and flags */
    memcpy(p + 4, &cmd_id, 2);
    p[7] = uflags;
}

/* Complete the command fetched at ring offset `slot`: 0, or -1 with `why`. */
static int complete_locked(NativeRing *r, uint32_t slot, uint16_t cmd_id, uint8_t status,
                           const uint8_t *sense, size_t sense_len, long long read_len,
                           int unknown_op, const char **why) {
    if (r->ooo) {
        /* the first pending entry takes the response, whoever's it was */
        if (!r->slot_n) { *why = "completion with no pending ring slot"; return -1; }
        slot_t *s = &r->slots[r->slot_first];
        if (s->off != slot)
            r->out_of_order++;
        respond(r, s->off, cmd_id, status, sense, sense_len, read_len, unknown_op);
        uint32_t end = s->end;
        r->slot_first = (r->slot_first + 1) % r->slot_cap;
        r->slot_n--;
        set_tail(r, end);
        return 0;
    }
    uint32_t i, k = r->slot_first;
    for (i = 0; i < r->slot_n; i++, k = (k + 1) % r->slot_cap)
        if (r->slots[k].off == slot && !r->slots[k].done)
            break;
    if (i == r->slot_n) { *why = "slot not pending"; return -1; }
    respond(r, slot, cmd_id, status, sense, sense_len, read_len, unknown_op);
    r->slots[k].done = 1;
    if (i == 0) {
        uint32_t tail = 0;
        while (r->slot_n && r->slots[r->slot_first].done) {
            tail = r->slots[r->slot_first].end;
            r->slot_first = (r->slot_first + 1) % r->slot_cap;
            r->slot_n--;
        }
        set_tail(r, tail);
    }
    return 0;
}

/* -- fetching (the ring thread) -------------------------------------------------- */
typedef struct {
    uint32_t slot;
    uint16_t cmd_id;
    uint8_t kflags;
    uint32_t n_iov, n_bidi, cdb_len;
    const uint8_t *iovp;      /* the iovecs in the entry (copied before the tail passes it) */
    uint64_t cdb_off;
} fetched;

/* Note why the thread stops (the first reason only). */
__attribute__((format(printf, 2, 3)))
static void fail(NativeRing *r, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    pthread_mutex_lock(&r->q_mu);
    if (!r->error[0])
        vsnprintf(r->error, sizeof r->error, fmt, ap);
    pthread_mutex_unlock(&r->q_mu);
    va_end(ap);
}

/* Walk the entries up to cmd_head (under ring_mu): CMD entries into `out`
 * (their slots pending), PAD/TMR passed. Returns the count, or -1 when the
 * ring holds something impossible (r->error says what). */
static long walk(NativeRing *r, fetched **out, size_t *cap, int *tail_moved) {
    uint32_t head = __atomic_load_n((uint32_t *)(r->map + MB_CMD_HEAD), __ATOMIC_ACQUIRE);
    uint32_t size = r->cmdr_size, off = r->parse;
    long n = 0;
    int tail_set = 0;
    uint32_t tail = 0;
    if (head >= size || head % ALIGN) {
        fail(r, "cmd_head %u outside ring of %u", head, size);
        return -1;
    }
    for (uint32_t step = 0; off != head; step++) {
        if (step > size / ALIGN) { fail(r, "ring walk does not reach cmd_head %u", head); return -1; }
        const uint8_t *p = r->map + r->cmdr_off + off;
        uint32_t len_op = ld32(p), op = len_op & OP_MASK, length = len_op & ~OP_MASK;
        if (length == 0 || length % ALIGN || off + length > size) {
            fail(r, "entry at %u: bad length %u", off, length);
            return -1;
        }
        uint32_t end = (off + length) % size;
        if (op == OP_CMD) {
            uint32_t n_iov = ld32(p + REQ_IOV_CNT), n_bidi = ld32(p + REQ_BIDI_CNT);
            uint32_t dif = ld32(p + REQ_DIF_CNT);
            uint64_t total = (uint64_t)n_iov + n_bidi + dif;
            uint64_t cdb_off = ld64(p + REQ_CDB_OFF);
            if (REQ_IOV + total * 16 > length) {
                fail(r, "entry at %u: iovecs do not fit in %u bytes", off, length);
                return -1;
            }
            for (uint64_t i = 0; i < (uint64_t)n_iov + n_bidi; i++) {
                uint64_t b = ld64(p + REQ_IOV + 16 * i), l = ld64(p + REQ_IOV + 16 * i + 8);
                if (b > r->map_len || l > r->map_len - b) {
                    fail(r, "entry at %u: iovec %u outside the map", off, (uint32_t)i);
                    return -1;
                }
            }
            if (cdb_off >= r->map_len) {
                fail(r, "entry at %u: cdb offset outside the map", off);
                return -1;
            }
            if (r->slot_n == r->slot_cap) {
                fail(r, "entry at %u: more than %u pending commands", off, r->slot_cap);
                return -1;
            }
            if ((size_t)n == *cap) {
                size_t nc = *cap * 2;
                fetched *f = realloc(*out, nc * sizeof **out);
                if (!f) { fail(r, "out of memory at entry %u", off); return -1; }
                *out = f;
                *cap = nc;
            }
            const uint8_t *cdb = r->map + cdb_off;
            uint32_t clen = cdb_length(cdb[0], cdb_off + 7 < r->map_len ? cdb[7] : 0);
            if (clen > r->map_len - cdb_off)
                clen = (uint32_t)(r->map_len - cdb_off);
            fetched *f = &(*out)[n++];
            f->slot = off;
            memcpy(&f->cmd_id, p + 4, 2);
            f->kflags = p[6];
            f->n_iov = n_iov;
            f->n_bidi = n_bidi;
            f->iovp = p + REQ_IOV;
            f->cdb_off = cdb_off;
            f->cdb_len = clen;
            uint32_t k = (r->slot_first + r->slot_n) % r->slot_cap;
            r->slots[k] = (slot_t){off, end, 0};
            r->slot_n++;
        } else {
            if (op == OP_TMR) {
                r->tmr++;
            } else if (op != OP_PAD) {
                /* as libtcmu: flag it and pass over it */
                r->map[r->cmdr_off + off + 7] |= UFLAG_UNKNOWN_OP;
            }
            if (r->slot_n)
                r->slots[(r->slot_first + r->slot_n - 1) % r->slot_cap].end = end;
            else {
                tail = end;
                tail_set = 1;
            }
        }
        off = end;
    }
    r->parse = off;
    if (tail_set)
        set_tail(r, tail);
    *tail_moved = tail_set;
    return n;
}

/* Copy a command out for Python. NULL when out of memory. */
static handed *copy_out(NativeRing *r, const fetched *f) {
    uint32_t n = f->n_iov + f->n_bidi;
    handed *h = malloc(sizeof *h + f->cdb_len);
    if (!h)
        return NULL;
    h->iov = malloc(n ? 16 * (size_t)n : 1);
    if (!h->iov) { free(h); return NULL; }
    memcpy(h->iov, f->iovp, 16 * (size_t)n);
    memcpy(h->cdb, r->map + f->cdb_off, f->cdb_len);
    h->next = NULL;
    h->slot = f->slot;
    h->cmd_id = f->cmd_id;
    h->kflags = f->kflags;
    h->n_iov = f->n_iov;
    h->n_bidi = f->n_bidi;
    h->cdb_len = f->cdb_len;
    return h;
}

/* -- direct commands ---------------------------------------------------------------- */
/* The command, if it is a READ/WRITE(10/16) that needs nothing but the data
 * movement: 0 read, 1 write, -1 for Python. Anything Python would refuse or
 * treat specially (protection bits, FUA, NACA, zero or too long a transfer,
 * a range past the end, data of another length) goes to Python, which
 * answers it in full. Called with direct_mu held and store_fd >= 0. */
static int direct_kind(NativeRing *r, const fetched *f, uint64_t *offset, uint64_t *bytes) {
    const uint8_t *c = r->map + f->cdb_off;
    uint64_t lba, blocks;
    int write;
    if (f->n_bidi || f->cdb_len < 10)
        return -1;
    switch (c[0]) {
    case 0x28: case 0x2A:
        lba = be32(c + 2); blocks = (uint64_t)c[7] << 8 | c[8];
        if (c[9] & 0x04) return -1;                   /* NACA */
        break;
    case 0x88: case 0x8A:
        if (f->cdb_len < 16) return -1;
        lba = be64(c + 2); blocks = be32(c + 10);
        if (c[15] & 0x04) return -1;
        break;
    default:
        return -1;
    }
    write = c[0] == 0x2A || c[0] == 0x8A;
    if (c[1] & 0xE0 || (write && c[1] & 0x08))       /* RD/WRPROTECT, FUA */
        return -1;
    if (blocks == 0 || blocks > r->max_blocks || lba >= r->num_blocks
            || blocks > r->num_blocks - lba)
        return -1;
    uint64_t want = blocks * r->block_size, have = 0;
    if (f->n_iov == 0 || f->n_iov > MAX_DIRECT_IOVS)
        return -1;
    for (uint32_t i = 0; i < f->n_iov; i++)
        have += ld64(f->iovp + 16 * i + 8);
    if (have != want)
        return -1;
    *offset = lba * r->block_size;
    *bytes = want;
    return write;
}

/* Do it: 1 when done, 0 when not (Python does it, and reports an error).
 * Reads ask RWF_NOWAIT: this one thread runs the commands one after the
 * other, so a read that would wait for the disk goes to Python, whose
 * threads keep several such reads in flight (a filesystem without
 * RWF_NOWAIT gets plain reads: r->nowait turns 0). */
static int direct_io(NativeRing *r, const fetched *f, int write, uint64_t offset, uint64_t bytes) {
    struct iovec iov[MAX_DIRECT_IOVS];
    uint32_t n = f->n_iov;
    for (uint32_t i = 0; i < n; i++) {
        iov[i].iov_base = r->map + ld64(f->iovp + 16 * i);
        iov[i].iov_len = ld64(f->iovp + 16 * i + 8);
    }
    ssize_t got;
    do {
        if (write)
            got = pwritev(r->store_fd, iov, (int)n, (off_t)offset);
        else if (r->nowait) {
            got = preadv2(r->store_fd, iov, (int)n, (off_t)offset, RWF_NOWAIT);
            if (got < 0 && (errno == EOPNOTSUPP || errno == EINVAL)) {
                r->nowait = 0;
                errno = EINTR;          /* once more, plainly */
            }
        } else
            got = preadv(r->store_fd, iov, (int)n, (off_t)offset);
    } while (got < 0 && errno == EINTR);
    if (got < 0 && errno == EAGAIN)
        __atomic_fetch_add(&r->would_block, 1, __ATOMIC_RELAXED);
    return got == (ssize_t)bytes;
}

static void count(NativeRing *r, int kind, uint64_t bytes, double secs) {
    kind_stats *k = &r->kinds[kind];
    int b = 0;
    while (b < r->n_bounds && secs > r->bounds[b])
        b++;
    k->commands++;
    k->bytes += bytes;
    k->seconds += secs;
    k->buckets[b]++;
    if (kind == 1)
        r->writes_done++;
}

/* A direct command executed in this batch, waiting for its response. */
typedef struct { uint32_t slot; uint16_t cmd_id; int8_t kind; uint64_t bytes; } done_t;

/* Fetch what the kernel published; run the direct commands, hand the rest
 * over. 0, or -1 when the ring is corrupt.
 *
 * The batch's direct commands run first, then are counted (one q_mu), then
 * answered (one ring_mu), then the kernel is kicked once. Their latency is
 * the batch's: the kernel sees none of their responses before the kick, so
 * fetch-to-kick is what each of them waited here. Why not a clock read per
 * command: a TCG guest's clocksource is HPET, which the vDSO cannot read,
 * so every clock_gettime is a syscall plus an emulated device read; two per
 * command were 2 of the 4.8 syscalls per I/O perf counted on this thread. */
static int process(NativeRing *r, fetched **buf, size_t *cap, done_t **dbuf, size_t *dcap) {
    int tail_moved = 0;
    pthread_mutex_lock(&r->ring_mu);
    long n = walk(r, buf, cap, &tail_moved);
    pthread_mutex_unlock(&r->ring_mu);
    if (n < 0)
        return -1;
    if ((size_t)n > *dcap) {
        done_t *d = realloc(*dbuf, (size_t)n * sizeof **dbuf);
        if (!d) { fail(r, "out of memory for %ld commands", n); return -1; }
        *dbuf = d;
        *dcap = (size_t)n;
    }
    done_t *done_cmds = *dbuf;
    size_t nd = 0;
    handed *first = NULL, *last = NULL;
    uint64_t nh = 0;
    double t0 = n ? now_s() : 0.0;
    for (long i = 0; i < n; i++) {
        fetched *f = &(*buf)[i];
        uint64_t offset, bytes;
        int kind = -1, done = 0;
        pthread_mutex_lock(&r->direct_mu);
        if (r->store_fd >= 0 && (kind = direct_kind(r, f, &offset, &bytes)) >= 0)
            done = direct_io(r, f, kind, offset, bytes);
        pthread_mutex_unlock(&r->direct_mu);
        if (done) {
            done_cmds[nd++] = (done_t){f->slot, f->cmd_id, (int8_t)kind, bytes};
            continue;
        }
        handed *h = copy_out(r, f);
        if (!h) {
            fail(r, "out of memory for cmd %u", (unsigned)f->cmd_id);
            return -1;
        }
        if (last) last->next = h; else first = h;
        last = h;
        nh++;
    }
    if (nd) {
        /* the data is in the store (or the Data-In buffers): answer GOOD.
         * Counted first: a SYNCHRONIZE CACHE the host sends after one of
         * these completions (which a kick from Python's thread may show the
         * kernel before ours) must find the write in writes_done. */
        double secs = now_s() - t0;
        const char *why;
        pthread_mutex_lock(&r->q_mu);
        for (size_t i = 0; i < nd; i++)
            count(r, done_cmds[i].kind, done_cmds[i].bytes, secs);
        pthread_mutex_unlock(&r->q_mu);
        pthread_mutex_lock(&r->ring_mu);
        for (size_t i = 0; i < nd; i++)
            complete_locked(r, done_cmds[i].slot, done_cmds[i].cmd_id, 0, NULL, 0, -1, 0, &why);
        pthread_mutex_unlock(&r->ring_mu);
    }
    if (first) {
        pthread_mutex_lock(&r->q_mu);
        if (r->q_tail) r->q_tail->next = first; else r->q_head = first;
        r->q_tail = last;
        r->handed_n += nh;
        pthread_mutex_unlock(&r->q_mu);
        signal_fd(r->handoff_fd);
    }
    if (nd || tail_moved)
        kick(r);        /* completions written, or PAD/TMR entries passed */
    return 0;
}

static void *ring_thread(void *arg) {
    NativeRing *r = arg;
    pthread_setname_np(pthread_self(), "tcmu-ring");    /* for top -H, /proc/PID/task */
    size_t cap = 64, dcap = 64;
    fetched *buf = malloc(cap * sizeof *buf);
    done_t *dbuf = malloc(dcap * sizeof *dbuf);
    int ok = buf != NULL && dbuf != NULL;
    if (ok)
        ok = process(r, &buf, &cap, &dbuf, &dcap) == 0;       /* whatever is already on the ring */
    while (ok) {
        struct pollfd p[2] = {{r->uio_fd, POLLIN, 0}, {r->stop_fd, POLLIN, 0}};
        int k = poll(p, 2, -1);
        if (k < 0) {
            if (errno == EINTR)
                continue;
            fail(r, "poll failed: %s", strerror(errno));
            break;
        }
        if (p[1].revents)
            break;
        if (!p[0].revents)
            continue;
        __atomic_fetch_add(&r->wakeups, 1, __ATOMIC_RELAXED);
        uint32_t word;
        ssize_t got = read(r->uio_fd, &word, 4);
        if (got == 0 || (got < 0 && errno != EAGAIN && errno != EINTR)) {
            /* the uio device was unregistered under us (backstore deleted) */
            pthread_mutex_lock(&r->q_mu);
            r->gone = 1;
            if (!r->error[0])
                snprintf(r->error, sizeof r->error, "uio device gone (%s)",
                         got == 0 ? "end of file" : strerror(errno));
            pthread_mutex_unlock(&r->q_mu);
            break;
        }
        ok = process(r, &buf, &cap, &dbuf, &dcap) == 0;
    }
    free(buf);
    free(dbuf);
    signal_fd(r->handoff_fd);       /* Python reads the error / gone state */
    return NULL;
}

/* -- Python type -------------------------------------------------------------------- */
static void free_queue(handed *h) {
    while (h) {
        handed *n = h->next;
        free(h->iov);
        free(h);
        h = n;
    }
}

static void stop_thread(NativeRing *r) {
    if (!r->running)
        return;
    signal_fd(r->stop_fd);
    Py_BEGIN_ALLOW_THREADS
    pthread_join(r->thread, NULL);
    Py_END_ALLOW_THREADS
    r->running = 0;
}

static void NR_dealloc(NativeRing *r) {
    stop_thread(r);
    free_queue(r->q_head);
    free(r->slots);
    if (r->view.obj)
        PyBuffer_Release(&r->view);
    if (r->stop_fd >= 0) close(r->stop_fd);
    if (r->handoff_fd >= 0) close(r->handoff_fd);
    Py_XDECREF(r->error_class);
    pthread_mutex_destroy(&r->ring_mu);
    pthread_mutex_destroy(&r->direct_mu);
    pthread_mutex_destroy(&r->q_mu);
    Py_TYPE(r)->tp_free((PyObject *)r);
}

static PyObject *NR_new(PyTypeObject *type, PyObject *args, PyObject *kw) {
    static char *names[] = {"buf", "uio_fd", "ooo", "error", "buckets", NULL};
    PyObject *buf, *ooo_obj, *error_class, *buckets;
    int uio_fd;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OiOOO", names, &buf, &uio_fd, &ooo_obj,
                                     &error_class, &buckets))
        return NULL;
    NativeRing *r = (NativeRing *)type->tp_alloc(type, 0);
    if (!r)
        return NULL;
    r->stop_fd = r->handoff_fd = r->store_fd = -1;
    pthread_mutex_init(&r->ring_mu, NULL);
    pthread_mutex_init(&r->direct_mu, NULL);
    pthread_mutex_init(&r->q_mu, NULL);
    Py_INCREF(error_class);
    r->error_class = error_class;
    if (PyObject_GetBuffer(buf, &r->view, PyBUF_WRITABLE) < 0)
        goto bad;
    r->map = r->view.buf;
    r->map_len = (size_t)r->view.len;
    r->uio_fd = uio_fd;
    if (r->map_len < 128) {
        PyErr_Format(error_class, "map of %zu bytes holds no mailbox", r->map_len);
        goto bad;
    }
    uint16_t version, flags;
    memcpy(&version, r->map + MB_VERSION, 2);
    memcpy(&flags, r->map + MB_FLAGS, 2);
    r->cmdr_off = ld32(r->map + MB_CMDR_OFF);
    r->cmdr_size = ld32(r->map + MB_CMDR_SIZE);
    if (version != 2) {
        PyErr_Format(error_class, "mailbox version %u, expected 2", version);
        goto bad;
    }
    if (r->cmdr_size == 0 || r->cmdr_size % ALIGN
            || (uint64_t)r->cmdr_off + r->cmdr_size > r->map_len) {
        PyErr_Format(error_class, "bad command ring: off %u size %u map %zu",
                     r->cmdr_off, r->cmdr_size, r->map_len);
        goto bad;
    }
    r->ooo = ooo_obj == Py_None ? !!(flags & CAP_OOOC) : PyObject_IsTrue(ooo_obj);
    r->cap_read_len = !!(flags & CAP_READ_LEN);
    /* a CMD entry is at least 112 bytes: this many can be pending at most */
    r->slot_cap = r->cmdr_size / 112 + 2;
    r->slots = calloc(r->slot_cap, sizeof *r->slots);
    if (!r->slots) { PyErr_NoMemory(); goto bad; }
    r->parse = __atomic_load_n((uint32_t *)(r->map + MB_CMD_TAIL), __ATOMIC_ACQUIRE);
    PyObject *seq = PySequence_Fast(buckets, "buckets must be a sequence");
    if (!seq)
        goto bad;
    Py_ssize_t nb = PySequence_Fast_GET_SIZE(seq);
    if (nb > N_BUCKETS_MAX) { Py_DECREF(seq); PyErr_SetString(PyExc_ValueError, "too many buckets"); goto bad; }
    for (Py_ssize_t i = 0; i < nb; i++)
        r->bounds[i] = PyFloat_AsDouble(PySequence_Fast_GET_ITEM(seq, i));
    Py_DECREF(seq);
    if (PyErr_Occurred())
        goto bad;
    r->n_bounds = (int)nb;
    r->stop_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    r->handoff_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    if (r->stop_fd < 0 || r->handoff_fd < 0) { PyErr_SetFromErrno(PyExc_OSError); goto bad; }
    return (PyObject *)r;
bad:
    Py_DECREF(r);
    return NULL;
}

static PyObject *NR_start(NativeRing *r, PyObject *unused) {
    if (r->running)
        Py_RETURN_NONE;
    int e = pthread_create(&r->thread, NULL, ring_thread, r);
    if (e) {
        errno = e;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    r->running = 1;
    Py_RETURN_NONE;
}

static PyObject *NR_stop(NativeRing *r, PyObject *unused) {
    stop_thread(r);
    Py_RETURN_NONE;
}

static PyObject *NR_set_direct(NativeRing *r, PyObject *args) {
    int fd;
    unsigned int bs = 0;
    unsigned long long blocks = 0, max_blocks = 0;
    if (!PyArg_ParseTuple(args, "i|IKK", &fd, &bs, &blocks, &max_blocks))
        return NULL;
    if (fd >= 0 && bs == 0) {
        PyErr_SetString(PyExc_ValueError, "a direct LU needs a block size");
        return NULL;
    }
    /* waits for a direct command running now: none runs under the old
     * setting once this returns */
    Py_BEGIN_ALLOW_THREADS
    pthread_mutex_lock(&r->direct_mu);
    if (fd != r->store_fd)
        r->nowait = 1;              /* another file: try again */
    r->store_fd = fd;
    r->block_size = bs;
    r->num_blocks = blocks;
    r->max_blocks = max_blocks;
    pthread_mutex_unlock(&r->direct_mu);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

static PyObject *iovs_list(const uint64_t *v, uint32_t n) {
    PyObject *l = PyList_New(n);
    if (!l)
        return NULL;
    for (uint32_t i = 0; i < n; i++) {
        PyObject *t = Py_BuildValue("(KK)", (unsigned long long)v[2 * i], (unsigned long long)v[2 * i + 1]);
        if (!t) { Py_DECREF(l); return NULL; }
        PyList_SET_ITEM(l, i, t);
    }
    return l;
}

/* The commands handed over since the last call: (cmd_id, cdb, iovs, bidi_iovs, slot, kflags). */
static PyObject *NR_take(NativeRing *r, PyObject *unused) {
    uint64_t word;
    while (read(r->handoff_fd, &word, 8) < 0 && errno == EINTR)
        ;
    pthread_mutex_lock(&r->q_mu);
    handed *h = r->q_head;
    r->q_head = r->q_tail = NULL;
    pthread_mutex_unlock(&r->q_mu);
    PyObject *out = PyList_New(0);
    handed *it = h;
    for (; out && it; it = it->next) {
        PyObject *iovs = iovs_list(it->iov, it->n_iov);
        PyObject *bidi = iovs ? iovs_list(it->iov + 2 * it->n_iov, it->n_bidi) : NULL;
        PyObject *t = bidi ? Py_BuildValue("(iy#OOIi)", it->cmd_id, (const char *)it->cdb,
                                           (Py_ssize_t)it->cdb_len, iovs, bidi, it->slot, it->kflags) : NULL;
        Py_XDECREF(iovs);
        Py_XDECREF(bidi);
        if (!t || PyList_Append(out, t) < 0) {
            Py_XDECREF(t);
            Py_CLEAR(out);
            break;
        }
        Py_DECREF(t);
    }
    free_queue(h);
    return out;
}

static PyObject *NR_complete(NativeRing *r, PyObject *args) {
    unsigned int slot, cmd_id, status;
    const char *sense;
    Py_ssize_t sense_len;
    long long read_len;
    int unknown_op;
    if (!PyArg_ParseTuple(args, "IIIy#Lp", &slot, &cmd_id, &status, &sense, &sense_len,
                          &read_len, &unknown_op))
        return NULL;
    const char *why = NULL;
    int rc;
    pthread_mutex_lock(&r->ring_mu);
    rc = complete_locked(r, slot, (uint16_t)cmd_id, (uint8_t)status, (const uint8_t *)sense,
                         (size_t)sense_len, read_len, unknown_op, &why);
    pthread_mutex_unlock(&r->ring_mu);
    if (rc < 0) {
        PyErr_Format(r->error_class, "cmd %u: %s (slot %u)", cmd_id, why, slot);
        return NULL;
    }
    Py_RETURN_NONE;
}

static PyObject *kind_dict(const kind_stats *k, int n_bounds) {
    PyObject *b = PyList_New(n_bounds + 1);
    if (!b)
        return NULL;
    for (int i = 0; i <= n_bounds; i++)
        PyList_SET_ITEM(b, i, PyLong_FromUnsignedLongLong(k->buckets[i]));
    return Py_BuildValue("{sKsKsdsN}", "commands", (unsigned long long)k->commands,
                         "bytes", (unsigned long long)k->bytes, "seconds", k->seconds, "buckets", b);
}

/* The running totals and state. */
static PyObject *NR_stats(NativeRing *r, PyObject *unused) {
    pthread_mutex_lock(&r->q_mu);
    PyObject *out = Py_BuildValue(
        "{sKsKsKsKsKsKsKsssi}", "handed", (unsigned long long)r->handed_n,
        "would_block", (unsigned long long)__atomic_load_n(&r->would_block, __ATOMIC_RELAXED),
        "wakeups", (unsigned long long)__atomic_load_n(&r->wakeups, __ATOMIC_RELAXED),
        "notifies", (unsigned long long)__atomic_load_n(&r->notifies, __ATOMIC_RELAXED),
        "tmr", (unsigned long long)r->tmr, "writes_done", (unsigned long long)r->writes_done,
        "out_of_order", (unsigned long long)r->out_of_order, "error", r->error, "gone", r->gone);
    pthread_mutex_unlock(&r->q_mu);
    return out;
}

/* (read, write): the counters of the commands done here since the last call. */
static PyObject *NR_take_counts(NativeRing *r, PyObject *unused) {
    kind_stats k[2];
    pthread_mutex_lock(&r->q_mu);
    memcpy(k, r->kinds, sizeof k);
    memset(r->kinds, 0, sizeof r->kinds);
    pthread_mutex_unlock(&r->q_mu);
    PyObject *rd = kind_dict(&k[0], r->n_bounds), *wr = rd ? kind_dict(&k[1], r->n_bounds) : NULL;
    if (!wr) {
        Py_XDECREF(rd);
        return NULL;
    }
    return Py_BuildValue("(NN)", rd, wr);
}

static PyObject *NR_in_flight(NativeRing *r, PyObject *unused) {
    pthread_mutex_lock(&r->ring_mu);
    uint32_t n = 0, k = r->slot_first;
    for (uint32_t i = 0; i < r->slot_n; i++, k = (k + 1) % r->slot_cap)
        n += !r->slots[k].done;
    pthread_mutex_unlock(&r->ring_mu);
    return PyLong_FromUnsignedLong(n);
}

static PyMethodDef NR_methods[] = {
    {"start", (PyCFunction)NR_start, METH_NOARGS, "Start the ring thread."},
    {"stop", (PyCFunction)NR_stop, METH_NOARGS, "Stop the ring thread and wait for it."},
    {"set_direct", (PyCFunction)NR_set_direct, METH_VARARGS,
     "set_direct(fd, block_size, num_blocks, max_blocks): READ/WRITEs inside the LU go to fd; "
     "set_direct(-1): none does. Returns once no command runs under the old setting."},
    {"take", (PyCFunction)NR_take, METH_NOARGS,
     "The commands handed to Python: [(cmd_id, cdb, iovs, bidi_iovs, slot, kflags)]."},
    {"complete", (PyCFunction)NR_complete, METH_VARARGS,
     "complete(slot, cmd_id, status, sense, read_len (-1: none), unknown_op)."},
    {"stats", (PyCFunction)NR_stats, METH_NOARGS, "Running totals and state."},
    {"take_counts", (PyCFunction)NR_take_counts, METH_NOARGS,
     "(read, write) counters of the commands done here since the last call."},
    {"in_flight", (PyCFunction)NR_in_flight, METH_NOARGS, "Fetched CMD entries not completed."},
    {NULL}
};

static PyObject *NR_get_handoff_fd(NativeRing *r, void *c) { return PyLong_FromLong(r->handoff_fd); }
static PyObject *NR_get_read_len(NativeRing *r, void *c) { return PyBool_FromLong(r->cap_read_len); }
static PyObject *NR_get_ooo(NativeRing *r, void *c) { return PyBool_FromLong(r->ooo); }

static PyObject *NR_get_writes_done(NativeRing *r, void *c) {
    pthread_mutex_lock(&r->q_mu);
    unsigned long long n = r->writes_done;
    pthread_mutex_unlock(&r->q_mu);
    return PyLong_FromUnsignedLongLong(n);
}

static PyObject *NR_get_error(NativeRing *r, void *c) {
    char why[sizeof r->error];
    pthread_mutex_lock(&r->q_mu);
    memcpy(why, r->error, sizeof why);
    pthread_mutex_unlock(&r->q_mu);
    if (!why[0])
        Py_RETURN_NONE;
    return PyUnicode_DecodeUTF8(why, (Py_ssize_t)strlen(why), "replace");
}

static PyObject *NR_get_gone(NativeRing *r, void *c) {
    pthread_mutex_lock(&r->q_mu);
    int gone = r->gone;
    pthread_mutex_unlock(&r->q_mu);
    return PyBool_FromLong(gone);
}

static PyGetSetDef NR_getset[] = {
    {"writes_done", (getter)NR_get_writes_done, NULL, "writes done here so far", NULL},
    {"error", (getter)NR_get_error, NULL, "why the thread stopped (None while it runs)", NULL},
    {"gone", (getter)NR_get_gone, NULL, "the uio device went away", NULL},
    {"handoff_fd", (getter)NR_get_handoff_fd, NULL, "eventfd: readable when commands were handed over or the thread stopped", NULL},
    {"read_len", (getter)NR_get_read_len, NULL, "the kernel honours rsp.read_len", NULL},
    {"ooo", (getter)NR_get_ooo, NULL, "out-of-order completions", NULL},
    {NULL}
};

static PyTypeObject NativeRingType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "target.tcmu._nativering.NativeRing",
    .tp_basicsize = sizeof(NativeRing),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "The command ring of one TCMU device, run by a native thread.",
    .tp_new = NR_new,
    .tp_dealloc = (destructor)NR_dealloc,
    .tp_methods = NR_methods,
    .tp_getset = NR_getset,
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_nativering",
    "The TCMU ring loop in a native thread (see nativering.c).", -1, NULL
};

PyMODINIT_FUNC PyInit__nativering(void) {
    if (PyType_Ready(&NativeRingType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&module);
    if (!m)
        return NULL;
    Py_INCREF(&NativeRingType);
    if (PyModule_AddObject(m, "NativeRing", (PyObject *)&NativeRingType) < 0) {
        Py_DECREF(&NativeRingType);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
