"""Writing an evaluation: results.json (settings, every score, every skip), results.md, contact sheets."""

from __future__ import annotations

import json
import os
from typing import Sequence

from PIL import Image, ImageDraw

from mosaic_jax.evaluation.dreambench import subject_root, subject_views
from mosaic_jax.evaluation.protocol import METRICS

GROUP_ORDER = ("all", "object", "live", "object+object", "live+object", "live+live", "same-class")
HEADERS = {"clip_t": "CLIP-T", "clip_i": "CLIP-I", "clip_i_min": "CLIP-I min", "dino": "DINO",
           "dino_min": "DINO min"}


def markdown_table(result: dict, settings: dict) -> str:
  order = [g for g in GROUP_ORDER if g in result["groups"]]
  lines = ["| group | cases | images | " + " | ".join(HEADERS[m] for m in METRICS) + " |",
           "|---|---:|---:|" + "---:|" * len(METRICS)]
  for name in order:
    g = result["groups"][name]
    lines.append(f"| {name} | {g['n_cases']} | {g['n_images']} | "
                 + " | ".join(f"{g[m]:.2f}" for m in METRICS) + " |")
  lines += ["", f"Scores x100. DINO LayerNorm eps {settings.get('dino_layer_norm_eps')}; CLIP "
            f"{os.path.basename(str(settings.get('clip_model', '')))} at {settings.get('clip_image_size')} px; "
            f"seeds {result['seeds']}; {len(result['skips'])} skips (see results.json)."]
  return "\n".join(lines) + "\n"


def _thumbnail(path: str, size: int) -> Image.Image:
  tile = Image.new("RGB", (size, size), "white")
  try:
    with Image.open(path) as image:
      image = image.convert("RGB")
      image.thumbnail((size, size))
      tile.paste(image, ((size - image.width) // 2, (size - image.height) // 2))
  except OSError:
    ImageDraw.Draw(tile).text((4, size // 2), "unreadable", fill="red")
  return tile


def contact_sheet(case_results: Sequence[dict], dreambench: str, thumb: int = 128, gap: int = 12) -> Image.Image:
  """One row per case: the first real view of each subject | a gap | the generated images by seed."""
  root = subject_root(dreambench)
  rows = []
  for result in case_results:
    refs = [subject_views(root, s)[0] for s in result["subjects"]]
    gens = [im["file"] for im in result["images"]]
    rows.append((result, refs, gens))
  width = max(len(r) + len(g) for _, r, g in rows) * thumb + gap + 160
  sheet = Image.new("RGB", (width, len(rows) * (thumb + 4)), "white")
  draw = ImageDraw.Draw(sheet)
  for i, (result, refs, gens) in enumerate(rows):
    y = i * (thumb + 4)
    draw.text((4, y + 4), f"case {result['case']}", fill="black")
    draw.text((4, y + 20), f"CLIP-I {result['clip_i']:.1f}", fill="black")
    draw.text((4, y + 36), f"min {result['clip_i_min']:.1f}", fill="black")
    draw.text((4, y + 52), f"DINO {result['dino']:.1f}", fill="black")
    x = 160
    for path in refs:
      sheet.paste(_thumbnail(path, thumb), (x, y))
      x += thumb
    x += gap
    for path in gens:
      sheet.paste(_thumbnail(path, thumb), (x, y))
      x += thumb
  return sheet


def write_report(result: dict, settings: dict, dreambench: str, out_dir: str, sheet_rows: int = 12) -> list[str]:
  """Writes results.json, results.md and contact_<group>.png (first `sheet_rows` cases of each kind)."""
  os.makedirs(out_dir, exist_ok=True)
  written = []
  path = os.path.join(out_dir, "results.json")
  with open(path, "w") as f:
    json.dump({"settings": settings, **result}, f, indent=2)
  written.append(path)
  path = os.path.join(out_dir, "results.md")
  with open(path, "w") as f:
    f.write(markdown_table(result, settings))
  written.append(path)
  by_kind: dict[str, list[dict]] = {}
  for case in result["cases"]:
    by_kind.setdefault(case["kind"], []).append(case)
  for kind, cases in sorted(by_kind.items()):
    path = os.path.join(out_dir, f"contact_{kind.replace('+', '_')}.png")
    contact_sheet(cases[:sheet_rows], dreambench).save(path)
    written.append(path)
  return written
