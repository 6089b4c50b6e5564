"""Decoder-only transformer with DeepSeek-V3 MTP modules and Medusa heads (Flax NNX)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from flax import struct

from jax_spec.kernels import block_decode, rows_matmul
from jax_spec.models.config import TransformerConfig
from jax_spec.models.layers import (Block, Dense, LayerCache, RMSNorm, Rotary, decode_matrices,
                                    normal_init, positions_from_segments, rotary)
from jax_spec.precision import Policy, get_policy


@struct.dataclass
class ModelOutputs:
  """Full-sequence outputs. Logits are fp32; `hidden_BTD` is the final-normed trunk state."""
  logits_BTV: jax.Array
  hidden_BTD: jax.Array
  mtp_logits_JBTV: jax.Array | None = None
  medusa_logits_JBTV: jax.Array | None = None


class MTPModule(nnx.Module):
  """DeepSeek-V3 MTP module: Block(W [RMSNorm(h_{k-1}); RMSNorm(Emb(t_{i+k}))])."""

  def __init__(self, config: TransformerConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
    d = config.d_model
    kw = dict(dtype=dtype, param_dtype=param_dtype)
    self.hidden_norm = RMSNorm(d, eps=config.norm_eps, **kw)
    self.embed_norm = RMSNorm(d, eps=config.norm_eps, **kw)
    self.proj = Dense((2 * d, d), 'btc,cd->btd', init=normal_init(config.init_std),
                      rngs=rngs, **kw)
    self.block = Block(config, rngs=rngs, **kw)

  @property
  def blocks(self) -> tuple[Block, ...]:
    return (self.block,)

  def combine(self, h_BTD, e_BTD, decode: bool = False):
    x_BTC = jnp.concatenate([self.hidden_norm(h_BTD), self.embed_norm(e_BTD)], axis=-1)
    return self.proj.decode(x_BTC) if decode else self.proj(x_BTC)

  def __call__(self, h_BTD, e_BTD, rope: Rotary, segment_ids_BT=None):
    x_BTD = self.combine(h_BTD, e_BTD)
    for block in self.blocks:
      x_BTD = block(x_BTD, rope, segment_ids_BT)[0]
    return x_BTD

  def decode(self, h_BTD, e_BTD, rope: Rotary, caches: tuple[LayerCache, ...], lengths_B,
             tree_mask_BTT):
    """The blocks on cached K/V, block i on `caches[i]` -> (x, caches)."""
    x_BTD = self.combine(h_BTD, e_BTD, decode=True)
    new_caches = []
    for block, cache in zip(self.blocks, caches, strict=True):
      x_BTD, cache = block.decode(x_BTD, rope, cache, lengths_B, tree_mask_BTT)
      new_caches.append(cache)
    return x_BTD, tuple(new_caches)

  def decode_read(self, model: 'Transformer', h_BTD, e_BTD, rope: Rotary,
                  caches: tuple[LayerCache, ...], lengths_B, tree_mask_BTT):
    """`decode`, then a feature drafter's read (`models.eagle`): -> (model.final_norm(x), fp32
    logits through the shared head, caches). A one-block fp32 module on CPU runs all of it as
    one kernel call (`kernels.block_decode.feature_decode`), instead of ~17 ops per depth;
    elsewhere (and on other platforms) the ops of `decode` and `model.decode_logits`."""
    def ops(h_BTD, e_BTD, rope, caches, lengths_B, tree_mask_BTT):
      x_BTD, caches = self.decode(h_BTD, e_BTD, rope, caches, lengths_B, tree_mask_BTT)
      feature_BTD = model.final_norm(x_BTD)
      return feature_BTD, model.decode_logits(feature_BTD), caches

    def kernel(h_BTD, e_BTD, rope, caches, lengths_B, tree_mask_BTT):
      block, f32 = self.blocks[0], jnp.float32
      operands, attrs = block.kernel_operands(h_BTD, rope, caches[0], lengths_B, tree_mask_BTT)
      proj_bias = (jnp.zeros((model.config.d_model,), f32) if self.proj.bias is None
                   else self.proj.bias[...])
      feature_BTD, logits_BTV, k_BSKE, v_BSKE = block_decode.feature_decode(
          h_BTD, e_BTD, self.hidden_norm.scale[...], self.embed_norm.scale[...],
          rows_matmul.tiles(self.proj.matrix(), id(self.proj)), proj_bias, operands,
          model.final_norm.scale[...],
          rows_matmul.tiles(model.shared_head_DV().astype(f32), id(model)),
          vocab=model.config.vocab_size, **attrs)
      return feature_BTD, logits_BTV, (LayerCache(k_BSKE, v_BSKE),)

    norms = (self.hidden_norm, self.embed_norm, model.final_norm, self.blocks[0].attn_norm)
    fused = (len(self.blocks) == 1 and model.dtype == jnp.float32
             and e_BTD.dtype == jnp.float32 and self.blocks[0].kernel_applies(h_BTD, caches[0])
             and len({norm.eps for norm in norms}) == 1)   # the kernel takes one eps
    if not fused:
      return ops(h_BTD, e_BTD, rope, caches, lengths_B, tree_mask_BTT)
    return jax.lax.platform_dependent(h_BTD, e_BTD, rope, caches, lengths_B, tree_mask_BTT,
                                      cpu=kernel, default=ops)


class EagleModule(MTPModule):
  """EAGLE-style feature drafter: the MTP combine, then `config.eagle_layers` blocks.

  One module applied autoregressively (`jax_spec.models.eagle`): its final-normed output is the
  predicted next trunk feature, read through the shared LM head and fed back for the next depth.
  """

  def __init__(self, config: TransformerConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
    config = config.eagle_config
    super().__init__(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.extra_blocks = nnx.List([Block(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
                                  for _ in range(config.eagle_layers - 1)])

  @property
  def blocks(self) -> tuple[Block, ...]:
    return (self.block, *self.extra_blocks)


class ResBlock(nnx.Module):
  """Medusa residual block `x + SiLU(W x + b)`, zero-initialised so a new head starts as identity."""

  def __init__(self, d: int, *, dtype, param_dtype):
    self.kernel = nnx.Param(jnp.zeros((d, d), param_dtype))
    self.bias = nnx.Param(jnp.zeros((d,), param_dtype))
    self.dtype = dtype

  def __call__(self, x_BTD):
    y = jnp.einsum('btd,de->bte', x_BTD.astype(self.dtype), self.kernel[...].astype(self.dtype))
    return x_BTD + jax.nn.silu(y + self.bias[...].astype(self.dtype))


class MedusaHead(nnx.Module):

  def __init__(self, config: TransformerConfig, *, dtype, param_dtype, rngs: nnx.Rngs,
               head_init_VD=None):
    d = config.d_model
    self.res = nnx.List([ResBlock(d, dtype=dtype, param_dtype=param_dtype)
                         for _ in range(config.medusa_num_layers)])
    # Own output projection, initialised as a copy of the trunk's (the Medusa recipe).
    self.lm_head = None if config.medusa_shared_head else nnx.Param(
        jnp.asarray(head_init_VD.T, param_dtype))

  def __call__(self, x_BTD):
    for res in self.res:
      x_BTD = res(x_BTD)
    return x_BTD


class Transformer(nnx.Module):
  """Trunk (RMSNorm, RoPE, GQA, SwiGLU) plus optional MTP modules, Medusa heads and an EAGLE
  module (its outputs come from `jax_spec.models.eagle`, not from `__call__`)."""

  def __init__(self, config: TransformerConfig, *, policy: str | Policy = 'fp32', rngs: nnx.Rngs):
    if not isinstance(config, TransformerConfig):
      raise ValueError(f'config must be a TransformerConfig, got {type(config).__name__}')
    self.config = config
    self.policy = get_policy(policy)
    c, p = config, self.policy
    kw = dict(dtype=p.compute_dtype, param_dtype=p.param_dtype)
    self.embed = nnx.Embed(c.vocab_size, c.d_model,
                           embedding_init=normal_init(c.init_std), rngs=rngs, **kw)
    self.layers = nnx.List([Block(c, rngs=rngs, **kw) for _ in range(c.num_layers)])
    self.final_norm = RMSNorm(c.d_model, eps=c.norm_eps, **kw)
    self.lm_head = None if c.tie_embeddings else Dense(
        (c.d_model, c.vocab_size), 'btd,dv->btv', init=normal_init(c.init_std),
        rngs=rngs, **kw)
    self.mtp = nnx.List([MTPModule(c, rngs=rngs, **kw) for _ in range(c.mtp_depth)])
    head_VD = self.embed.embedding[...] if c.tie_embeddings else self.lm_head.kernel[...].T
    self.medusa = nnx.List([MedusaHead(c, rngs=rngs, head_init_VD=head_VD, **kw)
                            for _ in range(c.medusa_heads)])
    self.eagle = EagleModule(c, rngs=rngs, **kw) if c.eagle_layers else None

  @property
  def dtype(self):
    return self.policy.compute_dtype

  def embed_tokens(self, tokens_BT):
    return self.embed(tokens_BT).astype(self.dtype)

  def shared_head_DV(self):
    return self.embed.embedding[...].T if self.lm_head is None else self.lm_head.kernel[...]

  def project(self, x_BTD, head_DV=None):
    """Output projection (shared LM head unless `head_DV` is given), fp32 logits."""
    if head_DV is None:
      head_DV = self.shared_head_DV()
    return jnp.einsum('...d,dv->...v', x_BTD.astype(self.dtype), head_DV.astype(self.dtype),
                      preferred_element_type=jnp.float32)

  def logits(self, h_BTD):
    """LM head on an already final-normed hidden state."""
    return self.project(h_BTD)

  def decode_logits(self, h_BTD):
    """`logits` for the few rows of a decode step: fp32 models through `rows_matmul`."""
    if self.dtype != jnp.float32:
      return self.logits(h_BTD)
    return rows_matmul.matmul(h_BTD.astype(jnp.float32),
                              self.shared_head_DV().astype(jnp.float32), key=id(self))

  def medusa_logits(self, hidden_BTD):
    """[K, B, T, V] fp32; head k (from 1) at position i predicts t_{i+k+1}."""
    if not self.config.medusa_heads:
      raise ValueError('medusa_logits: the model has no Medusa heads (config.medusa_heads == 0)')
    x_BTD, shared_DV = hidden_BTD, self.shared_head_DV()
    if self.config.medusa_frozen_trunk:
      # Medusa-1: neither the trunk's hidden state nor a shared LM head learn from the heads.
      x_BTD, shared_DV = jax.lax.stop_gradient(x_BTD), jax.lax.stop_gradient(shared_DV)
    out = []
    for head in self.medusa:
      own = shared_DV if head.lm_head is None else head.lm_head[...]
      out.append(self.project(head(x_BTD), own))
    return jnp.stack(out)

  def decode_medusa_logits(self, hidden_BTD):
    """`medusa_logits` for the few rows of a decode step, fp32 models through `rows_matmul`: the
    heads' first residual blocks read the same hidden state, so they run as one matmul
    (`medusa_first_matrix`), and a shared LM head reads every head's output in one more."""
    if self.dtype != jnp.float32 or not self.config.medusa_heads:
      return self.medusa_logits(hidden_BTD)
    x_BTD = hidden_BTD.astype(jnp.float32)
    num_heads, d = len(self.medusa), x_BTD.shape[-1]
    y_BTKD = rows_matmul.matmul(x_BTD, medusa_first_matrix(self), key=('medusa', id(self)))
    y_BTKD = y_BTKD.reshape(x_BTD.shape[:-1] + (num_heads, d))
    bias_KD = jnp.stack([head.res[0].bias[...] for head in self.medusa]).astype(jnp.float32)
    h_BTKD = x_BTD[..., None, :] + jax.nn.silu(y_BTKD + bias_KD)
    outs = []
    for k, head in enumerate(self.medusa):
      h_BTD = h_BTKD[..., k, :]
      for res in head.res[1:]:
        h_BTD = res(h_BTD)
      outs.append(h_BTD)
    if self.config.medusa_shared_head:
      logits_BTKV = self.decode_logits(jnp.stack(outs, axis=-2))
      return jnp.moveaxis(logits_BTKV, -2, 0)
    return jnp.stack([rows_matmul.matmul(h_BTD, head.lm_head[...].astype(jnp.float32),
                                         key=id(head)) for head, h_BTD in zip(self.medusa, outs)])

  def _check_tokens(self, tokens_BT, name='tokens_BT'):
    if tokens_BT.ndim != 2 or not jnp.issubdtype(tokens_BT.dtype, jnp.integer):
      raise ValueError(f'{name} must be an integer [batch, seq] array, got {tokens_BT.dtype} '
                       f'{tokens_BT.shape}')

  def rotary(self, positions_BT) -> Rotary:
    """The rotary tables of `positions_BT`, shared by every block (trunk, MTP, EAGLE)."""
    c = self.config
    return rotary(positions_BT, c.head_dim, c.rope_theta, c.rope_scaling)

  def trunk(self, tokens_BT, rope: Rotary, segment_ids_BT=None):
    """Embedding, blocks and final norm: `(hidden_BTD final-normed, ks, vs)`, with each layer's
    K/V `[B, T, K, E]` (what `kv_cache.prefill` writes; unused K/V vanish under jit). `rope`:
    `self.rotary(positions_BT)`, which the caller's MTP modules reuse."""
    x_BTD = self.embed_tokens(tokens_BT)
    ks, vs = [], []
    for layer in self.layers:
      x_BTD, k_BTKE, v_BTKE = layer(x_BTD, rope, segment_ids_BT)
      ks.append(k_BTKE)
      vs.append(v_BTKE)
    return self.final_norm(x_BTD), ks, vs

  def __call__(self, tokens_BT, *, positions_BT=None, segment_ids_BT=None) -> ModelOutputs:
    self._check_tokens(tokens_BT)
    batch, seq_len = tokens_BT.shape
    for name, arr in (('positions_BT', positions_BT), ('segment_ids_BT', segment_ids_BT)):
      if arr is not None and arr.shape != tokens_BT.shape:
        raise ValueError(f'{name} must have the shape of tokens_BT {tokens_BT.shape}, got {arr.shape}')
    if positions_BT is None:
      if segment_ids_BT is None:
        positions_BT = jnp.broadcast_to(jnp.arange(seq_len, dtype=jnp.int32), (batch, seq_len))
      else:
        positions_BT = positions_from_segments(segment_ids_BT)
    rope = self.rotary(positions_BT)
    hidden_BTD, _, _ = self.trunk(tokens_BT, rope, segment_ids_BT)
    logits_BTV = self.logits(hidden_BTD)

    mtp_logits = None
    if self.config.mtp_depth:
      h_BTD, out = hidden_BTD, []
      for k, module in enumerate(self.mtp, start=1):
        # Module k at position i reads t_{i+k}; inputs past the row end are padded (targets masked).
        shifted_BT = jnp.pad(tokens_BT[:, k:], ((0, 0), (0, min(k, seq_len))))[:, :seq_len]
        h_BTD = module(h_BTD, self.embed_tokens(shifted_BT), rope, segment_ids_BT)
        out.append(self.logits(self.final_norm(h_BTD)))
      mtp_logits = jnp.stack(out)
    medusa = self.medusa_logits(hidden_BTD) if self.config.medusa_heads else None
    return ModelOutputs(logits_BTV, hidden_BTD, mtp_logits, medusa)


