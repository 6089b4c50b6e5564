"""Device mesh ('data', 'fsdp', 'tensor'), named partition rules, batch sharding, multi-host init.

Parameters are sharded by regex rules on their path (`layers/0/attn/q_proj/kernel`), so the rules
tolerate naming differences and apply unchanged to optimizer-state copies of the parameters
(`opt_state/0/mu/layers/0/attn/q_proj/kernel`). A dim that an axis does not divide stays
replicated rather than failing: correctness first, memory savings where the shapes allow.
"""
from __future__ import annotations

import math
import re
from typing import Any, Sequence

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

AXES = ('data', 'fsdp', 'tensor')
BATCH_AXES = ('data', 'fsdp')

Spec = tuple  # Mesh axis names (str, tuple of str or None) with at most one `...`.
Rules = Sequence[tuple[str, Spec]]

_IN_PROJ = (r'q|k|v|kv|qkv|query|key|value|wq|wk|wv|wkv|wqkv|q_proj|k_proj|v_proj|kv_proj|'
            r'qkv_proj|in_proj|up|gate|up_proj|gate_proj|gate_up|w1|w3|wi|wi_0|wi_1|fc1|c_fc|c_attn')
_OUT_PROJ = r'o|out|o_proj|out_proj|wo|down|down_proj|w2|fc2|c_proj|attn_out|mlp_out'
_HEAD = r'lm_head|unembed|unembedding|output_head|logits|vocab_proj|head_out'

# First match wins. `...` fills the dims between the listed ones with None.
DEFAULT_RULES: tuple[tuple[str, Spec], ...] = (
    # Norm scales and biases: tiny, replicated.
    (r'(^|/)[^/]*norm[^/]*/(scale|bias)$', ()),
    (r'(^|/)bias$', ()),
    # Token embedding [V, D]: vocab over tensor, model dim over fsdp.
    (r'(^|/)(embedding|embed|wte|tok_embeddings)$', ('tensor', 'fsdp')),
    # Output projection to the vocabulary [D, V].
    (rf'(^|/)({_HEAD})(/kernel)?$', ('fsdp', 'tensor')),
    # q/k/v/up/gate [D_in, ..., out]: input on fsdp, heads/hidden on tensor.
    (rf'(^|/)({_IN_PROJ})/kernel$', ('fsdp', 'tensor', ...)),
    # out/down [heads/hidden, ..., D_out]: the reverse.
    (rf'(^|/)({_OUT_PROJ})/kernel$', ('tensor', ..., 'fsdp')),
    # Any other matrix (MTP projections, Medusa residual blocks): input dim on fsdp.
    (r'(^|/)kernel$', ('fsdp', ...)),
)


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
  """Mesh with axes ('data', 'fsdp', 'tensor'); `data=-1` takes all remaining devices."""
  devices = list(jax.devices() if devices is None else devices)
  n = len(devices)
  for name, value in (('fsdp', fsdp), ('tensor', tensor)):
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
      raise ValueError(f'{name} must be an int >= 1, got {value!r}')
  if isinstance(data, bool) or not isinstance(data, int) or (data < 1 and data != -1):
    raise ValueError(f'data must be an int >= 1 or -1 (all remaining devices), got {data!r}')
  if data == -1:
    if n % (fsdp * tensor):
      raise ValueError(f'fsdp * tensor = {fsdp * tensor} must divide the device count {n}')
    data = n // (fsdp * tensor)
  if data * fsdp * tensor != n:
    raise ValueError(f'mesh data*fsdp*tensor = {data}*{fsdp}*{tensor} = {data * fsdp * tensor} '
                     f'must equal the device count {n}')
  shape = (data, fsdp, tensor)
  try:
    device_array = mesh_utils.create_device_mesh(shape, devices)
  except (ValueError, NotImplementedError, AssertionError):
    device_array = np.asarray(devices, dtype=object).reshape(shape)
  # Auto axes: GSPMD propagates shardings through the unannotated model code.
  return Mesh(device_array, AXES, axis_types=(AxisType.Auto,) * len(AXES))


def path_to_str(path) -> str:
  """`/`-joined key path, without the trailing `.value` of NNX Variables."""
  parts = []
  for key in path:
    if isinstance(key, jax.tree_util.DictKey):
      parts.append(str(key.key))
    elif isinstance(key, jax.tree_util.SequenceKey):
      parts.append(str(key.idx))
    elif isinstance(key, jax.tree_util.GetAttrKey):
      parts.append(key.name)
    elif isinstance(key, jax.tree_util.FlattenedIndexKey):
      parts.append(str(key.key))
    else:
      parts.append(str(key))
  if parts and parts[-1] in ('value', 'raw_value'):
    parts.pop()
  return '/'.join(parts)


def _axis_size(mesh: Mesh, axis) -> int:
  names = axis if isinstance(axis, tuple) else (axis,)
  return math.prod(mesh.shape[a] for a in names)


