#!/usr/bin/env bash
# Runs inside the guest as root: $1 is the shared read-write run directory,
# holding "env" (REPO=..., PY=...) written by the host side.
set -u
DIR=$1
. "$DIR/env"
mkdir -p /etc/target            # rtslib-fb's dbroot must exist
export PYTHONDONTWRITEBYTECODE=1 PYTHONPATH="$REPO"
cd "$REPO" && exec "$PY" "$REPO/tests/vm/guest_e2e.py" "$DIR"
