"""The service's consistency group operations (control ops ``group.*``).

A mixin of target.service.Service, kept apart so the group front door
changes in one place; the logic is restore_core.groups. Pairs may be named
by id (the clone's name) or "source/clone", as everywhere else.
"""
from __future__ import annotations

from typing import Any

from restore_core.engine import EngineError
from restore_core.groups import Groups

from .errors import ServiceError

GROUP_OPS = {
    "group.create": "group_create", "group.add": "group_add", "group.remove": "group_remove",
    "group.delete": "group_delete", "group.list": "group_list", "group.show": "group_show",
    "group.fracture": "group_fracture", "group.sync": "group_sync",
    "group.restore": "group_restore", "group.pause": "group_pause",
    "group.resume": "group_resume", "group.wait": "group_wait",
    "group.abort": "group_abort", "group.commit": "group_commit",
}


class GroupOps:
    groups: Groups | None

    # supplied by Service (declared for the reader and type checkers)
    def _pair(self, pair: str) -> Any: ...
    def _wrap(self, e: Exception) -> ServiceError: ...

    @property
    def grp(self) -> Groups:
        assert self.groups is not None
        return self.groups

    def _pair_ids(self, pairs: list[str]) -> list[str]:
        return [self._pair(p).id for p in pairs]

    async def _group_do(self, name: str, coro) -> dict[str, Any]:
        try:
            await coro
        except (EngineError, ValueError, TypeError) as e:
            raise self._wrap(e) from e
        return self.group_show(name)

    async def group_create(self, name: str, pairs: list[str] | None = None) -> dict[str, Any]:
        ids = self._pair_ids(pairs or [])
        return await self._group_do(name, self.grp.create(name, ids))

    async def group_add(self, name: str, pairs: list[str]) -> dict[str, Any]:
        return await self._group_do(name, self.grp.add(name, self._pair_ids(pairs)))

    async def group_remove(self, name: str, pairs: list[str]) -> dict[str, Any]:
        # by id as stored: a member whose pair is gone can still be removed
        g = self.grp.groups.get(name)
        members = g.members if g is not None else []
        ids = [p if p in members else self._pair(p).id for p in pairs]
        return await self._group_do(name, self.grp.remove(name, ids))

    async def group_delete(self, name: str) -> dict[str, Any]:
        try:
            await self.grp.delete(name)
        except EngineError as e:
            raise self._wrap(e) from e
        return {"deleted": name}

    def group_list(self) -> list[dict[str, Any]]:
        return self.grp.list()

    def group_show(self, name: str) -> dict[str, Any]:
        try:
            return self.grp.show(name)
        except EngineError as e:
            raise self._wrap(e) from e

    async def group_fracture(self, name: str) -> dict[str, Any]:
        return await self._group_do(name, self.grp.fracture(name))

    async def group_sync(self, name: str, full: bool = False) -> dict[str, Any]:
        return await self._group_do(name, self.grp.sync(name, full=full))

    async def group_restore(self, name: str, protected: bool = True,
                            keep_undo: bool = False) -> dict[str, Any]:
        return await self._group_do(name, self.grp.restore(name, protected=protected,
                                                           keep_undo=keep_undo))

    async def group_abort(self, name: str) -> dict[str, Any]:
        return await self._group_do(name, self.grp.abort(name))

    async def group_commit(self, name: str) -> dict[str, Any]:
        return await self._group_do(name, self.grp.commit_undo(name))

    async def group_pause(self, name: str) -> dict[str, Any]:
        return await self._group_do(name, self.grp.pause(name))

    async def group_resume(self, name: str) -> dict[str, Any]:
        return await self._group_do(name, self.grp.resume(name))

    async def group_wait(self, name: str, timeout: float | None = None) -> dict[str, Any]:
        return await self._group_do(name, self.grp.wait(name, timeout))

    def _saved_groups(self) -> list[dict[str, Any]]:
        """For saveconfig: every intact group and its members."""
        return [{"name": g.name, "pairs": list(g.members)}
                for g in sorted(self.grp.groups.values(), key=lambda g: g.name) if not g.damaged]

    async def _restore_groups(self, saved: list[dict[str, Any]], undo: Any) -> list[str]:
        """For restoreconfig: create the groups this configuration lacks."""
        made = []
        for g in saved:
            if g["name"] in self.grp.groups:
                continue
            await self.group_create(g["name"], g.get("pairs", []))
            undo.add(f"group {g['name']}", lambda n=g["name"]: self.group_delete(n))
            made.append(g["name"])
        return made
