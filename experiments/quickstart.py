"""The main job in one command: train an MTP/Medusa model, then measure its speculative speedup.

  python -m experiments.quickstart                      # ~10 minutes on a 2-core CPU
  python -m experiments.quickstart --minutes=30 --workdir=runs/longer

1. Trains the `small` preset with DeepSeek-V3 MTP modules and Medusa heads on the default corpus
   (the Python standard library's sources) in bf16 for a wall-clock budget (`--minutes`), and a
   separate `tiny` draft model without heads (`--draft_minutes`, in `<workdir>/draft`) for
   classic draft-model speculation; rerunning the same command resumes both from their latest
   checkpoints.
   Then (`--head_steps`, in `<workdir>/heads`) every draft head trains on for a few minutes on the
   frozen trunk, learning the trunk's own distribution (`--head_phase_targets`) and, for the EAGLE
   block, on its own predicted features (`--head_phase_eagle_steps`, EAGLE-3's training-time
   test): on the quickstart's trunk this raised the EAGLE chain's tau from 5.8 to 6.4
   (docs/benchmarks.md, "Quickstart", 2026-12-04). The head phase also adds a fourth Medusa head
   (`--head_phase_medusa_heads`), trained on the frozen trunk only. Steps 2-4 use that copy of
   the model.
2. Evaluates validation bits per byte and each draft head's top-k accuracy (its chance to be
   accepted), and derives a candidate tree per drafter from those accuracies.
3. Benchmarks plain jitted decoding against speculative decoding with each drafter (greedy; MTP
   and Medusa chains and trees, the draft model's chain of `--draft_gamma` tokens), side by side
   on the same held-out prompts after warm-up, both samplers in fp32 (`--decode_precision`),
   with `jax_spec.evaluation.speculative_benchmark.run_benchmark`.
   `best` in results.json is the fastest drafter whose output was identical to plain decoding.
4. Prints one table and a few sampled completions; writes `results.json` and PNGs into --workdir.

`--benchmark_only` skips step 1 and runs 2-4 on a run trained elsewhere (e.g. a longer
`experiments.train` run with the same heads) and its draft model (`--draft_workdir`).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os

from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from jax_spec import cli
from jax_spec import decoding
from jax_spec import runtime
from jax_spec.data import load_data
from jax_spec.decoding import trees as trees_lib
from jax_spec.evaluation import head_accuracy
from jax_spec.evaluation import plots
from jax_spec.evaluation import speculative_benchmark as benchmark_lib
from jax_spec.io import metrics as metrics_lib
from jax_spec.training import loop
from jax_spec.training import restore
from jax_spec.training.config import TrainConfig

flags.DEFINE_string('workdir', 'runs/quickstart', 'Output directory (resumed if it holds a run).')
flags.DEFINE_float('minutes', 6.5, 'Training wall-clock budget in minutes.')
flags.DEFINE_integer('steps', 300, 'Training steps (the schedule\'s length; the budget may stop '
                     'earlier, and rerunning resumes towards it).')
flags.DEFINE_string('config', 'small', 'Model preset.')
flags.DEFINE_string('precision', 'bf16', 'Training precision: fp32 | bf16 | fp16.')
flags.DEFINE_enum('decode_precision', 'fp32', list(benchmark_lib.DECODE_PRECISIONS),
                  'Precision of both samplers in the benchmark (fp32: see '
                  'jax_spec/evaluation/speculative_benchmark.py).')
flags.DEFINE_enum('drafter_dtype', 'bf16', list(benchmark_lib.DRAFTER_DTYPES),
                  "Storage of the drafters' matrices in the benchmark (bf16: rounded, half the "
                  'bytes per draft depth on CPU, same tau, still lossless; decoding.prepare; '
                  'docs/benchmarks.md, "bf16 drafter weights").')
flags.DEFINE_enum('matmul_dtype', 'fp32', list(benchmark_lib.MATMUL_DTYPES),
                  "The CPU kernel's products in the benchmark: fp32, or bf16 (every matrix and "
                  'each matmul\'s activations rounded to bf16, AVX512_BF16 dot products: another '
                  'model\'s numbers, decoded faster, still lossless; decoding.prepare; '
                  'docs/benchmarks.md, "bf16 products").')
flags.DEFINE_integer('mtp_depth', 2, 'DeepSeek-V3 MTP modules.')
flags.DEFINE_integer('medusa_heads', 3, 'Medusa heads.')
flags.DEFINE_integer('eagle_layers', 1, 'Blocks of the EAGLE feature drafter (0 = none).')
flags.DEFINE_integer('eagle_d_ff', 128, 'MLP width of the EAGLE blocks (0: the trunk\'s d_ff). The '
                     'drafter runs once per depth and a step is bound by reading weights on a CPU: '
                     'the narrow block is 1.18x faster at ~the same tau (docs/benchmarks.md).')
flags.DEFINE_integer('eagle_depth', 6, 'Draft depth of the EAGLE chain and dynamic tree.')
flags.DEFINE_enum('head_targets', 'data', ['data', 'trunk', 'mix'], 'What every draft head learns '
                  '(jax_spec.training.config.TrainConfig.head_targets).')
flags.DEFINE_integer('head_steps', 200, 'Steps of a second phase that trains every draft head on '
                     'the frozen trunk, with trunk targets and EAGLE\'s training-time test, in '
                     '<workdir>/heads (0: none; the heads of the joint run are benchmarked).')
flags.DEFINE_float('head_minutes', 4.0, 'Wall-clock budget of the head phase in minutes.')
flags.DEFINE_enum('head_phase_targets', 'trunk', ['data', 'trunk', 'mix'],
                  'What the heads learn in the head phase.')
flags.DEFINE_integer('head_phase_medusa_heads', 4, 'Medusa heads of the head phase: more than '
                     '--medusa_heads adds heads trained on the frozen trunk only (Medusa-1), so '
                     'the trunk is the joint run\'s whatever their number (docs/benchmarks.md, '
                     '"Quickstart", 2026-12-07).')
flags.DEFINE_integer('head_phase_eagle_steps', 3, 'EAGLE steps unrolled on its own features in the '
                     'head phase (the training-time test).')
flags.DEFINE_float('sampled_temperature', 0.7, 'Temperature of the rejection-sampling rows.')
flags.DEFINE_list('sampled_drafters', ['medusa_chain', 'eagle_chain', 'model_chain'],
                  'Drafters benchmarked again '
                  'with exact rejection sampling at --sampled_temperature (empty: none).')
flags.DEFINE_integer('batch_size', 8, 'Training batch size.')
flags.DEFINE_integer('seq_len', 256, 'Training sequence length.')
flags.DEFINE_float('learning_rate', 3e-3, 'Peak learning rate.')
flags.DEFINE_list('drafters', ['mtp_chain', 'mtp_tree', 'medusa_chain', 'medusa_tree',
                                'eagle_chain', 'eagle_dynamic', 'model_chain'],
                  'Drafter runs to benchmark: {mtp,medusa}_{chain,tree} (trees derived from the '
                  'heads\' accuracies), medusa_dynamic, eagle_{chain,dynamic}, model_chain.')
flags.DEFINE_bool('benchmark_only', False, 'Skip training: evaluate and benchmark the run already '
                  'in --workdir (e.g. a longer one of experiments.train with the same heads) and '
                  'the draft model in --draft_workdir.')
flags.DEFINE_string('draft_workdir', None, 'Where the draft model is trained (or, with '
                    '--benchmark_only, read); default <workdir>/draft.')
flags.DEFINE_string('draft_config', 'tiny', 'Preset of the draft model (trained without heads).')
flags.DEFINE_float('draft_minutes', 1.5, 'Draft-model training budget in minutes.')
flags.DEFINE_integer('draft_steps', 500, 'Draft-model training steps (the schedule\'s length).')
flags.DEFINE_integer('draft_gamma', 10, 'Tokens the draft model drafts per verify step.')
flags.DEFINE_integer('tree_nodes', 12, 'Non-root nodes of each derived candidate tree.')
flags.DEFINE_integer('num_prompts', 8, 'Held-out prompts for the decoding benchmark.')
flags.DEFINE_integer('prompt_len', 64, 'Prompt length in tokens.')
flags.DEFINE_integer('max_new_tokens', 160, 'Tokens generated per prompt.')
flags.DEFINE_integer('timing_rounds', 3, 'Times each prompt is decoded by both samplers; the '
                     'fastest counts (jax_spec.evaluation.speculative_benchmark).')
flags.DEFINE_integer('num_completions', 3, 'Sampled completions to print.')
flags.DEFINE_integer('seed', 0, 'Seed for training and sampling.')
FLAGS = flags.FLAGS


# --drafters row -> (drafter, tree name, fixed tree spec or None when derived from head accuracies).
DRAFTER_ROWS = {
    'mtp_chain': ('mtp', 'chain', None), 'mtp_tree': ('mtp', 'tree', None),
    'medusa_chain': ('medusa', 'chain', None), 'medusa_tree': ('medusa', 'tree', None),
    'medusa_dynamic': ('medusa', 'dynamic', 'dynamic:12:4'),
    'eagle_chain': ('eagle', 'chain', 'chain'), 'eagle_dynamic': ('eagle', 'dynamic', 'dynamic:16:4'),
    'model_chain': ('model', 'chain', 'chain'),
}


def benchmark(f, workdir, drafter, tree_name, tree_spec, draft_workdir=None, num_draft=None,
              temperature=0.0, output_dir=None):
  """One side-by-side run of the speculative benchmark (greedy at temperature 0, exact rejection
  sampling above) of the model in `workdir`, its plots under `output_dir` (default `workdir`);
  its row of the summary table."""
  sampled = temperature > 0
  opts = benchmark_lib.BenchmarkOptions(
      workdir=workdir, draft=drafter, draft_workdir=draft_workdir,
      acceptance='rejection' if sampled else 'greedy', temperature=temperature,
      tree=tree_spec, num_draft=num_draft, num_prompts=f.num_prompts, prompt_len=f.prompt_len,
      max_new_tokens=f.max_new_tokens, stop_at_eos=False, seed=f.seed,
      timing_rounds=f.timing_rounds,
      precision=f.decode_precision, drafter_dtype=f.drafter_dtype, matmul_dtype=f.matmul_dtype,
      output=os.path.join(output_dir or workdir, 'speculative',
                          f'{drafter}_{tree_name}' + (f'_T{temperature:g}' if sampled else '')))
  r = benchmark_lib.run_benchmark(opts)
  label = f'{drafter} ({tree_name}' + (f', T={temperature:g})' if sampled else ')')
  return {'drafter': label, 'draft': drafter, 'tree': tree_name, 'temperature': temperature,
          'whitespace_fraction': r['whitespace_fraction'],
          'tree_nodes': r['tree']['num_nodes'], 'tau': r['speculative']['mean_accepted_length'],
          'tokens_per_s': r['speculative']['tokens_per_s'],
          'baseline_tokens_per_s': r['baseline']['tokens_per_s'], 'speedup': r['speedup'],
          'outputs_identical': r['outputs_identical'],
          'compiles_while_timing': r['compiles_while_timing'],
          'acceptance_rate_per_depth': r['speculative']['acceptance_rate_per_depth'],
          'plots': r['plots']}


def completions(f, model, tokenizer, data, num):
  """A few sampled completions (T=0.8, top-p 0.95) from held-out prompts, decoded to text."""
  prompts = jnp.asarray(data.validation_prompts(num, f.prompt_len))
  out = decoding.generate(model, prompts, jnp.full((num,), f.prompt_len, jnp.int32),
                          max_new_tokens=f.max_new_tokens, temperature=0.8, top_p=0.95,
                          eos_id=tokenizer.eos_id, rng=jax.random.key(f.seed))
  texts = []
  for p, t, n in zip(np.asarray(prompts), np.asarray(out.tokens_BN), np.asarray(out.lengths_B)):
    texts.append({'prompt': tokenizer.decode(p[1:].tolist()),
                  'completion': tokenizer.decode(t[:n].tolist())})
  return texts


def last_metrics(workdir: str) -> dict:
  """A trained run's summary without training: its last step and latest value of each metric."""
  records = metrics_lib.read_metrics(workdir)
  summary = {'step': records[-1].get('step') if records else None, 'stopped': 'benchmark_only'}
  summary.update({k: v for k, v in metrics_lib.latest_values(records).items()
                  if k.startswith('val_') or k == 'loss'})
  return summary


