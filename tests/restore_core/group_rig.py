"""An engine with two source/clone pairs in RAM and consistency groups; can 'reboot'."""
from __future__ import annotations

import random

from restore_core.blockstore import MemoryBlockStore
from restore_core.engine import Engine
from restore_core.groups import Groups, MemoryGroupStore
from restore_core.metadata import MemoryMetadataStore
from restore_core.volume_io import VolumeIO

from .util import ES

LUS = ("a", "b")


class GroupRig:
    def __init__(self, nextents: int = 8, seed: int = 0) -> None:
        self.size = nextents * ES
        self.meta = MemoryMetadataStore()
        self.group_store = MemoryGroupStore()
        rnd = random.Random(seed)
        self.stores: dict[str, MemoryBlockStore] = {}
        for lu in LUS:
            src = MemoryBlockStore(self.size, lu)
            src.current[:] = rnd.randbytes(self.size)
            src.durable[:] = src.current
            self.stores[lu] = src
            self.stores[lu + "-clone"] = MemoryBlockStore(self.size, lu + "-clone")

    async def boot(self) -> tuple[Engine, Groups]:
        eng = Engine(self.meta)
        self.ios: dict[str, VolumeIO] = {n: eng.add_volume(n, s) for n, s in self.stores.items()}
        await eng.start()
        groups = Groups(eng, self.group_store)
        await groups.load()
        self.engine, self.groups = eng, groups
        return eng, groups

    async def synchronized_group(self, name: str = "db") -> None:
        """Both pairs created and synchronized, in group ``name``."""
        for lu in LUS:
            p = await self.engine.create_pair(lu, lu + "-clone", extent_size=ES)
            await self.engine.wait_job(p.id, 30)
        await self.groups.create(name, [lu + "-clone" for lu in LUS])

    def states(self) -> list[str]:
        return [self.engine.pair(lu + "-clone").state.value for lu in LUS]

    def power_cut(self) -> None:
        """Every write not covered by a completed flush is lost."""
        for s in self.stores.values():
            s.power_cut()
