"""Both factors of a speculative speedup, per drafter: tokens per verify step and the step's cost.

  python -m experiments.step_costs --workdir=runs/quickstart/heads \
      --draft_workdir=runs/quickstart/draft --drafters=medusa,eagle:6,mtp,model:10 \
      --drafter_dtypes=fp32,bf16

On held-out prompts of the run's own data (batch 1), every (drafter, drafter dtype) and plain
decoding are timed as whole calls at two lengths (`--new_tokens`, short and long), all of them
interleaved in every round; the fastest of `--rounds` rounds of each counts (on a shared machine:
the least disturbed), and the two lengths are differenced, so the prefill and the per-call costs
cancel. Per drafter it reports the tokens emitted per verify step (tau of the long calls, from the
loop's own counts), the cost of a step in plain decoding steps (differenced), and their ratio:
the decode loop's speedup without the prefill. `--drafter_dtypes` compares storages side by side:
'fp32', 'bf16' (`decoding.prepare(..., drafter_dtype=bfloat16)`: the drafters' matrices) and
'bf16_products' (`matmul_dtype=bfloat16`: every matrix, in bf16 products; another trunk, so its
rows are against its own plain decoding, timed in the same rounds). Writes results.json and
step_costs.png into --output_dir (default <workdir>/step_costs).
"""
from __future__ import annotations

import json
import os
import time

from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from jax_spec import cli
from jax_spec import decoding
from jax_spec import runtime
from jax_spec.data import load_data
from jax_spec.evaluation import speculative_benchmark as benchmark_lib

flags.DEFINE_string('workdir', None, 'A trained run of experiments.train (the target model).')
flags.DEFINE_string('draft_workdir', None, "A smaller trained run, for the 'model' drafter.")
flags.DEFINE_list('drafters', ['medusa', 'eagle:6', 'mtp'], "'NAME[:NUM_DRAFT]' per drafter "
                  '(greedy chains).')
# Storage name -> decoding.prepare arguments.
STORAGES = {'fp32': {}, 'bf16': {'drafter_dtype': jnp.bfloat16},
            'bf16_products': {'matmul_dtype': jnp.bfloat16}}
flags.DEFINE_list('drafter_dtypes', ['fp32', 'bf16'],
                  f'Storages (decoding.prepare) side by side: {tuple(STORAGES)}.')
flags.DEFINE_list('new_tokens', ['32', '160'], 'The short and the long call, in new tokens.')
flags.DEFINE_integer('rounds', 9, 'Timed rounds (the fastest of each call counts).')
flags.DEFINE_integer('num_prompts', 4, 'Held-out prompts, each its own batch-1 call.')
flags.DEFINE_integer('prompt_len', 64, 'Prompt tokens.')
flags.DEFINE_string('output_dir', None, 'Output directory (default <workdir>/step_costs).')
flags.DEFINE_float('temperature', 0.0, 'Sampling temperature of every call (0 = greedy; above, '
                   'rejection sampling with sampled chain drafts, as the quickstart runs it).')
FLAGS = flags.FLAGS


def parse_drafter(spec: str) -> tuple[str, int | None]:
  name, _, depth = spec.partition(':')
  if not name or (depth and not depth.isdigit()):
    raise ValueError(f"--drafters entries must be 'NAME[:NUM_DRAFT]', got {spec!r}")
  return name, int(depth) if depth else None


