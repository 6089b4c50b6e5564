"""Hugging Face `config.json` <-> `TransformerConfig`, and the tensor name mapping.

Supported `model_type`s: llama (Llama 2, 3, 3.1+ with `rope_scaling` llama3; SmolLM2), mistral,
qwen2 (Qwen2 / Qwen2.5), qwen3. All four are the same pre-norm RMSNorm / RoPE (rotate-half) /
GQA / SwiGLU decoder; they differ in attention biases, q/k norm, head_dim and rope scaling, which
`TransformerConfig` carries. Both config spellings are read: transformers v4 (`rope_theta`,
`rope_scaling`, as most hub checkpoints) and v5 (`rope_parameters`).

Tensor layout: Hugging Face linear weights are [out, in] (torch.nn.Linear); ours are [in..., out...]
kernels (`Dense`), e.g. q_proj [H * Dh, D] <-> q.kernel [D, H, Dh], o_proj [D, H * Dh] <->
out.kernel [H, Dh, D]. RoPE needs no permutation: Hugging Face checkpoints already use the
rotate-half convention that `layers.apply_rope` implements.
"""
from __future__ import annotations

import math
from typing import NamedTuple

from jax_spec.models.config import RopeScaling, TransformerConfig

MODEL_TYPES = ('llama', 'mistral', 'qwen2', 'qwen3')
ARCHITECTURE_CLASS = {'llama': 'LlamaForCausalLM', 'mistral': 'MistralForCausalLM',
                      'qwen2': 'Qwen2ForCausalLM', 'qwen3': 'Qwen3ForCausalLM'}
# TransformerConfig fields that config.json determines (the rest are heads / runtime choices).
TRUNK_FIELDS = ('vocab_size', 'd_model', 'num_layers', 'num_heads', 'num_kv_heads', 'd_ff',
                'max_seq_len', 'rope_theta', 'norm_eps', 'tie_embeddings', 'explicit_head_dim',
                'qkv_bias', 'out_bias', 'qk_norm', 'rope_scaling')


class TensorSpec(NamedTuple):
  """One checkpoint tensor: its Hugging Face name, our state path, and how the layouts relate.

  `num_in` > 0: a linear layer; our kernel is [in dims (the first num_in), out dims], the file's
  is [prod(out), prod(in)]. `num_in` == 0: the same array (embeddings, norms), or with
  `flat` a 1-D one (a bias over [heads, head_dim]).
  """
  hf_name: str
  path: tuple
  num_in: int
  flat: bool = False

  def hf_shape(self, shape: tuple) -> tuple:
    if self.num_in:
      return (math.prod(shape[self.num_in:]), math.prod(shape[:self.num_in]))
    return (math.prod(shape),) if self.flat else tuple(shape)

  def to_ours(self, w, shape: tuple):
    return (w.T if self.num_in else w).reshape(shape)

  def to_hf(self, kernel, shape: tuple):
    if not self.num_in:
      return kernel.reshape(self.hf_shape(shape))
    return kernel.reshape(math.prod(shape[:self.num_in]), -1).T


