"""Verify cost r(T) of several checkouts / XLA flag sets, timed interleaved in one run.

Comparing today's code with a change (or one XLA:CPU flag set with another) needs both timed under
the same machine load. `compare(variants, ...)` starts one worker process per `Variant` (its
checkout first on PYTHONPATH, its own XLA_FLAGS), each compiles the same verify loops (this file's
`verify_loop`, which uses only the stable `models.extend` / `advance` API, so old checkouts run
it too), then the driver asks the workers for one timed round each, in rotating order, `repeats`
times (each round: per T the fastest of `calls` calls, the least disturbed by the other jobs on a
shared machine). Reported per variant and T: median ms per step, r(T) as the median of per-round ratios, and
the plain step's speedup over the first variant (median of per-round ratios).

Each verify loop is timed at `steps` and `2 steps` iterations and differenced (`per_iteration`):
a call's fixed work (packing the weights, zeroing the cache) cancels; undifferenced, it had
made r(16) read 3.9 for a true 8.1 on the 2-core VM (docs/benchmarks.md, "Part timings
without fixed costs").

`loops` adds whole decoding loops to each round (`loop_fn`: plain `generate` and
`speculative_generate` chains of the named drafters on a model with Medusa and EAGLE heads,
`decoding.prepare`d where the checkout has it), each at two `max_new_tokens` and differenced,
reported per decoded step and in plain steps: a change (or an XLA flag) that speeds up the verify
forward alone can still slow the whole loop, whose drafting and bookkeeping are many small ops.

  python -m experiments.bench_verify --workdir=/tmp/ab --ab='base=/tmp/cost_base' --ab='new=.'
"""
from __future__ import annotations

import dataclasses
import json
import os
import statistics
import subprocess
import sys
from typing import Any


@dataclasses.dataclass(frozen=True)
class Variant:
  label: str
  checkout: str                 # repository root whose jax_spec is imported
  xla_flags: str = ''           # the worker's whole XLA_FLAGS

  @classmethod
  def parse(cls, spec: str, default_flags: str) -> 'Variant':
    """'label=PATH' or 'label=PATH --xla_flag=... ...' (the flags replace `default_flags`)."""
    label, sep, rest = spec.partition('=')
    path, _, flags = rest.strip().partition(' ')
    if not sep or not label or not path:
      raise ValueError(f"ab variant must be 'label=PATH [XLA flags]', got {spec!r}")
    if not os.path.isdir(os.path.join(path, 'jax_spec')):
      raise ValueError(f'ab variant {label!r}: {path!r} is not a checkout (no jax_spec/ in it)')
    return cls(label, os.path.abspath(path), flags.strip() or default_flags)


def verify_loop(model, depths_T, mask_TT, cache_len, prefix_len, steps):
  """Trunk verify forwards of T nodes (depths [T], ancestor mask [T, T]) after a
  `prefix_len`-token cache; each commits one token. -> a timed function of the number of
  iterations (default `steps`; a traced trip count, so one compile serves every count).

  A call also packs the weights and zeroes the cache, milliseconds that would swamp a few
  iterations of a one-token step: time two counts and difference them (`per_iteration`).
  The imports are local so that a worker can run this against an older checkout's jax_spec.
  """
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from jax_spec import models  # pylint: disable=g-import-not-at-top
  graphdef, state = nnx.split(model)
  num_tokens = len(depths_T)
  depths_BT = jnp.asarray(depths_T, jnp.int32)[None]
  mask_BTT = jnp.asarray(mask_TT, bool)[None]

  @jax.jit
  def run(state, num_steps):
    m = nnx.merge(graphdef, state)
    cache = models.init_cache(m, 1, cache_len).replace(lengths=jnp.array([prefix_len], jnp.int32))

    def body(_, carry):
      cache, token_B = carry
      tokens_BT = (token_B[:, None] + jnp.arange(num_tokens)) % m.config.vocab_size
      outs, cache = models.extend(m, tokens_BT.astype(jnp.int32), depths_BT, mask_BTT, cache)
      cache = models.advance(cache, jnp.ones((1,), jnp.int32))
      return cache, jnp.argmax(outs.logits_BTV[:, -1], -1).astype(jnp.int32)

    with _packed(m):
      return jax.lax.fori_loop(0, num_steps, body, (cache, jnp.zeros((1,), jnp.int32)))[1]

  return lambda num_steps=steps: run(state, jnp.int32(num_steps))


