"""Guest side of the VM tier (runs as root inside the LIO guest).

user:liverestore backstore (target.lio) <- our TCMU handler (python -m
target.tcmu: FileBlockStore -> PlainLunIO -> SCSI layer) <- LIO iSCSI on
127.0.0.1 <- open-iscsi with CHAP -> mkfs.ext4, files, checksums; then the
handler is SIGKILLed in the middle of a write stream, restarted (reset_ring
recovery), and the stream must finish without I/O errors, with the data
and the filesystem intact (fsck -n).

Prints "RESULT <name>: PASS|FAIL ..." lines and exits non-zero on failure.
"""
from __future__ import annotations

import glob
import hashlib
import os
import signal
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from guest_common import (PY, REPO, RUN, disks_of, drop_caches, failures, log, result,  # noqa: E402
                          run_main, sh, sha)

IQN = "iqn.2026-11.org.liverestore:vmtest"
VOL = "vmvol1"
SIZE = 96 << 20
IMG = "/tmp/vmvol1.img"
VOL2, SIZE2, IMG2 = "vmvol2", 32 << 20, "/tmp/vmvol2.img"       # a second device, LUN 1
MNT = "/tmp/lr-mnt"
CHAP_USER, CHAP_PASS = "vmhost", "vm-chap-secret-1"


def initiator_name() -> str:
    try:
        for line in open("/etc/iscsi/initiatorname.iscsi"):
            if line.startswith("InitiatorName="):
                return line.split("=", 1)[1].strip()
    except FileNotFoundError:
        pass
    name = "iqn.2026-11.org.liverestore:vm-initiator"
    os.makedirs("/etc/iscsi", exist_ok=True)
    with open("/etc/iscsi/initiatorname.iscsi", "w") as f:
        f.write(f"InitiatorName={name}\n")
    return name


def description_dict(ini: str) -> dict:
    return {
        "volumes": [{"name": VOL, "size": SIZE, "attributes": {"cmd_time_out": "60"}},
                    {"name": VOL2, "size": SIZE2, "block_size": 4096}],
        "targets": [{"iqn": IQN, "tpgs": [{
            "tag": 1, "portals": ["127.0.0.1:3260"],
            "luns": [{"lun": 0, "volume": VOL}, {"lun": 1, "volume": VOL2}],
            "acls": [{"initiator": ini, "chap": {"userid": CHAP_USER, "password": CHAP_PASS}}]}]}]}


def description(ini: str):
    from target.lio import Description
    return Description.from_dict(description_dict(ini))


def start_handler(n: int) -> subprocess.Popen:
    logf = open(os.path.join(RUN, f"handler{n}.log"), "w")
    p = subprocess.Popen([PY, "-m", "target.tcmu", "--backing", f"{VOL}={IMG}", "--backing", f"{VOL2}={IMG2}",
                          "--rescan", "0"],
                         cwd=REPO, stdout=logf, stderr=subprocess.STDOUT)
    for _ in range(300):
        time.sleep(0.1)
        text = open(logf.name).read()
        if "handler ready" in text:
            log(f"handler #{n} pid {p.pid}: " + text.strip().splitlines()[-1])
            return p
        if p.poll() is not None:
            break
    raise RuntimeError(f"handler #{n} did not come up: {open(logf.name).read()}")


def wait_log(n: int, text: str, timeout: float = 30) -> bool:
    path = os.path.join(RUN, f"handler{n}.log")
    for _ in range(int(timeout * 10)):
        if text in open(path).read():
            return True
        time.sleep(0.1)
    return False


def mailbox() -> tuple[int, int]:
    """(cmd_tail, cmd_head) of our device's ring, read through its uio map."""
    import mmap
    import struct
    for d in glob.glob("/sys/class/uio/uio*"):
        if open(f"{d}/name").read().strip().endswith(f"liverestore/{VOL}"):
            fd = os.open("/dev/" + os.path.basename(d), os.O_RDWR)
            try:
                size = int(open(f"{d}/maps/map0/size").read(), 0)    # TCMU maps all or nothing
                m = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ)
                head = struct.unpack_from("=I", m, 12)[0]
                tail = struct.unpack_from("=I", m, 64)[0]
                m.close()
                return tail, head
            finally:
                os.close(fd)
    raise RuntimeError("our uio device is gone")


def kernel_log(pattern: str) -> list[str]:
    out = sh("dmesg", check=False).stdout
    return [l for l in out.splitlines() if pattern in l]


