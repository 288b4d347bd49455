"""Leave to serve a LU's host I/O straight from its store outside the event loop.

The native TCMU ring loop (target/tcmu/native_device.py) answers READs and non-FUA
WRITEs itself, with preadv/pwritev on the store's descriptor, from its own
thread. Whether that is allowed is the LunIO's routing decision -- the one
place that knows -- taken for the whole LU: every range goes straight to the
store right now (no pair tracks the volume, nothing blocks the direct path).
"""
from __future__ import annotations

from typing import Callable

from .blockstore import BlockStore


class DirectLease:
    """Valid while ``valid()`` says so; once it is False the holder stops
    serving and calls ``release()``. A volume's lease holds its I/O gate
    entered, so a state change (which closes the gate, and that makes
    ``valid()`` False) waits until the holder has stopped. The LunIO calls
    ``changed()`` (on the loop) whenever ``valid()`` may have turned False --
    the gate closing, a routing change -- and that calls the holder's
    ``on_change``, so the holder need not poll often: a state change waits
    for one turn of the loop, not for the holder's next poll."""

    __slots__ = ("store", "_still", "_leave", "_released", "on_change")

    def __init__(self, store: BlockStore, still: Callable[[], bool],
                 leave: Callable[[], None] | None = None) -> None:
        self.store = store
        self._still = still
        self._leave = leave
        self._released = False
        #: the holder's: re-check valid() soon (must not block: it runs
        #: inside the state change that calls it)
        self.on_change: Callable[[], None] | None = None

    def valid(self) -> bool:
        return not self._released and self._still()

    def changed(self) -> None:
        if not self._released and self.on_change is not None:
            self.on_change()

    def release(self) -> None:
        if self._released:
            return
        self._released = True
        if self._leave is not None:
            self._leave()
