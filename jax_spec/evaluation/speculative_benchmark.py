"""Speculative decoding against the autoregressive baseline on a trained run, side by side.

`run_benchmark(BenchmarkOptions(workdir=...))` loads the run's latest checkpoint, takes prompts
from the validation split, compiles both samplers (warm-up), then times the jitted baseline
(`decoding.generate`) and the speculative sampler on the same prompts, interleaved prompt batch by
prompt batch so both see the same machine load. It writes `results.json`,
`accepted_length_hist.png` and `acceptance_per_depth.png` into the output directory and returns
the results. `experiments.speculative` (one configuration from flags) and
`experiments.quickstart` (every drafter of a fresh run) call it.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from jax_spec import decoding
from jax_spec import runtime
from jax_spec.data import load_data
from jax_spec.decoding import drafters as drafters_lib
from jax_spec.decoding import dynamic_tree
from jax_spec.decoding import text as text_lib
from jax_spec.decoding import trees as trees_lib
from jax_spec.evaluation import head_accuracy
from jax_spec.evaluation import plots
from jax_spec.training import restore
from jax_spec.training import workdir as workdir_lib

log = logging.getLogger(__name__)

DECODE_PRECISIONS = ('fp32', 'bf16', 'fp16')
DRAFTER_DTYPES = {'fp32': None, 'bf16': jnp.bfloat16}   # -> decoding.prepare(drafter_dtype=)
MATMUL_DTYPES = {'fp32': None, 'bf16': jnp.bfloat16}    # -> decoding.prepare(matmul_dtype=)


def default_tree(draft: str) -> str:
  """The tree a drafter gets when none is named: Medusa's static default tree, else a chain."""
  return 'default' if draft == 'medusa' else 'chain'


def _opt(default, help_text, choices=None, **kwargs):
  return dataclasses.field(default=default, metadata={'help': help_text, 'choices': choices},
                           **kwargs)


