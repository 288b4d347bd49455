"""Guest side of the VM tier, part 3: the LIO path as admins run it (issue 15).

Runs as root in the LIO guest after the other parts, with Debian's own
targetcli-fb, targetctl (python3-rtslib-fb) and tcmu-runner from the host's
root fs, and a system D-Bus started here. Nothing is prepared by hand:
guest_e2e.sh only records the kernel's dbroot and whether /etc/target
existed at boot.

Steps (each a RESULT line):
  fresh_host_dbroot         the daemon ran on the fresh host; the kernel's dbroot is Debian's,
                            no /etc/target appeared, targetcli runs without a dbroot warning
  targetcli_lists_ours      `targetcli ls` shows user:liverestore; `.../user:liverestore/NAME info` works
  targetcli_checkconfig     targetcli's create is refused for a config naming no volume, accepted for one;
                            the daemon serves that backstore, lists it as drift, and does not delete it;
                            run after tcmu-runner has announced netlink replies in this boot (the restore
                            part), the kernel waited for the daemon's answer to it (nl_reply_supported 1)
  admin_acl_kept            an ACL added with targetcli survives `volume create` + `export create`,
                            and `liverestore status` reports it as drift
  registered_with_runner    tcmu-runner started: we hand it its bus name and register with it;
                            targetcli shows user:liverestore beside tcmu-runner's own handlers
  peers_survive_kill        tcmu-runner's user:qcow LU and ours each keep serving across a SIGKILL +
                            restart of the other daemon
  boot_restore_with_runner  saveconfig, clearconfig, tcmu-runner up, targetctl restore, daemon start:
                            one backstore per volume, hosts read their data, the admin's ACL mapping back,
                            and the LUN (+ its ACL's mapping) of an admin's own target on our backstore
  delete_only_ours          export delete + volume delete remove only our LIO objects
"""
from __future__ import annotations

import glob
import os
import signal
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from guest_common import (RUN, disks_of, failures, liverestore, liverestore_json, log, login,  # noqa: E402
                          result, run_main, sh, start_daemon)

SOCK = "/tmp/lr-admin.sock"
STATE = "/tmp/lr-admin-state"
PORTAL = "127.0.0.1:3260"
IQN_A = "iqn.2026-11.org.liverestore:admin-a"
IQN_C = "iqn.2026-11.org.liverestore:admin-c"
IQN_E = "iqn.2026-11.org.liverestore:admin-e"
IQN_Q = "iqn.2026-11.org.liverestore:admin-qcow"
IQN_OWN = "iqn.2026-11.org.example:admins-own"        # an admin's target, not the daemon's
ADMIN_HOST = "iqn.1994-05.com.example:admin-host"
CONFIGFS = "/sys/kernel/config/target"
DEBIAN_DBROOT = "/etc/rtslib-fb-target"
QCOW = "/tmp/admin.qcow2"
MiB = 1 << 20
# targetcli keeps history and preferences in $HOME: the guest's /root is the host's, read-only
TARGETCLI = "HOME=/tmp/targetcli-home targetcli"


def lr(*args: str, timeout: float = 120) -> str:
    return liverestore(SOCK, *args, timeout=timeout)


def targetcli(args: str, check: bool = True) -> subprocess.CompletedProcess:
    return sh(f"{TARGETCLI} {args}", check=check, timeout=120)


def wait_for(what: str, fn, timeout: float = 30, every: float = 1.0):
    deadline = time.time() + timeout
    while True:
        v = fn()
        if v or time.time() > deadline:
            if not v:
                log(f"gave up waiting for {what}")
            return v
        time.sleep(every)


def uio_configs() -> list[str]:
    return sorted(open(n).read().strip().split("/", 3)[-1] for n in glob.glob("/sys/class/uio/uio*/name"))


def user_backstores() -> dict[str, str]:
    """name -> TCMU config of every user backstore in configfs."""
    out = {}
    for d in glob.glob(f"{CONFIGFS}/core/user_*/*/"):
        d = d.rstrip("/")
        info = open(f"{d}/info").read()
        cfg = info.split("Config:")[1].split()[0] if "Config:" in info else ""
        out[os.path.basename(d)] = cfg
    return out


