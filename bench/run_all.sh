#!/usr/bin/env bash
# Runs every benchmark and prints their tables, one after the other:
#   tick.py, policy_ticks.py, emergency.py, ingest.py, and simulate.py, predict.py and
#   frontier.py when present and runnable (simulate.py and frontier.py need the Bitbrains
#   trace in $BALLOON_TRACES_DIR or --trace, predict.py scikit-learn and a trained model). About 7 minutes on the 2-core machine.
#
# Usage: bash bench/run_all.sh [--only LIST] [--SCRIPT "ARGS"]... [INGEST ARGS]...
#   --only tick,policy_ticks,...   run just these (names without .py)
#   --tick "ARGS", --policy_ticks "ARGS", --emergency "ARGS", --ingest "ARGS",
#   --simulate "ARGS", --predict "ARGS", --frontier "ARGS"
#                                  extra arguments for that script, as one quoted string
#   anything else                  goes to ingest.py, as before (e.g. --duration 60)
# Examples:
#   bash bench/run_all.sh --duration 60
#   bash bench/run_all.sh --only tick,policy_ticks --policy_ticks "--sizes 1000,10000"
# PYTHON selects the interpreter (default: the project's .venv). A script that fails does not
# stop the others; the exit status is 1 if any failed (ingest.py: lost messages; emergency.py:
# an emergency that never reached the adapter).
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-.venv/bin/python}

scripts=(tick policy_ticks emergency ingest simulate predict frontier)
declare -A extra=()
only=""
ingest_args=()
while (($#)); do
    case "$1" in
        --only)
            only=${2:?--only needs a list}
            shift 2
            ;;
        --tick | --policy_ticks | --emergency | --ingest | --simulate | --predict | --frontier)
            extra[${1#--}]=${2?"$1 needs an argument string"}
            shift 2
            ;;
        *)
            ingest_args+=("$1")
            shift
            ;;
    esac
done

model=$(lscpu 2>/dev/null | sed -n 's/^Model name: *//p' | head -n 1)
echo "== $(date -u +%Y-%m-%dT%H:%M:%SZ), $(nproc) CPUs (${model:-unknown}), $("$python" -V 2>&1)"

runnable() {
    case "$1" in
        simulate | frontier)
            # The trace both read by default, unless --trace (or --recording) is given.
            [[ ${extra[$1]:-} == *--trace* || ${extra[$1]:-} == *--recording* ]] \
                || [[ -n ${BALLOON_TRACES_DIR:-} && -f $BALLOON_TRACES_DIR/bitbrains-rnd-2013-08.csv.gz ]] \
                || { echo "no Bitbrains trace (set BALLOON_TRACES_DIR or pass --trace)"; return 1; }
            ;;
        predict)
            "$python" -c "import sklearn" 2>/dev/null || { echo "scikit-learn is not installed"; return 1; }
            "$python" -c "from autoscaler.plugins import create_policy; create_policy('regressor')" \
                >/dev/null 2>&1 || { echo "the regressor policy cannot be created (no model?)"; return 1; }
            ;;
    esac
}

summary=()
failed=0
for name in "${scripts[@]}"; do
    if [[ -n $only && ",$only," != *",$name,"* ]]; then
        continue
    fi
    echo
    echo "== bench/$name.py  ($(date -u +%H:%M:%S))"
    if [[ ! -f bench/$name.py ]]; then
        summary+=("$name: not present")
        echo "not present, skipped"
        continue
    fi
    if ! why=$(runnable "$name"); then
        summary+=("$name: skipped ($why)")
        echo "skipped: $why"
        continue
    fi
    args=()
    if [[ -n ${extra[$name]:-} ]]; then
        read -r -a args <<<"${extra[$name]}"
    fi
    if [[ $name == ingest ]]; then
        args+=("${ingest_args[@]}")
    fi
    started=$SECONDS
    status=0
    "$python" -m "bench.$name" "${args[@]}" || status=$?
    summary+=("$name: exit $status, $((SECONDS - started)) s")
    ((status == 0)) || failed=1
done

echo
echo "== summary"
printf '%s\n' "${summary[@]}"
exit "$failed"