@dataclasses.dataclass(frozen=True)
class BenchmarkOptions:
  """One benchmark configuration (`experiments.speculative` has one flag per field)."""
  workdir: str = _opt(None, 'A trained run of experiments.train (the target model).')
  draft: str = _opt('mtp', 'Drafter: a name registered in jax_spec.decoding.drafters.')
  draft_workdir: str | None = _opt(None, 'Trained run of the draft model (--draft=model).')
  acceptance: str | None = _opt(None, "Acceptance rule: greedy | rejection | typical (default: "
                                "the sampler's).")
  tree: str | None = _opt(None, "chain | chainN | default | default:N | derived | JSON rank "
                          "paths | path to a .json file | dynamic[:N[:K]] (EAGLE-2 dynamic tree "
                          "of N nodes, K children per node, depth num_draft) (default: 'default' "
                          "for medusa, 'chain' otherwise).")
  num_draft: int | None = _opt(None, "Draft positions for named trees (default: the drafter's "
                               "heads / MTP depth; 4 for a draft model).")
  derive_tree: bool = _opt(False, 'Derive the tree from measured per-head accuracies.')
  tree_nodes: int = _opt(10, 'Non-root nodes of a derived tree.')
  derive_topk: int = _opt(8, 'Ranks measured per head when deriving a tree.')
  derive_batches: int = _opt(4, 'Validation batches (8 x 256 tokens) for --derive_tree.')
  num_prompts: int = _opt(8, 'Validation prompts (ignored with prompt_file).')
  prompt_file: str | None = _opt(None, 'A text file with one prompt per line (e.g. MT-Bench-style '
                                 'questions) instead of validation prompts.')
  prompt_len: int = _opt(64, 'Prompt length in tokens (bos + document start).')
  batch_size: int = _opt(1, 'Prompts per sampler call.')
  max_new_tokens: int = _opt(128, 'Tokens to generate per prompt.')
  temperature: float = _opt(0.0, 'Sampling temperature (0 = greedy).')
  top_k: int = _opt(0, 'Top-k filter (0 = off).')
  top_p: float = _opt(1.0, 'Top-p filter (1 = off).')
  stop_at_eos: bool = _opt(True, "Rows stop at the tokenizer's EOS.")
  cache_len: int | None = _opt(None, 'KV cache slots (default: each sampler sizes its cache to '
                               'the request, as `generate` does).')
  seed: int = _opt(0, 'Sampling seed.')
  timing_rounds: int = _opt(1, 'Times each prompt batch is decoded by both samplers, alternating '
                            '(the fastest of each counts: on a shared machine, the run least '
                            'disturbed).')
  # fp32 by default on every backend. On CPU for speed: XLA:CPU emulates bf16/fp16 matmuls (a
  # one-token bf16 step of the small preset takes 2x the fp32 one). On GPUs for exactness: a
  # T-token verify forward and a one-token decode step run differently tiled bf16 matmuls whose
  # rounded activations differ in the last bit, which flips greedy near-ties (docs/benchmarks.md).
  precision: str = _opt('fp32', 'Decoding precision of both samplers (fp32: see '
                        'jax_spec/evaluation/speculative_benchmark.py).', DECODE_PRECISIONS)
  drafter_dtype: str = _opt('fp32', "The drafter's matrices (EAGLE / MTP modules, Medusa "
                            "heads, a draft model): 'fp32', or 'bf16' (rounded; the CPU kernel "
                            "streams half the bytes; still lossless, see decoding.prepare).",
                            tuple(DRAFTER_DTYPES))
  matmul_dtype: str = _opt('fp32', "The CPU kernel's products: 'fp32', or 'bf16' (every matrix "
                           'rounded, activations rounded at each matmul: another model\'s '
                           'numbers, decoded faster; both samplers decode it, so still '
                           'lossless; see decoding.prepare).', tuple(MATMUL_DTYPES))
  output: str | None = _opt(None, 'Output directory (default: <workdir>/speculative/<name>).')
  profile_steps: str | None = _opt(None, 'A:B: write a jax.profiler trace of the timed prompt '
                                   'batches A <= i < B into <output>/profile.')

  def __post_init__(self):
    if not self.workdir or not os.path.isdir(self.workdir):
      raise ValueError(f'workdir {self.workdir!r} is not a directory (a workdir of '
                       'experiments.train)')
    if self.draft not in drafters_lib.registered():
      raise ValueError(f'draft must be one of {sorted(drafters_lib.registered())}, '
                       f'got {self.draft!r}')
    if self.draft == 'model' and not self.draft_workdir:
      raise ValueError('draft=model needs draft_workdir (a trained, smaller run)')
    if self.precision not in DECODE_PRECISIONS:
      raise ValueError(f'precision must be one of {DECODE_PRECISIONS}, got {self.precision!r}')
    if self.drafter_dtype not in DRAFTER_DTYPES:
      raise ValueError(f'drafter_dtype must be one of {tuple(DRAFTER_DTYPES)}, got '
                       f'{self.drafter_dtype!r}')
    if self.matmul_dtype not in MATMUL_DTYPES:
      raise ValueError(f'matmul_dtype must be one of {tuple(MATMUL_DTYPES)}, got '
                       f'{self.matmul_dtype!r}')
    for name in ('num_prompts', 'prompt_len', 'batch_size', 'max_new_tokens', 'tree_nodes',
                 'derive_topk', 'derive_batches', 'timing_rounds'):
      value = getattr(self, name)
      if not isinstance(value, int) or value < 1:
        raise ValueError(f'{name} must be an int >= 1, got {value!r}')
    if self.prompt_file is not None:
      if not os.path.isfile(self.prompt_file):
        raise ValueError(f'prompt_file {self.prompt_file!r} is not a file')
      if len(read_prompt_file(self.prompt_file)) % self.batch_size:
        raise ValueError(f'prompt_file {self.prompt_file!r}: its number of prompts must be a '
                         f'multiple of batch_size={self.batch_size}')
    elif self.num_prompts % self.batch_size:
      raise ValueError(f'num_prompts={self.num_prompts} must be a multiple of '
                       f'batch_size={self.batch_size}')
    if (self.derive_tree or self.tree == 'derived') and self.draft not in head_accuracy.HEAD_DRAFTERS:
      raise ValueError(f'derive_tree needs draft heads (draft one of {head_accuracy.HEAD_DRAFTERS})')
    runtime.parse_profile_steps(self.profile_steps)

  @property
  def tree_spec(self) -> str:
    if self.derive_tree:
      return 'derived'
    return self.tree or default_tree(self.draft)

  @property
  def name(self) -> str:
    return (f'{self.draft}_{self.acceptance or "default"}_{self.tree_spec.replace(":", "")}'
            f'_T{self.temperature:g}')

  @property
  def output_dir(self) -> str:
    return self.output or os.path.join(self.workdir, 'speculative', self.name)