def read_sha(iqn: str, nbytes: int) -> str:
    dev = disks_of(iqn, 1)[0]
    return sh(f"dd if={dev} bs=1M count={nbytes // MiB} iflag=direct status=none | sha256sum",
              timeout=300).stdout.split()[0]


def logout(iqn: str) -> None:
    sh(f"iscsiadm -m node -T {iqn} -p {PORTAL} --logout", check=False)


def start_runner(n: int) -> subprocess.Popen:
    """tcmu-runner, once it owns its bus name (it queues while our daemon
    holds it; the daemon hands it over within its 5 s re-check)."""
    f = open(os.path.join(RUN, f"admin-tcmu-runner{n}.log"), "w")
    p = subprocess.Popen(["tcmu-runner"], stdout=f, stderr=subprocess.STDOUT)
    wait_for("tcmu-runner owning org.kernel.TCMUService1", lambda: owner_pid() == p.pid, 30)
    return p


def owner_pid() -> int | None:
    out = sh("dbus-send --system --print-reply --dest=org.freedesktop.DBus /org/freedesktop/DBus "
             "org.freedesktop.DBus.GetConnectionUnixProcessID string:org.kernel.TCMUService1", check=False).stdout
    parts = out.split("uint32")
    return int(parts[1].split()[0]) if len(parts) > 1 else None


def drift() -> list[str]:
    return liverestore_json(SOCK, "status")["iscsi"].get("drift") or []


def stop(p: subprocess.Popen, sig: int = signal.SIGTERM) -> None:
    p.send_signal(sig)
    try:
        p.wait(timeout=60)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait()


# ---------------------------------------------------------------------------------------------
def fresh_host(d: subprocess.Popen) -> None:
    boot = open(os.path.join(RUN, "boot-dbroot")).read().strip() if os.path.exists(
        os.path.join(RUN, "boot-dbroot")) else "?"
    etc_target_at_boot = os.path.exists(os.path.join(RUN, "boot-etc-target"))
    now = open(f"{CONFIGFS}/dbroot").read().strip()
    ls = targetcli("ls /", check=False)
    warned = [l for l in (ls.stdout + ls.stderr).splitlines() if "dbroot" in l.lower()]
    result("fresh_host_dbroot", boot == "/var/target" and not etc_target_at_boot and now == DEBIAN_DBROOT
           and not os.path.exists("/etc/target") and ls.returncode == 0 and not warned,
           f"dbroot at boot {boot}, now {now}; /etc/target at boot {etc_target_at_boot}, now "
           f"{os.path.exists('/etc/target')}; targetcli ls rc={ls.returncode} warnings={warned}")