def _expand(spec: Spec, ndim: int) -> tuple | None:
  """Spec with `...` expanded to `ndim` entries; None when the rule does not fit the rank."""
  spec = tuple(spec)
  if Ellipsis in spec:
    i = spec.index(Ellipsis)
    left, right = spec[:i], spec[i + 1:]
    if Ellipsis in right or len(left) + len(right) > ndim:
      return None
    return left + (None,) * (ndim - len(left) - len(right)) + right
  if len(spec) > ndim:
    return None
  return spec + (None,) * (ndim - len(spec))


def partition_spec(path: str, shape: Sequence[int], mesh: Mesh, rules: Rules = DEFAULT_RULES) -> P:
  """PartitionSpec of one leaf: the first rule whose regex `re.search`es `path`.

  Replicated when nothing matches or the rule does not fit the rank; per dim, replicated when
  the axis size does not divide it (or the axis has size 1).
  """
  shape = tuple(int(s) for s in shape)
  for pattern, spec in rules:
    if re.search(pattern, path):
      break
  else:
    return P()
  full = _expand(spec, len(shape))
  if full is None:
    return P()
  out = []
  for dim, axis in zip(shape, full):
    if axis is None:
      out.append(None)
      continue
    names = axis if isinstance(axis, tuple) else (axis,)
    unknown = [a for a in names if a not in mesh.shape]
    if unknown:
      raise ValueError(f'rule {pattern!r} names mesh axes {unknown} not in {tuple(mesh.shape)}')
    size = _axis_size(mesh, axis)
    out.append(axis if size > 1 and dim % size == 0 else None)
  while out and out[-1] is None:
    out.pop()
  return P(*out)


def param_specs(tree: Any, mesh: Mesh, rules: Rules = DEFAULT_RULES) -> Any:
  """Pytree of PartitionSpecs matching `tree` (arrays, ShapeDtypeStructs, nnx.State)."""
  def one(path, leaf):
    shape = getattr(leaf, 'shape', None)
    if shape is None:
      return P()
    return partition_spec(path_to_str(path), shape, mesh, rules)
  return jax.tree_util.tree_map_with_path(one, tree)


def param_shardings(tree: Any, mesh: Mesh, rules: Rules = DEFAULT_RULES) -> Any:
  """Pytree of NamedShardings matching `tree`, for device_put or jit in/out_shardings."""
  def one(path, leaf):
    shape = getattr(leaf, 'shape', None)
    spec = P() if shape is None else partition_spec(path_to_str(path), shape, mesh, rules)
    return NamedSharding(mesh, spec)
  return jax.tree_util.tree_map_with_path(one, tree)


def shard_params(tree: Any, mesh: Mesh, rules: Rules = DEFAULT_RULES) -> Any:
  """`tree` placed on `mesh` by `rules` (values unchanged)."""
  return jax.device_put(tree, param_shardings(tree, mesh, rules))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Batch dim over ('data', 'fsdp'); the other dims replicated."""
  return NamedSharding(mesh, P(BATCH_AXES))


def replicated_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def make_global_batch(batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """Process-local rows (from `get_batch(..., jax.process_index(), jax.process_count())`) ->
  global arrays sharded by `batch_sharding(mesh)`."""
  sharding = batch_sharding(mesh)
  size = _axis_size(mesh, BATCH_AXES)
  out = {}
  for name, local in batch.items():
    local = np.asarray(local)
    global_shape = (local.shape[0] * jax.process_count(),) + local.shape[1:]
    if global_shape[0] % size:
      raise ValueError(f'batch[{name!r}] global batch size {global_shape[0]} must be divisible by '
                       f'data*fsdp = {size}')
    out[name] = jax.make_array_from_process_local_data(sharding, local, global_shape)
  return out


def initialize_distributed(coordinator_address: str | None, num_processes: int,
                           process_id: int) -> None:
  """`jax.distributed.initialize` for multi-host runs; a no-op for a single process.

  Call it before anything touches `jax.devices()`. Each process then feeds
  `jax.process_index()` / `jax.process_count()` to `jax_spec.data.get_batch`.
  """
  if isinstance(num_processes, bool) or not isinstance(num_processes, int) or num_processes < 1:
    raise ValueError(f'num_processes must be an int >= 1, got {num_processes!r}')
  if isinstance(process_id, bool) or not isinstance(process_id, int) or not (
      0 <= process_id < num_processes):
    raise ValueError(f'process_id must be an int in [0, {num_processes}), got {process_id!r}')
  if num_processes == 1:
    return
  if not coordinator_address or not re.fullmatch(r'[^:\s]+:\d+', str(coordinator_address)):
    raise ValueError('coordinator_address must be "host:port" for a multi-process run, got '
                     f'{coordinator_address!r}')
  jax.distributed.initialize(coordinator_address=coordinator_address,
                             num_processes=num_processes, process_id=process_id)
