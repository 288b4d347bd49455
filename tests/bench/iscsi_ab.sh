#!/usr/bin/env bash
# The embedded iSCSI target's cost per command, this tree against another
# revision of it (default: main), side by side in one run: two daemons
# (`liverestore serve`, the other revision exported with git archive into a
# scratch directory, both run by this tree's venv), one file-backed LUN
# each, all on 127.0.0.1; the tests alternate between them (A B, B A, ...)
# so both see the same spells of other processes' load.
#
#   rand4k read   iscsi-perf -r, 4 KiB, 32 in flight, timed
#   rand4k write  qemu-img bench -w, 4 KiB, depth 32 (a scattered stride
#                 over the whole LUN: qemu-img bench has no random mode)
#
# For each test and side: IOPS and the daemon's CPU time per command (all
# threads, user + system, from /proc, / commands completed); then the ratios
# this tree / the other (IOPS: > 1 is better; CPU: < 1 is better). The last
# line is one JSON object. Reports, never asserts.
#
#   bash tests/bench/iscsi_ab.sh [REV]        (REV: a commit or branch; main)
#
# Env: ROUNDS (4), SECS (iscsi-perf seconds per run, 5), SIZE_MB (256),
#      RAND_WRITES (4K writes per run, 30000).
# Needs libiscsi-bin, qemu-utils + qemu-block-extra. Run it under the
# machine's benchmark lock:  flock /tmp/liverestore-bench.lock bash ...
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
PY="$ROOT/.venv/bin/python"
[ -x "$PY" ] || PY="$(command -v python3)"
REV=${1:-main}
ROUNDS=${ROUNDS:-4}
SECS=${SECS:-5}
SIZE_MB=${SIZE_MB:-256}
RAND_WRITES=${RAND_WRITES:-30000}
STRIDE=$((104729 * 4096))      # a prime number of 4 KiB blocks apart (iscsi.sh)

for t in iscsi-perf qemu-img git; do
  command -v "$t" >/dev/null || { echo "iscsi_ab.sh: $t not found (bash .ci/install --test)" >&2; exit 2; }
done
git -C "$ROOT" rev-parse --verify -q "$REV^{commit}" >/dev/null \
  || { echo "iscsi_ab.sh: no revision $REV" >&2; exit 2; }

