#!/usr/bin/env bash
# Train the shipped weights on one GPU: LangAE first, then SEED, SEED without LangDA and RED-CNN side by side
# (same data, patches and wall-clock budget each), then export them in half precision.
# Needs: out/prep/builtin.npz (`langmamba select-words out/prep/builtin.npz`). Minutes per stage are arguments.
# Usage: scripts/train_shipped_gpu.sh [langae_minutes] [stage2_minutes] [results_folder]
set -euo pipefail
langae_minutes=${1:-3.5}
stage2_minutes=${2:-4}
results=${3:-runs}
export PYTHONUNBUFFERED=1
python3 -c "import torch; print('device:', torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu')"
mkdir -p "$results"
python3 -m langmamba train langae --config langmamba/configs/langae.yaml \
  --set run.output="$results/langae" --set run.max_minutes="$langae_minutes" > "$results/langae.log" 2>&1
for stage in seed seed_no_langda redcnn; do
  python3 -m langmamba train "${stage%%_*}" --config "langmamba/configs/$stage.yaml" \
    --set run.output="$results/$stage" --set seed.langae="$results/langae/model" \
    --set run.max_minutes="$stage2_minutes" > "$results/$stage.log" 2>&1 &
done
wait
status=0
python3 -m langmamba export "$results/langae/model" "$results/shipped/langae" --half || status=1
python3 -m langmamba export "$results/seed/model" "$results/shipped/langmamba" --half --inference-only || status=1
python3 -m langmamba export "$results/seed_no_langda/model" "$results/shipped/langmamba_no_langda" --half \
  --inference-only || status=1
python3 -m langmamba export "$results/redcnn/model" "$results/shipped/redcnn" --half || status=1
exit $status
