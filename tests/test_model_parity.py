"""Parity of the JAX multi-branch FLUX with diffusers (zero references) and with the independent
PyTorch multi-branch reference (references + LoRA), in float32."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from conftest import relative_error  # noqa: E402
from flux_torch_reference import add_mosaic_lora, mosaic_forward, reference_ids  # noqa: E402
from mosaic_jax import interop, model  # noqa: E402
from mosaic_jax.model import embeddings, transformer  # noqa: E402

TOL = 1e-4


def _inputs(batch_np, num_refs):
  h, w = batch_np["target_hw"]
  rh, rw = batch_np["ref_hw"]
  refs = batch_np["refs"][:, :num_refs] if num_refs else None
  return model.FluxInputs(
      target=batch_np["target"], target_ids=model.image_ids(h, w), text=batch_np["text"],
      text_ids=model.text_ids(batch_np["text_len"]), pooled=batch_np["pooled"],
      timestep=batch_np["timestep"], guidance=batch_np["guidance"], refs=refs,
      ref_ids=model.reference_ids(num_refs, rh, rw) if num_refs else None,
      ref_guidance=np.array([1.0, 1.5], np.float32) if num_refs else None)


def _torch_inputs(batch_np, num_refs):
  h, w = batch_np["target_hw"]
  rh, rw = batch_np["ref_hw"]
  ids = [(0, r, c) for r in range(h) for c in range(w)]
  t = {k: torch.from_numpy(batch_np[k]) for k in ("target", "text", "pooled", "timestep", "guidance")}
  t.update(target_ids=torch.tensor(ids, dtype=torch.float32),
           text_ids=torch.zeros(batch_np["text_len"], 3))
  if num_refs:
    t.update(refs=torch.from_numpy(batch_np["refs"][:, :num_refs]),
             ref_ids=reference_ids(num_refs, rh, rw), ref_guidance=torch.tensor([1.0, 1.5]))
  return t


_forward = jax.jit(model.forward, static_argnums=(2, 4))


def test_zero_reference_forward_matches_diffusers(torch_flux, flux_params, batch_np):
  cfg, params = flux_params
  t = _torch_inputs(batch_np, 0)
  with torch.no_grad():
    expected = torch_flux(hidden_states=t["target"], encoder_hidden_states=t["text"],
                          pooled_projections=t["pooled"], timestep=t["timestep"], img_ids=t["target_ids"],
                          txt_ids=t["text_ids"], guidance=t["guidance"]).sample.numpy()
  pred, aux = _forward(params, None, cfg, _inputs(batch_np, 0), False)
  assert pred.shape == expected.shape and aux == {}
  assert relative_error(pred, expected) <= TOL


def test_single_blocks_match_diffusers(torch_flux, flux_params, batch_np):
  """One double block and one single block alone, fed the same hidden states, temb and rotary tables."""
  cfg, params = flux_params
  rng = np.random.default_rng(1)
  img = rng.standard_normal((2, 24, cfg.hidden_size), np.float32)
  txt = rng.standard_normal((2, 5, cfg.hidden_size), np.float32)
  temb = rng.standard_normal((2, cfg.hidden_size), np.float32)
  ids = np.concatenate([model.text_ids(5), model.image_ids(4, 6)])
  rope = embeddings.rope(jnp.asarray(ids), cfg.axes_dims_rope, cfg.rope_theta)
  layer = lambda tree, i: jax.tree_util.tree_map(lambda x: x[i], tree)

  with torch.no_grad():
    rotary = torch_flux.pos_embed(torch.from_numpy(ids).float())
    e_txt, e_img = torch_flux.transformer_blocks[1](
        torch.from_numpy(img), torch.from_numpy(txt), torch.from_numpy(temb), rotary)
    s_txt, s_img = torch_flux.single_transformer_blocks[1](
        torch.from_numpy(img), torch.from_numpy(txt), torch.from_numpy(temb), rotary)
  (o_txt, o_img, _), _ = transformer.double_block(
      layer(params["transformer_blocks"], 1), None, cfg, jnp.asarray(txt), jnp.asarray(img), None,
      jnp.asarray(temb), None, rope, None, False)
  assert relative_error(o_img, e_img.numpy()) <= TOL
  assert relative_error(o_txt, e_txt.numpy()) <= TOL

  (main, _), _ = transformer.single_block(
      layer(params["single_transformer_blocks"], 1), None, cfg, jnp.concatenate([txt, img], 1), None,
      jnp.asarray(temb), None, rope, None)
  assert relative_error(main[:, 5:], s_img.numpy()) <= TOL
  assert relative_error(main[:, :5], s_txt.numpy()) <= TOL


@pytest.fixture(scope="module")
def lora_pair(torch_flux, flux_params, tmp_path_factory):
  """A peft LoRA (rank 4, alpha 8: scale 2) on the torch model, saved as diffusers writes it, and
  loaded into JAX from that file."""
  from diffusers import FluxPipeline
  from peft.utils import get_peft_model_state_dict
  cfg, _ = flux_params
  lora_model = add_mosaic_lora(torch_flux, rank=4, alpha=8, generator=torch.Generator().manual_seed(1))
  folder = tmp_path_factory.mktemp("lora")
  FluxPipeline.save_lora_weights(
      folder, transformer_lora_layers=get_peft_model_state_dict(lora_model),
      transformer_lora_adapter_metadata=lora_model.peft_config["default"].to_dict())
  lora = interop.load_lora(str(folder / "pytorch_lora_weights.safetensors"), cfg)
  return lora_model, lora


@pytest.mark.parametrize("num_refs", [1, 3])
def test_multi_reference_forward_matches_torch_reference(torch_flux, flux_params, lora_pair, batch_np,
                                                         num_refs):
  cfg, params = flux_params
  lora_model, lora = lora_pair
  t = _torch_inputs(batch_np, num_refs)
  expected, expected_maps = mosaic_forward(torch_flux, lora_model, **t)
  pred, aux = _forward(params, lora, cfg, _inputs(batch_np, num_refs), True)
  assert relative_error(pred, expected.numpy()) <= TOL
  maps = aux["attention_maps"]
  assert maps.shape == (2, cfg.num_layers, num_refs, 9, 24)
  # float32 softmax probabilities (up to ~0.9) from sums taken in another order on each side: 1.6e-5
  # apart at 3 references with this environment's packages (the base commit too), so 3e-5 absolute.
  np.testing.assert_allclose(maps, expected_maps.numpy(), atol=3e-5)
  np.testing.assert_allclose(np.asarray(maps).sum(-1), 1.0, atol=1e-5)
  assert float(np.asarray(maps).max()) > 0.5, "attention should be far from uniform in this test"
  # The LoRA matters here: without it the prediction moves well beyond the tolerance.
  base_pred, _ = _forward(params, None, cfg, _inputs(batch_np, num_refs), False)
  assert relative_error(base_pred, expected.numpy()) > 100 * TOL


def test_bfl_single_file_loads_identically(torch_flux, flux_params, tmp_path):
  """A BFL-named file written from the same weights (fused qkv, linear1, .scale, (shift, scale))."""
  cfg, params = flux_params
  sd = {k: v.numpy() for k, v in torch_flux.state_dict().items()}
  bfl = {}
  def put(name, *keys, swap=False):
    for leaf in ("weight", "bias"):
      parts = [sd[f"{k}.{leaf}"] for k in keys if f"{k}.{leaf}" in sd]
      if parts:
        arr = np.concatenate(parts, 0)
        if swap:
          half = arr.shape[0] // 2
          arr = np.concatenate([arr[half:], arr[:half]], 0)
        bfl[f"{name}.{leaf}"] = arr
  put("img_in", "x_embedder"); put("txt_in", "context_embedder"); put("final_layer.linear", "proj_out")
  put("final_layer.adaLN_modulation.1", "norm_out.linear", swap=True)
  for ours, theirs in (("time_in", "timestep_embedder"), ("guidance_in", "guidance_embedder"),
                       ("vector_in", "text_embedder")):
    put(f"{ours}.in_layer", f"time_text_embed.{theirs}.linear_1")
    put(f"{ours}.out_layer", f"time_text_embed.{theirs}.linear_2")
  for i in range(cfg.num_layers):
    d, b = f"transformer_blocks.{i}", f"double_blocks.{i}"
    put(f"{b}.img_mod.lin", f"{d}.norm1.linear"); put(f"{b}.txt_mod.lin", f"{d}.norm1_context.linear")
    put(f"{b}.img_attn.qkv", f"{d}.attn.to_q", f"{d}.attn.to_k", f"{d}.attn.to_v")
    put(f"{b}.txt_attn.qkv", f"{d}.attn.add_q_proj", f"{d}.attn.add_k_proj", f"{d}.attn.add_v_proj")
    put(f"{b}.img_attn.proj", f"{d}.attn.to_out.0"); put(f"{b}.txt_attn.proj", f"{d}.attn.to_add_out")
    put(f"{b}.img_mlp.0", f"{d}.ff.net.0.proj"); put(f"{b}.img_mlp.2", f"{d}.ff.net.2")
    put(f"{b}.txt_mlp.0", f"{d}.ff_context.net.0.proj"); put(f"{b}.txt_mlp.2", f"{d}.ff_context.net.2")
    for side, q, k in (("img", "norm_q", "norm_k"), ("txt", "norm_added_q", "norm_added_k")):
      bfl[f"{b}.{side}_attn.norm.query_norm.scale"] = sd[f"{d}.attn.{q}.weight"]
      bfl[f"{b}.{side}_attn.norm.key_norm.scale"] = sd[f"{d}.attn.{k}.weight"]
  for i in range(cfg.num_single_layers):
    s, b = f"single_transformer_blocks.{i}", f"single_blocks.{i}"
    put(f"{b}.linear1", f"{s}.attn.to_q", f"{s}.attn.to_k", f"{s}.attn.to_v", f"{s}.proj_mlp")
    put(f"{b}.linear2", f"{s}.proj_out"); put(f"{b}.modulation.lin", f"{s}.norm.linear")
    bfl[f"{b}.norm.query_norm.scale"] = sd[f"{s}.attn.norm_q.weight"]
    bfl[f"{b}.norm.key_norm.scale"] = sd[f"{s}.attn.norm_k.weight"]
  assert len(bfl) < len(sd), "the BFL layout fuses tensors"
  import safetensors.numpy
  path = str(tmp_path / "flux1-tiny.safetensors")
  safetensors.numpy.save_file(bfl, path)

  bfl_cfg, bfl_params = interop.load_flux_transformer(path, dtype=jnp.float32, config=cfg)
  jax.tree_util.tree_map(np.testing.assert_array_equal, bfl_params, params)


def test_lora_linear_gradients_match_torch_autograd():
  """The LoRA's hand-written backward pass (layers.lora_delta: materialized rank-major operands, a
  transposed weight gradient) against torch autograd of x W + b + (x A) B, for x, A and B."""
  from mosaic_jax.model import layers  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(3)
  x, kernel, bias = (rng.standard_normal(s).astype(np.float32) for s in ((2, 5, 16), (16, 24), (24,)))
  a, b, cot = (rng.standard_normal(s).astype(np.float32) for s in ((16, 4), (4, 24), (2, 5, 24)))

  def loss(x, a, b):
    y = layers.linear({"kernel": kernel, "bias": bias}, x, {"lora_A": a, "lora_B": b})
    return jnp.sum(y * cot)

  grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(x, a, b)
  tx, ta, tb = (torch.tensor(v, requires_grad=True) for v in (x, a, b))
  y = tx @ torch.from_numpy(kernel) + torch.from_numpy(bias) + (tx @ ta) @ tb
  (y * torch.from_numpy(cot)).sum().backward()
  for ours, theirs in zip(grads, (tx.grad, ta.grad, tb.grad)):
    assert relative_error(np.asarray(ours), theirs.numpy()) < TOL
