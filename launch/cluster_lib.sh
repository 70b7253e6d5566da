# Sourced by launch/tpu_vm.sh, launch/gke.sh and launch/slurm.sh: the dry-run aware command runner,
# shell quoting, the user-error exit and the TPU slice geometry they share.
# shellcheck shell=bash

# One argument as the shell would need it typed: bare when safe, else single-quoted.
quote() {
  if [[ "$1" =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then
    printf '%s' "$1"
  else
    printf "'%s'" "${1//\'/\'\\\'\'}"
  fi
}

# All arguments quoted and joined by spaces: a command line that survives being re-read by a shell
# (on a remote worker, in a batch script, pasted from a dry run).
quote_args() {
  local sep=""
  for arg in "$@"; do
    printf '%s' "$sep"
    quote "$arg"
    sep=" "
  done
}

# Prints the command exactly as it would run, then runs it unless DRY_RUN=1.
run() {
  quote_args "$@"
  printf '\n'
  if [[ "${DRY_RUN:-0}" != 1 ]]; then "$@"; fi
}

# Like run, with TEXT fed on standard input (printed as a here-document).
run_with_stdin() {
  local text="$1"
  shift
  quote_args "$@"
  printf " <<'EOF'\n%s\nEOF\n" "$text"
  if [[ "${DRY_RUN:-0}" != 1 ]]; then printf '%s\n' "$text" | "$@"; fi
}

# A user error: one line, exit status 2 (as launch/*.py do).
die() {
  printf '%s: %s\n' "$(basename "$0")" "$1" >&2
  exit 2
}

# The value of an option that takes one; $1 is the option, $2 what followed it.
need_value() {
  [[ $# -ge 2 && -n "$2" ]] || die "$1 needs a value"
  printf '%s' "$2"
}

# Slice geometry of a Cloud TPU accelerator type (v4-16, v5p-8, v5litepod-16 or v5e-16, v6e-8):
# sets TPU_TYPE (gcloud's spelling), TPU_HOSTS (VMs = processes), TPU_CHIPS_PER_HOST, TPU_TOPOLOGY,
# GKE_ACCELERATOR (the node label) and TPU_RUNTIME (the TPU VM image). v4/v5p names count
# TensorCores (two per chip, four chips per VM); v5e/v6e names count chips (one VM of 8 chips up
# to 8 chips, VMs of 4 chips beyond).
tpu_geometry() {
  local family="${1%-*}" n="${1##*-}" chips
  [[ "$n" =~ ^[0-9]+$ && "$1" == *-* ]] || die "unknown TPU type '$1' (expected e.g. v5p-8, v5litepod-16, v6e-8)"
  case "$family" in
    v4|v5p)
      chips=$((n / 2))
      TPU_CHIPS_PER_HOST=$((chips < 4 ? chips : 4))
      GKE_ACCELERATOR="tpu-$family-$([[ $family == v4 ]] && echo podslice || echo slice)"
      TPU_RUNTIME="$([[ $family == v4 ]] && echo tpu-ubuntu2204-base || echo v2-alpha-tpuv5)"
      # A 3-D torus: chips 4 -> 2x2x1, then sides ascending: 8 -> 2x2x2, 16 -> 2x2x4, 32 -> 2x4x4.
      local dims=(1 1 1) i=0 c=$chips
      while ((c > 1)); do dims[i]=$((dims[i] * 2)); c=$((c / 2)); i=$(((i + 1) % 3)); done
      if ((chips <= 4)); then
        TPU_TOPOLOGY="${dims[0]}x${dims[1]}x${dims[2]}"
      else
        TPU_TOPOLOGY="$(printf '%s\n' "${dims[@]}" | sort -n | paste -sd x -)"
      fi;;
    v5litepod|v5e|v6e)
      chips=$n
      TPU_CHIPS_PER_HOST=$((chips <= 8 ? chips : 4))
      [[ $family == v6e ]] && GKE_ACCELERATOR=tpu-v6e-slice || GKE_ACCELERATOR=tpu-v5-lite-podslice
      [[ $family == v6e ]] && TPU_RUNTIME=v2-alpha-tpuv6e || TPU_RUNTIME=v2-alpha-tpuv5-lite
      [[ $family == v6e ]] || family=v5litepod
      # A 2-D torus: 1 -> 1x1, 4 -> 2x2, 8 -> 2x4, 16 -> 4x4, 32 -> 4x8, 64 -> 8x8, 256 -> 16x16.
      local a=1 b=1
      while ((a * b < chips)); do if ((a < b)); then a=$((a * 2)); else b=$((b * 2)); fi; done
      TPU_TOPOLOGY="${a}x${b}";;
    *) die "unknown TPU family in '$1' (expected v4, v5p, v5litepod/v5e or v6e)";;
  esac
  ((chips >= 1 && (chips & (chips - 1)) == 0)) || die "TPU type '$1': the chip count must be a power of two"
  TPU_TYPE="$family-$n"
  TPU_HOSTS=$(((chips + TPU_CHIPS_PER_HOST - 1) / TPU_CHIPS_PER_HOST))
  export TPU_TYPE TPU_HOSTS TPU_CHIPS_PER_HOST TPU_TOPOLOGY GKE_ACCELERATOR TPU_RUNTIME
}

# --help: the comment block at the top of the calling script.
usage() {
  sed -n '2,/^set -euo pipefail/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//'
  exit 0
}
