#!/usr/bin/env bash
# Train every shipped model in resumable phases on a host with 1 or 2 GPUs (numpy + torch + triton and the
# carried wheels suffice), each call within a minutes budget; call a phase again until its table says done.
#
#   phase A:      LangAE (langmamba/configs/langae.yaml) on GPU 0  |  RED-CNN (redcnn.yaml) on GPU 1
#   phase B:      LangMamba with LangDA (langmamba.yaml) on GPU 0  |  without LangDA (langmamba_no_langda.yaml)
#                 on GPU 1,
#                 both on phase A's finished LangAE
#   phase AB:     all four at once, two per GPU: LangMamba with and without LangDA on GPU 0 | LangAE and RED-CNN
#                 on GPU 1; LangMamba reads the finished LangAE in $LANGAE (required), so it does not wait for phase A
#   phase L:      the LangAE alone on GPU 0 (langae.yaml): the long stage-1 training, call after call
#   phase D:      the three denoisers on the finished LangAE in $LANGAE (required): LangMamba with and without
#                 LangDA and RED-CNN, all on GPU 0 (one GPU) or LangMamba | the other two (two GPUs)
#   phase export: half-precision weights laid out like weights/ in $RUNS/weights (langae, langmamba,
#                 langmamba_no_langda, redcnn), every file at most 16 MiB
#   phase status: the table only
#   phase probe:  throughput of LangMamba (GPU 0, LangDA, on $LANGAE or phase A's LangAE) and RED-CNN (GPU 1) for each
#                 patch x batch in PROBE ("256x16 256x32 192x32"), PROBE_STEPS (60) steps each, in $RUNS/probe;
#                 prints patches/s (first logged interval excluded) to choose data.patch_size / optim.batch_size
#
# Usage: scripts/train_gpu.sh PHASE... [--smoke]   (PHASE: A, B, AB, D, L, export, status or probe; e.g. `L export`)
#   --smoke: a few CPU steps on out/prep/builtin.npz (tiny models, 128² crops) into runs/gpu_smoke, to check
#            the script end to end on a machine without a GPU.
# Settings (environment): RUNS (runs/gpu; not $OUT, which the device tool sets), RESULTS (when set, after
# every phase the logs, status files, loss plots and exported weights are copied there), DATA (out/prep/training.npz), MINUTES (7, training minutes per run
# and call; loading, validation and saving come on top), LANGAE_STEPS / REDCNN_STEPS / DENOISER_STEPS (the
# configs' optim.steps when empty; SEED_STEPS is its old name), PRESET (denoiser.decoder_preset, from
# langmamba.yaml when empty), LANGDA (denoiser.langda_weight of the LangDA run, from langmamba.yaml when empty), BATCH (optim.batch_size of every run
# when set), PYTHON (python3), LANGAE (phase B's LangAE checkpoint, default $RUNS/langae/model: e.g. an
# exported weights/langae brought back on a fresh machine), ALLOW_UNFINISHED_LANGAE=1 (phase B on a LangAE that has not done its steps),
# INIT (a folder laid out like weights/, e.g. an earlier export: a run without checkpoints starts from its
# counterpart there, run.init_from), LANGAE_ARGS / REDCNN_ARGS / DENOISER_ARGS (more `--set key=value`
# words; SEED_ARGS is its old name).
# Each run resumes from the latest checkpoint in $RUNS/<run>/checkpoints; its log is appended to
# $RUNS/logs/<run>.log; $RUNS/<run>/status.json says how far it is; $RUNS/<run>/model is its best validated
# moving average.
set -euo pipefail
export PYTHONUNBUFFERED=1
export TQDM_MININTERVAL=${TQDM_MININTERVAL:-30}  # a progress line every 30 s in the logs, not every step
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

phases=()
smoke=0
for arg in "$@"; do
  case "$arg" in
    A|B|AB|D|L|export|status|probe) phases+=("$arg") ;;
    --smoke) smoke=1 ;;
    *) echo "usage: $0 A|B|AB|D|L|export|status|probe... [--smoke]" >&2; exit 2 ;;
  esac
