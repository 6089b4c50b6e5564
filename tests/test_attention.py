"""jax_spec.attention.dot_product_attention: the blockwise 'xla' path, the dispatcher, 'pallas'.

Each compiled case packs several features (odd lengths, q_len != kv_len, GQA/MQA, masks) so the
file stays fast on a small CPU; tiny blocks make every case cross many block boundaries.
"""
import jax
import jax.extend.core
import jax.numpy as jnp
import numpy as np
import pytest

from jax_spec import attention
from jax_spec.attention import BlockwiseOptions, FlashOptions, dot_product_attention
from pallas_kernels.reference import reference_attention

_FAST_COMPILE = {'xla_backend_optimization_level': 0}
# Max error relative to max |reference| against a float64 reference on the same rounded inputs.
TOL = {jnp.float64: 1e-12, jnp.float32: 2e-5, jnp.bfloat16: 3e-2, jnp.float16: 5e-3}


def _inputs(seed, batch, q_len, kv_len, heads, kv_heads, head_dim, dtype, segments=False):
  ks = jax.random.split(jax.random.PRNGKey(seed), 6)
  q = jax.random.normal(ks[0], (batch, q_len, heads, head_dim)).astype(dtype)
  k = jax.random.normal(ks[1], (batch, kv_len, kv_heads, head_dim)).astype(dtype)
  v = jax.random.normal(ks[2], (batch, kv_len, kv_heads, head_dim)).astype(dtype)
  do = jax.random.normal(ks[3], q.shape).astype(dtype)
  dlse = jax.random.normal(ks[4], (batch, heads, q_len))
  ids = {}
  if segments:  # unsorted ids; id 3 exists only on the query side, so some rows see nothing
    ids = dict(q_segment_ids=jax.random.randint(ks[5], (batch, q_len), 0, 4),
               kv_segment_ids=jax.random.randint(ks[4], (batch, kv_len), 0, 3))
  return q, k, v, do, dlse, ids


def _vjp(impl, q, k, v, do, dlse, ids, kw, blocks=None):
  """Output, lse and input cotangents; `blocks=(block_q, block_k)` as the implementation's options."""
  if blocks is not None:
    kw = dict(kw, options={'xla': BlockwiseOptions, 'pallas': FlashOptions}[impl](*blocks))

  def fn(q, k, v, do, dlse, ids):
    (o, lse), vjp = jax.vjp(lambda q, k, v: dot_product_attention(
        q, k, v, return_lse=True, implementation=impl, **ids, **kw), q, k, v)
    # -inf lse rows (no visible key) take no lse cotangent in either implementation.
    return o, lse, vjp((do, jnp.where(jnp.isfinite(lse), dlse, 0.0).astype(lse.dtype)))
  return jax.jit(fn).lower(q, k, v, do, dlse, ids).compile(_FAST_COMPILE)(q, k, v, do, dlse, ids)


def _check(out, ref, tol):
  o, lse, (dq, dk, dv) = out
  o_ref, lse_ref, (dq_ref, dk_ref, dv_ref) = ref
  np.testing.assert_array_equal(np.isfinite(lse), np.isfinite(lse_ref))
  lse, lse_ref = np.where(np.isfinite(lse), lse, 0), np.where(np.isfinite(lse_ref), lse_ref, 0)
  # The reference returns an fp32 lse even for float64 inputs.
  for name, x, y, t in (('o', o, o_ref, tol), ('lse', lse, lse_ref, max(tol, 1e-6)),
                        ('dq', dq, dq_ref, tol), ('dk', dk, dk_ref, tol), ('dv', dv, dv_ref, tol)):
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    assert np.all(np.isfinite(x)), name
    err = np.max(np.abs(x - y)) / max(np.max(np.abs(y)), 1e-6)
    assert err <= t, f'{name}: relative error {err:.3g} > {t}'


# (batch, q_len, kv_len, heads, kv_heads, head_dim, block_q, block_k, options)
CASES = [
    (2, 7, 129, 4, 2, 32, 16, 32, dict()),                                   # GQA, q_len < kv_len
    (1, 129, 60, 3, 3, 64, 32, 16, dict(causal=True)),                       # MHA, rows see nothing
    (1, 300, 300, 4, 1, 32, 64, 32, dict(causal=True, sliding_window=37)),   # MQA, window
    (2, 100, 90, 6, 2, 48, 16, 16, dict(segments=True, logit_soft_cap=3.0, sm_scale=0.3)),
    (1, 64, 77, 2, 1, 256, 16, 16, dict(causal=True, sliding_window=20, segments=True,
                                        logit_soft_cap=1.5)),               # everything at once
    (1, 1, 1, 2, 1, 32, None, None, dict(causal=True)),                     # single token
]


