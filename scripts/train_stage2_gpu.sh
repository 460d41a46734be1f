#!/usr/bin/env bash
# Stage 2 of the shipped weights on the GPUs of one host, on a given frozen stage-1 LangAE: SEED with LangDA (at the
# config's weight and at 0.1), SEED without LangDA and RED-CNN, each for the same number of steps (so every cosine
# schedule anneals fully), spread round-robin over the GPUs two at a time, then exported in half precision.
# Needs: out/prep/builtin.npz (`langmamba select-words out/prep/builtin.npz`).
# Usage: scripts/train_stage2_gpu.sh [langae] [steps] [results_folder]
set -euo pipefail
langae=${1:-weights/langae}
steps=${2:-4000}
results=${3:-runs/stage2}
export PYTHONUNBUFFERED=1
gpus=$(python3 -c "import torch; print(max(torch.cuda.device_count(), 1))")
mkdir -p "$results"
# name|config|extra override
jobs=(
  "seed|seed|"
  "seed_langda0.1|seed|seed.langda_weight=0.1"
  "seed_no_langda|seed_no_langda|"
  "redcnn|redcnn|"
)
i=0
for job in "${jobs[@]}"; do
  IFS='|' read -r name config extra <<< "$job"
  overrides=(--set run.output="$results/$name" --set optim.steps="$steps" --set run.max_minutes=null)
  [[ "$config" == redcnn ]] || overrides+=(--set seed.langae="$langae")
  [[ -z "$extra" ]] || overrides+=(--set "$extra")
  CUDA_VISIBLE_DEVICES=$((i % gpus)) python3 -m langmamba train "${config%%_*}" \
    --config "langmamba/configs/$config.yaml" "${overrides[@]}" > "$results/$name.log" 2>&1 &
  i=$((i + 1))
done
wait
status=0
for name in seed seed_langda0.1 seed_no_langda; do
  python3 -m langmamba export "$results/$name/model" "$results/shipped/$name" --half --inference-only || status=1
done
python3 -m langmamba export "$results/redcnn/model" "$results/shipped/redcnn" --half || status=1
exit $status
