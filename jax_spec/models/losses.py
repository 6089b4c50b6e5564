"""Training losses: main next-token CE plus MTP (DeepSeek-V3) and Medusa head losses, in fp32.

A prediction at position i of target t_{i+j} counts only if i + j is inside the row and both
positions belong to the same document (`segment_ids[i + j] == segment_ids[i]`), and the document
is not padding (segment id 0).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from jax_spec.models.config import TransformerConfig


def shifted_targets(tokens_BT, segment_ids_BT, offset: int):
  """Targets t_{i+offset} and their validity mask [B, T] (document- and row-end aware)."""
  batch, seq_len = tokens_BT.shape
  if segment_ids_BT is None:
    segment_ids_BT = jnp.ones_like(tokens_BT)
  pad = ((0, 0), (0, min(offset, seq_len)))
  targets_BT = jnp.pad(tokens_BT[:, offset:], pad)[:, :seq_len]
  seg_next_BT = jnp.pad(segment_ids_BT[:, offset:], pad, constant_values=-1)[:, :seq_len]
  valid_BT = (seg_next_BT == segment_ids_BT) & (segment_ids_BT != 0)
  return targets_BT, valid_BT


def cross_entropy(logits_BTV, targets_BT, valid_BT):
  """Masked mean cross-entropy and top-1 accuracy (fp32 scalars)."""
  logp_BTV = jax.nn.log_softmax(logits_BTV.astype(jnp.float32), axis=-1)
  nll_BT = -jnp.take_along_axis(logp_BTV, targets_BT[..., None], axis=-1)[..., 0]
  weight_BT = valid_BT.astype(jnp.float32)
  denom = jnp.maximum(weight_BT.sum(), 1.0)
  loss = (nll_BT * weight_BT).sum() / denom
  acc = ((jnp.argmax(logits_BTV, axis=-1) == targets_BT) * weight_BT).sum() / denom
  return loss, acc


def compute_losses(outputs, tokens_BT, segment_ids_BT, config: TransformerConfig, *,
                   mtp_lambda: float = 0.3, medusa_weight: float = 0.8):
  """Returns (loss, metrics).

  loss = main + mtp_lambda / D * sum_k mtp_k + sum_k medusa_weight**k * medusa_k (k from 1).
  Metrics: loss, main_loss, main_acc, mtp_loss_k / mtp_acc_k, medusa_loss_k / medusa_acc_k.
  """
  if tokens_BT.shape != outputs.logits_BTV.shape[:2]:
    raise ValueError(f'tokens_BT {tokens_BT.shape} does not match the logits '
                     f'{outputs.logits_BTV.shape[:2]}')
  if segment_ids_BT is not None and segment_ids_BT.shape != tokens_BT.shape:
    raise ValueError(f'segment_ids_BT must have shape {tokens_BT.shape}, got {segment_ids_BT.shape}')
  metrics = {}
  targets, valid = shifted_targets(tokens_BT, segment_ids_BT, 1)
  main_loss, metrics['main_acc'] = cross_entropy(outputs.logits_BTV, targets, valid)
  metrics['main_loss'] = main_loss
  loss = main_loss
  if config.mtp_depth:
    if outputs.mtp_logits_DBTV is None:
      raise ValueError('config.mtp_depth > 0 but outputs.mtp_logits_DBTV is None')
    mtp_total = 0.0
    for k in range(1, config.mtp_depth + 1):
      targets, valid = shifted_targets(tokens_BT, segment_ids_BT, k + 1)
      l, a = cross_entropy(outputs.mtp_logits_DBTV[k - 1], targets, valid)
      metrics[f'mtp_loss_{k}'], metrics[f'mtp_acc_{k}'] = l, a
      mtp_total = mtp_total + l
    loss = loss + mtp_lambda / config.mtp_depth * mtp_total
  if config.medusa_heads:
    if outputs.medusa_logits_KBTV is None:
      raise ValueError('config.medusa_heads > 0 but outputs.medusa_logits_KBTV is None')
    for k in range(1, config.medusa_heads + 1):
      targets, valid = shifted_targets(tokens_BT, segment_ids_BT, k + 1)
      l, a = cross_entropy(outputs.medusa_logits_KBTV[k - 1], targets, valid)
      metrics[f'medusa_loss_{k}'], metrics[f'medusa_acc_{k}'] = l, a
      loss = loss + medusa_weight ** k * l
  metrics['loss'] = loss
  return loss, metrics