def targetcli_view() -> None:
    ok = wait_for("user:liverestore in targetcli", lambda: "user:liverestore" in targetcli(
        "ls /backstores", check=False).stdout, 20, 2)
    info = targetcli("/backstores/user:liverestore/adm-a info", check=False)
    result("targetcli_lists_ours", bool(ok) and info.returncode == 0 and "liverestore/adm-a" in info.stdout,
           f"ls shows it={bool(ok)}; info rc={info.returncode}: {' | '.join(info.stdout.split(chr(10))[:4])}")

    bad = targetcli("/backstores/user:liverestore create name=bogus size=1M cfgstring=nope", check=False)
    good = targetcli("/backstores/user:liverestore create name=adm-b-alt size=32M cfgstring=adm-b", check=False)
    served = wait_for("adm-b-alt served", lambda: any(
        "serving tcm-user/" in line and "/adm-b-alt/liverestore/adm-b " in line
        for line in open(os.path.join(RUN, "admin-daemon1.log"))), 20)
    # without the daemon's netlink answer that create hangs (issue 15); so it is the case covered
    waited = [open(f).read().strip() for f in glob.glob(f"{CONFIGFS}/core/user_*/adm-b-alt/attrib/nl_reply_supported")]
    answered = any("answered cmd 1 for tcm-user/" in line and "/adm-b-alt/liverestore/adm-b: ok" in line
                   for line in open(os.path.join(RUN, "admin-daemon1.log")))
    lr("volume", "create", "adm-d", "--size", str(32 * MiB))
    lr("export", "create", IQN_C + "-d", "--lun", "0=adm-d")       # a daemon change: must not delete it
    dr = drift()
    kept = "adm-b-alt" in user_backstores()
    result("targetcli_checkconfig", bad.returncode != 0 and "cfgstring invalid" in (bad.stdout + bad.stderr)
           and "bogus" not in user_backstores() and good.returncode == 0 and bool(served) and kept
           and any("user:adm-b-alt" in x for x in dr) and waited == ["1"] and answered,
           f"bogus refused rc={bad.returncode} ({(bad.stdout + bad.stderr).strip()[-120:]}); adm-b-alt created "
           f"rc={good.returncode}, served={bool(served)}, kept after export create={kept}; drift={dr}; its "
           f"nl_reply_supported={waited} (1: the kernel waited for an answer), the daemon answered it={answered}")
    targetcli("/backstores/user:liverestore delete adm-b-alt", check=False)   # the admin acts
    lr("export", "delete", IQN_C + "-d")
    lr("volume", "delete", "adm-d")


def admin_acl() -> None:
    targetcli(f"/iscsi/{IQN_A}/tpg1/acls create {ADMIN_HOST}")
    acl = f"{CONFIGFS}/iscsi/{IQN_A}/tpgt_1/acls/{ADMIN_HOST}"
    before = os.path.isdir(f"{acl}/lun_0")
    lr("volume", "create", "adm-c", "--size", str(32 * MiB))
    lr("export", "create", IQN_C, "--lun", "0=adm-c")
    after = os.path.isdir(acl) and os.path.isdir(f"{acl}/lun_0")
    status = lr("status")
    shown = "LIO DRIFT" in status and ADMIN_HOST in status
    in_shell = ADMIN_HOST in lr("shell", "/iscsi", "drift")
    result("admin_acl_kept", before and after and shown and in_shell,
           f"ACL + mapped LUN 0 before={before}, after volume create + export create={after}; "
           f"status shows drift={shown}, shell /iscsi drift={in_shell}: "
           f"{[l.strip() for l in status.splitlines() if ADMIN_HOST in l][:1]}")


def with_runner() -> subprocess.Popen:
    runner = start_runner(1)
    ours = wait_for("our registration with tcmu-runner", lambda: "registered user:liverestore" in open(
        os.path.join(RUN, "admin-daemon1.log")).read(), 30)
    ls = wait_for("both in targetcli", lambda: (lambda o: "user:liverestore" in o and "user:qcow" in o)(
        targetcli("ls /backstores", check=False).stdout), 20, 2)
    refused = targetcli("/backstores/user:liverestore create name=bogus2 size=1M cfgstring=nope", check=False)
    # a new export while registered: tcmu-runner also opens (and drops) each new uio device of our
    # subtype; the daemon must still serve it at once, not after its 10 s rescan
    lr("volume", "create", "adm-e", "--size", str(32 * MiB))
    t = time.time()
    lr("export", "create", IQN_E, "--lun", "0=adm-e")
    served = wait_for("adm-e served", lambda: any("serving tcm-user/" in line and "/adm-e/liverestore/adm-e " in line
                                                  for line in open(os.path.join(RUN, "admin-daemon1.log"))), 10, 0.2)
    served_in = time.time() - t
    lr("export", "delete", IQN_E)
    lr("volume", "delete", "adm-e")
    result("registered_with_runner", owner_pid() == runner.pid and bool(ours) and bool(ls)
           and refused.returncode != 0 and "cfgstring invalid" in refused.stdout + refused.stderr and bool(served),
           f"bus name owner pid {owner_pid()} (tcmu-runner {runner.pid}); registered={bool(ours)}; "
           f"targetcli lists user:liverestore and user:qcow={bool(ls)}; CheckConfig through tcmu-runner refused "
           f"rc={refused.returncode}; a new export served={bool(served)} {served_in:.1f} s after export create "
           "was called (its CLI round trip included)")
    return runner


