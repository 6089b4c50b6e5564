"""KV cache decoding == full causal forward (trunk, MTP modules, Medusa heads); tree commit."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jax_spec import models as M
from jax_spec.kernels import rows_matmul

ATOL = RTOL = 2e-4
SEQ = 20  # full-sequence length used for the reference forward
MAX_LEN = 28


@pytest.fixture(scope='module')
def setup():
  # GQA (4 heads over 2 KV heads), 2 MTP modules, 2 Medusa heads; random non-zero Medusa weights.
  cfg = M.get_config('tiny', mtp_depth=3, medusa_heads=2, d_model=32, d_ff=64, vocab_size=61)
  model = M.Transformer(cfg, rngs=nnx.Rngs(0))
  for head in model.medusa:
    for res in head.res:
      res.kernel[...] = 0.2 * jax.random.normal(jax.random.key(1), res.kernel.shape)
  graphdef, state = nnx.split(model)
  return cfg, graphdef, state


def _merge(fn):
  """Turns fn(model, ...) into a jitted fn(graphdef, state, ...)."""
  @functools.partial(jax.jit, static_argnums=0)
  def wrapped(graphdef, state, *args):
    return fn(nnx.merge(graphdef, state), *args)
  return wrapped


def _np(tree):
  """Host copies: indexing numpy avoids compiling one slice op per index on the device."""
  return jax.tree.map(np.asarray, tree)


full_forward = _merge(lambda m, toks: m(toks))
prefill = _merge(M.prefill)
extend = _merge(M.extend)
commit = jax.jit(M.commit)
mtp_draft = _merge(M.mtp_draft)


def _chain(batch, num):
  depths = jnp.broadcast_to(jnp.arange(num, dtype=jnp.int32), (batch, num))
  mask = jnp.broadcast_to(jnp.tril(jnp.ones((num, num), bool)), (batch, num, num))
  return depths, mask


def _check_drafts(graphdef, state, seq, n_new, next_tok, draft):
  """Draft k must equal the full forward's MTP logits at n'-1 on committed ++ next ++ drafts."""
  seq, draft = np.array(seq), _np(draft)
  toks = np.array(seq)
  for b in range(seq.shape[0]):
    n = int(n_new[b])
    toks[b, n] = int(next_tok[b])
    d = np.array(draft.tokens_BJ[b])
    toks[b, n + 1:n + len(d)] = d[:-1]
  ref = _np(full_forward(graphdef, state, jnp.asarray(toks)))
  for b in range(seq.shape[0]):
    n = int(n_new[b])
    np.testing.assert_allclose(draft.logits_BJV[b], ref.mtp_logits_JBTV[:, b, n - 1],
                               atol=ATOL, rtol=RTOL)
    np.testing.assert_array_equal(draft.tokens_BJ[b], np.argmax(draft.logits_BJV[b], -1))


def test_prefill_then_decode_matches_full_forward(setup, monkeypatch):
  cfg, graphdef, state = setup
  # MTP windows (A + D - 1 = 5 positions) go through the decode attention in chunks of 4 here.
  monkeypatch.setattr(M.kv_cache, 'MAX_NEW_TOKENS_PER_CALL', 4)
  batch = 3
  seq = jax.random.randint(jax.random.key(2), (batch, SEQ), 0, cfg.vocab_size)
  ref = _np(full_forward(graphdef, state, seq))
  prompt_lengths = jnp.array([3, 1, 2], jnp.int32)
  # Right-padded prompts: garbage after each prompt must not leak into anything. Same width as
  # the decode chains below, so mtp_draft compiles once.
  prompt_T = 3
  pad = jax.random.randint(jax.random.key(3), (batch, prompt_T), 0, cfg.vocab_size)
  prompts = jnp.where(jnp.arange(prompt_T) < prompt_lengths[:, None], seq[:, :prompt_T], pad)
  model = nnx.merge(graphdef, state)
  cache = M.init_cache(model, batch, MAX_LEN)
  mcache = M.init_mtp_cache(model, batch, MAX_LEN)
  out, cache = prefill(graphdef, state, prompts, prompt_lengths, cache)
  out_np = _np(out)
  for b, p in enumerate(np.array(prompt_lengths)):
    np.testing.assert_allclose(out_np.logits_BTV[b, :p], ref.logits_BTV[b, :p], atol=ATOL,
                               rtol=RTOL)
    np.testing.assert_allclose(out_np.hidden_BTD[b, :p], ref.hidden_BTD[b, :p], atol=ATOL,
                               rtol=RTOL)
    np.testing.assert_allclose(out_np.medusa_logits_JBTV[:, b, :p],
                               ref.medusa_logits_JBTV[:, b, :p], atol=ATOL, rtol=RTOL)
  np.testing.assert_array_equal(cache.lengths, prompt_lengths)
  next_tok = seq[jnp.arange(batch), prompt_lengths]
  draft, mcache = mtp_draft(graphdef, state, mcache, out.hidden_BTD, prompts, prompt_lengths,
                            next_tok)
  _check_drafts(graphdef, state, seq, prompt_lengths, next_tok, draft)

  # Then decode: chains of 3 candidates (the true tokens) with a different acceptance per row,
  # including 0 (a frozen row) and single tokens.
  accept_schedule = [[1, 1, 1], [3, 2, 0], [2, 3, 1], [1, 0, 3], [3, 3, 2]]
  depths, mask = _chain(batch, 3)
  rows = jnp.arange(batch)
  for accepted in accept_schedule:
    accepted = jnp.array(accepted, jnp.int32)
    n = cache.lengths
    cand = seq[rows[:, None], n[:, None] + jnp.arange(3)]
    out, cache = extend(graphdef, state, cand, depths, mask, cache)
    out_np = _np(out)
    for b in range(batch):
      nb = int(n[b])
      np.testing.assert_allclose(out_np.logits_BTV[b], ref.logits_BTV[b, nb:nb + 3], atol=ATOL,
                                 rtol=RTOL)
      np.testing.assert_allclose(out_np.hidden_BTD[b], ref.hidden_BTD[b, nb:nb + 3], atol=ATOL,
                                 rtol=RTOL)
      np.testing.assert_allclose(out_np.medusa_logits_JBTV[:, b],
                                 ref.medusa_logits_JBTV[:, b, nb:nb + 3], atol=ATOL, rtol=RTOL)
    path = jnp.broadcast_to(jnp.arange(3, dtype=jnp.int32), (batch, 3))
    cache = commit(cache, path, accepted)
    np.testing.assert_array_equal(cache.lengths, n + accepted)
    next_tok = seq[rows, cache.lengths]
    draft, mcache = mtp_draft(graphdef, state, mcache, out.hidden_BTD, cand, accepted, next_tok)
    np.testing.assert_array_equal(mcache.lengths, cache.lengths)
    _check_drafts(graphdef, state, seq, cache.lengths, next_tok, draft)
  assert int(cache.lengths.max()) <= SEQ - 4


def test_tree_extend_commit_equals_direct_path(setup):
  cfg, graphdef, state = setup
  batch = 3  # shapes shared with the test above: one compile per function
  seq = jax.random.randint(jax.random.key(5), (batch, SEQ), 0, cfg.vocab_size)
  model = nnx.merge(graphdef, state)
  prompt_lengths = jnp.array([4, 6, 1], jnp.int32)
  _, cache0 = prefill(graphdef, state, seq[:, :6], prompt_lengths,
                      M.init_cache(model, batch, MAX_LEN))
  # Tree: 0 root; 1, 2 children of 0; 3 child of 1; 4 child of 2; 5 child of 4.
  parents = [-1, 0, 0, 1, 2, 4]
  num = len(parents)
  anc = np.zeros((num, num), bool)
  depth = np.zeros(num, np.int32)
  for t, p in enumerate(parents):
    anc[t, t] = True
    if p >= 0:
      anc[t] |= anc[p]
      depth[t] = depth[p] + 1
  tree_tokens = jax.random.randint(jax.random.key(6), (batch, num), 0, cfg.vocab_size)
  depths = jnp.broadcast_to(jnp.asarray(depth), (batch, num))
  mask = jnp.broadcast_to(jnp.asarray(anc), (batch, num, num))
  out_tree, cache_tree = extend(graphdef, state, tree_tokens, depths, mask, cache0)
  path = jnp.array([[0, 2, 4], [0, 1, 3], [0, 2, 0]], jnp.int32)
  accepted = jnp.array([3, 2, 1], jnp.int32)
  cache_tree = commit(cache_tree, path, accepted)

  path_tokens = jnp.take_along_axis(tree_tokens, path, axis=1)
  cdepths, cmask = _chain(batch, 3)
  out_path, cache_path = extend(graphdef, state, path_tokens, cdepths, cmask, cache0)
  cache_path = commit(cache_path, jnp.broadcast_to(jnp.arange(3, dtype=jnp.int32), (batch, 3)),
                      accepted)
  np.testing.assert_array_equal(cache_tree.lengths, prompt_lengths + accepted)
  np.testing.assert_array_equal(cache_tree.lengths, cache_path.lengths)
  ct, cp, ot, op, path = _np((cache_tree, cache_path, out_tree, out_path, path))
  for b in range(batch):
    a, length = int(accepted[b]), int(ct.lengths[b])
    for lt, lp in zip(ct.layers, cp.layers, strict=True):
      np.testing.assert_allclose(lt.k[b, :length], lp.k[b, :length], atol=ATOL)
      np.testing.assert_allclose(lt.v[b, :length], lp.v[b, :length], atol=ATOL)
    np.testing.assert_allclose(ot.logits_BTV[b, path[b, :a]], op.logits_BTV[b, :a], atol=ATOL,
                               rtol=RTOL)
    np.testing.assert_allclose(ot.hidden_BTD[b, path[b, :a]], op.hidden_BTD[b, :a], atol=ATOL,
                               rtol=RTOL)
  # The continued decode sees the same state.
  o1, _ = extend(graphdef, state, seq[:, 10:13], cdepths, cmask, cache_tree)
  o2, _ = extend(graphdef, state, seq[:, 10:13], cdepths, cmask, cache_path)
  np.testing.assert_allclose(o1.logits_BTV, o2.logits_BTV, atol=ATOL, rtol=RTOL)
  # Off-path candidates leave no trace: change them and the committed cache is unchanged.
  other = tree_tokens.at[0, 1].set((tree_tokens[0, 1] + 1) % cfg.vocab_size)
  other = other.at[0, 3].set((tree_tokens[0, 3] + 1) % cfg.vocab_size)
  _, cache_other = extend(graphdef, state, other, depths, mask, cache0)
  cache_other = commit(cache_other, path, accepted)
  for lo, lt in zip(cache_other.layers, ct.layers, strict=True):
    np.testing.assert_allclose(np.asarray(lo.k)[0, :7], lt.k[0, :7], atol=1e-6)


def _fake_next(tok):
  return (tok + 3) % 31


def test_decode_step_compiles_once(setup):
  cfg = setup[0].replace(num_layers=1, mtp_depth=1, medusa_heads=0)
  graphdef, state = nnx.split(M.Transformer(cfg, rngs=nnx.Rngs(0)))
  batch = 2
  traces = []

  @jax.jit
  def step(state, cache, mcache, tokens_BT, next_B):
    traces.append(1)
    model = nnx.merge(graphdef, state)
    depths, mask = _chain(batch, 2)
    out, cache = M.extend(model, tokens_BT, depths, mask, cache)
    accepted = jnp.array([2, 1], jnp.int32)
    cache = M.commit(cache, jnp.broadcast_to(jnp.arange(2, dtype=jnp.int32), (batch, 2)), accepted)
    draft, mcache = M.mtp_draft(model, mcache, out.hidden_BTD, tokens_BT, accepted, next_B)
    return cache, mcache, draft.tokens_BJ

  model = nnx.merge(graphdef, state)
  cache = M.init_cache(model, batch, MAX_LEN)
  mcache = M.init_mtp_cache(model, batch, MAX_LEN)
  tok = jnp.array([1, 2], jnp.int32)
  for _ in range(4):
    cand = jnp.stack([tok, (tok + 1) % cfg.vocab_size], axis=1)
    cache, mcache, drafts = step(state, cache, mcache, cand, _fake_next(tok))
    tok = drafts[:, 0]
  assert len(traces) == 1
  np.testing.assert_array_equal(cache.lengths, [8, 4])


# Max error relative to max |full forward| (the attention tests' tolerances for these dtypes).
LOW_PRECISION_TOL = {'bf16': 3e-2, 'fp16': 5e-3}


@pytest.mark.parametrize('policy', ['bf16', 'fp16'])
def test_low_precision_decode_matches_full_forward(setup, policy):
  """prefill + extend in bf16/fp16 give the full forward's logits, hidden states and Medusa logits
  (at that dtype's tolerance), with fp32 parameters, a compute-dtype cache and fp32 logits."""
  cfg, _, _ = setup
  cfg = cfg.replace(num_layers=1, mtp_depth=1, medusa_heads=1)
  model = M.Transformer(cfg, policy=policy, rngs=nnx.Rngs(0))
  graphdef, state = nnx.split(model)
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state))
  rows = jnp.arange(2)

  @jax.jit
  def run(state, tokens, prompt_lengths):
    model = nnx.merge(graphdef, state)
    full = model(tokens)
    _, cache = M.prefill(model, tokens[:, :4], prompt_lengths, M.init_cache(model, 2, MAX_LEN))
    new = tokens[rows[:, None], prompt_lengths[:, None] + jnp.arange(2)]
    out, cache = M.extend(model, new, *_chain(2, 2), cache)
    return full, out, cache

  tokens = jax.random.randint(jax.random.key(0), (2, 8), 0, cfg.vocab_size)
  prompt_lengths = jnp.array([4, 2], jnp.int32)   # row 1 is right-padded
  full, out, cache = _np(run(state, tokens, prompt_lengths))
  assert all(c.k.dtype == c.v.dtype == model.policy.compute_dtype for c in cache.layers)
  assert full.logits_BTV.dtype == np.float32 and out.logits_BTV.dtype == np.float32
  tol = LOW_PRECISION_TOL[policy]
  for b, n in enumerate(np.asarray(prompt_lengths)):
    for name, got, want in (
        ('logits', out.logits_BTV[b], full.logits_BTV[b, n:n + 2]),
        ('hidden', out.hidden_BTD[b], full.hidden_BTD[b, n:n + 2]),
        ('medusa', out.medusa_logits_JBTV[:, b], full.medusa_logits_JBTV[:, b, n:n + 2])):
      assert np.all(np.isfinite(got)), name
      err = np.max(np.abs(got.astype(np.float64) - want)) / np.max(np.abs(want))
      assert err < tol, (policy, name, b, err)
  assert np.all(np.isfinite(full.mtp_logits_JBTV))


