"""decoding.prepare: a model split and packed once decodes exactly like the model; the loops take
every kernel weight from the prepared packs (none packed per call); bad arguments."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jax_spec import decoding
from jax_spec import models
from jax_spec.decoding import prepared as prepared_lib
from jax_spec.kernels import rows_matmul

MAX_NEW = 7


def _model(seed, **overrides):
  # Peaked logits (init_std 0.2): a 1-token and a T-token forward never flip a greedy argmax.
  cfg = models.get_config('tiny', init_std=0.2, num_layers=1, eagle_layers=1, **overrides)
  return models.Transformer(cfg, rngs=nnx.Rngs(seed))


def _prompts(vocab):
  return (jax.random.randint(jax.random.key(3), (2, 6), 0, vocab).astype(jnp.int32),
          jnp.array([6, 2], jnp.int32))


def _decode_all(model, draft_model, prompts):
  """Plain decoding and every drafter's greedy chain, from `model` (prepared or not)."""
  outs = {'plain': decoding.generate(model, *prompts, max_new_tokens=MAX_NEW)}
  for drafter in ('medusa', 'mtp', 'eagle'):
    outs[drafter] = decoding.speculative_generate(model, *prompts, drafter=drafter,
                                                  max_new_tokens=MAX_NEW)
  outs['model'] = decoding.speculative_generate(
      model, *prompts, drafter='model', draft_model=None if isinstance(
          model, decoding.PreparedModel) else draft_model, max_new_tokens=MAX_NEW)
  return {k: np.asarray(v.tokens_BN) for k, v in outs.items()}


def test_prepared_model_decodes_like_the_model_and_packs_nothing_per_call(monkeypatch):
  """Same tokens as the model for plain decoding and every drafter; and once prepared, tracing
  the loops packs nothing: each `rows_matmul.matmul` finds its weight's key among the prepared
  packs (a key missing from `decode_matrices_of` would pack per call). Unshared Medusa LM heads:
  the most keys."""
  # Every weight through the kernel (the tiny model's are below its size threshold).
  monkeypatch.setattr(rows_matmul, 'MIN_WEIGHT_SIZE', 0)
  model = _model(0, vocab_size=97, medusa_shared_head=False)
  draft = _model(1, vocab_size=97, mtp_depth=0, medusa_heads=0)
  prompts = _prompts(97)
  prepared = decoding.prepare(model, draft)
  direct = _decode_all(model, draft, prompts)
  if rows_matmul.available():
    assert len(prepared.trunk.packs) == len(models.decode_packs(model)) > 0
    assert len(prepared.draft.packs) == len(models.decode_packs(draft)) > 0

    def no_pack(w):
      raise AssertionError(f'a {w.shape} weight was packed inside the loop')

    monkeypatch.setattr(rows_matmul, 'pack', no_pack)
  from_prepared = _decode_all(prepared, draft, prompts)
  for name, tokens in direct.items():
    np.testing.assert_array_equal(from_prepared[name], tokens, err_msg=name)
    np.testing.assert_array_equal(tokens, direct['plain'], err_msg=name)   # lossless


def test_bf16_drafter_weights_round_the_drafters_matrices_only_and_stay_lossless(monkeypatch):
  """`drafter_dtype=bfloat16`: the target's EAGLE, MTP and Medusa matrices, every draft-model matrix
  are stored rounded to bf16 (and packed as bf16 tiles), everything else is bitwise the model's;
  every drafter's greedy output is still plain decoding's."""
  monkeypatch.setattr(rows_matmul, 'MIN_WEIGHT_SIZE', 0)
  model = _model(0, vocab_size=97)
  draft = _model(1, vocab_size=97, mtp_depth=0, medusa_heads=0)
  prepared = decoding.prepare(model, draft, drafter_dtype=jnp.bfloat16)
  rounded = 0
  for split, original, top in ((prepared.trunk, model, prepared_lib.DRAFTER_MODULES),
                               (prepared.draft, draft, None)):
    want = dict(nnx.to_flat_state(nnx.state(original)))
    for path, leaf in nnx.to_flat_state(split.state):
      value, before = leaf.get_value(), want[path].get_value()
      if (top is None or path[0] in top) and before.ndim >= 2:
        assert value.dtype == jnp.bfloat16, path
        np.testing.assert_array_equal(value, before.astype(jnp.bfloat16), err_msg=str(path))
        rounded += 1
      else:
        assert value.dtype == before.dtype, path
        np.testing.assert_array_equal(value, before, err_msg=str(path))
  assert rounded > 10
  if rows_matmul.available():
    dtypes = [t.dtype for t in prepared.trunk.packs]
    # Per EAGLE / MTP module: its block's four matrices and its combine; the Medusa heads' first
    # blocks side by side.
    assert dtypes.count(jnp.bfloat16) == 5 * (1 + model.config.mtp_depth) + 1
    assert jnp.float32 in dtypes
    assert all(t.dtype == jnp.bfloat16 for t in prepared.draft.packs)
  outs = _decode_all(prepared, draft, _prompts(97))
  for name, tokens in outs.items():
    np.testing.assert_array_equal(tokens, outs['plain'], err_msg=name)
  with pytest.raises(ValueError, match='drafter_dtype must be None or bfloat16'):
    decoding.prepare(model, drafter_dtype=jnp.float16)


