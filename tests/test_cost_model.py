"""The verify cost model (jax_spec.evaluation.cost_model): structure of one tiny run, the
never-agreeing drafter, the profile summary, and option checks. No timing is asserted."""
import json
import math
import re
import os

import jax.numpy as jnp
import pytest

from jax_spec.evaluation import cost_model


def test_tiny_run_structure(tmp_path):
  # The fewest compiles: no trained-head drafter, only the target drafting for itself (a chain of
  # one draft, whose verify is the sweep's T = 2) at full and zero acceptance.
  opts = cost_model.CostOptions(config='tiny', draft_config='tiny', verify_tokens=(1, 2),
                                tree_tokens=(), drafters=(), depth=1, cache_len=48,
                                prefix_len=8, steps=2, repeats=2, prompt_len=6, new_tokens=(3, 6))
  results = cost_model.run_cost_model(opts, str(tmp_path))
  assert {os.path.basename(p) for p in tmp_path.iterdir()} == {'results.json', 'results.md',
                                                               'cost_model.png'}
  assert json.loads((tmp_path / 'results.json').read_text())['drafters'] == results['drafters']
  rows = {(r['mask'], r['tokens']): r for r in results['verify']}
  assert set(rows) == {('chain', 1), ('chain', 2)}
  assert rows[('chain', 1)]['ratio'] == 1.0            # r(1) == 1 by construction
  names = [r['name'] for r in results['drafters']]
  assert names == [cost_model.FULL, cost_model.ZERO]
  by_name = {r['name']: r for r in results['drafters']}
  assert by_name[cost_model.FULL]['tau'] == 2.0        # the target drafting for itself: all accepted
  assert by_name[cost_model.ZERO]['tau'] == 1.0        # never agreeing: nothing accepted
  for r in results['drafters']:
    for key in ('predicted_speedup', 'measured_speedup', 'predicted_step_cost'):
      assert math.isfinite(r[key]), (r['name'], key, r[key])   # tiny parts: timer noise
    assert set(r['cost_parts']) == {'propose', 'verify', 'accept'}
    assert r['identical_to_plain'], r['name']          # lossless at full and at zero acceptance
  for loop in ('plain', 'speculative_full_acceptance'):
    ops = results['profile'][loop]
    assert ops and all(o['self_us'] > 0 and o['calls'] >= 1 for o in ops)
    assert any(o['op'].startswith(('dot', 'fusion', 'copy')) or 'fusion' in o['op'] for o in ops)
  assert f'| {cost_model.ZERO} |' in (tmp_path / 'results.md').read_text()


def test_top_ops_self_time_and_filter():
  trace = {'traceEvents': [
      {'ph': 'M', 'name': 'process_name', 'pid': 1, 'args': {'name': '/host:CPU'}},
      {'ph': 'M', 'name': 'thread_name', 'pid': 1, 'tid': 2, 'args': {'name': 'tf_XLACpuClient/1'}},
      {'ph': 'M', 'name': 'thread_name', 'pid': 1, 'tid': 3, 'args': {'name': 'python'}},
      {'ph': 'X', 'pid': 1, 'tid': 2, 'ts': 0, 'dur': 10, 'name': 'while.1'},
      {'ph': 'X', 'pid': 1, 'tid': 2, 'ts': 1, 'dur': 4, 'name': 'dot.5'},
      {'ph': 'X', 'pid': 1, 'tid': 2, 'ts': 6, 'dur': 3, 'name': 'dot.7'},
      {'ph': 'X', 'pid': 1, 'tid': 2, 'ts': 9, 'dur': 0.5, 'name': 'end: dot.7'},
      {'ph': 'X', 'pid': 1, 'tid': 3, 'ts': 0, 'dur': 99, 'name': 'PjitFunction(f)'},
      {'ph': 'X', 'pid': 1, 'tid': 2, 'ts': 20, 'dur': 50,
       'name': 'ThunkExecutor::Execute (wait for completion)'}]}
  ops = {o['op']: o for o in cost_model.top_ops(trace)}
  assert {k: v['self_us'] for k, v in ops.items()} == {'dot.5': 4, 'dot.7': 3, 'while.1': 3}
  kinds = {o['op']: o for o in cost_model.top_ops(trace, by_kind=True)}
  assert kinds['dot']['self_us'] == 7 and kinds['dot']['calls'] == 2
  assert abs(sum(o['share'] for o in kinds.values()) - 1.0) < 1e-9


@pytest.mark.parametrize('kwargs, match', [
    (dict(config='nope'), 'config'), (dict(drafters=('nope',)), 'drafters'),
    (dict(verify_tokens=(0, 2)), 'verify_tokens'), (dict(new_tokens=(8, 4)), 'new_tokens'),
    (dict(cache_len=64), 'cache_len')])
