"""Per-block rematerialization: what each scanned block keeps for its backward pass, and where.

Each block runs under `jax.checkpoint` with the policy FluxConfig.remat_policy names. The named policies
keep tensors the blocks tag with `keep(x, name)` (model/transformer.py), all in the activation dtype
(bf16 in the recipe), and recompute the rest from the block's input in the backward pass:

  qkv           the q/k/v projections, before QK-RMSNorm and RoPE      3 x hidden per token
  attention     the attention outputs                                  1 x hidden per token
  block_output  the outputs of the gated projections (attention out,   1 x hidden per token and
                MLP out, single-block proj_out)                        gated projection
  mlp_hidden    the MLP's first projection, before GELU                4 x hidden per token
  lora_hidden   x A of every LoRA (reference tokens)                   rank per adapted module

POLICIES lists every policy. CANDIDATES are those remat_policy="auto" chooses from
(train/remat_choice.py), in its fixed order of preference: the ones that recompute least first, each
needing less device memory than the one before; a backend without a time estimate (CPU, GPU) takes the
first that fits. A policy that offloads moves its tagged tensors to pinned host memory in the forward pass
and back in the backward pass: device memory as the policy it derives from without them, at the cost of
host transfers that no compiler estimate here counts (offloaded_bytes in benchmarks/train_memory.py).
jax's dots policies keep float32 matmul outputs (linear accumulates in float32): for comparison only.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
from jax.ad_checkpoint import checkpoint_name

NAMES = ("qkv", "attention", "block_output", "mlp_hidden", "lora_hidden")


class Policy(NamedTuple):
  description: str
  saved: tuple[str, ...] = ()       # tags kept in device memory
  offloaded: tuple[str, ...] = ()   # tags moved to pinned host memory
  builtin: str = ""                 # instead of tags: a jax.checkpoint_policies policy by name


_KEPT_ATTENTION = ("qkv", "attention", "block_output")
POLICIES = {
    "none": Policy("no rematerialization: every residual of the backward pass stays in device memory"),
    "keep_all": Policy("keeps every projection's output in bf16 (q/k/v, attention, gated outputs, the MLP "
                       "hidden layer, LoRA x A); recomputes norms, RoPE, GELU and modulation",
                       saved=_KEPT_ATTENTION + ("mlp_hidden", "lora_hidden")),
    "recompute_mlp": Policy("keeps q/k/v, attention outputs and gated outputs; recomputes the MLP's hidden "
                            "layer, LoRA x A, norms, RoPE and GELU", saved=_KEPT_ATTENTION),
    "keep_attention": Policy("keeps q/k/v and attention outputs (and splash's softmax statistics): attention is "
                             "never rerun; recomputes every other projection, norms, RoPE and GELU",
                             saved=("qkv", "attention")),
    "full": Policy("recomputes each block from its input", builtin="nothing_saveable"),
    "offload_mlp": Policy("keep_all, with the MLP hidden layer in host memory",
                          saved=_KEPT_ATTENTION + ("lora_hidden",), offloaded=("mlp_hidden",)),
    "offload_kept": Policy("recompute_mlp, with what it keeps in host memory: device memory as 'full'",
                           offloaded=_KEPT_ATTENTION),
    "dots_saveable": Policy("jax's: keeps every matmul output (in float32, as the matmuls accumulate)",
                            builtin="dots_saveable"),
    "dots_with_no_batch_dims_saveable": Policy("jax's: keeps every matmul output without batch axes (float32)",
                                               builtin="dots_with_no_batch_dims_saveable"),
}


# Not candidates: "none", which also keeps the float32 outputs of the elementwise work between the
# matmuls (norms, RoPE, GELU, modulation), more HBM traffic than keep_all spends recomputing them fused
# into their consumers (v5p-8, FLUX.1-dev, 1 reference: 65.5 GiB per chip, 1.14 TB accessed, est. 0.613 s
# against keep_all's 27.9 GiB, 0.74 TB, 0.474 s; at 6 references it fits no slice); the offloading
# policies, whose host transfers no estimate here counts; jax's dots policies (float32 matmul outputs).
CANDIDATES = ("keep_all", "recompute_mlp", "keep_attention", "full")


def keep(x, name: str):
  """x tagged `name` (one of NAMES) for the policies that keep it; a no-op for every other policy."""
  assert name in NAMES, name
  return None if x is None else checkpoint_name(x, name)


def jax_policy(name: str):
  """The jax.checkpoint policy of POLICIES[name] ("none" has none)."""
  policy = POLICIES[name]
  if policy.builtin:
    return getattr(jax.checkpoint_policies, policy.builtin)
  if policy.offloaded:
    return jax.checkpoint_policies.save_and_offload_only_these_names(
        names_which_can_be_saved=policy.saved, names_which_can_be_offloaded=policy.offloaded,
        offload_src="device", offload_dst="pinned_host")
  return jax.checkpoint_policies.save_only_these_names(*policy.saved)


def checkpointed(step_fn, name: str):
  """`step_fn` (one scanned block) under jax.checkpoint with policy `name` (prevent_cse is moot inside
  a scan)."""
  if name == "none":
    return step_fn
  return jax.checkpoint(step_fn, policy=jax_policy(name), prevent_cse=False)
