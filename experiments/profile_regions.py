"""Where a decode loop's time goes, by source region: a `jax.profiler` trace's op self-times
summed by the Python call each op came from inside the loop body.

  python -m experiments.profile_regions --workdir=/tmp/regions
  python -m experiments.profile_regions --workdir=/tmp/regions --loops=plain,medusa:chain,eagle:chain:6

For each loop ('plain' = `decoding.generate`; 'DRAFTER:TREE[:NUM_DRAFT]' =
`decoding.speculative_generate`) on a random-weight model of `--config` (with the quickstart's
heads), one warm call is traced. XLA dumps the optimized HLO of the two loop programs into
`<workdir>/hlo`; its stack-frame tables give each op's Python stack (`cost_model.hlo_stacks`), and
`cost_model.top_regions` sums the trace's self-times by the call made from the loop body
(e.g. '309: extend > Block.decode' for the verify forward's blocks). Ops without a stack (the
runtime's own events, dots inside nested computations) are listed by kind, e.g. '[dot]'. The
profiler roughly doubles a step's time on CPU: read shares, not milliseconds. Writes
results.json and prints one table per loop. (The dump also holds XLA's per-kernel LLVM IR and
objects of those two programs, ~1000 files.)
"""
from __future__ import annotations

import glob
import json
import os

from absl import flags

from jax_spec import cli
from jax_spec import runtime

flags.DEFINE_string('workdir', None, 'Output directory (the HLO dump goes to <workdir>/hlo).')
flags.DEFINE_string('config', 'small', 'Model preset (random weights).')
flags.DEFINE_integer('eagle_d_ff', 128, "MLP width of the EAGLE block (0: the trunk's d_ff).")
flags.DEFINE_list('loops', ['plain', 'eagle:chain:6', 'medusa:chain'],
                  "'plain', or 'DRAFTER:TREE[:NUM_DRAFT]' for speculative_generate.")
flags.DEFINE_integer('prompt_len', 64, 'Prompt tokens.')
flags.DEFINE_integer('max_new_tokens', 160, 'New tokens per call.')
flags.DEFINE_integer('top', 15, 'Regions per table.')
flags.DEFINE_float('temperature', 0.0, 'Sampling temperature of every loop (0 = greedy; above, '
                   'rejection sampling with sampled chain drafts, as the benchmark runs it).')
FLAGS = flags.FLAGS

_ANCHORS = {'jit__generate': '_generate.<locals>.body', 'jit__speculative': '_speculative.<locals>.body'}


def _parse_loop(spec: str):
  if spec == 'plain':
    return None
  parts = spec.split(':')
  if len(parts) not in (2, 3) or not all(parts) or (len(parts) == 3 and not parts[2].isdigit()):
    raise ValueError(f"--loops entries must be 'plain' or 'DRAFTER:TREE[:NUM_DRAFT]', got {spec!r}")
  return parts[0], parts[1], int(parts[2]) if len(parts) == 3 else None


def main(argv):
  del argv
  if not FLAGS.workdir:
    raise ValueError('--workdir is required')
  loops = {spec: _parse_loop(spec) for spec in FLAGS.loops}
  if FLAGS.prompt_len < 1 or FLAGS.max_new_tokens < 2 or FLAGS.top < 1:
    raise ValueError('--prompt_len and --top must be positive and --max_new_tokens >= 2')
  dump_dir = os.path.join(FLAGS.workdir, 'hlo')
  # Before JAX's first computation: XLA reads its flags when the CPU client starts.
  runtime.configure_xla_cpu(runtime.CPU_FLAGS + (
      f'--xla_dump_to={dump_dir}', '--xla_dump_hlo_module_re=^jit__(generate|speculative)$',
      '--xla_dump_hlo_pass_re=^$'))
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from jax_spec import decoding, models, precision  # pylint: disable=g-import-not-at-top
  from jax_spec.evaluation import cost_model  # pylint: disable=g-import-not-at-top
  from jax_spec.training.state import build_model  # pylint: disable=g-import-not-at-top

  config = models.get_config(FLAGS.config, mtp_depth=2, medusa_heads=3, eagle_layers=1,
                             eagle_d_ff=FLAGS.eagle_d_ff or None)
  model = build_model(config, precision.get_policy('fp32'), 0)
  rng = np.random.default_rng(0)
  prompts_BT = jnp.asarray(rng.integers(0, config.vocab_size, (1, FLAGS.prompt_len)), jnp.int32)
  lengths_B = jnp.array([FLAGS.prompt_len], jnp.int32)
  model = decoding.prepare(model)   # as the benchmark decodes: no per-call split and weight pack
  sampling = dict(max_new_tokens=FLAGS.max_new_tokens, temperature=FLAGS.temperature,
                  rng=jax.random.key(0))
  results = {}
  for spec, parsed in loops.items():
    if parsed is None:
      call = lambda: decoding.generate(model, prompts_BT, lengths_B, **sampling)
      module = 'jit__generate'
    else:
      drafter, tree, num_draft = parsed
      call = lambda drafter=drafter, tree=tree, num_draft=num_draft: (
          decoding.speculative_generate(model, prompts_BT, lengths_B, drafter=drafter, tree=tree,
                                        num_draft=num_draft, **sampling))
      module = 'jit__speculative'
    before = set(glob.glob(os.path.join(dump_dir, f'*.{module}.cpu_after_optimizations.txt')))
    out = jax.block_until_ready(call())   # compiles (and dumps) this loop's program
    new = set(glob.glob(os.path.join(dump_dir, f'*.{module}.cpu_after_optimizations.txt')))
    dumped = sorted(new - before)
    if not dumped:   # e.g. two --loops entries that resolve to one program (a cache hit)
      raise RuntimeError(f'XLA dumped no new optimized HLO for {module} into {dump_dir} for '
                         f'--loops entry {spec!r}: was its program compiled before in this run?')
    with open(dumped[-1]) as fh:
      stacks = cost_model.hlo_stacks(fh.read())
    # generate's loop makes max_new_tokens - 1 steps (the prefill emits the first token).
    steps = FLAGS.max_new_tokens - 1 if parsed is None else int(out.stats.loop_steps)
    regions = cost_model.top_regions(cost_model.trace_call(call), stacks, anchor=_ANCHORS[module],
                                     top=FLAGS.top)
    results[spec] = {'loop_steps': steps, 'regions': regions}
    print(f'\n{spec}: {steps} loop steps (profiled)')
    print('| region | us / step | ops / step | share |\n|---|---|---|---|')
    for r in regions:
      print(f"| {r['region']} | {r['self_us'] / steps:.1f} | {r['calls'] / steps:.1f} | "
            f"{100 * r['share']:.1f}% |")
  with open(os.path.join(FLAGS.workdir, 'results.json'), 'w') as fh:
    json.dump(results, fh, indent=2)


if __name__ == '__main__':
  cli.run(main)
