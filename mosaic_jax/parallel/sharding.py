"""Mesh from the config, logical axis names, and shardings of whole pytrees.

Three steps, each a small table in the config (`config.mesh`, `config.sharding`):

1. Mesh: axes (data, fsdp, tensor) with sizes from `config.mesh` (one -1 takes the remaining
   devices) and explicit `axis_types` (Auto: the compiler propagates shardings inside the step).
2. Parameter -> logical axes: `param_rules`, a list of (regex, logical axes) matched in order against
   a leaf's key path ("transformer_blocks/attn/to_q/kernel", "opt/0/mu/.../lora_A"). A leaf with one
   more dimension than the rule names gets the leading "layers" axis (blocks are stacked for scan).
   Because the regexes look at the path's tail, optimizer moments and EMA copies inherit the
   sharding of the parameter they mirror.
3. Logical -> mesh axes: `logical_rules`, e.g. embed -> fsdp, mlp -> tensor, batch -> (data, fsdp).
   A dimension not divisible by its mesh axes is left replicated rather than failing: tiny models
   must run on any mesh, and a replicated small tensor costs nothing.
4. Activations: under `jax.set_mesh(mesh)` (the trainer, evaluation and the sampler trace there) the
   model pins its activations with `constrain(x, logical_axes, rules)`: batch over (data, fsdp), heads
   and MLP hidden over tensor. Without these pins the compiler may keep the fsdp-sharded weights in
   place and gather the activations instead: every device then computed the whole global batch
   (measured: [8, ...] attention scores on each of 8 fsdp devices, 2-3x the temporaries).
   Both halves are part of every jit's cache key: the mesh set by `jax.set_mesh` is in jax's trace
   context, and the rules travel in the model's FluxConfig (`logical_rules`, a static argument). So a
   function traced under one mesh or rule table is never reused under another; nothing here is
   module-level state.
"""

from __future__ import annotations

import logging
import re
from typing import Any, Callable, Iterable, Mapping, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")
# A parameter dimension at least this large that its rule names mesh axes for, but that they do not
# divide, is replicated with a warning naming the parameter (smaller ones, as in tiny test models,
# are replicated silently: they cost nothing).
REPLICATION_WARNING_SIZE = 1024

# The default tables (configs/flux_ms.py copies them into the config, where they can be changed).
# Linear layers that write back into the residual stream are "row parallel": their input is the
# tensor-sharded dimension, so (mlp, embed); every other kernel is "column parallel" (embed, mlp).
DEFAULT_PARAM_RULES = (
    (r"(to_out/0|to_add_out|net/2|proj_out)/kernel$", ("mlp", "embed")),
    (r"kernel$", ("embed", "mlp")),
    # A LoRA factor beside an embed dimension is split by it; the other factor splits its rank
    # dimension ("lora_rank_split") instead, else it and its optimizer moments and EMA would be
    # whole on every fsdp device (at rank 512 that was 20.6 of 27.6 GiB of state per device, fsdp=8).
    (r"(to_out/0|to_add_out|net/2|proj_out)/lora_A$", ("mlp", "lora_rank_split")),
    (r"(to_out/0|to_add_out|net/2|proj_out)/lora_B$", ("lora_rank", "embed")),
    (r"lora_A$", ("embed", "lora_rank")),
    (r"lora_B$", ("lora_rank_split", "mlp")),
    (r"(bias|scale|embedding)$", (None,)),
)
DEFAULT_LOGICAL_RULES = (
    ("batch", ("data", "fsdp")),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),  # activations only: attention heads
    ("lora_rank", None),
    ("lora_rank_split", "fsdp"),
    ("layers", None),
)