def load_run(workdir: str, what: str = 'workdir', precision: str = 'fp32'):
  """(model, tokenizer, model_config, run_info) of a trained run; errors name the option `what`."""
  if not workdir or not os.path.isdir(workdir):
    raise ValueError(f'{what}={workdir!r} is not a directory (a workdir of experiments.train)')
  info = workdir_lib.read_run_info(workdir)
  model, tokenizer, model_config = restore.load_model_from_workdir(workdir, policy=precision,
                                                                   info=info)
  return model, tokenizer, model_config, info


def resolve_tree(spec: str, num_draft: int):
  """A tree name (trees.get_tree), a JSON list of rank paths, a path to such a .json file, or a
  dynamic tree ('dynamic[:N[:K]]', `dynamic_tree.parse`)."""
  if spec.startswith('dynamic'):
    return dynamic_tree.parse(spec, num_draft)
  if spec.startswith('[') or spec.endswith('.json'):
    if spec.endswith('.json'):
      with open(spec) as f:
        spec = f.read()
    return trees_lib.Tree.from_choices(json.loads(spec), num_heads=num_draft)
  return trees_lib.get_tree(spec, num_draft)


def _timed(fn):
  t0 = time.perf_counter()
  out = jax.block_until_ready(fn())
  return out, time.perf_counter() - t0


def _merge_stats(all_stats) -> decoding.SpeculativeStats:
  return decoding.SpeculativeStats(
      np.concatenate([np.asarray(s.verify_steps_B) for s in all_stats]),
      np.concatenate([np.asarray(s.accepted_B) for s in all_stats]),
      np.sum([np.asarray(s.accepted_hist_I) for s in all_stats], axis=0),
      np.sum([int(s.loop_steps) for s in all_stats]))


def read_prompt_file(path: str, what: str = 'prompt_file', allow_empty: bool = False) -> list[str]:
  """One prompt per non-empty line; an empty file is an error naming the option `what`."""
  with open(path) as fh:
    prompts = [line.rstrip('\n') for line in fh if line.strip()]
  if not prompts and not allow_empty:
    raise ValueError(f'{what} {path!r} has no non-empty line')
  return prompts


def _prompts(opts, data, tokenizer):
  """(tokens [N, P], lengths [N]): validation windows, or the prompt file's lines encoded as the
  model saw documents and right-padded."""
  if opts.prompt_file is None:
    tokens = data.validation_prompts(opts.num_prompts, opts.prompt_len)
    return tokens, np.full((tokens.shape[0],), opts.prompt_len, np.int32)
  seqs = [text_lib.encode_prompt(tokenizer, p) for p in read_prompt_file(opts.prompt_file)]
  return text_lib.right_pad(seqs, max(map(len, seqs)), tokenizer.pad_id)


