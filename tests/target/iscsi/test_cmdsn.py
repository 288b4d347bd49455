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


from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


@settings(max_examples=200, deadline=None)
@given(start=st.integers(0, (1 << 32) - 1), depth=st.integers(1, 64), data=st.data())
def test_window_model(start, depth, data):
    """Any arrival order (with duplicates and strays) delivers each in-window
    CmdSN exactly once, in CmdSN order, never more than depth in flight."""
    w = CmdWindow(start, queue_depth=depth)
    n = data.draw(st.integers(1, depth))
    sns = [(start + k) % (1 << 32) for k in range(n)]
    order = data.draw(st.permutations(sns))
    extra = data.draw(st.lists(st.sampled_from(sns + [(start + depth + 5) % (1 << 32)]), max_size=5))
    delivered = []
    for sn in list(order) + extra:
        verdict, ready = w.submit(sn, sn)
        if sn not in sns:
            assert verdict == "outside"
        delivered += ready
        assert w.inflight <= depth
    assert delivered == sns
    assert w.exp_cmdsn == (start + n) % (1 << 32)
    before = w.max_cmdsn
    for _ in delivered:
        w.complete()
    assert w.max_cmdsn == (start + n + depth - 1) % (1 << 32)
    assert not sn_lt(w.max_cmdsn, before)


@settings(max_examples=200, deadline=None)
@given(start=st.integers(0, (1 << 32) - 1), depth=st.integers(1, 8), data=st.data())
def test_take_next_is_submit_for_the_next_command(start, depth, data):
    """The receive path's shortcut (take_next, else submit) moves the window
    exactly as submit alone does, whatever the arrivals and completions."""
    short, plain = CmdWindow(start, queue_depth=depth), CmdWindow(start, queue_depth=depth)
    for _ in range(data.draw(st.integers(1, 40))):
        if data.draw(st.booleans()) and plain.inflight:
            short.complete()
            plain.complete()
            continue
        sn = (short.exp_cmdsn + data.draw(st.integers(-2, depth + 1))) % (1 << 32)
        taken = short.take_next(sn)
        got = [sn] if taken else short.submit(sn, sn)[1]
        assert got == plain.submit(sn, sn)[1]
        assert (short.exp_cmdsn, short.inflight, short.max_cmdsn) == \
            (plain.exp_cmdsn, plain.inflight, plain.max_cmdsn)
