#!/usr/bin/env bash
# Fit the word calibration (a temperature per pyramid level, objective top_word) of the shipped LangAE and of the
# LangAE copies inside both LangMambas on the validation patients of the prepared set (never lung2), and write
# the calibrated checkpoints into OUT (default out/calibrated/<model>); copy them over weights/ after a look.
# The denoisers' outputs do not change: only the quantizer's calibration buffer does.
#
# Usage: scripts/calibrate_words.sh [WEIGHTS (weights)] [DATA (out/prep/training.npz)] [OUT (out/calibrated)]
set -euo pipefail
cd "$(dirname "$0")/.."
WEIGHTS=${1:-weights}
DATA=${2:-out/prep/training.npz}
OUT=${3:-out/calibrated}
PYTHON=${PYTHON:-.venv/bin/python}
[[ -f "$DATA" ]] || { echo "error: $DATA does not exist (make prepare)" >&2; exit 1; }
patients=$("$PYTHON" -c "from langmamba.data.cases import VALIDATION, cases_in; print(' '.join(c.patient for c in cases_in(VALIDATION)))")
mkdir -p "$OUT"
for name in langae langmamba langmamba_no_langda; do
  [[ -f "$WEIGHTS/$name/config.json" ]] || { echo "$name: not in $WEIGHTS, skipped"; continue; }
  rm -rf "${OUT:?}/$name"
  # shellcheck disable=SC2086
  "$PYTHON" -m langmamba.evaluate_explanations "$DATA" --model "$WEIGHTS/$name" --calibrate "$OUT/$name" \
    --patients $patients > "$OUT/$name.json"
  echo "$name: calibrated into $OUT/$name (report $OUT/$name.json)"
done
