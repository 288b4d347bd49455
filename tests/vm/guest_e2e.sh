#!/usr/bin/env bash
# Runs inside the guest as root: $1 is the shared read-write run directory,
# holding "env" (REPO=..., PY=..., optionally PARTS=...) written by the host
# side. One boot runs three parts: guest_e2e.py (target.tcmu + target.lio with
# PlainLunIO, tears its LIO config down), guest_restore.py (liverestore
# serve --backend lio: restore under I/O, daemon kill, libiscsi, fio), then
# guest_admin.py (the LIO path as admins run it: dbroot, targetcli, D-Bus,
# drift, tcmu-runner beside us, saveconfig + targetctl restore).
set -u
DIR=$1
PARTS=${PARTS:-"e2e restore admin"}
. "$DIR/env"
# What a fresh host has (nothing prepared here): guest_admin.py checks it.
cat /sys/kernel/config/target/dbroot > "$DIR/boot-dbroot" 2>/dev/null
[ -e /etc/target ] && echo present > "$DIR/boot-etc-target"
export PYTHONDONTWRITEBYTECODE=1 PYTHONPATH="$REPO"
cd "$REPO" || exit 1
rc=0
for part in $PARTS; do
  echo "=== guest part $part"
  "$PY" "$REPO/tests/vm/guest_$part.py" "$DIR" || rc=1
done
exit $rc
