"""What a speculative step costs, part by part, in plain one-token steps (the verify cost model).

Speedup = tau / (cost of a speculative step in plain steps). `run_cost_model(CostOptions(...))`
builds random-weight models of a preset (timing does not depend on the weights' values), compiles
every part as a jitted `fori_loop` over a warm KV cache whose trip count is an argument, then
times all parts interleaved, round by round, so they see the same machine load; each part at
`steps` and `2 steps` iterations, differenced (`verify_ab.per_iteration`), so what a call does
once (packing the weights, zeroing the cache, a prefill) cancels. Parts:

- `plain`: the one-token decode step (`models.extend` of one token, then `advance`); r(1) = 1.
- `verify_chain_T` / `verify_tree_T`: one trunk `extend` of T nodes with a chain (causal) or a
  Medusa-tree ancestor mask; r(T) = verify(T) / plain.
- `propose_<drafter>`: the drafter's own work per step, `propose` + `update` (MTP and the feature
  drafters draft in `update`), on fixed verify outputs.
- `accept_<tree>`: greedy acceptance + commit (chain: advance) + emission of one step.
- whole loops (`decoding.generate` and `decoding.speculative_generate`), timed at two
  `max_new_tokens` and differenced, so prefill cancels: ms per plain step and per speculative loop
  step, for every drafter and for a model drafting for itself at full acceptance ('model' with the
  target as draft model) and at zero acceptance (`NeverAgreeingDrafter`: the same work, every draft
  rejected).

Predicted speedup of a drafter = tau / ((propose + verify(T) + accept) / plain), with tau measured
by its loop; measured speedup = plain `generate` time / `speculative_generate` time for the same
prompt and `max_new_tokens` (whole calls). A `jax.profiler` trace of one plain and one speculative
(full acceptance) call is summarised as the top XLA ops by self time.
"""
from __future__ import annotations

import collections
import dataclasses
import glob
import gzip
import json
import logging
import os
import platform
import re
import statistics
import tempfile
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm import tqdm

from jax_spec import decoding
from jax_spec import models
from jax_spec import precision as precision_lib
from jax_spec import runtime
from jax_spec.decoding import acceptance as acceptance_lib
from jax_spec.decoding import drafters as drafters_lib
from jax_spec.decoding import trees as trees_lib
from jax_spec.decoding.autoregressive import matmul_precision
from jax_spec.decoding.drafters.draft_model import DraftModelDrafter
from jax_spec.decoding.speculative import emit
from jax_spec.evaluation import verify_ab
from jax_spec.kernels import rows_matmul
from jax_spec.models.kv_cache import MAX_NEW_TOKENS_PER_CALL
from jax_spec.training.state import build_model

log = logging.getLogger(__name__)

DRAFTERS = ('mtp', 'medusa', 'model', 'eagle', 'mtp_recursive')
FULL, ZERO = 'self_full', 'self_zero'      # a model drafting for itself: every / no draft accepted


class NeverAgreeingDrafter(DraftModelDrafter):
  """The draft-model drafter with every draft replaced by (its argmax + 1) mod V.

  With the target as its own draft model and greedy acceptance no draft is ever accepted, at
  exactly the cost of the full-acceptance drafter: the zero-acceptance end of the cost model.
  """
  name = 'model_never_agreeing'

  def _pick(self, logits_BV, select, j):
    token_B, q_BV = super()._pick(logits_BV, select, j)
    return (token_B + 1) % logits_BV.shape[-1], q_BV


if NeverAgreeingDrafter.name not in drafters_lib.registered():
  drafters_lib.register(NeverAgreeingDrafter)


