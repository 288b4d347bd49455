#!/usr/bin/env bash
# Boots a throw-away guest (virtme-ng, QEMU TCG: no KVM here) on the newest
# /boot kernel, sharing the host root fs read-only and DIR read-write, loads
# configfs + LIO + TCMU + iSCSI target/initiator modules, runs SCRIPT as root.
# The guest's output goes to DIR/guest.log (printed at the end); the last
# line is "guest-exit: RC". Exit status 0 iff the script exited 0.
# Usage: run_in_vm.sh SCRIPT DIR [MEM]      (run setup_host.sh first)
# Adapted from shared/vm/run-in-lio-vm.sh.
set -euo pipefail
SCRIPT=$(realpath "$1"); DIR=$(realpath "$2"); MEM=${3:-2G}
VENV=${LIO_VM_VENV:-$HOME/.cache/lio-vm/venv}
KERNEL=$(ls /boot/vmlinuz-* | sort -V | tail -1)
cat > "$DIR/.guest-init.sh" <<GUEST
exec > "$DIR/guest.log" 2>&1
ip link set lo up
modprobe configfs && mount -t configfs none /sys/kernel/config 2>/dev/null || true
modprobe -a target_core_mod target_core_user target_core_file iscsi_target_mod iscsi_tcp
bash "$SCRIPT" "$DIR"; echo "guest-exit: \$?"
GUEST
rm -f "$DIR/guest.log"
PATH="$VENV/bin:$PATH" timeout "${LIO_VM_TIMEOUT:-480}" vng --run "$KERNEL" --disable-kvm -m "$MEM" \
  --overlay-rwdir /etc --overlay-rwdir /var --overlay-rwdir /run --overlay-rwdir /tmp \
  --rwdir "$DIR" --exec "bash $DIR/.guest-init.sh" </dev/null >"$DIR/vng.log" 2>&1 || true
cat "$DIR/guest.log" 2>/dev/null || { echo "no guest log; vng said:"; tail -20 "$DIR/vng.log"; }
grep -q '^guest-exit: 0$' "$DIR/guest.log"
