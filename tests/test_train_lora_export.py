"""The trainer's LoRA export (Checkpointer.save -> lora/<step>/lora*.safetensors) loads into our forward
and into diffusers with the same outputs.

What is compared with diffusers: diffusers applies a LoRA to every token of an adapted module, MOSAIC
to reference tokens only, so no forward with references can agree. What does agree, exactly, is the
zero-reference forward of the *merged* weights: W + A B in every adapted module, run by our forward
with lora=None, against diffusers' FluxTransformer2DModel with the exported file loaded by
`load_lora_adapter` (which adds x A B to the same modules: the image stream of double blocks, all tokens
of single blocks, x_embedder, norm1.linear / norm.linear on temb). That checks every tensor of the
file: names, transposition, layer index, rank and the alpha = r scale. Our forward with references is
checked against the LoRA pytree that was exported (bit-identical after the round trip).
"""

from __future__ import annotations

import copy

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from conftest import relative_error  # noqa: E402
from mosaic_jax import interop, model  # noqa: E402
from mosaic_jax.model.lora import get_path, target_modules  # noqa: E402
from mosaic_jax.train import checkpoint as checkpoint_lib  # noqa: E402
from mosaic_jax.train import step as step_lib  # noqa: E402
from mosaic_jax.settings import OptimizerSettings  # noqa: E402

_forward = jax.jit(model.forward, static_argnums=(2,))


def _random_lora(cfg, params, rank, seed):
  lora = model.init_lora(jax.random.key(seed), params, cfg, rank)
  leaves, treedef = jax.tree_util.tree_flatten(lora)
  keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
  return jax.tree_util.tree_unflatten(treedef, [0.3 * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)])


def _merged(params, lora, cfg):
  merged = jax.tree_util.tree_map(lambda x: x, params)
  for group, module in target_modules(cfg):
    path = f"{group}.{module}" if group else module
    p, lp = get_path(merged, path), get_path(lora, path)
    p["kernel"] = p["kernel"] + jnp.einsum("...ir,...ro->...io", lp["lora_A"], lp["lora_B"])
  return merged


def _inputs(batch_np, num_refs):
  h, w = batch_np["target_hw"]
  rh, rw = batch_np["ref_hw"]
  return model.FluxInputs(
      target=batch_np["target"], target_ids=model.image_ids(h, w), text=batch_np["text"],
      text_ids=model.text_ids(batch_np["text_len"]), pooled=batch_np["pooled"],
      timestep=batch_np["timestep"], guidance=batch_np["guidance"],
      refs=batch_np["refs"][:, :num_refs] if num_refs else None,
      ref_ids=model.reference_ids(num_refs, rh, rw) if num_refs else None)


def test_lora_export_loads_into_forward_and_diffusers(torch_flux, flux_params, batch_np, tmp_path):
  cfg, params = flux_params
  lora = _random_lora(cfg, params, rank=4, seed=0)
  optimizer = step_lib.make_optimizer(OptimizerSettings(learning_rate=1e-4, b1=0.9, b2=0.999, eps=1e-8,
                                                         weight_decay=0.01, grad_clip_norm=1.0, schedule="constant",
                                                         warmup_steps=0))
  state = step_lib.init_state({"lora": lora}, optimizer)
  state["ema"] = jax.tree_util.tree_map(lambda x: 0.5 * x, state["ema"])
  checkpointer = checkpoint_lib.Checkpointer(str(tmp_path), keep=2)
  checkpointer.save(7, state, {"step": 7}, cfg)
  checkpointer.close()

  exported = interop.load_lora(str(tmp_path / "lora" / "7" / "lora.safetensors"), cfg)
  exported_ema = interop.load_lora(str(tmp_path / "lora" / "7" / "lora_ema.safetensors"), cfg)
  jax.tree_util.tree_map(np.testing.assert_array_equal, exported, lora)
  jax.tree_util.tree_map(np.testing.assert_array_equal, exported_ema, state["ema"]["lora"])

  # Ours, with references (where MOSAIC's LoRA acts): the export reproduces the trained pytree exactly.
  with_refs = _inputs(batch_np, 2)
  np.testing.assert_array_equal(_forward(params, exported, cfg, with_refs)[0],
                                _forward(params, lora, cfg, with_refs)[0])
  base_pred = _forward(params, None, cfg, with_refs)[0]
  assert relative_error(_forward(params, exported, cfg, with_refs)[0], base_pred) > 1e-2  # LoRA matters

  # Diffusers: the file through load_lora_adapter vs our forward on the merged weights (no refs).
  transformer = copy.deepcopy(torch_flux)
  transformer.load_lora_adapter(str(tmp_path / "lora" / "7" / "lora.safetensors"), prefix="transformer",
                                adapter_name="mosaic")
  h, w = batch_np["target_hw"]
  with torch.no_grad():
    expected = transformer(
        hidden_states=torch.from_numpy(batch_np["target"]), encoder_hidden_states=torch.from_numpy(batch_np["text"]),
        pooled_projections=torch.from_numpy(batch_np["pooled"]), timestep=torch.from_numpy(batch_np["timestep"]),
        img_ids=torch.tensor([(0, r, c) for r in range(h) for c in range(w)], dtype=torch.float32),
        txt_ids=torch.zeros(batch_np["text_len"], 3), guidance=torch.from_numpy(batch_np["guidance"])).sample.numpy()
  ours = _forward(_merged(params, exported, cfg), None, cfg, _inputs(batch_np, 0))[0]
  plain = _forward(params, None, cfg, _inputs(batch_np, 0))[0]
  assert relative_error(ours, expected) <= 1e-4
  assert relative_error(plain, expected) > 1e-2  # the adapter changed diffusers' output as it did ours
