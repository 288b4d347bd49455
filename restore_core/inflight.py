"""The copy-on-demand map: extents being copied (or filled) right now.

An extent is claimed by exactly one copier at a time: the background copier,
a copy-on-demand for a host I/O, or a host write that fills a whole
unrestored extent. Host I/O that overlaps a claimed extent awaits the
claim's future (no busy waiting, no global lock): the waiter is woken when
the copy lands and then re-checks what is still to do.

A claim's future is made by its first waiter, not by the claim: the
background copier claims an extent at a time (128 per 8 MiB copy of 64 KiB
extents) and almost never has a waiter, and on Python 3.11 each future made
asks asyncio.get_running_loop(), a getpid() system call: ~10,000 a second
on the event loop while a restore ran under host load (perf trace).
"""
from __future__ import annotations

import asyncio


class InFlightMap:
    def __init__(self) -> None:
        # claimed extent -> the future its waiters wait on (None: no waiter yet)
        self._claims: dict[int, asyncio.Future[None] | None] = {}

    def __len__(self) -> int:
        return len(self._claims)

    def __contains__(self, e: int) -> bool:
        return e in self._claims

    def is_claimed(self, start: int, end: int) -> bool:
        if not self._claims:
            return False
        if end - start <= len(self._claims):
            return any(e in self._claims for e in range(start, end))
        return any(start <= e < end for e in self._claims)

    def try_claim(self, e: int) -> bool:
        if e in self._claims:
            return False
        self._claims[e] = None
        return True

    def release(self, e: int) -> None:
        fut = self._claims.pop(e, None)
        if fut is not None and not fut.done():
            fut.set_result(None)

    def release_all(self, extents) -> None:
        for e in extents:
            self.release(e)

    def _future(self, e: int) -> asyncio.Future[None]:
        """The future claimed extent ``e``'s waiters wait on (made by the first)."""
        fut = self._claims[e]
        if fut is None:
            fut = self._claims[e] = asyncio.get_running_loop().create_future()
        return fut

    async def wait(self, start: int, end: int) -> bool:
        """Wait until no extent in [start, end) is claimed.

        Returns True when it had to wait (the caller must re-check state).
        """
        waited = False
        while self._claims:
            claimed = [e for e in self._claims if start <= e < end] \
                if end - start > len(self._claims) else \
                [e for e in range(start, end) if e in self._claims]
            if not claimed:
                break
            waited = True
            futs = [self._future(e) for e in claimed]
            # shield: a cancelled waiter (aborted task) must not cancel the
            # claim's future, which other waiters and the claimer share.
            await asyncio.wait([asyncio.shield(f) for f in futs])
        return waited
