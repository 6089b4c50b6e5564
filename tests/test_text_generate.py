"""Smoke test of experiments.generate: streams text, then prints tau, tokens/s and the speedup."""
import json
import os
import types

import pytest
from absl import app

from experiments import generate
from jax_spec import pretrained

FIXTURE = os.path.join(os.path.dirname(__file__), 'fixtures', 'hf', 'qwen3')


def flags(**overrides):
  values = dict(init_from_hf=None, workdir=None, prompt=[], prompt_file=None, draft='none',
                tree=None, max_new_tokens=6, temperature=0.0, top_k=0, top_p=1.0, seed=0,
                param_dtype='float32', precision='fp32', matmul_dtype='fp32', chunk_tokens=4,
                repeats=1, results=None)
  values.update(overrides)
  return types.SimpleNamespace(**values)


def test_generate_cli(tmp_path, capsys):
  model, tok, _ = pretrained.from_pretrained(FIXTURE, medusa_heads=2)
  pretrained.save_pretrained(model, str(tmp_path / 'model'), tokenizer=tok)
  (tmp_path / 'prompts.txt').write_text('import json\n\nclass A:\n')
  results = generate.run(flags(init_from_hf=str(tmp_path / 'model'), prompt=['def f(x):'],
                               prompt_file=str(tmp_path / 'prompts.txt'), draft='medusa',
                               results=str(tmp_path / 'r.json')))
  printed = capsys.readouterr().out
  for prompt in ('def f(x):', 'import json', 'class A:'):
    assert f'--- prompt' in printed and prompt in printed
  assert 'tokens/s' in printed and 'tau' in printed and 'speedup' in printed
  assert results['prompts'] == 3 and results['identical_to_plain']
  assert json.loads((tmp_path / 'r.json').read_text())['tau'] == results['tau'] >= 1
  bf16 = generate.run(flags(init_from_hf=str(tmp_path / 'model'), prompt=['def f(x):'],
                            draft='medusa', matmul_dtype='bf16'))   # bf16 products: still lossless
  assert bf16['identical_to_plain'] and bf16['matmul_dtype'] == 'bf16'
  with pytest.raises(app.UsageError, match='exactly one'):
    generate.run(flags())
  with pytest.raises(app.UsageError, match='--prompt'):
    generate.run(flags(init_from_hf=str(tmp_path / 'model')))