@dataclasses.dataclass(frozen=True)
class CostOptions:
  """One cost-model run (`experiments.bench_verify` has one flag per field)."""
  config: str = 'small'
  precision: str = 'fp32'
  draft_config: str = 'tiny'          # the 'model' drafter's draft model (target vocabulary)
  verify_tokens: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64)
  tree_tokens: tuple[int, ...] = (4, 8, 16, 32, 64)
  drafters: tuple[str, ...] = DRAFTERS
  depth: int = 3                      # chain depth of 'model', 'eagle', 'mtp_recursive', self
  eagle_d_ff: int | None = None       # MLP width of the EAGLE block (None: the trunk's d_ff)
  cache_len: int = 512
  prefix_len: int = 128
  steps: int = 16                     # iterations per timed call of a part
  repeats: int = 7                    # timed calls per part (medians are reported)
  prompt_len: int = 16                # whole loops: prompt and the two max_new_tokens
  new_tokens: tuple[int, int] = (32, 96)
  profile: bool = True
  loops: bool = True                  # False: only the verify sweep (no drafters, loops, profile)
  seed: int = 0

  def __post_init__(self):
    if self.config not in models.PRESETS or self.draft_config not in models.PRESETS:
      raise ValueError(f'config and draft_config must be presets {sorted(models.PRESETS)}, got '
                       f'{self.config!r}, {self.draft_config!r}')
    unknown = sorted(set(self.drafters) - set(DRAFTERS))
    if unknown:
      raise ValueError(f'drafters must be among {DRAFTERS}, got {unknown}')
    limit = MAX_NEW_TOKENS_PER_CALL
    if not self.verify_tokens or min(self.verify_tokens + self.tree_tokens, default=1) < 1 or max(
        self.verify_tokens + self.tree_tokens) > limit:
      raise ValueError(f'verify_tokens / tree_tokens must be non-empty / in [1, {limit}], got '
                       f'{self.verify_tokens}, {self.tree_tokens}')
    widest = max(self.verify_tokens + self.tree_tokens + (self.depth + 2,))
    if self.prefix_len + 2 * self.steps + widest > self.cache_len:
      raise ValueError(f'prefix_len + 2 steps + {widest} (the widest verify; parts run steps and '
                       f'2 steps iterations) must fit in cache_len '
                       f'{self.cache_len}')
    short, long = self.new_tokens
    if not 1 < short < long:
      raise ValueError(f'new_tokens must be (short, long) with 1 < short < long, got '
                       f'{self.new_tokens}')
    if self.depth < 1 or self.steps < 1 or self.repeats < 1:
      raise ValueError('depth, steps and repeats must be >= 1')


# --- the timed parts ------------------------------------------------------------------------------

def verify_loop(model, tree: trees_lib.Tree, opts: CostOptions) -> Callable[[], jax.Array]:
  """`steps` trunk verify forwards of `tree`'s nodes; each commits one token (the cache grows)."""
  return verify_ab.verify_loop(model, tree.depth_T, tree.ancestor_mask_TT, opts.cache_len,
                               opts.prefix_len, opts.steps)


def _verified_step(model, tree, opts):
  """One prefill + verify of `tree` on a fixed prompt: the fixed inputs of the drafter and
  acceptance parts (outputs of a real verify, so shapes and values are the loop's)."""
  prompts_BT = (jnp.arange(opts.prefix_len, dtype=jnp.int32) % model.config.vocab_size)[None]
  lengths_B = jnp.array([opts.prefix_len], jnp.int32)
  cache = models.init_cache(model, 1, opts.cache_len)
  prefill, cache = models.prefill(model, prompts_BT, lengths_B, cache)
  root_B = jnp.argmax(prefill.logits_BTV[:, -1], -1).astype(jnp.int32)
  return prompts_BT, lengths_B, prefill, cache, root_B


