"""An iSCSI session that stays logged in while a test drives the CLI: the
test initiator runs in its own thread and event loop until the block ends."""
from __future__ import annotations

import asyncio
import contextlib
import threading
from typing import Iterator

from tests.target.iscsi.initiator import Initiator


@contextlib.contextmanager
def logged_in(port: int, target: str, initiator: str) -> Iterator[None]:
    ready, done = threading.Event(), threading.Event()
    failed: list[BaseException] = []

    async def hold() -> None:
        i = Initiator("127.0.0.1", port, name=initiator)
        try:
            await i.login(target)
        except BaseException as e:  # noqa: BLE001 - handed to the test thread
            failed.append(e)
            ready.set()
            return
        ready.set()
        try:
            while not done.is_set():
                await asyncio.sleep(0.05)
        finally:
            await i.close()

    t = threading.Thread(target=asyncio.run, args=(hold(),), daemon=True)
    t.start()
    assert ready.wait(30), "login did not finish"
    if failed:
        raise failed[0]
    try:
        yield
    finally:
        done.set()
        t.join(30)
