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


# ---- a DreamBench-like folder -------------------------------------------------------------------

SUBJECTS = {"cat": ("orange", "ellipse"), "cat2": ("grey", "ellipse"), "backpack": ("navy", "rectangle"),
            "teapot": ("crimson", "polygon")}
# (subjects, prompt); "vase" has no folder: its case must be skipped with that reason.
CASES = [(["cat", "backpack"], "a cat and a backpack in the jungle"),
         (["cat", "cat2"], "a cat and a cat on the beach"),
         (["backpack", "teapot"], "a backpack and a teapot on a wooden floor"),
         (["backpack", "vase"], "a backpack and a vase in the snow")]
SEEDS = (0, 1)


def draw(color, shape, size, seed):
  from PIL import Image, ImageDraw
  import numpy as np
  rng = np.random.default_rng(seed)
  image = Image.fromarray(rng.integers(180, 256, (size[1], size[0], 3), dtype=np.uint8))
  d = ImageDraw.Draw(image)
  w, h = size
  box = [int(w * rng.uniform(0.1, 0.3)), int(h * rng.uniform(0.1, 0.3)), int(w * rng.uniform(0.6, 0.9)),
         int(h * rng.uniform(0.6, 0.9))]
  if shape == "ellipse":
    d.ellipse(box, fill=color)
  elif shape == "rectangle":
    d.rectangle(box, fill=color)
  else:
    d.polygon([(box[0], box[3]), ((box[0] + box[2]) // 2, box[1]), (box[2], box[3])], fill=color)
  return image


@pytest.fixture(scope="session")
def dreambench_fixture(tmp_path_factory):
  """{root, cases (UNO format file), generated, ...}: 4 subjects of 2-3 real views, 4 cases x 2 seeds.
  Case 0 seed 0 is a copy of cat's first view (so its cat score is high and backpack is its minimum)."""
  import json
  from PIL import Image
  base = tmp_path_factory.mktemp("dreambench")
  root = base / "dreambooth" / "dataset"
  for i, (subject, (color, shape)) in enumerate(SUBJECTS.items()):
    (root / subject).mkdir(parents=True)
    for v in range(2 + i % 2):
      draw(color, shape, (48 + 7 * v, 40 + 5 * i), seed=10 * i + v).save(root / subject / f"{v:02d}.jpg")
  entries = [{"prompt": prompt, "image_paths": [f"./dreambooth/dataset/{s}/00.jpg" for s in subjects],
              "image_tgt_path": f"./dreambooth/dataset/{subjects[0]}/00.jpg"} for subjects, prompt in CASES]
  cases = base / "dreambench_multiip.json"
  cases.write_text(json.dumps(entries))
  generated = base / "generated"
  generated.mkdir()
  for c, (subjects, _) in enumerate(CASES):
    for seed in SEEDS:
      color, shape = SUBJECTS.get(subjects[seed % len(subjects)], ("green", "rectangle"))
      draw(color, shape, (64, 64), seed=100 + 10 * c + seed).save(generated / f"{c}_{seed}.png")
  Image.open(root / "cat" / "00.jpg").save(generated / "0_0.png")
  return {"base": base, "root": root, "cases": cases, "generated": generated}
