#!/usr/bin/env bash
# Installs what the VM tier needs on a Debian 12 host whose own kernel has no
# LIO/TCMU/iSCSI: QEMU, a Debian kernel with those modules, virtme-ng (in a
# venv), open-iscsi, e2fsprogs, fio, libiscsi-bin, tcmu-runner,
# qemu-utils, targetcli-fb, python3-rtslib-fb and dbus (the guest shares the host's root fs, so
# its tools come from here). Idempotent; needs root for apt.
# Usage: setup_host.sh [VENV]        (VENV defaults to ~/.cache/lio-vm/venv)
# Adapted from shared/vm/setup-host.sh.
set -euo pipefail
VENV=${1:-$HOME/.cache/lio-vm/venv}
need=()
ls /boot/vmlinuz-* >/dev/null 2>&1 || need+=(linux-image-amd64)
command -v qemu-system-x86_64 >/dev/null || need+=(qemu-system-x86)
command -v busybox >/dev/null || need+=(busybox-static)
command -v iscsiadm >/dev/null || need+=(open-iscsi)
command -v mkfs.ext4 >/dev/null || need+=(e2fsprogs)
command -v tcmu-runner >/dev/null || need+=(tcmu-runner)      # the benchmark's qcow handler
command -v qemu-img >/dev/null || need+=(qemu-utils)          # its qcow2 image
command -v fio >/dev/null || need+=(fio)
command -v targetcli >/dev/null || need+=(targetcli-fb)       # the admin's tool, as Debian ships it
command -v targetctl >/dev/null || need+=(python3-rtslib-fb)  # targetctl save/restore (the boot service)
command -v dbus-daemon >/dev/null || need+=(dbus)             # the system bus targetcli asks for handlers
command -v iscsi-test-cu >/dev/null || need+=(libiscsi-bin)   # the conformance subset
command -v python3 >/dev/null || need+=(python3)
python3 -c 'import venv, ensurepip' 2>/dev/null || need+=(python3-venv)
if [ ${#need[@]} -gt 0 ]; then
  [ "$(id -u)" = 0 ] || { echo "setup_host: need root to install: ${need[*]}" >&2; exit 2; }
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi
if [ ! -x "$VENV/bin/vng" ]; then
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q virtme-ng
fi
echo "ready: kernel $(ls /boot/vmlinuz-* | sort -V | tail -1), $("$VENV/bin/vng" --version 2>&1 | tail -1)"