def tensor_specs(config: TransformerConfig) -> list[TensorSpec]:
  """The trunk's tensors, in checkpoint order (see docs/architecture.md for the table)."""
  specs = [TensorSpec('model.embed_tokens.weight', ('embed', 'embedding'), 0)]
  for i in range(config.num_layers):
    hf, ours = f'model.layers.{i}.', ('layers', i)
    specs.append(TensorSpec(hf + 'input_layernorm.weight', ours + ('attn_norm', 'scale'), 0))
    attn = ours + ('attn',)
    for name in ('q', 'k', 'v'):
      specs.append(TensorSpec(f'{hf}self_attn.{name}_proj.weight', attn + (name, 'kernel'), 1))
      if config.qkv_bias:
        specs.append(TensorSpec(f'{hf}self_attn.{name}_proj.bias', attn + (name, 'bias'), 0,
                                flat=True))
    specs.append(TensorSpec(hf + 'self_attn.o_proj.weight', attn + ('out', 'kernel'), 2))
    if config.out_bias:
      specs.append(TensorSpec(hf + 'self_attn.o_proj.bias', attn + ('out', 'bias'), 0))
    if config.qk_norm:
      specs.append(TensorSpec(hf + 'self_attn.q_norm.weight', attn + ('q_norm', 'scale'), 0))
      specs.append(TensorSpec(hf + 'self_attn.k_norm.weight', attn + ('k_norm', 'scale'), 0))
    specs.append(TensorSpec(hf + 'post_attention_layernorm.weight', ours + ('mlp_norm', 'scale'),
                            0))
    for name in ('gate', 'up', 'down'):
      specs.append(TensorSpec(f'{hf}mlp.{name}_proj.weight', ours + ('mlp', name, 'kernel'), 1))
  specs.append(TensorSpec('model.norm.weight', ('final_norm', 'scale'), 0))
  if not config.tie_embeddings:
    specs.append(TensorSpec('lm_head.weight', ('lm_head', 'kernel'), 1))
  return specs


# Tensors some checkpoints carry that hold nothing the model needs (reported as extras otherwise).
def is_redundant(name: str, config: TransformerConfig) -> bool:
  # Tied checkpoints sometimes store the shared matrix twice.
  return config.tie_embeddings and name == 'lm_head.weight'


def _rope(hf: dict, where: str) -> tuple[float, RopeScaling | None]:
  if hf.get('rope_parameters') is not None:                       # transformers v5
    params = dict(hf['rope_parameters'])
  else:                                                           # v4: two top-level keys
    params = dict(hf.get('rope_scaling') or {})
    params.setdefault('rope_theta', hf.get('rope_theta', 10_000.0))
  kind = params.get('rope_type', params.get('type', 'default'))
  theta = float(params['rope_theta'])
  if kind == 'default':
    return theta, None
  try:
    if kind == 'linear':
      return theta, RopeScaling('linear', float(params['factor']))
    if kind == 'llama3':
      return theta, RopeScaling(
          'llama3', float(params['factor']), float(params['low_freq_factor']),
          float(params['high_freq_factor']), int(params['original_max_position_embeddings']))
  except KeyError as e:
    raise ValueError(f'{where}: rope scaling {kind!r} lacks {e.args[0]!r}') from None
  raise ValueError(f'{where}: rope scaling type {kind!r} is not supported; supported: default, '
                   f'linear, llama3')


