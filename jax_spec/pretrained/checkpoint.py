"""Load a Hugging Face model directory into a `Transformer`; write one back.

`from_pretrained(dir)` reads config.json, model.safetensors (or the shards listed in
model.safetensors.index.json) with the `safetensors` package, and tokenizer.json. Nothing imports
torch or transformers. The trunk is built abstractly (`nnx.eval_shape`) and filled tensor by
tensor in `param_dtype`, so a bf16 trunk never exists in fp32: a 7B model needs ~14 GB, not 28.
Heads (Medusa, MTP, EAGLE) are not in Hugging Face checkpoints: they are initialised fresh (fp32,
the policy's param dtype) or read from `heads.safetensors`, which `save_pretrained` writes beside
the trunk together with their config under config.json's "jax_spec_heads" key (transformers
ignores both).
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import NamedTuple

import jax
import jax.numpy as jnp
from absl import logging
from flax import nnx
from safetensors import safe_open
from safetensors.flax import save_file

from jax_spec.models.config import TransformerConfig
from jax_spec.models.transformer import Transformer
from jax_spec.precision import get_policy
from jax_spec.pretrained import architectures as arch
from jax_spec.pretrained.tokenizer import HfTokenizer, read_json

CONFIG_FILE = 'config.json'
WEIGHTS_FILE = 'model.safetensors'
INDEX_FILE = 'model.safetensors.index.json'
HEADS_FILE = 'heads.safetensors'
HEADS_CONFIG_KEY = 'jax_spec_heads'
# Head fields saved with the heads (and checked on load); other non-trunk fields are free overrides.
HEAD_FIELDS = ('mtp_depth', 'medusa_heads', 'medusa_num_layers', 'medusa_shared_head',
               'eagle_layers', 'eagle_d_ff')
PARAM_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)


class PretrainedInfo(NamedTuple):
  """What `from_pretrained` read. `extra_tensors`: checkpoint tensors the model does not use."""
  path: str
  model_type: str
  hf_config: dict
  weight_files: tuple[str, ...]
  extra_tensors: tuple[str, ...]
  warnings: tuple[str, ...]
  heads_loaded: bool


def _flat(state) -> dict:
  return dict(nnx.to_flat_state(state))


def _trunk_paths(config: TransformerConfig) -> set:
  return {spec.path for spec in arch.tensor_specs(config)}


def _weight_index(directory: str) -> dict[str, str]:
  """Tensor name -> the file holding it (a single file, or the shards of the index)."""
  index_path = os.path.join(directory, INDEX_FILE)
  single_path = os.path.join(directory, WEIGHTS_FILE)
  if os.path.isfile(index_path):
    weight_map = read_json(index_path).get('weight_map')
    if not isinstance(weight_map, dict):
      raise ValueError(f'{index_path} has no "weight_map" object')
    for shard in sorted(set(weight_map.values())):
      if not os.path.isfile(os.path.join(directory, shard)):
        raise ValueError(f'missing file {os.path.join(directory, shard)} (listed in {index_path})')
    return {name: os.path.join(directory, shard) for name, shard in weight_map.items()}
  if os.path.isfile(single_path):
    with _open(single_path) as f:
      return {name: single_path for name in f.keys()}
  raise ValueError(f'missing file {single_path} (or {INDEX_FILE}) in {directory}')


def _open(path: str):
  """A safetensors file read with pread(2) where the package supports it (safetensors >= 0.8):
  an mmap would leave every tensor's pages resident (counted in RSS) until the file is closed."""
  try:
    return safe_open(path, framework='flax', backend='pread')
  except TypeError:
    return safe_open(path, framework='flax')


class _Reader:
  """Reads tensors by name, each file opened once; `close` releases them."""

  def __init__(self, index: dict[str, str]):
    self.index = index
    self._files = {}

  def get(self, name: str):
    path = self.index[name]
    if path not in self._files:
      self._files[path] = _open(path)
    return self._files[path].get_tensor(name)

  def close(self):
    self._files.clear()


def _check_param_dtype(param_dtype):
  try:
    dtype = jnp.dtype(param_dtype)
  except TypeError:
    raise ValueError(f'param_dtype must be a float dtype, got {param_dtype!r}') from None
  if dtype not in [jnp.dtype(d) for d in PARAM_DTYPES]:
    raise ValueError(f'param_dtype must be one of float32, bfloat16, float16, got {dtype}')
  return dtype