@pytest.mark.parametrize('case', CASES, ids=[f'case{i}' for i in range(len(CASES))])
def test_xla_matches_reference_float64(case):
  """Exact algorithm check: float64 in, float64 accumulators, 1e-12 tolerance."""
  batch, q_len, kv_len, heads, kv_heads, head_dim, bq, bk, opts = case
  opts = dict(opts)
  segments = opts.pop('segments', False)
  with jax.enable_x64(True):
    q, k, v, do, dlse, ids = _inputs(len(str(case)), batch, q_len, kv_len, heads, kv_heads,
                                     head_dim, jnp.float64, segments)
    dlse = dlse.astype(jnp.float32)
    out = _vjp('xla', q, k, v, do, dlse, ids, opts, (bq, bk))
    ref = _vjp('reference', q, k, v, do, dlse, ids, opts)
  _check(out, ref, TOL[jnp.float64])


@pytest.mark.parametrize('dtype', [jnp.bfloat16, jnp.float16])  # fp32: the other tests
def test_xla_low_precision(dtype):
  """fp32 statistics with bf16/fp16 matmuls stay within the dtype's tolerance of float64."""
  opts = dict(causal=True, sliding_window=50)
  q, k, v, do, dlse, ids = _inputs(3, 1, 70, 95, 4, 2, 64, dtype, segments=True)
  out = _vjp('xla', q, k, v, do, dlse, ids, opts, (32, 16))
  assert out[0].dtype == dtype and out[1].dtype == jnp.float32
  assert all(g.dtype == dtype for g in out[2])
  with jax.enable_x64(True):
    up = lambda x: jnp.asarray(np.asarray(x, np.float64))
    ref = _vjp('reference', up(q), up(k), up(v), up(do), dlse, ids, opts)
  _check(out, ref, TOL[dtype])


def test_fully_masked_rows_give_zeros_and_zero_grads():
  q, k, v, do, _, _ = _inputs(0, 1, 40, 8, 2, 1, 32, jnp.float32)
  ids = dict(q_segment_ids=jnp.zeros((1, 40), jnp.int32).at[:, :5].set(7),
             kv_segment_ids=jnp.zeros((1, 8), jnp.int32))
  f = lambda q, k, v: dot_product_attention(q, k, v, causal=True, return_lse=True,
                                            implementation='xla',
                                            options=BlockwiseOptions(16, 16), **ids)

  def fwd_bwd(q, k, v, do):
    (o, lse), vjp = jax.vjp(f, q, k, v)
    return o, lse, vjp((do, jnp.ones_like(lse)))

  # One compile instead of op-by-op dispatch of the forward and backward.
  o, lse, (dq, dk, dv) = jax.jit(fwd_bwd).lower(q, k, v, do).compile(_FAST_COMPILE)(q, k, v, do)
  # Causal with q_len > kv_len: query i sits at key position i - 32, so rows < 32 see nothing;
  # rows 0..4 additionally have a segment id no key has.
  dead = np.arange(40) < 32
  assert np.all(np.asarray(o)[:, dead] == 0) and np.all(np.isneginf(np.asarray(lse)[..., dead]))
  assert np.all(np.asarray(dq)[:, dead] == 0)
  assert np.all(np.isfinite(np.asarray(dk))) and np.all(np.isfinite(np.asarray(dv)))
  assert np.any(np.asarray(o)[:, ~dead] != 0)


def _max_intermediate_size(jaxpr):
  best = 0
  for eqn in jaxpr.eqns:
    for var in eqn.outvars:
      best = max(best, int(np.prod(var.aval.shape)) if hasattr(var.aval, 'shape') else 0)
    for sub in jax.extend.core.jaxprs_in_params(eqn.params):
      best = max(best, _max_intermediate_size(sub))
  return best


def test_xla_memory_is_linear_in_sequence_length():
  """No intermediate of forward or backward (scan/while bodies included) grows like T^2."""
  seq, heads, head_dim = 2048, 2, 16
  q = jax.ShapeDtypeStruct((1, seq, heads, head_dim), jnp.float32)
  loss = lambda impl: lambda q, k, v: jnp.sum(dot_product_attention(
      q, k, v, causal=True, implementation=impl, options=BlockwiseOptions(64, 64))
      if impl == 'xla' else
      dot_product_attention(q, k, v, causal=True, implementation=impl))
  grad_xla = jax.make_jaxpr(jax.grad(loss('xla'), argnums=(0, 1, 2)))(q, q, q)
  grad_ref = jax.make_jaxpr(jax.grad(loss('reference'), argnums=(0, 1, 2)))(q, q, q)
  assert _max_intermediate_size(grad_ref.jaxpr) >= seq * seq  # the check can fail
  assert _max_intermediate_size(grad_xla.jaxpr) <= 2 * seq * heads * head_dim