def config_from_hf(hf: dict, where: str = 'config.json') -> tuple[TransformerConfig, list[str]]:
  """TransformerConfig of a Hugging Face config (trunk fields only) and warnings for the user."""
  model_type = hf.get('model_type')
  if model_type not in MODEL_TYPES:
    raise ValueError(f'{where}: model_type {model_type!r} is not supported; supported: '
                     f'{", ".join(MODEL_TYPES)}')
  missing = [k for k in ('vocab_size', 'hidden_size', 'num_hidden_layers', 'num_attention_heads',
                         'intermediate_size') if k not in hf]
  if missing:
    raise ValueError(f'{where}: missing key(s) {missing}')
  if hf.get('hidden_act', 'silu') != 'silu':
    raise ValueError(f'{where}: hidden_act {hf["hidden_act"]!r} is not supported (only silu)')
  if hf.get('mlp_bias'):
    raise ValueError(f'{where}: mlp_bias=true is not supported')
  warnings = []
  max_seq_len = int(hf.get('max_position_embeddings', 4096))
  window = hf.get('sliding_window')
  uses_window = hf.get('use_sliding_window', model_type == 'mistral')
  if uses_window and window is not None and window < max_seq_len:
    # No sliding-window attention here: full causal attention is exact up to the window.
    warnings.append(f'{where}: sliding_window={window} < max_position_embeddings={max_seq_len}; '
                    f'max_seq_len set to {window} (attention is full causal, exact up to it)')
    max_seq_len = int(window)
  d_model, num_heads = int(hf['hidden_size']), int(hf['num_attention_heads'])
  head_dim = hf.get('head_dim')
  # None where head_dim is the default d_model // num_heads: the config equals a built-in one.
  explicit_head_dim = None if head_dim is None or (
      d_model % num_heads == 0 and head_dim == d_model // num_heads) else int(head_dim)
  bias = bool(hf.get('attention_bias', False))
  theta, scaling = _rope(hf, where)
  config = TransformerConfig(
      vocab_size=int(hf['vocab_size']), d_model=d_model, num_layers=int(hf['num_hidden_layers']),
      num_heads=num_heads, num_kv_heads=int(hf.get('num_key_value_heads') or num_heads),
      d_ff=int(hf['intermediate_size']), max_seq_len=max_seq_len, rope_theta=theta,
      norm_eps=float(hf.get('rms_norm_eps', 1e-6)),
      tie_embeddings=bool(hf.get('tie_word_embeddings', False)),
      init_std=float(hf.get('initializer_range', 0.02)), explicit_head_dim=explicit_head_dim,
      qkv_bias=True if model_type == 'qwen2' else bias,
      out_bias=False if model_type == 'qwen2' else bias,
      qk_norm=model_type == 'qwen3', rope_scaling=scaling, mtp_depth=0, medusa_heads=0)
  return config, warnings


def infer_model_type(config: TransformerConfig) -> str:
  """The Hugging Face architecture that computes exactly what `config` does."""
  if config.qk_norm:
    if config.qkv_bias != config.out_bias:
      raise ValueError('qk_norm (qwen3) needs qkv_bias == out_bias (one attention_bias flag)')
    return 'qwen3'
  if config.qkv_bias and not config.out_bias:
    return 'qwen2'
  if config.qkv_bias != config.out_bias:
    raise ValueError('out_bias without qkv_bias has no Hugging Face architecture')
  return 'llama'


def config_to_hf(config: TransformerConfig, model_type: str | None = None) -> dict:
  """A config.json (transformers v4 keys, which v5 reads too) for the trunk of `config`."""
  model_type = model_type or infer_model_type(config)
  if model_type not in MODEL_TYPES:
    raise ValueError(f'model_type must be one of {MODEL_TYPES}, got {model_type!r}')
  hf = {
      'architectures': [ARCHITECTURE_CLASS[model_type]], 'model_type': model_type,
      'vocab_size': config.vocab_size, 'hidden_size': config.d_model,
      'num_hidden_layers': config.num_layers, 'num_attention_heads': config.num_heads,
      'num_key_value_heads': config.num_kv_heads, 'head_dim': config.head_dim,
      'intermediate_size': config.d_ff, 'max_position_embeddings': config.max_seq_len,
      'rms_norm_eps': config.norm_eps, 'tie_word_embeddings': config.tie_embeddings,
      'initializer_range': config.init_std, 'hidden_act': 'silu', 'rope_theta': config.rope_theta,
      'attention_bias': config.out_bias if model_type != 'qwen2' else False,
      'rope_scaling': None, 'torch_dtype': 'float32',
  }
  if model_type in ('mistral', 'qwen2', 'qwen3'):
    hf['sliding_window'] = None
    hf['use_sliding_window'] = False
  s = config.rope_scaling
  if s is not None:
    hf['rope_scaling'] = {'rope_type': s.kind, 'factor': s.factor}
    if s.kind == 'llama3':
      hf['rope_scaling'].update(low_freq_factor=s.low_freq_factor,
                                high_freq_factor=s.high_freq_factor,
                                original_max_position_embeddings=s.original_max_position_embeddings)
  # The written file must read back to the same trunk (catches a config no architecture fits).
  back, _ = config_from_hf(hf, 'config_to_hf')
  mismatched = [f for f in TRUNK_FIELDS if getattr(back, f) != getattr(config, f)]
  if mismatched:
    raise ValueError(f'model_type {model_type!r} cannot express this config: {mismatched} differ')
  return hf
