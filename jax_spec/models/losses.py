"""Training losses: main next-token CE plus MTP (DeepSeek-V3), Medusa and EAGLE head losses, fp32.

A prediction at position i of target t_{i+j} counts only if i + j is inside the row and both
positions belong to the same document (`segment_ids[i + j] == segment_ids[i]`), and the document
is not padding (segment id 0).

Head targets (`HeadLoss.targets`): a head predicting t_{i+j} at position i learns either the data
token ('data'), the trunk's own distribution at that position, i.e. softmax of the trunk's logits
at i + j - 1, held fixed with `stop_gradient` ('trunk': KL(p_trunk || p_head), Medusa-2's
self-distillation and EAGLE's target-distribution loss), or `(1 - mix) * data + mix * trunk`
('mix'). Greedy acceptance asks a head for the trunk's argmax, which `trunk_agreement` measures.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jax_spec.models.config import TransformerConfig

HEAD_TARGETS = ('data', 'trunk', 'mix')


@dataclasses.dataclass(frozen=True)
class HeadLoss:
  """Head-loss options shared by every head kind (validated).

  targets / mix: see the module docstring. eagle_steps: EAGLE steps unrolled at training (1 =
  EAGLE-1; > 1 = EAGLE-3's training-time test on its own predicted features, loss at each step,
  averaged). eagle_feature_weight / eagle_token_weight: EAGLE-1's smooth-L1 regression of the
  next trunk feature and the cross-entropy of the token read from it.
  """
  targets: str = 'data'
  mix: float = 0.5
  eagle_steps: int = 1
  eagle_feature_weight: float = 1.0
  eagle_token_weight: float = 0.1

  def __post_init__(self):
    if self.targets not in HEAD_TARGETS:
      raise ValueError(f'head targets must be one of {HEAD_TARGETS}, got {self.targets!r}')
    if not isinstance(self.mix, (int, float)) or not 0.0 <= self.mix <= 1.0:
      raise ValueError(f'head target mix must be a number in [0, 1], got {self.mix!r}')
    if not isinstance(self.eagle_steps, int) or isinstance(self.eagle_steps, bool) or (
        self.eagle_steps < 1):
      raise ValueError(f'eagle_steps must be a positive int, got {self.eagle_steps!r}')
    for name in ('eagle_feature_weight', 'eagle_token_weight'):
      value = getattr(self, name)
      if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0:
        raise ValueError(f'{name} must be a non-negative number, got {value!r}')


def shift(x_BT, offset: int, fill=0):
  """x_{i+offset} along axis 1 (any trailing axes), `fill` past the row end."""
  seq_len = x_BT.shape[1]
  pad = [(0, 0), (0, min(offset, seq_len))] + [(0, 0)] * (x_BT.ndim - 2)
  return jnp.pad(x_BT[:, offset:], pad, constant_values=fill)[:, :seq_len]


def shifted_targets(tokens_BT, segment_ids_BT, offset: int):
  """Targets t_{i+offset} and their validity mask [B, T] (document- and row-end aware)."""
  batch, seq_len = tokens_BT.shape
  if segment_ids_BT is None:
    segment_ids_BT = jnp.ones_like(tokens_BT)
  targets_BT = shift(tokens_BT, offset)
  seg_next_BT = shift(segment_ids_BT, offset, fill=-1)
  valid_BT = (seg_next_BT == segment_ids_BT) & (segment_ids_BT != 0)
  return targets_BT, valid_BT


def cross_entropy(logits_BTV, targets_BT, valid_BT):
  """Masked mean cross-entropy and top-1 accuracy (fp32 scalars)."""
  logp_BTV = jax.nn.log_softmax(logits_BTV.astype(jnp.float32), axis=-1)
  nll_BT = -jnp.take_along_axis(logp_BTV, targets_BT[..., None], axis=-1)[..., 0]
  return (_masked_mean(nll_BT, valid_BT),
          _masked_mean(jnp.argmax(logits_BTV, axis=-1) == targets_BT, valid_BT))




def _masked_mean(x_BT, valid_BT):
  weight_BT = valid_BT.astype(jnp.float32)
  return (x_BT * weight_BT).sum() / jnp.maximum(weight_BT.sum(), 1.0)


def _trunk_logits(trunk_logits_BTV, offset: int):
  """The trunk's (fixed) logits for t_{i+offset}: its prediction at position i + offset - 1."""
  return jax.lax.stop_gradient(shift(trunk_logits_BTV.astype(jnp.float32), offset - 1))


def head_loss(logits_BTV, tokens_BT, segment_ids_BT, offset: int, trunk_logits_BTV,
              head: HeadLoss):
  """Loss and data accuracy of a head whose logits at position i predict t_{i+offset}."""
  targets_BT, valid_BT = shifted_targets(tokens_BT, segment_ids_BT, offset)
  data_loss, acc = cross_entropy(logits_BTV, targets_BT, valid_BT)
  if head.targets == 'data':
    return data_loss, acc
  logp_trunk_BTV = jax.nn.log_softmax(_trunk_logits(trunk_logits_BTV, offset), axis=-1)
  logp_head_BTV = jax.nn.log_softmax(logits_BTV.astype(jnp.float32), axis=-1)
  kl_BT = jnp.sum(jnp.exp(logp_trunk_BTV) * (logp_trunk_BTV - logp_head_BTV), axis=-1)
  trunk_loss = _masked_mean(kl_BT, valid_BT)
  if head.targets == 'trunk':
    return trunk_loss, acc
  return (1.0 - head.mix) * data_loss + head.mix * trunk_loss, acc


