"""Timing and memory of attention implementations (the library part of
experiments.bench_attention and experiments.tune_flash_attention).

Per (seq_len, implementation): the jitted function (forward, or forward + grad w.r.t. q, k, v)
is compiled once; peak memory is read from the compiled executable's `memory_analysis()`:
temp (XLA's scratch buffers: every intermediate of the computation, e.g. score matrices and
residuals saved for the backward) plus arguments plus outputs. It is XLA's static buffer
assignment, not a runtime measurement, so it is available without running; a configuration whose
estimate exceeds `max_memory_bytes` is compiled but not executed (its memory is still reported).
Time: one warm-up call, then `repeats` timed samples, implementations interleaved so that load
from other processes hits them alike; the median is reported. A sample is `n` back-to-back calls
and one block_until_ready, divided by `n`, with `n` chosen from the warm-up so that a sample lasts
about 20 ms (on a GPU a single sub-millisecond call would otherwise time the host's dispatch).
TFLOP/s: forward 4*b*h*q*k*d (halved for causal), backward 2.5x forward (fwd+bwd = 3.5x).
"""
from __future__ import annotations

import dataclasses
import functools
import os
import platform
import subprocess
import time

from absl import logging
import jax
import jax.numpy as jnp
import matplotlib
import numpy as np
from tqdm import tqdm

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top,wrong-import-position

from jax_spec.attention import dot_product_attention  # pylint: disable=wrong-import-position

ALL_IMPLEMENTATIONS = ('xla', 'pallas', 'reference', 'jax', 'cudnn', 'stock_pallas')
GPU_ONLY = ('cudnn', 'stock_pallas')


def _opt(default, help_text, choices=None):
  return dataclasses.field(default=default, metadata={'help': help_text, 'choices': choices})


@dataclasses.dataclass(frozen=True)
class AttentionShape:
  """The benchmarked problem (both attention experiments have one flag per field)."""
  seq_lens: tuple[int, ...] = _opt((1024, 4096), 'Sequence lengths (q_len = kv_len).')
  batch: int = _opt(1, 'Batch size.')
  batch_tokens: int | None = _opt(
      None, 'If set, batch = max(1, batch_tokens // seq_len) per sequence length (constant '
      'tokens per call, as in the FlashAttention papers\' sweeps); overrides --batch.')
  num_heads: int = _opt(8, 'Query heads.')
  num_kv_heads: int | None = _opt(None, 'K/V heads (default: num_heads).')
  head_dim: int = _opt(64, 'Head dimension.')
  dtype: str | None = _opt(None, 'Input dtype (default: float32 on CPU, bfloat16 on GPU/TPU).',
                           ('float32', 'bfloat16', 'float16'))
  causal: bool = _opt(True, 'Causal masking.')
  mode: str = _opt('fwd_bwd', 'Forward only or forward + backward.', ('fwd', 'fwd_bwd'))
  repeats: int = _opt(3, 'Timed calls per configuration (median reported).')
  seed: int = _opt(0, 'Seed of the random normal inputs.')


def attention_flops(batch, num_heads, q_len, kv_len, head_dim, causal, mode):
  fwd = 4 * batch * num_heads * q_len * kv_len * head_dim * (0.5 if causal else 1.0)
  return fwd * (3.5 if mode == 'fwd_bwd' else 1.0)


def default_implementations(backend: str):
  if backend == 'gpu':
    return ['pallas', 'xla', 'jax', 'cudnn', 'stock_pallas']
  if backend == 'tpu':
    return ['pallas', 'xla', 'jax']
  return ['xla', 'jax']  # Pallas interpret mode is far too slow to benchmark on CPU.


def unavailable_reason(name: str, backend: str, dtype) -> str | None:
  if name not in ALL_IMPLEMENTATIONS:
    return f'unknown implementation (choose from {ALL_IMPLEMENTATIONS})'
  if name in GPU_ONLY and backend != 'gpu':
    return f'needs a GPU (default backend is {backend})'
  if name == 'cudnn' and dtype == jnp.float32:
    return 'cuDNN flash attention takes bfloat16/float16 only'
  if name == 'pallas':
    try:
      import pallas_kernels.flash_attention  # pylint: disable=g-import-not-at-top,unused-import
    except ImportError as e:
      return f'pallas_kernels.flash_attention cannot be imported: {e}'
  return None


