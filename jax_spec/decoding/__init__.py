"""Sampling processors, the autoregressive baseline, and the jit-compiled speculative sampler."""
from jax_spec.decoding.acceptance import (Accepted, accept_greedy, accept_rejection,
                                          accept_typical)
from jax_spec.decoding.autoregressive import GenerateOutput, generate
from jax_spec.decoding.prepared import PreparedModel, prepare
from jax_spec.decoding.sampling import SamplingConfig, sample_logits, sample_probs, target_probs
from jax_spec.decoding.speculative import (SpeculativeOutput, SpeculativeStats,
                                           speculative_generate, summarize)
from jax_spec.decoding.trees import (Tree, chain, default_tree, get_tree, measure_topk_accuracies,
                                     tree_from_accuracies)

__all__ = [
    'Accepted', 'accept_greedy', 'accept_rejection', 'accept_typical', 'GenerateOutput', 'generate',
    'PreparedModel', 'prepare',
    'SamplingConfig', 'sample_logits', 'sample_probs', 'target_probs', 'SpeculativeOutput',
    'SpeculativeStats', 'speculative_generate', 'summarize', 'Tree', 'chain', 'default_tree',
    'get_tree', 'measure_topk_accuracies', 'tree_from_accuracies',
]
