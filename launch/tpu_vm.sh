#!/usr/bin/env bash
# Trains on a Cloud TPU VM slice: creates a queued resource, waits until it is ACTIVE, copies this
# repository (its tracked files, uncommitted edits included) to every worker and installs it there
# (a uv venv with --python-version, this package (pip install -e .) and jax[tpu]),
# runs the same `python launch/train.py` on all workers at once, copies each worker's log back and
# deletes the slice (also when a step fails; --keep leaves it).
#
#   launch/tpu_vm.sh --tpu-type v5p-16 --zone us-east5-a --workdir gs://bucket/run1 --spot \
#       -- --config.checkpoint=/ckpt/FLUX.1-dev --config.dataset.data_dir=gs://bucket/tfds
#   launch/tpu_vm.sh --dry-run --workdir gs://bucket/run1      # prints the commands, runs none
#
# Options (or the environment variable in brackets); after `--`, flags for launch/train.py:
#   --name NAME            queued resource and node name [TPU_NAME; mosaic-$USER]
#   --tpu-type TYPE        v4-N, v5p-N, v5litepod-N (v5e-N), v6e-N [TPU_TYPE; v5p-8]
#   --zone ZONE            [TPU_ZONE; us-east5-a]
#   --project PROJECT      [TPU_PROJECT; gcloud's default project]
#   --runtime-version V    TPU VM image [TPU_RUNTIME; the type's usual image]
#   --provisioning MODE    on-demand, spot or reserved [TPU_PROVISIONING; on-demand]
#   --spot, --reserved     the same as --provisioning spot / reserved
#   --config SPEC          [MOSAIC_CONFIG; configs/flux_ms.py]
#   --workdir gs://...     required [MOSAIC_WORKDIR]: the VMs' disks go with the slice
#   --python-version V     the workers' Python, 3.11 or 3.12 [TPU_PYTHON_VERSION; 3.11]; TPU VM images
#                          ship an older one, so uv (pip-installed) fetches it into the workers' venv
#   --logs DIR             where worker logs land [TPU_LOGS; tpu_logs/NAME]
#   --keep                 do not delete the slice at the end [TPU_KEEP=1]
#   --dry-run              print every command, run none [DRY_RUN=1]
# Each worker is one jax process; jax finds the slice's other workers itself (TPU metadata).
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=cluster_lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/cluster_lib.sh"

NAME="${TPU_NAME:-mosaic-${USER:-user}}"
TYPE="${TPU_TYPE:-v5p-8}"
ZONE="${TPU_ZONE:-us-east5-a}"
PROJECT="${TPU_PROJECT:-}"
RUNTIME="${TPU_RUNTIME:-}"
PROVISIONING="${TPU_PROVISIONING:-on-demand}"
CONFIG="${MOSAIC_CONFIG:-configs/flux_ms.py}"
WORKDIR="${MOSAIC_WORKDIR:-}"
PYTHON_VERSION="${TPU_PYTHON_VERSION:-3.11}"
LOGS="${TPU_LOGS:-}"
KEEP="${TPU_KEEP:-0}"
while [[ $# -gt 0 ]]; do
  case "$1" in
    --name) NAME="$(need_value "$@")"; shift 2;;
    --tpu-type) TYPE="$(need_value "$@")"; shift 2;;
    --zone) ZONE="$(need_value "$@")"; shift 2;;
    --project) PROJECT="$(need_value "$@")"; shift 2;;
    --runtime-version) RUNTIME="$(need_value "$@")"; shift 2;;
    --provisioning) PROVISIONING="$(need_value "$@")"; shift 2;;
    --spot) PROVISIONING=spot; shift;;
    --reserved) PROVISIONING=reserved; shift;;
    --config) CONFIG="$(need_value "$@")"; shift 2;;
    --workdir) WORKDIR="$(need_value "$@")"; shift 2;;
    --python-version) PYTHON_VERSION="$(need_value "$@")"; shift 2;;
    --logs) LOGS="$(need_value "$@")"; shift 2;;
    --keep) KEEP=1; shift;;
    --dry-run) DRY_RUN=1; shift;;
    -h|--help) usage;;
    --) shift; break;;
    *) die "unknown option '$1' (flags for launch/train.py go after --)";;
  esac