def measure(prepared_by_dtype: dict, prompts, drafters, *, new_tokens=(32, 160), rounds=9,
            temperature=0.0, progress=None) -> dict:
  """Times plain decoding and each drafter of `drafters` [(name, num_draft)] under each prepared
  model of `prepared_by_dtype` {dtype name: PreparedModel} on `prompts` [(tokens [1, P],
  lengths [1])], interleaved (see the module docstring). -> {'plain_us_per_token': ..., 'rows':
  [{drafter, num_draft, drafter_dtype, tokens_per_step, us_per_step, plain_steps_per_step,
  loop_speedup}]}. At `temperature` > 0 every call of a prompt gets the same key, so the
  short call's tokens are the long call's prefix."""
  short, long = new_tokens
  if not 0 < short < long:
    raise ValueError(f'new_tokens must be (short, long) with 0 < short < long, got {new_tokens}')
  # Plain decoding once per trunk: per matmul dtype (drafter_dtype leaves the trunk as it is).
  trunk_of = {dtype: prepared.matmul_dtype for dtype, prepared in prepared_by_dtype.items()}
  plains = {}
  for dtype, prepared in prepared_by_dtype.items():
    plains.setdefault(trunk_of[dtype], (dtype, prepared))
  configs = [('plain', None, dtype, prepared) for dtype, prepared in plains.values()] + [
      (name, depth, dtype, prepared) for name, depth in drafters
      for dtype, prepared in prepared_by_dtype.items()]

  def call(config, n):
    """-> (loop steps, verify steps, accepted drafts), summed over the prompts."""
    name, depth, _, prepared = config
    totals = np.zeros(3, np.int64)
    for p, (tokens, lengths) in enumerate(prompts):
      sampling = dict(max_new_tokens=n, temperature=temperature,
                      rng=jax.random.key(p) if temperature > 0 else None)
      if name == 'plain':
        jax.block_until_ready(decoding.generate(prepared, tokens, lengths, **sampling))
        totals[0] += n
      else:
        out = decoding.speculative_generate(prepared, tokens, lengths, drafter=name,
                                            num_draft=depth, **sampling)
        jax.block_until_ready(out)
        stats = decoding.summarize(out.stats)
        totals += (stats['loop_steps'], stats['verify_steps'], stats['accepted_tokens'])
    return totals

  steps = {(i, n): call(c, n) for i, c in enumerate(configs) for n in new_tokens}   # warm-up
  best = {}
  for r in range(rounds):
    for i, config in enumerate(configs):
      for n in new_tokens:
        t = time.perf_counter()
        call(config, n)
        best[i, n] = min(best.get((i, n), np.inf), time.perf_counter() - t)
    if progress:
      progress(r + 1, rounds)
  tokens = (long - short) * len(prompts)
  plain_us_of = {trunk: (best[i, long] - best[i, short]) / tokens * 1e6
                 for i, trunk in enumerate(plains)}
  rows = []
  for i, (name, depth, dtype, _) in enumerate(configs[len(plains):], start=len(plains)):
    plain_us = plain_us_of[trunk_of[dtype]]
    loop_steps = steps[i, long][0] - steps[i, short][0]
    us_per_step = (best[i, long] - best[i, short]) / loop_steps * 1e6
    # tau of the long calls as a whole (the benchmark's): a difference of step counts would
    # weigh the continuations' later tokens only (in the quickstart's text, runs of spaces).
    _, verify_steps, accepted = steps[i, long]
    tokens_per_step = (accepted + verify_steps) / verify_steps
    rows.append(dict(drafter=name, num_draft=depth, drafter_dtype=dtype,
                     tokens_per_step=tokens_per_step, us_per_step=us_per_step,
                     plain_steps_per_step=us_per_step / plain_us,
                     loop_speedup=tokens_per_step * plain_us / us_per_step))
  # Whole calls per prompt, prefill included: with a short call of 1 token, its fixed cost.
  labels = [dtype if name == 'plain' else f'{name}:{dtype}' for name, _, dtype, _ in configs]
  call_ms = {label: {n: best[i, n] / len(prompts) * 1e3 for n in new_tokens}
             for i, label in enumerate(labels)}
  return {'plain_us_per_token': plain_us_of[next(iter(plains))],
          'plain_us_per_token_by_dtype': {dtype: plain_us_of[trunk_of[dtype]]
                                          for dtype in prepared_by_dtype},
          'call_ms': call_ms, 'rows': rows}


