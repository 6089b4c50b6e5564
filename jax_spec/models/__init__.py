"""Flax NNX transformer with MTP modules, Medusa heads and a KV cache for speculative decoding."""
from jax_spec.models.config import PRESETS, TransformerConfig, get_config, param_count
from jax_spec.models.kv_cache import (DecodeOutputs, KVCache, MTPCache, MTPDraft, advance, commit,
                                      extend, init_cache, init_mtp_cache, medusa_logits, mtp_draft, prefill)
from jax_spec.models.layers import LayerCache
from jax_spec.models.losses import (HEAD_TARGETS, HeadLoss, compute_losses, cross_entropy,
                                    shifted_targets, trunk_agreement)
from jax_spec.models.transformer import (ModelOutputs, Transformer, decode_matrices_of,
                                          decode_packs, decode_packs_from)
from jax_spec.models import eagle  # feature drafters: EAGLE module, MTP module 1 recursively

__all__ = [
    'PRESETS', 'TransformerConfig', 'get_config', 'param_count', 'Transformer', 'ModelOutputs',
    'compute_losses', 'cross_entropy', 'shifted_targets', 'HeadLoss', 'HEAD_TARGETS',
    'trunk_agreement', 'KVCache', 'LayerCache', 'MTPCache', 'MTPDraft',
    'DecodeOutputs', 'init_cache', 'prefill', 'extend', 'commit', 'advance', 'init_mtp_cache',
    'mtp_draft',
    'medusa_logits', 'eagle', 'decode_matrices_of', 'decode_packs', 'decode_packs_from',
]