def qcow_target() -> None:
    # tcmu-runner's qcow handler cannot allocate clusters on write: preallocate them
    sh(f"qemu-img create -q -f qcow2 -o preallocation=metadata {QCOW} 64M")
    targetcli(f"/backstores/user:qcow create name=adm-q size=64M cfgstring={QCOW}")
    targetcli("set global auto_add_default_portal=false")
    targetcli(f"/iscsi create {IQN_Q}")
    targetcli(f"/iscsi/{IQN_Q}/tpg1/luns create /backstores/user:qcow/adm-q")
    targetcli(f"/iscsi/{IQN_Q}/tpg1/portals create 127.0.0.1 3260")
    targetcli(f"/iscsi/{IQN_Q}/tpg1 set attribute generate_node_acls=1 demo_mode_write_protect=0 "
              "authentication=0 cache_dynamic_acls=1")


def write_pattern(iqn: str, tag: str) -> str:
    dev = disks_of(iqn, 1)[0]
    src = f"/tmp/admin-{tag}.bin"
    sh(f"dd if=/dev/urandom of={src} bs=1M count=4 status=none")
    sh(f"dd if={src} of={dev} bs=1M oflag=direct status=none")
    return sh(f"sha256sum < {src}").stdout.split()[0]


def peers(d: subprocess.Popen, runner: subprocess.Popen) -> tuple[subprocess.Popen, subprocess.Popen, dict]:
    qcow_target()
    for iqn in (IQN_A, IQN_Q):
        login(iqn, PORTAL)
    sums = {IQN_A: write_pattern(IQN_A, "a"), IQN_Q: write_pattern(IQN_Q, "q")}
    runner.send_signal(signal.SIGKILL)
    runner.wait()
    ours_while_runner_dead = read_sha(IQN_A, 4 * MiB) == sums[IQN_A]
    runner = start_runner(2)
    qcow_after = wait_for("qcow LU back", lambda: read_sha(IQN_Q, 4 * MiB) == sums[IQN_Q], 60, 3)
    d.send_signal(signal.SIGKILL)
    d.wait()
    qcow_while_ours_dead = read_sha(IQN_Q, 4 * MiB) == sums[IQN_Q]
    os.unlink(SOCK) if os.path.exists(SOCK) else None
    d = start_daemon("admin-daemon2.log", SOCK, STATE, PORTAL, init=False)
    ours_after = read_sha(IQN_A, 4 * MiB) == sums[IQN_A]
    result("peers_survive_kill", ours_while_runner_dead and bool(qcow_after) and qcow_while_ours_dead and ours_after,
           f"ours read while tcmu-runner dead={ours_while_runner_dead}, qcow after its restart={bool(qcow_after)}; "
           f"qcow read while our daemon dead={qcow_while_ours_dead}, ours after our restart={ours_after}")
    return d, runner, sums


