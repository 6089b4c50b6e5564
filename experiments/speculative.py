"""Speculative decoding vs the autoregressive baseline on a trained run.

  python -m experiments.speculative --workdir=/tmp/run --draft=mtp --acceptance=greedy \
      --tree=chain --num_prompts=8 --max_new_tokens=128

One flag per field of `jax_spec.evaluation.speculative_benchmark.BenchmarkOptions` (see there for
what is measured). Writes `results.json`, `accepted_length_hist.png` and `acceptance_per_depth.png`
into `--output` (default `<workdir>/speculative/<draft>_<acceptance>_<tree>_T<temperature>`), and
prints a table. `--derive_tree` measures the drafter's per-head top-k accuracies on validation
batches, builds a tree with Medusa's greedy construction (`--tree_nodes` nodes), saves it as
`tree.json` and uses it. `--profile_steps=A:B` traces prompt batches A..B-1 into <output>/profile.
"""
from __future__ import annotations

from absl import flags

from jax_spec import cli
from jax_spec import runtime
from jax_spec.evaluation import speculative_benchmark as benchmark_lib

_FIELDS = cli.define_flags(benchmark_lib.BenchmarkOptions)
FLAGS = flags.FLAGS


def main(argv):
  del argv  # cli.run rejects positional arguments
  if not FLAGS.workdir:
    raise ValueError('--workdir is required (a trained run of experiments.train)')
  runtime.configure_xla_cpu()
  opts = benchmark_lib.BenchmarkOptions(**cli.flag_values(benchmark_lib.BenchmarkOptions, _FIELDS))
  results = benchmark_lib.run_benchmark(opts)
  print('\n' + benchmark_lib.format_table(results))


if __name__ == '__main__':
  cli.run(main, quiet=True)