def test_bad_options(kwargs, match):
  with pytest.raises(ValueError, match=match):
    cost_model.CostOptions(**kwargs)


# --- fused projections (models.layers.fused_dense): the decode path's fewer, larger matmuls ------

def test_fused_projections_match_unfused():
  """One matmul over the concatenated q/k/v (gate/up) kernels gives each layer's own output, with
  biases, GQA shapes and an odd row count; the stored parameters keep their layout."""
  import jax
  import numpy as np
  from flax import nnx
  from jax_spec import models
  from jax_spec.models.layers import fused_dense
  config = models.get_config('tiny', qkv_bias=True)
  model = models.Transformer(config, rngs=nnx.Rngs(3))
  attn, mlp = model.layers[0].attn, model.layers[0].mlp
  for p in (attn.q, attn.k, attn.v):      # non-zero biases, so a dropped bias would show
    p.bias[...] = jax.random.normal(jax.random.key(1), p.bias.shape)
  x = jax.random.normal(jax.random.key(0), (2, 3, config.d_model))
  for denses in ((attn.q, attn.k, attn.v), (mlp.gate, mlp.up)):
    fused = fused_dense(x, denses)
    for d, y in zip(denses, fused):
      np.testing.assert_allclose(y, d(x), rtol=1e-5, atol=1e-5)
  # Checkpoints of the unfused layout load: the parameter tree is the per-projection one.
  paths = {'/'.join(map(str, k)) for k, _ in nnx.to_flat_state(nnx.state(model, nnx.Param))}
  for name in ('attn/q/kernel', 'attn/k/kernel', 'attn/v/kernel', 'attn/q/bias', 'mlp/gate/kernel',
               'mlp/up/kernel'):
    assert f'layers/0/{name}' in paths, name


def test_speculative_loop_lowers_for_cuda():
  """The GPU path still lowers: the whole greedy speculative loop (fused projections, the target
  drafting for itself) exports to CUDA. (The kernels' own Triton lowering is
  tests/test_flash_attention_export.py's; traced on a CPU host, the loop's cache attention is the
  'xla' path.)"""
  import jax
  from flax import nnx
  from jax_spec import decoding, models
  model = models.Transformer(models.get_config('tiny', num_layers=1), rngs=nnx.Rngs(0))

  def loop(prompts_BT, lengths_B):
    return decoding.speculative_generate(model, prompts_BT, lengths_B, drafter='model',
                                         draft_model=model, tree='chain2', max_new_tokens=4).tokens_BN

  args = (jax.ShapeDtypeStruct((1, 5), jnp.int32), jax.ShapeDtypeStruct((1,), jnp.int32))
  exported = jax.export.export(jax.jit(loop), platforms=['cuda'])(*args)
  assert exported.platforms == ('cuda',)
  assert re.search(r'stablehlo\.while', exported.mlir_module())


def _costly(x):
  for _ in range(4):
    x = jnp.tanh(x @ x)
  return x


def _cheap(x):
  return x + 1.0


def _loop_body(i, x):
  return _cheap(_costly(x)) * 0.5


def test_top_regions_attribute_op_time_to_the_source_calls_of_the_loop_body():
  """Through the optimized HLO's stack frames: four 256 x 256 matmuls outweigh an add."""
  import jax
  fn = jax.jit(lambda x: jax.lax.fori_loop(0, 20, _loop_body, x))
  x = jnp.full((256, 256), 0.01, jnp.float32)
  stacks = cost_model.hlo_stacks(fn.lower(x).compile().as_text())
  assert stacks and all(s and len(s[0]) == 3 for s in stacks.values())
  assert any(any(fn_name == '_costly' for _, fn_name, _ in s) for s in stacks.values())
  fn(x).block_until_ready()
  regions = cost_model.top_regions(cost_model.trace_call(lambda: fn(x)), stacks,
                                   anchor='_loop_body')
  by_name = {r['region']: r for r in regions}
  costly = [r for name, r in by_name.items() if name.endswith(': _costly')]
  assert len(costly) == 1, list(by_name)
  assert costly[0]['share'] == max(r['share'] for r in regions) and costly[0]['share'] > 0.5
  assert abs(sum(r['share'] for r in regions) - 1.0) < 1e-6
  assert cost_model.region_of([('a.py', 'f', 1), ('a.py', 'body', 7), ('b.py', 'g', 3)],
                              'body') == '7: g'
  assert cost_model.region_of([('a.py', 'f', 1)], 'body') == 'outside body'
