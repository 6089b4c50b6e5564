"""What a verify step costs: one trunk `extend` of a T-token chain vs a one-token decode step.

  python -m experiments.bench_verify --workdir=/tmp/bench_verify --config=small

Speculative decoding wins when verifying T = (draft nodes + 1) tokens costs little more than
decoding one. This measures that ratio r(T) for a preset on the current backend, with the
sampler's own chain verify path (`models.extend` with a causal mask, then `models.advance`) in a
jitted `fori_loop` over a warm KV cache, so the per-step time excludes dispatch. Weights are random
(timing does not depend on their values). Variants are compiled first and timed interleaved.

Reported per precision and T: ms per step, r(T) = step(T) / step(1), which is also the break-even
tau (a speculative step must emit r(T) tokens to pay for itself), and T / r(T), the speedup
ceiling of a chain of T - 1 drafts that are always accepted (drafting cost excluded).
Writes results.json, results.md and verify_cost.png into --workdir.
"""
from __future__ import annotations

import json
import os
import platform
import statistics
import time

import jax
import jax.numpy as jnp
from absl import flags
from absl import logging
import matplotlib
from flax import nnx

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top,wrong-import-position

from jax_spec import cli  # pylint: disable=wrong-import-position
from jax_spec import models
from jax_spec import precision as precision_lib
from jax_spec import runtime
from jax_spec.models import kv_cache
from jax_spec.training.state import build_model

flags.DEFINE_string('workdir', None, 'Output directory.')
flags.DEFINE_string('config', 'small', 'Model preset.')
flags.DEFINE_list('precisions', ['fp32', 'bf16'], 'Compute precisions.')
flags.DEFINE_list('tokens', ['1', '2', '4', '8', '16'], 'Tokens per verify step (T).')
flags.DEFINE_integer('cache_len', 512, 'KV cache slots.')
flags.DEFINE_integer('prefix_len', 128, 'Committed tokens in the cache before the timed steps.')
flags.DEFINE_integer('steps', 32, 'Verify steps per timed call.')
flags.DEFINE_integer('repeats', 7, 'Timed calls per variant (the median is reported).')
flags.DEFINE_bool('ynn_dots', False, 'Keep XLA:CPU\'s YNNPACK dot fusion (default: opt out, as the '
                  'decoding experiments do; see jax_spec/runtime.py).')
FLAGS = flags.FLAGS


def make_verify_loop(model, num_tokens: int, cache_len: int, prefix_len: int, steps: int):
  """A jitted function of the model state running `steps` verify steps of `num_tokens` tokens."""
  graphdef, state = nnx.split(model)
  depths_BT = jnp.arange(num_tokens, dtype=jnp.int32)[None]
  mask_BTT = jnp.tril(jnp.ones((num_tokens, num_tokens), bool))[None]

  @jax.jit
  def run(state):
    m = nnx.merge(graphdef, state)
    cache = models.init_cache(m, 1, cache_len).replace(lengths=jnp.array([prefix_len], jnp.int32))

    def body(_, carry):
      cache, token_B = carry
      tokens_BT = (token_B[:, None] + jnp.arange(num_tokens)) % m.config.vocab_size
      outs, cache = models.extend(m, tokens_BT.astype(jnp.int32), depths_BT, mask_BTT, cache)
      # Accept one token per step so the cache length (and attention span) grows as in decoding;
      # a chain commits by advancing the lengths (trees add a `commit` gather/scatter).
      cache = models.advance(cache, jnp.ones((1,), jnp.int32))
      return cache, jnp.argmax(outs.logits_BTV[:, -1], -1).astype(jnp.int32)

    return jax.lax.fori_loop(0, steps, body, (cache, jnp.zeros((1,), jnp.int32)))[1]

  return lambda: run(state)


