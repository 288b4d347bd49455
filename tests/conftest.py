"""Suite-wide fixtures and hooks.

``daemon``: a real `liverestore serve` (tests.support.Daemon).

The slow and vm tiers measure things worth seeing in every CI log
(conformance pass counts, benchmark ratios, run times), but a passing
test's prints are captured. Tests hand such lines to the ``measured``
fixture; they are printed in pytest's terminal summary, pass or fail.
"""
from __future__ import annotations

import signal
from typing import Callable, Iterator

import pytest

from tests.support import Daemon

_MEASURED: list[str] = []


@pytest.fixture
def daemon(tmp_path) -> Iterator[Daemon]:
    """A `liverestore serve` process on a fresh state dir (killed if a test left it running)."""
    d = Daemon(tmp_path).start()
    yield d
    if d.proc and d.proc.poll() is None:
        d.stop(signal.SIGKILL)


@pytest.fixture
def measured() -> Callable[[str], None]:
    return _MEASURED.append


def pytest_terminal_summary(terminalreporter) -> None:
    if _MEASURED:
        terminalreporter.section("measured")
        for line in _MEASURED:
            terminalreporter.write_line(line)
