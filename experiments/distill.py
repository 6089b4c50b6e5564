"""Self-distilled training data: the model's own continuations of your prompts.

  python -m experiments.distill --init_from_hf=DIR --prompts=prompts.txt --workdir=/tmp/distill
  python -m experiments.train --init_from_hf=DIR --freeze_trunk --medusa_heads=4 \
      --data_path=/tmp/distill/texts

When the model's training data is unavailable, Medusa-2 and EAGLE train heads on what the model
itself generates: the heads then learn the distribution they will have to predict. Prompts (one
per line) are decoded in batches by the jitted autoregressive baseline (`generate`, through
`generate_text`); each (prompt, sample) becomes one document, `texts/NNNNNN.txt` = prompt +
continuation, which `--data_path` reads as a directory of documents. Batches already written are
skipped, so an interrupted run resumes. `distill.json` records the settings and counts.
"""
from __future__ import annotations

import json
import os

from absl import app
from absl import flags
import jax.numpy as jnp
from tqdm import tqdm

from jax_spec import cli
from jax_spec import pretrained
from jax_spec.decoding import text as text_lib
from jax_spec.evaluation import speculative_benchmark as benchmark_lib

FLAGS = flags.FLAGS


def define_flags():
  flags.DEFINE_string('init_from_hf', None, 'A Hugging Face model directory.')
  flags.DEFINE_string('prompts', None, 'A text file with one prompt per line.')
  flags.DEFINE_string('workdir', None, 'Output directory (texts/ and distill.json).')
  flags.DEFINE_integer('max_new_tokens', 128, 'Tokens generated per sample.')
  flags.DEFINE_integer('samples_per_prompt', 1, 'Continuations per prompt (use temperature > 0).')
  flags.DEFINE_integer('batch_size', 8, 'Sequences per sampler call.')
  flags.DEFINE_float('temperature', 0.0, 'Sampling temperature (0 = greedy).')
  flags.DEFINE_float('top_p', 1.0, 'Top-p filter (1 = off).')
  flags.DEFINE_integer('seed', 0, 'Sampling seed (batch i uses seed + i).')
  flags.DEFINE_enum('param_dtype', 'float32', ['float32', 'bfloat16'], 'Trunk storage dtype.')
  flags.DEFINE_enum('precision', 'fp32', list(benchmark_lib.DECODE_PRECISIONS),
                    'Compute precision (fp32: see jax_spec/evaluation/speculative_benchmark.py).')


def run(f) -> dict:
  for name in ('init_from_hf', 'prompts', 'workdir'):
    if not getattr(f, name):
      raise app.UsageError(f'--{name} is required')
  for name in ('max_new_tokens', 'samples_per_prompt', 'batch_size'):
    if getattr(f, name) < 1:
      raise app.UsageError(f'--{name} must be >= 1, got {getattr(f, name)}')
  if f.samples_per_prompt > 1 and f.temperature == 0:
    raise app.UsageError('--samples_per_prompt > 1 needs --temperature > 0 (greedy samples are '
                         'identical)')
  prompts = benchmark_lib.read_prompt_file(f.prompts, what='--prompts')
  model, tokenizer, _ = pretrained.from_pretrained(
      f.init_from_hf, policy=f.precision,
      param_dtype=jnp.dtype(f.param_dtype), heads=False)
  jobs = [p for p in prompts for _ in range(f.samples_per_prompt)]
  out_dir = os.path.join(f.workdir, 'texts')
  os.makedirs(out_dir, exist_ok=True)
  tokens = written = 0
  for start in tqdm(range(0, len(jobs), f.batch_size), desc='distill', unit='batch'):
    batch = jobs[start:start + f.batch_size]
    paths = [os.path.join(out_dir, f'{start + i:06d}.txt') for i in range(len(batch))]
    if all(os.path.isfile(p) for p in paths):
      continue  # written by an earlier (interrupted) run
    out = text_lib.generate_text(model, tokenizer, batch, max_new_tokens=f.max_new_tokens,
                                 temperature=f.temperature, top_p=f.top_p,
                                 seed=f.seed + start // f.batch_size)
    for path, prompt, continuation, ids in zip(paths, batch, out.texts, out.tokens):
      with open(path + '.tmp', 'w') as fh:
        fh.write(prompt + continuation)
      os.replace(path + '.tmp', path)  # a file exists only when complete
      tokens += len(ids)
      written += 1
  summary = {'init_from_hf': os.path.abspath(f.init_from_hf), 'prompts': len(prompts),
             'documents': len(jobs), 'written_this_run': written,
             'generated_tokens_this_run': tokens, 'max_new_tokens': f.max_new_tokens,
             'temperature': f.temperature, 'top_p': f.top_p, 'seed': f.seed,
             'data_path': out_dir}
  with open(os.path.join(f.workdir, 'distill.json'), 'w') as fh:
    json.dump(summary, fh, indent=2)
  print(f'{len(jobs)} documents in {out_dir} ({written} written now, {tokens} tokens); train '
        f'with --data_path={out_dir}')
  return summary


if __name__ == '__main__':
  define_flags()
  cli.run(lambda argv: run(FLAGS), quiet=True)   # cli.run rejects positional arguments
