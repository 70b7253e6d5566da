"""Multi-subject examples composed from released single-subject pairs: the `subjects200k_multi` config.

The released SemAlign-MS-Subjects200K pairs have one subject each (a 512 px target scene, a reference
crop, the subject's mask in the target and two 64x64 matcher grids). An example of R references (R drawn
from `refs` with `refs_weights`) takes one pair's target as the scene, whose own subject stays
(reference 0), and pastes R - 1 other pairs' subjects into it, each the source target's pixels under
its mask, scaled and shifted: composite = scale * source + offset (continuous pixel coordinates, pixel
centres at +0.5; `image_ops.PixelTransform`). Subjects are pasted in stacking order, later ones
covering earlier ones. The references are the pairs' reference crops, unchanged, so every released
reference coordinate keeps its meaning.

Per reference the example stores (schema.py):
  target_mask     its subject's placed mask minus what later subjects cover; every composite pixel takes
                  the source mask pixel under its inverse-placed centre;
  coord_dift/geoaware  on the composite's 64x64 cells: a cell reads its sample pixel (8i + 4, 8j + 4),
                  i.e. the pixel just below and right of its centre; where that pixel is visible for this
                  reference, the cell takes the source pair's released coordinates at the source cell
                  that pixel's centre inverse-places to (the source's own disagreements stay); every
                  other cell carries no pair: NO_PAIR_DIFT against NO_PAIR_GEOAWARE, which the official
                  agreement rule drops at any token grid (see schema.py);
  provenance      source uid and row, role, stacking order, scale, offset, visible fraction.
The official rule (correspondence.py) then derives token pairs at any training resolution, unchanged.

Placement. Each pasted subject's mask bounding box gets a long side of `subject_size` (a range, as a
fraction of the canvas side; the scale is capped at `max_scale`, 1: subjects are never enlarged, which
would blur them) at a uniformly drawn position with the box inside the canvas. A placement is kept when
every reference of the example still shows at least `min_visible` of its placed mask (with occlusion
"forbid": when it covers no visible subject pixel at all) and keeps at least `min_pairs` token pairs by
the official rule at every (resolution, token grid) of `min_pairs_at`; up to `placement_attempts`
candidates (a random partner pair with a random size and position each) per slot. When a slot cannot be
filled the example is written with the subjects placed so far (counted), or, with none, the scene pair is
no scene (it may still be pasted elsewhere).

The pool. Pairs stream in shard and row order into a pool of `pool_size`; once full, the oldest pair
is the next scene and its partners are drawn from the pool, so memory stays bounded and partners come
from nearby rows. A pair takes part in at most `max_uses` examples, at most `max_scene_uses` of them as
the scene (defaults 1 and 1: every pair in at most one example). With `distinct_items`, no two subjects
of an example share an `item` name (case-insensitively), so captions name them apart. The build is a
pure function of the manual directory, the settings and the seed.

Captions (`caption`): "scene_with_items" (default): the scene pair's target caption (`description_0`,
written for its item, which is reference 0), its final period dropped, then ", together with the X, the
Y and the Z." naming every pasted subject by its `item`, in reference order; "items": "A photo of the
W, the X, the Y and the Z." with every item. `description_1` describes the pair's reference image, not
the composite, and is not used.

Splits: a row is in `validation` when a hash of (shard path relative to the manual directory, row
number) falls below `validation_fraction`, in `train` otherwise, so the two never share a pair, and the
decision needs no decoding.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import pathlib
import typing
import zlib
from typing import Iterable, Iterator

import numpy as np
from PIL import Image

from mosaic_jax.data import build_report, released_layout, schema
from mosaic_jax.data.correspondence import COORD_GRID, derive_token_pairs, mask_token_cells
from mosaic_jax.data.image_ops import PixelTransform, encode_png, to_rgb

CANVAS = released_layout.CROP_SIZE  # the released target crop's side, the composite's size
CELL = CANVAS // COORD_GRID  # composite pixels per matcher cell (8)
CAPTION_RULES = ("scene_with_items", "items")
OCCLUSION_POLICIES = ("allow", "forbid")
SPLITS = ("train", "validation")


class CompositionError(ValueError):
  """The released data gave a split no example (the message names the directory and the counts)."""


@dataclasses.dataclass(frozen=True)
class CompositionSettings:
  """How examples are composed (module docstring); the defaults are the `subjects200k_multi` config's."""
  refs: tuple[int, ...] = (2, 3, 4, 5, 6)  # reference counts R an example may have
  refs_weights: tuple[float, ...] = ()  # their relative frequencies, one per refs entry; () for equal ones
  subject_size: tuple[float, float] = (0.3, 0.5)  # pasted mask box long side / canvas side, drawn uniformly
  max_scale: float = 1.0  # composite px per source px, at most (1: never enlarge a subject)
  occlusion: str = "allow"  # "allow": later subjects may cover earlier ones; "forbid": no covering at all
  min_visible: float = 0.5  # share of each subject's placed mask that must stay visible
  min_pairs: int = 8  # token pairs each reference keeps (official rule) at every min_pairs_at
  min_pairs_at: tuple[tuple[int, int], ...] = ((512, 32),)  # (resolution px, token grid): FLUX at 512 px
  placement_attempts: int = 40  # candidates (partner, size, position) tried per pasted subject
  pool_size: int = 256  # source pairs held at once (memory: about 0.5 MB each)
  max_uses: int = 1  # examples a source pair may take part in, in any role
  max_scene_uses: int = 1  # of which as the scene
  distinct_items: bool = True  # no two subjects of an example with the same item name
  caption: str = "scene_with_items"  # or "items" (module docstring)
  validation_fraction: float = 0.005  # rows (by a hash of shard and row) held out for `validation`

  def __post_init__(self):
    def fail(field: str, expected: str):
      raise ValueError(f"CompositionSettings.{field}={getattr(self, field)!r}: expected {expected}")
    if not self.refs or any(r < 2 for r in self.refs) or len(set(self.refs)) != len(self.refs):
      fail("refs", "distinct reference counts, each at least 2")
    if self.refs_weights and (len(self.refs_weights) != len(self.refs) or any(w < 0 for w in self.refs_weights)
                              or not sum(self.refs_weights) > 0):
      fail("refs_weights", f"() or {len(self.refs)} non-negative weights (one per refs entry), not all 0")
    if len(self.subject_size) != 2 or not 0 < self.subject_size[0] <= self.subject_size[1] <= 1:
      fail("subject_size", "(low, high) with 0 < low <= high <= 1")
    if not self.max_scale > 0:
      fail("max_scale", "a positive number")
    if self.occlusion not in OCCLUSION_POLICIES:
      fail("occlusion", f"one of {OCCLUSION_POLICIES}")
    if not 0 < self.min_visible <= 1:
      fail("min_visible", "a fraction in (0, 1]")
    if self.min_pairs < 1:
      fail("min_pairs", "at least 1")
    if not self.min_pairs_at or any(len(at) != 2 or at[1] < 1 or at[0] % at[1] for at in self.min_pairs_at):
      fail("min_pairs_at", "(resolution px, token grid) pairs, the resolution a multiple of the grid")
    for field in ("placement_attempts", "pool_size", "max_uses", "max_scene_uses"):
      if getattr(self, field) < 1:
        fail(field, "at least 1")
    if self.max_scene_uses > self.max_uses:
      fail("max_scene_uses", f"at most max_uses={self.max_uses}")
    if self.pool_size < max(self.refs):
      fail("pool_size", f"at least the largest reference count, {max(self.refs)}")
    if self.caption not in CAPTION_RULES:
      fail("caption", f"one of {CAPTION_RULES}")
    if not 0 <= self.validation_fraction < 1:
      fail("validation_fraction", "a fraction in [0, 1)")

  def splits(self) -> tuple[str, ...]:
    return SPLITS if self.validation_fraction > 0 else SPLITS[:1]

  def replace(self, assignments: Iterable[str]) -> CompositionSettings:
    """These settings with "field=value" assignments applied (the build command's --compose): tuples as
    comma-separated values ("refs=2,6"; min_pairs_at as "512x32,64x8"), booleans as true/false."""
    hints = typing.get_type_hints(CompositionSettings)
    changes = {}
    for assignment in assignments:
      field, sep, text = assignment.partition("=")
      if not sep or field not in hints:
        raise ValueError(f"--compose {assignment!r}: expected FIELD=VALUE with FIELD one of "
                         f"{sorted(hints)}")
      try:
        changes[field] = _parse(hints[field], text.strip())
      except ValueError as error:
        raise ValueError(f"--compose {assignment!r}: {error}") from error
    return dataclasses.replace(self, **changes)


