"""One-off check (not collected by pytest): the official matching scripts, RUN, against our statements.

CI cannot fetch the official repository or install torchvision, so tests/test_correspondence_matching.py
compares our matcher with tests/matching_torch_reference.py (a torch/PIL statement of the scripts). This
script closes the loop once, here:

  official  (a venv with torch + torchvision; the official repository as a bare git mirror)
      python3.11 -m venv /tmp/match_tv_venv
      /tmp/match_tv_venv/bin/pip install torch==2.14.1 torchvision==0.29.1 numpy pillow
      /tmp/match_tv_venv/bin/python tests/official_matching_oneoff.py official \
          --mirror /work/.mirror/bytedance-fanqie-ai+MOSAIC/repo --out /tmp/official_matching.npz
    runs the official `process_dataset` of preprocess/dift_point_matching.py and of
    preprocess/geoaware_point_matching.py, unchanged except for their hard-coded output directory, over
    the official `Subjects200K` dataset class (my_datasets/Subject200k_dataset.py, ref_size = tgt_size =
    1024) on made-up diptychs and masks (plus non-square images through the same class's transforms);
    only the feature networks are stubbed (SD/DIFT, ODISE, DINOv2, the aggregation head: each returns
    `planted_features` of the image it is given, which the stub records). It asserts that the torch
    statement gives the same prepared images and coordinate files, that torchvision's Resize /
    ToTensor / ToPILImage equal their restatement, and saves inputs and official outputs.
  compare   (the project's venv)
      PYTHONPATH=$PWD /work/main/.venv/bin/python tests/official_matching_oneoff.py compare \
          --npz /tmp/official_matching.npz
    runs mosaic_jax.correspondence.matching on the saved inputs and asserts the same images and grids.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import os
import subprocess
import sys
import tempfile
import types

import numpy as np
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import matching_torch_reference as reference  # noqa: E402  (tests/ on the path, as under pytest)

DEPTH = 48
COORD_DIR = "/mnt/bn/shedong/hf_data/Yuanshi/Subjects200K/coord"  # hard-coded in both scripts


def _show(mirror: str, path: str) -> str:
  return subprocess.run(["git", "--git-dir", mirror, "show", f"HEAD:{path}"], check=True, capture_output=True,
                        text=True).stdout


# ---- inputs ------------------------------------------------------------------------------------------

def subject_on_white(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
  """A textured blob on white, with flat patches at the white tolerances' edges (245..255 per channel)."""
  image = np.full((height, width, 3), 255, np.uint8)
  ys, xs = np.mgrid[0:height, 0:width]
  blob = ((ys - height * 0.5) / (height * 0.3)) ** 2 + ((xs - width * 0.45) / (width * 0.28)) ** 2 < 1
  texture = (rng.random((height // 8 + 1, width // 8 + 1, 3)) * 255).astype(np.uint8)
  image[blob] = np.kron(texture, np.ones((8, 8, 1), np.uint8))[:height, :width][blob]
  edge_values = [244, 245, 246, 249, 250, 251, 254, 255]
  for index, value in enumerate(edge_values):
    top, left = 8 + 24 * (index % 4), 8 + 24 * (index // 4)
    image[top:top + 20, left:left + 20] = value
    image[top + 10:top + 20, left:left + 20, index % 3] = edge_values[(index + 3) % len(edge_values)]
  return image


def scene(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
  base = rng.integers(0, 256, (height // 16 + 1, width // 16 + 1, 3)).astype(np.uint8)
  scene = np.asarray(Image.fromarray(base).resize((width, height), Image.BICUBIC))
  noise = rng.integers(-20, 21, scene.shape)
  return np.clip(scene.astype(np.int64) + noise, 0, 255).astype(np.uint8)


def soft_mask(rng: np.random.Generator, height: int, width: int, kind: str) -> np.ndarray:
  if kind == "empty":
    return np.zeros((height, width), np.uint8)
  ys, xs = np.mgrid[0:height, 0:width]
  inside = ((ys - height * rng.uniform(0.3, 0.7)) / (height * 0.3)) ** 2 + (
      (xs - width * rng.uniform(0.3, 0.7)) / (width * 0.25)) ** 2 < 1
  values = np.where(inside, rng.integers(128, 256, inside.shape), rng.integers(0, 128, inside.shape))
  return values.astype(np.uint8)  # grey levels on both sides of the 0.5 threshold


def _official_uid(item: str, caption: str, target: Image.Image) -> str:
  buffer = io.BytesIO()
  target.save(buffer, format="PNG")
  digest = hashlib.sha256(buffer.getvalue()).hexdigest()[:8]
  return hashlib.sha256(f"{item}_{caption}_{digest}".encode("utf-8")).hexdigest()


# ---- stubs for the scripts' heavy imports --------------------------------------------------------------

class _Recorder:
  """What the stubbed feature networks were given, in call order, and planted features for it."""

  def __init__(self):
    self.images: list[np.ndarray] = []

  def record(self, image: Image.Image):
    import torch
    array = np.asarray(image.convert("RGB"))
    self.images.append(array)
    return torch.from_numpy(reference.planted_features(array, DEPTH)).permute(2, 0, 1)[None].contiguous()


def _install_stubs(recorder: _Recorder) -> None:
  import torch

  def module(name, **attrs):
    stub = types.ModuleType(name)
    stub.__dict__.update(attrs)
    sys.modules[name] = stub
    return stub

  class SDFeaturizer:  # DIFT (the tensor it is given is recovered to the PIL image below)
    def __init__(self, *args, **kwargs):
      pass

  class AggregationNetwork:
    def __init__(self, *args, **kwargs):
      pass

    def load_pretrained_weights(self, *args):
      pass

    def __call__(self, gathered):
      return recorder.last_features

  class ViTExtractor:
    def __init__(self, *args, **kwargs):
      pass

    def preprocess_pil(self, image):
      return torch.zeros(1, 3, 14, 14)

    def extract_descriptors(self, batch, layer, facet):
      return torch.zeros(1, 1, 64 * 64, 1)

  def sd_resize(img, target_res, resize=True, to_pil=True):
    if target_res == 64 * 16:  # the SD input: the image the GeoAware features are of
      recorder.last_features = recorder.record(img)
    return img

  def process_features_and_mask(model, aug, image, mask=False, raw=True):
    return {"s2": None, "s3": torch.zeros(1, 1, 64, 64), "s4": torch.zeros(1, 1, 32, 32),
            "s5": torch.zeros(1, 1, 16, 16)}

  for name in ("src", "src.models", "utils", "model_utils", "matplotlib"):
    module(name)
  module("src.models.dift_sd", SDFeaturizer=SDFeaturizer)
  module("datasets", load_dataset=None)
  module("cv2")
  module("matplotlib.pyplot")
  module("tqdm", tqdm=lambda iterable, **kwargs: iterable)
  module("utils.utils_correspondence", resize=sd_resize)
  module("model_utils.extractor_sd", load_model=lambda **kwargs: (None, None),
         process_features_and_mask=process_features_and_mask)
  module("model_utils.extractor_dino", ViTExtractor=ViTExtractor)
  module("model_utils.projection_network", AggregationNetwork=AggregationNetwork)
  module("preprocess_map", set_seed=lambda seed: None)
  torch.Tensor.cuda = lambda self, *args, **kwargs: self  # no GPU here; everything stays on the CPU


def _exec_official(mirror: str, path: str, name: str, coord_dir: str) -> dict:
  source = _show(mirror, path).replace(COORD_DIR, coord_dir)
  namespace = {"__name__": name, "__file__": path}
  exec(compile(source, f"official:{path}", "exec"), namespace)  # pylint: disable=exec-used
  return namespace


# ---- the official run ---------------------------------------------------------------------------------

def run_official(mirror: str, out: str) -> None:
  import torch
  import torchvision
  from torchvision import transforms

  workdir = tempfile.mkdtemp(prefix="official_matching_")
  os.chdir(workdir)  # the GeoAware script loads results_spair/best_856.PTH relative to it
  os.makedirs("results_spair")
  torch.save({}, "results_spair/best_856.PTH")
  recorder = _Recorder()
  _install_stubs(recorder)
  package = types.ModuleType("my_datasets")
  package.__path__ = []
  sys.modules["my_datasets"] = package
  dataset_module = types.ModuleType("my_datasets.Subject200k_dataset")
  exec(compile(_show(mirror, "my_datasets/Subject200k_dataset.py"), "official:Subject200k_dataset.py", "exec"),
       dataset_module.__dict__)  # pylint: disable=exec-used
  sys.modules["my_datasets.Subject200k_dataset"] = dataset_module
  Subjects200K = dataset_module.Subjects200K

  rng = np.random.default_rng(0)
  mask_dir = os.path.join(workdir, "mask")
  os.makedirs(mask_dir)
  rows, cases = [], []
  for index, mask_kind in enumerate(["soft", "soft", "empty", "missing", "soft"]):
    target = scene(rng, 512, 512)
    ref = subject_on_white(rng, 512, 512)
    diptych = np.full((528, 1056, 3), 255, np.uint8)
    diptych[8:520, 8:520] = target
    diptych[8:520, 528:1040] = ref
    item, caption = f"item{index}", f"a caption {index}"
    uid = _official_uid(item, caption, Image.fromarray(diptych).crop((8, 8, 520, 520)))
    mask = None if mask_kind == "missing" else soft_mask(rng, 512, 512, mask_kind)
    if mask is not None:
      Image.fromarray(mask).save(os.path.join(mask_dir, f"{uid}.png"))
    rows.append({"image": Image.fromarray(diptych),
                 "description": {"item": item, "description_0": caption, "description_1": "ref"}})
    cases.append({"id": uid, "target": target, "ref": ref, "mask": mask})
  # The scripts build the class without `coord_folder`, which its __getitem__ joins into a path (TypeError,
  # then an endless retry of random rows): the released class and scripts disagree. A folder without
  # coordinate files gives what the scripts need (no pairs, never read by them).
  subjects = Subjects200K(original_dataset=rows, ref_size=1024, tgt_size=1024, grounding_dir=mask_dir,
                          coord_folder=os.path.join(workdir, "no_coords"),
                          mode="train", t_drop_rate=0.0, i_drop_rate=0.0, ti_drop_rate=0.0)
  for case, index in zip(cases, range(len(rows))):
    assert subjects[index]["id"] == case["id"], "the dataset class fell back to another row"

  class Items(torch.utils.data.Dataset):
    """Non-square images through the dataset class's own transforms (the class itself crops squares)."""

    def __init__(self, items):
      self.items = items

    def __len__(self):
      return len(self.items)

    def __getitem__(self, index):
      case = self.items[index]
      return {"id": case["id"], "ref_imgs": [subjects.transform_ref(Image.fromarray(case["ref"]))],
              "tgt_img": subjects.transform_tgt(Image.fromarray(case["target"])),
              "masks": [subjects.transform_mask(Image.fromarray(case["mask"]))], "caption": "",
              "drop_image": False, "drop_text": False, "drop_mask": False}

  shapes = [((600, 400), (300, 500)), ((384, 700), (700, 700)), ((1100, 1300), (512, 256))]
  odd = []
  for index, ((th, tw), (rh, rw)) in enumerate(shapes):
    odd.append({"id": f"odd{index}", "target": scene(rng, th, tw), "ref": subject_on_white(rng, rh, rw),
                "mask": soft_mask(rng, th // 2, tw // 2, "soft")})
  cases += odd

  outputs = {}
  for script, name, cosine in (("preprocess/dift_point_matching.py", "dift", False),
                               ("preprocess/geoaware_point_matching.py", "geoaware", True)):
    coord_dir = os.path.join(workdir, "coord")
    namespace = _exec_official(mirror, script, f"official_{name}", coord_dir)
    recorder.images.clear()
    if name == "dift":
      namespace["to_pil"] = transforms.ToPILImage()  # set in the script's main()
      original = namespace["PILToTensor"]

      class RecordingPILToTensor(original):  # DIFT's extract_features: the image it turns into a tensor
        def __call__(self, image):
          recorder.last_features = recorder.record(image)
          return super().__call__(image)
      namespace["PILToTensor"] = RecordingPILToTensor

      class Dift:
        def forward(self, tensor, prompt, ensemble_size):
          assert prompt == "" and ensemble_size == 8
          return recorder.last_features
      run = lambda dataset: namespace["process_dataset"](dataset, Dift(), argparse.Namespace(
          img_size=1024, ensemble_size=8))
    else:
      run = namespace["process_dataset"]
    run(subjects)
    run(Items(odd))
    images = iter(recorder.images)
    for case in cases:
      path = os.path.join(coord_dir, name, f"{case['id']}_ref0.pt")
      if case["mask"] is not None and not case["mask"].any():
        assert not os.path.exists(path), "an empty mask must write no file"
        continue
      coords = torch.load(path).numpy()
      target_image, ref_image = next(images), next(images)
      outputs[f"{case['id']}/{name}/coords"] = coords
      outputs[f"{case['id']}/{name}/target_image"] = target_image
      outputs[f"{case['id']}/{name}/ref_image"] = ref_image
      # the torch statement gives the same images and coordinates
      mask = None if case["mask"] is None else Image.fromarray(case["mask"])
      ours_target = np.asarray(reference.target_image(Image.fromarray(case["target"]), mask))
      prepare_ref = reference.dift_reference_image if name == "dift" else reference.geoaware_reference_image
      ours_ref = np.asarray(prepare_ref(Image.fromarray(case["ref"])))
      np.testing.assert_array_equal(ours_target, target_image, err_msg=f"{case['id']} {name} target")
      np.testing.assert_array_equal(ours_ref, ref_image, err_msg=f"{case['id']} {name} reference")
      feat1 = torch.from_numpy(reference.planted_features(target_image, DEPTH)).permute(2, 0, 1)
      feat2 = torch.from_numpy(reference.planted_features(ref_image, DEPTH)).permute(2, 0, 1)
      np.testing.assert_array_equal(reference.match(feat1, feat2, cosine).numpy(), coords,
                                    err_msg=f"{case['id']} {name} coordinates")
    assert next(images, None) is None
  print(f"official scripts: {len(outputs) // 3} grids; the torch statement equals them (images, coordinates)")

  # torchvision itself against its restatement, on sizes and values the scripts above did not meet
  for (height, width) in ((333, 517), (700, 260), (1024, 1024), (1500, 1024)):
    image = Image.fromarray(scene(rng, height, width))
    mask = Image.fromarray(soft_mask(rng, height, width, "soft"))
    resize = transforms.Resize(1024, interpolation=transforms.InterpolationMode.BILINEAR, antialias=True)
    np.testing.assert_array_equal(np.asarray(reference.tv_resize(image, 1024, Image.BILINEAR)), np.asarray(resize(image)))
    nearest = transforms.Resize(1024, interpolation=transforms.InterpolationMode.NEAREST)
    np.testing.assert_array_equal(np.asarray(reference.tv_resize(mask, 1024, Image.NEAREST)), np.asarray(nearest(mask)))
    assert torch.equal(reference.tv_to_tensor(image), transforms.ToTensor()(image))
    normalize = transforms.Normalize([0.5], [0.5])
    assert torch.equal(reference.tv_normalize_half(transforms.ToTensor()(image)), normalize(transforms.ToTensor()(image)))
    values = torch.rand(3, 64, 64) * 0.02 + torch.arange(64 * 64).reshape(1, 64, 64) / 4095.0 * 0.98
    np.testing.assert_array_equal(np.asarray(reference.tv_to_pil(values)), np.asarray(transforms.ToPILImage()(values)))
    array = values.permute(1, 2, 0).numpy()
    np.testing.assert_array_equal(np.asarray(reference.tv_to_pil(array)), np.asarray(transforms.ToPILImage()(array)))
  print(f"torchvision {torchvision.__version__} Resize / ToTensor / Normalize / ToPILImage equal their restatement")

  arrays = {**outputs}
  for case in cases:
    arrays[f"{case['id']}/input/target"] = case["target"]
    arrays[f"{case['id']}/input/ref"] = case["ref"]
    if case["mask"] is not None:
      arrays[f"{case['id']}/input/mask"] = case["mask"]
  np.savez_compressed(out, **arrays)
  print(f"saved {out}")


# ---- ours against the saved official outputs --------------------------------------------------------------

def compare(npz: str) -> None:
  import jax.numpy as jnp
  from mosaic_jax.correspondence import matching

  saved = np.load(npz)
  ids = sorted({key.split("/")[0] for key in saved.files})
  grids = 0
  for case_id in ids:
    target = Image.fromarray(saved[f"{case_id}/input/target"])
    ref = Image.fromarray(saved[f"{case_id}/input/ref"])
    mask_key = f"{case_id}/input/mask"
    mask = Image.fromarray(saved[mask_key]) if mask_key in saved.files else None
    for slot, similarity in (("dift", "dot"), ("geoaware", "cosine")):
      ours_target = matching.prepare_target(target, mask)
      if f"{case_id}/{slot}/coords" not in saved.files:
        assert ours_target is None, f"{case_id}: the official scripts skipped it (empty mask); we did not"
        continue
      ours_ref = matching.prepare_reference(ref, slot)
      np.testing.assert_array_equal(ours_target, saved[f"{case_id}/{slot}/target_image"])
      np.testing.assert_array_equal(ours_ref, saved[f"{case_id}/{slot}/ref_image"])
      feats = [jnp.asarray(reference.planted_features(image, DEPTH))[None] for image in (ours_target, ours_ref)]
      cells = np.asarray(matching.match_cells(feats[0], feats[1], similarity))[0]
      np.testing.assert_array_equal(cells.reshape(-1, 2), saved[f"{case_id}/{slot}/coords"])
      grids += 1
  print(f"mosaic_jax.correspondence.matching equals the official scripts on {grids} grids ({len(ids)} cases)")


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  sub = parser.add_subparsers(dest="mode", required=True)
  official = sub.add_parser("official")
  official.add_argument("--mirror", required=True)
  official.add_argument("--out", required=True)
  ours = sub.add_parser("compare")
  ours.add_argument("--npz", required=True)
  args = parser.parse_args()
  if args.mode == "official":
    run_official(args.mirror, os.path.abspath(args.out))
  else:
    compare(args.npz)


if __name__ == "__main__":
  main()
