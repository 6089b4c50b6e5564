"""Speculative decoding vs the autoregressive baseline on a trained run.

  python -m experiments.speculative --workdir=/tmp/run --draft=mtp --acceptance=greedy \
      --tree=chain --num_prompts=8 --max_new_tokens=128

Loads the run's latest checkpoint, takes prompts from the validation split, compiles both samplers
(warm-up), then times the jitted baseline (`jax_spec.decoding.generate`) and the speculative
sampler on the same prompts, interleaved prompt by prompt so both see the same machine load.
Writes `results.json`, `accepted_length_hist.png` and `acceptance_per_depth.png` into `--output`
(default `<workdir>/speculative/<draft>_<acceptance>_<tree>_T<temperature>`), and prints a table.

`--derive_tree` measures the drafter's per-head top-k accuracies on validation batches, builds a
tree with Medusa's greedy construction (`--tree_nodes` nodes), saves it as `tree.json` and uses it.
`--tree` also accepts 'derived' (the same), a JSON list of rank paths, or a path to such a file.
"""
from __future__ import annotations

import json
import logging
import os
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm import tqdm

from jax_spec import decoding
from jax_spec import runtime
from jax_spec.decoding import trees as trees_lib
from jax_spec.training import restore
from jax_spec.training import workdir as workdir_lib

FLAGS = flags.FLAGS


def define_flags():
  """Defines the CLI flags (only when run as a script, so the quickstart can import `run`)."""
  flags.DEFINE_string('workdir', None, 'A trained run of experiments.train (the target model).')
  flags.DEFINE_enum('draft', 'mtp', ['mtp', 'medusa', 'model'], 'Drafter.')
  flags.DEFINE_string('draft_workdir', None, 'Trained run of the draft model (--draft=model).')
  flags.DEFINE_enum('acceptance', 'greedy', ['greedy', 'rejection', 'typical'], 'Acceptance rule.')
  flags.DEFINE_string('tree', None, "chain | chainN | default | default:N | derived | mc_sim_7b_63 | "
                      "JSON rank paths | path to a .json file (default: 'default' for medusa, "
                      "'chain' otherwise).")
  flags.DEFINE_integer('num_draft', None, 'Draft positions for named trees (default: the drafter\'s '
                       'heads / MTP depth; 4 for a draft model).')
  flags.DEFINE_bool('derive_tree', False, 'Derive the tree from measured per-head accuracies.')
  flags.DEFINE_integer('tree_nodes', 10, 'Non-root nodes of a derived tree.')
  flags.DEFINE_integer('derive_topk', 8, 'Ranks measured per head when deriving a tree.')
  flags.DEFINE_integer('derive_batches', 4, 'Validation batches (8 x 256 tokens) for --derive_tree.')
  flags.DEFINE_integer('num_prompts', 8, 'Validation prompts.')
  flags.DEFINE_integer('prompt_len', 64, 'Prompt length in tokens (bos + document start).')
  flags.DEFINE_integer('batch_size', 1, 'Prompts per sampler call.')
  flags.DEFINE_integer('max_new_tokens', 128, 'Tokens to generate per prompt.')
  flags.DEFINE_float('temperature', 0.0, 'Sampling temperature (0 = greedy).')
  flags.DEFINE_integer('top_k', 0, 'Top-k filter (0 = off).')
  flags.DEFINE_float('top_p', 1.0, 'Top-p filter (1 = off).')
  flags.DEFINE_bool('stop_at_eos', True, 'Rows stop at the tokenizer\'s EOS.')
  flags.DEFINE_integer('cache_len', None, 'KV cache slots (default: the model\'s max_seq_len).')
  flags.DEFINE_integer('seed', 0, 'Sampling seed.')
  flags.DEFINE_enum('precision', 'auto', ['auto', 'fp32', 'bf16', 'fp16'], 'Decoding precision of '
                    'both samplers (auto: fp32, see jax_spec/runtime.py: decode_precision).')
  flags.DEFINE_string('output', None, 'Output directory.')


def load_run(workdir: str, what: str, precision: str = 'auto'):
  """(model, tokenizer, model_config, run_info) of a trained run, with clear errors."""
  if not workdir or not os.path.isdir(workdir):
    raise ValueError(f'--{what}={workdir!r} is not a directory (a workdir of experiments.train)')
  info = workdir_lib.read_run_info(workdir)
  policy = runtime.decode_precision(precision)
  try:
    model, tokenizer, model_config = restore.load_model_from_workdir(workdir, policy=policy)
  except ValueError:
    raise
  except Exception as e:  # orbax / tree-structure mismatches: an incompatible checkpoint
    raise ValueError(f'--{what}={workdir!r}: the checkpoint does not match the run\'s model '
                     f'config ({type(e).__name__}: {e})') from e
  return model, tokenizer, model_config, info


