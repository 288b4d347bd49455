"""Consistency groups: pairs fractured and restored at one instant.

A database spread over several LUs (data, log) needs clones of all of them
from the same moment: fractured one at a time, the log's clone can hold a
commit whose data pages the data LU's clone never saw. A group is a name and
a set of pairs (a pair belongs to at most one group). A group fracture or
restore start

  1. closes the I/O gates of every member volume, in name order (two group
     operations never wait on each other's gates; they are serialized by
     the locks anyway), letting the writes in flight finish;
  2. changes every member's state in memory with no await in between, so
     all the records and maps land in ONE committer batch: one metadata
     transaction, all members changed or none, whatever moment a crash hits;
  3. commits, then opens the gates again.

No host write can therefore be acknowledged on one member after the instant
while a write to another member issued before it is missing from the clones.

While a group owns a pair, the pair's own fracture, sync, restore, pause,
resume and delete are refused (Engine.owner_of); the group's operations run
them with the group's name in ``_acting`` (a context variable: only the
task doing the group operation passes; tasks it starts, such as copiers,
inherit it, and none of them calls a refused operation). ``group remove``
frees a pair.

Membership lives in its own store (GroupStore): it changes rarely and never
needs to be atomic with a pair's state, only durable.
"""
from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
from abc import ABC, abstractmethod
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Iterable, Iterator

from .engine import NAME_HELP, Engine, EngineError, valid_volume_name
from .extentmap import ExtentMap
from .metadata import DAMAGED_FIELD
from .pair import Pair, PairState

log = logging.getLogger(__name__)

# The group whose operation the current task is running: its members' own
# operations are allowed to it (and to no other task).
_acting: contextvars.ContextVar[str | None] = contextvars.ContextVar("acting_group",
                                                                     default=None)


class GroupStore(ABC):
    """Where group records persist. ``load`` returns name -> record
    ({"name", "pairs"}, plus DAMAGED_FIELD when it failed its checksum);
    ``put`` writes one record (None deletes), durable when it returns."""

    inline = False      # True: put never blocks (RAM), call it on the loop

    @abstractmethod
    def load(self) -> dict[str, dict[str, Any]]: ...

    @abstractmethod
    def put(self, name: str, record: dict[str, Any] | None) -> None: ...


class MemoryGroupStore(GroupStore):
    """For tests and the crash models: survives a simulated power cut."""

    inline = True

    def __init__(self) -> None:
        self.records: dict[str, dict[str, Any]] = {}

    def load(self) -> dict[str, dict[str, Any]]:
        return {n: dict(r, pairs=list(r["pairs"])) for n, r in self.records.items()}

    def put(self, name: str, record: dict[str, Any] | None) -> None:
        if record is None:
            self.records.pop(name, None)
        else:
            self.records[name] = dict(record, pairs=list(record["pairs"]))


@dataclass
class Group:
    name: str
    members: list[str] = field(default_factory=list)      # pair ids, in the order added
    # Why the stored record cannot be trusted (failed its checksum): the
    # group then only allows show and delete.
    damaged: str | None = None

    def to_record(self) -> dict[str, Any]:
        return {"name": self.name, "pairs": list(self.members)}