def run_benchmark(opts: BenchmarkOptions) -> dict[str, Any]:
  """Runs the side-by-side benchmark of `opts`; writes and returns the results dict."""
  model, tokenizer, _, info = load_run(opts.workdir, 'workdir', opts.precision)
  draft_model = None
  if opts.draft == 'model':
    draft_model, draft_tok, _, _ = load_run(opts.draft_workdir, 'draft_workdir', opts.precision)
    if draft_tok.fingerprint != tokenizer.fingerprint:
      raise ValueError(f'draft_workdir uses tokenizer {draft_tok.fingerprint}, the target '
                       f'{tokenizer.fingerprint}: they must match')
  drafter_cls = drafters_lib.registered()[opts.draft]
  drafter_cls.check_model(model, draft_model)
  tree_spec = opts.tree_spec
  num_draft = opts.num_draft or drafter_cls.default_depth(model, draft_model, tree_spec)

  train_info = info['train']
  data = load_data(tokenizer=tokenizer, workdir=opts.workdir,
                   data_path=train_info.get('data_path'), vocab_size=train_info.get('vocab_size'))
  derived_acc = None
  if tree_spec == 'derived':
    tree, derived_acc = head_accuracy.derive_tree(model, data, opts.draft, opts.tree_nodes,
                                                  topk=opts.derive_topk,
                                                  num_batches=opts.derive_batches)
  else:
    tree = resolve_tree(tree_spec, num_draft)
  prompts, prompt_lengths = _prompts(opts, data, tokenizer)

  out_dir = opts.output_dir
  os.makedirs(out_dir, exist_ok=True)
  if derived_acc is not None:
    with open(os.path.join(out_dir, 'tree.json'), 'w') as fh:
      json.dump({'choices': [list(c) for c in tree.choices],
                 'topk_accuracies': np.round(derived_acc, 5).tolist(),
                 'expected_tau': trees_lib.expected_accepted_length(tree, derived_acc)}, fh)
  common = dict(max_new_tokens=opts.max_new_tokens, temperature=opts.temperature,
                top_k=opts.top_k, top_p=opts.top_p,
                eos_id=tokenizer.eos_id if opts.stop_at_eos else None,
                cache_len=opts.cache_len)
  spec_kwargs = {} if opts.acceptance is None else {'acceptance': opts.acceptance}

  # Both samplers decode one model prepared once (split, decode weights packed), as a server
  # would: the timed calls are prefill + decode loop, not per-call preparation.
  prepared, prepare_s = _timed(lambda: decoding.prepare(
      model, draft_model, drafter_dtype=DRAFTER_DTYPES[opts.drafter_dtype],
      matmul_dtype=MATMUL_DTYPES[opts.matmul_dtype]))

  def baseline(batch, key):
    return decoding.generate(prepared, *batch, rng=key, **common)

  def speculative(batch, key):
    return decoding.speculative_generate(prepared, *batch, drafter=opts.draft, tree=tree, rng=key,
                                         **spec_kwargs, **common)

  batches = [(jnp.asarray(prompts[i:i + opts.batch_size]),
              jnp.asarray(prompt_lengths[i:i + opts.batch_size]))
             for i in range(0, len(prompts), opts.batch_size)]
  keys = [jax.random.fold_in(jax.random.key(opts.seed), i + 1) for i in range(len(batches))]
  log.info('warm-up (compiling both samplers)')
  # The warm-up is the first timed call itself (same arrays), so nothing is left to compile.
  _, compile_base = _timed(lambda: baseline(batches[0], keys[0]))
  _, compile_spec = _timed(lambda: speculative(batches[0], keys[0]))
  base_time = spec_time = 0.0
  base_tokens = spec_tokens = 0
  identical = True
  all_stats, texts = [], []
  profiler = runtime.StepProfiler(opts.profile_steps, os.path.join(out_dir, 'profile'))
  with runtime.count_compiles() as compiles, profiler:
    for i, (batch, key) in enumerate(zip(tqdm(batches, desc='prompts'), keys)):
      profiler.step(i)
      base_dts, spec_dts = [], []
      for _ in range(opts.timing_rounds):   # the same inputs and key: the same outputs each round
        b_out, dt = _timed(lambda: baseline(batch, key))
        base_dts.append(dt)
        s_out, dt = _timed(lambda: speculative(batch, key))
        spec_dts.append(dt)
      base_time += min(base_dts)
      spec_time += min(spec_dts)
      base_tokens += int(np.asarray(b_out.lengths_B).sum())  # host sum: no jax op, no compile
      spec_tokens += int(np.asarray(s_out.lengths_B).sum())
      all_stats.append(s_out.stats)
      texts += [tokenizer.decode(t[:n].tolist()) for t, n in
                zip(np.asarray(s_out.tokens_BN), np.asarray(s_out.lengths_B))]
      identical &= bool(np.array_equal(b_out.tokens_BN, s_out.tokens_BN)
                        and np.array_equal(b_out.lengths_B, s_out.lengths_B))
  if compiles[0]:
    log.warning('%d XLA compile(s) inside the timed loop: the timings include them', compiles[0])
  stats = decoding.summarize(_merge_stats(all_stats))
  results = {
      'config': {k: getattr(opts, k) for k in (
          'workdir', 'draft', 'draft_workdir', 'acceptance', 'num_prompts', 'prompt_file',
          'prompt_len', 'batch_size', 'max_new_tokens', 'temperature', 'top_k', 'top_p', 'seed',
          'stop_at_eos', 'timing_rounds', 'drafter_dtype', 'matmul_dtype')},
      'precision': model.policy.name,
      'tree': {'name': tree_spec, 'choices': ([list(c) for c in tree.choices]
                                              if isinstance(tree, trees_lib.Tree) else None),
               'num_nodes': tree.num_nodes, 'max_depth': tree.max_depth},
      'device': str(jax.devices()[0].device_kind),
      'baseline': {'tokens_per_s': base_tokens / base_time, 'tokens': base_tokens,
                   'seconds': base_time, 'compile_s': compile_base},
      'speculative': {'tokens_per_s': spec_tokens / spec_time, 'tokens': spec_tokens,
                      'seconds': spec_time, 'compile_s': compile_spec, **stats},
      'speedup': (spec_tokens / spec_time) / (base_tokens / base_time),
      'prepare_s': prepare_s,   # once, untimed (decoding.prepare; its first call compiles)
      'compiles_while_timing': compiles[0],
      'outputs_identical': identical if opts.temperature == 0 else None,
      # Runs of spaces are easy to draft: a high fraction flatters tau.
      'whitespace_fraction': whitespace_fraction(texts),
      'output_dir': out_dir,
  }
  results['config']['num_prompts'] = len(prompts)
  if profiler.trace_dir is not None:
    results['profile_dir'] = profiler.trace_dir
  with open(os.path.join(out_dir, 'results.json'), 'w') as fh:
    json.dump(results, fh, indent=2)
  results['plots'] = plots.plot_acceptance(
      stats, out_dir, f'{opts.draft} / {opts.acceptance or "default"} / tree {tree_spec} '
      f'({tree.num_nodes} nodes) / T={opts.temperature:g}')
  return results


def whitespace_fraction(texts: list[str]) -> float:
  """The fraction of whitespace characters in the decoded continuations."""
  chars = sum(len(t) for t in texts)
  return sum(c.isspace() for t in texts for c in t) / max(chars, 1)


def format_table(results: dict[str, Any]) -> str:
  """The printed summary of one benchmark."""
  stats = results['speculative']
  return '\n'.join([
      f'{"":<12}{"tokens/s":>10}{"tau":>7}{"speedup":>9}   identical',
      f'{"baseline":<12}{results["baseline"]["tokens_per_s"]:>10.1f}{1.0:>7.2f}{1.0:>9.2f}',
      f'{"speculative":<12}{stats["tokens_per_s"]:>10.1f}{stats["mean_accepted_length"]:>7.2f}'
      f'{results["speedup"]:>9.2f}   {results["outputs_identical"]}',
      f'per-depth acceptance: {np.round(stats["acceptance_rate_per_depth"], 3).tolist()}; '
      f'results in {results["output_dir"]}'])