def head_logits_and_targets(model, tokens_BT, segment_ids_BT, drafter):
  """Draft-head logits `[K, N, V]`, targets `[K, N]` and validity `[K, N]` (head k predicts t_{i+k+1})."""
  out = model(tokens_BT, segment_ids_BT=segment_ids_BT)
  logits_KBTV = out.medusa_logits_KBTV if drafter == 'medusa' else out.mtp_logits_DBTV
  num_heads, batch, seq_len, vocab = logits_KBTV.shape
  targets, valid = [], []
  for k in range(1, num_heads + 1):
    shift = k + 1
    tgt_BT = jnp.pad(tokens_BT[:, shift:], ((0, 0), (0, shift)))
    seg_BT = jnp.pad(segment_ids_BT[:, shift:], ((0, 0), (0, shift)))
    targets.append(tgt_BT.reshape(-1))
    valid.append(((seg_BT == segment_ids_BT) & (segment_ids_BT != 0)).reshape(-1))
  return logits_KBTV.reshape(num_heads, batch * seq_len, vocab), jnp.stack(targets), jnp.stack(valid)


def derive_tree(model, data, drafter, num_nodes, topk, num_batches):
  """Medusa's greedy tree from the drafter's per-head top-k accuracies on validation data."""
  graphdef, state = nnx.split(model)
  fn = jax.jit(lambda st, t, s: head_logits_and_targets(nnx.merge(graphdef, st), t, s, drafter))
  hits, count = None, 0
  for batch in tqdm(data.validation_batches(8, 256, num_batches), desc='head accuracies'):
    logits, targets, valid = fn(state, jnp.asarray(batch['tokens']),
                                jnp.asarray(batch['segment_ids']))
    acc = trees_lib.measure_topk_accuracies(logits, targets, valid, topk)
    n = int(np.asarray(valid).sum(axis=1).min())
    hits = acc * n if hits is None else hits + acc * n
    count += n
  acc = hits / max(count, 1)
  tree = trees_lib.tree_from_accuracies(acc, num_nodes, branch_from_chain_only=drafter == 'mtp')
  return tree, acc


def resolve_tree(spec, num_draft):
  if spec.startswith('[') or spec.endswith('.json'):
    if spec.endswith('.json'):
      with open(spec) as f:
        spec = f.read()
    return trees_lib.Tree.from_choices(json.loads(spec), num_heads=num_draft)
  return trees_lib.get_tree(spec, num_draft)


def timed(fn):
  t0 = time.perf_counter()
  out = jax.block_until_ready(fn())
  return out, time.perf_counter() - t0


def plot(stats, out_dir, title):
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  hist = np.asarray(stats['accepted_length_hist'], np.float64)
  fig, ax = plt.subplots(figsize=(5, 3.5))
  ax.bar(np.arange(len(hist)) + 1, hist / max(hist.sum(), 1))
  ax.set_xlabel('tokens emitted per verify step (accepted drafts + 1)')
  ax.set_ylabel('fraction of verify steps')
  ax.set_title(f'{title}\ntau = {stats["mean_accepted_length"]:.2f}', fontsize=9)
  fig.tight_layout()
  fig.savefig(os.path.join(out_dir, 'accepted_length_hist.png'), dpi=120)
  plt.close(fig)
  fig, ax = plt.subplots(figsize=(5, 3.5))
  depths = np.arange(1, len(hist))
  ax.plot(depths, stats['acceptance_rate_per_depth'], 'o-', label='P(accept d | accepted d-1)')
  ax.plot(depths, stats['acceptance_per_depth'], 's--', label='P(accept d)')
  ax.set_xlabel('draft depth d')
  ax.set_ylim(0, 1.05)
  ax.set_xticks(depths)
  ax.legend(fontsize=8)
  ax.set_title(title, fontsize=9)
  fig.tight_layout()
  fig.savefig(os.path.join(out_dir, 'acceptance_per_depth.png'), dpi=120)
  plt.close(fig)


