"""Transformer configuration: a frozen, validated dataclass and named presets."""
from __future__ import annotations

import dataclasses

from jax_spec import attention

ATTENTION_IMPLS = (None,) + attention.IMPLEMENTATIONS   # None: the dispatcher picks by platform
ROPE_SCALING_KINDS = ('linear', 'llama3')


@dataclasses.dataclass(frozen=True)
class RopeScaling:
  """Rotary frequency scaling for context extension (Hugging Face `rope_scaling`).

  'linear': every frequency divided by `factor` (position interpolation).
  'llama3': Llama 3.1's band-wise rule: wavelengths above `original_max_position_embeddings /
  low_freq_factor` are divided by `factor`, below `.. / high_freq_factor` kept, smoothly in between.
  """
  kind: str
  factor: float
  low_freq_factor: float = 1.0
  high_freq_factor: float = 4.0
  original_max_position_embeddings: int = 8192

  def __post_init__(self):
    if self.kind not in ROPE_SCALING_KINDS:
      raise ValueError(f'rope scaling kind must be one of {ROPE_SCALING_KINDS}, got {self.kind!r}')
    for name in ('factor', 'low_freq_factor', 'high_freq_factor',
                 'original_max_position_embeddings'):
      value = getattr(self, name)
      if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0:
        raise ValueError(f'rope scaling {name} must be a positive number, got {value!r}')
    if self.kind == 'llama3' and not self.high_freq_factor > self.low_freq_factor:
      raise ValueError(f'llama3 rope scaling needs high_freq_factor > low_freq_factor, got '
                       f'{self.high_freq_factor} <= {self.low_freq_factor}')


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
  """Decoder-only transformer with optional MTP modules and Medusa heads.

  `mtp_depth` DeepSeek-V3 MTP modules (0 = none) and `medusa_heads` Medusa heads (0 = none) can be
  combined. `medusa_frozen_trunk=True` is Medusa-1: the heads see `stop_gradient(hidden)`.
  `eagle_layers` > 0 adds one EAGLE-style feature drafter of that many blocks (0 = none), applied
  autoregressively to any depth (`jax_spec.models.eagle`); `eagle_d_ff` is their MLP width
  (None: the trunk's `d_ff`). The drafter runs once per draft depth, so its bytes, not its FLOPs,
  set a speculative step's cost on a CPU (docs/benchmarks.md, "A narrower EAGLE block").
  `attention_impl=None` lets the attention dispatcher choose (pallas on GPU/TPU, xla on CPU).
  Pretrained architectures (jax_spec.pretrained) also use: `explicit_head_dim` (Qwen3: head_dim
  != d_model // num_heads), `qkv_bias` (Qwen2), `out_bias` (Llama `attention_bias`), `qk_norm`
  (Qwen3: RMSNorm of q and k over head_dim before RoPE), `rope_scaling`. Their defaults are
  today's numerics.
  """
  vocab_size: int = 259
  d_model: int = 64
  num_layers: int = 2
  num_heads: int = 4
  num_kv_heads: int = 2
  d_ff: int = 192
  max_seq_len: int = 128
  rope_theta: float = 10_000.0
  norm_eps: float = 1e-6
  tie_embeddings: bool = True
  init_std: float = 0.02
  mtp_depth: int = 0
  medusa_heads: int = 0
  medusa_num_layers: int = 1
  medusa_shared_head: bool = True
  medusa_frozen_trunk: bool = False
  eagle_layers: int = 0
  eagle_d_ff: int | None = None
  attention_impl: str | None = None
  explicit_head_dim: int | None = None
  qkv_bias: bool = False
  out_bias: bool = False
  qk_norm: bool = False
  rope_scaling: RopeScaling | None = None

  def __post_init__(self):
    positive = ('vocab_size', 'd_model', 'num_layers', 'num_heads', 'num_kv_heads', 'd_ff',
                'max_seq_len', 'medusa_num_layers')
    for name in positive:
      value = getattr(self, name)
      if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f'{name} must be a positive int, got {value!r}')
    for name in ('mtp_depth', 'medusa_heads', 'eagle_layers'):
      value = getattr(self, name)
      if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f'{name} must be a non-negative int, got {value!r}')
    for name in ('eagle_d_ff', 'explicit_head_dim'):
      value = getattr(self, name)
      if value is not None and (not isinstance(value, int) or isinstance(value, bool)
                                or value <= 0):
        raise ValueError(f'{name} must be None or a positive int, got {value!r}')
    if self.explicit_head_dim is None and self.d_model % self.num_heads:
      raise ValueError(f'd_model ({self.d_model}) must be divisible by num_heads ({self.num_heads})')
    if self.num_heads % self.num_kv_heads:
      raise ValueError(f'num_heads ({self.num_heads}) must be divisible by num_kv_heads '
                       f'({self.num_kv_heads})')
    if self.head_dim % 2:
      raise ValueError(f'head_dim (explicit_head_dim or d_model // num_heads) must be even for '
                       f'rotary embeddings, got {self.head_dim}')
    for name in ('rope_theta', 'norm_eps', 'init_std'):
      value = getattr(self, name)
      if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0:
        raise ValueError(f'{name} must be a positive number, got {value!r}')
    for name in ('tie_embeddings', 'medusa_shared_head', 'medusa_frozen_trunk', 'qkv_bias',
                 'out_bias', 'qk_norm'):
      if not isinstance(getattr(self, name), bool):
        raise ValueError(f'{name} must be a bool, got {getattr(self, name)!r}')
    if self.attention_impl not in ATTENTION_IMPLS:
      raise ValueError(f'attention_impl must be one of {ATTENTION_IMPLS}, got {self.attention_impl!r}')
    if isinstance(self.rope_scaling, dict):  # read back from JSON (dataclasses.asdict)
      object.__setattr__(self, 'rope_scaling', RopeScaling(**self.rope_scaling))
    if self.rope_scaling is not None and not isinstance(self.rope_scaling, RopeScaling):
      raise ValueError(f'rope_scaling must be None or a RopeScaling, got {self.rope_scaling!r}')

  @property
  def eagle_config(self) -> 'TransformerConfig':
    """The config the EAGLE blocks are built from: the trunk's, with MLP width `eagle_d_ff`."""
    return self.replace(d_ff=self.eagle_d_ff or self.d_ff)

  @property
  def head_dim(self) -> int:
    if self.explicit_head_dim is not None:
      return self.explicit_head_dim
    return self.d_model // self.num_heads

  def replace(self, **overrides) -> 'TransformerConfig':
    return dataclasses.replace(self, **overrides)


