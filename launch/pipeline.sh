#!/usr/bin/env bash
# SFT -> reward model -> PPO as three SLURM jobs, each waiting for the one before it
# (--dependency=afterok, with --kill-on-invalid-dep=yes: a stage that fails cancels the
# ones after it). Each job is rendered, checked and submitted by `megarlhf launch`; if a
# stage cannot be submitted (bad config or layout), the ones already submitted are cancelled.
#
#   launch/pipeline.sh RUN_ROOT [megarlhf launch options] [-- key=value ...]
#
#   RUN_ROOT         run directories RUN_ROOT/sft, RUN_ROOT/rm, RUN_ROOT/ppo: the reward model
#                    starts from RUN_ROOT/sft, PPO from RUN_ROOT/sft and RUN_ROOT/rm
#   options          passed to every `megarlhf launch`: --nodes, --gpus-per-node, --partition,
#                    --account, --time, --container-image, --container-mounts, --cpu, ...
#   -- key=value     overrides for all three stages (e.g. data.tokenizer=...)
#
# Environment: SFT_CONFIG, RM_CONFIG, PPO_CONFIG (default examples/{sft,rm,ppo}_tiny.yaml);
# SFT_OVERRIDES, RM_OVERRIDES, PPO_OVERRIDES (space-separated key=value for one stage);
# MEGARLHF (how to run the CLI, default `megarlhf`).
# Prints "sft=<id> rm=<id> ppo=<id>" on stdout.
set -euo pipefail

if [[ $# -lt 1 || $1 == -* ]]; then
  sed -n '2,20p' "$0" | sed 's/^# \{0,1\}//' >&2
  exit 2
fi
ROOT=$(realpath -m "$1")
shift
LAUNCH_OPTS=()
COMMON=()
while [[ $# -gt 0 ]]; do
  if [[ $1 == -- ]]; then shift; COMMON=("$@"); break; fi
  LAUNCH_OPTS+=("$1")
  shift
done
read -r -a MEGARLHF_CMD <<< "${MEGARLHF:-megarlhf}"
read -r -a SFT_EXTRA <<< "${SFT_OVERRIDES:-}"
read -r -a RM_EXTRA <<< "${RM_OVERRIDES:-}"
read -r -a PPO_EXTRA <<< "${PPO_OVERRIDES:-}"

SFT=(sft --config "${SFT_CONFIG:-examples/sft_tiny.yaml}" "${LAUNCH_OPTS[@]}" "${COMMON[@]}"
     "train.run_dir=$ROOT/sft" "${SFT_EXTRA[@]}")
RM=(rm --config "${RM_CONFIG:-examples/rm_tiny.yaml}" "${LAUNCH_OPTS[@]}" "${COMMON[@]}"
    "train.run_dir=$ROOT/rm" "init_from=$ROOT/sft" "${RM_EXTRA[@]}")
PPO=(ppo --config "${PPO_CONFIG:-examples/ppo_tiny.yaml}" "${LAUNCH_OPTS[@]}" "${COMMON[@]}"
     "train.run_dir=$ROOT/ppo" "sft_model_path=$ROOT/sft" "reward_model_path=$ROOT/rm" "${PPO_EXTRA[@]}")

# A stage that cannot be submitted must not leave the earlier ones running for nothing.
SUBMITTED=()
trap '[[ ${#SUBMITTED[@]} -eq 0 ]] || { echo "pipeline: cancelling jobs ${SUBMITTED[*]}" >&2; scancel "${SUBMITTED[@]}"; }' ERR
sft_id=$("${MEGARLHF_CMD[@]}" launch "${SFT[@]}")
SUBMITTED+=("$sft_id")
rm_id=$("${MEGARLHF_CMD[@]}" launch "${RM[@]}" --dependency "afterok:$sft_id")
SUBMITTED+=("$rm_id")
ppo_id=$("${MEGARLHF_CMD[@]}" launch "${PPO[@]}" --dependency "afterok:$rm_id")
echo "sft=$sft_id rm=$rm_id ppo=$ppo_id"
