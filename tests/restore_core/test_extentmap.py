from hypothesis import given, settings, strategies as st

from restore_core.committer import load_map
from restore_core.extentmap import CHUNK_BITS, ExtentMap, extents_of, whole_extents_of
from restore_core.metadata import ALL_ONES


def test_range_ops_and_queries():
    m = ExtentMap(100)
    m.set_range(10, 20)
    m.set(50)
    assert m.count() == 11
    assert m.next_set(0) == 10 and m.next_set(20) == 50 and m.next_set(51) == -1
    assert m.next_clear(10) == 20
    assert m.all(10, 20) and not m.all(10, 21)
    assert m.any(19, 21) and not m.any(20, 50)
    assert list(m.runs()) == [(10, 20), (50, 51)]
    assert m.set_in(15, 55) == [15, 16, 17, 18, 19, 50]
    m.clear_range(12, 60)
    assert list(m.runs()) == [(10, 12)]


def test_extent_arithmetic():
    assert extents_of(0, 1, 4096) == (0, 1)
    assert extents_of(4095, 2, 4096) == (0, 2)
    assert extents_of(8192, 8192, 4096) == (2, 4)
    # whole extents: partial at both ends excluded
    assert whole_extents_of(100, 3 * 4096, 4096, 1 << 20) == (1, 3)
    # the short last extent counts as whole when the write reaches the end
    assert whole_extents_of(8192, 1000, 4096, 8192 + 1000) == (2, 3)
    assert whole_extents_of(0, 100, 4096, 1 << 20) == (0, 0)


def test_dirty_chunks_only_what_changed():
    m = ExtentMap(3 * CHUNK_BITS + 7)
    m.set(5)
    m.set(2 * CHUNK_BITS + 1)
    dirty = m.take_dirty_chunks()
    assert set(dirty) == {0, 2}
    assert m.take_dirty_chunks() == {}
    m.clear(5)
    assert m.take_dirty_chunks() == {0: None}   # all-zero chunk: deleted, not stored


@settings(max_examples=50, deadline=None)
@given(st.integers(1, 3 * CHUNK_BITS + 100), st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 5000), st.booleans()), max_size=20))
def test_chunk_round_trip(nbits, ops):
    m = ExtentMap(nbits)
    for a, n, on in ops:
        a %= nbits
        b = min(nbits, a + n)
        (m.set_range if on else m.clear_range)(a, b)
    m.mark_all_dirty()
    chunks = {c: b for c, b in m.take_dirty_chunks().items() if b is not None}
    assert load_map(nbits, chunks) == m


def test_all_ones_chunk_marker_loads_full():
    n = CHUNK_BITS + 10
    m = load_map(n, {0: ALL_ONES, 1: ALL_ONES})
    assert m.count() == n


def test_64tib_map_is_cheap():
    # 64 TiB at 64 KiB extents: 2**30 bits, 128 MiB; range ops stay C-fast.
    m = ExtentMap((64 << 40) // (64 << 10))
    m.set_range(12345, 12345 + 10**6)
    assert m.count() == 10**6
    assert m.next_set(0) == 12345
    assert m.next_clear(12345) == 12345 + 10**6


def test_short_last_chunk_with_bit_zero_is_not_the_all_ones_marker():
    # A map whose short last chunk holds only its first bit serialises to
    # b"\x01"; it must reload as exactly that bit.
    n = CHUNK_BITS + 5
    m = ExtentMap(n)
    m.set(CHUNK_BITS)
    m.mark_all_dirty()
    chunks = {c: b for c, b in m.take_dirty_chunks().items() if b is not None}
    assert chunks == {1: b"\x01"}
    assert load_map(n, chunks) == m


def test_assign_refuses_a_map_of_another_size():
    import pytest
    with pytest.raises(ValueError, match="assigned"):
        ExtentMap(10).assign(ExtentMap(12))
