#!/usr/bin/env bash
# iSCSI throughput/IOPS: liverestore's embedded target vs tgtd (C), on equal
# 1 GiB file-backed LUNs, interleaving the two targets, all on 127.0.0.1.
#
#   rand4k read   iscsi-perf -r, 4 KiB, 32 in flight, timed
#   rand4k write  qemu-img bench -w, 4 KiB, depth 32 (a scattered stride
#                 over the whole LUN: qemu-img bench has no random mode)
#   seq1m read    iscsi-perf (sequential), 1 MiB, 32 in flight, timed
#   seq1m write   qemu-img bench -w, 1 MiB, depth 32, the whole LUN
#
# Both LUNs are filled with data first, so reads hit real blocks. Prints a
# table and ratios (ours/tgtd); the last line is one JSON object. Goals
# (reported, not asserted): >= 0.5 for 4 KiB, >= 0.8 for 1 MiB.
# Per-command CPU of each target in every test (process CPU seconds from
# /proc, all threads, / commands completed) is reported beside them: it is
# what the target costs the machine, whatever the initiator gets.
#
# Env: ROUNDS (2), SECS (iscsi-perf seconds per run, 6), SIZE_MB (1024),
#      RAND_WRITES (4K writes per run, 60000), PYSPY_OUT (file: profile the
#      daemon with py-spy for the whole run; PYSPY_FORMAT raw (collapsed
#      stacks, default) or speedscope).
# Needs root (tgtd), libiscsi-bin, tgt, qemu-utils + qemu-block-extra.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
PY="$ROOT/.venv/bin/python"
[ -x "$PY" ] || PY="$(command -v python3)"
ROUNDS=${ROUNDS:-2}
SECS=${SECS:-6}
SIZE_MB=${SIZE_MB:-1024}
RAND_WRITES=${RAND_WRITES:-60000}
# 4 KiB stride of a prime number of blocks: coprime with the LUN's block
# count, so successive writes land far apart and cover the whole LUN.
STRIDE=$((104729 * 4096))

for t in iscsi-perf qemu-img tgtd tgtadm; do
  command -v "$t" >/dev/null || { echo "iscsi.sh: $t not found (bash .ci/install --test)" >&2; exit 2; }
done