def medusa_first_matrix(model):
  """The Medusa heads' first residual-block kernels side by side, `[D, heads * D]` (fp32)."""
  return jnp.concatenate([head.res[0].kernel[...] for head in model.medusa],
                         axis=1).astype(jnp.float32)


def decode_matrices_of(*modules) -> dict:
  """`{key: matrix}` of every few-row matmul weight of these modules' decode paths (blocks, MTP /
  EAGLE combines, a Transformer's LM head and Medusa heads), in a fixed traversal order; the keys
  are those the decode paths pass to `rows_matmul.matmul` (ids of this copy's layers)."""
  return _decode_matrices(*modules)[0]


def _decode_matrices(*modules):
  """(`decode_matrices_of`, the keys of the blocks' matrices, {key: the dtype its parameters are
  stored in} for the blocks, the MTP combines, the LM heads and the Medusa heads)."""
  matrices, block_keys, stored = {}, set(), {}
  for module in modules:
    if module is None:
      continue
    for _, node in nnx.iter_graph(module):
      if isinstance(node, Block):
        block_matrices = decode_matrices(node)
        matrices.update(block_matrices)
        block_keys.update(block_matrices)
        stored.update(dict.fromkeys(block_matrices, node.attn.q.kernel.dtype))
      elif isinstance(node, MTPModule):
        matrices[id(node.proj)] = node.proj.matrix()
        stored[id(node.proj)] = node.proj.kernel.dtype
      elif isinstance(node, Transformer) and node.dtype == jnp.float32:
        head_DV = node.shared_head_DV()
        matrices[id(node)] = head_DV.astype(jnp.float32)
        stored[id(node)] = head_DV.dtype
        if node.config.medusa_heads:
          matrices[('medusa', id(node))] = medusa_first_matrix(node)
          stored[('medusa', id(node))] = node.medusa[0].res[0].kernel.dtype
          if not node.config.medusa_shared_head:
            matrices.update({id(head): head.lm_head[...].astype(jnp.float32)
                             for head in node.medusa})
            stored.update({id(head): head.lm_head.dtype for head in node.medusa})
  return matrices, block_keys, stored


