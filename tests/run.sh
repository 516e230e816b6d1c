#!/usr/bin/env bash
# make test: the end-to-end boots (minutes each where KVM emulates guest kernel code) run in
# the foreground, in order; the unit and KVM tests run beside them on the other core, and
# their report follows. Arguments go to both pytest runs (e.g. a path or -k).
set -u
PY=${PY:-.venv/bin/python}
LOG=${VMRUN_UNITS_LOG:-.test-units.log}
# Job control on: without it bash starts a background job with SIGINT ignored, and the tests
# that interrupt a conversion as Ctrl-C would (SIGINT to vmrun) would see nothing happen.
set -m
"$PY" -m pytest -q -ra -p no:cacheprovider -m "not e2e and not e2e_pending" "$@" >"$LOG" 2>&1 &
units_pid=$!
set +m
trap 'kill "$units_pid" 2>/dev/null' INT TERM
echo "==> unit and KVM tests running beside the end-to-end boots (their report follows)"
"$PY" -m pytest -ra -m "e2e and not e2e_pending" --durations=15 "$@"
e2e=$?
wait "$units_pid"
units=$?
echo "==> unit and KVM tests:"
cat "$LOG"
# 5 is pytest's "nothing collected": fine for one of the two runs, not for both.
ok() { [ "$1" -eq 0 ] || [ "$1" -eq 5 ]; }
if ok "$e2e" && ok "$units"; then
    [ "$e2e" -eq 5 ] && [ "$units" -eq 5 ] && exit 5
    exit 0
fi
ok "$e2e" || exit "$e2e"
exit "$units"
