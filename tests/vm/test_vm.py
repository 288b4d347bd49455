"""Real-kernel tier: LIO + TCMU + open-iscsi in a throw-away QEMU guest.

One guest boot runs tests/vm/guest_e2e.py (see there): our target.lio code
creates a user:liverestore backstore and an iSCSI target with CHAP, our
TCMU handler serves it from a file through the SCSI layer, open-iscsi logs
in, ext4 is made and checked, and the handler is SIGKILLed mid-write and
restarted. Each guest check prints a "RESULT name: PASS|FAIL" line; this
test fails on any FAIL or on a missing result.

Skipped only when QEMU / a Debian kernel cannot be installed here. The guest
run itself takes about 2-3 minutes (TCG, 2 cores); a first install adds
the apt download.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
EXPECTED = ["lio_apply_idempotent", "user_backstore", "netlink_discovery", "iscsi_login_chap", "second_device_raw_io",
            "mkfs_write_readback", "commands_pending_at_kill", "stream_survives_handler_kill",
            "reset_ring_on_restart", "parallel_direct_io", "fsck_clean", "checksums_after_restart",
            "no_block_io_errors", "netlink_removal", "lio_teardown"]

pytestmark = [pytest.mark.vm, pytest.mark.timeout(900)]


@pytest.fixture(scope="module")
def vm_ready():
    p = subprocess.run(["bash", str(HERE / "setup_host.sh")], capture_output=True, text=True, timeout=480)
    if p.returncode != 0:
        pytest.skip(f"cannot install QEMU / a Debian kernel / virtme-ng here: "
                    f"{(p.stderr or p.stdout).strip()[-400:]}")
    return p.stdout.strip()


def test_lio_tcmu_iscsi_end_to_end(vm_ready):
    run = Path(os.path.expanduser("~/.cache/liverestore-vm")) / f"run-{os.getpid()}-{int(time.time())}"
    run.mkdir(parents=True)
    (run / "env").write_text(f"REPO={REPO}\nPY={sys.executable}\n")
    p = subprocess.run(["bash", str(HERE / "run_in_vm.sh"), str(HERE / "guest_e2e.sh"), str(run)],
                       capture_output=True, text=True, timeout=540,
                       env={**os.environ, "LIO_VM_TIMEOUT": "500"})
    out = p.stdout
    print(out)                                  # the guest log, for -s / failure reports
    results = dict(re.findall(r"^RESULT (\w+): (PASS|FAIL)", out, re.M))
    failed = [k for k, v in results.items() if v != "PASS"]
    missing = [k for k in EXPECTED if k not in results]
    assert not failed and not missing, f"failed={failed} missing={missing}; run dir {run}"
    assert p.returncode == 0, f"guest script exited non-zero; run dir {run}"
    shutil.rmtree(run, ignore_errors=True)
