"""clip() and RateLimitedLog: what a client sends cannot make the log long."""
import asyncio
import logging

from target.logsafe import RateLimitedLog, clip


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def lines(caplog, name="test.logsafe"):
    return [r.getMessage() for r in caplog.records if r.name == name]


def test_clip_bounds_and_escapes():
    assert clip("iqn.x") == "'iqn.x'"
    long = clip("N" * 8000)
    assert len(long) < 100 and long.endswith("...(+7936 chars)")
    assert clip("a\nb\x1b[31m") == "'a\\nb\\x1b[31m'"          # one line, no terminal escapes
    assert clip("a\nb", quote=False) == "a\\nb"
    assert clip(["CHAP", "None"]) == "['CHAP', 'None']"                  # not a string: its repr


def test_one_line_per_burst_with_the_count(caplog):
    caplog.set_level(logging.INFO, "test.logsafe")
    clock = Clock()
    rl = RateLimitedLog(logging.getLogger("test.logsafe"), interval=10.0, clock=clock)
    for n in range(5000):
        rl.warning("kind", "CmdSN %d ignored", n)
        clock.t += 0.001                              # 5,000 in 5 s: one burst
    assert lines(caplog) == ["CmdSN 0 ignored"]
    clock.t += 10
    rl.warning("kind", "CmdSN %d ignored", 5000)     # the next burst reports the last one
    assert lines(caplog) == ["CmdSN 0 ignored", "CmdSN 4999 ignored (and 4,998 more in the last 10 s)",
                             "CmdSN 5000 ignored"]


def test_kinds_are_independent_and_flush_reports_open_bursts(caplog):
    caplog.set_level(logging.INFO, "test.logsafe")
    clock = Clock()
    rl = RateLimitedLog(logging.getLogger("test.logsafe"), clock=clock)
    for _ in range(3):
        rl.info("a", "A")
        rl.warning("b", "B")
    assert lines(caplog) == ["A", "B"]
    rl.flush()
    assert lines(caplog)[2:] == ["A (and 1 more in the last 10 s)", "B (and 1 more in the last 10 s)"]
    rl.flush()
    assert len(lines(caplog)) == 4


def test_summary_comes_at_the_end_of_the_interval_on_a_loop(caplog):
    caplog.set_level(logging.INFO, "test.logsafe")
    rl = RateLimitedLog(logging.getLogger("test.logsafe"), interval=0.1)

    async def main():
        for n in range(100):
            rl.warning("kind", "event %d", n)
        await asyncio.sleep(0.3)                     # the flood stopped: the timer reports it
    asyncio.run(main())
    assert lines(caplog) == ["event 0", "event 99 (and 98 more in the last 0.1 s)"]
