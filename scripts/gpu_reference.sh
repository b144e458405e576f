#!/usr/bin/env bash
# One command for a GPU reference run (docs/gpu.md):
#   bash scripts/gpu_reference.sh --out DIR [--preset paper] [--seeds 0 ...] [--budget SECONDS]
#        [--root data] [--work exp/gpu-reference] [--reserve 45] [any other ltr table1 flags]
# With the python3 on the PATH and no install or network: unpack the data pack once and check it,
# record the environment, smoke every Table-1 code path (preset tiny), train Table 1 two runs at a time
# until the budget runs out (runs stop at an epoch boundary with a checkpoint; the same command again
# resumes), time `ltr bench` if two minutes are left, and always leave ONE archive in DIR (no
# checkpoints) beside environment.json, run.log, table1.md and bench.json.
# Exit code: 0 done, 3 cut by the budget (rerun to resume), anything else failed (run.log says where).
set -euo pipefail
cd "$(dirname "$0")/.."
T0=$(date +%s)

OUT="" PRESET=paper ROOT=data WORK=exp/gpu-reference BUDGET="" RESERVE=45 JOBS=2
SEEDS=(0)
EXTRA=()
while [ $# -gt 0 ]; do
  case "$1" in
    --out) OUT="$2"; shift 2 ;;
    --preset) PRESET="$2"; shift 2 ;;
    --root) ROOT="$2"; shift 2 ;;
    --work) WORK="$2"; shift 2 ;;
    --budget) BUDGET="$2"; shift 2 ;;
    --reserve) RESERVE="$2"; shift 2 ;;
    --jobs) JOBS="$2"; shift 2 ;;
    --seeds)
      shift; SEEDS=()
      while [ $# -gt 0 ] && [[ "$1" != --* ]]; do SEEDS+=("$1"); shift; done ;;
    *) EXTRA+=("$1"); shift ;;  # passed through to `ltr table1` (e.g. --cb-variant both, --compile)
  esac
done
if [ -z "$OUT" ]; then
  echo "gpu_reference: --out DIR is required (where the archive and the environment go)" >&2
  exit 2
fi
# Default budget: what is left of 9.5 minutes since the script started (a GPU command may run 10).
BUDGET=${BUDGET:-570}
END=$((T0 + ${BUDGET%.*}))
# Progress bars redraw at most every 20 s: the log stays readable and the returned tail shows the steps.
export TQDM_MININTERVAL=${TQDM_MININTERVAL:-20}
mkdir -p "$OUT" "$WORK/logs"
OUT=$(cd "$OUT" && pwd)
TABLE_DIR="$WORK/table1-$PRESET"
ARCHIVE="results-$PRESET.tar.gz"
STATUS="failed"
STEP="start"

say() { echo "[gpu_reference $(( $(date +%s) - T0 ))s] $*"; }
left() { echo $(( END - $(date +%s) )); }

finish() {
  local rc=$?
  set +e
  trap - EXIT
  if [ "$rc" -ne 0 ] && [ "$STATUS" = "failed" ]; then
    say "FAILED in step '$STEP' (exit code $rc); its log: $OUT/run.log and $WORK/logs/$STEP.log"
  fi
  [ -f "$TABLE_DIR/table1.md" ] && cp "$TABLE_DIR/table1.md" "$OUT/table1.md"
  [ -s "$WORK/bench.json" ] && cp "$WORK/bench.json" "$OUT/bench.json"
  [ -f "$WORK/environment.json" ] && cp "$WORK/environment.json" "$OUT/environment.json"
  cp "$OUT/run.log" "$WORK/logs/run.log" 2>/dev/null
  say "status: $STATUS; writing the archive"
  python3 scripts/gpu_reference.py archive "$WORK" "$OUT" "$ARCHIVE"
  say "done in $(( $(date +%s) - T0 ))s: $(ls "$OUT" | tr '\n' ' ')"
  exit "$rc"
}
trap finish EXIT
exec > >(tee -a "$OUT/run.log") 2>&1

# run STEP CMD...: the command's output to the console, run.log and logs/STEP.log.
run() {
  STEP="$1"; shift
  say "$STEP: $*"
  "$@" 2>&1 | tee "$WORK/logs/$STEP.log"
}

STEP="python"
command -v python3 >/dev/null || { say "no python3 on the PATH"; exit 1; }
python3 -c "import torch, torchvision, numpy, pandas, matplotlib, tqdm" \
  || { say "python3 lacks one of torch, torchvision, numpy, pandas, matplotlib, tqdm"; exit 1; }

run data python3 scripts/gpu_reference.py prepare "$ROOT" "$WORK/environment.json" "${EXTRA[@]}"
CUDA=$(python3 -c "import json; print(int(json.load(open('$WORK/environment.json'))['cuda_available']))")
[ "$CUDA" = 1 ] || say "no CUDA GPU here: a CPU rehearsal (the paper preset refuses to start without --allow-cpu)"

time_limit() {  # LIMIT = seconds the next step may train; the cut (exit 3) when none are left
  LIMIT=$(( $(left) - RESERVE ))
  if [ "$LIMIT" -le 0 ]; then STATUS="cut"; say "the budget is spent before '$1' (rerun to resume)"; exit 3; fi
}

if [ "$PRESET" = tiny ]; then
  say "smoke: skipped (the table itself runs the tiny preset)"
else
  time_limit smoke
  run smoke python3 -m ltr table1 --preset tiny --jobs 2 --seeds "${SEEDS[0]}" --root "$ROOT" \
    --out "$WORK/smoke" --no-figures --time-limit "$LIMIT" "${EXTRA[@]}"
fi

time_limit table1
set +e
run table1 python3 -m ltr table1 --preset "$PRESET" --jobs "$JOBS" --seeds "${SEEDS[@]}" --root "$ROOT" \
  --out "$TABLE_DIR" --time-limit "$LIMIT" "${EXTRA[@]}"
rc=$?  # pipefail: the exit code of ltr, not of tee
set -e
if [ "$rc" -eq 3 ]; then
  STATUS="cut"
  say "table1 was cut by the budget: every unfinished run kept its checkpoint; run the same command again"
  exit 3
elif [ "$rc" -ne 0 ]; then
  exit "$rc"
fi
STATUS="done"

if [ "$(left)" -ge 120 ]; then
  if [ "$CUDA" = 1 ]; then
    MODES=(none default)
    [ "$(left)" -ge 200 ] && MODES+=(reduce-overhead)
    BENCH=(--device cuda --model resnet34 --precision bf16 --compile-mode "${MODES[@]}")
  else  # the rehearsal: the same path, small enough for seconds
    BENCH=(--device cpu --model resnet8 --precision fp32 --compile-mode none --steps 2 --warmup 1)
  fi
  STEP="bench"
  say "bench: ltr bench ${BENCH[*]} (at most $(( $(left) - 30 ))s)"
  if ! timeout "$(( $(left) - 30 ))" python3 -m ltr bench "${BENCH[@]}" --root "$ROOT" --json \
      > "$WORK/bench.json" 2> "$WORK/logs/bench.log"; then
    say "bench did not finish (timed out or failed; $WORK/logs/bench.log); the table is complete"
    rm -f "$WORK/bench.json"
  else
    python3 -c "import json, sys; sys.path.insert(0, '.'); from ltr.experiments.bench import format_result; \
print(format_result(json.load(open('$WORK/bench.json'))))"
  fi
else
  say "bench: skipped ($(left)s left, under 2 minutes)"
fi
