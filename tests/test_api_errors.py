"""The public Python API rejects text where token ids are expected with a ValueError naming the
argument (not a TypeError from deep inside JAX)."""
import pytest
from flax import nnx

from jax_spec import decoding, models


@pytest.fixture(scope='module')
def model():
  # Abstract parameters suffice: the arguments are checked before anything is computed.
  return nnx.eval_shape(lambda: models.Transformer(models.get_config('tiny', num_layers=1),
                                                   rngs=nnx.Rngs(0)))


@pytest.mark.parametrize('prompts', ['def f():', ['def f():'], [['d', 'e']]])
@pytest.mark.parametrize('sampler', [decoding.generate, decoding.speculative_generate])
def test_text_prompt_is_a_value_error_naming_the_argument(model, sampler, prompts):
  with pytest.raises(ValueError, match=r'prompts_BT must hold integers.*tokenizer\.encode'):
    sampler(model, prompts, [1], max_new_tokens=2)


def test_text_prompt_lengths_is_a_value_error(model):
  with pytest.raises(ValueError, match='prompt_lengths_B must hold integers'):
    decoding.generate(model, [[1, 2]], ['2'], max_new_tokens=2)