def propose_loop(model, own, drafter: drafters_lib.Drafter, opts) -> Callable[[], jax.Array]:
  """`steps` drafter steps (`propose` + `update`) against one fixed verify (nothing accepted)."""
  graphdef, state = nnx.split(model)
  own_graphdef, own_state = nnx.split(own) if own is not None else (None, None)
  tree = drafter.tree

  @jax.jit
  def run(state, own_state, num_steps):
    m = nnx.merge(graphdef, state)
    ctx = drafters_lib.Context(m, nnx.merge(own_graphdef, own_state) if own is not None else None)
    prompts_BT, lengths_B, prefill, cache, root_B = _verified_step(m, tree, opts)
    key = jax.random.key(opts.seed)
    dstate = drafter.init(ctx, drafters_lib.Prefill(prefill, prompts_BT, lengths_B, root_B, key))
    candidates, _ = drafter.propose(ctx, dstate, root_B, key)
    outs, _ = models.extend(m, candidates.tokens_BT, jnp.asarray(tree.depth_T)[None],
                            jnp.asarray(tree.ancestor_mask_TT)[None], cache)
    acc = acceptance_lib.accept_greedy(tree, candidates.tokens_BT, outs.logits_BTV)
    acc = acceptance_lib.Accepted(jnp.zeros_like(acc.num_accepted_B),
                                  acc.path_BP.at[:, 1:].set(-1), acc.next_token_B)
    active_B = jnp.ones((1,), bool)

    def body(i, carry):
      dstate, root_B = carry
      candidates, dstate = drafter.propose(ctx, dstate, root_B, key)
      dstate = drafter.update(ctx, dstate, drafters_lib.Verify(
          outs, candidates.tokens_BT, acc, active_B, acc.num_accepted_B, lengths_B + i, key))
      return dstate, candidates.tokens_BT[:, -1]

    with rows_matmul.packed(models.decode_packs(m, ctx.module)):
      return jax.lax.fori_loop(0, num_steps, body, (dstate, root_B))[1]

  return lambda num_steps=opts.steps: run(state, own_state, jnp.int32(num_steps))


def accept_loop(model, tree: trees_lib.Tree, opts) -> Callable[[], jax.Array]:
  """`steps` x (greedy acceptance + commit + emission) on one fixed verify's logits."""
  graphdef, state = nnx.split(model)
  depth = tree.max_depth
  max_new = 2 * opts.steps * (depth + 1)   # room for the longer of the two timed counts

  @jax.jit
  def run(state, num_steps):
    m = nnx.merge(graphdef, state)
    _, _, _, cache, root_B = _verified_step(m, tree, opts)
    tokens_BT = (root_B[:, None] + jnp.arange(tree.num_nodes)) % m.config.vocab_size
    outs, cache_ext = models.extend(m, tokens_BT.astype(jnp.int32),
                                    jnp.asarray(tree.depth_T)[None],
                                    jnp.asarray(tree.ancestor_mask_TT)[None], cache)
    active_B = jnp.ones((1,), bool)

    def body(i, carry):
      cache, buffer_BN, num_out_B, bias = carry
      # `bias` is 0 but loop-carried, so XLA cannot hoist the acceptance out of the loop.
      toks_BT = ((tokens_BT + i) % m.config.vocab_size).astype(jnp.int32)
      acc = acceptance_lib.accept_greedy(tree, toks_BT, outs.logits_BTV + bias)
      keep_B = acc.num_accepted_B + 1
      cache = (models.advance(cache, keep_B) if tree.is_chain else
               models.commit(cache, jnp.maximum(acc.path_BP, 0), keep_B))
      buffer_BN, num_out_B, _ = emit(toks_BT, acc, acc.num_accepted_B, active_B,
                                     jnp.zeros((1,), bool), buffer_BN, num_out_B, jnp.int32(-1),
                                     pad_id=0, max_new_tokens=max_new)
      return cache.replace(lengths=cache_ext.lengths), buffer_BN, num_out_B, bias * 0.5

    buffer_BN = jnp.zeros((1, max_new + depth + 1), jnp.int32)
    carry = (cache_ext, buffer_BN, jnp.zeros((1,), jnp.int32), jnp.float32(0))
    return jax.lax.fori_loop(0, num_steps, body, carry)[1]

  return lambda num_steps=opts.steps: run(state, jnp.int32(num_steps))


# --- whole loops ----------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class LoopSpec:
  """A speculative configuration timed as a whole loop (and predicted from the parts)."""
  name: str                           # drafter name, or FULL / ZERO
  drafter: str
  tree: trees_lib.Tree
  uses_draft_model: bool = False      # 'model': the small draft model; FULL / ZERO: the target


def loop_specs(config: models.TransformerConfig, opts: CostOptions) -> list[LoopSpec]:
  chain = trees_lib.chain(opts.depth)
  specs = []
  for name in opts.drafters:
    if name == 'mtp':
      specs.append(LoopSpec(name, name, trees_lib.chain(config.mtp_depth)))
    elif name == 'medusa':
      specs.append(LoopSpec(name, name, trees_lib.default_tree(config.medusa_heads)))
    else:
      specs.append(LoopSpec(name, name, chain, uses_draft_model=name == 'model'))
  specs.append(LoopSpec(FULL, 'model', chain, uses_draft_model=True))
  specs.append(LoopSpec(ZERO, NeverAgreeingDrafter.name, chain, uses_draft_model=True))
  return specs


