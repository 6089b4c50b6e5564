"""The verify cost model: what a speculative step costs, part by part, in plain one-token steps.

  python -m experiments.bench_verify --workdir=/tmp/bench_verify --config=small

Times, in one run and interleaved (jax_spec/evaluation/cost_model.py): the plain one-token step;
the verify forward of T = 1..64 nodes (chain and Medusa-tree masks), r(T) = verify(T) / plain
(the break-even tau of a T-node tree); each drafter's propose step; acceptance + commit +
emission; whole plain and speculative loops, including a model drafting for itself at full and at
zero acceptance. Prints the predicted speedup tau / (step cost in plain steps) next to the
measured one for each drafter, and the top XLA ops of a `jax.profiler` trace of both loops.
Weights are random (timing does not depend on their values; tau does, so the speedups of the
trained-head drafters here are those of untrained heads). Writes results.json, results.md and
cost_model.png into --workdir.
"""
from __future__ import annotations

import json
import os

from absl import flags

from jax_spec import cli
from jax_spec import runtime
from jax_spec.evaluation import cost_model
from jax_spec.evaluation import verify_ab

_DEFAULTS = cost_model.CostOptions()
flags.DEFINE_string('workdir', None, 'Output directory.')
flags.DEFINE_string('config', _DEFAULTS.config, 'Model preset of the target.')
flags.DEFINE_enum('precision', _DEFAULTS.precision, ['fp32', 'bf16', 'fp16'], 'Compute precision.')
flags.DEFINE_string('draft_config', _DEFAULTS.draft_config, "Preset of the 'model' drafter's draft.")
flags.DEFINE_list('tokens', [str(t) for t in _DEFAULTS.verify_tokens], 'Chain verify sizes T.')
flags.DEFINE_list('tree_tokens', [str(t) for t in _DEFAULTS.tree_tokens], 'Tree verify sizes T.')
flags.DEFINE_list('drafters', list(_DEFAULTS.drafters), 'Drafters to model and time.')
flags.DEFINE_integer('depth', _DEFAULTS.depth, "Chain depth of 'model', 'eagle', 'mtp_recursive' and "
                     'of the self-drafting loops.')
flags.DEFINE_integer('eagle_d_ff', 0, "MLP width of the EAGLE block (0: the trunk's d_ff; the "
                     'quickstart uses 128).')
flags.DEFINE_integer('cache_len', _DEFAULTS.cache_len, 'KV cache slots of the part loops and '
                     'whole loops.')
flags.DEFINE_integer('prefix_len', _DEFAULTS.prefix_len, 'Committed tokens before the timed steps.')
flags.DEFINE_integer('steps', _DEFAULTS.steps, 'Iterations per timed call of a part.')
flags.DEFINE_integer('repeats', _DEFAULTS.repeats, 'Timed calls per part (medians are reported).')
flags.DEFINE_integer('prompt_len', _DEFAULTS.prompt_len, 'Prompt of the whole loops.')
flags.DEFINE_list('new_tokens', [str(t) for t in _DEFAULTS.new_tokens], 'Two max_new_tokens of '
                  'the whole loops (differenced: per-step costs without the prefill).')
flags.DEFINE_bool('loops', True, 'Also the drafters and whole loops (False: the verify sweep only).')
flags.DEFINE_bool('profile', True, 'Trace one call of each loop and print its top ops.')
flags.DEFINE_bool('ynn_dots', False, "Keep XLA:CPU's YNNPACK dot fusion (default: the experiments' "
                  'XLA:CPU flags, jax_spec/runtime.py).')
flags.DEFINE_multi_string('ab', [], "'label=CHECKOUT [XLA flags]', repeated: instead of the cost "
                          'model, r(T) of each checkout / flag set timed interleaved in one run '
                          "(jax_spec/evaluation/verify_ab.py); flags default to the experiments'.")
flags.DEFINE_list('ab_loops', [], "With --ab: also whole decoding loops, 'plain' and drafters of "
                  f'{verify_ab.LOOP_DRAFTERS} (chains on a random model with those heads).')
flags.DEFINE_integer('ab_calls', 3, 'With --ab: calls per T and round (the fastest counts).')
FLAGS = flags.FLAGS


def run_ab():
  default_flags = ' '.join(runtime.CPU_FLAGS)
  variants = [verify_ab.Variant.parse(spec, default_flags) for spec in FLAGS.ab]
  results = verify_ab.compare(variants, config=FLAGS.config, precision=FLAGS.precision,
                              tokens=[int(t) for t in FLAGS.tokens], cache_len=FLAGS.cache_len,
                              prefix_len=FLAGS.prefix_len, steps=FLAGS.steps,
                              repeats=FLAGS.repeats, calls=FLAGS.ab_calls, loops=FLAGS.ab_loops)
  os.makedirs(FLAGS.workdir, exist_ok=True)
  with open(os.path.join(FLAGS.workdir, 'ab.json'), 'w') as fh:
    json.dump(results, fh, indent=2)
  print(verify_ab.format_table(results))


def main(argv):
  del argv  # cli.run rejects extra arguments
  if not FLAGS.workdir:
    raise ValueError('--workdir is required')
  if FLAGS.ab:
    return run_ab()
  if not FLAGS.ynn_dots:
    runtime.configure_xla_cpu()
  ints = lambda xs: tuple(int(x) for x in xs)
  opts = cost_model.CostOptions(
      config=FLAGS.config, precision=FLAGS.precision, draft_config=FLAGS.draft_config,
      verify_tokens=ints(FLAGS.tokens), tree_tokens=ints(FLAGS.tree_tokens),
      drafters=tuple(FLAGS.drafters), depth=FLAGS.depth, eagle_d_ff=FLAGS.eagle_d_ff or None,
      cache_len=FLAGS.cache_len,
      prefix_len=FLAGS.prefix_len, steps=FLAGS.steps, repeats=FLAGS.repeats,
      prompt_len=FLAGS.prompt_len, new_tokens=ints(FLAGS.new_tokens), profile=FLAGS.profile,
      loops=FLAGS.loops)
  results = cost_model.run_cost_model(opts, FLAGS.workdir)
  print(cost_model.format_tables(results))


if __name__ == '__main__':
  cli.run(main)