def attention_fn(name: str, causal: bool, num_heads: int, head_dim: int):
  """`f(q, k, v) -> o` for one implementation, inputs `[B, T, H|K, E]`."""
  if name in ('xla', 'pallas', 'reference'):
    return functools.partial(dot_product_attention, causal=causal, implementation=name)
  if name == 'jax':
    return functools.partial(jax.nn.dot_product_attention, is_causal=causal)
  if name == 'cudnn':
    return functools.partial(jax.nn.dot_product_attention, is_causal=causal,
                             implementation='cudnn')
  if name == 'stock_pallas':
    from jax.experimental.pallas.ops.gpu import attention as stock  # pylint: disable=g-import-not-at-top

    def stock_mha(q, k, v):
      group = num_heads // k.shape[2]
      if group > 1:  # The stock kernel has no GQA: repeat K/V (costs memory, counted).
        k, v = jnp.repeat(k, group, axis=2), jnp.repeat(v, group, axis=2)
      return stock.mha(q, k, v, segment_ids=None, sm_scale=head_dim ** -0.5, causal=causal)
    return stock_mha
  raise ValueError(f'unknown implementation {name!r}')


def benchmark_fn(attn, mode: str):
  """`f(q, k, v, do)`: the output (fwd), or the gradients of `sum(o * do)` w.r.t. q, k, v."""
  if mode == 'fwd':
    return jax.jit(lambda q, k, v, do: attn(q, k, v))
  # do is an argument, not a closed-over constant (XLA would constant-fold it at compile time).
  loss = lambda q, k, v, do: jnp.sum(attn(q, k, v).astype(jnp.float32) * do)
  return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))


def memory_bytes(compiled) -> dict:
  ma = compiled.memory_analysis()
  if ma is None:
    return {}
  out = dict(temp=int(ma.temp_size_in_bytes), arguments=int(ma.argument_size_in_bytes),
             outputs=int(ma.output_size_in_bytes))
  out['peak_estimate'] = out['temp'] + out['arguments'] + out['outputs']
  return out


def hardware() -> dict:
  info = dict(platform=jax.default_backend(), device_kind=jax.devices()[0].device_kind,
              device_count=jax.device_count(), cpu_count=os.cpu_count(),
              machine=platform.machine(), jax=jax.__version__)
  try:
    lscpu = subprocess.run(['lscpu'], capture_output=True, text=True, check=False).stdout
    for line in lscpu.splitlines():
      if line.startswith('Model name'):
        info['cpu_model'] = line.split(':', 1)[1].strip()
  except OSError:
    pass
  return info


def calls_per_sample(seconds_per_call: float, target_s: float = 0.02, max_calls: int = 100) -> int:
  return int(min(max_calls, max(1, round(target_s / max(seconds_per_call, 1e-9)))))


def time_sample(fn, args, n: int) -> float:
  """Seconds per call of `n` back-to-back calls, synchronized once at the end."""
  t0 = time.perf_counter()
  for _ in range(n - 1):
    fn(*args)
  jax.block_until_ready(fn(*args))
  return (time.perf_counter() - t0) / n


def median_seconds(fn, args, repeats: int) -> float:
  """Median seconds per call of a compiled function (after one call that sizes the samples)."""
  n = calls_per_sample(time_sample(fn, args, 1))
  return float(np.median([time_sample(fn, args, n) for _ in range(repeats)]))