def _prompt(config, opts):
  rng = np.random.default_rng(opts.seed)
  return (jnp.asarray(rng.integers(0, config.vocab_size, (1, opts.prompt_len)), jnp.int32),
          jnp.array([opts.prompt_len], jnp.int32))


def plain_call(model, opts, max_new_tokens):
  prompts_BT, lengths_B = _prompt(model.config, opts)
  prepared = decoding.prepare(model)
  # One cache size for both lengths (and the parts): differencing two calls whose caches differ
  # would credit the longer call's larger cache to the steps (the attention reads every slot).
  return lambda: decoding.generate(prepared, prompts_BT, lengths_B, max_new_tokens=max_new_tokens,
                                   cache_len=opts.cache_len)


def speculative_call(model, draft_model, spec: LoopSpec, opts, max_new_tokens):
  prompts_BT, lengths_B = _prompt(model.config, opts)
  prepared = decoding.prepare(model, draft_model)
  return lambda: decoding.speculative_generate(
      prepared, prompts_BT, lengths_B, drafter=spec.drafter, tree=spec.tree,
      max_new_tokens=max_new_tokens, cache_len=opts.cache_len)


# --- the run --------------------------------------------------------------------------------------

def build_models(opts: CostOptions):
  """Target (with every drafter's heads: MTP, Medusa, an EAGLE module) and the draft model."""
  policy = precision_lib.get_policy(opts.precision)
  config = models.PRESETS[opts.config]
  if 'eagle' in opts.drafters and not config.eagle_layers:
    config = dataclasses.replace(config, eagle_layers=1)
  if opts.eagle_d_ff is not None:
    config = dataclasses.replace(config, eagle_d_ff=opts.eagle_d_ff)
  draft_config = dataclasses.replace(models.PRESETS[opts.draft_config],
                                     vocab_size=config.vocab_size, mtp_depth=0, medusa_heads=0)
  return build_model(config, policy, opts.seed), build_model(draft_config, policy, opts.seed + 1)


def _median_ms(times):
  return 1e3 * statistics.median(times)


def time_interleaved(fns: dict[str, Callable[..., Any]], repeats: int, desc: str,
                     steps: int | None = None) -> dict:
  """Compiles (first call) then times every fn once per round, `repeats` rounds; seconds lists:
  per call, or with `steps` per iteration of `fn(num_steps)` (`verify_ab.per_iteration`)."""
  for name, fn in tqdm(fns.items(), desc=f'compile {desc}', leave=False):
    jax.block_until_ready(fn())
  times = {name: [] for name in fns}
  with runtime.count_compiles() as compiles:
    for _ in tqdm(range(repeats), desc=f'time {desc}', leave=False):
      for name, fn in fns.items():
        times[name].append(verify_ab.fastest(fn) if steps is None
                           else verify_ab.per_iteration(fn, steps))
  if compiles[0]:
    log.warning('%d compiles inside the timed %s loop', compiles[0], desc)
  return times


