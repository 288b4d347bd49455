"""librados / librbd's C API through ctypes: the calls the RBD store makes.

Why not python3-rbd for the data path: its aio calls complete by running a
Python callback on a librbd thread, so every completion has that thread
take the GIL from the event loop (measured: 4 KiB random reads through
iSCSI at 32 in flight, 7-8k IOPS against fio's 27k on the same image).
librbd can instead queue completions for polling and signal an eventfd
(``rbd_set_image_notification`` / ``rbd_poll_io_events``, what fio's rbd
engine and tcmu-runner use): no Python ever runs on a librbd thread, the
loop drains every completion of a wake-up in one call, and reads land
straight in the caller's buffer. ctypes releases the GIL around each call.

Only the C library (librbd1 / librados2, which python3-rbd depends on) is
needed. Every failing call raises ``RbdError`` with the positive errno.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
from ctypes import POINTER, byref, c_char_p, c_int, c_size_t, c_ssize_t, c_uint8, c_uint64, c_void_p
from typing import Callable

# rbd_features.h / librbd.h
FEATURE_LAYERING = 1 << 0
FEATURE_EXCLUSIVE_LOCK = 1 << 2
FEATURE_OBJECT_MAP = 1 << 3
FEATURE_FAST_DIFF = 1 << 4
LOCK_MODE_EXCLUSIVE = 0
#: rbd_snap_create2: no quiesce notification to the image's watchers (the
#: engine takes its snapshots with the volumes' I/O gates closed already)
SNAP_CREATE_SKIP_QUIESCE = 1 << 0
_EVENT_TYPE_EVENTFD = 2
#: completions taken per rbd_poll_io_events call
POLL_BATCH = 64


class RbdError(Exception):
    """A librados / librbd call failed; ``errno`` is positive."""

    def __init__(self, err: int, what: str) -> None:
        super().__init__(f"{what}: {os.strerror(err)}")
        self.errno = err


def _load(name: str, soname: str) -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL(ctypes.util.find_library(name) or soname)
    except OSError:
        return None


_rados = _load("rados", "librados.so.2")
_rbd = _load("rbd", "librbd.so.1")
available = _rados is not None and _rbd is not None

_DIFF_CB = ctypes.CFUNCTYPE(c_int, c_uint64, c_size_t, c_int, c_void_p)
_PROGRESS_CB = ctypes.CFUNCTYPE(c_int, c_uint64, c_uint64, c_void_p)
_NO_PROGRESS = _PROGRESS_CB(lambda _done, _total, _arg: 0)


class _SnapInfo(ctypes.Structure):
    _fields_ = [("id", c_uint64), ("size", c_uint64), ("name", c_char_p)]


class _Api:
    """The prototypes, declared once (argtypes make ctypes convert and check).

    All through CDLL, which drops the GIL around each call, even the cheap
    completion calls (create, poll, get, release) and the eventfd read.
    Making those keep the GIL (a ctypes.PyDLL of the same library, and
    libc's read for the eventfd) halves the GIL hand-offs between the loop
    and the submitter thread, but changed nothing measurable: 4 KiB random
    reads at QD32, store level 25.7-32.1k vs 23.5-29.1k IOPS (noise of the
    shared machine); through iSCSI 62.6-69.4k vs 57.0-79.6k commands in 5 s
    (3 alternating runs each, load 1.3-2.4). Not taken."""

    def __init__(self, rados: ctypes.CDLL, rbd: ctypes.CDLL) -> None:
        def fn(lib: ctypes.CDLL, name: str, res: object, *args: object) -> Callable[..., int]:
            f = getattr(lib, name)
            f.restype = res
            f.argtypes = args
            return f
        p = c_void_p
        self.rados_create = fn(rados, "rados_create", c_int, POINTER(p), c_char_p)
        self.rados_conf_read_file = fn(rados, "rados_conf_read_file", c_int, p, c_char_p)
        self.rados_conf_set = fn(rados, "rados_conf_set", c_int, p, c_char_p, c_char_p)
        self.rados_conf_get = fn(rados, "rados_conf_get", c_int, p, c_char_p, c_char_p, c_size_t)
        self.rados_connect = fn(rados, "rados_connect", c_int, p)
        self.rados_shutdown = fn(rados, "rados_shutdown", None, p)
        self.rados_ioctx_create = fn(rados, "rados_ioctx_create", c_int, p, c_char_p, POINTER(p))
        self.rados_ioctx_destroy = fn(rados, "rados_ioctx_destroy", None, p)
        self.create2 = fn(rbd, "rbd_create2", c_int, p, c_char_p, c_uint64, c_uint64, POINTER(c_int))
        self.remove = fn(rbd, "rbd_remove", c_int, p, c_char_p)
        self.open = fn(rbd, "rbd_open", c_int, p, c_char_p, POINTER(p), c_char_p)
        self.close = fn(rbd, "rbd_close", c_int, p)
        self.get_size = fn(rbd, "rbd_get_size", c_int, p, POINTER(c_uint64))
        self.get_features = fn(rbd, "rbd_get_features", c_int, p, POINTER(c_uint64))
        self.resize = fn(rbd, "rbd_resize", c_int, p, c_uint64)
        self.lock_acquire = fn(rbd, "rbd_lock_acquire", c_int, p, c_int)
        self.lock_release = fn(rbd, "rbd_lock_release", c_int, p)
        self.lock_break = fn(rbd, "rbd_lock_break", c_int, p, c_int, c_char_p)
        self.lock_get_owners = fn(rbd, "rbd_lock_get_owners", c_int, p, POINTER(c_int),
                                  POINTER(c_char_p), POINTER(c_size_t))
        self.lock_get_owners_cleanup = fn(rbd, "rbd_lock_get_owners_cleanup", None,
                                          POINTER(c_char_p), c_size_t)
        self.diff_iterate2 = fn(rbd, "rbd_diff_iterate2", c_int, p, c_char_p, c_uint64, c_uint64,
                                c_uint8, c_uint8, _DIFF_CB, p)
        self.snap_create2 = fn(rbd, "rbd_snap_create2", c_int, p, c_char_p, ctypes.c_uint32,
                               _PROGRESS_CB, p)
        self.snap_remove = fn(rbd, "rbd_snap_remove", c_int, p, c_char_p)
        self.snap_get_id = fn(rbd, "rbd_snap_get_id", c_int, p, c_char_p, POINTER(c_uint64))
        self.snap_list = fn(rbd, "rbd_snap_list", c_int, p, POINTER(_SnapInfo), POINTER(c_int))
        self.snap_list_end = fn(rbd, "rbd_snap_list_end", None, POINTER(_SnapInfo))
        self.set_image_notification = fn(rbd, "rbd_set_image_notification", c_int, p, c_int, c_int)
        self.poll_io_events = fn(rbd, "rbd_poll_io_events", c_int, p, p, c_int)
        self.aio_create_completion = fn(rbd, "rbd_aio_create_completion", c_int, p, p, POINTER(p))
        self.aio_release = fn(rbd, "rbd_aio_release", None, p)
        self.aio_get_return_value = fn(rbd, "rbd_aio_get_return_value", c_ssize_t, p)
        self.aio_get_arg = fn(rbd, "rbd_aio_get_arg", p, p)
        self.aio_read2 = fn(rbd, "rbd_aio_read2", c_int, p, c_uint64, c_size_t, p, p, c_int)
        self.aio_write2 = fn(rbd, "rbd_aio_write2", c_int, p, c_uint64, c_size_t, p, p, c_int)
        self.aio_discard = fn(rbd, "rbd_aio_discard", c_int, p, c_uint64, c_uint64, p)
        self.aio_flush = fn(rbd, "rbd_aio_flush", c_int, p, p)


_api = _Api(_rados, _rbd) if _rados is not None and _rbd is not None else None


def native_addresses() -> tuple[int, ...]:
    """The librbd functions restore_core.stores._rbdaio calls, by address
    (it is not linked against librbd), in the order it takes them."""
    assert _api is not None
    fns = (_api.aio_create_completion, _api.aio_read2, _api.aio_write2, _api.aio_discard,
           _api.aio_flush, _api.aio_release, _api.aio_get_return_value)
    return tuple(ctypes.cast(f, c_void_p).value or 0 for f in fns)


def _check(r: int, what: str) -> int:
    if r < 0:
        raise RbdError(-r, what)
    return r


class Cluster:
    """A connection (rados_t) and one pool's I/O context."""

    def __init__(self, conf: str, client_id: str) -> None:
        assert _api is not None
        self._h = c_void_p()
        self.ioctx = c_void_p()
        _check(_api.rados_create(byref(self._h), client_id.encode()), "cannot create a client")
        try:
            _check(_api.rados_conf_read_file(self._h, conf.encode()), f"cannot read {conf}")
        except RbdError:
            self.shutdown()
            raise

    def conf_set(self, key: str, value: str) -> None:
        _check(_api.rados_conf_set(self._h, key.encode(), value.encode()), f"conf {key}")

    def conf_get(self, key: str) -> str:
        buf = ctypes.create_string_buffer(256)
        _check(_api.rados_conf_get(self._h, key.encode(), buf, len(buf)), f"conf {key}")
        return buf.value.decode()

    def connect(self) -> None:
        _check(_api.rados_connect(self._h), "connect")

    def open_pool(self, pool: str) -> None:
        _check(_api.rados_ioctx_create(self._h, pool.encode(), byref(self.ioctx)),
               f"pool {pool}")

    def create_image(self, name: str, size: int, features: int) -> None:
        order = c_int(0)
        _check(_api.create2(self.ioctx, name.encode(), size, features, byref(order)),
               f"create {name}")

    def remove_image(self, name: str) -> None:
        _check(_api.remove(self.ioctx, name.encode()), f"remove {name}")

    def shutdown(self) -> None:
        if self.ioctx:
            _api.rados_ioctx_destroy(self.ioctx)
            self.ioctx = c_void_p()
        if self._h:
            _api.rados_shutdown(self._h)
            self._h = c_void_p()


class Image:
    """An open image (rbd_image_t). Its aio completions are polled
    (``notify_completions``, then each bumps ``eventfd`` and is taken by
    ``poll``) or, from the C submitter, come back through its callback,
    which bumps the same ``eventfd``."""

    def __init__(self, cluster: Cluster, name: str) -> None:
        assert _api is not None
        self._h = c_void_p()
        _check(_api.open(cluster.ioctx, name.encode(), byref(self._h), None), f"open {name}")
        self.eventfd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._polled = (c_void_p * POLL_BATCH)()
        # completions of aio started / taken by poll (and released): each
        # counter is written by one thread only (the submitter, the loop)
        self.started = 0
        self.taken = 0

    def notify_completions(self) -> None:
        """Have librbd queue every completion of this image's aio for
        ``poll`` and bump ``eventfd`` for each (the ctypes submitter; the C
        one takes its completions through a callback instead)."""
        _check(_api.set_image_notification(self._h, self.eventfd, _EVENT_TYPE_EVENTFD),
               "completion notification")

    @property
    def handle(self) -> int:
        """The rbd_image_t (for restore_core.stores._rbdaio)."""
        return self._h.value or 0

    # -- management (blocking calls) ------------------------------------------------
    def size(self) -> int:
        v = c_uint64()
        _check(_api.get_size(self._h, byref(v)), "size")
        return v.value

    def features(self) -> int:
        v = c_uint64()
        _check(_api.get_features(self._h, byref(v)), "features")
        return v.value

    def resize(self, size: int) -> None:
        _check(_api.resize(self._h, size), "resize")

    def lock_acquire(self) -> None:
        _check(_api.lock_acquire(self._h, LOCK_MODE_EXCLUSIVE), "lock")

    def lock_release(self) -> None:
        _check(_api.lock_release(self._h), "unlock")

    def lock_break(self, owner: str) -> None:
        _check(_api.lock_break(self._h, LOCK_MODE_EXCLUSIVE, owner.encode()), "break lock")

    def lock_owners(self) -> list[str]:
        mode = c_int()
        n = c_size_t(8)
        while True:
            owners = (c_char_p * n.value)()
            r = _api.lock_get_owners(self._h, byref(mode), owners, byref(n))
            if r != -errno.ERANGE:
                break
        if r == -errno.ENOENT:          # nobody holds it
            return []
        _check(r, "lock owners")
        out = [owners[i].decode() for i in range(n.value)]
        _api.lock_get_owners_cleanup(owners, n.value)
        return out

    def mapped(self, offset: int, length: int) -> list[tuple[int, int]]:
        """Extents holding data (diff against nothing: the object map when
        the image has fast-diff)."""
        return [(off, n) for off, n, exists in self._diff(None, offset, length) if exists]

    def changed_since(self, snap: str, offset: int, length: int) -> list[tuple[int, int]]:
        """Extents written or discarded since snapshot ``snap``, exactly
        (per object, from the OSDs' clone overlap: not whole objects)."""
        return [(off, n) for off, n, _ in self._diff(snap, offset, length)]

    def _diff(self, snap: str | None, offset: int, length: int) -> list[tuple[int, int, int]]:
        out: list[tuple[int, int, int]] = []

        def each(off: int, n: int, exists: int, _arg: object) -> int:
            out.append((off, n, exists))
            return 0
        _check(_api.diff_iterate2(self._h, None if snap is None else snap.encode(), offset,
                                  length, 1, 0, _DIFF_CB(each), None), "diff")
        return out

    def snap_create(self, name: str) -> int:
        """Make snapshot ``name``; returns its id."""
        _check(_api.snap_create2(self._h, name.encode(), SNAP_CREATE_SKIP_QUIESCE,
                                 _NO_PROGRESS, None), f"snapshot {name}")
        return self.snap_id(name)

    def snap_id(self, name: str) -> int:
        v = c_uint64()
        _check(_api.snap_get_id(self._h, name.encode(), byref(v)), f"snapshot {name}")
        return v.value

    def snap_remove(self, name: str) -> None:
        _check(_api.snap_remove(self._h, name.encode()), f"remove snapshot {name}")

    def snaps(self) -> list[tuple[str, int]]:
        """(name, id) of every snapshot of the image."""
        n = c_int(16)
        while True:
            infos = (_SnapInfo * n.value)()
            r = _api.snap_list(self._h, infos, byref(n))
            if r != -errno.ERANGE:
                break
        _check(r, "list snapshots")
        out = [(infos[i].name.decode(), infos[i].id) for i in range(r)]
        _api.snap_list_end(infos)
        return out

    # -- aio: ``token`` (an int > 0) comes back from poll with the result -------------
    def _completion(self, token: int) -> c_void_p:
        comp = c_void_p()
        _check(_api.aio_create_completion(token, None, byref(comp)), "completion")
        return comp

    def _start(self, r: int, comp: c_void_p, what: str) -> None:
        if r < 0:
            _api.aio_release(comp)
            raise RbdError(-r, what)
        self.started += 1

    def aio_read(self, offset: int, length: int, address: int, token: int) -> None:
        comp = self._completion(token)
        self._start(_api.aio_read2(self._h, offset, length, address, comp, 0), comp, "read")

    def aio_write(self, offset: int, length: int, address: int, token: int) -> None:
        comp = self._completion(token)
        self._start(_api.aio_write2(self._h, offset, length, address, comp, 0), comp, "write")

    def aio_discard(self, offset: int, length: int, token: int) -> None:
        comp = self._completion(token)
        self._start(_api.aio_discard(self._h, offset, length, comp), comp, "discard")

    def aio_flush(self, token: int) -> None:
        comp = self._completion(token)
        self._start(_api.aio_flush(self._h, comp), comp, "flush")

    def poll(self) -> list[tuple[int, int]]:
        """(token, return value) of every completion queued so far; clears
        the eventfd first, so a completion queued meanwhile wakes it again."""
        try:
            os.eventfd_read(self.eventfd)
        except BlockingIOError:
            pass
        out: list[tuple[int, int]] = []
        comps = self._polled
        while True:
            n = _api.poll_io_events(self._h, comps, POLL_BATCH)
            for i in range(n):
                c = comps[i]
                out.append((_api.aio_get_arg(c), _api.aio_get_return_value(c)))
                _api.aio_release(c)
            self.taken += n
            if n < POLL_BATCH:
                return out

    def close(self) -> None:
        """Waits for the aio in flight (librbd does), then closes."""
        if self._h:
            r = _api.close(self._h)
            self._h = c_void_p()
            os.close(self.eventfd)
            _check(r, "close")


def buffer_address(buf: object, writable: bool) -> tuple[int, object]:
    """The address of a buffer's bytes and the object that keeps it valid
    (hold it until the aio completes). Read-only memoryviews are copied.

    Once per I/O, so kept cheap: a ctypes view of the buffer's first byte
    pins the whole buffer (it holds an export: a bytearray under it can
    neither be freed nor resized) at half the cost of an array type of its
    length, and bytes convert straight to their address."""
    if isinstance(buf, bytes) and not writable:
        return ctypes.cast(buf, c_void_p).value or 0, buf
    try:
        first = _char_from_buffer(buf)
    except TypeError:                                            # read-only
        if writable:
            raise
        copy = bytes(buf)                                        # type: ignore[call-overload]
        return ctypes.cast(copy, c_void_p).value or 0, copy
    return ctypes.addressof(first), first


_char_from_buffer = ctypes.c_char.from_buffer