def test_bf16_products_round_every_matrix_pack_pair_tiles_and_stay_lossless(monkeypatch):
  """`matmul_dtype=bfloat16`: every matrix of both models stored rounded to bf16 and packed as
  pair tiles (bf16 products) where its input width is even; every drafter's greedy output is
  still plain decoding's (of the same prepared model)."""
  monkeypatch.setattr(rows_matmul, 'MIN_WEIGHT_SIZE', 0)
  model = _model(0, vocab_size=97)
  draft = _model(1, vocab_size=97, mtp_depth=0, medusa_heads=0)
  prepared = decoding.prepare(model, draft, matmul_dtype=jnp.bfloat16)
  assert prepared.matmul_dtype == jnp.bfloat16
  for split in (prepared.trunk, prepared.draft):
    matrices = [leaf.get_value() for _, leaf in nnx.to_flat_state(split.state)
                if leaf.get_value().ndim >= 2]
    assert matrices and all(m.dtype == jnp.bfloat16 for m in matrices)
    if rows_matmul.available():
      assert split.packs and all(t.ndim == 4 and t.dtype == jnp.bfloat16 for t in split.packs)
  outs = _decode_all(prepared, draft, _prompts(97))
  for name, tokens in outs.items():
    np.testing.assert_array_equal(tokens, outs['plain'], err_msg=name)
  with pytest.raises(ValueError, match='matmul_dtype must be None or bfloat16'):
    decoding.prepare(model, matmul_dtype=jnp.float16)


def test_bad_arguments():
  model = _model(0)
  with pytest.raises(ValueError, match='model must be'):
    decoding.prepare('gpt2')
  with pytest.raises(ValueError, match='draft_model must be'):
    decoding.prepare(model, draft_model=object())
  with pytest.raises(ValueError, match='model must be'):
    decoding.generate(object(), *_prompts(259), max_new_tokens=2)
  prepared = decoding.prepare(model)
  with pytest.raises(ValueError, match='draft_model'):
    decoding.speculative_generate(prepared, *_prompts(259), drafter='model', draft_model=model,
                                  max_new_tokens=2)
  with pytest.raises(ValueError, match='packs'):
    models.decode_packs_from((jnp.zeros((1, 1, 1)),) * 99, model)
  assert models.decode_packs_from((), model) == {}
  assert prepared_lib.as_prepared(prepared) is prepared


def test_a_prepared_model_hashes_its_graph_once(monkeypatch):
  """jit hashes its static arguments at every call; a prepared model's GraphDef (whose hash walks
  the whole graph) is hashed when it is prepared, not at each decode call."""
  model = _model(0)
  prepared = decoding.prepare(model)
  prompts = _prompts(model.config.vocab_size)
  decode = lambda: (decoding.generate(prepared, *prompts, max_new_tokens=3),
                    decoding.speculative_generate(prepared, *prompts, drafter='medusa',
                                                  max_new_tokens=3))
  first = decode()   # compiles
  graph_type = type(prepared.trunk.graphdef)
  calls = []
  original = graph_type.__hash__
  monkeypatch.setattr(graph_type, '__hash__', lambda self: calls.append(1) or original(self))
  again = decode()
  assert not calls
  for a, b in zip(first, again):
    np.testing.assert_array_equal(np.asarray(a.tokens_BN), np.asarray(b.tokens_BN))
  assert prepared_lib.StaticGraph(prepared.trunk.graphdef) == prepared.trunk.static   # equal graphs
  assert hash(prepared_lib.StaticGraph(prepared.trunk.graphdef)) == hash(prepared.trunk.static)