def _packed_matrices(*modules, bf16_products: bool = False) -> dict:
  """{key: (matrix, tile dtype, pairs)} of the matrices of `decode_matrices_of` a decode loop
  packs: those `rows_matmul.matmul` sends to the kernel, and every fp32 block matrix when
  `kernels.block_decode` runs the blocks. A matrix whose parameters are stored in bf16 (a drafter
  `decoding.prepare`d with `drafter_dtype`) is packed as bf16 tiles: the same values, half the
  bytes. bf16_products: every matrix of even input width as bf16 pair tiles (`rows_matmul.pack`
  with pairs; `decoding.prepare(matmul_dtype=bfloat16)`), the others as bf16 tiles."""
  matrices, block_keys, stored = _decode_matrices(*modules)
  whole_blocks = block_decode.enabled()
  def spec(key, w):
    if bf16_products:
      return w, jnp.bfloat16, w.shape[0] % 2 == 0
    return w, (jnp.bfloat16 if stored.get(key) == jnp.bfloat16 else jnp.float32), False
  return {key: spec(key, w) for key, w in matrices.items()
          if rows_matmul.usable(w) or (whole_blocks and key in block_keys
                                       and w.dtype == jnp.float32)}


def decode_packs(*modules, bf16_products: bool = False) -> dict:
  """The weights of `decode_matrices_of` that the kernel takes, packed for `rows_matmul.packed`:
  what a decode loop packs once before it starts ({} for non-fp32 modules or without the kernel).
  bf16_products: see `_packed_matrices`."""
  return {key: rows_matmul.pack(w, dtype, pairs=pairs)
          for key, (w, dtype, pairs) in _packed_matrices(*modules,
                                                         bf16_products=bf16_products).items()}


def decode_packs_from(packs: tuple, *modules) -> dict:
  """`decode_packs(*modules)` from its values, packed earlier (outside a jitted loop, once for
  many calls: `decoding.prepare`) and passed in as arguments: the keys name layers by id, and an
  `nnx.merge` inside the jitted function makes new layers. `()` (nothing packed) gives `{}`."""
  if not packs:
    return {}
  keys = list(_packed_matrices(*modules))
  if len(keys) != len(packs):
    raise ValueError(f'packs: {len(packs)} packed weights for {len(keys)} decode matmuls: they '
                     f'were packed from other modules')
  return dict(zip(keys, packs))