def _parse(kind, text: str):
  """A setting's value from text, by its annotated type."""
  if kind is bool:
    if text.lower() not in ("true", "false"):
      raise ValueError("expected true or false")
    return text.lower() == "true"
  if kind in (int, float, str):
    return kind(text)
  (element, *rest) = typing.get_args(kind)
  if element == tuple[int, int]:  # min_pairs_at: "512x32,64x8"
    return tuple(tuple(int(v) for v in part.split("x")) for part in text.split(",") if part)
  return tuple(element(v) for v in text.split(",") if v)


def split_of_row(shard: str, row_number: int, validation_fraction: float) -> str:
  """'validation' for a held-out row, else 'train' (a hash of the shard's relative path and the row)."""
  digest = hashlib.sha256(f"{pathlib.PurePath(shard).as_posix()}:{row_number}".encode("utf-8")).digest()
  return "validation" if int.from_bytes(digest[:8], "big") / 2.0 ** 64 < validation_fraction else "train"


# ---- geometry ------------------------------------------------------------------------------------

def place_mask(mask: np.ndarray, transform: PixelTransform) -> np.ndarray:
  """bool [S, S] source mask -> bool [S, S] on the composite: each composite pixel takes the source pixel
  under its inverse-placed centre (none outside the source)."""
  size = mask.shape[0]
  centres = np.arange(size) + 0.5
  rows, cols = (np.floor(v).astype(np.int64) for v in transform.invert(centres, centres))
  row_ok, col_ok = (rows >= 0) & (rows < size), (cols >= 0) & (cols < size)
  placed = np.zeros_like(mask)
  placed[np.ix_(row_ok, col_ok)] = mask[np.ix_(rows[row_ok], cols[col_ok])]
  return placed


