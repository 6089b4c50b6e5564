"""What a decode step's random numbers cost: JAX's Threefry against `jax_spec.decoding.prng`.

  python -m experiments.bench_prng --workdir=/tmp/bench_prng

On CPU JAX lowers its `threefry2x32` primitive as a rolled `while` loop, so every `fold_in`,
`split`, `uniform` and `categorical` is a loop of small thunks. Each form below runs `--iterations`
times inside one jitted `fori_loop` (a decode loop's setting), the key of iteration i precomputed,
all forms interleaved in every round; prints the median microseconds per iteration:

- `jax_per_draw`: the old sampled-chain pattern, `fold_in(key, d)` + `jax.random.categorical` per
  draft (`--draws` of them) over logits `[batch, vocab]`;
- `jax_gumbel`: all the draws' Gumbel noise `[draws, batch, vocab]` in one `jax.random.gumbel`;
- `prng_gumbel`: the same noise from `prng.gumbel` (bitwise `jax.random.gumbel`'s bits, unrolled);
- `prng_exponential`: the samplers' form, `sampling.sample_probs_exponential`: the exponential
  race argmax(p / e) on `prng.exponential` noise (the Gumbel-max trick's samples from the same
  uniforms, one log per token);
- `jax_split`: the old per-step key schedule, `fold_in(key, step)` + `split(., 3)`.
"""
from __future__ import annotations

import json
import os
import statistics

from absl import flags

from jax_spec import cli
from jax_spec import runtime

flags.DEFINE_string('workdir', None, 'Output directory.')
flags.DEFINE_integer('draws', 6, 'Draws per step (an EAGLE chain of depth 6).')
flags.DEFINE_integer('batch', 1, 'Rows per draw.')
flags.DEFINE_integer('vocab', 259, 'Vocabulary (the quickstart\'s byte-level tokenizer: 259).')
flags.DEFINE_integer('iterations', 200, 'Iterations of the jitted loop per timed call.')
flags.DEFINE_integer('repeats', 9, 'Timed rounds (medians are reported).')
FLAGS = flags.FLAGS

FORMS = ('jax_per_draw', 'jax_gumbel', 'prng_gumbel', 'prng_exponential', 'jax_split')


def prng_loop(form: str, draws: int, batch: int, vocab: int, iterations: int):
  """A jitted loop of `iterations` steps of `form`; returns a thunk that runs it once."""
  import jax  # pylint: disable=g-import-not-at-top  (after runtime.configure_xla_cpu)
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from jax_spec.decoding import prng, sampling  # pylint: disable=g-import-not-at-top

  def step(key, logits_BV):
    if form == 'jax_per_draw':
      return sum(jax.random.categorical(jax.random.fold_in(key, d), logits_BV).astype(jnp.float32)
                 for d in range(1, draws + 1))
    if form == 'jax_split':
      return jax.random.key_data(jax.random.split(jax.random.fold_in(key, 1), 3)).sum(
          dtype=jnp.uint32).astype(jnp.float32)
    # One noise call, then a draw per draft from its slice, as the drafters' `select_fn` does.
    if form == 'prng_exponential':
      probs_BV = jax.nn.softmax(logits_BV)   # loop-invariant: hoisted by XLA
      noise_DBV = prng.exponential(key, (draws, batch, vocab))
      draw = lambda d: sampling.sample_probs_exponential(probs_BV, noise_DBV[d])
    else:
      noise_DBV = (jax.random.gumbel if form == 'jax_gumbel' else prng.gumbel)(
          key, (draws, batch, vocab))
      draw = lambda d: jnp.argmax(logits_BV + noise_DBV[d], -1)
    return sum(draw(d).astype(jnp.float32) for d in range(draws))

  def run(keys_N, logits_BV):
    def body(i, total):
      return total + jnp.sum(step(keys_N[i], logits_BV))   # a result used: nothing is skipped
    return jax.lax.fori_loop(0, iterations, body, jnp.float32(0))

  fn = jax.jit(run)
  keys_N = jax.random.split(jax.random.key(0), iterations)
  logits_BV = jax.random.normal(jax.random.key(1), (batch, vocab))
  jax.block_until_ready(fn(keys_N, logits_BV))   # compile outside the timing
  return lambda: fn(keys_N, logits_BV)


def main(argv):
  del argv
  if not FLAGS.workdir:
    raise ValueError('--workdir is required')
  if min(FLAGS.draws, FLAGS.batch, FLAGS.vocab, FLAGS.iterations, FLAGS.repeats) < 1:
    raise ValueError('--draws, --batch, --vocab, --iterations and --repeats must be positive')
  runtime.configure_xla_cpu()
  import jax  # pylint: disable=g-import-not-at-top
  from jax_spec.evaluation import cost_model  # pylint: disable=g-import-not-at-top
  fns = {form: prng_loop(form, FLAGS.draws, FLAGS.batch, FLAGS.vocab, FLAGS.iterations)
         for form in FORMS}
  times = cost_model.time_interleaved(fns, FLAGS.repeats, 'forms')
  table = [{'form': form, 'us_per_step': 1e6 * statistics.median(ts) / FLAGS.iterations}
           for form, ts in times.items()]
  os.makedirs(FLAGS.workdir, exist_ok=True)
  with open(os.path.join(FLAGS.workdir, 'results.json'), 'w') as fh:
    json.dump({'draws': FLAGS.draws, 'batch': FLAGS.batch, 'vocab': FLAGS.vocab,
               'device': str(jax.devices()[0].device_kind), 'rows': table}, fh, indent=2)
  print(f'{FLAGS.draws} draws of [{FLAGS.batch}, {FLAGS.vocab}] per step, '
        f'median of {FLAGS.repeats} rounds')
  print('| form | us / step |\n|---|---|')
  for r in table:
    print(f"| {r['form']} | {r['us_per_step']:.1f} |")


if __name__ == '__main__':
  cli.run(main)