T="$(mktemp -d /tmp/lr-iscsi-bench.XXXXXX)"
DPID="" TPID="" SPID="" CTL=""
cleanup() {
  set +e
  [ -n "$SPID" ] && kill -INT "$SPID" 2>/dev/null && wait "$SPID" 2>/dev/null
  if [ -n "$TPID" ]; then
    tgtadm -C "$CTL" --lld iscsi --mode target --op delete --force --tid 1 >/dev/null 2>&1
    tgtadm -C "$CTL" --mode system --op delete >/dev/null 2>&1
    for _ in $(seq 50); do kill -0 "$TPID" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$TPID" 2>/dev/null; wait "$TPID" 2>/dev/null
    rm -f "/var/run/tgtd/socket.$CTL" "/var/run/tgtd/socket.$CTL.lock"
  fi
  if [ -n "$DPID" ]; then
    kill -TERM "$DPID" 2>/dev/null
    for _ in $(seq 100); do kill -0 "$DPID" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$DPID" 2>/dev/null; wait "$DPID" 2>/dev/null
  fi
  rm -rf "$T"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

free_port() { "$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# -- our target: a daemon with one 1 GiB volume exported as LUN 0 -----------------
LR=("$PY" -m target.cli --socket "$T/control.sock")
OPORT=$(free_port)
OIQN=iqn.2026-11.io.liverestore.bench:ours
(cd "$ROOT" && exec "${LR[@]}" serve --init --state-dir "$T/state" \
   --portal "127.0.0.1:$OPORT" >"$T/daemon.log" 2>&1) &
DPID=$!
for _ in $(seq 200); do
  [ -S "$T/control.sock" ] && (cd "$ROOT" && "${LR[@]}" status >/dev/null 2>&1) && break
  kill -0 "$DPID" 2>/dev/null || { cat "$T/daemon.log" >&2; exit 1; }
  sleep 0.1
done
(cd "$ROOT" && "${LR[@]}" volume create bench --size "${SIZE_MB}M" >/dev/null \
   && "${LR[@]}" export create "$OIQN" --lun 0=bench >/dev/null)
OURS="iscsi://127.0.0.1:$OPORT/$OIQN/0"

# -- the peer: tgtd with one 1 GiB file as LUN 1 -----------------------------------
TPORT=$(free_port)
while :; do CTL=$((10000 + RANDOM % 22000)); [ -e "/var/run/tgtd/socket.$CTL" ] || break; done
TIQN=iqn.2026-11.io.liverestore.bench:tgt
truncate -s "${SIZE_MB}M" "$T/tgt.img"
tgtd -f -C "$CTL" --iscsi "portal=127.0.0.1:$TPORT" >"$T/tgtd.log" 2>&1 &
TPID=$!
for _ in $(seq 100); do
  tgtadm -C "$CTL" --lld iscsi --mode target --op show >/dev/null 2>&1 && break; sleep 0.1
done
tgtadm -C "$CTL" --lld iscsi --mode target --op new --tid 1 -T "$TIQN"
tgtadm -C "$CTL" --lld iscsi --mode logicalunit --op new --tid 1 --lun 1 -b "$T/tgt.img"
tgtadm -C "$CTL" --lld iscsi --mode target --op bind --tid 1 -I ALL
TGT="iscsi://127.0.0.1:$TPORT/$TIQN/1"

PYSPY=$(command -v py-spy || echo "$ROOT/.venv/bin/py-spy")
if [ -n "${PYSPY_OUT:-}" ] && [ -x "$PYSPY" ]; then
  "$PYSPY" record -p "$DPID" -r 200 -f "${PYSPY_FORMAT:-raw}" -o "$PYSPY_OUT" >"$T/py-spy.log" 2>&1 &
  SPID=$!
fi

# -- measurements: each prints "<IOPS> <MB/s>" (perf: "<IOPS> <MB/s> <CPU us/command>")
TICK=$(getconf CLK_TCK)
cpu_ticks() {   # PID: user + system clock ticks of the whole process
  # the fields after the ")" that ends the command name: utime is the 12th, stime the 13th
  local s; s=$(</proc/"$1"/stat); s=${s##*) }
  awk '{ print $12 + $13 }' <<<"$s"
}
perf() {   # URL BLOCKS(512 B) RANDOM(0/1) TARGET-PID
  local r=() out c0 c1
  [ "$3" = 1 ] && r=(-r)
  c0=$(cpu_ticks "$4")
  out=$(timeout $((SECS + 30)) iscsi-perf -m 32 -b "$2" -t "$SECS" "${r[@]}" "$1" 2>&1 | tr '\r' '\n') \
    || { echo "iscsi-perf failed on $1: $(tail -c 500 <<<"$out")" >&2; return 1; }
  c1=$(cpu_ticks "$4")
  awk -v c="$((c1 - c0))" -v tick="$TICK" -v secs="$SECS" '
       /iops average/ { for (i = 1; i <= NF; i++) if ($i == "average") { iops = $(i+1); mb = $(i+2) } }
       END { gsub(/\(/, "", mb); printf "%d %d %.1f\n", iops, mb, (iops > 0 ? c / tick / (iops * secs) * 1e6 : 0) }' <<<"$out"
}
qbench() {   # URL SIZE COUNT STEP TARGET-PID
  local out c0 c1
  c0=$(cpu_ticks "$5")
  out=$(timeout 120 qemu-img bench -f raw -t none -w -c "$3" -d 32 -s "$2" -S "$4" \
        --pattern=0x5a "$1" 2>&1) || { echo "qemu-img bench failed on $1: $out" >&2; return 1; }
  c1=$(cpu_ticks "$5")
  local secs; secs=$(sed -n 's/^Run completed in \([0-9.]*\) seconds.*/\1/p' <<<"$out")
  local bytes; bytes=$(numfmt --from=iec "${2^^}")
  awk -v n="$3" -v s="$secs" -v b="$bytes" -v c="$((c1 - c0))" -v tick="$TICK" \
      'BEGIN { printf "%d %d %.1f\n", n / s, n * b / s / 1048576, c / tick / n * 1e6 }'
}

ONE_MB_COUNT=$SIZE_MB
echo "filling both LUNs (${SIZE_MB} MiB each) ..." >&2
qbench "$TGT" 1M "$ONE_MB_COUNT" 1M "$TPID" >/dev/null
qbench "$OURS" 1M "$ONE_MB_COUNT" 1M "$DPID" >/dev/null

declare -A SUM CNT
add() { SUM[$1]=$(awk -v a="${SUM[$1]:-0}" -v b="$2" 'BEGIN { print a + b }'); CNT[$1]=$(( ${CNT[$1]:-0} + 1 )); }
record() {   # TARGET-LABEL TEST "<IOPS> <MB/s> <CPU us/command>"
  local v=$3
  add "$1.$2" "${v%% *}"; v=${v#* }; add "$1.$2.mb" "${v%% *}"; add "$1.$2.cpu_us" "${v#* }"
}
run_one() {   # TARGET-LABEL URL PID
  local l=$1 u=$2 v
  v=$(perf "$u" 8 1 "$3");                              record "$l" rand4k_read "$v"
  v=$(qbench "$u" 4k "$RAND_WRITES" "$STRIDE" "$3");    record "$l" rand4k_write "$v"
  v=$(perf "$u" 2048 0 "$3");                           record "$l" seq1m_read "$v"
  v=$(qbench "$u" 1M "$ONE_MB_COUNT" 1M "$3");          record "$l" seq1m_write "$v"
  echo "  round $r $l done" >&2
}
for r in $(seq "$ROUNDS"); do
  if (( r % 2 )); then run_one tgtd "$TGT" "$TPID"; run_one ours "$OURS" "$DPID"
  else run_one ours "$OURS" "$DPID"; run_one tgtd "$TGT" "$TPID"; fi
done

avg() { awk -v s="${SUM[$1]}" -v n="${CNT[$1]}" 'BEGIN { printf "%.0f", s / n }'; }
avg1() { awk -v s="${SUM[$1]}" -v n="${CNT[$1]}" 'BEGIN { printf "%.1f", s / n }'; }
ratio() { awk -v a="$(avg "ours.$1")" -v b="$(avg "tgtd.$1")" 'BEGIN { printf "%.3f", (b > 0 ? a / b : 0) }'; }

printf '\n%-14s %10s %9s %8s %10s %9s %8s %7s %6s\n' test "tgtd IOPS" "tgtd MB/s" "tgtd us" \
  "ours IOPS" "ours MB/s" "ours us" ratio goal
for k in rand4k_read rand4k_write seq1m_read seq1m_write; do
  goal=0.5; [[ $k == seq1m* ]] && goal=0.8
  printf '%-14s %10s %9s %8s %10s %9s %8s %7s %6s\n' "$k" "$(avg tgtd.$k)" "$(avg tgtd.$k.mb)" \
    "$(avg1 tgtd.$k.cpu_us)" "$(avg ours.$k)" "$(avg ours.$k.mb)" "$(avg1 ours.$k.cpu_us)" \
    "$(ratio $k)" ">=$goal"
done
echo "(us: the target process's CPU time per command, all threads, user + system)"
echo "(mean of $ROUNDS interleaved rounds; 512 B blocks; 32 in flight; ${SIZE_MB} MiB LUNs)"
json=""
for k in rand4k_read rand4k_write seq1m_read seq1m_write; do
  json+="\"${k}_ratio\": $(ratio $k), \"${k}_cpu_us_ours\": $(avg1 ours.$k.cpu_us), "
  json+="\"${k}_cpu_us_tgtd\": $(avg1 tgtd.$k.cpu_us), "
done
printf '{%s}\n' "${json%, }"
