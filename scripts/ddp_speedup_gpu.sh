#!/usr/bin/env bash
# Data-parallel speed-up of stage-2 training: the same LangMamba run on 1 and on N GPUs of one host (torchrun + DDP).
# Needs out/prep/builtin.npz (`langmamba select-words out/prep/builtin.npz`) and the shipped weights/langae.
# Usage: scripts/ddp_speedup_gpu.sh [gpus] [steps] [results_folder]; prints patches/s for each and the ratio.
set -euo pipefail
gpus=${1:-2}
steps=${2:-300}
results=${3:-runs/ddp}
export PYTHONUNBUFFERED=1
mkdir -p "$results"
# EXTRA_SETTINGS: more --set overrides, e.g. for a quick CPU check of the script itself.
read -r -a extra <<< "${EXTRA_SETTINGS:-}"
for n in 1 "$gpus"; do
  rm -rf "$results/gpus$n"
  torchrun --standalone --nproc_per_node "$n" -m langmamba train langmamba --config langmamba/configs/langmamba.yaml \
    --set denoiser.langae=weights/langae --set optim.steps="$steps" --set run.validate_every=1000000 \
    --set run.checkpoint_every=1000000 --set run.output="$results/gpus$n" "${extra[@]}" > "$results/gpus$n.log" 2>&1
done
python3 - "$results" "$gpus" "$steps" <<'PY'
import csv, json, sys
results, gpus, steps = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
rate = {}
for n in (1, gpus):
    rows = [r for r in csv.DictReader(open(f"{results}/gpus{n}/log.csv")) if r["seconds"]]
    # skip the first logged interval (start-up, kernel compilation)
    first, last = rows[0], rows[-1]
    batch = json.load(open(f"{results}/gpus{n}/model/config.json"))["extra"]["train_config"]["optim"]["batch_size"]
    rate[n] = batch * n * (int(last["step"]) - int(first["step"])) / (float(last["seconds"]) - float(first["seconds"]))
print(json.dumps({"patches_per_s": rate, "speedup": rate[gpus] / rate[1], "gpus": gpus, "steps": steps}, indent=2))
PY
