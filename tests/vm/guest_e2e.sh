#!/usr/bin/env bash
# Runs inside the guest as root: $1 is the shared read-write run directory,
# holding "env" (REPO=..., PY=..., optionally PARTS=...) written by the host
# side. One boot runs both parts: guest_e2e.py (target.tcmu + target.lio with
# PlainLunIO, tears its LIO config down) then guest_restore.py (liverestore
# serve --backend lio: restore under I/O, daemon kill, libiscsi, fio).
set -u
DIR=$1
PARTS=${PARTS:-"e2e restore"}
. "$DIR/env"
mkdir -p /etc/target            # rtslib-fb's dbroot must exist
export PYTHONDONTWRITEBYTECODE=1 PYTHONPATH="$REPO"
cd "$REPO" || exit 1
rc=0
for part in $PARTS; do
  echo "=== guest part $part"
  "$PY" "$REPO/tests/vm/guest_$part.py" "$DIR" || rc=1
done
exit $rc