def plot(rows, out_png):
  fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
  for precision in dict.fromkeys(r['precision'] for r in rows):
    rs = [r for r in rows if r['precision'] == precision]
    ts = [r['tokens'] for r in rs]
    axes[0].plot(ts, [r['ms_per_step'] for r in rs], 'o-', label=precision)
    axes[1].plot(ts, [r['ceiling_speedup'] for r in rs], 'o-', label=precision)
  axes[0].set_ylabel('ms per verify step')
  axes[1].set_ylabel('T / r(T): speedup if every draft is accepted')
  axes[1].axhline(1.0, color='k', lw=0.8)
  for ax in axes:
    ax.set_xscale('log', base=2)
    ax.set_xlabel('tokens per step T')
    ax.legend(fontsize=8)
  fig.suptitle(f'{FLAGS.config} preset, {jax.devices()[0].device_kind}, batch 1', fontsize=9)
  fig.tight_layout()
  fig.savefig(out_png, dpi=120)
  plt.close(fig)


def main(argv):
  if len(argv) > 1:
    raise ValueError(f'unexpected arguments: {argv[1:]}')
  if not FLAGS.workdir:
    raise ValueError('--workdir is required')
  tokens = sorted({int(t) for t in FLAGS.tokens} | {1})
  if tokens[0] < 1 or tokens[-1] > kv_cache.MAX_NEW_TOKENS_PER_CALL:
    raise ValueError(f'--tokens must lie in [1, {kv_cache.MAX_NEW_TOKENS_PER_CALL}]')
  if FLAGS.prefix_len + FLAGS.steps + tokens[-1] > FLAGS.cache_len:
    raise ValueError('--prefix_len + --steps + max(--tokens) must fit in --cache_len')
  if not FLAGS.ynn_dots:
    runtime.configure_xla_cpu()
  os.makedirs(FLAGS.workdir, exist_ok=True)
  if FLAGS.config not in models.PRESETS:
    raise ValueError(f'--config must be one of {sorted(models.PRESETS)}')
  config = models.PRESETS[FLAGS.config]

  runs = {}
  for precision in FLAGS.precisions:
    model = build_model(config, precision_lib.get_policy(precision), 0)
    for t in tokens:
      logging.info('compiling %s T=%d', precision, t)
      fn = make_verify_loop(model, t, FLAGS.cache_len, FLAGS.prefix_len, FLAGS.steps)
      jax.block_until_ready(fn())
      runs[(precision, t)] = (fn, [])
  for r in range(FLAGS.repeats):
    for fn, times in runs.values():
      t0 = time.perf_counter()
      jax.block_until_ready(fn())
      times.append((time.perf_counter() - t0) / FLAGS.steps)
    logging.info('round %d/%d done', r + 1, FLAGS.repeats)

  rows = []
  for (precision, t), (_, times) in runs.items():
    ms = 1e3 * statistics.median(times)
    one = 1e3 * statistics.median(runs[(precision, 1)][1])
    rows.append({'precision': precision, 'tokens': t, 'ms_per_step': ms, 'ratio': ms / one,
                 'ceiling_speedup': t * one / ms})
  results = {'config': FLAGS.config, 'cache_len': FLAGS.cache_len, 'prefix_len': FLAGS.prefix_len,
             'device': jax.devices()[0].device_kind, 'machine': platform.processor() or
             platform.machine(), 'cpu_count': os.cpu_count(),
             'xla_flags': os.environ.get('XLA_FLAGS', ''), 'rows': rows}
  with open(os.path.join(FLAGS.workdir, 'results.json'), 'w') as fh:
    json.dump(results, fh, indent=2)
  lines = ['| precision | T | ms / step | r(T) = break-even tau | ceiling T / r(T) |',
           '|---|---|---|---|---|']
  lines += [f'| {r["precision"]} | {r["tokens"]} | {r["ms_per_step"]:.2f} | {r["ratio"]:.2f} | '
            f'{r["ceiling_speedup"]:.2f}x |' for r in rows]
  with open(os.path.join(FLAGS.workdir, 'results.md'), 'w') as fh:
    fh.write('\n'.join(lines) + '\n')
  plot(rows, os.path.join(FLAGS.workdir, 'verify_cost.png'))
  print('\n'.join(lines))


if __name__ == '__main__':
  cli.run(main)
