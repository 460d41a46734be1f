#!/usr/bin/env bash
# The model-card evaluation on a GPU host (numpy, scipy, torch, bm3d and the carried wheels suffice), within a
# minutes budget per call: call it again until it prints "complete" (finished parts wait in the cache folder
# while the machine stays warm). New weights in the same cache folder reuse its low-dose and BM3D parts, so
# carrying the cache of an earlier evaluation leaves only the models to run (and BM3D of the headline unit).
#
# Usage: scripts/evaluate_gpu.sh CASES.npz WEIGHTS_FOLDER [extra `langmamba evaluate` options, e.g. --tta]
#   CASES.npz: written here by `langmamba evaluate --export-npz out/eval/cases.npz --validation-data ...`
# Environment: EVAL (out/eval/run: metrics.json, its figure data, cache), MINUTES (8), RESULTS (when set,
# metrics.json, comparison.png / metrics_figure.npz and the log are copied there), PYTHON (python3).
set -euo pipefail
export PYTHONUNBUFFERED=1
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
[[ $# -ge 2 ]] || { echo "usage: $0 CASES.npz WEIGHTS_FOLDER [evaluate options]" >&2; exit 2; }
cases=$1 weights=$2
shift 2
PYTHON=${PYTHON:-python3}
EVAL=${EVAL:-out/eval/run}
MINUTES=${MINUTES:-8}
mkdir -p "$EVAL"
status=0
"$PYTHON" -m langmamba evaluate --cases "$cases" --weights "$weights" --output "$EVAL/metrics.json" \
  --figure "$EVAL/comparison.png" --cache "$EVAL/cache" --max-minutes "$MINUTES" "$@" 2>&1 \
  | tee -a "$EVAL/evaluate.log" || status=$?
case $status in
  0) echo "complete: $EVAL/metrics.json" ;;
  3) echo "incomplete: call again to continue" ;;
  *) echo "evaluation FAILED (exit $status); see $EVAL/evaluate.log" >&2 ;;
esac
if [[ -n "${RESULTS:-}" ]]; then
  mkdir -p "$RESULTS"
  for f in metrics.json comparison.png metrics_figure.npz evaluate.log; do
    [[ -f "$EVAL/$f" ]] && cp "$EVAL/$f" "$RESULTS/"
  done
fi
exit $status