def plot(results: dict, path: str) -> None:
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  rows = results['rows']
  labels = [f"{r['drafter']}{':' + str(r['num_draft']) if r['num_draft'] else ''}\n"
            f"{r['drafter_dtype']}" for r in rows]
  fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
  for ax, key, title in zip(axes, ('tokens_per_step', 'plain_steps_per_step', 'loop_speedup'),
                            ('tokens per verify step (tau)', 'step cost (plain steps)',
                             'decode-loop speedup')):
    ax.bar(range(len(rows)), [r[key] for r in rows], color='tab:blue')
    ax.set_xticks(range(len(rows)), labels, fontsize=7)
    ax.set_title(title, fontsize=9)
    if key == 'loop_speedup':
      ax.axhline(1.0, color='gray', lw=0.8)
  fig.suptitle(f"plain step {results['plain_us_per_token']:.0f} us", fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def main(argv):
  del argv
  if not FLAGS.workdir:
    raise ValueError('--workdir is required (a trained run of experiments.train)')
  unknown = [d for d in FLAGS.drafter_dtypes if d not in STORAGES]
  if unknown or not FLAGS.drafter_dtypes:
    raise ValueError(f'--drafter_dtypes must be among {tuple(STORAGES)}, '
                     f'got {FLAGS.drafter_dtypes}')
  if len(FLAGS.new_tokens) != 2 or not all(n.isdigit() for n in FLAGS.new_tokens):
    raise ValueError(f'--new_tokens must be two integers (short, long), got {FLAGS.new_tokens}')
  if FLAGS.temperature < 0:
    raise ValueError(f'--temperature must be >= 0, got {FLAGS.temperature}')
  drafters = [parse_drafter(d) for d in FLAGS.drafters]
  runtime.configure_xla_cpu()
  model, tokenizer, _, info = benchmark_lib.load_run(FLAGS.workdir)
  draft_model = None
  if any(name == 'model' for name, _ in drafters):
    draft_model, _, _, _ = benchmark_lib.load_run(FLAGS.draft_workdir, 'draft_workdir')
  train = info['train']
  data = load_data(tokenizer=tokenizer, workdir=FLAGS.workdir, data_path=train.get('data_path'),
                   vocab_size=train.get('vocab_size'))
  tokens = data.validation_prompts(FLAGS.num_prompts, FLAGS.prompt_len)
  prompts = [(jnp.asarray(tokens[i:i + 1]), jnp.array([FLAGS.prompt_len], jnp.int32))
             for i in range(tokens.shape[0])]
  prepared = {d: decoding.prepare(model, draft_model, **STORAGES[d]) for d in FLAGS.drafter_dtypes}
  progress = lambda r, n: print(f'round {r}/{n}', flush=True)
  results = measure(prepared, prompts, drafters, rounds=FLAGS.rounds, progress=progress,
                    new_tokens=tuple(int(n) for n in FLAGS.new_tokens),
                    temperature=FLAGS.temperature)
  results['temperature'] = FLAGS.temperature
  out = FLAGS.output_dir or os.path.join(FLAGS.workdir, 'step_costs')
  os.makedirs(out, exist_ok=True)
  with open(os.path.join(out, 'results.json'), 'w') as fh:
    json.dump(results, fh, indent=2)
  plot(results, os.path.join(out, 'step_costs.png'))
  for dtype, us in results['plain_us_per_token_by_dtype'].items():
    print(f"plain ({dtype}): {us:.1f} us per token, T={FLAGS.temperature:g}")
  for name, ms in results['call_ms'].items():
    print(f'{name}: ' + ', '.join(f'{v:.2f} ms per call of {n} tokens' for n, v in ms.items()))
  print(f"{'drafter':12s} {'dtype':13s} {'tau':>6s} {'us/step':>8s} {'plain steps':>11s} "
        f"{'loop speedup':>12s}")
  for r in results['rows']:
    name = r['drafter'] + (f":{r['num_draft']}" if r['num_draft'] else '')
    print(f"{name:12s} {r['drafter_dtype']:13s} {r['tokens_per_step']:6.2f} "
          f"{r['us_per_step']:8.1f} {r['plain_steps_per_step']:11.2f} {r['loop_speedup']:11.2f}x")
  print(f'results.json and step_costs.png in {out}')


if __name__ == '__main__':
  cli.run(main, quiet=True)
