"""An independent PyTorch/PIL statement of the official matching scripts' steps, for CI (no torchvision there).

The official `preprocess/dift_point_matching.py` and `preprocess/geoaware_point_matching.py` read their
images through `my_datasets/Subject200k_dataset.py` (torchvision Resize / ToTensor / Normalize) and
convert with torchvision `ToPILImage`; here those torchvision pieces are restated with torch and PIL as
torchvision 0.16+ implements them (PIL images are resized by PIL itself; ToPILImage turns a float array
into `(x * 255).astype(uint8)`). tests/official_matching_oneoff.py shows, once, that every function here
equals the official code run with the real torchvision on the same inputs.

Imports nothing from mosaic_jax: it is the other side of the comparison.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

IMG_SIZE = 1024


# ---- torchvision, restated ------------------------------------------------------------------------

def tv_resize(image: Image.Image, size: int, resample) -> Image.Image:
  """transforms.Resize(size: int, interpolation) on a PIL image (antialias is PIL's own)."""
  width, height = image.size
  short, long = (width, height) if width <= height else (height, width)
  new_short, new_long = size, int(size * long / short)
  new_w, new_h = (new_short, new_long) if width <= height else (new_long, new_short)
  if (new_h, new_w) == (height, width):
    return image
  return image.resize((new_w, new_h), resample)


def tv_to_tensor(image: Image.Image) -> torch.Tensor:
  array = torch.from_numpy(np.array(image, np.uint8, copy=True))
  if array.ndim == 2:
    array = array[:, :, None]
  return array.permute(2, 0, 1).contiguous().to(dtype=torch.float32).div(255)


def tv_normalize_half(tensor: torch.Tensor) -> torch.Tensor:
  mean = torch.as_tensor([0.5], dtype=tensor.dtype).view(-1, 1, 1)
  std = torch.as_tensor([0.5], dtype=tensor.dtype).view(-1, 1, 1)
  return tensor.clone().sub_(mean).div_(std)


def tv_to_pil(pic) -> Image.Image:
  if isinstance(pic, torch.Tensor):
    if pic.ndim == 3:
      pic = pic.permute((1, 2, 0))
    pic = pic.numpy(force=True)
  if np.issubdtype(pic.dtype, np.floating):
    pic = (pic * 255).astype(np.uint8)
  if pic.ndim == 3 and pic.shape[2] == 1:
    pic = pic[:, :, 0]
  return Image.fromarray(pic)


# ---- the Subjects200K dataset class at ref_size = tgt_size = 1024 ------------------------------------

def dataset_image(image: Image.Image) -> torch.Tensor:
  """transform_tgt / transform_ref: Resize(1024, BILINEAR, antialias) -> ToTensor -> Normalize([.5], [.5])."""
  return tv_normalize_half(tv_to_tensor(tv_resize(image, IMG_SIZE, Image.BILINEAR)))


def dataset_mask(mask: Image.Image) -> torch.Tensor:
  """transform_mask: Resize(1024, NEAREST) -> ToTensor -> (> 0.5) as uint8, [1, H, W]."""
  return (tv_to_tensor(tv_resize(mask, IMG_SIZE, Image.NEAREST)) > 0.5).to(torch.uint8)


# ---- the scripts' preparation ------------------------------------------------------------------------

def target_image(target: Image.Image, mask: Image.Image | None) -> Image.Image | None:
  """Both scripts: to_pil(tgt_img * mask).resize((1024, 1024)); None where mask.sum() == 0 (skipped)."""
  tgt = (dataset_image(target) + 1) / 2.
  binary = dataset_mask(mask) if mask is not None else torch.ones((1,) + tgt.shape[1:], dtype=torch.uint8)
  if binary.sum() == 0:
    return None
  return tv_to_pil(tgt * binary).resize((IMG_SIZE, IMG_SIZE))


def dift_reference_image(reference: Image.Image) -> Image.Image:
  """The DIFT script: remove_white_background(ref_img) (numpy, tolerance 5 on 0..255), then resize."""
  ref = (dataset_image(reference) + 1) / 2.
  img_np = np.transpose(np.array(ref) * 255, (1, 2, 0))
  is_white = np.all(np.abs(img_np - np.array([255, 255, 255])) <= 5, axis=-1)
  return tv_to_pil(img_np * (~is_white)[..., None] / 255.0).resize((IMG_SIZE, IMG_SIZE))


def geoaware_reference_image(reference: Image.Image) -> Image.Image:
  """The GeoAware script: torch, white within 10/255 of 1.0 on every channel, zeroed; then resize."""
  ref = ((dataset_image(reference) + 1) / 2.).permute(1, 2, 0)
  white = torch.tensor([1.0, 1.0, 1.0], dtype=ref.dtype)
  is_white = torch.all(torch.abs(ref - white) <= 10 / 255.0, dim=-1)
  kept = (ref * (~is_white).unsqueeze(-1)).permute(2, 0, 1)
  return tv_to_pil(kept).resize((IMG_SIZE, IMG_SIZE))


# ---- the argmax ----------------------------------------------------------------------------------

def match(feat1: torch.Tensor, feat2: torch.Tensor, cosine: bool) -> torch.Tensor:
  """[C, H, W] target and reference features -> [H * W, 2] (y, x) as both scripts compute it (the GeoAware
  descriptors L2-normalized first, desc / (norm + 1e-8))."""
  if cosine:
    feat1 = feat1 / (torch.linalg.norm(feat1, dim=0, keepdim=True) + 1e-8)
    feat2 = feat2 / (torch.linalg.norm(feat2, dim=0, keepdim=True) + 1e-8)
  channels, _, width = feat1.shape
  scores = torch.mm(feat1.reshape(channels, -1).T, feat2.reshape(channels, -1))
  _, index = torch.max(scores, dim=1)
  return torch.cat([(index // width).unsqueeze(1), (index % width).unsqueeze(1)], dim=1)


# ---- the training loader's token pairs (build_ref2tgt_mapping at tgt_size / ref_size) -------------------

def token_pairs(dift: torch.Tensor, geoaware: torch.Tensor, mask: Image.Image | None, size: int) -> dict:
  """{reference token: target token} from two [4096, 2] grids, as the official loader at tgt = ref = size."""
  grid = size // 16
  if grid != 64:
    def resize(coords):
      coords = coords.reshape(1, 64, 64, 2).permute(0, 3, 1, 2).float()
      coords = F.interpolate(coords, size=(grid, grid), mode="bilinear", align_corners=False)
      return coords.permute(0, 2, 3, 1).reshape(grid * grid, 2).long()
    dift, geoaware = resize(dift), resize(geoaware)
  if mask is not None:
    binary = (tv_to_tensor(tv_resize(mask, size, Image.NEAREST)) > 0.5).to(torch.uint8)
  else:
    binary = torch.ones((1, size, size), dtype=torch.uint8)
  agree = torch.all(dift == geoaware, dim=1)
  cells = F.interpolate(binary.unsqueeze(0), size=(grid, grid), mode="nearest")[0, 0].reshape(-1) > 0
  keep = torch.arange(grid * grid)[agree & cells]
  ref_cells = (dift[keep] * grid) // 64
  ref_tokens = ref_cells[:, 0] * grid + ref_cells[:, 1]
  pairs = {}
  for ref_token, target_token in zip(ref_tokens.tolist(), keep.tolist()):
    pairs.setdefault(ref_token, target_token)
  return pairs


# ---- feature maps both sides share -----------------------------------------------------------------

def planted_features(image: np.ndarray, depth: int = 48, seed: int = 0) -> np.ndarray:
  """A stand-in feature extractor, the same function of the image on every side: uint8 [1024, 1024, 3]
  -> float32 [64, 64, depth], a fixed random projection of each 16x16 cell plus a random per-cell
  embedding (so no two cells, zeroed ones included, share a feature vector and the argmax has no ties)."""
  rng = np.random.default_rng(seed)
  projection = rng.standard_normal((16 * 16 * 3, depth)) / 16.0
  position = 0.3 * rng.standard_normal((64, 64, depth))
  cells = np.asarray(image, np.float64).reshape(64, 16, 64, 16, 3).transpose(0, 2, 1, 3, 4).reshape(64, 64, -1)
  return (cells / 255.0 @ projection + position).astype(np.float32)