def make_mesh(shape: Mapping[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
  """Mesh over (data, fsdp, tensor); one size may be -1 (all remaining devices)."""
  devices = list(devices if devices is not None else jax.devices())
  unknown = sorted(set(shape) - set(MESH_AXES))
  if unknown:
    raise ValueError(f"config.mesh has unknown axes {unknown}; the mesh axes are {MESH_AXES}.")
  sizes = [int(shape.get(axis, 1)) for axis in MESH_AXES]
  if sizes.count(-1) > 1:
    raise ValueError(f"config.mesh {dict(shape)}: at most one axis may be -1.")
  known = int(np.prod([s for s in sizes if s != -1]))
  if -1 in sizes:
    if len(devices) % known:
      raise ValueError(f"config.mesh {dict(shape)}: {len(devices)} devices are not divisible by {known}.")
    sizes[sizes.index(-1)] = len(devices) // known
  if int(np.prod(sizes)) != len(devices):
    raise ValueError(f"config.mesh {dict(shape)} needs {int(np.prod(sizes))} devices; there are {len(devices)}.")
  return jax.make_mesh(tuple(sizes), MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES),
                       devices=devices)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh, logical_rules: Iterable = DEFAULT_LOGICAL_RULES) -> NamedSharding:
  """Leading (batch) axis over the data-parallel mesh axes, everything else replicated."""
  return NamedSharding(mesh, logical_to_spec(("batch",), logical_rules))


def _path_string(path) -> str:
  parts = []
  for entry in path:
    for attr in ("key", "name", "idx"):
      if hasattr(entry, attr):
        parts.append(str(getattr(entry, attr)))
        break
    else:
      parts.append(str(entry))
  return "/".join(parts)


def param_logical_axes(path: str, ndim: int, param_rules: Iterable = DEFAULT_PARAM_RULES
                       ) -> tuple[str | None, ...]:
  """Logical axis names of one leaf; unmatched leaves and scalars are replicated."""
  for pattern, axes in param_rules:
    if re.search(pattern, path):
      axes = tuple(axes)
      if ndim == len(axes) + 1:
        axes = ("layers",) + axes
      if ndim == len(axes):
        return axes
      if axes == (None,):
        return (None,) * ndim
  return (None,) * ndim


def logical_to_spec(axes: Sequence[str | None], logical_rules: Iterable = DEFAULT_LOGICAL_RULES
                    ) -> PartitionSpec:
  table = {name: mesh_axes for name, mesh_axes in logical_rules}
  spec = []
  for name in axes:
    if name is not None and name not in table:
      raise ValueError(f"logical axis {name!r} has no entry in config.sharding.logical_rules {sorted(table)}")
    spec.append(None if name is None else table[name])
  return PartitionSpec(*spec)


def _fit_to_shape(spec: PartitionSpec, shape: Sequence[int], mesh, what: str | None = None) -> PartitionSpec:
  """Drops the mesh axes of any dimension they do not divide (that dimension stays replicated); for a
  named parameter (`what`) a large dimension replicated this way is logged as a warning."""
  fitted = []
  for index, (dim, mesh_axes) in enumerate(zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec)))):
    names = (mesh_axes,) if isinstance(mesh_axes, str) else tuple(mesh_axes or ())
    names = tuple(n for n in names if n in mesh.axis_names)  # a rule may name axes this mesh lacks
    size = int(np.prod([mesh.shape[n] for n in names])) if names else 1
    splits = names and dim % size == 0 and size > 1
    fitted.append((names[0] if len(names) == 1 else names) if splits else None)
    if what is not None and size > 1 and not splits and dim >= REPLICATION_WARNING_SIZE:
      logging.getLogger("mosaic_jax").warning(
          "%s: dimension %d of shape %s is not divisible by mesh axes %s (size %d): replicated on every "
          "device (choose a mesh whose sizes divide it, or change config.sharding.param_rules).",
          what, index, tuple(shape), names, size)
  return PartitionSpec(*fitted)


def sharding_for(path: str, shape: Sequence[int], mesh: Mesh, param_rules: Iterable = DEFAULT_PARAM_RULES,
                 logical_rules: Iterable = DEFAULT_LOGICAL_RULES) -> NamedSharding:
  """The NamedSharding of one leaf given its "/"-joined key path and shape."""
  axes = param_logical_axes(path, len(shape), param_rules)
  return NamedSharding(mesh, _fit_to_shape(logical_to_spec(axes, logical_rules), tuple(shape), mesh, path))


