"""The daemon agrees with the host's LIO tools on one dbroot (target.lio.dbroot):
a dbroot someone chose is kept, else the host tools' directory is created and
set, and this process's rtslib-fb is told to prefer exactly that."""
from __future__ import annotations

from pathlib import Path

import pytest
from rtslib_fb import RTSRoot

from target.lio import dbroot
from target.lio.dbroot import DEBIAN, KERNEL_DEFAULT, UPSTREAM, preferred, settle


@pytest.fixture(autouse=True)
def _keep_rtslib_preference():
    old = RTSRoot._preferred_dbroot
    yield
    RTSRoot._preferred_dbroot = old


def _kernel(tmp_path: Path, value: str) -> Path:
    f = tmp_path / "dbroot"
    f.write_text(value + "\n")
    return f


def test_kept_when_someone_chose_before_us(tmp_path):
    f = _kernel(tmp_path, "/etc/elsewhere")
    d = settle(str(f), want=str(tmp_path / "unused"))
    assert (d.path, d.how) == ("/etc/elsewhere", "kept")
    assert f.read_text() == "/etc/elsewhere\n"              # never switched under the admin's tools
    assert not (tmp_path / "unused").exists()
    assert RTSRoot._preferred_dbroot == "/etc/elsewhere"   # our rtslib will not switch it either


def test_default_is_replaced_by_the_host_tools_directory_created(tmp_path):
    f = _kernel(tmp_path, KERNEL_DEFAULT)
    want = tmp_path / "etc" / "rtslib-fb-target"
    d = settle(str(f), want=str(want))
    assert (d.path, d.how) == (str(want), "set")
    assert want.is_dir() and f.read_text().strip() == str(want)
    assert RTSRoot._preferred_dbroot == str(want)


def test_stuck_under_the_default_is_reported_not_fatal(tmp_path, monkeypatch):
    # The kernel refuses the write once backstores exist (EINVAL): keep the default.
    f = _kernel(tmp_path, KERNEL_DEFAULT)
    real_open = open

    def refusing_open(path, mode="r", *a, **kw):
        if str(path) == str(f) and "w" in mode:
            raise OSError(22, "Invalid argument")
        return real_open(path, mode, *a, **kw)
    monkeypatch.setattr("builtins.open", refusing_open)
    d = settle(str(f), want=str(tmp_path / "d"))
    assert (d.path, d.how) == (KERNEL_DEFAULT, "stuck")
    assert RTSRoot._preferred_dbroot == KERNEL_DEFAULT


def test_no_lio_no_dbroot(tmp_path):
    assert settle(str(tmp_path / "missing")) is None


def test_preferred_order():
    assert preferred(lambda d: True) == DEBIAN                 # Debian's package dir first
    assert preferred(lambda d: d == UPSTREAM) == UPSTREAM      # an upstream tool's dir in use
    assert preferred(lambda d: False, debian=True) == DEBIAN   # nothing yet: the family's choice
    assert preferred(lambda d: False, debian=False) == UPSTREAM


def test_debian_like(tmp_path):
    p = tmp_path / "os-release"
    p.write_text('ID=ubuntu\nID_LIKE="debian"\n')
    assert dbroot.debian_like(str(p))
    p.write_text('ID="rhel"\nID_LIKE="fedora"\n')
    assert not dbroot.debian_like(str(p))
    assert not dbroot.debian_like(str(tmp_path / "none"))