def fastest(fn, calls: int = 1, clock=None) -> float:
  """Seconds of the fastest of `calls` calls of `fn()`: the least disturbed on a shared machine.
  `clock`: seconds now (default `time.perf_counter`)."""
  import time  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  clock = clock or time.perf_counter
  best = float('inf')
  for _ in range(calls):
    t0 = clock()
    jax.block_until_ready(fn())
    best = min(best, clock() - t0)
  return best


def per_iteration(fn, steps: int, calls: int = 1, clock=None):
  """Seconds per iteration of `fn(num_steps)`: the `fastest` of `calls` calls at `steps` and at
  `2 steps` iterations, differenced, so what a call pays once (packing, cache init, dispatch)
  cancels. `fn` must already be compiled. Below the timer's noise (a few tiny iterations) the
  difference can come out <= 0."""
  short = fastest(lambda: fn(steps), calls, clock)
  return (fastest(lambda: fn(2 * steps), calls, clock) - short) / steps


def _packed(*modules):
  """The decode loops' `rows_matmul.packed` block (a no-op in checkouts older than it)."""
  import contextlib  # pylint: disable=g-import-not-at-top
  from jax_spec import models  # pylint: disable=g-import-not-at-top
  if not hasattr(models, 'decode_packs'):
    return contextlib.nullcontext()
  from jax_spec.kernels import rows_matmul  # pylint: disable=g-import-not-at-top
  return rows_matmul.packed(models.decode_packs(*modules))


LOOP_DRAFTERS = ('medusa', 'eagle')


