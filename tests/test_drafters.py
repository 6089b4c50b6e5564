"""The Drafter interface: registry, and each drafter's state contract (beyond the end-to-end tests
of tests/test_speculative.py)."""
import re

import jax
import jax.numpy as jnp
import numpy as np

import pytest
from flax import nnx

from jax_spec import models
from jax_spec.decoding import drafters, sampling, trees
from jax_spec.decoding.drafters import draft_model as draft_model_lib
from jax_spec.decoding.acceptance import Accepted


def test_registry_holds_every_drafter_module():
  registered = drafters.registered()
  assert {'medusa', 'mtp', 'model'} <= set(registered)
  assert all(issubclass(cls, drafters.Drafter) and cls.name == name
             for name, cls in registered.items())
  with pytest.raises(ValueError, match='already registered'):
    drafters.register(registered['medusa'])


def test_finished_rows_draft_cache_stops_growing():
  """Row 1 is finished: propose still runs on it (fixed shapes), but after update its draft cache
  length is its committed length again, step after step; row 0 keeps root + min(a, gamma - 1)."""
  model = models.Transformer(models.get_config('tiny', num_layers=1), rngs=nnx.Rngs(0))
  gamma, steps = 3, 3
  drafter = drafters.registered()['model'](tree=trees.chain(gamma),
                                           sampling=sampling.SamplingConfig(), sample_drafts=False,
                                           cache_len=32)
  prompts_BT = jnp.array([[1, 2, 3, 4], [5, 6, 7, 0]], jnp.int32)
  lengths_B = jnp.array([4, 3], jnp.int32)
  active_B = jnp.array([True, False])
  accepted_S = jnp.array([1, gamma, 0])       # row 0's accepted drafts per step

  @jax.jit
  def run(prompts_BT, lengths_B):
    ctx = drafters.Context(model, model)
    outs, _ = models.prefill(model, prompts_BT, lengths_B, models.init_cache(model, 2, 32))
    root_B = jnp.argmax(outs.logits_BTV[jnp.arange(2), lengths_B - 1], -1).astype(jnp.int32)
    state = drafter.init(ctx, drafters.Prefill(outs, prompts_BT, lengths_B, root_B, None))
    position_B, seen = lengths_B, []
    for step in range(steps):
      candidates, state = drafter.propose(ctx, state, root_B, None)
      num_B = jnp.where(active_B, accepted_S[step], 0)
      path_BP = jnp.broadcast_to(jnp.arange(gamma + 1), (2, gamma + 1))
      acc = Accepted(num_B, path_BP, root_B)
      state = drafter.update(ctx, state, drafters.Verify(
          None, candidates.tokens_BT, acc, active_B, num_B, position_B, None))
      seen.append((state.cache.lengths, position_B))
      position_B = position_B + jnp.where(active_B, num_B + 1, 0)
    return seen

  for step, (cache_len_B, position_B) in enumerate(run(prompts_BT, lengths_B)):
    cache_len_B, position_B = np.asarray(cache_len_B), np.asarray(position_B)
    assert cache_len_B[1] == 3, (step, cache_len_B)          # never grows
    assert cache_len_B[0] == position_B[0] + 1 + min(int(accepted_S[step]), gamma - 1)


def test_benchmark_resolves_dynamic_trees():
  from jax_spec.decoding import dynamic_tree   # pylint: disable=g-import-not-at-top
  from jax_spec.evaluation import speculative_benchmark   # pylint: disable=g-import-not-at-top
  assert (speculative_benchmark.resolve_tree('dynamic:6:2', 3)
          == dynamic_tree.DynamicTree(num_draft_nodes=6, branching=2, depth=3))
  assert speculative_benchmark.resolve_tree('chain', 3).is_chain


@pytest.mark.parametrize('tree', ['chain', 'dynamic:3:2'])
def test_cache_len_is_sized_by_each_drafter(monkeypatch, tree):
  """Per drafter: the default cache_len is the minimum that the too-small error names, rounded up
  to a multiple of 16; one slot less than the minimum is a ValueError naming cache_len and the
  drafter; the minimum covers the trunk's tree and the drafter's own scratch past the committed
  tokens. No loop runs (`_speculative` stubbed);
  tests/test_speculative.py and test_eagle_decoding.py decode at the default sizes."""
  from jax_spec.decoding import speculative as spec   # pylint: disable=g-import-not-at-top
  model = models.Transformer(models.get_config('tiny', num_layers=1, eagle_layers=1),
                             rngs=nnx.Rngs(0))
  prompts_BT, lengths_B, max_new = jnp.ones((2, 5), jnp.int32), jnp.array([5, 2], jnp.int32), 6
  monkeypatch.setattr(spec, '_speculative', lambda *args, settings: settings.drafter)
  # Other test modules register drafters of their own in this process (e.g. cost_model's
  # 'model_never_agreeing'): any drafter that drafts with a separate model gets one.
  for name, cls in drafters.registered().items():
    separate = issubclass(cls, draft_model_lib.DraftModelDrafter)
    kw = dict(drafter=name, draft_model=model if separate else None, tree=tree,
              max_new_tokens=max_new)
    with pytest.raises(ValueError, match=rf"cache_len=1 is too small: .*drafter='{name}' needs"
                       ) as too_small:
      spec.speculative_generate(model, prompts_BT, lengths_B, cache_len=1, **kw)
    needed = int(re.search(r'needs (\d+) slots', str(too_small.value)).group(1))
    drafter = spec.speculative_generate(model, prompts_BT, lengths_B, **kw)
    assert drafter.cache_len == -(-needed // 16) * 16, name   # the minimum, in 16s
    with pytest.raises(ValueError, match=rf"cache_len={needed - 1} is too small: .* needs "
                                         rf"{needed} slots"):
      spec.speculative_generate(model, prompts_BT, lengths_B, cache_len=needed - 1, **kw)
    assert spec.speculative_generate(model, prompts_BT, lengths_B, cache_len=needed,
                                     **kw).cache_len == needed
    # A row commits at most 5 + max_new + depth - 1 tokens; a step writes the trunk's tree and
    # the drafter's scratch past them (rows that finished still run it: fixed shapes).
    resolved = drafter.tree
    own = cls.extra_cache_slots(model, resolved)
    assert needed >= 5 + max_new + resolved.max_depth - 1 + max(resolved.num_nodes, own), name
    assert own >= (0 if name == 'medusa' else resolved.max_depth), name