def run_cost_model(opts: CostOptions, workdir: str | None = None) -> dict[str, Any]:
  """Times every part and whole loop (see the module docstring); returns (and writes) results."""
  model, draft_model = build_models(opts)
  config = model.config
  specs = loop_specs(config, opts) if opts.loops else []
  max_heads = max(len(p) for p in trees_lib.MC_SIM_7B_63)
  # Parts. The plain step is the verify of a one-node chain, so r(1) == 1 by construction; a
  # loop's tree reuses the sweep's part when it is the same tree.
  plain_tree = trees_lib.chain(0)
  verify_names = {plain_tree.choices: 'plain'}
  verify_trees = {'plain': plain_tree}
  for t in opts.verify_tokens:
    if t > 1:
      verify_trees[f'verify_chain_{t}'] = trees_lib.chain(t - 1)
  for t in opts.tree_tokens:
    if t > 1:
      verify_trees[f'verify_tree_{t}'] = trees_lib.default_tree(max_heads, t - 1)
  for name, tree in verify_trees.items():
    verify_names.setdefault(tree.choices, name)
  parts: dict[str, Callable[[], Any]] = {name: verify_loop(model, tree, opts)
                                         for name, tree in verify_trees.items()}
  spec_verify, spec_accept = {}, {}
  for spec in specs:
    key = spec.tree.choices
    if key not in verify_names:
      verify_names[key] = f'verify_{spec.name}'
      parts[verify_names[key]] = verify_loop(model, spec.tree, opts)
    spec_verify[spec.name] = verify_names[key]
    spec_accept[spec.name] = f'accept_{spec.tree.num_nodes}_{"chain" if spec.tree.is_chain else spec.name}'
    if spec_accept[spec.name] not in parts:
      parts[spec_accept[spec.name]] = accept_loop(model, spec.tree, opts)
    own_model = (draft_model if spec.name == 'model' else model) if spec.uses_draft_model else None
    drafter_cls = drafters_lib.registered()[spec.drafter]
    drafter = drafter_cls(tree=spec.tree, sampling=decoding.SamplingConfig(0.0, 0, 1.0),
                          sample_drafts=False, cache_len=opts.cache_len)
    parts[f'propose_{spec.name}'] = propose_loop(model, drafter_cls.own_module(model, own_model),
                                                 drafter, opts)
  loops: dict[str, Callable[[], Any]] = {}
  for n in opts.new_tokens if opts.loops else ():
    loops[f'plain@{n}'] = plain_call(model, opts, n)
    for spec in specs:
      own_model = (draft_model if spec.name == 'model' else model) if spec.uses_draft_model else None
      loops[f'{spec.name}@{n}'] = speculative_call(model, own_model, spec, opts, n)

  with matmul_precision(model):
    part_times = time_interleaved(parts, opts.repeats, 'parts', steps=opts.steps)
    loop_times = time_interleaved(loops, opts.repeats, 'loops')
    # Blocked: an output still computing would land in the profile's trace.
    loop_outputs = jax.block_until_ready({name: fn() for name, fn in loops.items()})
    profile = profile_loops(loops[f'plain@{opts.new_tokens[1]}'],
                            loops[f'{FULL}@{opts.new_tokens[1]}']) if opts.profile and loops else None

  per_step = {name: _median_ms(t) for name, t in part_times.items()}
  for name, ms in per_step.items():
    if ms <= 0:
      log.warning('part %s: %.4f ms per iteration, below the timer noise; raise steps', name, ms)
  plain = per_step['plain']
  # r(T) from each timed round: the median of per-round ratios (robust to load drifting).
  round_ratio = {name: statistics.median(a / b for a, b in zip(t, part_times['plain']))
                 for name, t in part_times.items()}
  verify_rows = []
  for name, tree in verify_trees.items():
    t = tree.num_nodes
    verify_rows.append({'mask': 'tree' if name.startswith('verify_tree') else 'chain', 'tokens': t,
                        'ms_per_step': per_step[name], 'ratio': round_ratio[name],
                        'ceiling_speedup': t / round_ratio[name]})

  short, long = opts.new_tokens

  def per_loop_step(name, steps):
    """ms per loop step from each round's long - short difference (prefill cancels), median."""
    return 1e3 * statistics.median((a - b) / steps for a, b in
                                   zip(loop_times[f'{name}@{long}'], loop_times[f'{name}@{short}']))

  plain_loop_ms = per_loop_step('plain', long - short) if loops else None
  drafter_rows = []
  for spec in specs:
    out_long, out_short = loop_outputs[f'{spec.name}@{long}'], loop_outputs[f'{spec.name}@{short}']
    stats = decoding.summarize(out_long.stats, out_long.lengths_B)
    plain_long = loop_outputs[f'plain@{long}']
    steps_long, steps_short = int(out_long.stats.loop_steps), int(out_short.stats.loop_steps)
    step_ms = per_loop_step(spec.name, max(steps_long - steps_short, 1))
    cost = {'propose': round_ratio[f'propose_{spec.name}'],
            'verify': round_ratio[spec_verify[spec.name]],
            'accept': round_ratio[spec_accept[spec.name]]}
    predicted_cost = sum(cost.values())
    tau = stats['mean_accepted_length']
    drafter_rows.append({
        'name': spec.name, 'drafter': spec.drafter, 'tree_nodes': spec.tree.num_nodes,
        'tau': tau,
        # Greedy speculative decoding is lossless: the same tokens as plain `generate`.
        'identical_to_plain': bool(np.array_equal(out_long.tokens_BN, plain_long.tokens_BN)), 'cost_parts': cost, 'predicted_step_cost': predicted_cost,
        'measured_step_cost': step_ms / plain_loop_ms,
        'predicted_speedup': tau / predicted_cost,
        'measured_speedup': statistics.median(
            a / b for a, b in zip(loop_times[f'plain@{long}'], loop_times[f'{spec.name}@{long}']))})
  results = {
      'options': dataclasses.asdict(opts), 'config': dataclasses.asdict(config),
      'device': jax.devices()[0].device_kind, 'backend': jax.default_backend(),
      'machine': platform.processor() or platform.machine(), 'cpu_count': os.cpu_count(),
      'xla_flags': os.environ.get('XLA_FLAGS', ''), 'jax': jax.__version__,
      'plain_step_ms': plain, 'plain_loop_step_ms': plain_loop_ms,
      'parts_ms_per_step': per_step, 'verify': verify_rows, 'drafters': drafter_rows,
      'profile': profile}
  if workdir:
    write_results(results, workdir)
  return results