def run_benchmark(seq_lens, implementations, *, batch, num_heads, num_kv_heads, head_dim, dtype,
                  causal, mode, repeats, max_memory_bytes, seed=0, batch_tokens=None):
  """Returns a list of result dicts, one per (seq_len, implementation)."""
  backend = jax.default_backend()
  names = []
  for name in implementations:
    reason = unavailable_reason(name, backend, dtype)
    if reason:
      logging.info('skipping %s: %s', name, reason)
    else:
      names.append(name)
  results = []
  progress = tqdm(total=len(seq_lens) * len(names) * (repeats + 2), desc='bench_attention')
  for seq_len in seq_lens:
    if batch_tokens:
      batch = max(1, batch_tokens // seq_len)
    keys = jax.random.split(jax.random.PRNGKey(seed + seq_len), 4)
    q = jax.random.normal(keys[0], (batch, seq_len, num_heads, head_dim), jnp.float32).astype(dtype)
    kv_shape = (batch, seq_len, num_kv_heads, head_dim)
    k = jax.random.normal(keys[1], kv_shape, jnp.float32).astype(dtype)
    v = jax.random.normal(keys[2], kv_shape, jnp.float32).astype(dtype)
    do = jax.random.normal(keys[3], q.shape, jnp.float32)
    flops = attention_flops(batch, num_heads, seq_len, seq_len, head_dim, causal, mode)
    runnable = {}
    for name in names:
      row = dict(implementation=name, seq_len=seq_len, batch=batch, flops=flops, executed=False)
      results.append(row)
      progress.set_postfix_str(f'S={seq_len} {name}: compile')
      try:
        fn = benchmark_fn(attention_fn(name, causal, num_heads, head_dim), mode)
        t0 = time.perf_counter()
        compiled = fn.lower(q, k, v, do).compile()
        row['compile_s'] = time.perf_counter() - t0
      except Exception as e:  # pylint: disable=broad-except
        logging.warning('S=%d %s: compile failed: %s', seq_len, name, e)
        row['error'] = str(e)[:500]
        progress.update(repeats + 2)
        continue
      row['memory'] = memory_bytes(compiled)
      peak = row['memory'].get('peak_estimate', 0)
      progress.update(1)
      if peak > max_memory_bytes:
        logging.info('S=%d %s: memory estimate %.2f GB > --max_memory_gb, not executed',
                     seq_len, name, peak / 2**30)
        progress.update(repeats + 1)
        continue
      row['calls_per_sample'] = calls_per_sample(time_sample(compiled, (q, k, v, do), 1))  # warm-up
      progress.update(1)
      runnable[name] = (compiled, row, [])
    for _ in range(repeats):  # Interleaved, so background load hits every implementation alike.
      for name, (compiled, row, times) in runnable.items():
        progress.set_postfix_str(f'S={seq_len} {name}: run')
        times.append(time_sample(compiled, (q, k, v, do), row['calls_per_sample']))
        progress.update(1)
    for name, (compiled, row, times) in runnable.items():
      row.update(executed=True, times_s=times, median_s=float(np.median(times)),
                 tflops=flops / float(np.median(times)) / 1e12)
      logging.info('S=%d %-12s median %.4f s  %.3f TFLOP/s  peak %.1f MB', seq_len, name,
                   row['median_s'], row['tflops'], row['memory'].get('peak_estimate', 0) / 2**20)
  progress.close()
  return results


def plot_results(results, path, title):
  fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(11, 4.2))
  for name in dict.fromkeys(r['implementation'] for r in results):
    rows = [r for r in results if r['implementation'] == name and 'memory' in r]
    ran = [r for r in rows if r['executed']]
    if ran:
      ax_t.plot([r['seq_len'] for r in ran], [r['median_s'] for r in ran], 'o-', label=name)
    line, = ax_m.plot([r['seq_len'] for r in rows],
                      [r['memory']['peak_estimate'] / 2**20 for r in rows], 'o-', label=name)
    skipped = [r for r in rows if not r['executed']]
    if skipped:
      ax_m.plot([r['seq_len'] for r in skipped],
                [r['memory']['peak_estimate'] / 2**20 for r in skipped], 'o', mfc='none',
                color=line.get_color(), ms=11, label=f'{name} (compiled, not run)')
  for ax, label in ((ax_t, 'median time (s)'), (ax_m, 'peak memory estimate (MiB)')):
    ax.set_xscale('log', base=2)
    ax.set_yscale('log')
    ax.set_xlabel('sequence length')
    ax.set_ylabel(label)
    ax.grid(True, which='both', alpha=0.3)
    ax.legend(fontsize=8)
  fig.suptitle(title, fontsize=10)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