SAMPLE_PIXELS = np.arange(COORD_GRID) * CELL + CELL // 2  # each composite cell's sample pixel, per axis


def composite_grids(coords: tuple[np.ndarray, np.ndarray], transform: PixelTransform, visible: np.ndarray
                    ) -> tuple[np.ndarray, np.ndarray]:
  """One reference's (coord_dift, coord_geoaware) on the composite (module docstring): uint8 [64, 64, 2]."""
  source_y, source_x = transform.invert(SAMPLE_PIXELS + 0.5, SAMPLE_PIXELS + 0.5)
  rows = np.clip(np.floor(source_y).astype(np.int64) // CELL, 0, COORD_GRID - 1)
  cols = np.clip(np.floor(source_x).astype(np.int64) // CELL, 0, COORD_GRID - 1)
  has_pair = visible[np.ix_(SAMPLE_PIXELS, SAMPLE_PIXELS)][..., None]
  dift = np.where(has_pair, coords[0][np.ix_(rows, cols)], np.asarray(schema.NO_PAIR_DIFT, np.uint8))
  geoaware = np.where(has_pair, coords[1][np.ix_(rows, cols)], np.asarray(schema.NO_PAIR_GEOAWARE, np.uint8))
  return dift.astype(np.uint8), geoaware.astype(np.uint8)


def token_pair_count(grids: tuple[np.ndarray, np.ndarray], visible: np.ndarray, resolution: int, grid: int) -> int:
  """Token pairs the official rule derives from a stored reference at a training resolution and grid."""
  cells = mask_token_cells(visible.astype(np.uint8) * 255, resolution, grid)
  return len(derive_token_pairs(grids[0], grids[1], cells, grid)[0])


def paste(canvas: np.ndarray, source: Image.Image, placed: np.ndarray, transform: PixelTransform) -> None:
  """Draws the source's pixels under `placed` onto the uint8 canvas [S, S, 3] in place, resampled over the
  placed window (Lanczos, antialiased when shrinking) with the geometry of place_mask."""
  rows, cols = np.nonzero(np.any(placed, axis=1))[0], np.nonzero(np.any(placed, axis=0))[0]
  top, bottom, left, right = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
  (y0, y1), (x0, x1) = transform.invert(np.array([top, bottom], float), np.array([left, right], float))
  size = source.size[0]
  box = tuple(float(np.clip(v, 0, size)) for v in (x0, y0, x1, y1))
  window = np.asarray(source.resize((int(right - left), int(bottom - top)), Image.LANCZOS, box=box))
  region = placed[top:bottom, left:right]
  canvas[top:bottom, left:right][region] = window[region]


# ---- the source pairs ----------------------------------------------------------------------------

@dataclasses.dataclass(eq=False)
class SourcePair:
  """A released pair in the pool: what placement needs decoded, the images still encoded."""
  uid: str
  item: str
  caption: str
  source: str  # "shard row N"
  image_bytes: bytes  # the diptych
  mask: np.ndarray  # bool [CANVAS, CANVAS]
  box: tuple[int, int, int, int]  # the mask's bounding box (top, left, bottom, right), pixel edges
  coords: tuple[np.ndarray, np.ndarray]
  uses_left: int = 0
  scene_uses_left: int = 0
  times_used: int = 0
  failed_as_scene: bool = False


def released_pairs(manual_dir: str, split: str, settings: CompositionSettings,
                   report: build_report.BuildReport) -> Iterator[SourcePair]:
  """The split's usable pairs, in shard and row order; every other row counted under its reason."""
  in_split = lambda shard, row_number: split_of_row(shard, row_number, settings.validation_fraction) == split
  for shard, row_number, row in released_layout.kept_rows(manual_dir, report, in_split):
    source = f"{shard} row {row_number}"
    try:
      pair = released_layout.read_pair(row, manual_dir, source)
    except build_report.SkipExample as skip:
      report.count(skip.reason, skip.detail)
      continue
    if pair.mask is None:
      report.count(build_report.PAIR_MISSING_MASK, f"{source}: uid {pair.uid}")
      continue
    if pair.coords is None:
      report.count(build_report.PAIR_MISSING_COORDS, f"{source}: uid {pair.uid}")
      continue
    mask_image = pair.mask
    if mask_image.size != (CANVAS, CANVAS):  # as the official loader: nearest, then > 0.5
      mask_image = mask_image.resize((CANVAS, CANVAS), Image.NEAREST)
    mask = np.asarray(mask_image) > 127
    if not mask.any():
      report.count(build_report.PAIR_EMPTY_MASK, f"{source}: uid {pair.uid}")
      continue
    identity = PixelTransform()
    grids = composite_grids(pair.coords, identity, mask)
    if any(token_pair_count(grids, mask, size, grid) < settings.min_pairs for size, grid in settings.min_pairs_at):
      report.count(build_report.PAIR_TOO_FEW_TOKEN_PAIRS, f"{source}: uid {pair.uid}")
      continue
    rows, cols = np.nonzero(np.any(mask, axis=1))[0], np.nonzero(np.any(mask, axis=0))[0]
    yield SourcePair(uid=pair.uid, item=pair.item.strip(), caption=pair.caption, source=source,
                     image_bytes=released_layout.image_bytes(row), mask=mask,
                     box=(int(rows[0]), int(cols[0]), int(rows[-1]) + 1, int(cols[-1]) + 1),
                     coords=pair.coords, uses_left=settings.max_uses, scene_uses_left=settings.max_scene_uses)


# ---- composing -------------------------------------------------------------------------------------

@dataclasses.dataclass(eq=False)
class Layer:
  """One reference of the example being composed."""
  pair: SourcePair
  transform: PixelTransform
  placed: np.ndarray  # bool [S, S], before later subjects cover it
  visible: np.ndarray  # bool [S, S]
  pair_counts: tuple[int, ...] = ()  # token pairs at each min_pairs_at, for `visible`

  @property
  def area(self) -> int:
    return int(self.placed.sum())


def caption(rule: str, scene_caption: str, items: list[str]) -> str:
  """The composite's caption (module docstring); items in reference order, the scene's first."""
  def listed(names):
    names = [f"the {name}" for name in names]
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]
  if rule == "items":
    return f"A photo of {listed(items)}."
  return f"{scene_caption.strip().rstrip('.').rstrip()}, together with {listed(items[1:])}."


class Composer:
  """Composes one split's examples from its stream of source pairs (module docstring)."""

  def __init__(self, settings: CompositionSettings, seed: int, split: str, report: build_report.BuildReport):
    self.settings = settings
    self.split = split
    self.report = report
    self.rng = np.random.default_rng([seed, zlib.crc32(split.encode("utf-8"))])
    self.written = 0
    weights = np.asarray(settings.refs_weights or [1.0] * len(settings.refs), float)
    self._refs_probabilities = weights / weights.sum()

  def examples(self, pairs: Iterable[SourcePair]) -> Iterator[dict]:
    pool: collections.deque[SourcePair] = collections.deque()
    for pair in pairs:
      pool.append(pair)
      while len(pool) >= self.settings.pool_size:
        yield from self._next(pool)
    while pool:  # the end of the stream: compose from what is left
      yield from self._next(pool)

  def _example_id(self) -> str:
    """The id of the next example written."""
    return f"composed-{self.split}-{self.written:08d}"

  def _retire(self, pair: SourcePair) -> None:
    if pair.times_used == 0:
      reason = build_report.PAIR_NO_ROOM if pair.failed_as_scene else build_report.PAIR_POOL_EXHAUSTED
      self.report.count(reason, f"{pair.source}: uid {pair.uid}")

  def _next(self, pool: collections.deque) -> Iterator[dict]:
    """Pops the oldest pair and composes an example with it as the scene (or retires it)."""
    scene = pool.popleft()
    if scene.scene_uses_left == 0 or not self._candidates([scene], pool):
      self._retire(scene)  # no scene any more, or no partner left
      return
    num_refs = int(self.rng.choice(self.settings.refs, p=self._refs_probabilities))
    layers = [self._scene_layer(scene)]
    while len(layers) < num_refs:
      layer = self._place_one(layers, pool)
      if layer is None:
        break
      layers.append(layer)
    if len(layers) < 2:
      scene.failed_as_scene = True
      scene.scene_uses_left = 0
      if scene.uses_left > 0:
        pool.append(scene)  # it may still be pasted into another scene
      else:
        self._retire(scene)
      return
    if len(layers) < num_refs:
      self.report.count(build_report.FEWER_REFS_THAN_DRAWN,
                        f"{self._example_id()}: {len(layers)} of {num_refs} references")
    yield self._example(layers)
    scene.scene_uses_left -= 1
    for layer in layers:
      pair = layer.pair
      pair.uses_left -= 1
      if pair.times_used == 0:
        self.report.count(build_report.PAIRS_USED)
      pair.times_used += 1
      if pair is not scene and pair.uses_left == 0:
        pool.remove(pair)
    if scene.uses_left > 0:
      pool.append(scene)

  def _scene_layer(self, scene: SourcePair) -> Layer:
    layer = Layer(scene, PixelTransform(), scene.mask, scene.mask)
    layer.pair_counts = self._pair_counts(layer, scene.mask)
    return layer

  def _pair_counts(self, layer: Layer, visible: np.ndarray) -> tuple[int, ...]:
    grids = composite_grids(layer.pair.coords, layer.transform, visible)
    return tuple(token_pair_count(grids, visible, size, grid) for size, grid in self.settings.min_pairs_at)

  def _candidates(self, members: list[SourcePair], pool) -> list[SourcePair]:
    """The pool's pairs that may join an example of `members`."""
    taken = {id(pair) for pair in members}
    items = {pair.item.lower() for pair in members}
    return [pair for pair in pool if pair.uses_left > 0 and id(pair) not in taken
            and not (self.settings.distinct_items and pair.item.lower() in items)]

  def _draw_transform(self, pair: SourcePair) -> PixelTransform:
    top, left, bottom, right = pair.box
    size = self.rng.uniform(*self.settings.subject_size) * CANVAS
    scale = min(self.settings.max_scale, size / max(bottom - top, right - left))
    new_top = self.rng.uniform(0, max(0.0, CANVAS - (bottom - top) * scale))
    new_left = self.rng.uniform(0, max(0.0, CANVAS - (right - left) * scale))
    return PixelTransform(scale_y=scale, scale_x=scale, offset_y=new_top - scale * top,
                          offset_x=new_left - scale * left)

  def _place_one(self, layers: list[Layer], pool) -> Layer | None:
    """The next pasted subject, placed so that every reference keeps its visible share and token pairs;
    updates the covered layers' visible masks. None when no candidate fits."""
    candidates = self._candidates([layer.pair for layer in layers], pool)
    if not candidates:
      return None
    settings = self.settings
    for _ in range(settings.placement_attempts):
      pair = candidates[int(self.rng.integers(len(candidates)))]
      transform = self._draw_transform(pair)
      placed = place_mask(pair.mask, transform)
      if not placed.any():
        self.report.count(build_report.REJECTED_TOO_LITTLE_VISIBLE)
        continue
      covered = [bool((layer.visible & placed).any()) for layer in layers]
      if settings.occlusion == "forbid" and any(covered):
        self.report.count(build_report.REJECTED_OVERLAP)
        continue
      visible = [layer.visible & ~placed if hit else layer.visible for layer, hit in zip(layers, covered)]
      if any(v.sum() < settings.min_visible * layer.area for v, layer, hit in zip(visible, layers, covered) if hit):
        self.report.count(build_report.REJECTED_TOO_LITTLE_VISIBLE)
        continue
      new = Layer(pair, transform, placed, placed)
      new.pair_counts = self._pair_counts(new, placed)
      counts = [self._pair_counts(layer, v) if hit else layer.pair_counts
                for layer, v, hit in zip(layers, visible, covered)] + [new.pair_counts]
      if min(min(c) for c in counts) < settings.min_pairs:
        self.report.count(build_report.REJECTED_TOO_FEW_TOKEN_PAIRS)
        continue
      for layer, v, c in zip(layers, visible, counts):
        layer.visible, layer.pair_counts = v, c
      return new
    return None

  def _example(self, layers: list[Layer]) -> dict:
    crops = [released_layout.diptych_crops(layer.pair.image_bytes, layer.pair.source) for layer in layers]
    canvas = np.array(to_rgb(crops[0][0]))
    for layer, (target, _) in zip(layers[1:], crops[1:]):
      paste(canvas, to_rgb(target), layer.placed, layer.transform)
    refs = []
    for order, (layer, (_, reference)) in enumerate(zip(layers, crops)):
      provenance = {
          "source_id": layer.pair.uid, "source_row": layer.pair.source,
          "role": "scene" if order == 0 else "pasted", "stack_order": order,
          "scale": np.float32(layer.transform.scale_y),
          "offset": np.array([layer.transform.offset_y, layer.transform.offset_x], np.float32),
          "visible_fraction": np.float32(layer.visible.sum() / layer.area)}
      refs.append(schema.reference(encode_png(to_rgb(reference)), encode_png(layer.visible.astype(np.uint8) * 255),
                                   composite_grids(layer.pair.coords, layer.transform, layer.visible), provenance))
    text = caption(self.settings.caption, layers[0].pair.caption, [layer.pair.item for layer in layers])
    example = schema.example(self._example_id(), text, encode_png(canvas), refs)
    self.report.count(build_report.written_with(len(layers)))
    self.written += 1
    return example


def compose_released(manual_dir: str, split: str, settings: CompositionSettings, seed: int,
                     report: build_report.BuildReport) -> Iterator[dict]:
  """The split's composed examples from the released layout in manual_dir (module docstring)."""
  composer = Composer(settings, seed, split, report)
  yield from composer.examples(released_pairs(manual_dir, split, settings, report))
  if composer.written == 0:
    counts = ", ".join(f"{reason} {n}" for reason, n in sorted(report.counts.items()))
    raise CompositionError(
        f"{manual_dir}: no {split} example could be composed from its released pairs (read: "
        f"{counts or 'no kept row'}); the split needs "
        f"usable pairs (mask and coordinates) with room to place them: see docs/data.md"
        + (", or raise --compose validation_fraction" if split == "validation" else ""))
