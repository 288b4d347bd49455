"""CmdSN window: ordering, duplicates, outside-window, wrap-around, depth."""
from target.iscsi.cmdsn import CmdWindow, sn_add, sn_diff, sn_le, sn_lt


def test_serial_arithmetic_wraps():
    assert sn_lt(0xFFFFFFFF, 0) and not sn_lt(0, 0xFFFFFFFF)
    assert sn_lt(1, 2) and not sn_lt(2, 2) and sn_le(2, 2)
    assert sn_add(0xFFFFFFFF, 2) == 1
    assert sn_diff(0xFFFFFFFE, 3) == 5 and sn_diff(3, 0xFFFFFFFE) == -5


def test_in_order_delivery_and_depth():
    w = CmdWindow(10, queue_depth=4)
    assert (w.exp_cmdsn, w.max_cmdsn) == (10, 13)
    assert w.submit(10, "a") == ("ok", ["a"])
    assert w.submit(11, "b") == ("ok", ["b"])
    # two in flight: window does not grow until they complete
    assert (w.exp_cmdsn, w.max_cmdsn) == (12, 13)
    assert w.submit(14, "x")[0] == "outside"
    w.complete()
    assert w.max_cmdsn == 14
    assert w.submit(14, "d") == ("ok", [])          # early: held back
    assert w.submit(12, "c") == ("ok", ["c"])
    assert w.submit(13, "e") == ("ok", ["e", "d"])   # gap filled: released in order
    assert w.exp_cmdsn == 15


def test_duplicates_and_outside():
    w = CmdWindow(100, queue_depth=8)
    assert w.submit(100, 1)[1] == [1]
    assert w.submit(100, 1)[0] == "duplicate"
    assert w.submit(103, 3)[0] == "ok"
    assert w.submit(103, 3)[0] == "duplicate"
    assert w.submit(100 + 50, 9)[0] == "outside"
    assert w.submit(100 - 10_000, 9)[0] == "outside"
    assert w.pending_count() == 1


def test_wraparound():
    w = CmdWindow(0xFFFFFFFE, queue_depth=8)
    assert w.submit(0, "c") == ("ok", [])
    assert w.submit(0xFFFFFFFE, "a") == ("ok", ["a"])
    assert w.submit(0xFFFFFFFF, "b") == ("ok", ["b", "c"])
    assert w.exp_cmdsn == 1
    assert w.in_window(1) and not w.in_window(0xFFFFFFFF)


def test_max_cmdsn_never_decreases():
    w = CmdWindow(1, queue_depth=4)
    seen = [w.max_cmdsn]
    for sn in range(1, 5):
        w.submit(sn, sn)
        seen.append(w.max_cmdsn)
    for _ in range(4):
        w.complete()
        seen.append(w.max_cmdsn)
    assert all(not sn_lt(b, a) for a, b in zip(seen, seen[1:]))
    assert w.max_cmdsn == 8