def boot(d: subprocess.Popen, sums: dict) -> subprocess.Popen:
    for iqn in (IQN_A, IQN_Q):
        logout(iqn)
    # an admin's own target exporting one of our backstores: restore skips its LUN with the backstore
    targetcli(f"/iscsi create {IQN_OWN}")
    targetcli(f"/iscsi/{IQN_OWN}/tpg1/luns create /backstores/user:liverestore/adm-a")
    targetcli(f"/iscsi/{IQN_OWN}/tpg1/acls create {ADMIN_HOST}")
    targetcli("saveconfig")
    saved = os.path.exists(f"{DEBIAN_DBROOT}/saveconfig.json")
    stop(d)
    sh("targetctl clear")
    cleared = not [t for t in os.listdir(f"{CONFIGFS}/iscsi") if t.startswith("iqn.")] \
        if os.path.isdir(f"{CONFIGFS}/iscsi") else True
    r = sh("targetctl restore", check=False, timeout=300)
    skipped = [l for l in (r.stdout + r.stderr).splitlines() if "skipped" in l or "Could not" in l]
    log(f"targetctl restore rc={r.returncode}; skipped: {skipped}")
    os.unlink(SOCK) if os.path.exists(SOCK) else None
    d = start_daemon("admin-daemon3.log", SOCK, STATE, PORTAL, init=False)
    mapping = os.path.isdir(f"{CONFIGFS}/iscsi/{IQN_A}/tpgt_1/acls/{ADMIN_HOST}/lun_0")
    own_tpg = f"{CONFIGFS}/iscsi/{IQN_OWN}/tpgt_1"
    own_lun = [p for p in glob.glob(f"{own_tpg}/lun/lun_0/*") if os.path.islink(p)]   # -> its backstore
    own = bool(own_lun) and os.path.basename(os.path.realpath(own_lun[0])) == "adm-a" \
        and os.path.isdir(f"{own_tpg}/acls/{ADMIN_HOST}/lun_0")
    ours = sorted(n for n, c in user_backstores().items() if c.startswith("liverestore/"))
    for iqn in (IQN_A, IQN_Q):
        login(iqn, PORTAL)
    reads = {iqn: read_sha(iqn, 4 * MiB) == s for iqn, s in sums.items()}
    result("boot_restore_with_runner", saved and cleared and r.returncode == 0 and ours == ["adm-a", "adm-c"]
           and all(reads.values()) and mapping and own,
           f"saved={saved} cleared={cleared}; restore rc={r.returncode} skipped {len(skipped)} lines; our "
           f"backstores after daemon start {ours}; hosts read their data {reads}; admin ACL mapping back={mapping}; "
           f"the admin's own target's LUN on adm-a and its ACL mapping back={own}")
    for iqn in (IQN_A, IQN_Q):
        logout(iqn)
    targetcli(f"/iscsi delete {IQN_OWN}")           # the admin acts
    return d


def delete_only_ours() -> None:
    lr("export", "delete", IQN_A)
    lr("export", "delete", IQN_C)
    for v in ("adm-a", "adm-b", "adm-c"):
        lr("volume", "delete", v)
    left = user_backstores()
    targets = sorted(os.listdir(f"{CONFIGFS}/iscsi"))
    result("delete_only_ours", list(left) == ["adm-q"] and IQN_Q in targets and IQN_A not in targets
           and IQN_C not in targets,
           f"user backstores left {left}; targets left {[t for t in targets if t.startswith('iqn')]}")


def main() -> int:
    # The restore part leaves its LIO objects; to this part's daemon they would be drift.
    sh("targetctl clear", check=False)
    sh("mkdir -p /run/dbus /tmp/targetcli-home && dbus-daemon --system --fork")
    sh("iscsid || true", check=False)
    d = start_daemon("admin-daemon1.log", SOCK, STATE, PORTAL, init=True)
    runner = None
    try:
        lr("volume", "create", "adm-a", "--size", str(64 * MiB))
        lr("volume", "create", "adm-b", "--size", str(32 * MiB))
        lr("export", "create", IQN_A, "--lun", "0=adm-a")
        fresh_host(d)
        targetcli_view()
        admin_acl()
        runner = with_runner()
        d, runner, sums = peers(d, runner)
        d = boot(d, sums)
        delete_only_ours()
    finally:
        for iqn in (IQN_A, IQN_Q):
            logout(iqn)
        stop(d)
        if runner is not None:
            stop(runner)
        sh("targetctl clear", check=False)
    print(f"SUMMARY3: {len(failures)} failed: {failures}" if failures else "SUMMARY3: all passed", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    run_main(main, "guest_admin_script", ["admin-daemon1.log", "admin-daemon2.log", "admin-daemon3.log",
                                          "admin-tcmu-runner1.log", "admin-tcmu-runner2.log"])
