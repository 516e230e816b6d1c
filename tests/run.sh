#!/usr/bin/env bash
# make test: the end-to-end boots (minutes each where KVM emulates guest kernel code) and the
# unit and KVM tests, side by side. Without arguments the end-to-end modules go to two pytest
# runs at once: the shared device boot's modules (tests/e2e/conftest.py) and the rest, each
# booting one guest at a time (tests/e2e/harness.py holds a host-wide slot per guest: one per
# host CPU). The second run and the unit run report after the first one. Arguments (a path,
# -k) go to one end-to-end run and the unit run instead.
set -u
PY=${PY:-.venv/bin/python}
LOG=${VMRUN_UNITS_LOG:-.test-units.log}
DEVLOG=${VMRUN_DEVICES_LOG:-.test-e2e-devices.log}
DEVICES=(tests/e2e/test_ahci.py tests/e2e/test_fbuf.py tests/e2e/test_net.py
         tests/e2e/test_xhci.py)
E2E=(-ra -m "e2e and not e2e_pending and not slow" --durations=15)
# Each end-to-end run keeps its guests' consoles, vmrun's messages and timelines here (beside
# their machine files) until the next make test, for a post-mortem.
TMP=${VMRUN_E2E_TMP:-${TMPDIR:-/tmp}/vmrun-e2e-$(id -u)}
mkdir -p "$TMP"     # pytest makes --basetemp but not its parent (a fresh machine has none)
# Job control on: without it bash starts a background job with SIGINT ignored, and the tests
# that interrupt a conversion as Ctrl-C would (SIGINT to vmrun) would see nothing happen.
set -m
"$PY" -m pytest -q -ra -p no:cacheprovider -m "not e2e and not e2e_pending and not slow" "$@" >"$LOG" 2>&1 &
units_pid=$!
devices_pid=
if [ $# -eq 0 ]; then
    "$PY" -m pytest -p no:cacheprovider "${E2E[@]}" --basetemp "$TMP/devices" "${DEVICES[@]}" \
        >"$DEVLOG" 2>&1 &
    devices_pid=$!
fi
set +m
trap 'kill $units_pid $devices_pid 2>/dev/null' INT TERM
if [ -n "$devices_pid" ]; then
    echo "==> the shared device boot's checks and the unit and KVM tests run beside these" \
         "(their reports follow)"
    deselect=()
    for m in "${DEVICES[@]}"; do deselect+=(--ignore "$m"); done
    "$PY" -m pytest "${E2E[@]}" --basetemp "$TMP/main" tests/e2e "${deselect[@]}"
else
    echo "==> the unit and KVM tests run beside the end-to-end boots (their report follows)"
    "$PY" -m pytest "${E2E[@]}" --basetemp "$TMP/main" "$@"
fi
e2e=$?
devices=0
if [ -n "$devices_pid" ]; then
    wait "$devices_pid"
    devices=$?
    echo "==> the shared device boot's checks:"
    cat "$DEVLOG"
fi
wait "$units_pid"
units=$?
echo "==> unit and KVM tests:"
cat "$LOG"
# 5 is pytest's "nothing collected": fine for some of the runs, not for all.
ok() { [ "$1" -eq 0 ] || [ "$1" -eq 5 ]; }
if ok "$e2e" && ok "$devices" && ok "$units"; then
    [ "$e2e" -eq 5 ] && [ "$units" -eq 5 ] && [ -z "$devices_pid" ] && exit 5
    exit 0
fi
ok "$e2e" || exit "$e2e"
ok "$devices" || exit "$devices"
exit "$units"
