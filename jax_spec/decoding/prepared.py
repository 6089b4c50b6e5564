"""A model prepared once for many decode calls: split for the jitted loops and its decode weights
packed for the few-row matmul kernel.

`generate(model, ...)` and `speculative_generate(model, ...)` prepare the model at every call: an
`nnx.split` of every parameter and a pack of every decode weight (a copy of the model's matmuls
in the kernel's tile layout), ~2-4 ms on CPU for the quickstart's model, which a 160-token request
pays once more on top of its prefill. Serving many requests, prepare once and pass the prepared
model instead:

    prepared = decoding.prepare(model, draft_model=draft)
    out = decoding.speculative_generate(prepared, prompts_BT, lengths_B, drafter='medusa', ...)
    base = decoding.generate(prepared, prompts_BT, lengths_B, ...)

A prepared model is a snapshot: it decodes with the weights `model` had at `prepare` time
(prepare again after training further).

`prepare(..., drafter_dtype=jnp.bfloat16)` stores the drafter's matrices (the target's EAGLE and
MTP modules and Medusa heads, and a draft model's) rounded to bfloat16, and the CPU kernel
streams them as bf16 tiles: a feature drafter's depth multiplies one row by every weight of its
module, so it is bound by the bytes it reads. Computation stays fp32 (the rounded values,
widened exactly), and the trunk is untouched, so every sampler stays lossless: only the drafts
(and with them tau) can change. docs/benchmarks.md, "bf16 drafter weights".

`prepare(..., matmul_dtype=jnp.bfloat16)` decodes in bf16 products instead: every matrix (the
trunk's too) rounded to bf16 and packed as pair tiles, and the CPU kernel rounds each matmul's
rows to bf16 and adds the products in fp32, two per AVX512_BF16 dot-product instruction (twice
the fp32 FMA's products per instruction, from half the bytes; matrices the kernel does not take,
below `rows_matmul.MIN_WEIGHT_SIZE` outside a block, keep fp32 products of their rounded
weights). This is another model's numbers
(the bf16-rounded one's, with bf16 activations at the matmuls), so its outputs differ from fp32
decoding; plain and speculative decoding of it stay bitwise consistent, and so lossless.
docs/benchmarks.md, "bf16 products".
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jax_spec import models


class StaticGraph:
  """A GraphDef as a jitted loop's static argument, hashed once.

  jit hashes its static arguments at every call, and flax's `GraphDef.__hash__` walks the whole
  graph: ~1.8 ms per call on the quickstart model, a quarter of a 2-token `generate`. Equality
  tries identity first, so the same prepared model finds its compiled loop at once.
  """
  __slots__ = ('graphdef', '_hash')

  def __init__(self, graphdef):
    self.graphdef = graphdef
    self._hash = hash(graphdef)

  def __hash__(self):
    return self._hash

  def __eq__(self, other):
    return isinstance(other, StaticGraph) and (other.graphdef is self.graphdef
                                               or other.graphdef == self.graphdef)


@dataclasses.dataclass(frozen=True)
class Split:
  """One module as a jitted decode loop takes it: `nnx.split` and its packed decode weights."""
  graphdef: Any               # nnx.GraphDef
  state: Any                  # nnx.State: traced argument
  packs: tuple                # `models.decode_packs` values, in order; () where nothing is packed

  @functools.cached_property
  def static(self) -> StaticGraph:
    """`graphdef` as the loops' static argument (hashed at its first use only)."""
    return StaticGraph(self.graphdef)


@dataclasses.dataclass(frozen=True, eq=False)
class PreparedModel:
  """A target model (and optionally a draft model) prepared for the decode functions."""
  model: models.Transformer
  draft_model: models.Transformer | None
  trunk: Split
  draft: Split | None
  matmul_dtype: Any = None    # None (fp32 products) or bfloat16 (see module doc)


def _check(name, module):
  if not isinstance(module, models.Transformer):
    raise ValueError(f'{name} must be a jax_spec.models.Transformer (or, for model, a '
                     f'decoding.PreparedModel), got {type(module).__name__}')


# The target's drafter modules (`Transformer` attributes) whose matrices `drafter_dtype` rounds.
DRAFTER_MODULES = ('eagle', 'mtp', 'medusa')