# --- the profile ----------------------------------------------------------------------------------

def _self_times(events):
  """Exclusive time per event name, for complete ('X') events on one thread (nested by time)."""
  out = collections.Counter()
  stack = []  # (end, name)
  for e in sorted(events, key=lambda e: (e['ts'], -e.get('dur', 0))):
    start, dur = e['ts'], e.get('dur', 0)
    while stack and stack[-1][0] <= start:
      stack.pop()
    if stack:
      out[stack[-1][1]] -= dur
    out[e['name']] += dur
    stack.append((start + dur, e['name']))
  return out


def top_ops(trace_json: dict, top: int = 15, by_kind: bool = False) -> list[dict]:
  """The XLA ops of a Perfetto trace by self time: events on XLA runtime threads (CPU) or on
  device processes (GPU); host Python and PjRt bookkeeping events are left out. On XLA:CPU the
  self time of `ThunkExecutor::Execute` is the runtime's own time between the ops it runs.
  `by_kind` sums instructions of one kind ('dot.118' and 'dot.20' are both 'dot')."""
  events = trace_json['traceEvents'] if isinstance(trace_json, dict) else trace_json
  meta = lambda kind: {(e.get('pid'), e.get('tid') if kind == 'thread_name' else None):
                       e['args'].get('name', '') for e in events
                       if e.get('ph') == 'M' and e.get('name') == kind}
  threads, procs = meta('thread_name'), meta('process_name')
  by_thread = collections.defaultdict(list)
  for e in events:
    # 'end: op' markers, and the caller's wait for the whole program, are not ops.
    if e.get('ph') != 'X' or e['name'].startswith('end: ') or 'wait for completion' in e['name']:
      continue
    thread = threads.get((e.get('pid'), e.get('tid')), '')
    proc = procs.get((e.get('pid'), None), '')
    if thread.startswith('tf_XLA') or proc.startswith('/device:'):
      by_thread[(e.get('pid'), e.get('tid'))].append(e)
  total = collections.Counter()
  counts = collections.Counter()
  for evs in by_thread.values():
    total.update(_self_times(evs))
    counts.update(e['name'] for e in evs)
  if by_kind:   # 'dot.118' -> 'dot', 'copy_dot_fusion.3' -> 'copy_dot_fusion'
    kinds, kind_counts = collections.Counter(), collections.Counter()
    for name, us in total.items():
      kinds[name.split('.')[0]] += us
      kind_counts[name.split('.')[0]] += counts[name]
    total, counts = kinds, kind_counts
  all_us = sum(v for v in total.values() if v > 0) or 1.0
  return [{'op': name, 'self_us': us, 'calls': counts[name], 'share': us / all_us}
          for name, us in total.most_common(top) if us > 0]