def _head_config(directory: str, hf: dict, heads, overrides: dict) -> tuple[dict, bool]:
  """Head fields to build, and whether heads.safetensors is to be read."""
  saved = hf.get(HEADS_CONFIG_KEY)
  heads_path = os.path.join(directory, HEADS_FILE)
  if heads not in ('auto', True, False):
    raise ValueError(f"heads must be 'auto', True or False, got {heads!r}")
  if heads is True and (saved is None or not os.path.isfile(heads_path)):
    raise ValueError(f'heads=True but {directory} has no {HEADS_FILE} with "{HEADS_CONFIG_KEY}" '
                     f'in {CONFIG_FILE}')
  if heads is False or saved is None or not os.path.isfile(heads_path):
    return {}, False
  conflicts = {k: (v, saved.get(k)) for k, v in overrides.items()
               if k in HEAD_FIELDS and saved.get(k) != v}
  if conflicts:
    raise ValueError(f'{heads_path} holds heads with {saved}; overrides {conflicts} (given, saved) '
                     f'disagree: pass heads=False for fresh heads')
  return {k: saved[k] for k in HEAD_FIELDS if k in saved}, True


def _fresh_heads(config: TransformerConfig, policy, seed: int, trunk: set) -> dict:
  """Initial values of every non-trunk parameter. The model is built inside `jax.jit`, whose
  dead-code elimination drops the (unused) random trunk: only the heads are materialised."""
  def init():
    model = Transformer(config, policy=policy, rngs=nnx.Rngs(seed))
    return {p: v.get_value() for p, v in _flat(nnx.state(model)).items() if p not in trunk}
  return jax.jit(init)()


def _read_heads(path: str, wanted: dict) -> dict:
  """Head values from a heads file, checked against `wanted` (path -> abstract variable)."""
  with safe_open(path, framework='flax') as f:
    names = set(f.keys())
    out = {}
    for p, var in wanted.items():
      name = '.'.join(map(str, p))
      if name not in names:
        raise ValueError(f'{path}: missing tensor {name}')
      value = f.get_tensor(name)
      if value.shape != var.shape:
        raise ValueError(f'{path}: tensor {name} has shape {value.shape}, expected {var.shape}')
      out[p] = value.astype(var.dtype)
  extra = sorted(names - {'.'.join(map(str, p)) for p in wanted})
  if extra:
    raise ValueError(f'{path}: tensors {extra[:5]} belong to no head of this config')
  return out


def load_tokenizer(path: str, hf: dict | None = None) -> HfTokenizer:
  """The directory's tokenizer, checked against the model's vocabulary (config.json)."""
  config_path = os.path.join(path, CONFIG_FILE)
  hf = read_json(config_path) if hf is None else hf
  tok = HfTokenizer.from_directory(path, hf)
  vocab_size = hf.get('vocab_size')
  if isinstance(vocab_size, int) and tok.vocab_size > vocab_size:
    raise ValueError(f'{os.path.join(path, "tokenizer.json")}: the tokenizer has ids up to '
                     f'{tok.vocab_size - 1} but the model\'s vocab_size is {vocab_size} '
                     f'({config_path}): tokenizer and model do not match')
  return tok


def read_config(path: str) -> TransformerConfig:
  """The trunk's TransformerConfig of a Hugging Face directory (no heads)."""
  config_path = os.path.join(path, CONFIG_FILE)
  return arch.config_from_hf(read_json(config_path), config_path)[0]