def main() -> int:
    from target.lio import LioConfigurator
    log(f"kernel {os.uname().release}; repo {REPO}")
    ini = initiator_name()
    lio = LioConfigurator()
    desc = description(ini)
    h1 = start_handler(1)                     # no device yet: it must learn of it by netlink
    rep = lio.apply(desc)
    for line in rep.lines():
        log(f"lio: {line}")
    rep2 = lio.apply(desc)
    import json
    with open(os.path.join(RUN, "desc.json"), "w") as f:
        json.dump(description_dict(ini), f)
    cli = sh(f"{PY} -m target.lio plan {RUN}/desc.json").stdout.strip()
    result("lio_apply_idempotent", rep.changed and not rep2.changed and cli == "no changes",
           f"first={len(rep.changes)} second={len(rep2.changes)} cli plan={cli!r}")
    so = glob.glob(f"/sys/kernel/config/target/core/user_*/{VOL}")[0]
    ctl = open(f"{so}/attrib/nl_reply_supported").read().strip()
    uio = [open(n).read().strip() for n in glob.glob("/sys/class/uio/uio*/name")]
    result("user_backstore", ctl == "-1" and f"liverestore/{VOL}" in " ".join(uio),
           f"nl_reply_supported={ctl} uio={uio}")

    # (rtslib puts each user backstore on its own HBA: tcm-user/<hba>/<name>/...)
    served = wait_log(1, f"/{VOL}/liverestore/{VOL} (uio") and wait_log(1, f"/{VOL2}/liverestore/{VOL2} (uio")
    h1log = open(os.path.join(RUN, "handler1.log")).read()
    ev = [l.split(" INFO ", 1)[1] for l in h1log.splitlines() if "netlink: cmd" in l]
    result("netlink_discovery", served and any("cmd 1 " in l for l in ev), "; ".join(ev))
    sh("iscsid || true", check=False)
    time.sleep(1)
    sh("iscsiadm -m discovery -t st -p 127.0.0.1:3260")
    node = f"iscsiadm -m node -T {IQN} -p 127.0.0.1:3260"
    sh(f"{node} -o update -n node.session.auth.authmethod -v CHAP")
    sh(f"{node} -o update -n node.session.auth.username -v {CHAP_USER}")
    sh(f"{node} -o update -n node.session.auth.password -v {CHAP_PASS}")
    sh(f"{node} --login")
    disks = disks_of(None, 2)
    disk, disk2 = disks[0], disks[1]
    size = int(open(f"/sys/block/{os.path.basename(disk)}/size").read()) * 512
    vendor = open(f"/sys/block/{os.path.basename(disk)}/device/vendor").read().strip()
    size2 = int(open(f"/sys/block/{os.path.basename(disk2)}/size").read()) * 512
    lbs2 = int(open(f"/sys/block/{os.path.basename(disk2)}/queue/logical_block_size").read())
    result("iscsi_login_chap", size == SIZE and size2 == SIZE2 and lbs2 == 4096,
           f"lun0={disk} size={size} vendor={vendor}; lun1={disk2} size={size2} block={lbs2}")

    # second device: raw direct I/O, and the bytes must land in its backing file
    blob = os.urandom(3 << 20)
    with open("/tmp/blob", "wb") as f:
        f.write(blob)
    sh(f"dd if=/tmp/blob of={disk2} bs=64k seek=80 oflag=direct conv=fsync status=none")
    back = sh(f"dd if={disk2} bs=64k skip=80 count=48 iflag=direct status=none | sha256sum").stdout.split()[0]
    with open(IMG2, "rb") as f:
        f.seek(80 * 65536)
        in_file = f.read(3 << 20)
    result("second_device_raw_io", back == hashlib.sha256(blob).hexdigest() and in_file == blob,
           f"read back ok={back == hashlib.sha256(blob).hexdigest()} backing file ok={in_file == blob}")

    t0 = time.time()
    sh(f"mkfs.ext4 -q -F -E lazy_itable_init=0,lazy_journal_init=0 {disk}", timeout=300)
    os.makedirs(MNT, exist_ok=True)
    sh(f"mount {disk} {MNT}")
    sums = {}
    for i in range(12):
        p = f"{MNT}/f{i:02d}"
        with open(p, "wb") as f:
            f.write(os.urandom(256 << 10 if i % 3 else 1 << 20))
        sums[p] = sha(p)
    sh("sync")
    sh(f"umount {MNT}")
    drop_caches()
    sh(f"mount {disk} {MNT}")
    bad = [p for p, s in sums.items() if sha(p) != s]
    result("mkfs_write_readback", not bad, f"{len(sums)} files, {time.time() - t0:.1f}s, mismatches={bad}")

    # --- kill the handler in the middle of a write stream -----------------------------
    big = f"{MNT}/stream.bin"
    src = "/tmp/stream.src"
    with open(src, "wb") as f:
        f.write(os.urandom(24 << 20))
    src_sum = sha(src)
    dd = subprocess.Popen(["dd", f"if={src}", f"of={big}", "bs=256k", "oflag=direct", "conv=fsync"],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for _ in range(100):                      # wait for the stream to be under way
        time.sleep(0.1)
        if os.path.exists(big) and os.path.getsize(big) >= (2 << 20):
            break
    written_at_kill = os.path.getsize(big) if os.path.exists(big) else 0
    # freeze the handler so commands certainly pile up on the ring, then kill it
    # (TCMU allows one opener of the uio device: the ring is read after the kill)
    h1.send_signal(signal.SIGSTOP)
    time.sleep(1.5)
    h1.send_signal(signal.SIGKILL)
    h1.wait()
    pending = mailbox()
    log(f"handler #1 SIGKILLed with {written_at_kill} bytes of the stream written; dd running={dd.poll() is None}; "
        f"ring at kill: cmd_tail {pending[0]} cmd_head {pending[1]}")
    result("commands_pending_at_kill", pending[0] != pending[1], f"cmd_tail={pending[0]} cmd_head={pending[1]}")
    time.sleep(2)                             # commands pile up on the ring meanwhile
    h2 = start_handler(2)
    out, _ = dd.communicate(timeout=300)
    log("dd: " + " | ".join(out.strip().splitlines()[-2:]))
    result("stream_survives_handler_kill", dd.returncode == 0 and written_at_kill < (24 << 20),
           f"dd rc={dd.returncode} killed at {written_at_kill}/{24 << 20} bytes")
    h2log = open(os.path.join(RUN, "handler2.log")).read()
    result("reset_ring_on_restart", "ring reset" in h2log,
           "; ".join(l for l in h2log.splitlines() if "reset" in l)[:300])
    # --- parallel direct I/O through the restarted handler ------------------------------
    par = {}
    procs = []
    for i in range(4):
        srcp = f"/tmp/par{i}.src"
        with open(srcp, "wb") as f:
            f.write(os.urandom(3 << 20))
        par[f"{MNT}/par{i}"] = sha(srcp)
        procs.append(subprocess.Popen(["dd", f"if={srcp}", f"of={MNT}/par{i}", "bs=64k", "oflag=direct",
                                       "conv=fsync"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    rcs = [p.wait(timeout=300) for p in procs]
    drop_caches()
    bad = [p for p, s in par.items() if sha(p) != s]
    result("parallel_direct_io", rcs == [0] * 4 and not bad, f"dd rcs={rcs} mismatches={bad}")
    sh("sync")
    sh(f"umount {MNT}")
    drop_caches()
    fsck = sh(f"fsck.ext4 -n -f {disk}", check=False, timeout=300)
    result("fsck_clean", fsck.returncode == 0, (fsck.stdout.strip().splitlines() or [""])[-1])
    sh(f"mount -o ro {disk} {MNT}")
    bad = [p for p, s in sums.items() if sha(p) != s] + [p for p, s in par.items() if sha(p) != s]
    big_ok = sha(big) == src_sum
    result("checksums_after_restart", not bad and big_ok, f"files mismatched={bad} stream_ok={big_ok}")
    sh(f"umount {MNT}")
    errs = kernel_log("I/O error")
    result("no_block_io_errors", not errs, " | ".join(errs[:3]))
    for l in kernel_log("TCMU") + kernel_log("tcmu"):
        log("dmesg: " + l)

    # --- teardown ---------------------------------------------------------------------
    sh(f"{node} --logout", check=False)
    rep3 = lio.teardown(desc)                 # handler #2 still running: it must let go by netlink
    dropped = all(wait_log(2, f"/{v}/liverestore/{v}: commands=") for v in (VOL, VOL2))   # logged on removal
    h2log = open(os.path.join(RUN, "handler2.log")).read()
    ev = [l.split(" INFO ", 1)[1] for l in h2log.splitlines() if "netlink: cmd" in l]
    result("netlink_removal", dropped and any("cmd 2 " in l for l in ev), "; ".join(ev))
    for l in h2log.splitlines():
        if "commands=" in l:
            log("handler #2 ring stats: " + l.split(" INFO ", 1)[1])
    h2.send_signal(signal.SIGTERM)
    h2.wait(timeout=30)
    left = glob.glob(f"/sys/kernel/config/target/core/user_*/vmvol*") + glob.glob(
        f"/sys/kernel/config/target/iscsi/{IQN}")
    result("lio_teardown", rep3.changed and not left and not lio.teardown(desc).changed,
           f"{len(rep3.changes)} changes, left={left}")
    print(f"SUMMARY: {len(failures)} failed: {failures}" if failures else "SUMMARY: all passed", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    run_main(main, "guest_script", ["handler1.log", "handler2.log"], tail=30)