def prepare(model, draft_model=None, *, drafter_dtype=None, matmul_dtype=None) -> PreparedModel:
  """Splits `model` (and `draft_model`) and packs their decode weights, once (see module doc).

  drafter_dtype: None (the weights as they are) or bfloat16: the drafter's matrices (`model`'s
  EAGLE and MTP modules and Medusa heads, all of `draft_model`'s) stored rounded to bf16 (see
  module doc).
  matmul_dtype: None (fp32 products) or bfloat16: every matrix of both models rounded to bf16 and
  the CPU kernel's matmuls in bf16 products (see module doc; it implies drafter_dtype bfloat16).
  """
  _check('model', model)
  if draft_model is not None:
    _check('draft_model', draft_model)
  for name, dtype in (('drafter_dtype', drafter_dtype), ('matmul_dtype', matmul_dtype)):
    if dtype is not None and jnp.dtype(dtype) != jnp.bfloat16:
      raise ValueError(f'{name} must be None or bfloat16, got {dtype!r}')
  if matmul_dtype is not None:
    products = dict(matrix_dtype=jnp.bfloat16, bf16_products=True)
    return PreparedModel(model, draft_model, split(model, **products),
                         split(draft_model, **products) if draft_model is not None else None,
                         matmul_dtype=jnp.bfloat16)
  return PreparedModel(model, draft_model, split(model, drafter_dtype, DRAFTER_MODULES),
                       split(draft_model, drafter_dtype) if draft_model is not None else None)


def _round_matrices(state, dtype, modules=None):
  """`state` with its floating matrices (ndim >= 2) cast to `dtype`: all, or those under the
  top-level attributes `modules`. Vectors (norm scales, biases) keep their dtype."""
  def cast(path, x):
    top = getattr(path[0], 'key', None) if path else None
    if ((modules is None or top in modules) and jnp.issubdtype(x.dtype, jnp.floating)
        and x.ndim >= 2):
      return x.astype(dtype)
    return x
  return jax.tree_util.tree_map_with_path(cast, state)


def split(module, matrix_dtype=None, modules=None, bf16_products=False) -> Split:
  """`nnx.split(module)` and its packs; matrix_dtype: see `_round_matrices`; bf16_products: pair
  tiles (`models.decode_packs`; `prepare`)."""
  graphdef, state = nnx.split(module)
  if matrix_dtype is not None:
    state = _round_matrices(state, matrix_dtype, modules)
  # Packs feed only the CPU kernel: on other backends the loops' dots read the weights directly.
  packs = _pack(graphdef, state, bf16_products) if jax.default_backend() == 'cpu' else ()
  return Split(graphdef, state, packs)


@functools.partial(jax.jit, static_argnames=('graphdef', 'bf16_products'))
def _pack(graphdef, state, bf16_products=False):
  return tuple(models.decode_packs(nnx.merge(graphdef, state),
                                   bf16_products=bf16_products).values())


def model_of(model) -> models.Transformer:
  """The target model of `model` (a Transformer or a PreparedModel), checked; nothing prepared
  (the decode functions check their arguments with it before they prepare anything)."""
  if isinstance(model, PreparedModel):
    return model.model
  _check('model', model)
  return model


def as_prepared(model, draft_model=None) -> PreparedModel:
  """`model` if it is prepared (its draft model must then be `draft_model` or None), else
  `prepare(model, draft_model)`."""
  if not isinstance(model, PreparedModel):
    return prepare(model, draft_model)
  if draft_model is not None and draft_model is not model.draft_model:
    raise ValueError('draft_model: this PreparedModel was prepared with another draft model (or '
                     'none); pass the draft model to decoding.prepare(model, draft_model)')
  return model


def merge(graphdef, state, packs):
  """Inside a jitted decode function (graphdef: a GraphDef or its `StaticGraph`): (the module,
  its `rows_matmul.packed` dict), packed here when nothing was packed before (`packs == ()`)."""
  if isinstance(graphdef, StaticGraph):
    graphdef = graphdef.graphdef
  module = nnx.merge(graphdef, state)
  return module, (models.decode_packs_from(packs, module) if packs else models.decode_packs(module))
