"""The RLE trainer's optimizer: the sigma head's learning-rate multiplier."""
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jax_spec.rle import trainer


def test_sigma_lr_mult_scales_only_the_sigma_head():
  params = {'fc_mu': {'kernel': jnp.zeros((3, 2))},
            'head': {'fc_sigma': {'kernel': jnp.zeros((3, 2)), 'bias': jnp.zeros(2)}}}
  grads = {'fc_mu': {'kernel': jnp.ones((3, 2))},
           'head': {'fc_sigma': {'kernel': jnp.ones((3, 2)), 'bias': jnp.ones(2)}}}

  def first_updates(mult):
    config = trainer.TrainConfig(steps=10, learning_rate=1e-2, warmup_steps=0, weight_decay=0.0,
                                 sigma_lr_mult=mult)
    tx, _ = trainer.make_optimizer(config)
    updates, _ = tx.update(grads, tx.init(params), params)
    return updates

  base, scaled = first_updates(1.0), first_updates(10.0)
  np.testing.assert_allclose(scaled['fc_mu']['kernel'], base['fc_mu']['kernel'], rtol=1e-6)
  for name in ('kernel', 'bias'):
    got = scaled['head']['fc_sigma'][name]
    np.testing.assert_allclose(got, 10.0 * base['head']['fc_sigma'][name], rtol=1e-5)
    assert float(optax.global_norm(got)) > 0
  with pytest.raises(ValueError, match='sigma_lr_mult'):
    trainer.TrainConfig(sigma_lr_mult=0.0)
