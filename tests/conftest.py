"""Suite-wide hooks.

The slow and vm tiers measure things worth seeing in every CI log
(conformance pass counts, benchmark ratios, run times), but a passing
test's prints are captured. Tests hand such lines to the ``measured``
fixture; they are printed in pytest's terminal summary, pass or fail.
"""
from __future__ import annotations

from typing import Callable

import pytest

_MEASURED: list[str] = []


@pytest.fixture
def measured() -> Callable[[str], None]:
    return _MEASURED.append


def pytest_terminal_summary(terminalreporter) -> None:
    if _MEASURED:
        terminalreporter.section("measured")
        for line in _MEASURED:
            terminalreporter.write_line(line)
