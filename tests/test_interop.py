"""Checkpoint and LoRA files: sharded folders, the diffusers LoRA round trip, and bad input."""

from __future__ import annotations

import os
import shutil

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from mosaic_jax import interop, model
from mosaic_jax.interop.safetensors_io import SafetensorsFile, save_safetensors

torch = pytest.importorskip("torch")


def test_safetensors_round_trip_and_torch_compatibility(tmp_path):
  import safetensors.torch
  tensors = {"a": np.arange(6, dtype=np.float32).reshape(2, 3),
             "b": np.array([1.5, -2.25], dtype=ml_dtypes.bfloat16), "c": np.array([3], np.int64)}
  path = str(tmp_path / "x.safetensors")
  save_safetensors(path, tensors, {"note": "hi"})
  loaded = safetensors.torch.load_file(path)
  assert loaded["b"].dtype == torch.bfloat16 and loaded["b"].float().tolist() == [1.5, -2.25]
  np.testing.assert_array_equal(loaded["a"].numpy(), tensors["a"])
  # And files torch writes, bf16 included, read back exactly, converted on request.
  safetensors.torch.save_file({"w": torch.tensor([[0.5, 3.0]], dtype=torch.bfloat16)}, path)
  with SafetensorsFile(path) as f:
    assert f.dtype("w") == np.dtype(ml_dtypes.bfloat16)
    np.testing.assert_array_equal(f.read("w", np.float32), [[0.5, 3.0]])


def test_sharded_diffusers_folder_loads_like_single_file(torch_flux, flux_params, tmp_path):
  folder = tmp_path / "sharded"
  torch_flux.save_pretrained(folder, max_shard_size="20KB")
  assert os.path.exists(folder / "diffusion_pytorch_model.safetensors.index.json")
  cfg, params = interop.load_flux_transformer(str(folder), dtype=jnp.float32)
  assert cfg == flux_params[0]
  jax.tree_util.tree_map(np.testing.assert_array_equal, params, flux_params[1])
  # The checkpoint root (holding transformer/) works too, and bf16 loads as bf16.
  shutil.move(str(folder), str(tmp_path / "transformer"))
  _, params16 = interop.load_flux_transformer(str(tmp_path), dtype=jnp.bfloat16)
  assert params16["x_embedder"]["kernel"].dtype == jnp.bfloat16
  np.testing.assert_array_equal(params16["proj_out"]["kernel"],
                                flux_params[1]["proj_out"]["kernel"].astype(jnp.bfloat16))


def test_checkpoint_errors_name_every_bad_key(flux_folder, tmp_path):
  bad = tmp_path / "bad"
  bad.mkdir()
  shutil.copy(os.path.join(flux_folder, "config.json"), bad / "config.json")
  with SafetensorsFile(os.path.join(flux_folder, "diffusion_pytorch_model.safetensors")) as f:
    tensors = {k: np.array(f.read(k)) for k in f.keys()}
  del tensors["transformer_blocks.1.attn.to_q.weight"]
  del tensors["proj_out.bias"]
  tensors["extra.weight"] = np.zeros(3, np.float32)
  tensors["x_embedder.weight"] = np.zeros((5, 5), np.float32)
  save_safetensors(str(bad / "diffusion_pytorch_model.safetensors"), tensors)
  with pytest.raises(interop.CheckpointError) as err:
    interop.load_flux_transformer(str(bad))
  message = str(err.value)
  for name in ("transformer_blocks.1.attn.to_q.weight", "proj_out.bias", "extra.weight",
               "x_embedder.weight: file (5, 5), model (32, 16)"):
    assert name in message
  assert "2 missing keys" in message and "1 unexpected keys" in message

  os.remove(bad / "config.json")
  with pytest.raises(interop.CheckpointError, match="no config.json"):
    interop.load_flux_transformer(str(bad))
  not_safetensors = tmp_path / "flux1-dev.safetensors"
  not_safetensors.write_bytes(b"PK\x03\x04 this is a zip file, not safetensors")
  with pytest.raises(interop.SafetensorsError, match="not a safetensors file"):
    interop.load_flux_transformer(str(not_safetensors))
  with pytest.raises(interop.CheckpointError, match="no such file"):
    interop.load_flux_transformer(str(tmp_path / "nowhere"))


def _random_lora(cfg, params, rank, seed):
  lora = model.init_lora(jax.random.key(seed), params, cfg, rank)
  leaves, treedef = jax.tree_util.tree_flatten(lora)
  keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
  return jax.tree_util.tree_unflatten(treedef, [jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)])