def run(argv_flags) -> dict:
  f = argv_flags
  model, tokenizer, model_config, info = load_run(f.workdir, 'workdir', f.precision)
  draft_model = None
  if f.draft == 'model':
    if not f.draft_workdir:
      raise ValueError('--draft=model needs --draft_workdir (a trained, smaller run)')
    draft_model, draft_tok, _, _ = load_run(f.draft_workdir, 'draft_workdir', f.precision)
    if draft_tok.fingerprint != tokenizer.fingerprint:
      raise ValueError(f'--draft_workdir uses tokenizer {draft_tok.fingerprint}, the target '
                       f'{tokenizer.fingerprint}: they must match')
  elif f.draft == 'mtp' and not model_config.mtp_depth:
    raise ValueError(f'--draft=mtp: the checkpoint in {f.workdir} has no MTP modules (mtp_depth=0)')
  elif f.draft == 'medusa' and not model_config.medusa_heads:
    raise ValueError(f'--draft=medusa: the checkpoint in {f.workdir} has no Medusa heads')
  num_draft = f.num_draft or {'mtp': model_config.mtp_depth, 'medusa': model_config.medusa_heads,
                              'model': 4}[f.draft]

  from jax_spec.data import load_data  # pylint: disable=g-import-not-at-top
  train_info = info['train']
  data = load_data(tokenizer=tokenizer.kind,
                   workdir=f.workdir, data_path=train_info.get('data_path'),
                   vocab_size=train_info.get('vocab_size'))

  tree_spec = f.tree or ('default' if f.draft == 'medusa' else 'chain')
  derived_acc = None
  if f.derive_tree or tree_spec == 'derived':
    if f.draft == 'model':
      raise ValueError('--derive_tree needs draft heads (--draft=mtp or medusa)')
    tree, derived_acc = derive_tree(model, data, f.draft, f.tree_nodes, f.derive_topk,
                                    f.derive_batches)
    tree_spec = 'derived'
  else:
    tree = resolve_tree(tree_spec, num_draft)

  cache_len = f.cache_len or model_config.max_seq_len
  extra = tree.num_nodes + tree.max_depth + max(model_config.mtp_depth, 1) + 1
  if f.prompt_len + f.max_new_tokens + extra > cache_len:
    raise ValueError(f'prompt_len={f.prompt_len} + max_new_tokens={f.max_new_tokens} + {extra} '
                     f'slots for the tree exceed the cache ({cache_len} = --cache_len or the '
                     f'model\'s max_seq_len): shorten the prompt or the generation')
  prompts = data.validation_prompts(f.num_prompts, f.prompt_len)
  if f.num_prompts % f.batch_size:
    raise ValueError(f'--num_prompts={f.num_prompts} must be a multiple of --batch_size')

  name = f'{f.draft}_{f.acceptance}_{tree_spec.replace(":", "")}_T{f.temperature:g}'
  out_dir = f.output or os.path.join(f.workdir, 'speculative', name)
  os.makedirs(out_dir, exist_ok=True)
  if derived_acc is not None:
    with open(os.path.join(out_dir, 'tree.json'), 'w') as fh:
      json.dump({'choices': [list(c) for c in tree.choices],
                 'topk_accuracies': np.round(derived_acc, 5).tolist(),
                 'expected_tau': trees_lib.expected_accepted_length(tree, derived_acc)}, fh)
  eos = tokenizer.eos_id if f.stop_at_eos else None
  common = dict(max_new_tokens=f.max_new_tokens, temperature=f.temperature, top_k=f.top_k,
                top_p=f.top_p, eos_id=eos, cache_len=cache_len)
  rng = jax.random.key(f.seed)

  def baseline(p_BT, key):
    return decoding.generate(model, p_BT, jnp.full((p_BT.shape[0],), f.prompt_len, jnp.int32),
                             rng=key, **common)

  def speculative(p_BT, key):
    return decoding.speculative_generate(
        model, p_BT, jnp.full((p_BT.shape[0],), f.prompt_len, jnp.int32), drafter=f.draft,
        draft_model=draft_model, tree=tree, acceptance=f.acceptance, rng=key, **common)

  batches = [jnp.asarray(prompts[i:i + f.batch_size]) for i in range(0, f.num_prompts, f.batch_size)]
  keys = [jax.random.fold_in(rng, i + 1) for i in range(len(batches))]
  logging.info('warm-up (compiling both samplers)')
  # The warm-up is the first timed call itself (same arrays), so nothing is left to compile.
  _, compile_base = timed(lambda: baseline(batches[0], keys[0]))
  _, compile_spec = timed(lambda: speculative(batches[0], keys[0]))
  base_time = spec_time = 0.0
  base_tokens = spec_tokens = 0
  identical = True
  all_stats = []
  with runtime.count_compiles() as compiles:
    for p_BT, key in zip(tqdm(batches, desc='prompts'), keys):
      b_out, dt = timed(lambda: baseline(p_BT, key))
      base_time += dt
      base_tokens += int(np.asarray(b_out.lengths_B).sum())  # host sum: no jax op, no compile
      s_out, dt = timed(lambda: speculative(p_BT, key))
      spec_time += dt
      spec_tokens += int(np.asarray(s_out.lengths_B).sum())
      all_stats.append(s_out.stats)
      identical &= bool(np.array_equal(b_out.tokens_BN, s_out.tokens_BN)
                        and np.array_equal(b_out.lengths_B, s_out.lengths_B))
  if compiles[0]:
    logging.warning('%d XLA compile(s) inside the timed loop: the timings include them',
                    compiles[0])
  merged = decoding.SpeculativeStats(
      np.concatenate([np.asarray(s.verify_steps_B) for s in all_stats]),
      np.concatenate([np.asarray(s.accepted_B) for s in all_stats]),
      np.sum([np.asarray(s.accepted_hist_A) for s in all_stats], axis=0),
      np.sum([int(s.loop_steps) for s in all_stats]))
  stats = decoding.summarize(merged)
  results = {
      'config': {k: getattr(f, k) for k in (
          'workdir', 'draft', 'draft_workdir', 'acceptance', 'num_prompts', 'prompt_len',
          'batch_size', 'max_new_tokens', 'temperature', 'top_k', 'top_p', 'seed', 'stop_at_eos')},
      'precision': model.policy.name,
      'tree': {'name': tree_spec, 'choices': [list(c) for c in tree.choices],
               'num_nodes': tree.num_nodes, 'max_depth': tree.max_depth},
      'device': str(jax.devices()[0].device_kind),
      'baseline': {'tokens_per_s': base_tokens / base_time, 'tokens': base_tokens,
                   'seconds': base_time, 'compile_s': compile_base},
      'speculative': {'tokens_per_s': spec_tokens / spec_time, 'tokens': spec_tokens,
                      'seconds': spec_time, 'compile_s': compile_spec, **stats},
      'speedup': (spec_tokens / spec_time) / (base_tokens / base_time),
      'compiles_while_timing': compiles[0],
      'outputs_identical': identical if f.temperature == 0 else None,
  }
  with open(os.path.join(out_dir, 'results.json'), 'w') as fh:
    json.dump(results, fh, indent=2)
  plot(stats, out_dir, f'{f.draft} / {f.acceptance} / tree {tree_spec} ({tree.num_nodes} nodes) '
                       f'/ T={f.temperature:g}')
  print(f'\n{"":<12}{"tokens/s":>10}{"tau":>7}{"speedup":>9}   identical')
  print(f'{"baseline":<12}{results["baseline"]["tokens_per_s"]:>10.1f}{1.0:>7.2f}{1.0:>9.2f}')
  print(f'{"speculative":<12}{results["speculative"]["tokens_per_s"]:>10.1f}'
        f'{stats["mean_accepted_length"]:>7.2f}{results["speedup"]:>9.2f}   '
        f'{results["outputs_identical"]}')
  print(f'per-depth acceptance: {np.round(stats["acceptance_rate_per_depth"], 3).tolist()}; '
        f'results in {out_dir}')
  return results


def cli_main(run_fn, argv, *, required_workdir: str | None = None):
  """The absl `main` of the decoding experiments (this one and the quickstart): checks the
  arguments, sets INFO logging and the XLA:CPU flags, runs `run_fn(FLAGS)` and turns its
  ValueErrors into usage errors."""
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  if required_workdir and not FLAGS.workdir:
    raise app.UsageError(f'--workdir is required ({required_workdir})')
  logging.getLogger().setLevel(logging.INFO)
  runtime.configure_xla_cpu()
  try:
    return run_fn(FLAGS)
  except ValueError as e:
    raise app.UsageError(str(e)) from None


def main(argv):
  cli_main(run, argv, required_workdir='a trained run of experiments.train')


if __name__ == '__main__':
  define_flags()
  app.run(main)
