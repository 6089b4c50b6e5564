"""Head losses: self-distilled (trunk) targets, EAGLE-1 / training-time-test losses, frozen trunk."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jax_spec import models as M
from jax_spec.models import eagle as eagle_lib
from jax_spec.models import losses
from jax_spec.training import steps

FAST = {'xla_backend_optimization_level': 0, 'xla_llvm_disable_expensive_passes': True}


def _log_softmax(x):
  x = np.asarray(x, np.float64)
  m = x.max(-1, keepdims=True)
  return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def test_head_loss_and_trunk_agreement_match_hand_computation():
  rng = np.random.default_rng(0)
  b, t, v, offset = 2, 7, 5, 3
  head = rng.normal(size=(b, t, v)).astype(np.float32)
  trunk = rng.normal(size=(b, t, v)).astype(np.float32)
  head[0, 0] = trunk[0, offset - 1]              # one exact agreement
  tokens = rng.integers(0, v, size=(b, t)).astype(np.int32)
  seg = np.array([[1, 1, 1, 1, 1, 2, 2], [1, 1, 1, 1, 1, 1, 0]], np.int32)
  kl = acc = agree = data = 0.0
  count = 0
  for r in range(b):
    for i in range(t - offset):
      if seg[r, i] == 0 or seg[r, i + offset] != seg[r, i]:
        continue
      lp, lq = _log_softmax(trunk[r, i + offset - 1]), _log_softmax(head[r, i])
      kl += np.sum(np.exp(lp) * (lp - lq))
      data -= lq[tokens[r, i + offset]]
      acc += head[r, i].argmax() == tokens[r, i + offset]
      agree += head[r, i].argmax() == trunk[r, i + offset - 1].argmax()
      count += 1
  args = (jnp.asarray(head), jnp.asarray(tokens), jnp.asarray(seg), offset, jnp.asarray(trunk))
  for targets, want in (('data', data / count), ('trunk', kl / count),
                        ('mix', 0.75 * data / count + 0.25 * kl / count)):
    loss, a = losses.head_loss(*args, losses.HeadLoss(targets=targets, mix=0.25))
    np.testing.assert_allclose(float(loss), want, rtol=1e-5, err_msg=targets)
    np.testing.assert_allclose(float(a), acc / count, rtol=1e-6)
  # trunk_agreement on a Medusa head at offset 3 (head k = 2).
  cfg = M.get_config('tiny', mtp_depth=0, medusa_heads=2, vocab_size=v)
  medusa = jnp.stack([jnp.asarray(trunk), jnp.asarray(head)])
  outputs = M.ModelOutputs(jnp.asarray(trunk), jnp.zeros((b, t, 4)), None, medusa)
  metrics = M.trunk_agreement(outputs, jnp.asarray(tokens), jnp.asarray(seg), cfg)
  assert set(metrics) == {'medusa_trunk_acc_1', 'medusa_trunk_acc_2'}
  np.testing.assert_allclose(float(metrics['medusa_trunk_acc_2']), agree / count, rtol=1e-6)
  assert agree > 0
  # The trunk's own logits shifted by one agree with themselves exactly.
  shifted = outputs.replace(medusa_logits_KBTV=jnp.stack([jnp.roll(jnp.asarray(trunk), -1, 1)] * 2))
  assert float(M.trunk_agreement(shifted, jnp.asarray(tokens), jnp.asarray(seg),
                                 cfg)['medusa_trunk_acc_1']) == 1.0


def test_head_loss_options_are_validated():
  for kwargs, match in ((dict(targets='teacher'), 'targets'), (dict(mix=1.5), 'mix'),
                        (dict(eagle_steps=0), 'eagle_steps'),
                        (dict(eagle_token_weight=-1.0), 'eagle_token_weight')):
    with pytest.raises(ValueError, match=match):
      losses.HeadLoss(**kwargs)


def test_eagle_losses_target_the_next_features():
  """Step s regresses to the trunk feature s positions ahead (smooth L1) and its token to the data
  token s + 1 ahead; a perfect feature prediction has zero regression loss."""
  rng = np.random.default_rng(1)
  b, t, d, v = 2, 6, 4, 7
  cfg = M.get_config('tiny', mtp_depth=0, medusa_heads=0, eagle_layers=1, vocab_size=v)
  hidden = rng.normal(size=(b, t, d)).astype(np.float32)
  tokens = rng.integers(0, v, size=(b, t)).astype(np.int32)
  outputs = M.ModelOutputs(jnp.asarray(rng.normal(size=(b, t, v)), jnp.float32), jnp.asarray(hidden))
  feats = np.stack([np.roll(hidden, -1, 1), np.roll(hidden, -2, 1) + 3.0])   # step 2 off by 3
  logits = rng.normal(size=(2, b, t, v)).astype(np.float32)
  unrolled = eagle_lib.Unrolled(jnp.asarray(feats), jnp.asarray(logits))
  head = losses.HeadLoss(eagle_steps=2, eagle_feature_weight=2.0, eagle_token_weight=0.5)
  loss, m = M.compute_losses(outputs, jnp.asarray(tokens), None, cfg, eagle=unrolled, head=head)
  assert float(m['eagle_feature_loss_1']) == 0.0
  np.testing.assert_allclose(float(m['eagle_feature_loss_2']), 2.5, rtol=1e-6)  # |3| - 0.5
  ce = [float(losses.cross_entropy(jnp.asarray(logits[s]), *losses.shifted_targets(
      jnp.asarray(tokens), None, s + 2))[0]) for s in range(2)]
  np.testing.assert_allclose([float(m['eagle_loss_1']), float(m['eagle_loss_2'])], ce, rtol=1e-6)
  want = float(m['main_loss']) + 0.5 * (2.0 * 2.5) + 0.5 * 0.5 * sum(ce)
  np.testing.assert_allclose(float(loss), want, rtol=1e-5)
  np.testing.assert_allclose(float(losses.smooth_l1(jnp.full((1, 1, 2), 0.5), jnp.zeros((1, 1, 2)),
                                                    jnp.ones((1, 1), bool))), 0.125)
  with pytest.raises(ValueError, match='eagle'):
    M.compute_losses(outputs, jnp.asarray(tokens), None, cfg)


# ------------------------------------------------------------------------------------------------
# Real training runs (tiny preset): frozen trunk, EAGLE steps, self-distillation
# ------------------------------------------------------------------------------------------------

def _markov_batches(num, batch_size, seq_len, vocab, seed):
  """Order-1 Markov text: each symbol has 3 successors with probabilities 0.5 / 0.3 / 0.2."""
  rng = np.random.default_rng(0)
  succ = rng.integers(1, vocab, size=(vocab, 3))
  rng = np.random.default_rng(seed)
  out = []
  for _ in range(num):
    x = np.zeros((batch_size, seq_len), np.int32)
    x[:, 0] = rng.integers(1, vocab, size=batch_size)
    for i in range(1, seq_len):
      pick = rng.choice(3, size=batch_size, p=[0.5, 0.3, 0.2])
      x[:, i] = succ[x[:, i - 1], pick]
    out.append({'tokens': x, 'segment_ids': np.ones_like(x),
                'positions': np.broadcast_to(np.arange(seq_len, dtype=np.int32), x.shape).copy()})
  return out


def _trainer(model_config, *, trainable=None, head=losses.HeadLoss(), lr=3e-3, seed=0):
  model = M.Transformer(model_config, rngs=nnx.Rngs(seed))
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  schedule = steps.make_schedule(learning_rate=lr, warmup_steps=0, total_steps=100)
  tx = steps.make_optimizer(schedule, trainable=trainable)
  step = jax.jit(steps.make_train_step(graphdef, rest, model_config, tx, schedule,
                                       trainable=trainable, head=head))
  eval_step = jax.jit(steps.make_eval_step(graphdef, rest, model_config, head=head))
  return params, tx, step, eval_step


def _run(step, state, batches):
  compiled = step.lower(state, batches[0]).compile(compiler_options=FAST)
  for batch in batches:
    state, metrics = compiled(state, batch)
  return state, metrics


def _changed(old, new):
  flat_old = dict(jax.tree_util.tree_flatten_with_path(old)[0])
  return {steps.path_to_str(p): not np.array_equal(x, flat_old[p])
          for p, x in jax.tree_util.tree_flatten_with_path(new)[0]}


def test_head_params_filter():
  assert steps.head_params('medusa/0/res/0/kernel') and steps.head_params('mtp/0/proj/kernel')
  assert steps.head_params('eagle/extra_blocks/0/attn/q/kernel')
  assert not steps.head_params('layers/0/attn/q/kernel') and not steps.head_params('embed/embedding')
  assert not steps.head_params('final_norm/scale')


def test_trunk_targets_agree_with_the_trunk_more_than_data_targets():
  """Same trunk (pre-trained 30 steps, then frozen), same head init, seed and batches: a Medusa
  head trained on the trunk's distribution agrees with the trunk's argmax more often (held out)
  than one trained on the data tokens, and the EAGLE drafter (2 training-time-test steps)
  likewise. The frozen trunk does not move."""
  vocab = 40
  cfg = M.get_config('tiny', num_layers=1, vocab_size=vocab, mtp_depth=0, medusa_heads=1,
                     eagle_layers=1)
  batches = _markov_batches(60, 8, 32, vocab, seed=1)
  held_out = _markov_batches(1, 32, 32, vocab, seed=2)[0]
  params, tx, step, eval_step = _trainer(cfg, lr=1e-2)
  trunk_state, _ = _run(step, steps.init_train_state(params, tx, jax.random.key(0)), batches[:30])
  # One compile of the eval step serves both runs (its agreement metrics ignore the targets).
  evaluate = eval_step.lower(trunk_state['params'], held_out).compile(compiler_options=FAST)
  agreement = {}
  for targets in ('data', 'trunk'):
    head = losses.HeadLoss(targets=targets, eagle_steps=2)
    _, tx, step, _ = _trainer(cfg, trainable=steps.head_params, head=head, lr=1e-2)
    state = steps.init_train_state(trunk_state['params'], tx, jax.random.key(0))
    new, metrics = _run(step, state, batches[30:])
    changed = _changed(state['params'], new['params'])
    assert all(changed[k] for k in changed if k.startswith(('eagle/', 'medusa/'))), changed
    assert not any(changed[k] for k in changed if not k.startswith(('eagle/', 'medusa/'))), changed
    assert {f'eagle_{m}_{s}' for m in ('loss', 'acc', 'feature_loss') for s in (1, 2)} <= set(metrics)
    _, means = evaluate(new['params'], held_out)
    agreement[targets] = {k: float(means[k]) for k in ('medusa_trunk_acc_1', 'eagle_trunk_acc_1',
                                                       'medusa_acc_1', 'eagle_acc_1')}
  for kind in ('medusa', 'eagle'):
    key = f'{kind}_trunk_acc_1'
    assert agreement['trunk'][key] > agreement['data'][key] + 0.02, agreement


def test_train_config_head_options(tmp_path):
  from jax_spec.training import config as config_lib  # pylint: disable=g-import-not-at-top
  cfg = config_lib.TrainConfig(workdir=str(tmp_path), config='tiny', freeze_trunk=True,
                               head_targets='mix', head_targets_mix=0.25, eagle_layers=2,
                               eagle_steps=3, eagle_token_weight=0.5)
  assert config_lib.trainable_filter(cfg) is steps.head_params
  assert config_lib.head_loss(cfg) == losses.HeadLoss(targets='mix', mix=0.25, eagle_steps=3,
                                                      eagle_token_weight=0.5)
  mc = config_lib.make_model_config(cfg, 259)
  assert mc.eagle_layers == 2 and mc.medusa_frozen_trunk
  old = config_lib.TrainConfig(workdir=str(tmp_path), config='tiny', medusa_mode='frozen_trunk')
  assert config_lib.trainable_filter(old) is steps.head_params
  assert config_lib.trainable_filter(cfg.__class__(workdir=str(tmp_path))) is None
  assert config_lib.make_model_config(old, 259).eagle_layers == 0
  for field, value in (('head_targets', 'teacher'), ('head_targets_mix', 2.0), ('eagle_steps', 0),
                       ('eagle_layers', -1)):
    with pytest.raises(ValueError, match=field):
      config_lib.TrainConfig(workdir=str(tmp_path), **{field: value})
