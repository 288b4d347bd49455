"""Group commit flushes only what a commit covers.

A host write's map bit needs no store flush (the bit is durable before the
data is written); a copy's done bit needs the copied data durable first.
So a host write must not wait behind the copier's flush.
"""
import asyncio

from restore_core.blockstore import MemoryBlockStore

from .util import ES, Rig, pattern


class StuckFlushStore(MemoryBlockStore):
    """A RAM store whose flush hangs while ``stuck`` is clear."""

    def __init__(self, size: int, name: str) -> None:
        super().__init__(size, name)
        self.stuck = asyncio.Event()
        self.stuck.set()
        self.waiting = asyncio.Event()     # a flush is hanging right now

    async def flush(self) -> None:
        if not self.stuck.is_set():
            self.waiting.set()
            await self.stuck.wait()
        await super().flush()


async def restore_with_stuck_flush():
    """A protected restore of extents 0..7 of 16 whose copier copied them
    all and now hangs in the flush that would make them durable."""
    r = Rig(16)
    stuck = StuckFlushStore(r.size, "cln0")
    r.clones[0] = stuck
    eng = await r.boot()
    p = await r.fractured_pair()
    for e in range(8):                          # extents 0..7 differ from the clone
        await r.sio.write(e * ES, pattern(0xA0 + e, ES))
    stuck.stuck.clear()
    await eng.restore(p.id)
    await asyncio.wait_for(stuck.waiting.wait(), 5)
    return r, stuck, eng, p


def test_host_mark_commits_while_the_copiers_flush_hangs():
    async def go():
        r, stuck, eng, p = await restore_with_stuck_flush()
        assert p.maps.todo.count() == 0                 # copied, but the data is not durable
        # extent 12 is restored already: its write only needs its mark durable
        await asyncio.wait_for(r.sio.write(12 * ES, pattern(0x55, 512)), 2)
        snap = r.meta.load()
        assert snap.maps[f"{p.id}/marks"], "the host mark is durable"
        assert not snap.maps.get(f"{p.id}/done"), "done bits were committed before their data"
        stuck.stuck.set()
        await eng.wait_job(p.id, 10)
        assert p.maps.delta.set_in(0, 16) == [12]
        assert r.src.current[:8 * ES] == r.cln.current[:8 * ES]
        await eng.close()
    asyncio.run(go())


def test_mark_on_a_copied_extent_waits_for_the_copy_to_be_durable():
    """A protected mark says "never copy here again": the copy it keeps
    must be durable before it is, or a power cut leaves an extent that is
    neither restored nor host-written."""
    async def go():
        r, stuck, eng, p = await restore_with_stuck_flush()
        w = asyncio.ensure_future(r.sio.write(3 * ES, pattern(0x55, 512)))
        await asyncio.sleep(0.2)
        assert not w.done(), "marked extent 3 before its copy was durable"
        stuck.stuck.set()
        await asyncio.wait_for(w, 5)
        await eng.wait_job(p.id, 10)
        assert p.maps.delta.set_in(0, 16) == [3]
        await eng.close()
    asyncio.run(go())
