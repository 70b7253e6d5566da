#!/usr/bin/env bash
# Trains on TPU slices of a GKE cluster, either through xpk (`xpk workload create`, which also
# handles several slices) or by applying a JobSet manifest generated here (one slice: an indexed Job
# with one pod per TPU VM host, each requesting all of its host's chips).
#
#   launch/gke.sh --cluster my-cluster --tpu-type v5p-16 --workdir gs://bucket/run1 \
#       -- --config.checkpoint=gs://bucket/FLUX.1-dev
#   launch/gke.sh --mode jobset --image us-docker.pkg.dev/p/r/mosaic:latest --tpu-type v6e-16 \
#       --workdir gs://bucket/run1 --dry-run      # prints the manifest and kubectl command
#
# Options (or the environment variable in brackets); after `--`, flags for launch/train.py:
#   --mode xpk|jobset      [GKE_MODE; xpk]
#   --name NAME            workload / JobSet name [GKE_NAME; mosaic-$USER]
#   --cluster NAME         xpk: the GKE cluster [GKE_CLUSTER; required for xpk]
#   --zone ZONE, --project PROJECT   xpk: where the cluster is [GKE_ZONE, GKE_PROJECT; gcloud's]
#   --tpu-type TYPE        v4-N, v5p-N, v5litepod-N (v5e-N), v6e-N [TPU_TYPE; v5p-8]
#   --num-slices N         xpk only [GKE_NUM_SLICES; 1]
#   --image IMAGE          an image holding this repository, installed (pip install -e .) [GKE_IMAGE];
#                          required for jobset; for xpk, without it xpk builds one from this folder
#                          on --base-image [GKE_BASE_IMAGE; python:3.11] and the pods pip install
#   --repo-dir DIR         where the image holds the repository [GKE_REPO_DIR; /app]
#   --config SPEC          [MOSAIC_CONFIG; configs/flux_ms.py]
#   --workdir gs://...     required [MOSAIC_WORKDIR]: pods keep no disk
#   --dry-run              print every command (and the manifest), run none [DRY_RUN=1]
# Each pod (TPU VM host) is one jax process; jax finds the others from the TPU_WORKER_* variables
# GKE sets on TPU pods.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=cluster_lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/cluster_lib.sh"

MODE="${GKE_MODE:-xpk}"
NAME="${GKE_NAME:-mosaic-${USER:-user}}"
CLUSTER="${GKE_CLUSTER:-}"
ZONE="${GKE_ZONE:-}"
PROJECT="${GKE_PROJECT:-}"
TYPE="${TPU_TYPE:-v5p-8}"
NUM_SLICES="${GKE_NUM_SLICES:-1}"
IMAGE="${GKE_IMAGE:-}"
BASE_IMAGE="${GKE_BASE_IMAGE:-python:3.11}"
REPO_DIR="${GKE_REPO_DIR:-/app}"
CONFIG="${MOSAIC_CONFIG:-configs/flux_ms.py}"
WORKDIR="${MOSAIC_WORKDIR:-}"
while [[ $# -gt 0 ]]; do
  case "$1" in
    --mode) MODE="$(need_value "$@")"; shift 2;;
    --name) NAME="$(need_value "$@")"; shift 2;;
    --cluster) CLUSTER="$(need_value "$@")"; shift 2;;
    --zone) ZONE="$(need_value "$@")"; shift 2;;
    --project) PROJECT="$(need_value "$@")"; shift 2;;
    --tpu-type) TYPE="$(need_value "$@")"; shift 2;;
    --num-slices) NUM_SLICES="$(need_value "$@")"; shift 2;;
    --image) IMAGE="$(need_value "$@")"; shift 2;;
    --base-image) BASE_IMAGE="$(need_value "$@")"; shift 2;;
    --repo-dir) REPO_DIR="$(need_value "$@")"; shift 2;;
    --config) CONFIG="$(need_value "$@")"; shift 2;;
    --workdir) WORKDIR="$(need_value "$@")"; shift 2;;
    --dry-run) DRY_RUN=1; shift;;
    -h|--help) usage;;
    --) shift; break;;
    *) die "unknown option '$1' (flags for launch/train.py go after --)";;
  esac