def test_jit_vmap_and_default_implementation():
  q, k, v, _, _, _ = _inputs(5, 2, 33, 21, 4, 2, 32, jnp.float32)
  on_accelerator = jax.default_backend() in ('gpu', 'tpu')
  assert attention.default_implementation() == ('pallas' if on_accelerator else 'xla')
  options = {'xla': BlockwiseOptions, 'pallas': FlashOptions}[attention.default_implementation()]
  f = jax.jit(jax.vmap(lambda q, k, v: dot_product_attention(
      q[None], k[None], v[None], causal=True, sliding_window=9, options=options(16, 16))[0]))
  out = f.lower(q, k, v).compile(_FAST_COMPILE)(q, k, v)
  ref = reference_attention(q, k, v, causal=True, sliding_window=9)
  np.testing.assert_allclose(out, ref, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize('kwargs,match', [
    (dict(q=np.zeros((2, 4, 8))), 'q must have rank 4'),
    (dict(k=np.zeros((2, 5, 2, 16), np.float32), v=np.zeros((2, 6, 2, 16), np.float32)), 'k and v'),
    (dict(k=np.zeros((2, 5, 3, 16), np.float32), v=np.zeros((2, 5, 3, 16), np.float32)),
     'divisible'),
    (dict(k=np.zeros((2, 5, 2, 8), np.float32), v=np.zeros((2, 5, 2, 8), np.float32)), 'head_dim'),
    (dict(q=np.zeros((2, 4, 4, 16), np.int32)), 'q dtype must be one of float16'),
    (dict(q=np.zeros((2, 4, 4, 16), np.float64)), 'share one dtype'),
    (dict(implementation='pallas', q=np.zeros((2, 4, 4, 16), np.float64),
          k=np.zeros((2, 5, 2, 16), np.float64), v=np.zeros((2, 5, 2, 16), np.float64)),
     'q dtype must be one of float32, bfloat16, float16'),
    (dict(sm_scale=float('nan')), 'sm_scale'),
    (dict(sliding_window=0), 'sliding_window'),
    (dict(sliding_window=2.5), 'sliding_window'),
    (dict(logit_soft_cap=-1.0), 'logit_soft_cap'),
    (dict(q_segment_ids=np.zeros((2, 4), np.int32)), 'together'),
    (dict(q_segment_ids=np.zeros((2, 3), np.int32), kv_segment_ids=np.zeros((2, 5), np.int32)),
     'q_segment_ids must have shape'),
    (dict(q_segment_ids=np.zeros((2, 4)), kv_segment_ids=np.zeros((2, 5))), 'integer'),
    (dict(implementation='cudnn'), 'implementation'),
    (dict(options=BlockwiseOptions(block_q=0)), 'block_q'),
    (dict(options=FlashOptions(interpret=True)), 'options must be BlockwiseOptions'),
    (dict(implementation='pallas', options=BlockwiseOptions()), 'options must be FlashOptions'),
    (dict(implementation='reference', options=BlockwiseOptions()), 'no options'),
])
def test_bad_inputs_raise(kwargs, match):
  args = dict(q=np.zeros((2, 4, 4, 16), np.float32), k=np.zeros((2, 5, 2, 16), np.float32),
              v=np.zeros((2, 5, 2, 16), np.float32), implementation='xla')
  args.update(kwargs)
  q, k, v = args.pop('q'), args.pop('k'), args.pop('v')
  with pytest.raises(ValueError, match=match):
    dot_product_attention(q, k, v, **args)


def test_pallas_route_matches_xla():
  q, k, v, do, dlse, ids = _inputs(7, 1, 19, 33, 2, 1, 32, jnp.float32, segments=True)
  opts = dict(causal=True, logit_soft_cap=5.0)
  pallas = _vjp('pallas', q, k, v, do, dlse, ids, opts, (16, 16))
  xla = _vjp('xla', q, k, v, do, dlse, ids, opts, (16, 16))
  _check(pallas, xla, TOL[jnp.float32])



def test_tune_flash_attention_smoke(tmp_path):
  """The tile sweep checks each config against XLA, times the good ones, records the bad ones."""
  import json  # pylint: disable=g-import-not-at-top
  import os  # pylint: disable=g-import-not-at-top
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  cmd = [sys.executable, '-m', 'experiments.tune_flash_attention', '--seq_lens=40',
         '--batch_tokens=80', '--num_heads=2', '--head_dim=16', '--block_qs=16,24',
         '--block_ks=16', '--num_warps=4', '--num_stages=2', '--repeats=2', '--mode=fwd_bwd',
         f'--output={tmp_path}']
  proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                        env=dict(os.environ, JAX_PLATFORMS='cpu'),
                        cwd=os.path.dirname(os.path.dirname(__file__)))
  assert proc.returncode == 0, proc.stderr[-3000:]
  rows = json.loads((tmp_path / 'results.json').read_text())['rows']
  good, bad = rows
  assert good['block_q'] == 16 and good['rel_err'] < 2e-2 and good['tflops'] > 0
  assert bad['block_q'] == 24 and 'power of two' in bad['error'] and 'tflops' not in bad
