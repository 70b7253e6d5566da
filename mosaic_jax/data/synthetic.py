"""Procedural multi-subject scenes with exact correspondences: the `synthetic` config's generator.

A subject is a silhouette (star, heart, ring...) filled with a texture (stripes, polka dots,
marbling...) in two named colours, with shading and an outline, defined analytically on subject
coordinates (u, v) in [-1, 1]^2. Rendering evaluates that function at every pixel centre, so a
reference (the subject alone on white) and the target (the subjects scaled, shifted, possibly
mirrored, later ones occluding earlier ones, on a gradient backdrop) show the very same colours at
corresponding points. Correspondences are therefore exact: for each cell of a 64x64 grid over the
target, the known transform gives the reference cell, stored like the released matcher output (both
matchers equal), and each reference's visible region in the target is its mask. Nothing is
downloaded; every scene is a pure function of (seed, split, index).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from mosaic_jax.data.correspondence import COORD_GRID

COLOURS = {
    "red": (0.85, 0.12, 0.12), "orange": (0.95, 0.52, 0.08), "yellow": (0.95, 0.85, 0.15),
    "green": (0.15, 0.65, 0.2), "teal": (0.05, 0.55, 0.55), "blue": (0.12, 0.3, 0.85),
    "purple": (0.5, 0.2, 0.7), "pink": (0.95, 0.45, 0.7), "brown": (0.5, 0.3, 0.12),
    "black": (0.1, 0.1, 0.1), "white": (0.95, 0.95, 0.92), "gold": (0.85, 0.68, 0.2),
}


def _polar(u, v):
  return np.hypot(u, v), np.arctan2(v, u)


def _star(u, v):
  r, theta = _polar(u, v)
  return r < 0.5 + 0.4 * np.cos(5 * (theta + np.pi / 2)) ** 3 * 0.5 + 0.2 * np.cos(5 * (theta + np.pi / 2))


def _heart(u, v):
  x, y = u * 1.2, -v * 1.2 + 0.2
  return (x * x + y * y - 1) ** 3 - x * x * y ** 3 < 0


SHAPES = {
    "ball": lambda u, v: u * u + v * v < 0.81,
    "box": lambda u, v: u ** 4 + v ** 4 < 0.8 ** 4,
    "star": _star,
    "heart": _heart,
    "pyramid": lambda u, v: (v < 0.8) & (v > -0.85) & (np.abs(u) < (v + 0.85) * 0.55),
    "hexagon": lambda u, v: np.maximum(np.abs(u) * 0.866 + np.abs(v) * 0.5, np.abs(v)) < 0.8,
    "diamond": lambda u, v: np.abs(u) * 1.2 + np.abs(v) < 0.95,
    "crescent": lambda u, v: (u * u + v * v < 0.81) & ((u - 0.4) ** 2 + (v + 0.15) ** 2 > 0.45),
    "flower": lambda u, v: _polar(u, v)[0] < 0.58 + 0.3 * np.cos(6 * _polar(u, v)[1]),
    "ring": lambda u, v: (u * u + v * v < 0.85) & (u * u + v * v > 0.2),
    "egg": lambda u, v: (u / (0.62 + 0.12 * v)) ** 2 + (v / 0.9) ** 2 < 1,
    "cross": lambda u, v: ((np.abs(u) < 0.3) & (np.abs(v) < 0.88)) | ((np.abs(v) < 0.3) & (np.abs(u) < 0.7)),
}


def _smooth_wave(x):
  return 0.5 + 0.5 * np.tanh(3.0 * np.sin(x))


# Each texture maps (u, v, params) to t in [0, 1], the mix between the two colours.
TEXTURES = {
    "glossy": lambda u, v, p: 0.15 * (u + v + 2) / 4,
    "striped": lambda u, v, p: _smooth_wave(p["freq"] * (u * np.cos(p["angle"]) + v * np.sin(p["angle"])) + p["phase"]),
    "checkered": lambda u, v, p: (np.sin(p["freq"] * u + p["phase"]) * np.sin(p["freq"] * v) > 0).astype(np.float32),
    "polka-dot": lambda u, v, p: ((np.mod(u * p["freq"] / 3 + p["phase"], 1) - 0.5) ** 2
                                  + (np.mod(v * p["freq"] / 3, 1) - 0.5) ** 2 < 0.09).astype(np.float32),
    "marbled": lambda u, v, p: _smooth_wave(p["freq"] * u + 2.5 * np.sin(1.7 * p["freq"] * v / 2)
                                            + 1.5 * np.sin(0.8 * p["freq"] * (u + v)) + p["phase"]),
    "zigzag": lambda u, v, p: _smooth_wave(p["freq"] * (v + 0.3 * np.abs(np.mod(u * p["freq"] / 2, 2) - 1))),
    "ringed": lambda u, v, p: _smooth_wave(p["freq"] * 1.5 * np.hypot(u - 0.2, v + 0.1) + p["phase"]),
    "two-tone": lambda u, v, p: (u * np.cos(p["angle"]) + v * np.sin(p["angle"]) > 0.1).astype(np.float32),
}


@dataclasses.dataclass(frozen=True)
class Subject:
  shape: str
  texture: str
  primary: str
  secondary: str
  freq: float
  angle: float
  phase: float

  @property
  def name(self) -> str:
    if self.texture == "glossy":
      return f"glossy {self.primary} {self.shape}"
    return f"{self.primary} and {self.secondary} {self.texture} {self.shape}"

  def inside(self, u, v) -> np.ndarray:
    return SHAPES[self.shape](u, v)

  def colour(self, u, v) -> np.ndarray:
    """RGB in [0, 1] at subject coordinates; shading and an outline make it look like an object."""
    params = {"freq": self.freq, "angle": self.angle, "phase": self.phase}
    t = np.clip(TEXTURES[self.texture](u, v, params), 0, 1)[..., None]
    rgb = (1 - t) * np.asarray(COLOURS[self.primary]) + t * np.asarray(COLOURS[self.secondary])
    highlight = np.clip(1 - 0.6 * ((u + 0.35) ** 2 + (v + 0.35) ** 2), 0, 1)
    rgb = rgb * (0.55 + 0.45 * highlight[..., None]) + 0.25 * (highlight[..., None] ** 8)
    outline = ~self.inside(u * 1.08, v * 1.08)
    rgb = np.where(outline[..., None], rgb * 0.35, rgb)
    return np.clip(rgb, 0, 1)


@dataclasses.dataclass(frozen=True)
class Placement:
  """Subject coordinates -> canvas pixels: y = cy + half * v, x = cx + half * (-u if flip else u)."""
  center_y: float
  center_x: float
  half_size: float
  flip: bool = False

  def to_subject(self, y, x):
    u = (x - self.center_x) / self.half_size
    return (-u if self.flip else u), (y - self.center_y) / self.half_size

  def to_canvas(self, u, v):
    return self.center_y + self.half_size * v, self.center_x + self.half_size * (-u if self.flip else u)


@dataclasses.dataclass
class Scene:
  target: np.ndarray  # uint8 [S, S, 3]
  refs: list[np.ndarray]  # uint8 [S_r, S_r, 3] each
  masks: list[np.ndarray]  # uint8 [S, S] 0/255 each, visible part of subject i in the target
  coords: list[np.ndarray]  # uint8 [64, 64, 2] each
  caption: str
  subjects: list[Subject]
  target_placements: list[Placement]
  ref_placements: list[Placement]


def random_subjects(rng: np.random.Generator, count: int) -> list[Subject]:
  """Distinct shapes and distinct main colours, so every subject in a scene is recognisable."""
  shapes = rng.choice(sorted(SHAPES), size=count, replace=False)
  primaries = rng.choice(sorted(COLOURS), size=count, replace=False)
  subjects = []
  for shape, primary in zip(shapes, primaries):
    secondary = str(rng.choice([c for c in sorted(COLOURS) if c != primary]))
    subjects.append(Subject(shape=str(shape), texture=str(rng.choice(sorted(TEXTURES))),
                            primary=str(primary), secondary=secondary,
                            freq=float(rng.uniform(6, 14)), angle=float(rng.uniform(0, np.pi)),
                            phase=float(rng.uniform(0, 2 * np.pi))))
  return subjects


def _pixel_box(placement: Placement, size: int) -> tuple[slice, slice, np.ndarray, np.ndarray]:
  low_y = max(0, int(np.floor(placement.center_y - placement.half_size)))
  high_y = min(size, int(np.ceil(placement.center_y + placement.half_size)) + 1)
  low_x = max(0, int(np.floor(placement.center_x - placement.half_size)))
  high_x = min(size, int(np.ceil(placement.center_x + placement.half_size)) + 1)
  ys, xs = np.meshgrid(np.arange(low_y, high_y) + 0.5, np.arange(low_x, high_x) + 0.5, indexing="ij")
  return slice(low_y, high_y), slice(low_x, high_x), ys, xs


def silhouette(subject: Subject, placement: Placement, size: int) -> np.ndarray:
  mask = np.zeros((size, size), bool)
  rows, cols, ys, xs = _pixel_box(placement, size)
  mask[rows, cols] = subject.inside(*placement.to_subject(ys, xs))
  return mask


def paint(canvas: np.ndarray, subject: Subject, placement: Placement) -> None:
  """Draws the subject onto a float canvas [S, S, 3] in place."""
  rows, cols, ys, xs = _pixel_box(placement, canvas.shape[0])
  u, v = placement.to_subject(ys, xs)
  inside = subject.inside(u, v)
  region = canvas[rows, cols]
  region[inside] = subject.colour(u[inside], v[inside])


def _background(rng: np.random.Generator, size: int) -> tuple[np.ndarray, str]:
  names = sorted(COLOURS)
  wall_name, floor_name = rng.choice(names, size=2, replace=False)
  wall = 0.55 * np.asarray(COLOURS[wall_name]) + 0.45
  floor = 0.6 * np.asarray(COLOURS[floor_name]) + 0.25
  horizon = rng.uniform(0.55, 0.75) * size
  y = (np.arange(size) + 0.5)[:, None, None]
  shade = 1 - 0.25 * y / size
  canvas = np.where(y < horizon, wall * shade, floor * (0.8 + 0.2 * (y - horizon) / size))
  canvas = np.broadcast_to(canvas, (size, size, 3)).copy()
  canvas += rng.normal(0, 0.015, canvas.shape)
  return np.clip(canvas, 0, 1), f"a {wall_name} wall and a {floor_name} floor"


def _place_in_target(rng: np.random.Generator, subjects: list[Subject], size: int,
                     min_visible: float = 0.35) -> list[Placement]:
  count = len(subjects)
  largest = min(0.32, 0.6 / np.sqrt(count)) * size
  for attempt in range(100):
    shrink = 0.97 ** attempt
    placements = []
    for _ in subjects:
      half = rng.uniform(0.65, 1.0) * largest * shrink
      placements.append(Placement(center_y=rng.uniform(half, size - half),
                                  center_x=rng.uniform(half, size - half),
                                  half_size=half, flip=bool(rng.random() < 0.5)))
    shapes = [silhouette(s, p, size) for s, p in zip(subjects, placements)]
    covered_later = np.zeros((size, size), bool)
    visible_enough = True
    for shape in reversed(shapes):
      if (shape & ~covered_later).sum() < min_visible * max(shape.sum(), 1):
        visible_enough = False
        break
      covered_later |= shape
    if visible_enough:
      return placements
  raise RuntimeError(f"could not place {count} subjects visibly on a {size} px canvas")


def _caption(subjects: list[Subject], backdrop: str) -> str:
  names = [("an " if s.name[0] in "aeiou" else "a ") + s.name for s in subjects]
  listed = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]
  return f"a photo of {listed} in front of {backdrop}"


def correspondence_grid(target_placement: Placement, ref_placement: Placement, target_size: int,
                        ref_size: int) -> np.ndarray:
  """For each cell of the 64x64 target grid, the 64x64 reference cell under the cell centre."""
  centres = (np.arange(COORD_GRID) + 0.5) * target_size / COORD_GRID
  ys, xs = np.meshgrid(centres, centres, indexing="ij")
  ref_y, ref_x = ref_placement.to_canvas(*target_placement.to_subject(ys, xs))
  cell_y = np.clip(np.floor(ref_y * COORD_GRID / ref_size), 0, COORD_GRID - 1)
  cell_x = np.clip(np.floor(ref_x * COORD_GRID / ref_size), 0, COORD_GRID - 1)
  return np.stack([cell_y, cell_x], axis=-1).astype(np.uint8)


def make_scene(rng: np.random.Generator, num_refs: int, image_size: int,
               ref_size: int | None = None) -> Scene:
  ref_size = ref_size or image_size
  subjects = random_subjects(rng, num_refs)
  target, backdrop = _background(rng, image_size)
  target_placements = _place_in_target(rng, subjects, image_size)
  for subject, placement in zip(subjects, target_placements):
    paint(target, subject, placement)
  shapes = [silhouette(s, p, image_size) for s, p in zip(subjects, target_placements)]
  masks, refs, ref_placements, coords = [], [], [], []
  for index, subject in enumerate(subjects):
    later = np.zeros((image_size, image_size), bool)
    for shape in shapes[index + 1:]:
      later |= shape
    masks.append(((shapes[index] & ~later) * 255).astype(np.uint8))
    half = rng.uniform(0.38, 0.45) * ref_size
    jitter = 0.03 * ref_size
    ref_placement = Placement(center_y=ref_size / 2 + rng.uniform(-jitter, jitter),
                              center_x=ref_size / 2 + rng.uniform(-jitter, jitter), half_size=half)
    canvas = np.ones((ref_size, ref_size, 3))
    paint(canvas, subject, ref_placement)
    refs.append(np.round(canvas * 255).astype(np.uint8))
    ref_placements.append(ref_placement)
    coords.append(correspondence_grid(target_placements[index], ref_placement, image_size, ref_size))
  return Scene(target=np.round(target * 255).astype(np.uint8), refs=refs, masks=masks, coords=coords,
               caption=_caption(subjects, backdrop), subjects=subjects,
               target_placements=target_placements, ref_placements=ref_placements)


def scene_for_index(seed: int, split: str, index: int, min_refs: int, max_refs: int,
                    image_size: int) -> Scene:
  """The deterministic scene number `index` of a split."""
  split_code = int.from_bytes(split.encode("utf-8")[:8].ljust(8, b"\0"), "little")
  rng = np.random.default_rng([seed, split_code, index])
  num_refs = int(rng.integers(min_refs, max_refs + 1))
  return make_scene(rng, num_refs, image_size)