done
[[ "$WORKDIR" == gs://* ]] || die "--workdir must be a gs:// path (got '$WORKDIR'): pods keep no disk"
[[ "$NUM_SLICES" =~ ^[1-9][0-9]*$ ]] || die "--num-slices must be a positive integer (got '$NUM_SLICES')"
[[ "$NAME" =~ ^[a-z]([-a-z0-9]*[a-z0-9])?$ ]] || die "--name '$NAME' must be lower-case letters, digits and '-'"
tpu_geometry "$TYPE"
describe() {
  echo "# $TPU_TYPE x $NUM_SLICES slice(s): $TPU_HOSTS pod(s) per slice, $TPU_CHIPS_PER_HOST chips each, topology $TPU_TOPOLOGY"
}
TRAIN=(python launch/train.py --config "$CONFIG" --workdir "$WORKDIR" "$@")

case "$MODE" in
  xpk)
    [[ -n "$CLUSTER" ]] || die "--cluster is required with --mode xpk"
    describe
    where=()
    [[ -z "$ZONE" ]] || where+=(--zone="$ZONE")
    [[ -z "$PROJECT" ]] || where+=(--project="$PROJECT")
    if [[ -n "$IMAGE" ]]; then
      image=(--docker-image="$IMAGE")
      command="cd $(quote "$REPO_DIR") && $(quote_args "${TRAIN[@]}")"
    else  # xpk copies --script-dir into an image built on the base image
      image=(--base-docker-image="$BASE_IMAGE" --script-dir="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)")
      command="pip install -q -r requirements.txt -e . 'jax[tpu]' && $(quote_args "${TRAIN[@]}")"
    fi
    run xpk workload create --cluster="$CLUSTER" --workload="$NAME" --tpu-type="$TPU_TYPE" \
      --num-slices="$NUM_SLICES" "${image[@]}" "${where[@]}" --command="$command"
    echo "# follow it with: xpk workload list --cluster=$CLUSTER; remove it: xpk workload delete --cluster=$CLUSTER --workload=$NAME";;
  jobset)
    [[ -n "$IMAGE" ]] || die "--mode jobset needs --image (an image holding this repository at --repo-dir $REPO_DIR)"
    [[ "$NUM_SLICES" == 1 ]] || die "--mode jobset runs one slice; use --mode xpk for --num-slices $NUM_SLICES"
    describe
    json_list=""
    for arg in "${TRAIN[@]}"; do
      arg="${arg//\\/\\\\}"
      json_list+="${json_list:+, }\"${arg//\"/\\\"}\""
    done
    manifest="apiVersion: jobset.x-k8s.io/v1alpha2
kind: JobSet
metadata:
  name: $NAME
  annotations:
    alpha.jobset.sigs.k8s.io/exclusive-topology: cloud.google.com/gke-nodepool
spec:
  failurePolicy:
    maxRestarts: 0
  replicatedJobs:
  - name: slice
    replicas: $NUM_SLICES
    template:
      spec:
        parallelism: $TPU_HOSTS
        completions: $TPU_HOSTS
        completionMode: Indexed
        backoffLimit: 0
        template:
          spec:
            restartPolicy: Never
            hostNetwork: true
            dnsPolicy: ClusterFirstWithHostNet
            nodeSelector:
              cloud.google.com/gke-tpu-accelerator: $GKE_ACCELERATOR
              cloud.google.com/gke-tpu-topology: $TPU_TOPOLOGY
            containers:
            - name: train
              image: \"$IMAGE\"
              workingDir: \"$REPO_DIR\"
              command: [$json_list]
              ports:
              - containerPort: 8471
              - containerPort: 8080
              resources:
                requests:
                  google.com/tpu: $TPU_CHIPS_PER_HOST
                limits:
                  google.com/tpu: $TPU_CHIPS_PER_HOST"
    run_with_stdin "$manifest" kubectl apply -f -
    echo "# follow it with: kubectl logs -f jobs/$NAME-slice-0 (pod 0); remove it: kubectl delete jobset $NAME";;
  *) die "--mode must be xpk or jobset (got '$MODE')";;
esac
