"""Hugging Face checkpoints in and out: Llama, Mistral, Qwen2, Qwen3 (safetensors + config.json +
tokenizer.json), with no torch or transformers at run time. See docs/architecture.md."""
from jax_spec.pretrained.architectures import (MODEL_TYPES, TRUNK_FIELDS, config_from_hf,
                                               config_to_hf)
from jax_spec.pretrained.checkpoint import (HEADS_FILE, PretrainedInfo, from_pretrained,
                                            head_state, load_tokenizer, read_config, save_heads,
                                            save_pretrained)
from jax_spec.pretrained.tokenizer import HfTokenizer

__all__ = ['MODEL_TYPES', 'TRUNK_FIELDS', 'config_from_hf', 'config_to_hf', 'HEADS_FILE',
           'PretrainedInfo', 'from_pretrained', 'head_state', 'load_tokenizer', 'read_config',
           'save_heads', 'save_pretrained', 'HfTokenizer']