done
[[ ${#phases[@]} -gt 0 ]] || { echo "usage: $0 A|B|AB|D|L|export|status|probe... [--smoke]" >&2; exit 2; }

PYTHON=${PYTHON:-python3}
RUNS=${RUNS:-runs/gpu}
DENOISER_STEPS=${DENOISER_STEPS:-${SEED_STEPS:-}}
DENOISER_ARGS=${DENOISER_ARGS:-${SEED_ARGS:-}}
DATA=${DATA:-out/prep/training.npz}
MINUTES=${MINUTES:-7}
common=()
langae_set=()
if [[ $smoke == 1 ]]; then
  RUNS=${RUNS/%runs\/gpu/runs/gpu_smoke}
  DATA=${SMOKE_DATA:-out/prep/builtin.npz}
  MINUTES=2
  LANGAE_STEPS=${LANGAE_STEPS:-4} REDCNN_STEPS=${REDCNN_STEPS:-4} DENOISER_STEPS=${DENOISER_STEPS:-4}
  PRESET=${PRESET:-fast}
  common=(--set run.device=cpu --set data.crop=128 --set data.patch_size=64 --set optim.batch_size=2
          --set run.validation_slices=1 --set run.validate_every=2 --set run.checkpoint_every=2
          --set "data.validation_patients=['pydicom:explicit_VR-UN']" --set data.max_slices_per_patient=4)
  langae_set=(--set langae.base_channels=8)
fi
[[ -n "${BATCH:-}" ]] && common+=(--set optim.batch_size="$BATCH")
[[ -f "$DATA" ]] || { echo "error: the prepared training set $DATA does not exist (langmamba select-words $DATA)" >&2; exit 1; }
mkdir -p "$RUNS/logs"

gpus=$("$PYTHON" -c "import torch; print(torch.cuda.device_count())")
[[ $smoke == 1 ]] && gpus=0

finished() {  # finished RUN [STEPS] -> exit 0 when status.json says its steps (STEPS when given) are all done
  "$PYTHON" - "$RUNS/$1/status.json" "${2:-}" <<'EOF'
import json, sys
try:
    status = json.load(open(sys.argv[1]))
    wanted = int(sys.argv[2]) if sys.argv[2] else status["steps"]
    sys.exit(0 if status["step"] >= wanted else 1)
except (OSError, ValueError, KeyError):
    sys.exit(1)
EOF
}

init() {  # init SHIPPED_NAME -> a run.init_from override when $INIT holds that model
  [[ -n "${INIT:-}" && -f "$INIT/$1/config.json" ]] && echo "--set run.init_from=$INIT/$1" || true
}

# CPU threads per run: the host's cores shared out over the runs of a phase (RUNS_AT_ONCE, set per phase), unless
# OMP_NUM_THREADS is given. Each torch process otherwise takes every core: three RED-CNN runs on one H200 host
# (16 cores) made 100 steps in 45 s each with 16 threads apiece and in 28.5 s with 5.
threads() {
  if [[ -n "${OMP_NUM_THREADS:-}" ]]; then
    echo "$OMP_NUM_THREADS"
  else
    local cores
    cores=$(nproc)
    echo $(( cores / ${RUNS_AT_ONCE:-1} > 0 ? cores / ${RUNS_AT_ONCE:-1} : 1 ))
  fi
}

pids=() names=()
launch() {  # launch RUN GPU MODEL CONFIG [--set ...]: one resumable training call in the background
  local name=$1 gpu=$2 model=$3 config=$4
  shift 4
  local wanted=""
  for arg in "$@"; do
    [[ "$arg" == optim.steps=* ]] && wanted=${arg#optim.steps=}
  done
  if finished "$name" "$wanted"; then
    echo "$name: already finished"
    return
  fi
  local log="$RUNS/logs/$name.log"
  echo "=== $(date -u +%FT%TZ) call on GPU $gpu (of $gpus) ===" >> "$log"
  local visible=$gpu
  [[ $gpus -le 1 ]] && visible=0
  echo "$name: training on GPU $visible for up to $MINUTES min (log $log)"
  CUDA_VISIBLE_DEVICES=$visible OMP_NUM_THREADS=$(threads) "$PYTHON" -m langmamba train "$model" --config "langmamba/configs/$config.yaml" \
    --set data.root="$DATA" --set run.output="$RUNS/$name" --set run.max_minutes="$MINUTES" \
    "${common[@]}" "$@" >> "$log" 2>&1 &
  pids+=($!) names+=("$name")
}

wait_all() {
  local status=0
  for i in "${!pids[@]}"; do
    if wait "${pids[$i]}"; then
      echo "${names[$i]}: call ended"
    else
      echo "${names[$i]}: FAILED (tail of $RUNS/logs/${names[$i]}.log):" >&2
      tail -n 20 "$RUNS/logs/${names[$i]}.log" >&2
      status=1
    fi
  done
  pids=() names=()
  return $status
}

steps() {  # steps VALUE -> an optim.steps override when VALUE is set
  [[ -n "$1" ]] && echo "--set optim.steps=$1" || true
}

table() {
  "$PYTHON" - "$RUNS" <<'EOF'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
print(f"{'run':<22}{'step':>8}{'of':>8}  {'done':<6}{'best step':>10}{'val PSNR':>10}{'val SSIM':>10}")
for name in ("langae", "redcnn", "langmamba", "langmamba_no_langda"):
    try:
        s = json.loads((out / name / "status.json").read_text())
    except (OSError, ValueError):
        print(f"{name:<22}{'-':>8}")
        continue
    psnr = f"{s['best_val_psnr']:.2f}" if s.get("best_val_psnr") is not None else "-"
    ssim = f"{s['best_val_ssim']:.4f}" if s.get("best_val_ssim") is not None else "-"
    print(f"{name:<22}{s['step']:>8}{s['steps']:>8}  {'yes' if s['finished'] else 'no':<6}"
          f"{s.get('best_step') or '-':>10}{psnr:>10}{ssim:>10}")
for path in sorted((out / "weights").rglob("*")) if (out / "weights").is_dir() else []:
    if path.is_file():
        print(f"exported {path} {path.stat().st_size / 2**20:.2f} MiB")
EOF
}

collect() {  # copy what is worth keeping into $RESULTS (small files only: no checkpoints)
  [[ -n "${RESULTS:-}" ]] || return 0
  mkdir -p "$RESULTS"
  for name in langae redcnn langmamba langmamba_no_langda; do
    [[ -d "$RUNS/$name" ]] || continue
    mkdir -p "$RESULTS/$name"
    for f in status.json log.csv loss.png config.yaml; do
      [[ -f "$RUNS/$name/$f" ]] && cp "$RUNS/$name/$f" "$RESULTS/$name/"
    done
  done
  cp -r "$RUNS/logs" "$RESULTS/"
  [[ -d "$RUNS/weights" ]] && cp -r "$RUNS/weights" "$RESULTS/"
  return 0
}

status=0
for phase in "${phases[@]}"; do
case "$phase" in
  A|B|AB|D|L)
    if [[ $phase == AB || $phase == D ]] && [[ -z "${LANGAE:-}" ]]; then
      echo "error: phase $phase trains LangMamba without waiting for phase A, so it needs a finished LangAE in LANGAE" >&2
      status=1
      continue
    fi
    if [[ $phase == B && -z "${LANGAE:-}" ]] && ! finished langae && [[ "${ALLOW_UNFINISHED_LANGAE:-0}" != 1 ]]; then
      echo "error: phase A's LangAE ($RUNS/langae) has not finished its steps; run phase A again first" >&2
      status=1
      continue
    fi
    # GPUs: A puts LangAE | RED-CNN, B LangMamba | without LangDA, AB both LangMambas | LangAE and RED-CNN,
    # D LangMamba | without LangDA and RED-CNN.
    gpu_langae=0 gpu_redcnn=1 gpu_denoiser=0 gpu_plain=1
    [[ $phase == AB ]] && gpu_langae=1 gpu_plain=0
    case $phase in L) RUNS_AT_ONCE=1 ;; A|B) RUNS_AT_ONCE=2 ;; D) RUNS_AT_ONCE=3 ;; AB) RUNS_AT_ONCE=4 ;; esac
    if [[ $phase == A || $phase == AB || $phase == L ]]; then
      # shellcheck disable=SC2046,SC2086
      launch langae $gpu_langae langae langae $(steps "${LANGAE_STEPS:-}") $(init langae) "${langae_set[@]}" \
        ${LANGAE_ARGS:-}
    fi
    if [[ $phase == A || $phase == AB || $phase == D ]]; then
      # shellcheck disable=SC2046,SC2086
      launch redcnn $gpu_redcnn redcnn redcnn $(steps "${REDCNN_STEPS:-}") $(init redcnn) ${REDCNN_ARGS:-}
    fi
    if [[ $phase == B || $phase == AB || $phase == D ]]; then
      denoiser_set=(--set denoiser.langae="${LANGAE:-$RUNS/langae/model}")
      [[ -n "${PRESET:-}" ]] && denoiser_set+=(--set denoiser.decoder_preset="$PRESET")
      langda=()
      [[ -n "${LANGDA:-}" ]] && langda=(--set denoiser.langda_weight="$LANGDA")
      # shellcheck disable=SC2046,SC2086
      launch langmamba $gpu_denoiser langmamba langmamba $(steps "$DENOISER_STEPS") $(init langmamba) \
        "${denoiser_set[@]}" "${langda[@]}" ${DENOISER_ARGS}
      # shellcheck disable=SC2046,SC2086
      launch langmamba_no_langda $gpu_plain langmamba langmamba_no_langda $(steps "$DENOISER_STEPS") \
        $(init langmamba_no_langda) "${denoiser_set[@]}" ${DENOISER_ARGS}
    fi
    wait_all || status=1
    ;;
  export)
    "$PYTHON" - "$RUNS" <<'EOF'