done
TRAIN_FLAGS=("$@")
[[ "$WORKDIR" == gs://* ]] || die "--workdir must be a gs:// path (got '$WORKDIR'): the workers' disks are deleted with the slice"
case "$PROVISIONING" in
  on-demand) PROVISIONING_FLAGS=();;
  spot|reserved) PROVISIONING_FLAGS=("--$PROVISIONING");;
  *) die "--provisioning must be on-demand, spot or reserved (got '$PROVISIONING')";;
esac
tpu_geometry "$TYPE"
RUNTIME="${RUNTIME:-$TPU_RUNTIME}"
LOGS="${LOGS:-tpu_logs/$NAME}"
WHERE=(--zone="$ZONE")
[[ -z "$PROJECT" ]] || WHERE+=(--project="$PROJECT")
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

echo "# $TPU_TYPE: $TPU_HOSTS worker(s) of $TPU_CHIPS_PER_HOST chips, runtime $RUNTIME, $PROVISIONING"
run gcloud compute tpus queued-resources create "$NAME" --node-id="$NAME" --accelerator-type="$TPU_TYPE" \
  --runtime-version="$RUNTIME" "${WHERE[@]}" "${PROVISIONING_FLAGS[@]}"

# shellcheck disable=SC2317,SC2329  # called by the EXIT trap
delete_slice() {
  echo "# deleting the slice (its node too)"
  run gcloud compute tpus queued-resources delete "$NAME" "${WHERE[@]}" --force --quiet
}
if [[ "$KEEP" != 1 ]]; then trap delete_slice EXIT; fi

echo "# repeated every 30 s until the state is ACTIVE"
state_cmd=(gcloud compute tpus queued-resources describe "$NAME" "${WHERE[@]}" --format='value(state.state)')
if [[ "${DRY_RUN:-0}" == 1 ]]; then run "${state_cmd[@]}"; fi
while [[ "${DRY_RUN:-0}" != 1 ]]; do
  state="$("${state_cmd[@]}")"
  echo "# $state"
  [[ "$state" != ACTIVE ]] || break
  case "$state" in FAILED|SUSPENDED|SUSPENDING) echo "queued resource $NAME is $state" >&2; exit 1;; esac
  sleep 30
done

# The repository's tracked files as they are now: `git stash create` snapshots uncommitted edits
# without touching the work tree (it prints nothing when there are none).
archive="${TMPDIR:-/tmp}/mosaic_jax-$NAME.tar.gz"
snapshot="$(git -C "$REPO" stash create)"
run git -C "$REPO" archive --format=tar.gz -o "$archive" "${snapshot:-HEAD}"
run gcloud compute tpus tpu-vm scp "$archive" "$NAME:mosaic_jax.tar.gz" --worker=all "${WHERE[@]}"
install="set -euo pipefail; rm -rf mosaic_jax; mkdir mosaic_jax; tar -xzf mosaic_jax.tar.gz -C mosaic_jax; cd mosaic_jax"
install+="; PIP_BREAK_SYSTEM_PACKAGES=1 python3 -m pip install -q --user uv; ~/.local/bin/uv venv -q --python $(quote "$PYTHON_VERSION") .venv"
install+="; ~/.local/bin/uv pip install -q --python .venv/bin/python -r requirements.txt -e . 'jax[tpu]'"
run gcloud compute tpus tpu-vm ssh "$NAME" --worker=all "${WHERE[@]}" --command="$install"

train="$(quote_args .venv/bin/python launch/train.py --config "$CONFIG" --workdir "$WORKDIR" "${TRAIN_FLAGS[@]}")"
status=0
run gcloud compute tpus tpu-vm ssh "$NAME" --worker=all "${WHERE[@]}" \
  --command="set -o pipefail; cd mosaic_jax && $train 2>&1 | tee train.log" || status=$?

run mkdir -p "$LOGS"
for ((worker = 0; worker < TPU_HOSTS; worker++)); do
  run gcloud compute tpus tpu-vm scp "$NAME:mosaic_jax/train.log" "$LOGS/worker-$worker.log" \
    --worker="$worker" "${WHERE[@]}" || echo "# no log from worker $worker" >&2
done
exit "$status"