def test_bad_decode_inputs_raise(setup):
  cfg, graphdef, state = setup
  model = nnx.merge(graphdef, state)
  cache = M.init_cache(model, 2, 8)
  with pytest.raises(ValueError, match='max_len'):
    M.prefill(model, jnp.zeros((2, 9), jnp.int32), jnp.array([1, 1]), cache)
  with pytest.raises(ValueError, match='tree_mask_BTT'):
    M.extend(model, jnp.zeros((2, 3), jnp.int32), jnp.zeros((2, 3), jnp.int32),
             jnp.ones((2, 3, 2), bool), cache)
  with pytest.raises(ValueError, match='batch_size'):
    M.init_cache(model, 0, 8)
  plain = M.Transformer(cfg.replace(mtp_depth=0, medusa_heads=0), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match='mtp_depth'):
    M.init_mtp_cache(plain, 2, 8)
  with pytest.raises(ValueError, match='Medusa'):
    M.medusa_logits(plain, jnp.zeros((1, 1, cfg.d_model)))


def test_advance_equals_commit_of_a_chain_prefix():
  rng = np.random.RandomState(0)
  k = jnp.asarray(rng.randn(2, 3, 12, 1, 4), jnp.float32)
  cache = M.KVCache(tuple(M.LayerCache(k_l, -k_l) for k_l in k), jnp.array([2, 5, 0], jnp.int32))
  num_B = jnp.array([3, 0, 1], jnp.int32)
  path_BA = jnp.broadcast_to(jnp.arange(4, dtype=jnp.int32), (3, 4))
  ref = M.commit(cache, path_BA, num_B)
  out = M.advance(cache, num_B)
  for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(ref), strict=True):
    np.testing.assert_array_equal(a, b)
  np.testing.assert_array_equal(out.lengths, [5, 5, 1])
  with pytest.raises(ValueError, match='num_accepted_B'):
    M.advance(cache, jnp.ones((2,), jnp.int32))