PRESETS = {
    # Unit tests: GQA (4 query heads over 2 KV heads), both kinds of heads.
    'tiny': TransformerConfig(vocab_size=259, d_model=64, num_layers=2, num_heads=4, num_kv_heads=2,
                              d_ff=192, max_seq_len=128, mtp_depth=2, medusa_heads=2),
    # CPU quickstart (~3.4M params with a 259-symbol byte vocabulary): trains in minutes on 2 cores.
    'small': TransformerConfig(vocab_size=259, d_model=256, num_layers=4, num_heads=8,
                               num_kv_heads=2, d_ff=768, max_seq_len=512, mtp_depth=2,
                               medusa_heads=3),
    # GPU-sized (~110M params with a 32k vocabulary).
    'base': TransformerConfig(vocab_size=32_000, d_model=768, num_layers=12, num_heads=12,
                              num_kv_heads=4, d_ff=2048, max_seq_len=2048, mtp_depth=1,
                              medusa_heads=4),
}


def get_config(name: str, **overrides) -> TransformerConfig:
  """Returns preset `name` with `overrides` applied (validated again)."""
  if name not in PRESETS:
    raise ValueError(f'config name must be one of {sorted(PRESETS)}, got {name!r}')
  fields = {f.name for f in dataclasses.fields(TransformerConfig)}
  unknown = sorted(set(overrides) - fields)
  if unknown:
    raise ValueError(f'unknown TransformerConfig field(s) {unknown}; fields are {sorted(fields)}')
  return dataclasses.replace(PRESETS[name], **overrides)


def _block_params(c: TransformerConfig) -> int:
  attn = c.d_model * c.head_dim * (2 * c.num_heads + 2 * c.num_kv_heads)
  attn += c.qkv_bias * c.head_dim * (c.num_heads + 2 * c.num_kv_heads) + c.out_bias * c.d_model
  attn += c.qk_norm * 2 * c.head_dim
  mlp = 3 * c.d_model * c.d_ff
  return attn + mlp + 2 * c.d_model


def param_count(c: TransformerConfig) -> dict[str, int]:
  """Closed-form parameter counts: {'trunk', 'mtp', 'medusa', 'eagle', 'total'}."""
  d, v = c.d_model, c.vocab_size
  trunk = v * d + c.num_layers * _block_params(c) + d + (0 if c.tie_embeddings else d * v)
  mtp = c.mtp_depth * (2 * d + 2 * d * d + _block_params(c))
  medusa = c.medusa_heads * (c.medusa_num_layers * (d * d + d) + (0 if c.medusa_shared_head else d * v))
  # The EAGLE module is an MTP module (combine + block) with eagle_layers - 1 more blocks.
  eagle = 2 * d + 2 * d * d + c.eagle_layers * _block_params(c.eagle_config)
  eagle = eagle if c.eagle_layers else 0
  return {'trunk': trunk, 'mtp': mtp, 'medusa': medusa, 'eagle': eagle,
          'total': trunk + mtp + medusa + eagle}
