"""A fractured pair's instants: a mark of each side's content at the moment
the pair was fractured (not when a restore ends fractured: see
Engine._job_finished), kept by the stores that can (an RBD image's
snapshot; BlockStore.mark_instant), so that a restart after a crash takes
that side's delta from what the store says changed since, exactly, instead
of widening it by whole write-intent regions (restoremaps: ``covered``).

Why it is exact: the instant is marked with both volumes' I/O gates closed
and the pair's job stopped, before the commit that makes the fracture
durable, so every write after the fracture comes after the instant. A write
to a side with an instant marks its region in ``covered`` (durable before
the write is acknowledged, as ``intent``); a write to a side without one (a
file source) marks ``intent`` and its region is widened as before.

Crash order: mark -> commit (the record names the instant) -> remove the
instants the record no longer names. A crash before the commit leaves a
snapshot no record names; a crash after it, before the removal, an old one:
both are removed at the next start (``sweep``), and by the pair's next
state change (``tidy``). An instant that cannot be marked (the cluster
refuses, the store is fenced) is logged once, with why, and the pair falls
back to widening; one that is gone at restart (an operator removed it)
widens too. Names are ``liverestore.<ns>.<pair id>``: a snapshot of any
other name is never touched.

Cost (tests/bench/rbd_snapshot.py, single-node memstore cluster, three
runs at load 0.3-4): the snapshot takes 58-61 ms, with hosts held, at each
fracture; 4 KiB random writes to the clone right after it run at 0.85-0.92
of the IOPS of an image without one (each object's first write after it is
copied at the OSD), and the snapshot holds the space of what the clone
overwrites until the next sync or restore.
"""
from __future__ import annotations

import asyncio
import logging
import re
import time
from typing import Any, Callable

from .blockstore import BlockStore, BlockStoreError

log = logging.getLogger(__name__)

INSTANTS_FIELD = "instants"
SIDES = ("source", "clone")
PREFIX = "liverestore."
#: How long a fracture waits for a snapshot, hosts held: a snapshot takes
#: about 60 ms (see above), but a cluster in trouble answers only after its
#: op timeout (25 s), and the other side's volume (a file source) would not
#: serve meanwhile. Past it the side widens; a snapshot made later anyway is
#: named by no record and removed at the pair's next change or start.
MARK_TIMEOUT_S = 5.0
_NAME = re.compile(re.escape(PREFIX) + r"[0-9]+\.(.+)")


def instants_of_record(value: Any) -> dict[str, str]:
    """A pair record's instants; anything malformed counts as none (the
    pair then widens, the safe side; the snapshots go at the next sweep)."""
    if not isinstance(value, dict):
        return {}
    return {k: t for k, t in value.items() if k in SIDES and isinstance(t, str)}


def owner(token: str) -> str | None:
    """The pair an instant's token belongs to, None if it is not ours. A
    store may add to the name after an '@' (RBD: the snapshot id), which
    no pair id contains."""
    m = _NAME.fullmatch(token.partition("@")[0])
    return m.group(1) if m else None


async def take(pair_id: str, stores: dict[str, BlockStore]) -> dict[str, str]:
    """Mark an instant on each side's store that keeps them (no I/O in
    flight: the caller holds the gates closed). A store that refuses is
    logged and left out: that side widens after a crash."""
    out: dict[str, str] = {}
    for side, store in stores.items():
        try:
            token = await asyncio.wait_for(
                store.mark_instant(f"{PREFIX}{time.time_ns()}.{pair_id}"), MARK_TIMEOUT_S)
        except (BlockStoreError, OSError, asyncio.TimeoutError) as e:
            why = str(e) if str(e) else f"the cluster did not answer within {MARK_TIMEOUT_S} s"
            log.warning("pair %s: no snapshot of its %s at this fracture (%s); after a crash "
                        "its delta there widens to whole write-intent regions", pair_id, side,
                        why)
            continue
        if token is not None:
            out[side] = token
    return out


async def changed_extents(instants: dict[str, str], stores: dict[str, BlockStore],
                          runs: list[tuple[int, int]], extent_size: int,
                          nextents: int) -> list[tuple[int, int]] | None:
    """The extent runs [a, b) within ``runs`` written on a side since its
    instant, or None if some instant cannot say (then the caller widens)."""
    if not instants:
        return None
    ranges = [(a * extent_size, (b - a) * extent_size) for a, b in runs]
    out: list[tuple[int, int]] = []
    for side, token in sorted(instants.items()):
        try:
            changed = await stores[side].changed_since(token, ranges)
        except (BlockStoreError, OSError) as e:
            log.warning("%s: what changed since snapshot %s cannot be read (%s); the delta "
                        "widens to whole write-intent regions", side, token, e)
            return None
        for off, n in changed:
            if n > 0:
                a = off // extent_size
                out.append((a, min(-(-(off + n) // extent_size), nextents)))
    return out


async def tidy(pair_id: str, instants: dict[str, str], stores: dict[str, BlockStore]) -> None:
    """After a commit: remove the pair's instants its record no longer names."""
    for side, store in stores.items():
        await _drop(store, lambda t, side=side: owner(t) == pair_id and t != instants.get(side))


async def sweep(store: BlockStore, keep: set[str]) -> None:
    """Remove every instant of ours on ``store`` that is not in ``keep`` (at
    start: what crashes left; at volume delete: everything, so the image
    the user keeps holds no snapshot of ours)."""
    await _drop(store, lambda t: owner(t) is not None and t not in keep)


async def _drop(store: BlockStore, stale: Callable[[str], bool]) -> None:
    try:
        doomed = [t for t in await store.instants(PREFIX) if stale(t)]
        for t in doomed:
            await store.drop_instant(t)
            log.info("%s: removed snapshot %s, which no pair uses any more", store.name, t)
    except (BlockStoreError, OSError) as e:
        log.warning("%s: snapshots no pair uses could not be removed now (%s); a restart "
                    "retries while the volume exists (after a volume delete: rbd snap rm)",
                    store.name, e)
