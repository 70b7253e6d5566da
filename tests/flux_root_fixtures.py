"""A tiny FLUX checkpoint root written by diffusers/transformers/tokenizers in the real layout
(transformer/, vae/, text_encoder/, text_encoder_2/, tokenizer/, tokenizer_2/), every weight random.

Shared by the encoder tests and the sampler tests: `build_flux_root(root)` writes it and returns the
PyTorch modules, so tests can compare against them.
"""

from __future__ import annotations

import torch
import transformers
import diffusers

from test_encoders_text import randomize_  # tests/ is on sys.path under pytest
from test_encoders_tokenizers import write_clip_tokenizer, write_t5_tokenizer
from test_encoders_vae import TINY as VAE_TINY

# Fits the encoders below: 16 VAE latent channels x 2x2 packing, T5 d_model 32, CLIP hidden 32.
TINY_ROOT_TRANSFORMER = dict(patch_size=1, in_channels=64, num_layers=1, num_single_layers=1,
                             attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                             pooled_projection_dim=32, guidance_embeds=True, axes_dims_rope=(4, 6, 6))


def build_flux_root(root, with_transformer: bool = False) -> dict:
  """Writes the checkpoint root under `root` (a pathlib.Path); returns {subfolder: torch module}."""
  clip_vocab = write_clip_tokenizer(root / "tokenizer")
  write_t5_tokenizer(root / "tokenizer_2")
  t5_vocab = len(transformers.T5Tokenizer.from_pretrained(str(root / "tokenizer_2")))
  models = {
      "text_encoder": transformers.CLIPTextModel(transformers.CLIPTextConfig(
          vocab_size=len(clip_vocab), hidden_size=32, intermediate_size=48, num_hidden_layers=2,
          num_attention_heads=4, max_position_embeddings=77, eos_token_id=2)),
      "text_encoder_2": transformers.T5EncoderModel(transformers.T5Config(
          vocab_size=t5_vocab, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4,
          feed_forward_proj="gated-gelu", dropout_rate=0.0)),
      "vae": diffusers.AutoencoderKL(**VAE_TINY),
  }
  for seed, (name, module) in enumerate(models.items()):
    randomize_(module.eval(), seed)
    module.save_pretrained(str(root / name))
  if with_transformer:
    from flux_torch_reference import randomize_ as randomize_flux_
    transformer = diffusers.FluxTransformer2DModel(**TINY_ROOT_TRANSFORMER).eval()
    randomize_flux_(transformer, torch.Generator().manual_seed(3))
    transformer.save_pretrained(str(root / "transformer"))
    models["transformer"] = transformer
  return models
