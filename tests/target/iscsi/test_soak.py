"""Longer soak (marked slow): many sessions doing verified random I/O while
others abort tasks, reset LUNs, get reinstated or vanish mid-command."""
from __future__ import annotations

import asyncio
import logging
import os
import random

import pytest

from target.iscsi import IscsiServer, IscsiTargetConfig
from target.iscsi import pdu as P

from .fake_scsi import FakeScsiTarget, MemLun
from .initiator import Initiator, InitiatorError

IQN = "iqn.2025-01.org.test:soak"
BLOCKS_PER_WORKER = 256


class SlowLun(MemLun):
    async def read(self, offset, length):
        await asyncio.sleep(random.random() * 0.002)
        return await super().read(offset, length)

    async def write(self, offset, data, fua=False):
        await asyncio.sleep(random.random() * 0.002)
        await super().write(offset, data, fua)


@pytest.mark.slow
def test_soak_mixed_sessions(caplog):
    seconds = float(os.environ.get("ISCSI_SOAK_SECONDS", "8"))

    async def main():
        fake = FakeScsiTarget({0: SlowLun(64 << 20)})
        srv = IscsiServer([IscsiTargetConfig(IQN, fake)], [("127.0.0.1", 0)], nop_interval=1,
                          nop_timeout=5)
        await srv.start()
        host, port = srv.addresses[0]
        loop = asyncio.get_running_loop()
        deadline = loop.time() + seconds
        stats = {"io": 0, "reconnects": 0}

        async def verified_worker(n):
            rnd = random.Random(n)
            shadow = {}
            ini = Initiator(host, port, name=f"iqn.2025-01.org.test:worker{n}")
            await ini.login(IQN, mrdsl=rnd.choice([4096, 8192, 65536, 262144]),
                            immediate_data=rnd.random() < 0.5, initial_r2t=rnd.random() < 0.5,
                            first_burst=rnd.choice([8192, 65536]), max_burst=rnd.choice([16384, 262144]),
                            header_digest=rnd.choice(["None", "CRC32C"]),
                            data_digest=rnd.choice(["None", "CRC32C"]))
            base = n * BLOCKS_PER_WORKER
            while loop.time() < deadline:
                lba = rnd.randrange(0, BLOCKS_PER_WORKER - 64)
                count = rnd.randrange(1, 64)
                if rnd.random() < 0.5:
                    data = os.urandom(count * 512)
                    await ini.write(0, base + lba, data)
                    for k in range(count):
                        shadow[lba + k] = data[k * 512:(k + 1) * 512]
                else:
                    got = await ini.read(0, base + lba, count)
                    for k in range(count):
                        assert got[k * 512:(k + 1) * 512] == shadow.get(lba + k, bytes(512))
                stats["io"] += 1
            assert await ini.logout() == 0
            await ini.close()

        async def chaos_worker(n):
            rnd = random.Random(1000 + n)
            isid = bytes.fromhex("4000013700") + bytes([n])
            while loop.time() < deadline:
                ini = Initiator(host, port, name="iqn.2025-01.org.test:chaos", isid=isid)
                try:
                    await ini.login(IQN)
                    stats["reconnects"] += 1
                    reads = [asyncio.ensure_future(ini.read(0, 60000 + rnd.randrange(100), 8))
                             for _ in range(rnd.randrange(1, 8))]
                    await asyncio.sleep(rnd.random() * 0.01)
                    what = rnd.random()
                    if what < 0.3:
                        await ini.tmf(P.TMF_ABORT_TASK, 0, ref_itt=ini.itt)
                    elif what < 0.4:
                        await ini.tmf(P.TMF_ABORT_TASK_SET, 0)
                    elif what < 0.5:
                        ini.send_raw(os.urandom(rnd.randrange(1, 200)))
                    # else: vanish mid-command, or be reinstated by the next login
                    await asyncio.sleep(rnd.random() * 0.02)
                    for r in reads:
                        r.cancel()
                    await asyncio.gather(*reads, return_exceptions=True)
                except (InitiatorError, ConnectionError, asyncio.TimeoutError, asyncio.IncompleteReadError):
                    pass
                finally:
                    if rnd.random() < 0.5:
                        await ini.close()

        await asyncio.gather(*(verified_worker(n) for n in range(6)), *(chaos_worker(n) for n in range(3)))
        assert stats["io"] > 0 and stats["reconnects"] > 0
        await srv.stop(timeout=10)
        assert srv.stats()["connections"] == 0

    asyncio.run(asyncio.wait_for(main(), seconds + 120))
    errors = [r.getMessage() for r in caplog.records
              if r.levelno >= logging.ERROR and r.name.startswith("target.iscsi")]
    assert not errors
