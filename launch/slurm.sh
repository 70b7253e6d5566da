#!/usr/bin/env bash
# Trains on a multi-node GPU job under SLURM: writes the batch script (header from the options below)
# and submits it with sbatch. One task per GPU: jax reads SLURM_JOB_ID, SLURM_NTASKS, SLURM_PROCID,
# SLURM_LOCALID and SLURM_STEP_NODELIST itself (coordinator = first node, process id, and GPU
# SLURM_LOCALID for each task), so no coordinator address or process flags are passed. Do not bind
# GPUs per task (--gpus-per-task, --gpu-bind): each task must see its node's GPUs for that numbering.
#
#   launch/slurm.sh --nodes 4 --gpus-per-node 8 --partition gpu --workdir /shared/runs/run1 \
#       -- --config.checkpoint=/shared/FLUX.1-dev --config.model_overrides.attention_impl=cudnn
#   launch/slurm.sh --dry-run --workdir /shared/runs/run1      # prints the script and sbatch command
#
# Options (or the environment variable in brackets); after `--`, flags for launch/train.py:
#   --nodes N              [MOSAIC_NODES; 2]
#   --gpus-per-node N      [MOSAIC_GPUS_PER_NODE; 8]
#   --cpus-per-task N      [MOSAIC_CPUS_PER_TASK; 8]
#   --partition P, --account A, --time T   [MOSAIC_PARTITION, MOSAIC_ACCOUNT, MOSAIC_TIME; cluster's defaults]
#   --job-name NAME        [MOSAIC_JOB_NAME; mosaic]
#   --python PY            a Python with this package installed (pip install -e .), on every node [MOSAIC_PYTHON; python]
#   --config SPEC          [MOSAIC_CONFIG; configs/flux_ms.py]
#   --workdir DIR          required, on a file system every node sees (or gs://) [MOSAIC_WORKDIR]
#   --logs DIR             where SLURM writes the job's output [MOSAIC_LOGS; slurm_logs]
#   --dry-run              print the batch script and the sbatch command, submit nothing [DRY_RUN=1]
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=cluster_lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/cluster_lib.sh"

NODES="${MOSAIC_NODES:-2}"
GPUS="${MOSAIC_GPUS_PER_NODE:-8}"
CPUS="${MOSAIC_CPUS_PER_TASK:-8}"
PARTITION="${MOSAIC_PARTITION:-}"
ACCOUNT="${MOSAIC_ACCOUNT:-}"
TIME="${MOSAIC_TIME:-}"
JOB_NAME="${MOSAIC_JOB_NAME:-mosaic}"
PYTHON="${MOSAIC_PYTHON:-python}"
CONFIG="${MOSAIC_CONFIG:-configs/flux_ms.py}"
WORKDIR="${MOSAIC_WORKDIR:-}"
LOGS="${MOSAIC_LOGS:-slurm_logs}"
while [[ $# -gt 0 ]]; do
  case "$1" in
    --nodes) NODES="$(need_value "$@")"; shift 2;;
    --gpus-per-node) GPUS="$(need_value "$@")"; shift 2;;
    --cpus-per-task) CPUS="$(need_value "$@")"; shift 2;;
    --partition) PARTITION="$(need_value "$@")"; shift 2;;
    --account) ACCOUNT="$(need_value "$@")"; shift 2;;
    --time) TIME="$(need_value "$@")"; shift 2;;
    --job-name) JOB_NAME="$(need_value "$@")"; shift 2;;
    --python) PYTHON="$(need_value "$@")"; shift 2;;
    --config) CONFIG="$(need_value "$@")"; shift 2;;
    --workdir) WORKDIR="$(need_value "$@")"; shift 2;;
    --logs) LOGS="$(need_value "$@")"; shift 2;;
    --dry-run) DRY_RUN=1; shift;;
    -h|--help) usage;;
    --) shift; break;;
    *) die "unknown option '$1' (flags for launch/train.py go after --)";;
  esac
done
[[ -n "$WORKDIR" ]] || die "--workdir is required (a folder every node sees, or gs://)"
for option in "nodes=$NODES" "gpus-per-node=$GPUS" "cpus-per-task=$CPUS"; do
  [[ "${option#*=}" =~ ^[1-9][0-9]*$ ]] || die "--${option%%=*} must be a positive integer (got '${option#*=}')"
done
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
[[ "$LOGS" == /* ]] || LOGS="$REPO/$LOGS"

header=(
  "--job-name=$JOB_NAME"
  "--nodes=$NODES"
  "--ntasks-per-node=$GPUS"
  "--gpus-per-node=$GPUS"
  "--cpus-per-task=$CPUS"
  "--output=$LOGS/%x-%j.out"
)
[[ -z "$PARTITION" ]] || header+=("--partition=$PARTITION")
[[ -z "$ACCOUNT" ]] || header+=("--account=$ACCOUNT")
[[ -z "$TIME" ]] || header+=("--time=$TIME")
script="#!/bin/bash"
for line in "${header[@]}"; do script+=$'\n'"#SBATCH $line"; done
# --kill-on-bad-exit: one failed task ends the whole step instead of leaving the others waiting on a
# collective.
script+="
set -euo pipefail
cd $(quote "$REPO")
srun --kill-on-bad-exit=1 $(quote_args "$PYTHON" launch/train.py --config "$CONFIG" --workdir "$WORKDIR" "$@")"

echo "# $NODES node(s) x $GPUS GPU(s): $((NODES * GPUS)) jax processes, one per GPU"
run mkdir -p "$LOGS"
run_with_stdin "$script" sbatch
