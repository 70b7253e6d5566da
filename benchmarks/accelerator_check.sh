#!/usr/bin/env bash
# The MOSAIC recipe's trainer on one GPU at FLUX.1-dev scale, in one call of about 9 minutes, on a GPU
# machine that may have no network (nothing is downloaded: random weights, synthetic data). The GPU needs
# more than 80 GB (the rank-512 LoRA's training state alone is 30 GB): an H200 or larger.
#
#   on a machine with network:  bash benchmarks/accelerator_check.sh fetch   # the wheels -> .whl/
#   on the GPU machine, with this checkout and its .whl/ copied there:  bash benchmarks/accelerator_check.sh
#
# 0. the GPU-only tests (pytest -m gpu: cudnn attention against the xla path, values and gradients);
# 1. launch/train.py --config configs/flux_ms.py:flux_random (FLUX.1-dev transformer with random bf16
#    weights, LoRA rank 512, FLUX's VAE geometry, 512 px, 6 references, cudnn attention): the AOT
#    memory report, 12 steps with step time, TFLOP/s and MFU, one checkpoint with its LoRA exports;
#    (resumption is left to the CPU tests: a second 30 GB checkpoint would not fit the 64 GB disk);
# 2. benchmarks/train_memory.py at 1 and 6 references: the compiler's memory per device.
# Logs go to $OUT when it is set, else /tmp/accelerator_check.
# A dry run of this script on a CPU machine shrinks both with extra arguments, e.g.
#   TRAIN_ARGS="--config.model_overrides.num_layers=1 ..." MEMORY_ARGS="--layers 1,1" bash benchmarks/accelerator_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."

# Packages a bare CUDA jax image may lack; pure-Python ones are built on the networked machine as wheels
# (setuptools: it builds the editable install of mosaic_jax there, offline).
# protobuf too: grain needs >= 5.28 and the image's version is not known; this one is what our tests use.
BINARY_WHEELS=(grain array-record dm-tree protobuf)
PURE_WHEELS=(setuptools ml-collections tensorboardX tensorflow-datasets immutabledict promise simple-parsing termcolor toml
             tensorflow-metadata googleapis-common-protos importlib-resources docstring-parser portpicker)

if [[ "${1:-}" == fetch ]]; then
  set -e
  mkdir -p .whl
  for package in "${BINARY_WHEELS[@]}"; do
    pip download -q -d .whl --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 \
      --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 "$package"
  done
  pip wheel -q -w .whl --no-deps "${PURE_WHEELS[@]}"
  du -sh .whl
  exit 0
fi

OUT=${OUT:-/tmp/accelerator_check}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps .whl/*.whl 2>&1 | tail -3
python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . 2>&1 | tail -3  # mosaic_jax itself
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/device.txt"
python3 -c "import jax, jaxlib; print('jax', jax.__version__, 'jaxlib', jaxlib.__version__, jax.devices())" \
  | tee -a "$OUT/device.txt"

start=$SECONDS  # the GPU-only tests (cudnn attention values and gradients); tests default to the CPU
JAX_PLATFORMS=cuda timeout 150 python3 -m pytest -q -m gpu tests/test_attention.py 2>&1 | tee "$OUT/gpu_tests.log" | tail -5
echo "gpu tests: exit ${PIPESTATUS[0]} after $((SECONDS - start)) s" | tee -a "$OUT/gpu_tests.log"

export XLA_PYTHON_CLIENT_MEM_FRACTION=0.95  # the default 0.75 leaves 35 GB of an H200 unused
WORKDIR=/tmp/flux_random
TRAIN=(python3 launch/train.py --config configs/flux_ms.py:flux_random --workdir "$WORKDIR"
       --config.dataset.data_dir=/tmp/tfds --config.dataset.build.min_refs=6
       --config.model_overrides.attention_impl=${ATTENTION:-cudnn} --config.log_every=4 ${TRAIN_ARGS:-})
start=$SECONDS
timeout 400 "${TRAIN[@]}" --config.total_steps=12 --config.checkpoint_every=12 2>&1 | tee "$OUT/train.log" \
  | grep -E "^(model |base parameters|compiled|step |building)|Error|error"
echo "train: exit ${PIPESTATUS[0]} after $((SECONDS - start)) s" | tee -a "$OUT/train.log"
du -sh "$WORKDIR"/checkpoints "$WORKDIR"/lora 2>&1 | tee -a "$OUT/train.log"

rm -rf "$WORKDIR"  # 45 GB of the 64 GB disk

start=$SECONDS
timeout 140 python3 benchmarks/train_memory.py --mesh 1,1,1 --batch 1 --refs 1,6 --attention "${ATTENTION:-cudnn}" \
  ${MEMORY_ARGS:-} 2>&1 \
  | tee "$OUT/memory.log" | grep -E "^(FLUX|remat)|Error|error"
echo "memory: exit ${PIPESTATUS[0]} after $((SECONDS - start)) s" | tee -a "$OUT/memory.log"