def loop_fn(config: str, precision: str, drafter: str, depth: int = 6, prompt_len: int = 64,
            max_new_tokens: int = 96):
  """(a no-argument function decoding one random prompt, its number of loop steps): plain
  `generate` for drafter 'plain', else a `speculative_generate` chain of `depth` drafts (Medusa:
  its 3 heads) from a random-weight model of `config` with 3 Medusa heads and one EAGLE block."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from jax_spec import decoding, models  # pylint: disable=g-import-not-at-top
  from jax_spec import precision as precision_lib  # pylint: disable=g-import-not-at-top
  cfg = models.PRESETS[config].replace(mtp_depth=0, medusa_heads=3, eagle_layers=1)
  model = models.Transformer(cfg, policy=precision_lib.get_policy(precision), rngs=nnx.Rngs(0))
  prompts_BT = jnp.asarray(np.random.default_rng(0).integers(3, cfg.vocab_size, (1, prompt_len)),
                           jnp.int32)
  lengths_B = jnp.array([prompt_len], jnp.int32)
  # Decoded as the benchmarks decode: prepared once (split, weights packed). Checkouts from before
  # `decoding.prepare` decode the model itself, which packs its weights at every call.
  if hasattr(decoding, 'prepare'):
    model = decoding.prepare(model)
  if drafter == 'plain':
    return (lambda: decoding.generate(model, prompts_BT, lengths_B,
                                      max_new_tokens=max_new_tokens).tokens_BN), max_new_tokens
  num_draft = None if drafter == 'medusa' else depth
  run = lambda: decoding.speculative_generate(model, prompts_BT, lengths_B, drafter=drafter,
                                              tree='chain', num_draft=num_draft,
                                              max_new_tokens=max_new_tokens)
  return (lambda: run().tokens_BN), int(run().stats.loop_steps)


LOOP_NEW_TOKENS = (32, 96)   # whole loops: two calls' max_new_tokens, differenced


def worker(config: str, precision: str, tokens: list[int], cache_len: int, prefix_len: int,
           steps: int, calls: int, loops: list[str] = ()) -> None:
  """Compiles, prints 'ready', then for every input line one JSON line: per T and loop, seconds
  per step (`per_iteration` of the verify loops; whole loops at two `max_new_tokens`, the
  fastest of `calls` calls each, differenced per loop step, so the prefill cancels)."""
  # Imports here: the worker must import the jax_spec of its own checkout (PYTHONPATH).
  import jax  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from jax_spec import models  # pylint: disable=g-import-not-at-top
  from jax_spec import precision as precision_lib  # pylint: disable=g-import-not-at-top
  model = models.Transformer(models.PRESETS[config], policy=precision_lib.get_policy(precision),
                             rngs=nnx.Rngs(params=0))
  # Chains: depths 0..T-1, causal mask.
  verify = {str(t): verify_loop(model, list(range(t)), [[j <= i for j in range(t)]
                                                        for i in range(t)],
                                cache_len, prefix_len, steps) for t in tokens}
  loop_calls = {name: [loop_fn(config, precision, name, max_new_tokens=n)
                       for n in LOOP_NEW_TOKENS] for name in loops}
  for fn in verify.values():
    jax.block_until_ready(fn())
  for (short, _), (long, _) in loop_calls.values():
    jax.block_until_ready((short(), long()))
  print('ready', flush=True)

  for _ in sys.stdin:
    out = {part: per_iteration(fn, steps, calls) for part, fn in verify.items()}
    for name, ((short, short_steps), (long, long_steps)) in loop_calls.items():
      out[f'loop {name}'] = ((fastest(long, calls) - fastest(short, calls))
                             / max(long_steps - short_steps, 1))
    print(json.dumps(out), flush=True)


def compare(variants: list[Variant], *, config: str = 'small', precision: str = 'fp32',
            tokens=(1, 2, 4, 8, 16), cache_len: int = 512, prefix_len: int = 128, steps: int = 16,
            repeats: int = 9, calls: int = 3, loops=()) -> dict[str, Any]:
  """Times every variant's verify loops (and whole `loops`) interleaved (module docstring)."""
  if not variants or len({v.label for v in variants}) != len(variants):
    raise ValueError(f'variants must be non-empty with distinct labels, got {variants}')
  unknown = set(loops) - {'plain', *LOOP_DRAFTERS}
  if unknown:
    raise ValueError(f"loops must be 'plain' or drafters of {LOOP_DRAFTERS}, got {sorted(unknown)}")
  loops = list(dict.fromkeys(['plain', *loops])) if loops else []
  tokens = sorted(set(tokens) | {1})
  if prefix_len + 2 * steps + max(tokens) > cache_len:
    raise ValueError(f'prefix_len + 2 steps + max(tokens) must fit in cache_len {cache_len} (the '
                     f'verify loops are timed at steps and 2 steps), got {prefix_len}, {steps}, '
                     f'{max(tokens)}')
  args = json.dumps(dict(config=config, precision=precision, tokens=tokens, cache_len=cache_len,
                         prefix_len=prefix_len, steps=steps, calls=calls, loops=loops))
  procs = {}
  for v in variants:
    env = dict(os.environ, PYTHONPATH=v.checkout, XLA_FLAGS=v.xla_flags)
    procs[v.label] = subprocess.Popen(
        [sys.executable, os.path.abspath(__file__), args], cwd=v.checkout, env=env,
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
  try:
    for label, p in procs.items():
      line = p.stdout.readline()
      if line.strip() != 'ready':
        raise RuntimeError(f'worker {label!r} failed to start (exit {p.poll()})')
    times = {v.label: [] for v in variants}
    labels = [v.label for v in variants]
    for r in range(repeats):
      for label in labels[r % len(labels):] + labels[:r % len(labels)]:
        procs[label].stdin.write('go\n')
        procs[label].stdin.flush()
        times[label].append(json.loads(procs[label].stdout.readline()))
  finally:
    for p in procs.values():
      p.stdin.close()
      p.wait(timeout=60)
  first = labels[0]
  parts = [str(t) for t in tokens] + [f'loop {name}' for name in loops]
  rows = []
  for v in variants:
    rounds = times[v.label]
    for part in parts:
      unit = 'loop plain' if part.startswith('loop') else '1'   # r(T) and loops: in plain steps
      rows.append({
          'variant': v.label, 'part': part,
          'tokens': None if part.startswith('loop') else int(part),
          'ms_per_step': 1e3 * statistics.median(x[part] for x in rounds),
          'ratio': statistics.median(x[part] / x[unit] for x in rounds),
          # > 1: this variant's step is faster than the first variant's, in the same rounds.
          'speedup_vs_first': statistics.median(a[part] / b[part]
                                                for a, b in zip(times[first], rounds))})
  return {'variants': [dataclasses.asdict(v) for v in variants], 'config': config,
          'precision': precision, 'steps': steps, 'repeats': repeats, 'rows': rows}


def format_table(results: dict[str, Any]) -> str:
  lines = [f"| variant | T or loop | ms / step | r(T) or plain steps | speedup vs "
           f"{results['variants'][0]['label']} |", '|---|---|---|---|---|']
  lines += [f"| {r['variant']} | {r['part']} | {r['ms_per_step']:.3f} | {r['ratio']:.2f} | "
            f"{r['speedup_vs_first']:.2f}x |" for r in results['rows']]
  return '\n'.join(lines)


if __name__ == '__main__':
  worker(**json.loads(sys.argv[1]))