def from_pretrained(path: str, *, param_dtype=jnp.float32, policy='fp32', tokenizer: bool = True,
                    heads='auto', seed: int = 0, **overrides):
  """Loads a Hugging Face directory. Returns (model, tokenizer or None, PretrainedInfo).

  Args:
    param_dtype: storage dtype of the trunk (float32, bfloat16 or float16); heads use the
      policy's (fp32). Matmuls run in `policy`'s compute dtype.
    tokenizer: read tokenizer.json (an error if missing); False returns None for it.
    heads: 'auto' reads heads.safetensors when present, False always starts fresh heads, True
      requires the file.
    seed: initialises fresh heads.
    **overrides: TransformerConfig fields that config.json does not set, e.g. medusa_heads=4,
      mtp_depth=1, attention_impl='xla'.
  """
  if not isinstance(path, str) or not os.path.isdir(path):
    raise ValueError(f'path must be a model directory, got {path!r}')
  dtype = _check_param_dtype(param_dtype)
  policy = get_policy(policy)
  fields = {f.name for f in dataclasses.fields(TransformerConfig)}
  for name in overrides:
    if name not in fields:
      raise ValueError(f'unknown TransformerConfig field {name!r} in overrides')
    if name in arch.TRUNK_FIELDS:
      raise ValueError(f'{name} is set by {CONFIG_FILE}, it cannot be overridden')
  config_path = os.path.join(path, CONFIG_FILE)
  hf = read_json(config_path)
  config, warnings = arch.config_from_hf(hf, config_path)
  head_fields, load_saved_heads = _head_config(path, hf, heads, overrides)
  config = config.replace(**head_fields, **overrides)

  tok = load_tokenizer(path, hf) if tokenizer else None

  index = _weight_index(path)
  reader = _Reader(index)
  abstract = nnx.eval_shape(lambda: Transformer(config, policy=policy, rngs=nnx.Rngs(seed)))
  graphdef, abstract_state = nnx.split(abstract)
  variables = _flat(abstract_state)
  values = {}
  specs = arch.tensor_specs(config)
  for spec in specs:
    shape = variables[spec.path].shape
    if spec.hf_name not in index:
      where = os.path.join(path, INDEX_FILE if os.path.isfile(os.path.join(path, INDEX_FILE))
                           else WEIGHTS_FILE)
      raise ValueError(f'{where}: missing tensor {spec.hf_name} (needed by {config_path})')
    w = reader.get(spec.hf_name)
    if tuple(w.shape) != spec.hf_shape(shape):
      raise ValueError(f'{index[spec.hf_name]}: tensor {spec.hf_name} has shape {tuple(w.shape)}, '
                       f'expected {spec.hf_shape(shape)} from {config_path}')
    values[spec.path] = spec.to_ours(w.astype(dtype), shape)
  reader.close()
  used = {spec.hf_name for spec in specs}
  extra = tuple(sorted(n for n in index if n not in used and not arch.is_redundant(n, config)))
  if extra:
    logging.warning('%s: %d tensor(s) not used by the model: %s', path, len(extra), extra[:10])

  trunk = set(values)
  head_vars = {p: v for p, v in variables.items() if p not in trunk}
  if load_saved_heads:
    values.update(_read_heads(os.path.join(path, HEADS_FILE), head_vars))
  elif head_vars:
    fresh = _fresh_heads(config, policy, seed, trunk)
    shared_VD = values[('embed', 'embedding')] if config.tie_embeddings else (
        values[('lm_head', 'kernel')].T)
    for p in head_vars:
      if p[0] == 'medusa' and p[-1] == 'lm_head':
        # Medusa's own output projection starts as a copy of the loaded one (the Medusa recipe).
        fresh[p] = shared_VD.T.astype(head_vars[p].dtype)
    values.update(fresh)
  state = nnx.from_flat_state([(p, var.replace(values[p])) for p, var in variables.items()])
  model = nnx.merge(graphdef, state)
  info = PretrainedInfo(path=path, model_type=hf['model_type'], hf_config=hf,
                        weight_files=tuple(sorted(set(index.values()))), extra_tensors=extra,
                        warnings=tuple(warnings), heads_loaded=load_saved_heads)
  for w in warnings:
    logging.warning('%s', w)
  return model, tok, info


def _check_model(model):
  if not isinstance(model, Transformer):
    raise ValueError(f'model must be a jax_spec.models.Transformer, got {type(model).__name__}')


def head_state(model: Transformer) -> dict:
  """Flat {path: array} of every parameter that is not part of the Hugging Face trunk."""
  _check_model(model)
  trunk = _trunk_paths(model.config)
  return {p: v.get_value() for p, v in _flat(nnx.state(model, nnx.Param)).items() if p not in trunk}


def _head_fields(config: TransformerConfig) -> dict:
  return {k: getattr(config, k) for k in HEAD_FIELDS}


def save_heads(model: Transformer, path: str) -> None:
  """Writes the heads alone (Medusa / MTP / ... parameters) to one safetensors file."""
  heads = head_state(model)
  if not heads:
    raise ValueError('save_heads: the model has no heads (no parameters beyond the trunk)')
  save_file({'.'.join(map(str, p)): v for p, v in heads.items()}, path,
            metadata={HEADS_CONFIG_KEY: json.dumps(_head_fields(model.config))})


def save_pretrained(model: Transformer, directory: str, *, tokenizer=None,
                    model_type: str | None = None) -> None:
  """Writes a Hugging Face directory: config.json, model.safetensors (the trunk, in its storage
  dtype, Hugging Face names and layouts), heads.safetensors if the model has heads, and the
  tokenizer's files if given. `from_pretrained` reads it back bit for bit; transformers reads
  the trunk. `model_type` defaults to the architecture that computes what the config does."""
  _check_model(model)
  if not isinstance(directory, str) or not directory:
    raise ValueError(f'directory must be a path, got {directory!r}')
  hf = arch.config_to_hf(model.config, model_type)
  params = {p: v.get_value() for p, v in _flat(nnx.state(model, nnx.Param)).items()}
  hf['torch_dtype'] = str(jnp.dtype(params[('embed', 'embedding')].dtype))
  tensors = {spec.hf_name: spec.to_hf(params[spec.path], params[spec.path].shape)
             for spec in arch.tensor_specs(model.config)}
  os.makedirs(directory, exist_ok=True)
  if head_state(model):
    hf[HEADS_CONFIG_KEY] = _head_fields(model.config)
    save_heads(model, os.path.join(directory, HEADS_FILE))
  save_file(tensors, os.path.join(directory, WEIGHTS_FILE), metadata={'format': 'pt'})
  with open(os.path.join(directory, CONFIG_FILE), 'w') as f:
    json.dump(hf, f, indent=2)
  if tokenizer is not None:
    tokenizer.save(directory)