@pytest.mark.parametrize('shared_head, num_layers', [(True, 1), (False, 2)])
def test_decode_medusa_logits_match_the_heads(monkeypatch, shared_head, num_layers):
  """The decode path (every head's first block in one kernel matmul, one LM head call) computes
  `medusa_logits`; both matmuls go through the kernel (the HLO names it)."""
  monkeypatch.setattr(rows_matmul, 'MIN_WEIGHT_SIZE', 0)
  cfg = M.get_config('tiny', medusa_heads=3, medusa_num_layers=num_layers,
                     medusa_shared_head=shared_head, d_model=32, d_ff=64, vocab_size=61)
  model = M.Transformer(cfg, rngs=nnx.Rngs(0))
  for i, head in enumerate(model.medusa):
    for j, res in enumerate(head.res):
      res.kernel[...] = 0.3 * jax.random.normal(jax.random.key(10 * i + j), res.kernel.shape)
      res.bias[...] = 0.1 * jax.random.normal(jax.random.key(100 + 10 * i + j), res.bias.shape)
  hidden_BTD = jax.random.normal(jax.random.key(7), (2, 3, cfg.d_model))
  decode = _merge(lambda m, h: m.decode_medusa_logits(h))
  graphdef, state = nnx.split(model)
  assert decode.lower(graphdef, state, hidden_BTD).as_text().count('jax_spec_rows_matmul') == (
      2 if shared_head else 1 + cfg.medusa_heads)
  np.testing.assert_allclose(decode(graphdef, state, hidden_BTD), model.medusa_logits(hidden_BTD),
                             atol=1e-5, rtol=1e-5)