T="$(mktemp -d /tmp/lr-iscsi-ab.XXXXXX)"
PIDS=()
cleanup() {
  set +e
  for p in "${PIDS[@]}"; do kill -TERM "$p" 2>/dev/null; done
  for p in "${PIDS[@]}"; do
    for _ in $(seq 100); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$p" 2>/dev/null; wait "$p" 2>/dev/null
  done
  rm -rf "$T"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

mkdir "$T/other"
git -C "$ROOT" archive "$REV" | tar -x -C "$T/other"
# the optional native TCMU module is built, not in git: the other tree may use this one's
cp "$ROOT"/target/tcmu/_nativering*.so "$T/other/target/tcmu/" 2>/dev/null || true

free_port() { "$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
lr() {   # TREE LABEL ARGS...: the CLI of TREE against LABEL's daemon
  local tree=$1 label=$2; shift 2
  (cd "$tree" && PYTHONPATH="$tree" "$PY" -m target.cli --socket "$T/$label.sock" "$@")
}
declare -A URL PID
start() {   # LABEL TREE
  local l=$1 tree=$2 port; port=$(free_port)
  (cd "$tree" && PYTHONPATH="$tree" exec "$PY" -m target.cli --socket "$T/$l.sock" serve --init \
     --state-dir "$T/$l.state" --portal "127.0.0.1:$port" >"$T/$l.log" 2>&1) &
  PID[$l]=$!
  PIDS+=("${PID[$l]}")
  for _ in $(seq 200); do
    [ -S "$T/$l.sock" ] && lr "$tree" "$l" status >/dev/null 2>&1 && break
    kill -0 "${PID[$l]}" 2>/dev/null || { cat "$T/$l.log" >&2; exit 1; }
    sleep 0.1
  done
  lr "$tree" "$l" volume create bench --size "${SIZE_MB}M" >/dev/null
  lr "$tree" "$l" export create "iqn.2026-12.io.liverestore.ab:$l" --lun 0=bench >/dev/null
  URL[$l]="iscsi://127.0.0.1:$port/iqn.2026-12.io.liverestore.ab:$l/0"
}

TICK=$(getconf CLK_TCK)
cpu_ticks() {   # PID: user + system clock ticks of the whole process
  local s; s=$(</proc/"$1"/stat); s=${s##*) }
  awk '{ print $12 + $13 }' <<<"$s"
}
perf() {   # URL PID -> "<IOPS> <CPU us/command>"
  local out c0 c1
  c0=$(cpu_ticks "$2")
  out=$(timeout $((SECS + 30)) iscsi-perf -m 32 -b 8 -t "$SECS" -r "$1" 2>&1 | tr '\r' '\n') \
    || { echo "iscsi-perf failed on $1: $(tail -c 500 <<<"$out")" >&2; return 1; }
  c1=$(cpu_ticks "$2")
  awk -v c="$((c1 - c0))" -v tick="$TICK" -v secs="$SECS" '
       /iops average/ { for (i = 1; i <= NF; i++) if ($i == "average") iops = $(i+1) }
       END { printf "%d %.2f\n", iops, (iops > 0 ? c / tick / (iops * secs) * 1e6 : 0) }' <<<"$out"
}
qbench() {   # URL SIZE COUNT STEP PID -> "<IOPS> <CPU us/command>"
  local out c0 c1 secs
  c0=$(cpu_ticks "$5")
  out=$(timeout 300 qemu-img bench -f raw -t none -w -c "$3" -d 32 -s "$2" -S "$4" \
        --pattern=0x5a "$1" 2>&1) || { echo "qemu-img bench failed on $1: $out" >&2; return 1; }
  c1=$(cpu_ticks "$5")
  secs=$(sed -n 's/^Run completed in \([0-9.]*\) seconds.*/\1/p' <<<"$out")
  awk -v n="$3" -v s="$secs" -v c="$((c1 - c0))" -v tick="$TICK" \
      'BEGIN { printf "%d %.2f\n", n / s, c / tick / n * 1e6 }'
}

start other "$T/other"
start this "$ROOT"
echo "filling both LUNs (${SIZE_MB} MiB each) ..." >&2
for l in other this; do qbench "${URL[$l]}" 1M "$SIZE_MB" 1M "${PID[$l]}" >/dev/null; done

LOAD0=$(cut -d' ' -f1 /proc/loadavg)
declare -A SUM CNT
record() {   # SIDE TEST "<IOPS> <CPU us>"
  local k="$1.$2" v=$3
  SUM[$k.iops]=$(awk -v a="${SUM[$k.iops]:-0}" -v b="${v%% *}" 'BEGIN { print a + b }')
  SUM[$k.cpu]=$(awk -v a="${SUM[$k.cpu]:-0}" -v b="${v#* }" 'BEGIN { print a + b }')
  CNT[$k]=$(( ${CNT[$k]:-0} + 1 ))
  printf '  round %d %-5s %-12s %7s IOPS %7s us/command\n' "$r" "$1" "$2" "${v%% *}" "${v#* }" >&2
}
for r in $(seq "$ROUNDS"); do
  if (( r % 2 )); then order="other this"; else order="this other"; fi
  for l in $order; do
    record "$l" rand4k_read "$(perf "${URL[$l]}" "${PID[$l]}")"
    record "$l" rand4k_write "$(qbench "${URL[$l]}" 4k "$RAND_WRITES" "$STRIDE" "${PID[$l]}")"
  done
done
LOAD1=$(cut -d' ' -f1 /proc/loadavg)

mean() { awk -v s="${SUM[$1]}" -v n="${CNT[${1%.*}]}" 'BEGIN { printf "%.2f", s / n }'; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.3f", (b > 0 ? a / b : 0) }'; }
printf '\n%-13s %11s %9s %11s %9s %10s %9s\n' test "other IOPS" "other us" "this IOPS" "this us" \
  "IOPS ratio" "CPU ratio"
json=""
for k in rand4k_read rand4k_write; do
  oi=$(mean "other.$k.iops") oc=$(mean "other.$k.cpu") ti=$(mean "this.$k.iops") tc=$(mean "this.$k.cpu")
  printf '%-13s %11.0f %9s %11.0f %9s %10s %9s\n' "$k" "$oi" "$oc" "$ti" "$tc" \
    "$(ratio "$ti" "$oi")" "$(ratio "$tc" "$oc")"
  json+="\"${k}_iops_ratio\": $(ratio "$ti" "$oi"), \"${k}_cpu_ratio\": $(ratio "$tc" "$oc"), "
  json+="\"${k}_cpu_us_other\": $oc, \"${k}_cpu_us_this\": $tc, "
done
echo "(other: $REV $(git -C "$ROOT" rev-parse --short "$REV"); this: the working tree;" \
     "mean of $ROUNDS alternating rounds; load $LOAD0 -> $LOAD1)"
printf '{%s"load_1min": [%s, %s]}\n' "$json" "$LOAD0" "$LOAD1"