import sys
from pathlib import Path
from langmamba.train.export import export_checkpoint
out = Path(sys.argv[1])
limit_mib = 16
for run, shipped, inference_only in (("langae", "langae", False), ("langmamba", "langmamba", True),
                                     ("langmamba_no_langda", "langmamba_no_langda", True), ("redcnn", "redcnn", False)):
    source = out / run / "model"
    if not (source / "config.json").is_file():
        print(f"{run}: no model yet, not exported")
        continue
    folder = export_checkpoint(source, out / "weights" / shipped, half=True, inference_only=inference_only,
                               max_shard_mb=limit_mib - 0.5)
    too_big = [p for p in folder.iterdir() if p.stat().st_size > limit_mib * 2**20]
    if too_big:
        sys.exit(f"error: {too_big} exceed {limit_mib} MiB")
    print(f"{run}: exported to {folder}")
EOF
    ;;
  status) ;;
  probe)
    probe_langae=${LANGAE:-$RUNS/langae/model}
    preset=()
    [[ -n "${PRESET:-}" ]] && preset=(--set denoiser.decoder_preset="$PRESET")
    mkdir -p "$RUNS/logs/probe"
    RUNS_AT_ONCE=2
    for combo in ${PROBE:-256x16 256x32 192x32}; do
      patch=${combo%x*} batch=${combo#*x}
      rm -rf "$RUNS/probe/langmamba-$combo" "$RUNS/probe/redcnn-$combo"
      settings=(--set data.patch_size="$patch" --set optim.batch_size="$batch" --set optim.steps="${PROBE_STEPS:-60}"
                --set run.validate_every=1000000 --set run.checkpoint_every=1000000 --set run.log_every=10
                --set run.validation_slices=1 --set "data.validation_doses=[0.25]")
      launch "probe/langmamba-$combo" 0 langmamba langmamba "${settings[@]}" --set denoiser.langae="$probe_langae" "${preset[@]}"
      launch "probe/redcnn-$combo" 1 redcnn redcnn "${settings[@]}"
      wait_all || status=1
    done
    "$PYTHON" - "$RUNS/probe" <<'EOF'
import csv, sys
from pathlib import Path
print(f"{'run':<22}{'patches/s':>12}{'steps/s':>10}")
for folder in sorted(p for p in Path(sys.argv[1]).iterdir() if p.is_dir()):
    log = folder / "log.csv"
    rows = [r for r in csv.DictReader(log.open()) if r.get("seconds")] if log.exists() else []
    if len(rows) < 2:
        print(f"{folder.name:<22}{'-':>12}")
        continue
    batch = int(folder.name.rsplit("x", 1)[1])
    rate = (int(rows[-1]["step"]) - int(rows[0]["step"])) / (float(rows[-1]["seconds"]) - float(rows[0]["seconds"]))
    print(f"{folder.name:<22}{rate * batch:>12.1f}{rate:>10.2f}")
EOF
    ;;
esac
collect
done
table
exit $status
