"""A flood of out-of-window CmdSNs gives a few log lines with counts, not one
line per PDU (issue 10 item 13)."""
from __future__ import annotations

import asyncio
import logging
import re

from target.iscsi import pdu as P
from target.iscsi import session as session_mod
from target.iscsi.cmdsn import sn_add
from target.logsafe import RateLimitedLog

from .test_live import logged_in, run, serving

FLOOD = 20000
INTERVAL = 0.5


def flood_pdus(first_cmdsn: int, exp_statsn: int) -> bytes:
    """FLOOD non-immediate NOP-Outs whose CmdSN is far beyond the window."""
    out = bytearray()
    for n in range(FLOOD):
        bhs = P.build_bhs(P.OP_NOP_OUT, P.FLAG_FINAL, lun=0, itt=0x1000 + n,
                          fields={20: P.ALL_ONES, 24: sn_add(first_cmdsn, 100000 + n),
                                  28: exp_statsn})
        out += bhs
    return bytes(out)


def counted(messages: list[str]) -> int:
    """Events the lines stand for: 1 each, plus their "(and N more ...)"."""
    total = 0
    for m in messages:
        more = re.search(r"\(and ([\d,]+) more in the last", m)
        total += 1 + (int(more.group(1).replace(",", "")) if more else 0)
    return total


def test_out_of_window_cmdsn_flood_logs_a_few_lines_with_counts(caplog, monkeypatch):
    monkeypatch.setattr(session_mod, "ratelog", RateLimitedLog(session_mod.log, interval=INTERVAL))
    caplog.set_level(logging.INFO, "target.iscsi")

    async def main():
        async with serving() as (srv, _):
            i = await logged_in(srv)
            t0 = asyncio.get_running_loop().time()
            i.send_raw(flood_pdus(i.cmdsn, i.exp_statsn))
            # an immediate NOP is answered after every PDU sent before it
            assert (await i.nop(b"after")).data == b"after"
            elapsed = asyncio.get_running_loop().time() - t0
            await asyncio.sleep(INTERVAL * 1.5)              # let the last summary out
            await i.close()
            return elapsed
    elapsed = run(main())
    msgs = [r.getMessage() for r in caplog.records if "ignored" in r.getMessage()]
    assert counted(msgs) == FLOOD                        # nothing lost from the count
    assert len(msgs) <= 2 + 2 * elapsed / INTERVAL, msgs  # a line per interval, not per PDU
    assert any("more in the last 0.5 s" in m for m in msgs)
