"""Volume names (and so pair ids) at their limits: fullmatch, 64 characters."""
from __future__ import annotations

import pytest

from restore_core.engine import valid_volume_name


@pytest.mark.parametrize("name", ["v", "db1-clone", "a.b:c_d", "A" * 64, "0"])
def test_good(name) -> None:
    assert valid_volume_name(name)


@pytest.mark.parametrize("name", ["", "A" * 65, "-v", ".v", "v/w", "v w", None, 5,
                                  *("v" + c for c in ["\n", "\r", "\t", "\x00", "\x7f", "\x85",
                                                      "\u2028", "\u2029", "\ud800"])])
def test_bad(name) -> None:
    assert not valid_volume_name(name)