def tree_shardings(tree: Any, mesh: Mesh, param_rules: Iterable = DEFAULT_PARAM_RULES,
                   logical_rules: Iterable = DEFAULT_LOGICAL_RULES) -> Any:
  """NamedSharding for every leaf of a pytree of arrays or ShapeDtypeStructs."""
  param_rules, logical_rules = tuple(param_rules), tuple(logical_rules)

  def one(path, leaf):
    return sharding_for(_path_string(path), tuple(getattr(leaf, "shape", ())), mesh, param_rules, logical_rules)
  return jax.tree_util.tree_map_with_path(one, tree)


def hashable_rules(logical_rules: Iterable) -> tuple:
  """The rule table as nested tuples (a config file's lists included): a static jit argument."""
  def axes(value):
    return tuple(value) if isinstance(value, (list, tuple)) else value
  return tuple((str(name), axes(mesh_axes)) for name, mesh_axes in logical_rules)


def mesh_axes_of(logical_name: str, logical_rules: Iterable, mesh) -> tuple[str, ...]:
  """The axes of `mesh` that `logical_name` maps to under the rules (kernels placed by hand, like
  Pallas splash attention under shard_map, split their inputs by these)."""
  table = dict(hashable_rules(logical_rules))
  value = table.get(logical_name)
  names = (value,) if isinstance(value, str) else tuple(value or ())
  return tuple(n for n in names if n in mesh.axis_names)


def trace_platform() -> str:
  """The platform what is being traced is compiled for: that of the devices of the mesh set by
  `jax.set_mesh` (compile-only TPU devices on a CPU machine are "tpu"), else the default backend's."""
  mesh = jax.sharding.get_abstract_mesh()
  device = None if mesh.empty else getattr(mesh, "abstract_device", None)
  return device.platform if device is not None else jax.devices()[0].platform


def constrain(x: jax.Array, logical_axes: Sequence[str | None], logical_rules: Iterable) -> jax.Array:
  """`x` placed by its logical axes (one per dimension) on the mesh of the enclosing `jax.set_mesh`;
  unchanged when no mesh is set (single-device code, tests). Dimensions their mesh axes do not divide
  stay replicated."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return x
  spec = _fit_to_shape(logical_to_spec(logical_axes, logical_rules), x.shape, mesh)
  return jax.lax.with_sharding_constraint(x, spec)


def on_mesh(tree: Any) -> Any:
  """Host values (numpy or single-device arrays, the same on every process) as global arrays replicated
  on the mesh of the enclosing `jax.set_mesh`, so that they can meet arrays split over several
  processes in one jit; unchanged when no mesh is set."""
  mesh = jax.sharding.get_mesh()
  if mesh.empty:
    return tree
  sharding = NamedSharding(mesh, PartitionSpec())

  def one(x):
    if isinstance(x, jax.Array) and x.sharding == sharding:
      return x
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])
  return jax.tree_util.tree_map(one, tree)


def place(tree: Any, mesh: Mesh, param_rules: Iterable = DEFAULT_PARAM_RULES,
          logical_rules: Iterable = DEFAULT_LOGICAL_RULES) -> Any:
  """Every leaf of a parameter pytree on `mesh` in the sharding its rules give. Arrays already there stay;
  host values (the same on every process) become global arrays, each process filling its own shards."""
  shardings = tree_shardings(tree, mesh, param_rules, logical_rules)

  def one(x, sharding):
    if isinstance(x, jax.Array) and x.sharding == sharding:
      return x
    if isinstance(x, jax.Array) and x.is_fully_addressable and sharding.is_fully_addressable:
      return jax.device_put(x, sharding)
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])
  return jax.tree_util.tree_map(one, tree, shardings)


def create_sharded(make: Callable[[Any], Any], seed: int, mesh: Mesh, param_rules: Iterable = DEFAULT_PARAM_RULES,
                   logical_rules: Iterable = DEFAULT_LOGICAL_RULES) -> Any:
  """make(key)'s random pytree, created inside jit straight into its shardings: at FLUX.1-dev size
  (24 GB of bf16 base, 7 GB of rank-512 LoRA) it need not fit on one device first. The same seed gives
  the same tree on any mesh (the trainer's random base, and a workdir that recreates it)."""
  key = jax.random.key(seed)
  shardings = tree_shardings(jax.eval_shape(make, key), mesh, param_rules, logical_rules)
  return jax.jit(make, out_shardings=shardings)(key)
