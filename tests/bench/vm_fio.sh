#!/usr/bin/env bash
# fio through real LIO + TCMU in a throw-away guest (QEMU TCG), in one boot:
# our daemon's LU (liverestore serve --backend lio) vs tcmu-runner's qcow
# handler vs LIO fileio, 4 KiB random read/write (QD16) and 1 MiB sequential
# (QD4), side by side. The same step runs inside the vm tier (pytest -m vm);
# this is the quick loop for it (~4 minutes: two rounds of turns).
#
# Prints the guest's BENCH lines; the last line is one JSON object with
# vs_tcmu_runner_4k, vs_tcmu_runner_1m (goals >= 1.0 and >= 0.8; issue 11).
# Env: LR_PYSPY=1 profiles our daemon during its 4K run (py-spy, collapsed
# stacks) into the run directory, whose path is printed; LR_PERF=1 counts
# the syscalls, context switches and page faults per I/O of our daemon and
# of tcmu-runner in their first 4K run (perf stat).
# Needs root; installs QEMU + a Debian kernel + virtme-ng on first use.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
PY="$ROOT/.venv/bin/python"
[ -x "$PY" ] || { echo "vm_fio.sh: $PY missing (bash .ci/install --test)" >&2; exit 2; }
bash "$ROOT/tests/vm/setup_host.sh" >/dev/null
RUN="$HOME/.cache/liverestore-vm/bench-$$-$(date +%s)"
mkdir -p "$RUN"
{ echo "REPO=$ROOT"; echo "PY=$PY"; echo "PARTS=bench"
  [ "${LR_PYSPY:-}" = 1 ] && echo "export LR_PYSPY=1"
  [ "${LR_PERF:-}" = 1 ] && echo "export LR_PERF=1"; } > "$RUN/env"
rc=0
LIO_VM_TIMEOUT=600 bash "$ROOT/tests/vm/run_in_vm.sh" "$ROOT/tests/vm/guest_e2e.sh" "$RUN" 3G \
  > "$RUN/out.txt" 2>&1 || rc=$?
grep -E '^(BENCH|RESULT)' "$RUN/out.txt" || true
echo "run directory: $RUN" >&2
[ "$rc" = 0 ] || { tail -30 "$RUN/out.txt" >&2; exit "$rc"; }
grep '^{"vs_tcmu_runner_4k"' "$RUN/out.txt" | tail -1
