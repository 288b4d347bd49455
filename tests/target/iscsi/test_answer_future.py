"""A Deferred SCSI answer (ScsiDevice's answer to a READ in flight in its
store, an RBD image's): the session answers it from its future's
done-callback, no coroutine, with the same outcomes as the
coroutine path -- the data, TASK ABORTED or nothing for an aborted one, the
command's memory charge given back either way."""
from __future__ import annotations

import asyncio

from target.iscsi import pdu as P
from target.scsi.api import GOOD, Deferred, ScsiCommand, ScsiResponse

from .fake_scsi import FakeScsiTarget, MemLun
from .test_live import logged_in, run, serving


class FutureReads(FakeScsiTarget):
    """READ(16)s are answered when futures the test settles are done."""

    def __init__(self) -> None:
        super().__init__({0: MemLun(1 << 20)})
        self.answers: list[tuple[asyncio.Future, ScsiCommand]] = []

    def submit(self, cmd: ScsiCommand):
        if cmd.cdb[0] != 0x88:
            return self.execute(cmd)
        done = asyncio.get_running_loop().create_future()
        self.answers.append((done, cmd))
        return Deferred(done, lambda f: ScsiResponse(GOOD, data_in=b"\x5a" * cmd.expected_in))

    def settle(self) -> None:
        for done, cmd in self.answers:
            if not done.done():
                done.set_result(None)
        self.answers.clear()


async def _until(cond, what: str) -> None:
    for _ in range(200):
        if cond():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}")


async def _all_given_back(srv) -> None:
    """Every command ended: its memory charge given back, none in flight."""
    await _until(lambda: srv.memory.stats()["used"] == 0, "the charges given back")
    assert srv.stats()["in_flight"] == 0


def test_an_answer_future_is_sent_when_it_settles():
    async def main():
        fake = FutureReads()
        async with serving(fake=fake) as (srv, _):
            i = await logged_in(srv)
            reads = [asyncio.ensure_future(i.read(0, n, 8)) for n in range(4)]
            await _until(lambda: len(fake.answers) == 4, "4 reads")
            assert not any(r.done() for r in reads)
            fake.settle()
            assert await asyncio.wait_for(asyncio.gather(*reads), 5) == [b"\x5a" * 4096] * 4
            await _all_given_back(srv)
            await i.close()
    run(main())


def test_an_aborted_answer_future_ends_the_task_and_nothing_is_sent_later():
    async def main():
        fake = FutureReads()
        async with serving(fake=fake) as (srv, _):
            i = await logged_in(srv)
            itt = i.itt
            read = asyncio.ensure_future(i.read(0, 0, 8))
            await _until(lambda: fake.answers, "the read")
            assert await i.tmf(P.TMF_ABORT_TASK, 0, ref_itt=itt + 1) == P.TMF_RSP_COMPLETE
            assert fake.answers[0][0].cancelled()
            fake.settle()                                  # the store finishes: nobody answers
            done, _ = await asyncio.wait([read], timeout=0.3)
            assert not done                                # no response for an aborted task
            read.cancel()
            await _all_given_back(srv)
            # a LUN reset aborts another session's read with TASK ABORTED
            j = await logged_in(srv)
            other = asyncio.ensure_future(j.scsi(0, bytes([0x88]) + bytes(9) + (1).to_bytes(4, "big")
                                                 + bytes(2), read_len=512))
            await _until(lambda: fake.answers, "the other read")
            assert await i.tmf(P.TMF_LUN_RESET, 0) == P.TMF_RSP_COMPLETE
            assert (await asyncio.wait_for(other, 5)).status == 0x40     # TASK ABORTED
            fake.settle()
            await _all_given_back(srv)
            again = asyncio.ensure_future(i.read(0, 0, 1))        # the session carries on
            await _until(lambda: fake.answers, "the next read")
            fake.settle()
            assert await asyncio.wait_for(again, 5) == b"\x5a" * 512
            await i.close()
            await j.close()
    run(main())


def test_an_abort_between_the_futures_end_and_its_answer_still_answers_task_aborted():
    """The store's future is done, its callback not yet run, when a LUN
    reset from another session aborts the command: it gets TASK ABORTED,
    as a Task cancelled there would have sent, not silence."""
    async def main():
        fake = FutureReads()
        async with serving(fake=fake) as (srv, _):
            i = await logged_in(srv)
            read = asyncio.ensure_future(i.scsi(0, bytes([0x88]) + bytes(9) + (1).to_bytes(4, "big")
                                                + bytes(2), read_len=512))
            await _until(lambda: fake.answers, "the read")
            session = next(s for s in srv.sessions.values() if s.tasks)
            tasks = list(session.tasks.values())
            abort = session.abort_tasks(tasks, notify=True)
            fake.settle()                       # done; its callback waits for the loop
            await abort
            assert (await asyncio.wait_for(read, 5)).status == 0x40     # TASK ABORTED
            await _all_given_back(srv)
            await i.close()
    run(main())
