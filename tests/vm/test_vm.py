"""Real-kernel tier: LIO + TCMU + open-iscsi in a throw-away QEMU guest.

One guest boot runs three parts in order (guest_e2e.sh): e2e, restore, admin:

* tests/vm/guest_e2e.py: our target.lio code creates a user:liverestore
  backstore and an iSCSI target with CHAP, our TCMU handler serves it from
  a file through the SCSI layer (PlainLunIO), open-iscsi logs in, ext4 is
  made and checked, and the handler is SIGKILLed mid-write and restarted.
* tests/vm/guest_restore.py: `liverestore serve --backend lio` exports a
  pair; ext4 + files on the source, sync + fracture, the source changes; a
  throttled protected restore runs while the host re-reads (clone-time
  files) and writes; the daemon is SIGKILLed mid-restore and restarted, the
  restore resumes and completes; fsck, files and the untouched clone are
  checked. Then iscsi-test-cu (a subset) against a spare LU of ours and a
  LIO fileio LU, and fio: ours vs tcmu-runner's qcow handler vs LIO fileio.
* tests/vm/guest_admin.py: the LIO path as admins run it, with Debian's
  targetcli-fb, targetctl and tcmu-runner and a system D-Bus, on a guest
  where nothing was prepared (no /etc/target): the dbroot agreed with
  targetcli, `user:liverestore` in targetcli (CheckConfig, both with and
  without tcmu-runner), an admin's ACL kept and reported as drift, each
  daemon's LUs surviving a SIGKILL of the other, saveconfig + clearconfig +
  targetctl restore with tcmu-runner up, and deletes that touch only ours.
  It runs after the restore part on purpose: tcmu-runner has run in this
  boot, so the kernel waits for a netlink answer to every backstore
  targetcli creates (no nl_reply_supported=-1), and our daemon must give it
  (issue 15: without it `targetcli ... create` and `targetctl clear` hang).

Each guest check prints a "RESULT name: PASS|FAIL" line; this test fails on
any FAIL or on a missing result, and needs the libiscsi pass counts and the
benchmark JSON (printed as the last line; ratios are reported, not asserted).

Skipped only when QEMU / a Debian kernel cannot be installed here. The guest
run takes about 10 minutes (TCG, 2 cores; the libiscsi subset on our LU is ~3.5 of them); a first install adds the apt
download.
"""
from __future__ import annotations

import json
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
            "no_block_io_errors", "netlink_removal", "lio_teardown",
            # guest_restore.py
            "daemon_lio_export", "iscsi_login_pair", "sync_fracture", "restore_reads_clone_state",
            "restore_writes", "killed_mid_restore", "restore_resumes", "io_survives_daemon_kill",
            "daemon_reset_ring", "restore_completes", "restored_fsck_clean", "restored_files",
            "clone_unchanged", "restore_no_block_io_errors", "libiscsi_ran", "bench_numbers"]
# guest_admin.py (issue 15: the LIO path as admins run it)
EXPECTED += ["fresh_host_dbroot", "targetcli_lists_ours", "targetcli_checkconfig", "admin_acl_kept",
             "registered_with_runner", "peers_survive_kill", "boot_restore_with_runner", "delete_only_ours"]

# The guest run took 546-553 s on this machine kind in November and 974 s on
# a slower day (tcmu-runner's own 4K IOPS in the same guest halved too: TCG
# speed follows the host), so the caps leave room for a slow host rather
# than fail CI on it; a hang still ends within the 90-minute CI budget.
# The admin part adds about 4 minutes; on a host at load 7-10 (2 cores) the
# whole boot took more than 40 minutes, hence the cap: the two boots' caps
# of before (1860 + 1200 s), summed.
pytestmark = [pytest.mark.vm, pytest.mark.timeout(3300)]


@pytest.fixture(scope="module")
def vm_ready():
    p = subprocess.run(["bash", str(HERE / "setup_host.sh")], capture_output=True, text=True, timeout=480)
    if p.returncode != 0:
        pytest.skip(f"cannot install QEMU / a Debian kernel / virtme-ng here: "
                    f"{(p.stderr or p.stdout).strip()[-400:]}")
    return p.stdout.strip()


def _boot(parts: str, guest_timeout: int) -> tuple[Path, subprocess.CompletedProcess, dict[str, str]]:
    """One guest boot running the named parts of guest_e2e.sh; the run dir,
    the process (stdout: the guest log) and the RESULT lines."""
    run = Path(os.path.expanduser("~/.cache/liverestore-vm")) / f"run-{os.getpid()}-{int(time.time())}"
    run.mkdir(parents=True)
    (run / "env").write_text(f"REPO={REPO}\nPY={sys.executable}\nPARTS=\"{parts}\"\n")
    p = subprocess.run(["bash", str(HERE / "run_in_vm.sh"), str(HERE / "guest_e2e.sh"), str(run), "3G"],
                       capture_output=True, text=True, timeout=guest_timeout + 60,
                       env={**os.environ, "LIO_VM_TIMEOUT": str(guest_timeout)})
    print(p.stdout)                             # the guest log, for -s / failure reports
    return run, p, dict(re.findall(r"^RESULT (\w+): (PASS|FAIL)", p.stdout, re.M))


def _check(run: Path, p: subprocess.CompletedProcess, results: dict[str, str],
           expected: list[str]) -> None:
    failed = [k for k, v in results.items() if v != "PASS"]
    missing = [k for k in expected if k not in results]
    assert not failed and not missing, f"failed={failed} missing={missing}; run dir {run}"
    assert p.returncode == 0, f"guest script exited non-zero; run dir {run}"


def test_lio_tcmu_iscsi_end_to_end(vm_ready, measured):
    t0 = time.time()
    run, p, results = _boot("e2e restore admin", 3060)
    _check(run, p, results, EXPECTED)
    out = p.stdout
    counts = re.findall(r"^LIBISCSI (ours|fileio): (\d+)/(\d+) passed", out, re.M)
    assert {c[0] for c in counts} == {"ours", "fileio"} and all(int(c[2]) > 0 for c in counts), counts
    bench = [json.loads(l) for l in out.splitlines() if l.startswith('{"vs_tcmu_runner_4k"')]
    assert bench and bench[-1]["vs_tcmu_runner_4k"] > 0 and bench[-1]["vs_tcmu_runner_1m"] > 0, bench
    print(f"vm tier guest run: {time.time() - t0:.0f}s")
    print(json.dumps(bench[-1]))                # last line: the benchmark summary
    measured(f"vm tier: guest run {time.time() - t0:.0f} s, {len(results)} checks passed; libiscsi subset "
             + ", ".join(f"{c[0]} {c[1]}/{c[2]}" for c in counts))
    measured("vm tier fio: " + json.dumps(bench[-1]))
    shutil.rmtree(run, ignore_errors=True)