def _hlo_table(hlo_text: str, name: str) -> list[str]:
  start = hlo_text.find(f'\n{name}\n')
  if start < 0:
    return []
  lines = []
  for line in hlo_text[start + len(name) + 2:].splitlines():
    if not line.strip():
      break
    lines.append(line)
  return lines


def hlo_stacks(hlo_text: str) -> dict[str, list[tuple[str, str, int]]]:
  """Python call stack (outermost first, `(file basename, function, line)`) of every instruction
  of an optimized HLO module's text (`compiled.as_text()` or an XLA dump), from its
  `stack_frame_id` metadata and the module's FileNames / FunctionNames / FileLocations /
  StackFrames tables. (The text prints a frame's parent as the parent's id + 1; 1 is a root.)
  Instructions without stack metadata are left out."""
  fields = lambda line: {k: int(v) for k, v in re.findall(r'(\w+)=(\d+)', line)}
  files = {int(l.split()[0]): os.path.basename(l.split(None, 1)[1].strip('"'))
           for l in _hlo_table(hlo_text, 'FileNames')}
  funcs = {int(l.split()[0]): l.split(None, 1)[1].strip('"')
           for l in _hlo_table(hlo_text, 'FunctionNames')}
  locations = {}
  for line in _hlo_table(hlo_text, 'FileLocations'):
    f = fields(line)
    locations[int(line.split()[0])] = (files.get(f['file_name_id'], '?'),
                                       funcs.get(f['function_name_id'], '?'), f['line'])
  frames = {int(l.split()[0]): fields(l) for l in _hlo_table(hlo_text, 'StackFrames')}
  cache: dict[int, list] = {}

  def stack(frame_id):
    if frame_id not in cache:
      f = frames.get(frame_id)
      if f is None:
        cache[frame_id] = []
      else:
        parent = f['parent_frame_id'] - 1
        outer = stack(parent) if 0 < parent < frame_id else []
        cache[frame_id] = outer + [locations.get(f['file_location_id'], ('?', '?', 0))]
    return cache[frame_id]

  return {m.group(1): stack(int(m.group(2))) for m in
          re.finditer(r'^\s*(?:ROOT )?%([\w.\-]+) = .*?stack_frame_id=(\d+)', hlo_text, re.M)}


def region_of(stack: list[tuple[str, str, int]], anchor: str) -> str:
  """The call made from the innermost frame of function `anchor` (e.g. a loop body), as
  'line: function' (one frame deeper too, when there is one); 'outside <anchor>' otherwise."""
  for i in range(len(stack) - 1, -1, -1):
    if stack[i][1] == anchor:
      inner = stack[i + 1:i + 3]
      if not inner:
        return f'{stack[i][2]}: {anchor}'
      return f'{stack[i][2]}: ' + ' > '.join(fn for _, fn, _ in inner)
  return f'outside {anchor}'


def top_regions(trace_json: dict, stacks: dict, anchor: str, top: int = 20) -> list[dict]:
  """`top_ops`' self times summed by source region (`region_of` each op's stack). Ops the HLO
  gives no stack (the runtime's own events; some dots inside nested computations) are grouped by
  kind, as '[dot]'."""
  per_op = top_ops(trace_json, top=1 << 30)
  total = collections.Counter()
  calls = collections.Counter()
  for o in per_op:
    stack = stacks.get(o['op'])
    region = region_of(stack, anchor) if stack else f"[{o['op'].split('.')[0]}]"
    total[region] += o['self_us']
    calls[region] += o['calls']
  all_us = sum(total.values()) or 1.0
  return [{'region': r, 'self_us': us, 'calls': calls[r], 'share': us / all_us}
          for r, us in total.most_common(top)]


def trace_call(fn: Callable[[], Any]) -> dict:
  """The Perfetto trace (JSON) of one `jax.profiler`-traced call of `fn`."""
  with tempfile.TemporaryDirectory() as tmp:
    with jax.profiler.trace(tmp, create_perfetto_trace=True):
      jax.block_until_ready(fn())
    paths = glob.glob(os.path.join(tmp, 'plugins', 'profile', '*', 'perfetto_trace.json.gz'))
    if not paths:
      raise RuntimeError(f'jax.profiler wrote no perfetto_trace.json.gz under {tmp}')
    with gzip.open(paths[0]) as fh:
      return json.load(fh)