class Groups:
    def __init__(self, engine: Engine, store: GroupStore) -> None:
        self.engine = engine
        self.store = store
        self.groups: dict[str, Group] = {}
        self._owner: dict[str, str] = {}        # pair id -> group name
        # One group operation or membership change at a time; taken before
        # the engine's lock, never after it.
        self._lock = asyncio.Lock()
        engine.owner_of = self.owner_of

    # -- loading and ownership ---------------------------------------------------
    async def load(self) -> None:
        """Read the stored groups (after the engine has loaded its pairs)."""
        records = await self._in_store(self.store.load)
        for name, rec in sorted(records.items()):
            try:
                members = [str(p) for p in rec["pairs"]]
            except (KeyError, TypeError) as e:
                log.error("group %s: its record cannot be read (%s); the group is dropped and "
                          "its pairs are free: create it again", name, e)
                continue
            g = Group(name, [], rec.get(DAMAGED_FIELD))
            for pid in members:
                if pid in self._owner:
                    log.error("group %s: pair %s is already in group %s; left out", name, pid,
                              self._owner[pid])
                    continue
                g.members.append(pid)
                self._owner[pid] = name
            if g.damaged:
                log.error("group %s: %s; it only allows show and delete: delete it and create "
                          "it again", name, g.damaged)
            self.groups[name] = g

    def owner_of(self, pair_id: str) -> str | None:
        g = self._owner.get(pair_id)
        return None if g is None or _acting.get() == g else g

    def group_of(self, pair_id: str) -> str | None:
        """The group holding the pair, whoever asks (for display)."""
        return self._owner.get(pair_id)

    # -- membership ------------------------------------------------------------------
    async def create(self, name: str, pairs: Iterable[str] = ()) -> Group:
        async with self._lock:
            if not valid_volume_name(name):
                raise EngineError(f"invalid group name {name!r}: {NAME_HELP}")
            if name in self.groups:
                raise EngineError(f"group {name} already exists")
            members = self._free_pairs(name, pairs)
            g = Group(name, members)
            await self._persist(g)
            self.groups[name] = g
            for pid in members:
                self._owner[pid] = name
            return g

    async def add(self, name: str, pairs: Iterable[str]) -> Group:
        async with self._lock:
            g = self._group(name, intact=True)
            members = self._free_pairs(name, pairs)
            if not members:
                raise EngineError("name at least one pair to add")
            new = Group(name, g.members + members)
            await self._persist(new)
            g.members = new.members
            for pid in members:
                self._owner[pid] = name
            return g

    async def remove(self, name: str, pairs: Iterable[str]) -> Group:
        """Free pairs from the group (the one member operation a group allows)."""
        async with self._lock:
            g = self._group(name, intact=True)
            gone = _unique(pairs)
            if not gone:
                raise EngineError("name at least one pair to remove")
            for pid in gone:
                if pid not in g.members:
                    raise EngineError(f"pair {pid} is not in group {name}")
            new = Group(name, [p for p in g.members if p not in gone])
            await self._persist(new)
            g.members = new.members
            for pid in gone:
                self._owner.pop(pid, None)
            return g

    async def delete(self, name: str) -> None:
        """Forget the group; its pairs stay as they are, free."""
        async with self._lock:
            g = self._group(name)
            await self._in_store(self.store.put, name, None)
            del self.groups[name]
            for pid in g.members:
                self._owner.pop(pid, None)

    def _free_pairs(self, name: str, pairs: Iterable[str]) -> list[str]:
        members = _unique(pairs)
        for pid in members:
            self.engine.pair(pid)
            owner = self._owner.get(pid)
            if owner == name:
                raise EngineError(f"pair {pid} is already in group {name}")
            if owner is not None:
                raise EngineError(f"pair {pid} is in group {owner}; a pair belongs to at most "
                                  f"one group (remove it from {owner} first)")
        return members

    async def _persist(self, g: Group) -> None:
        await self._in_store(self.store.put, g.name, g.to_record())

    async def _in_store(self, fn, *args: Any) -> Any:
        if self.store.inline:
            return fn(*args)
        return await asyncio.get_running_loop().run_in_executor(None, fn, *args)

    # -- reading ---------------------------------------------------------------------
    def _group(self, name: str, *, intact: bool = False) -> Group:
        try:
            g = self.groups[name]
        except KeyError:
            raise EngineError(f"no group {name!r}") from None
        if intact and g.damaged:
            raise EngineError(f"group {name}: {g.damaged}; delete it and create it again")
        return g

    def _pairs(self, name: str) -> tuple[Group, list[Pair]]:
        """The group and its member pairs, for an operation on all of them."""
        g = self._group(name, intact=True)
        if not g.members:
            raise EngineError(f"group {name} has no pairs")
        pairs = []
        for pid in g.members:
            if pid not in self.engine.pairs:
                raise EngineError(f"pair {pid} of group {name} does not exist; remove it from "
                                  f"the group ('liverestore group remove {name} {pid}')")
            pairs.append(self.engine.pairs[pid])
        return g, pairs

    def show(self, name: str) -> dict[str, Any]:
        g = self._group(name)
        members = []
        for pid in g.members:
            pair = self.engine.pairs.get(pid)
            if pair is None:
                members.append({"pair": pid, "missing": True})
            else:
                p = pair.progress()
                members.append({"pair": pid, "source": pair.source, "clone": pair.clone,
                                "state": p.state, "job": p.job, "paused": p.paused,
                                "extents_total": p.extents_total,
                                "extents_done": p.extents_done, "error": p.error,
                                "undo": p.undo})
        states = {m.get("state", "missing") for m in members}
        return {"name": g.name, "pairs": list(g.members), "members": members,
                "state": states.pop() if len(states) == 1 else ("mixed" if states else "empty"),
                "damaged": g.damaged}

    def list(self) -> list[dict[str, Any]]:
        return [self.show(n) for n in sorted(self.groups)]

    # -- one instant for every member ------------------------------------------------
    async def _gates_closed(self, stack: AsyncExitStack, pairs: list[Pair]) -> None:
        """Close the gates of every member volume in name order: the writes in
        flight finish, new ones wait until the stack unwinds."""
        names = sorted({n for p in pairs for n in (p.source, p.clone)})
        for n in names:
            await stack.enter_async_context(self.engine.volumes[n].gate.closed())

    async def _at_one_instant(self, pairs: list[Pair], stop: Callable[[Pair], Awaitable[None]],
                              change: Callable[[Pair], None],
                              after: Callable[[Pair], None]) -> None:
        """With every member's gates closed: ``stop`` each member's job,
        ``change`` each state in memory (no await in between: one batch,
        one transaction), commit, then ``after`` for each, gates still closed."""
        if not pairs:
            return
        async with AsyncExitStack() as stack:
            await self._gates_closed(stack, pairs)
            for p in pairs:
                await stop(p)
            for p in pairs:
                change(p)
            await self.engine.committer.commit()
            for p in pairs:
                after(p)

    async def fracture(self, name: str) -> Group:
        eng = self.engine
        async with self._lock, eng._lock:
            g, pairs = self._pairs(name)
            todo = [p for p in pairs if eng._needs_fracture(p)]
            differ: dict[str, ExtentMap] = {}
            marked: dict[str, dict[str, str]] = {}

            async def stop(p: Pair) -> None:
                differ[p.id] = p.maps.may_differ()     # before its copier stops
                await eng._stop_background(p)
                marked[p.id] = await eng.take_instants(p)

            def bump(p: Pair) -> None:
                eng.volumes[p.clone].generation += 1
            await self._at_one_instant(
                todo, stop, lambda p: eng._set_fractured(p, differ[p.id], marked[p.id]), bump)
            for p in todo:
                await eng._tidy_instants(p)
                eng._emit("fractured", p.id)
            return g

    async def restore(self, name: str, *, protected: bool = True, paused: bool = False,
                      keep_undo: bool = False) -> Group:
        """Every member starts restoring at one instant; with ``keep_undo``
        each gets an undo image the engine makes (see Engine.restore)."""
        eng = self.engine
        async with self._lock, eng._lock:
            g, pairs = self._pairs(name)
            sources: dict[str, str] = {}
            for p in pairs:
                eng._check_restorable(p, protected, keep_undo)
                if p.source in sources:
                    raise EngineError(f"pairs {sources[p.source]} and {p.id} of group {name} "
                                      f"restore the same volume {p.source}; remove one")
                sources[p.source] = p.id
            images: list[Pair] = []
            try:
                for p in pairs if keep_undo else ():
                    await eng._attach_undo(p, None)
                    images.append(p)
                await self._at_one_instant(
                    pairs, _nothing_to_stop, lambda p: eng._set_restoring(p, protected, paused),
                    eng._restore_started)
            except BaseException:
                for p in images:
                    if p.state is not PairState.RESTORING:
                        await eng._discard_image(p.id, eng._release_undo(p))
                raise
            for p in pairs:
                await eng._tidy_instants(p)
                eng._emit("restore-started", p.id)
            return g

    async def abort(self, name: str) -> Group:
        """Every member's keep-undo restore is undone from one instant on
        (see Engine.abort); members already aborting are left as they are."""
        eng = self.engine
        async with self._lock, eng._lock:
            g, pairs = self._pairs(name)
            todo = [p for p in pairs if eng._check_abortable(p)]
            await self._at_one_instant(todo, eng._quiesce, eng._set_aborting,
                                       eng._restore_started)
            for p in todo:
                await eng._tidy_instants(p)
                eng._emit("abort-started", p.id)
            return g

    async def commit_undo(self, name: str) -> Group:
        """Every member keeps its restore: the undo images are discarded."""
        eng = self.engine
        async with self._lock, eng._lock:
            g, pairs = self._pairs(name)
            for p in pairs:
                eng._check_committable(p)
            images = {}
            async with AsyncExitStack() as stack:
                await self._gates_closed(stack, pairs)
                for p in pairs:
                    images[p.id] = eng._drop_undo(p)
                    eng.committer.put_pair(p.id, p.to_record())
                await eng.committer.commit()
            for p in pairs:
                await eng._discard_image(p.id, images[p.id])
                eng._emit("committed", p.id)
            return g

    # -- every member in turn ----------------------------------------------------------
    async def sync(self, name: str, *, full: bool = False) -> Group:
        async with self._lock:
            g, pairs = self._pairs(name)
            for p in pairs:
                if p.to_source:
                    raise EngineError(f"pair {p.id} of group {name} is {p.state.value}; wait "
                                      "for it to end")
            with _acting_as(name):
                for p in pairs:
                    if p.state is not PairState.SYNCING:
                        await self.engine.sync(p.id, full=full)
            return g

    async def pause(self, name: str) -> Group:
        return await self._each_job(name, self.engine.pause, "running")

    async def resume(self, name: str) -> Group:
        return await self._each_job(name, self.engine.resume, "to resume")

    async def _each_job(self, name: str, op: Callable[[str], Awaitable[None]],
                        what: str) -> Group:
        """Run ``op`` on every member that has a job (a sync or restore)."""
        async with self._lock:
            g, pairs = self._pairs(name)
            jobs = [p for p in pairs if p.job is not None]
            if not jobs:
                raise EngineError(f"group {name} has no sync or restore {what}")
            with _acting_as(name):
                for p in jobs:
                    await op(p.id)
            return g

    async def wait(self, name: str, timeout: float | None = None) -> Group:
        """Until every member's job finished (or stopped: paused, failed)."""
        g, pairs = self._pairs(name)
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        for p in pairs:
            left = None if deadline is None else max(0.0, deadline - loop.time())
            try:
                await self.engine.wait_job(p.id, left)
            except EngineError:
                raise EngineError(f"group {name}: pair {p.id} still has a job running after "
                                  f"{timeout}s") from None
        return g


async def _nothing_to_stop(pair: Pair) -> None:
    """A fractured pair (a restore's start) runs no job."""


@contextlib.contextmanager
def _acting_as(name: str) -> Iterator[None]:
    """Within it, the current task may run the group's members' own operations."""
    token = _acting.set(name)
    try:
        yield
    finally:
        _acting.reset(token)


def _unique(pairs: Iterable[str]) -> list[str]:
    out: list[str] = []
    for p in pairs:
        if p not in out:
            out.append(p)
    return out