def test_cpu_prefill_by_extend_chunks_matches_the_trunk_forward(monkeypatch):
  """On CPU an fp32 prefill runs as causal `extend` chunks of <= 128 tokens (the decode kernel);
  its logits, hidden states, Medusa logits and cache entries match the trunk's full forward (the
  path with the kernel switched off), across a chunk boundary and with ragged prompts."""
  cfg = M.get_config('tiny', medusa_heads=2, max_seq_len=256)
  model = M.Transformer(cfg, rngs=nnx.Rngs(3))
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 140)), jnp.int32)
  lengths = jnp.asarray([140, 97], jnp.int32)

  def run():
    fn = jax.jit(lambda t, n: M.prefill(model, t, n, M.init_cache(model, 2, 160)))
    return fn.lower(tokens, lengths).as_text(), fn(tokens, lengths)

  text, (outs, cache) = run()
  assert text.count('jax_spec_block_decode') == 2 * cfg.num_layers    # two chunks per layer
  monkeypatch.setenv('JAX_SPEC_BLOCK_DECODE', '0')
  text_ref, (want, want_cache) = run()
  assert 'jax_spec_block_decode' not in text_ref
  np.testing.assert_array_equal(cache.lengths, want_cache.lengths)
  for b, n in enumerate(np.asarray(lengths)):   # past a prompt's end only padding differs
    np.testing.assert_allclose(outs.logits_BTV[b, :n], want.logits_BTV[b, :n], atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(outs.hidden_BTD[b, :n], want.hidden_BTD[b, :n], atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(outs.medusa_logits_JBTV[:, b, :n], want.medusa_logits_JBTV[:, b, :n],
                               atol=1e-4, rtol=1e-4)
    for layer, want_layer in zip(cache.layers, want_cache.layers):
      np.testing.assert_allclose(layer.k[b, :n], want_layer.k[b, :n], atol=1e-4, rtol=1e-4)
      np.testing.assert_allclose(layer.v[b, :n], want_layer.v[b, :n], atol=1e-4, rtol=1e-4)
