"""Draft heads' top-k accuracies on validation data, and the candidate tree they imply.

Draft head k (an MTP module or a Medusa head, k = 1..K) at position i predicts t_{i+k+1}: the
same targets as its training loss (`models.losses.shifted_targets`).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm import tqdm

from jax_spec.decoding import trees as trees_lib
from jax_spec.models.losses import shifted_targets

HEAD_DRAFTERS = ('mtp', 'medusa')


def head_logits_and_targets(model, tokens_BT, segment_ids_BT, drafter: str):
  """Draft-head logits `[K, N, V]`, targets `[K, N]` and validity `[K, N]` (N = B * T)."""
  if drafter not in HEAD_DRAFTERS:
    raise ValueError(f'drafter must be one of {HEAD_DRAFTERS}, got {drafter!r}')
  out = model(tokens_BT, segment_ids_BT=segment_ids_BT)
  logits_JBTV = out.medusa_logits_JBTV if drafter == 'medusa' else out.mtp_logits_JBTV
  num_heads, batch, seq_len, vocab = logits_JBTV.shape
  targets_JBT, valid_JBT = zip(*(shifted_targets(tokens_BT, segment_ids_BT, k + 1)
                                 for k in range(1, num_heads + 1)))
  return (logits_JBTV.reshape(num_heads, batch * seq_len, vocab),
          jnp.stack(targets_JBT).reshape(num_heads, -1), jnp.stack(valid_JBT).reshape(num_heads, -1))


def measure_head_accuracies(model, data, drafter: str, *, topk: int, num_batches: int,
                            batch_size: int = 8, seq_len: int = 256) -> np.ndarray:
  """`[K, topk]`: P(head k's rank-r token is right), over `num_batches` validation batches."""
  graphdef, state = nnx.split(model)
  fn = jax.jit(lambda st, t, s: head_logits_and_targets(nnx.merge(graphdef, st), t, s, drafter))
  hits, count = None, 0
  for batch in tqdm(data.validation_batches(batch_size, seq_len, num_batches),
                    desc=f'{drafter} head accuracies'):
    logits, targets, valid = fn(state, jnp.asarray(batch['tokens']),
                                jnp.asarray(batch['segment_ids']))
    acc = trees_lib.measure_topk_accuracies(logits, targets, valid, topk)
    # Weight each batch by the positions every head can be scored at (the deepest head's).
    n = int(np.asarray(valid).sum(axis=1).min())
    hits = acc * n if hits is None else hits + acc * n
    count += n
  return hits / max(count, 1)


def derive_tree(model, data, drafter: str, num_nodes: int, *, topk: int = 8,
                num_batches: int = 4) -> tuple[trees_lib.Tree, np.ndarray]:
  """Medusa's greedy tree of `num_nodes` nodes from the measured accuracies: `(tree, acc)`."""
  acc = measure_head_accuracies(model, data, drafter, topk=topk, num_batches=num_batches)
  tree = trees_lib.tree_from_accuracies(acc, num_nodes, branch_from_chain_only=drafter == 'mtp')
  return tree, acc