def train_models(f, workdir: str, draft_workdir: str):
  """Trains the target with its heads, then (for the 'model_chain' row) the draft model."""
  cfg = TrainConfig(
      workdir=workdir, config=f.config, steps=f.steps, batch_size=f.batch_size,
      seq_len=f.seq_len, learning_rate=f.learning_rate, warmup_steps=f.steps // 10 + 1,
      precision=f.precision, mtp_depth=f.mtp_depth, medusa_heads=f.medusa_heads,
      eagle_layers=f.eagle_layers, head_targets=f.head_targets, seed=f.seed,
      model={'eagle_d_ff': f.eagle_d_ff} if f.eagle_d_ff else {}, minutes=f.minutes,
      log_every=20, eval_every=max(f.steps // 4, 1), checkpoint_every=max(f.steps // 6, 1))
  logging.info('1/4 training %s (%s) for up to %.1f min in %s', f.config, f.precision, f.minutes,
               workdir)
  summary = loop.train(cfg)
  plots.plot_training_curves(workdir, os.path.join(workdir, 'training_curves.png'))
  draft_summary = None
  if 'model_chain' in f.drafters:
    logging.info('1b/4 training the %s draft model for up to %.1f min in %s', f.draft_config,
                 f.draft_minutes, draft_workdir)
    draft_summary = loop.train(dataclasses.replace(
        cfg, workdir=draft_workdir, config=f.draft_config, steps=f.draft_steps,
        warmup_steps=f.draft_steps // 10 + 1, mtp_depth=0, medusa_heads=0, eagle_layers=0,
        model={}, head_targets='data', minutes=f.draft_minutes,
        eval_every=max(f.draft_steps // 2, 1), checkpoint_every=max(f.draft_steps // 4, 1)))
  head_summary = None
  if f.head_steps and (f.mtp_depth or f.head_phase_medusa_heads or f.eagle_layers):
    logging.info('1c/4 training the heads on the frozen trunk (%s targets, %d EAGLE steps) for up '
                 'to %.1f min in %s', f.head_phase_targets, f.head_phase_eagle_steps,
                 f.head_minutes, heads_workdir(workdir))
    head_summary = loop.train(dataclasses.replace(
        cfg, workdir=heads_workdir(workdir), steps=f.head_steps,
        warmup_steps=f.head_steps // 10 + 1, freeze_trunk=True, init_from=workdir,
        head_targets=f.head_phase_targets, eagle_steps=f.head_phase_eagle_steps,
        medusa_heads=f.head_phase_medusa_heads, minutes=f.head_minutes, eval_every=f.head_steps,
        checkpoint_every=max(f.head_steps // 2, 1)))
  return summary, draft_summary, head_summary


def heads_workdir(workdir: str) -> str:
  """Where the head phase trains (a copy of the run with the heads trained on)."""
  return os.path.join(workdir, 'heads')


def run(f) -> dict:
  workdir = os.path.abspath(f.workdir)
  if not f.drafters or set(f.drafters) - set(DRAFTER_ROWS):
    raise ValueError(f'--drafters must be a non-empty subset of {sorted(DRAFTER_ROWS)}, '
                     f'got {f.drafters}')
  if set(f.sampled_drafters) - set(DRAFTER_ROWS):
    raise ValueError(f'--sampled_drafters must be a subset of {sorted(DRAFTER_ROWS)} (rows not in '
                     f'--drafters are skipped), got {f.sampled_drafters}')
  # Checked before anything trains: the head phase and the benchmark come minutes later.
  if f.head_steps < 0:
    raise ValueError(f'--head_steps must be >= 0, got {f.head_steps}')
  if f.head_steps and not f.head_minutes > 0:
    raise ValueError(f'--head_minutes must be > 0, got {f.head_minutes}')
  if f.head_phase_medusa_heads < f.medusa_heads:
    raise ValueError(f'--head_phase_medusa_heads ({f.head_phase_medusa_heads}) must be >= '
                     f'--medusa_heads ({f.medusa_heads}): the head phase adds heads, it does not '
                     'drop them')
  if f.head_phase_eagle_steps < 1:
    raise ValueError(f'--head_phase_eagle_steps must be >= 1, got {f.head_phase_eagle_steps}')
  if f.timing_rounds < 1:
    raise ValueError(f'--timing_rounds must be >= 1, got {f.timing_rounds}')
  if any(d.startswith('eagle') for d in f.drafters) and not f.eagle_layers:
    raise ValueError('--drafters eagle_* need --eagle_layers >= 1')
  draft_workdir = os.path.abspath(f.draft_workdir or os.path.join(workdir, 'draft'))
  if f.benchmark_only:
    summary = last_metrics(workdir)
    draft_summary = last_metrics(draft_workdir) if 'model_chain' in f.drafters else None
    head_summary = (last_metrics(heads_workdir(workdir))
                    if f.head_steps and os.path.isdir(heads_workdir(workdir)) else None)
  else:
    summary, draft_summary, head_summary = train_models(f, workdir, draft_workdir)
  # The model decoded: the head phase's copy where there is one (its trunk is the joint run's).
  model_workdir = heads_workdir(workdir) if head_summary else workdir

  logging.info('2/4 evaluating the draft heads')
  model, tokenizer, model_config = restore.load_model_from_workdir(model_workdir)
  data = load_data(tokenizer=tokenizer.kind, workdir=workdir)
  heads, tree_specs = {}, []
  for drafter, present in (('mtp', model_config.mtp_depth), ('medusa', model_config.medusa_heads)):
    if not present:
      continue
    tree, acc = head_accuracy.derive_tree(model, data, drafter, f.tree_nodes)
    choices = [list(c) for c in tree.choices]
    # acc[j, r]: probability that head j's rank-r token is the right one; top-8 sums ranks 0..7.
    heads[drafter] = {'top1_acc': acc[:, 0].tolist(), 'top8_acc': acc[:, :8].sum(-1).tolist(),
                      'tree_choices': choices,
                      'expected_tau_tree': trees_lib.expected_accepted_length(tree, acc)}
    tree_specs += [(drafter, name, spec) for name, spec in (('chain', 'chain'),
                                                            ('tree', json.dumps(choices)))
                   if f'{drafter}_{name}' in f.drafters]

  logging.info('3/4 benchmarking plain vs speculative decoding')
  # Fixed-spec rows: EAGLE chain / dynamic tree, dynamic trees of the heads, the draft model.
  tree_specs += [DRAFTER_ROWS[row] for row in f.drafters if DRAFTER_ROWS[row][2]]
  rows = []
  for drafter, name, spec in tree_specs:
    extra = {}
    if drafter == 'model':
      extra = dict(draft_workdir=draft_workdir, num_draft=f.draft_gamma)
    elif drafter == 'eagle':
      extra = dict(num_draft=f.eagle_depth)
    rows.append(benchmark(f, model_workdir, drafter, name, spec, output_dir=workdir, **extra))
    if f'{drafter}_{name}' in f.sampled_drafters:
      rows.append(benchmark(f, model_workdir, drafter, name, spec, output_dir=workdir,
                            temperature=f.sampled_temperature, **extra))
  texts = completions(f, model, tokenizer, data, f.num_completions) if f.num_completions else []

  lossless = [r for r in rows if r['outputs_identical']]  # greedy: the claim is identical output
  best = max(lossless, key=lambda r: r['speedup']) if lossless else None
  # Sampled rows are exact by construction (tests/test_speculative.py checks the law).
  sampled_rows = [r for r in rows if r['temperature'] > 0]
  best_sampled = max(sampled_rows, key=lambda r: r['speedup']) if sampled_rows else None
  results = {'train': summary, 'val_bits_per_byte': summary.get('val_bits_per_byte'),
             'draft_train': draft_summary, 'head_train': head_summary,
             'model_workdir': model_workdir, 'heads': heads, 'drafters': rows, 'best': best,
             'best_sampled': best_sampled,
             'completions': texts,
             'benchmark': {'num_prompts': f.num_prompts, 'prompt_len': f.prompt_len,
                           'max_new_tokens': f.max_new_tokens, 'batch_size': 1,
                           'timing_rounds': f.timing_rounds, 'drafter_dtype': f.drafter_dtype,
                           'matmul_dtype': f.matmul_dtype,
                           'device': str(jax.devices()[0].device_kind)}}
  with open(os.path.join(workdir, 'results.json'), 'w') as fh:
    json.dump(results, fh, indent=2)
  if rows:
    plots.plot_speedups(rows, os.path.join(workdir, 'speedups.png'))

  print(f'\nvalidation bits/byte: {summary.get("val_bits_per_byte", float("nan")):.3f}  '
        f'(step {summary.get("step")})')
  if draft_summary:
    print(f'draft model ({f.draft_config}) validation bits/byte: '
          f'{draft_summary.get("val_bits_per_byte", float("nan")):.3f}  '
          f'(step {draft_summary.get("step")})')
  for drafter, h in heads.items():
    print(f'{drafter} heads top-1 accuracy: {np.round(h["top1_acc"], 3).tolist()}')
  print(f'\n{"drafter":<26}{"tau":>6}{"tokens/s":>10}{"baseline":>10}{"speedup":>9}'
        f'{"spaces":>8}  identical')
  for r in rows:
    print(f'{r["drafter"]:<26}{r["tau"]:>6.2f}{r["tokens_per_s"]:>10.1f}'
          f'{r["baseline_tokens_per_s"]:>10.1f}{r["speedup"]:>8.2f}x'
          f'{r["whitespace_fraction"]:>8.2f}  {r["outputs_identical"]}')
  for t in texts:
    print('\n--- prompt ---\n' + t['prompt'] + '\n--- completion ---\n' + t['completion'])
  print(f'\nresults.json, training_curves.png, speedups.png and per-drafter plots in {workdir}')
  return results


def main(argv):
  del argv  # cli.run rejects positional arguments
  runtime.configure_xla_cpu()
  run(FLAGS)


if __name__ == '__main__':
  cli.run(main, quiet=True)
