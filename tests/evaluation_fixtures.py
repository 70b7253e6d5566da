"""Session-wide tiny CLIP (with its tokenizer) and DINO saved by transformers, for the evaluation tests."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from test_encoders_tokenizers import write_clip_tokenizer  # noqa: E402

CLIP_IMAGE_SIZE = 32
DINO_IMAGE_SIZE = 32
DINO_RESIZE = 37  # the tiny counterpart of DINO's 256 -> 224


def randomize_(module, seed):
  """Every weight random and non-zero (norms and embeddings included), scaled to keep activations O(1)."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, param in module.named_parameters():
      noise = torch.randn(param.shape, generator=gen)
      if "norm" in name:
        param.copy_((1.0 + 0.3 * noise) if name.endswith("weight") else 0.2 * noise)
      elif "embed" in name or "token" in name or param.ndim <= 1:
        param.copy_((0.1 if param.ndim == 1 and "embed" not in name else 1.0) * noise)
      else:
        param.copy_(noise * param[0].numel() ** -0.5)


@pytest.fixture(scope="session")
def tiny_clip(tmp_path_factory):
  """(torch CLIPModel, folder): tiny random CLIP saved by save_pretrained, tokenizer files beside it."""
  folder = tmp_path_factory.mktemp("eval_models") / "clip"
  vocab = write_clip_tokenizer(folder)
  specials = dict(bos_token_id=vocab["<|startoftext|>"], eos_token_id=vocab["<|endoftext|>"],
                  pad_token_id=vocab["<|endoftext|>"])
  config = transformers.CLIPConfig(
      text_config=dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                       num_attention_heads=4, max_position_embeddings=77, **specials),
      vision_config=dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                         image_size=CLIP_IMAGE_SIZE, patch_size=8),
      projection_dim=24)
  model = transformers.CLIPModel(config).eval()
  randomize_(model, seed=3)
  model.save_pretrained(str(folder))
  return model, str(folder)


@pytest.fixture(scope="session")
def tiny_dino(tmp_path_factory):
  """(torch ViTModel declaring eps 1e-6, folder): tiny random DINO-layout ViT."""
  folder = tmp_path_factory.mktemp("eval_models") / "dino"
  model = transformers.ViTModel(transformers.ViTConfig(
      hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
      image_size=DINO_IMAGE_SIZE, patch_size=8, layer_norm_eps=1e-6)).eval()
  randomize_(model, seed=4)
  model.save_pretrained(str(folder))
  return model, str(folder)
