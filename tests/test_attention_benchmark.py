"""The attention benchmark's library part (jax_spec.evaluation.attention_benchmark)."""
import jax.numpy as jnp

from jax_spec.evaluation import attention_benchmark as bench_attention


def test_benchmark_smoke(tmp_path):
  results = bench_attention.run_benchmark(
      [48, 96], ['xla', 'reference', 'cudnn'], batch=None, batch_tokens=200, num_heads=2,
      num_kv_heads=1, head_dim=16, dtype=jnp.float32, causal=True, mode='fwd_bwd', repeats=2,
      max_memory_bytes=2**30)
  assert [r['implementation'] for r in results] == ['xla', 'reference'] * 2  # cudnn: no GPU here
  assert [r['batch'] for r in results] == [4, 4, 2, 2]   # 200 tokens // seq_len
  for r in results:
    assert r['executed'] and len(r['times_s']) == 2
    assert r['median_s'] == float(sorted(r['times_s'])[0] + sorted(r['times_s'])[1]) / 2
    assert abs(r['tflops'] - r['flops'] / r['median_s'] / 1e12) <= 1e-12 * r['tflops']
    assert 1 <= r['calls_per_sample'] <= 100
    assert r['memory']['peak_estimate'] >= r['memory']['arguments'] > 0
  assert bench_attention.attention_flops(1, 2, 48, 48, 16, True, 'fwd_bwd') == (
      3.5 * 0.5 * 4 * 2 * 48 * 48 * 16)
  assert bench_attention.calls_per_sample(1e-4) == 100 and bench_attention.calls_per_sample(1.0) == 1
  assert bench_attention.calls_per_sample(0.004) == 5
  bench_attention.plot_results(results, tmp_path / 'plot.png', 'smoke')
  assert (tmp_path / 'plot.png').stat().st_size > 0
