"""Shared set-up for engine tests: an engine over RAM stores."""
from __future__ import annotations

import os
import random

from restore_core.blockstore import MemoryBlockStore
from restore_core.engine import Engine
from restore_core.metadata import MemoryMetadataStore
from restore_core.undo import MemoryUndoImages

ES = 4096


class Rig:
    """An engine with one source and one clone in RAM; can 'reboot'."""

    def __init__(self, nextents: int = 16, seed: int = 0, clones: int = 1) -> None:
        self.size = nextents * ES
        self.meta = MemoryMetadataStore()
        rnd = random.Random(seed)
        self.src = MemoryBlockStore(self.size, "src")
        self.src.current[:] = rnd.randbytes(self.size)
        self.src.durable[:] = self.src.current
        self.clones = [MemoryBlockStore(self.size, f"cln{i}") for i in range(clones)]
        self.undo_images = MemoryUndoImages()     # outlive reboots, like files
        self.engine: Engine | None = None

    async def boot(self) -> Engine:
        eng = Engine(self.meta, self.undo_images)
        self.sio = eng.add_volume("src", self.src)
        self.cios = [eng.add_volume(c.name, c) for c in self.clones]
        await eng.start()
        self.engine = eng
        return eng

    @property
    def cln(self) -> MemoryBlockStore:
        return self.clones[0]

    async def fractured_pair(self, clone: int = 0):
        eng = self.engine
        p = await eng.create_pair("src", self.clones[clone].name, extent_size=ES)
        await eng.wait_job(p.id, 30)
        await eng.fracture(p.id)
        return p


def pattern(tag: int, n: int) -> bytes:
    return bytes([tag & 0xFF]) * n
