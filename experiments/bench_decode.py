"""Plain decoding's cost per token and per call, fp32 against bf16 products, on random weights.

  python -m experiments.bench_decode --workdir=/tmp/bench_decode --config=base

Builds a `--config` model with random weights, prepares it once per `--matmul_dtypes` entry
(`decoding.prepare(model, matmul_dtype=...)`: 'fp32', or 'bf16' products on CPU), and times
`decoding.generate` of one `--prompt_len`-token prompt at two lengths (`--new_tokens`), every
(storage, length) once per round, interleaved, `--repeats` rounds (the fastest call of each
counts). Prints the per-token cost (the two lengths differenced, so the prefill cancels), the
short call's time (prefill included) and each storage's speedup over the first. Timing does not
depend on the weights' values. Writes results.json into --workdir.
"""
from __future__ import annotations

import json
import os

from absl import flags
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from jax_spec import cli
from jax_spec import decoding
from jax_spec import models
from jax_spec import runtime
from jax_spec.evaluation import cost_model
from jax_spec.evaluation import speculative_benchmark as benchmark_lib

flags.DEFINE_string('workdir', None, 'Output directory.')
flags.DEFINE_string('config', 'small', 'Model preset (random weights).')
flags.DEFINE_list('matmul_dtypes', ['fp32', 'bf16'],
                  f'Products side by side: {tuple(benchmark_lib.MATMUL_DTYPES)}.')
flags.DEFINE_integer('prompt_len', 32, 'Prompt tokens.')
flags.DEFINE_list('new_tokens', ['8', '40'], 'The short and the long call, in new tokens.')
flags.DEFINE_integer('repeats', 5, 'Timed rounds (the fastest call of each counts).')
FLAGS = flags.FLAGS


def measure(model, matmul_dtypes, *, prompt_len, new_tokens, repeats) -> dict:
  """-> {'rows': [{matmul_dtype, ms_per_token, short_call_ms, speedup}]} (see module doc)."""
  short, long = new_tokens
  if not 0 < short < long:
    raise ValueError(f'new_tokens must be (short, long) with 0 < short < long, got {new_tokens}')
  rng = np.random.default_rng(0)
  prompt = jnp.asarray(rng.integers(0, model.config.vocab_size, (1, prompt_len)), jnp.int32)
  lengths = jnp.asarray([prompt_len], jnp.int32)
  cache_len = -(-(prompt_len + long) // 16) * 16   # one cache for both lengths: they difference
  fns = {}
  for dtype in matmul_dtypes:
    prepared = decoding.prepare(model, matmul_dtype=benchmark_lib.MATMUL_DTYPES[dtype])
    for n in new_tokens:
      fns[f'{dtype}@{n}'] = (lambda p=prepared, n=n: decoding.generate(
          p, prompt, lengths, max_new_tokens=n, cache_len=cache_len).tokens_BN)
  times = cost_model.time_interleaved(fns, repeats, 'calls')
  best = {name: min(ts) for name, ts in times.items()}
  rows = []
  for dtype in matmul_dtypes:
    ms = (best[f'{dtype}@{long}'] - best[f'{dtype}@{short}']) / (long - short) * 1e3
    rows.append(dict(matmul_dtype=dtype, ms_per_token=ms,
                     short_call_ms=best[f'{dtype}@{short}'] * 1e3))
  for row in rows:
    row['speedup'] = rows[0]['ms_per_token'] / row['ms_per_token']
  return {'rows': rows}


def main(argv):
  del argv
  if not FLAGS.workdir:
    raise ValueError('--workdir is required')
  unknown = [d for d in FLAGS.matmul_dtypes if d not in benchmark_lib.MATMUL_DTYPES]
  if unknown or not FLAGS.matmul_dtypes:
    raise ValueError(f'--matmul_dtypes must be among {tuple(benchmark_lib.MATMUL_DTYPES)}, '
                     f'got {FLAGS.matmul_dtypes}')
  if len(FLAGS.new_tokens) != 2 or not all(n.isdigit() for n in FLAGS.new_tokens):
    raise ValueError(f'--new_tokens must be two integers (short, long), got {FLAGS.new_tokens}')
  runtime.configure_xla_cpu()
  model = models.Transformer(models.get_config(FLAGS.config), rngs=nnx.Rngs(0))
  results = measure(model, FLAGS.matmul_dtypes, prompt_len=FLAGS.prompt_len,
                    new_tokens=tuple(int(n) for n in FLAGS.new_tokens), repeats=FLAGS.repeats)
  results.update(config=FLAGS.config, prompt_len=FLAGS.prompt_len, new_tokens=FLAGS.new_tokens,
                 backend=jax.default_backend())
  os.makedirs(FLAGS.workdir, exist_ok=True)
  with open(os.path.join(FLAGS.workdir, 'results.json'), 'w') as fh:
    json.dump(results, fh, indent=2)
  short = FLAGS.new_tokens[0]
  for r in results['rows']:
    print(f"{r['matmul_dtype']:5s} {r['ms_per_token']:8.3f} ms per token, "
          f"{r['short_call_ms']:8.1f} ms per call of {short} tokens, {r['speedup']:.2f}x")


if __name__ == '__main__':
  cli.run(main)