def profile_loops(plain_fn, speculative_fn, top: int = 15) -> dict[str, list[dict]]:
  """A `jax.profiler` trace of one call of each loop, summarised by `top_ops`."""
  out = {}
  for name, fn in (('plain', plain_fn), ('speculative_full_acceptance', speculative_fn)):
    trace = trace_call(fn)
    out[name] = top_ops(trace, top)
    out[f'{name}_by_kind'] = top_ops(trace, top, by_kind=True)
  return out


# --- output ---------------------------------------------------------------------------------------

def format_tables(results: dict[str, Any]) -> str:
  in_loop = results['plain_loop_step_ms']
  lines = [f"plain one-token step: {results['plain_step_ms']:.3f} ms (part)" +
           (f', {in_loop:.3f} ms (in generate)' if in_loop else ''), '',
           '| mask | T | ms / step | r(T) | T / r(T) |', '|---|---|---|---|---|']
  lines += [f"| {r['mask']} | {r['tokens']} | {r['ms_per_step']:.3f} | {r['ratio']:.2f} | "
            f"{r['ceiling_speedup']:.2f} |" for r in results['verify']]
  lines += ['', '| drafter | nodes | tau | propose | verify | accept | predicted cost | measured '
            'cost | predicted speedup | measured speedup | = plain |',
            '|---|---|---|---|---|---|---|---|---|---|---|']
  for r in results['drafters']:
    c = r['cost_parts']
    lines.append(f"| {r['name']} | {r['tree_nodes']} | {r['tau']:.2f} | {c['propose']:.2f} | "
                 f"{c['verify']:.2f} | {c['accept']:.2f} | {r['predicted_step_cost']:.2f} | "
                 f"{r['measured_step_cost']:.2f} | {r['predicted_speedup']:.2f}x | "
                 f"{r['measured_speedup']:.2f}x | {'yes' if r['identical_to_plain'] else 'NO'} |")
  for loop, ops in (results.get('profile') or {}).items():
    lines += ['', f'top ops, {loop} loop:', '| op | self ms | calls | share |', '|---|---|---|---|']
    lines += [f"| {o['op']} | {o['self_us'] / 1e3:.2f} | {o['calls']} | {100 * o['share']:.1f}% |"
              for o in ops]
  return '\n'.join(lines)


def plot(results: dict[str, Any], out_png: str) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
  for mask in ('chain', 'tree'):
    rows = [r for r in results['verify'] if r['mask'] == mask]
    if rows:
      axes[0].plot([r['tokens'] for r in rows], [r['ratio'] for r in rows], 'o-', label=mask)
  axes[0].plot([1, 64], [1, 64], 'k:', lw=0.8, label='r(T) = T')
  axes[0].set(xscale='log', yscale='log', xlabel='tokens per verify T',
              ylabel='r(T) = verify(T) / plain step')
  axes[0].set_xscale('log', base=2)
  axes[0].legend(fontsize=8)
  rows = results['drafters']
  if not rows:
    axes[1].set_axis_off()
  x = np.arange(len(rows))
  axes[1].bar(x - 0.2, [r['predicted_speedup'] for r in rows], 0.4, label='predicted')
  axes[1].bar(x + 0.2, [r['measured_speedup'] for r in rows], 0.4, label='measured')
  axes[1].axhline(1.0, color='k', lw=0.8)
  axes[1].set_xticks(x, [r['name'] for r in rows], rotation=30, fontsize=8)
  axes[1].set_ylabel('speedup over plain generate')
  axes[1].legend(fontsize=8)
  opts = results['options']
  fig.suptitle(f"{opts['config']} {opts['precision']}, {results['device']}, batch 1", fontsize=9)
  fig.tight_layout()
  fig.savefig(out_png, dpi=120)
  plt.close(fig)


def write_results(results: dict[str, Any], workdir: str) -> None:
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, 'results.json'), 'w') as fh:
    json.dump(results, fh, indent=2)
  with open(os.path.join(workdir, 'results.md'), 'w') as fh:
    fh.write(format_tables(results) + '\n')
  plot(results, os.path.join(workdir, 'cost_model.png'))
