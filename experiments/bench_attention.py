r"""Attention benchmark: this project's kernels against jax.nn.dot_product_attention.

  python -m experiments.bench_attention --seq_lens=1024,4096 --mode=fwd_bwd --causal

Implementations (`--implementations`, unavailable ones are skipped with a log line):
  xla           jax_spec.attention 'xla' (blockwise, custom_vjp; CPU default)
  pallas        jax_spec.attention 'pallas' (pallas_kernels.flash_attention; interpret on CPU)
  reference     materialized softmax (pallas_kernels.reference)
  jax           jax.nn.dot_product_attention (XLA implementation)
  cudnn         jax.nn.dot_product_attention(implementation='cudnn')            [GPU only]
  stock_pallas  jax.experimental.pallas.ops.gpu.attention.mha (K/V repeated for GQA) [GPU only]

Per (seq_len, implementation): compile time, XLA's static peak-memory estimate (configurations
over `--max_memory_gb` are compiled, not run), and the median of `--repeats` interleaved timed
samples, as TFLOP/s; how exactly: jax_spec/evaluation/attention_benchmark.py.
Writes `results.json` and `attention_benchmark.png` into `--output`.
"""
from __future__ import annotations

import datetime
import json
import os

from absl import flags
from absl import logging
import jax
import jax.numpy as jnp

from jax_spec import cli
from jax_spec.evaluation import attention_benchmark as bench_lib
from jax_spec.evaluation.attention_benchmark import AttentionShape

_SHAPE_FIELDS = cli.define_flags(AttentionShape)
flags.DEFINE_list('implementations', None,
                  f'Subset of {",".join(bench_lib.ALL_IMPLEMENTATIONS)} (default: xla,jax on CPU; '
                  'pallas,xla,jax,cudnn,stock_pallas on GPU; pallas,xla,jax on TPU).')
flags.DEFINE_float('max_memory_gb', 6.0,
                   'Configurations whose compiled memory estimate exceeds this are not executed.')
flags.DEFINE_string('output', '/tmp/bench_attention', 'Output directory (results.json, PNG).')
flags.DEFINE_alias('workdir', 'output')

FLAGS = flags.FLAGS


def main(argv):
  del argv
  shape = AttentionShape(**cli.flag_values(AttentionShape, _SHAPE_FIELDS))
  backend = jax.default_backend()
  dtype = jnp.dtype(shape.dtype or ('float32' if backend == 'cpu' else 'bfloat16'))
  num_kv_heads = shape.num_kv_heads or shape.num_heads
  implementations = FLAGS.implementations or bench_lib.default_implementations(backend)
  seq_lens = list(shape.seq_lens)
  os.makedirs(FLAGS.output, exist_ok=True)
  config = dict(seq_lens=seq_lens, batch=shape.batch, batch_tokens=shape.batch_tokens,
                num_heads=shape.num_heads,
                num_kv_heads=num_kv_heads, head_dim=shape.head_dim, dtype=dtype.name,
                causal=shape.causal, mode=shape.mode, repeats=shape.repeats,
                implementations=implementations, max_memory_gb=FLAGS.max_memory_gb)
  logging.info('config %s', config)
  results = bench_lib.run_benchmark(
      seq_lens, implementations, batch=shape.batch, num_heads=shape.num_heads,
      num_kv_heads=num_kv_heads, head_dim=shape.head_dim, dtype=dtype, causal=shape.causal,
      mode=shape.mode, repeats=shape.repeats, max_memory_bytes=FLAGS.max_memory_gb * 2**30,
      seed=shape.seed, batch_tokens=shape.batch_tokens)
  out = dict(date=datetime.datetime.now().isoformat(timespec='seconds'),
             hardware=bench_lib.hardware(), config=config, results=results)
  with open(os.path.join(FLAGS.output, 'results.json'), 'w') as f:
    json.dump(out, f, indent=1)
  batch = f'{shape.batch_tokens} tokens' if shape.batch_tokens else f'b={shape.batch}'
  title = (f'{shape.mode} causal={shape.causal} {batch} h={shape.num_heads} '
           f'kv={num_kv_heads} d={shape.head_dim} {dtype.name} on {out["hardware"]["device_kind"]}')
  bench_lib.plot_results(results, os.path.join(FLAGS.output, 'attention_benchmark.png'), title)
  print(f'{"impl":<13}{"seq_len":>8}{"median s":>11}{"TFLOP/s":>10}{"peak MiB":>11}  executed')
  for r in results:
    if 'memory' not in r:
      print(f'{r["implementation"]:<13}{r["seq_len"]:>8}  failed: {r.get("error", "")[:60]}')
      continue
    t = f'{r["median_s"]:>11.4f}{r["tflops"]:>10.4f}' if r['executed'] else f'{"-":>11}{"-":>10}'
    print(f'{r["implementation"]:<13}{r["seq_len"]:>8}{t}'
          f'{r["memory"].get("peak_estimate", 0) / 2**20:>11.1f}  {r["executed"]}')
  logging.info('wrote %s', FLAGS.output)


if __name__ == '__main__':
  cli.run(main)