def smooth_l1(pred_BTD, target_BTD, valid_BT):
  """Masked mean over positions of the per-feature mean smooth-L1 (Huber, delta 1) distance."""
  diff = jnp.abs(pred_BTD.astype(jnp.float32) - target_BTD.astype(jnp.float32))
  per_BT = jnp.mean(jnp.where(diff < 1.0, 0.5 * diff * diff, diff - 0.5), axis=-1)
  return _masked_mean(per_BT, valid_BT)


def _head_logits(outputs, config, eagle):
  """(name, offset, logits_BTV) of every head prediction: t_{i+offset} at position i."""
  heads = []
  if config.mtp_depth:
    heads += [('mtp', k, k + 1, outputs.mtp_logits_JBTV[k - 1])
              for k in range(1, config.mtp_depth + 1)]
  if config.medusa_heads:
    heads += [('medusa', k, k + 1, outputs.medusa_logits_JBTV[k - 1])
              for k in range(1, config.medusa_heads + 1)]
  if eagle is not None:
    heads += [('eagle', s, s + 1, eagle.logits_JBTV[s - 1])
              for s in range(1, eagle.logits_JBTV.shape[0] + 1)]
  return heads


def trunk_agreement(outputs, tokens_BT, segment_ids_BT, config: TransformerConfig, eagle=None):
  """`{kind}_trunk_acc_k`: how often each head's argmax equals the trunk's argmax at the position
  it predicts (what greedy acceptance of that head's draft needs), over the positions its data
  accuracy `{kind}_acc_k` counts. `eagle`: the `models.eagle.Unrolled` outputs, if any."""
  metrics = {}
  for kind, k, offset, logits_BTV in _head_logits(outputs, config, eagle):
    _, valid_BT = shifted_targets(tokens_BT, segment_ids_BT, offset)
    trunk_BT = jnp.argmax(_trunk_logits(outputs.logits_BTV, offset), axis=-1)
    agree_BT = (jnp.argmax(logits_BTV, axis=-1) == trunk_BT).astype(jnp.float32)
    metrics[f'{kind}_trunk_acc_{k}'] = _masked_mean(agree_BT, valid_BT)
  return metrics


def compute_losses(outputs, tokens_BT, segment_ids_BT, config: TransformerConfig, *,
                   mtp_lambda: float = 0.3, medusa_weight: float = 0.8, eagle=None,
                   head: HeadLoss = HeadLoss()):
  """Returns (loss, metrics).

  loss = main + mtp_lambda / D * sum_k mtp_k + sum_k medusa_weight**k * medusa_k (k from 1)
         + mean_s (eagle_feature_weight * eagle_feature_s + eagle_token_weight * eagle_s).
  Head terms follow `head.targets`. `eagle`: the `models.eagle.Unrolled` outputs (required iff
  `config.eagle_layers`); step s's feature regresses to stop_gradient(hidden at i + s).
  Metrics: loss, main_loss, main_acc, mtp_loss_k / mtp_acc_k, medusa_loss_k / medusa_acc_k,
  eagle_feature_loss_s / eagle_loss_s / eagle_acc_s.
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
  if config.mtp_depth and outputs.mtp_logits_JBTV is None:
    raise ValueError('config.mtp_depth > 0 but outputs.mtp_logits_JBTV is None')
  if config.medusa_heads and outputs.medusa_logits_JBTV is None:
    raise ValueError('config.medusa_heads > 0 but outputs.medusa_logits_JBTV is None')
  if bool(config.eagle_layers) != (eagle is not None):
    raise ValueError(f'eagle outputs must be given iff config.eagle_layers > 0 (eagle_layers = '
                     f'{config.eagle_layers}, eagle outputs given: {eagle is not None})')
  weight = {'mtp': lambda k: mtp_lambda / config.mtp_depth, 'medusa': lambda k: medusa_weight ** k,
            'eagle': lambda s: head.eagle_token_weight / eagle.logits_JBTV.shape[0]}
  for kind, k, offset, logits_BTV in _head_logits(outputs, config, eagle):
    l, a = head_loss(logits_BTV, tokens_BT, segment_ids_BT, offset, outputs.logits_BTV, head)
    metrics[f'{kind}_loss_{k}'], metrics[f'{kind}_acc_{k}'] = l, a
    loss = loss + weight[kind](k) * l
  if eagle is not None:
    num_steps = eagle.features_JBTD.shape[0]
    for s in range(1, num_steps + 1):
      _, valid = shifted_targets(tokens_BT, segment_ids_BT, s)
      target_BTD = jax.lax.stop_gradient(shift(outputs.hidden_BTD, s))
      l = smooth_l1(eagle.features_JBTD[s - 1], target_BTD, valid)
      metrics[f'eagle_feature_loss_{s}'] = l
      loss = loss + head.eagle_feature_weight / num_steps * l
  metrics['loss'] = loss
  return loss, metrics
