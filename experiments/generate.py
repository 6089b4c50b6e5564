"""Text prompts in, text out, from a Hugging Face model directory or a trained run.

  python -m experiments.generate --init_from_hf=/path/to/Llama-3.2-1B --prompt="def fib(n):" \
      --draft=medusa --max_new_tokens=128

Streams each prompt's continuation as it is produced (`jax_spec.decoding.text.generate_text`),
then decodes all prompts again as one batch, plainly and with the drafter, interleaved
`--repeats` times after a warm-up compile, and prints tau (tokens per verify step), tokens/s of
both and the speedup (medians). `--init_from_hf` reads the directory's heads.safetensors (written
by `jax_spec.pretrained.save_pretrained`) when it has one; `--workdir` loads experiments.train's
latest checkpoint. `--matmul_dtype=bf16` decodes in bf16 products on CPU (`decoding.prepare`).
"""
from __future__ import annotations

import json
import statistics
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp

from jax_spec import cli
from jax_spec import decoding
from jax_spec import pretrained
from jax_spec.decoding import drafters as drafters_lib
from jax_spec.decoding import text as text_lib
from jax_spec.training import restore
from jax_spec.evaluation import speculative_benchmark as benchmark_lib

FLAGS = flags.FLAGS
# Drafters that live in the model itself (a separate draft model is experiments.speculative's).
DRAFTS = ('none',) + tuple(sorted(set(drafters_lib.registered()) - {'model'}))


def define_flags():
  flags.DEFINE_string('init_from_hf', None, 'A Hugging Face model directory (config.json, '
                      'safetensors, tokenizer.json).')
  flags.DEFINE_string('workdir', None, 'Or: a run of experiments.train.')
  flags.DEFINE_multi_string('prompt', [], 'A prompt (repeatable).')
  flags.DEFINE_string('prompt_file', None, 'A file with one prompt per line.')
  flags.DEFINE_enum('draft', 'none', list(DRAFTS), 'Drafter (none: plain decoding only; the '
                    'heads must be in the model).')
  flags.DEFINE_string('tree', None, "Candidate tree: chain | chainN | default | default:N "
                      "(default: 'default' for medusa, 'chain' otherwise).")
  flags.DEFINE_integer('max_new_tokens', 64, 'Tokens to generate per prompt.')
  flags.DEFINE_float('temperature', 0.0, 'Sampling temperature (0 = greedy).')
  flags.DEFINE_integer('top_k', 0, 'Top-k filter (0 = off).')
  flags.DEFINE_float('top_p', 1.0, 'Top-p filter (1 = off).')
  flags.DEFINE_integer('seed', 0, 'Sampling seed.')
  flags.DEFINE_enum('param_dtype', 'float32', ['float32', 'bfloat16'], 'Trunk storage dtype '
                    '(--init_from_hf).')
  flags.DEFINE_enum('precision', 'fp32', list(benchmark_lib.DECODE_PRECISIONS),
                    'Compute precision (fp32: see jax_spec/evaluation/speculative_benchmark.py).')
  flags.DEFINE_enum('matmul_dtype', 'fp32', list(benchmark_lib.MATMUL_DTYPES),
                    "The CPU kernel's products: fp32, or bf16 (every matrix and each matmul's "
                    'activations rounded to bf16, AVX512_BF16 dot products: faster, another '
                    "model's numbers; decoding.prepare).")
  flags.DEFINE_integer('chunk_tokens', 16, 'Tokens per streamed chunk.')
  flags.DEFINE_integer('repeats', 3, 'Timed repetitions of each sampler (medians reported).')
  flags.DEFINE_string('results', None, 'Write the figures as JSON here.')


def load(f):
  if bool(f.init_from_hf) == bool(f.workdir):
    raise app.UsageError('give exactly one of --init_from_hf and --workdir')
  policy = f.precision
  if f.init_from_hf:
    model, tokenizer, _ = pretrained.from_pretrained(f.init_from_hf, policy=policy,
                                                     param_dtype=jnp.dtype(f.param_dtype))
    return model, tokenizer
  model, tokenizer, _ = restore.load_model_from_workdir(f.workdir, policy=policy)
  return model, tokenizer


def read_prompts(f) -> list[str]:
  prompts = list(f.prompt)
  if f.prompt_file:
    prompts += benchmark_lib.read_prompt_file(f.prompt_file, allow_empty=True)
  if not prompts:
    raise app.UsageError('give --prompt (repeatable) or --prompt_file')
  return prompts


def run(f) -> dict:
  model, tokenizer = load(f)
  # Prepared once (split, packed) for every call below; both samplers decode the same one.
  model = decoding.prepare(model, matmul_dtype=benchmark_lib.MATMUL_DTYPES[f.matmul_dtype])
  prompts = read_prompts(f)
  drafter = None if f.draft == 'none' else f.draft
  spec_kwargs = {} if drafter is None else {'tree': f.tree or benchmark_lib.default_tree(drafter)}
  common = dict(max_new_tokens=f.max_new_tokens, temperature=f.temperature, top_k=f.top_k,
                top_p=f.top_p, seed=f.seed)

  for i, prompt in enumerate(prompts):
    print(f'--- prompt {i}: {prompt!r}\n{prompt}', end='', flush=True)
    text_lib.generate_text(model, tokenizer, [prompt], drafter=drafter,
                           on_text=lambda _, s: print(s, end='', flush=True),
                           chunk_tokens=f.chunk_tokens, **common, **spec_kwargs)
    print(flush=True)

  def timed(**kwargs):
    start = time.perf_counter()
    out = text_lib.generate_text(model, tokenizer, prompts, **common, **kwargs)
    return time.perf_counter() - start, out

  samplers = {'plain': {}}
  if drafter is not None:
    samplers[drafter] = dict(drafter=drafter, **spec_kwargs)
  for kwargs in samplers.values():
    timed(**kwargs)  # warm-up: compile for the batch shape
  seconds = {name: [] for name in samplers}
  outs = {}
  for _ in range(f.repeats):
    for name, kwargs in samplers.items():
      s, outs[name] = timed(**kwargs)
      seconds[name].append(s)
  results = {'prompts': len(prompts), 'max_new_tokens': f.max_new_tokens, 'draft': f.draft,
             'temperature': f.temperature, 'matmul_dtype': f.matmul_dtype,
             'backend': jax.default_backend()}
  for name, out in outs.items():
    tokens = sum(map(len, out.tokens))
    results[name] = {'tokens': tokens, 'seconds_median': statistics.median(seconds[name]),
                     'tokens_per_s': tokens / statistics.median(seconds[name])}
  if drafter is not None:
    stats = outs[drafter].stats
    results['tau'] = stats['mean_accepted_length']
    results['speedup'] = statistics.median(seconds['plain']) / statistics.median(seconds[drafter])
    if f.temperature == 0:
      results['identical_to_plain'] = outs[drafter].tokens == outs['plain'].tokens
  print(f'plain: {results["plain"]["tokens_per_s"]:.1f} tokens/s')
  if drafter is not None:
    print(f'{drafter}: {results[drafter]["tokens_per_s"]:.1f} tokens/s, tau {results["tau"]:.2f}, '
          f'speedup {results["speedup"]:.2f}x over plain decoding on these prompts'
          + (f', identical: {results["identical_to_plain"]}' if f.temperature == 0 else ''))
  if f.results:
    with open(f.results, 'w') as fh:
      json.dump(results, fh, indent=2)
  return results


if __name__ == '__main__':
  define_flags()
  cli.run(lambda argv: run(FLAGS), quiet=True)   # cli.run rejects positional arguments
