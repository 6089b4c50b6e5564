r"""Sweep the GPU flash-attention kernel's tiles and Triton launch options on one shape.

  python -m experiments.tune_flash_attention --seq_lens=4096 --batch_tokens=16384 --num_heads=16 \
      --head_dim=128 --mode=fwd --repeats=10 --output=/tmp/tune

For every (block_q, block_k, num_warps, num_stages) in the grid: compile
`pallas_kernels.flash_attention` (forward, or forward + gradients), check it on the benchmark's
own random inputs against XLA's materialized attention in fp32 (relative error of the output, and
of dq/dk/dv for fwd_bwd; a config that fails to compile or exceeds `--max_rel_err` is reported, not
timed), then time it like experiments.bench_attention (median of `--repeats` samples of back-to-back
calls). The defaults in pallas_kernels/flash_attention_gpu.py were chosen from these tables
(docs/benchmarks.md). Writes results.json into --output and prints the table, fastest first.
"""
from __future__ import annotations

import itertools
import json
import os
import time

from absl import flags
from absl import logging
import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from jax_spec import cli
from jax_spec.evaluation import attention_benchmark as bench_lib
from jax_spec.evaluation.attention_benchmark import AttentionShape
from pallas_kernels.flash_attention import flash_attention

_SHAPE_FIELDS = cli.define_flags(AttentionShape)
flags.DEFINE_string('output', '/tmp/tune_flash_attention', 'Output directory (results.json).')
flags.DEFINE_list('block_qs', ['64', '128'], 'block_q values.')
flags.DEFINE_list('block_ks', ['32', '64', '128'], 'block_k values.')
flags.DEFINE_list('num_warps', ['4', '8'], 'num_warps values.')
flags.DEFINE_list('num_stages', ['2', '3'], 'num_stages values.')
flags.DEFINE_float('max_rel_err', 2e-2, 'Configs with a larger error against XLA are rejected.')
FLAGS = flags.FLAGS


def rel_err(x, ref) -> float:
  x, ref = np.asarray(x, np.float32), np.asarray(ref, np.float32)
  return float(np.linalg.norm(x - ref) / max(np.linalg.norm(ref), 1e-30))


def main(argv):
  del argv
  shape = AttentionShape(**cli.flag_values(AttentionShape, _SHAPE_FIELDS))
  if len(shape.seq_lens) != 1:
    raise ValueError(f'--seq_lens takes one length here, got {shape.seq_lens}')
  seq_len = shape.seq_lens[0]
  batch = max(1, shape.batch_tokens // seq_len) if shape.batch_tokens else shape.batch
  kv_heads = shape.num_kv_heads or shape.num_heads
  dtype = jnp.dtype(shape.dtype or 'bfloat16')
  keys = jax.random.split(jax.random.PRNGKey(0), 4)
  q = jax.random.normal(keys[0], (batch, seq_len, shape.num_heads, shape.head_dim)).astype(dtype)
  k = jax.random.normal(keys[1], (batch, seq_len, kv_heads, shape.head_dim)).astype(dtype)
  v = jax.random.normal(keys[2], k.shape).astype(dtype)
  do = jax.random.normal(keys[3], q.shape, jnp.float32)
  args = (q, k, v, do)
  flops = bench_lib.attention_flops(batch, shape.num_heads, seq_len, seq_len,
                                          shape.head_dim, shape.causal, shape.mode)
  # The check: XLA's attention on the same (rounded) inputs, upcast to fp32.
  up = lambda *xs: [x.astype(jnp.float32) for x in xs[:3]] + list(xs[3:])
  reference = bench_lib.benchmark_fn(
      bench_lib.attention_fn('jax', shape.causal, shape.num_heads, shape.head_dim),
      shape.mode)
  want = jax.tree.leaves(reference(*up(*args)))

  grid = list(itertools.product(*(map(int, FLAGS[n].value) for n in
                                   ('block_qs', 'block_ks', 'num_warps', 'num_stages'))))
  rows = []
  for block_q, block_k, warps, stages in tqdm(grid, desc='tune'):
    row = dict(block_q=block_q, block_k=block_k, num_warps=warps, num_stages=stages)
    rows.append(row)
    attn = lambda q, k, v, bq=block_q, bk=block_k, w=warps, s=stages: flash_attention(
        q, k, v, causal=shape.causal, block_q=bq, block_k=bk, num_warps=w, num_stages=s)
    try:
      t0 = time.perf_counter()
      compiled = bench_lib.benchmark_fn(attn, shape.mode).lower(*args).compile()
      row['compile_s'] = time.perf_counter() - t0
      got = jax.tree.leaves(jax.block_until_ready(compiled(*args)))
    except Exception as e:  # pylint: disable=broad-except
      row['error'] = str(e).splitlines()[0][:200]
      logging.warning('%s: %s', row, row['error'])
      continue
    row['rel_err'] = max(rel_err(g, w) for g, w in zip(got, want))
    if not row['rel_err'] <= FLAGS.max_rel_err:
      logging.warning('%s: rejected, relative error %.3g', row, row['rel_err'])
      continue
    row['median_s'] = bench_lib.median_seconds(compiled, args, shape.repeats)
    row['tflops'] = flops / row['median_s'] / 1e12

  os.makedirs(FLAGS.output, exist_ok=True)
  config = dict(batch=batch, seq_len=seq_len, num_heads=shape.num_heads,
                num_kv_heads=kv_heads, head_dim=shape.head_dim, dtype=dtype.name,
                causal=shape.causal, mode=shape.mode, device=jax.devices()[0].device_kind)
  with open(os.path.join(FLAGS.output, 'results.json'), 'w') as fh:
    json.dump(dict(config=config, rows=rows), fh, indent=1)
  print(config)
  print(f'{"block_q":>8}{"block_k":>8}{"warps":>6}{"stages":>7}{"ms":>9}{"TFLOP/s":>9}{"rel_err":>10}')
  for r in sorted(rows, key=lambda r: r.get('median_s', float('inf'))):
    timing = (f'{1e3 * r["median_s"]:>9.3f}{r["tflops"]:>9.1f}' if 'median_s' in r
              else f'{"-":>9}{"-":>9}')
    err = f'{r["rel_err"]:>10.2e}' if 'rel_err' in r else f'  {r.get("error", "")[:60]}'
    print(f'{r["block_q"]:>8}{r["block_k"]:>8}{r["num_warps"]:>6}{r["num_stages"]:>7}{timing}{err}')


if __name__ == '__main__':
  cli.run(main)
