#!/usr/bin/env bash
# Benchmark through the real nnU-Net commands on a GPU machine (not a test; CI never runs it).
#
# Synthetic BraTS 2023 cases at the real grid (240 x 240 x 155, 4 modalities), converted with
# `nnmamba brats2023 convert`, planned and preprocessed by nnU-Net, then TWO epochs (nnU-Net's
# 250 iterations each, plus its final validation) of each trainer given as arguments, at
# nnU-Net's defaults: torch.compile on unless the caller sets nnUNet_compile. Prints per
# trainer the SECOND epoch's time (compilation amortised; the first one too), the peak GPU
# memory seen by nvidia-smi, the graph breaks and recompiles Dynamo logged
# (TORCH_LOGS=graph_breaks,recompiles; one recompile for the first validation, eval mode +
# no_grad, is expected) and `torch._dynamo hit config.recompile_limit` warnings, the pseudo
# Dice of every epoch and the final validation Dice (a fast run must also still learn), and
# the prediction time of one held-out case with `nnUNetv2_predict`. The second epoch's time
# x the trainer's epochs gives the length of a full BraTS training on this GPU.
#
#   bash scripts/bench_nnunet_gpu.sh WORKDIR [CASES] [TRAINER ...]
#   SKIP_PREP=1 reuses WORKDIR's preprocessed dataset; PREP_ONLY=1 stops after preparing it;
#   PREDICT=0 skips the prediction timing;
#   nnUNet_n_proc_DA=4 sets nnU-Net's number of augmentation workers (default 12).
#   (default trainers: nnUNetTrainer_2epochs nnMambaTrainer_2epochs;
#    nnUNet_compile=false bash scripts/bench_nnunet_gpu.sh ... for the eager runs)
set -euo pipefail
WORK=${1:?usage: bench_nnunet_gpu.sh WORKDIR [CASES] [TRAINER ...]}
CASES=${2:-10}
shift $(( $# >= 2 ? 2 : 1 ))
TRAINERS=("$@")
[ ${#TRAINERS[@]} -gt 0 ] || TRAINERS=(nnUNetTrainer_2epochs nnMambaTrainer_2epochs)
PY=${PYTHON:-python3}
mkdir -p "$WORK"
WORK=$(cd "$WORK" && pwd)
export nnUNet_raw=$WORK/raw nnUNet_preprocessed=$WORK/preprocessed nnUNet_results=$WORK/results
# nnUNet_compile: left as the caller has it (unset = nnU-Net's default, compile on CUDA)
echo "nnUNet_compile=${nnUNet_compile-<unset: nnU-Net default>}"
ID=${DATASET_ID:-923}
SHAPE=${SHAPE:-240 240 155}          # smaller for a dry run on a CPU
DEVICE=${DEVICE:-cuda}
# nnU-Net's console entry points, callable where only the modules are installed
# busy CPU jiffies of the whole machine (user+nice+system+irq+softirq), for average cores used
busy_jiffies() { awk '/^cpu /{print $2+$3+$4+$7+$8}' /proc/stat; }
nnunet() { local mod=$1 fn=$2; shift 2; $PY -c "import sys; from $mod import $fn as f; sys.argv[0] = '$fn'; sys.exit(f())" "$@"; }

if [ "${SKIP_PREP:-0}" = 1 ] && [ -d "$nnUNet_preprocessed/Dataset${ID}_BraTSBench" ]; then
  echo "SKIP_PREP=1: reusing $nnUNet_preprocessed/Dataset${ID}_BraTSBench"
else
t0=$(date +%s)
$PY -m nnunet_mamba.cli brats2023 synth "$WORK/brats_src" --cases "$CASES" --shape $SHAPE --overwrite
$PY -m nnunet_mamba.cli brats2023 convert "$WORK/brats_src" -d "$ID" --name BraTSBench --overwrite
echo "synth+convert: $(( $(date +%s) - t0 )) s"
t0=$(date +%s)
nnunet nnunetv2.experiment_planning.plan_and_preprocess_entrypoints plan_and_preprocess_entry -d "$ID" -c 3d_fullres -np ${NP:-8} -npfp ${NP:-8}
echo "plan+preprocess: $(( $(date +%s) - t0 )) s"
$PY - <<EOF
import json; p = json.load(open("$nnUNet_preprocessed/Dataset${ID}_BraTSBench/nnUNetPlans.json"))
c = p["configurations"]["3d_fullres"]; print("plans 3d_fullres: patch", c["patch_size"], "batch", c["batch_size"])
EOF
fi

[ "${PREP_ONLY:-0}" != 1 ] || exit 0
TEST_IMG=$(ls "$nnUNet_raw/Dataset${ID}_BraTSBench/imagesTs/" | head -1 | sed 's/_0000.nii.gz//')
mkdir -p "$WORK/one_case"
for f in "$nnUNet_raw/Dataset${ID}_BraTSBench/imagesTs/${TEST_IMG}"_000*.nii.gz; do cp "$f" "$WORK/one_case/"; done

for TR in "${TRAINERS[@]}"; do
  LOG=$WORK/train_$TR.log
  if command -v nvidia-smi > /dev/null; then
    nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 500 > "$WORK/mem_$TR.txt" &
  else
    sleep 100000 > "$WORK/mem_$TR.txt" &
  fi
  SMI=$!
  t0=$(date +%s); j0=$(busy_jiffies)
  TORCH_LOGS=${TORCH_LOGS:-graph_breaks,recompiles} \
    nnunet nnunetv2.run.run_training run_training_entry "$ID" 3d_fullres 0 -tr "$TR" -device "$DEVICE" > "$LOG" 2>&1 || { tail -40 "$LOG"; kill $SMI; exit 1; }
  t_train=$(( $(date +%s) - t0 ))
  cores=$(awk -v j="$(( $(busy_jiffies) - j0 ))" -v t="$t_train" -v hz="$(getconf CLK_TCK)" 'BEGIN{printf "%.1f", j/hz/(t>0?t:1)}')
  kill $SMI || true
  t0=$(date +%s)
  [ "${PREDICT:-1}" != 1 ] || \
  nnunet nnunetv2.inference.predict_from_raw_data predict_entry_point -i "$WORK/one_case" -o "$WORK/pred_$TR" -d "$ID" \
      -c 3d_fullres -f 0 -tr "$TR" -device "$DEVICE" > "$WORK/predict_$TR.log" 2>&1 || { tail -40 "$WORK/predict_$TR.log"; exit 1; }
  t_pred=$(( $(date +%s) - t0 ))
  epochs=$(grep -o "Epoch time: [0-9.]* s" "$LOG" | sed 's/Epoch time: //' | tr '\n' ' ' || true)
  first=$(echo "$epochs" | awk '{print $1}')
  second=$(echo "$epochs" | awk '{print $3}')
  peak=$(sort -n "$WORK/mem_$TR.txt" | tail -1)
  breaks=$(grep -c "Graph break" "$LOG" || true)
  recompiles=$(grep -c "Recompiling function" "$LOG" || true)
  limit=$(grep -c "recompile_limit" "$LOG" || true)
  # a fast run must also learn: the pseudo Dice of every epoch and the final validation Dice
  dice=$(grep -o "Pseudo dice \[.*\]" "$LOG" | sed 's/np.float32(\([0-9.]*\))/\1/g; s/Pseudo dice //' | tr '\n' ' ' || true)
  final=$(grep -o "Mean Validation Dice: *[0-9.]*" "$LOG" | awk '{print $NF}' || true)
  echo "RESULT $TR (nnUNet_compile=${nnUNet_compile-default}): second epoch ${second:-?} s (first ${first:-?} s) | train command incl. validation ${t_train} s | peak GPU memory ${peak} MiB (nvidia-smi) | CPU cores busy on average ${cores} (workers ${nnUNet_n_proc_DA:-12}) | graph breaks ${breaks}, recompiles ${recompiles}, recompile_limit warnings ${limit} | pseudo Dice per epoch ${dice:-?}| final validation Dice ${final:-?} | nnUNetv2_predict one 240x240x155 case (incl. start-up, 8x mirroring) ${t_pred} s"
done