def test_lora_round_trip_through_diffusers(torch_flux, flux_params, tmp_path):
  """Ours -> file -> diffusers load_lora_adapter -> peft state dict -> diffusers save -> ours: identical."""
  from diffusers import FluxPipeline, FluxTransformer2DModel
  from peft.utils import get_peft_model_state_dict
  cfg, params = flux_params
  lora = _random_lora(cfg, params, rank=3, seed=0)
  path = str(tmp_path / "ours.safetensors")
  interop.save_lora(path, lora, cfg)

  transformer = FluxTransformer2DModel.from_config(torch_flux.config)
  transformer.load_state_dict(torch_flux.state_dict())
  transformer.load_lora_adapter(path, prefix="transformer", adapter_name="mosaic")
  state = get_peft_model_state_dict(transformer, adapter_name="mosaic")
  assert len(state) == 2 * sum(1 for _ in interop.lora_file.lora_module_names(cfg))
  # diffusers put the LoRA exactly where MOSAIC wants it and nowhere else.
  lora_layers = {n.rsplit(".lora_A", 1)[0] for n, _ in transformer.named_modules() if n.endswith(".lora_A")}
  assert lora_layers == {n for n, *_ in interop.lora_file.lora_module_names(cfg)}
  assert transformer.peft_config["mosaic"].lora_alpha == transformer.peft_config["mosaic"].r == 3
  np.testing.assert_array_equal(state["transformer_blocks.1.attn.to_q.lora_A.weight"].numpy(),
                                np.asarray(lora["transformer_blocks"]["attn"]["to_q"]["lora_A"][1]).T)

  out = tmp_path / "from_diffusers"
  FluxPipeline.save_lora_weights(out, transformer_lora_layers=state)
  back = interop.load_lora(str(out / "pytorch_lora_weights.safetensors"), cfg)
  jax.tree_util.tree_map(np.testing.assert_array_equal, back, lora)


def test_lora_file_alpha_padding_and_errors(flux_params, tmp_path, caplog):
  cfg, params = flux_params
  lora = _random_lora(cfg, params, rank=2, seed=3)
  path = str(tmp_path / "l.safetensors")
  interop.save_lora(path, lora, cfg)
  with SafetensorsFile(path) as f:
    tensors = {k: np.array(f.read(k)) for k in f.keys()}

  # kohya-style alpha tensors scale B by alpha / r; a module of rank 1 is zero-padded to the max rank.
  edited = dict(tensors)
  edited["transformer.x_embedder.alpha"] = np.array(6.0, np.float32)
  a = tensors["transformer.single_transformer_blocks.0.proj_mlp.lora_A.weight"][:1]
  b = tensors["transformer.single_transformer_blocks.0.proj_mlp.lora_B.weight"][:, :1]
  edited["transformer.single_transformer_blocks.0.proj_mlp.lora_A.weight"] = a
  edited["transformer.single_transformer_blocks.0.proj_mlp.lora_B.weight"] = b
  del edited["transformer.transformer_blocks.1.ff.net.2.lora_A.weight"]
  del edited["transformer.transformer_blocks.1.ff.net.2.lora_B.weight"]
  save_safetensors(path, edited)
  with caplog.at_level("WARNING"):
    loaded = interop.load_lora(path, cfg)
  assert "transformer_blocks.1.ff.net.2" in caplog.text
  np.testing.assert_allclose(loaded["x_embedder"]["lora_B"], lora["x_embedder"]["lora_B"] * 3.0, rtol=1e-6)
  np.testing.assert_array_equal(loaded["transformer_blocks"]["ff"]["net"]["2"]["lora_B"][1], 0.0)
  pm = loaded["single_transformer_blocks"]["proj_mlp"]
  np.testing.assert_array_equal(pm["lora_A"][0][:, 1:], 0.0)
  np.testing.assert_array_equal(pm["lora_A"][0][:, :1], a.T)

  # Keys of modules MOSAIC does not adapt, and shape mismatches: one error naming all of them.
  wrong = dict(tensors)
  wrong["transformer.transformer_blocks.0.attn.add_q_proj.lora_A.weight"] = np.zeros((2, 32), np.float32)
  wrong["transformer.transformer_blocks.0.attn.add_q_proj.lora_B.weight"] = np.zeros((32, 2), np.float32)
  wrong["transformer.x_embedder.lora_A.weight"] = np.zeros((2, 7), np.float32)
  save_safetensors(path, wrong)
  with pytest.raises(interop.LoraFileError) as err:
    interop.load_lora(path, cfg)
  assert "transformer_blocks.0.attn.add_q_proj.lora_A.weight" in str(err.value)
  assert "x_embedder: lora_A (2, 7)" in str(err.value)

  save_safetensors(path, {"something": np.zeros(2, np.float32)})
  with pytest.raises(interop.LoraFileError, match="no LoRA tensors"):
    interop.load_lora(path, cfg)
